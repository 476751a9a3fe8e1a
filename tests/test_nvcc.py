"""The kernels compile with nvcc for the H100/H200 (sm_90), wherever nvcc is installed, so a CUDA
mistake fails CI even though CI has no GPU: each version's build (kernels/bindings.cu with its
versionN.cuh, as minimal_flash builds it: it includes no torch header, so it compiles here too),
each kernel file alone, and tools/fragments.cu and tools/hopper_fragments.cu, the tensor-core programs
of tests/test_fragments.py and tests/test_hopper_fragments.py (their inline PTX is checked by the
assembler)."""
import shutil
import subprocess

import pytest

import minimal_flash as mf

ROOT = mf.KERNELS.parent
SOURCES = sorted(p for p in mf.KERNELS.glob("*.cu") if p.name != "bindings.cu") + [
    ROOT / "tools" / "fragments.cu", ROOT / "tools" / "hopper_fragments.cu"]
nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


# Hopper's wgmma and setmaxnreg assemble for the sm_90a target only (chapter 4: hopper.cuh).
SM90A = ("-gencode=arch=compute_90a,code=sm_90a",)


def compile_sm90(source, tmp_path, *defines, target=("-arch=sm_90",)):
    result = subprocess.run(["nvcc", *target, "-O3", "-Xptxas", "-v", f"-I{mf.KERNELS}", *defines, "-c",
                             str(source), "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


@nvcc
@pytest.mark.parametrize("version", list(mf.VERSIONS), ids=[f"v{n}" for n in mf.VERSIONS])
def test_each_version_compiles_without_spills(version, tmp_path):
    report = compile_sm90(mf.KERNELS / "bindings.cu", tmp_path, f"-DVERSION_FILE={mf.VERSIONS[version].home}",
                          target=mf.VERSIONS[version].cuda_flags or ("-arch=sm_90",))
    # A thread's tiles are meant to live in registers: a stack frame would mean they spilled.
    frames = [line for line in report.splitlines() if "stack frame" in line]
    assert frames, report  # the build instantiates every kernel of the version: each has a report
    assert all(line.strip().startswith("0 bytes stack frame") for line in frames), report


@nvcc
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_each_file_compiles_alone(source, tmp_path):
    """Each kernel file includes what it uses (versions 3 and 4 hold only templates: no code, no report)."""
    compile_sm90(source, tmp_path, target=SM90A if '#include "hopper.cuh"' in source.read_text() else ("-arch=sm_90",))


@nvcc
def test_block_timeline_marks_are_in_its_build_only(tmp_path):
    """tools/block_timeline.py's build (-DBLOCK_TIMELINE) reads the clocks and compiles without spills;
    every other build of version 4 is the kernel alone: no clock read in its PTX (kernels/timeline.cuh)."""
    version = mf.VERSIONS[4]
    source, home = mf.KERNELS / "bindings.cu", f"-DVERSION_FILE={version.home}"
    report = compile_sm90(source, tmp_path, home, "-DBLOCK_TIMELINE", target=version.cuda_flags)
    frames = [line for line in report.splitlines() if "stack frame" in line]
    assert frames and all(line.strip().startswith("0 bytes stack frame") for line in frames), report

    def ptx(*defines):
        out = tmp_path / "out.ptx"
        result = subprocess.run(["nvcc", *version.cuda_flags, "-O3", f"-I{mf.KERNELS}", home, *defines, "-ptx",
                                 str(source), "-o", str(out)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return out.read_text()

    assert "%globaltimer_lo" in ptx("-DBLOCK_TIMELINE") and "%clock64" in ptx("-DBLOCK_TIMELINE")
    assert "%globaltimer_lo" not in ptx() and "%clock64" not in ptx()
