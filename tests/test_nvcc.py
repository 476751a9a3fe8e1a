"""Each kernels/*.cu compiles with nvcc for the H100/H200 (sm_90), wherever nvcc is installed, so a
CUDA mistake fails CI even though CI has no GPU. bindings.cu, which includes every kernel, includes
no torch header, so it compiles here too; so does tests/fragments.cu, the tensor-core program of
tests/test_fragments.py (its inline PTX is checked by the assembler)."""
import shutil
import subprocess

import pytest

import minimal_flash as mf

SOURCES = sorted(mf.KERNELS.glob("*.cu")) + [mf.KERNELS.parent / "tests" / "fragments.cu"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90(source, tmp_path):
    result = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-Xptxas", "-v", f"-I{mf.KERNELS}", "-c", str(source),
                             "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # A thread's row of S_ij is meant to live in registers: a stack frame would mean it spilled.
    # bindings.cu instantiates every kernel (flash3.cu alone holds only templates, so no report).
    frames = [line for line in result.stderr.splitlines() if "stack frame" in line]
    assert frames or source.name != "bindings.cu", result.stderr
    assert all(line.strip().startswith("0 bytes stack frame") for line in frames), result.stderr
