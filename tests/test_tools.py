"""The scripts in tools/ on the CPU: each refuses what it cannot do here (no GPU) and every bad argument
in one line (argparse's usage error, or a message and a non-zero exit), never a traceback; and what
they were found to get wrong (ptx_compare's kernels only in NEW, emulation_times' version 4)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# tools/sanitize.py


@pytest.mark.parametrize("args", [["7"], ["bogus"], ["mods:x"], ["mods:9"], ["mods:"], ["mods:1"], ["dropout:2"],
                                  ["3", "--part", "1/3", "1/3"]])
def test_sanitize_refuses_arguments_that_name_no_checks(capsys, args):
    sanitize = tool("sanitize")
    with pytest.raises(SystemExit, match=f"sanitize.py: '{args[-1]}' names no checks: give a version"):
        sanitize.main([*args, "--list"])
    assert capsys.readouterr().out == ""  # nothing listed


def test_sanitize_takes_mods_of_the_versions_that_have_them(capsys):
    sanitize = tool("sanitize")
    sanitize.main(["mods:4", "dropout:3", "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert any("mods v4 " in line for line in lines) and any("dropout v3 " in line for line in lines)
    assert not any("mods v3 " in line or "dropout v4 " in line for line in lines)


def test_sanitize_without_a_gpu_refuses_in_one_line_and_runs_nothing(no_gpu, monkeypatch, capsys):
    sanitize = tool("sanitize")
    monkeypatch.setattr(sanitize, "run", lambda *args: pytest.fail("a check ran"))
    with pytest.raises(SystemExit, match="^sanitize.py runs the CUDA kernels .*: it needs a GPU; --list works"):
        sanitize.main(["1"])
    assert capsys.readouterr().out == ""


# tools/hopper_steps.py


def test_hopper_steps_without_a_gpu_refuses_before_building(no_gpu, monkeypatch):
    steps = tool("hopper_steps")
    monkeypatch.setattr(steps, "step_kernels", lambda step: pytest.fail("built"))
    with pytest.raises(SystemExit, match="^hopper_steps.py times version 4's CUDA kernels: it needs a Hopper GPU$"):
        steps.main(["--steps", "1", "--dims", "64", "--seq-len", "16"])


# tools/ab.py


def with_heads_tree(folder, program):
    """The lines `program` prints, run in a process of its own (the old module registers the
    torch.ops.minimal_flash operators again, over this one's) with `ab` (tools/ab.py) and `old`, HEAD's
    minimal_flash.py and kernels/ extracted into folder and loaded (the tests run on a clean checkout:
    HEAD's kernels are these)."""
    preamble = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
from helpers import tool
ab = tool("ab")
old = ab.load_old(ab.commit_of("HEAD"), {str(folder)!r})
"""
    run = subprocess.run([sys.executable, "-c", preamble + program], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()


def test_ab_without_a_gpu_refuses_before_extracting(no_gpu, monkeypatch):
    ab = tool("ab")
    monkeypatch.setattr(ab, "load_old", lambda *args: pytest.fail("extracted"))
    with pytest.raises(SystemExit, match="^ab.py times CUDA kernels: it needs a GPU$"):
        ab.main(["HEAD"])


def test_ab_loads_the_old_commits_tree_beside_this_one(tmp_path):
    """HEAD's minimal_flash.py and kernels/, extracted and loaded as a module of their own, whose kernels
    are read from the extracted folder, give what this tree's give (the repository's tests run on a
    clean checkout: HEAD's kernels are these). In a process of its own: the old module registers the
    torch.ops.minimal_flash operators again, over this one's (ab.py calls forward and backward only)."""
    lines = with_heads_tree(tmp_path, f"""
import torch
from pathlib import Path
import minimal_flash as mf
assert old is not mf and old.KERNELS == (Path({str(tmp_path)!r}) / "kernels").resolve()
assert (old.KERNELS / "flash.cu").read_text() == (mf.KERNELS / "flash.cu").read_text()
q, k, v = (torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
print(all(torch.equal(a, b) for a, b in zip(old.forward(q, k, v, version=1), mf.forward(q, k, v, version=1))))
""")
    assert lines[-1] == "True"


def test_ab_host_refuses_the_options_it_does_not_take(capsys):
    with pytest.raises(SystemExit):
        tool("ab").main(["HEAD", "--host", "--shapes", "1,2,64,64"])
    assert "--host times flash_attention on (1, 1, 128, 64), without and with its backward: leave out --shapes " \
           "and --passes" in capsys.readouterr().err


def test_ab_host_times_both_trees_in_turn(tmp_path):
    """--host's lines, on the CPU (the GPU's synchronizing left out): HEAD's tree and this one each timed,
    without and with the backward, a ratio of the two. In a process of its own, as above."""
    lines = with_heads_tree(tmp_path, """
print(*ab.host_lines(old, ["causal", "full"], 1, rounds=2, device="cpu", per_round=2), sep="\\n")
""")
    assert len(lines) == 2, lines
    pattern = (r"\(1, 1, 128, 64\) +{}:  forward [\d.]+ / [\d.]+ us = [\d.]+x  "
               r"forward \+ backward [\d.]+ / [\d.]+ us = [\d.]+x")
    for line, case in zip(lines, ("causal", "full")):
        assert re.fullmatch(pattern.format(case), line), line


def test_ab_decode_refuses_the_options_it_does_not_take(capsys):
    with pytest.raises(SystemExit):
        tool("ab").main(["HEAD", "--decode", "1,1024", "--cases", "causal"])
    assert "--decode times flash_attn_with_kvcache (version 3's decode kernels) at its own points: leave out " \
           "--host, --shapes, --passes, --cases and --version" in capsys.readouterr().err


def test_ab_decode_times_both_trees_in_turn(tmp_path):
    """--decode's lines, on the CPU (plain calls, no CUDA graph): HEAD's tree and this one each run a decode
    step, contiguous and paged, on the same inputs: the same bits (the same kernels), a ratio of the two
    times. In a process of its own, as above."""
    lines = with_heads_tree(tmp_path, """
print(*ab.decode_lines(old, [(2, 300)], rounds=2, device="cpu"), sep="\\n")
""")
    assert len(lines) == 2, lines
    for line, layout in zip(lines, ("contiguous", "paged")):
        pattern = rf"batch  2 context    300 +{layout}: [\d.]+ / [\d.]+ us = [\d.]+x \(same bits\? out: True\)"
        assert re.fullmatch(pattern, line), line

# tools/block_timeline.py


def test_block_timeline_without_a_gpu_refuses_before_building(no_gpu, monkeypatch):
    timeline = tool("block_timeline")
    monkeypatch.setattr(timeline.mf, "flash_attention", lambda *args, **kwargs: pytest.fail("ran"))
    version = timeline.mf.VERSIONS[4]
    with pytest.raises(SystemExit, match="^block_timeline.py times version 4's CUDA kernels: it needs a Hopper GPU$"):
        timeline.main(["--seq-len", "256"])
    assert timeline.mf.VERSIONS[4] is version  # the default build's flags untouched


def block_marks(sm, start, ends, q_landed, loops, epilogue_ends):
    """What each consumer's thread 0 writes (kernels/timeline.cuh), for blocks given consumer by consumer."""
    return torch.tensor([[[sm[b], start[b], ends[b][c] % 2**32, q_landed, loops[b], epilogue_ends[b][c], 0, 0]
                          for c in range(2)] for b in range(len(sm))])


def test_block_timeline_summary_of_known_marks():
    """Four work tiles on two SMs: per tile 1000 cycles, Q landed at 100, the epilogue 300, the second
    consumer 50 later; so 450 cycles beyond the tiles', 0.45 tiles. Work tile 1 starts before the 32-bit
    timer wraps, its first consumer ends before it too, its second after: it lasts 130 ns. SM 0's next
    starts 200 ns after its first ends; SM 1's, 10 ns before (a persistent block's consumers overlap)."""
    timeline = tool("block_timeline")
    walked = torch.tensor([2, 4, 2, 4])
    loops = [100 + 1000 * w for w in walked.tolist()]
    ends = [[e + 300, e + 350] for e in loops]
    wrap = 2**32
    records = block_marks(sm=[0, 1, 0, 1], start=[1000, wrap - 100, 3200, 20],
                          ends=[[2990, 3000], [wrap - 20, 30], [5150, 5200], [3430, 3400]], q_landed=100, loops=loops,
                          epilogue_ends=ends)
    got = timeline.summary(records, walked)
    walls = [2000, 130, 2000, 3410]
    assert got == dict(work_tiles=4, tiles=3.0, q_landed=100.0, per_tile=1000.0, epilogue=300.0, skew=50.0,
                       rest_tiles=pytest.approx(0.45), work_tile_us=pytest.approx(sum(walls) / 4 / 1e3),
                       cycles_per_ns=pytest.approx(3450 / (sum(walls) / 4)),
                       gap_ns=95)  # the median of SM 0's 3200 - 3000 and SM 1's 20 - 30


@pytest.mark.parametrize("consumers", [2, 3])
def test_block_timeline_reads_each_blocks_marks_from_its_rows_of_L(consumers):
    """Work tile (slice, tile)'s consumer c writes rows Br tile + 64 c .. + 8 of its slice's L, Br = 64 x
    the consumers, which its marks say (their 7th). N = 2 Br + 64: two whole work tiles a slice, read, and
    a last one of 64 rows (its first consumer's marks only), left out."""
    timeline = tool("block_timeline")
    Br = 64 * consumers
    N = 2 * Br + 64
    L = torch.full((2, 1, N), float("nan"))
    bits = L.view(torch.int32)
    for bh in range(2):
        for tile in range(3):
            for c in range(consumers if tile < 2 else 1):
                marks = torch.arange(8) + 100 * (3 * bh + tile) + 10 * c
                marks[6] = consumers
                bits[bh, 0, Br * tile + 64 * c:Br * tile + 64 * c + 8] = marks
    records, rows = timeline.records_of(L, N)
    assert rows == Br and records.shape == (4, consumers, 8) and records.dtype == torch.int64
    assert records[:, :, 0].tolist() == [[100 * t + 10 * c for c in range(consumers)] for t in (0, 1, 3, 4)]


def test_block_timeline_refuses_an_L_without_marks():
    """An L that no timeline build wrote (its 7th value no count of consumers): an error, not statistics."""
    with pytest.raises(ValueError, match="L holds no block timeline"):
        tool("block_timeline").records_of(torch.zeros(1, 1, 256), 256)


def test_block_timeline_counts_the_tiles_the_kernel_walks():
    """Per query tile of 128 rows at N = 512: all 4 key tiles; causal, up to the diagonal's; a window of
    128 keys, the diagonal's and the one before it (row 128 t sees key 128 t - 128)."""
    timeline = tool("block_timeline")
    assert timeline.tiles_walked("full", 512).tolist() == [4, 4, 4, 4]
    assert timeline.tiles_walked("causal", 512).tolist() == [1, 2, 3, 4]
    assert timeline.tiles_walked("window:128", 512).tolist() == [1, 2, 2, 2]
    assert timeline.tiles_walked("window:129", 512).tolist() == [1, 2, 3, 3]
    # three consumers' tiles of 192 rows: the whole ones (rows 0-191, 192-383); causal, up to the key tile
    # of each one's last row (191: tile 1; 383: tile 2); a window of 128, from the key tile of row - 128
    assert timeline.tiles_walked("full", 512, 192).tolist() == [4, 4]
    assert timeline.tiles_walked("causal", 512, 192).tolist() == [2, 3]
    assert timeline.tiles_walked("window:128", 512, 192).tolist() == [2, 3]


# tools/emulation_times.py


def test_emulation_times_runs_each_version_in_a_dtype_it_takes(capsys):
    """Version 4 takes bf16 and fp16 only: it was run in fp32, a TypeError."""
    tool("emulation_times").main(["--versions", "4", "1", "--sizes", "16", "--repeat", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:2] in (["4", "16"],
                                                                                                  ["1", "16"])]
    assert [row[:3] for row in rows] == [["4", "16", "forward"], ["4", "16", "backward"],
                                         ["1", "16", "forward"], ["1", "16", "backward"]]
    assert all(float(row[3]) > 0 for row in rows)


@pytest.mark.parametrize("name, args, said", [
    ("hopper_steps", ["--dtype", "fp32"], "argument --dtype: invalid choice: 'fp32'"),
    ("hopper_steps", ["--dims", "96"], "argument --dims: invalid choice: 96"),
    ("hopper_steps", ["--steps", "7"], "argument --steps: invalid choice: 7"),
    ("hopper_steps", ["--seq-len", "0"], "argument --seq-len: must be at least 1, not 0"),
    ("block_timeline", ["--cases", "window:0"],
     "argument --cases: 'window:0' is not causal, full or window:W (W >= 1)"),
    ("block_timeline", ["--dim", "96"], "argument --dim: invalid choice: 96 (choose from 64, 128)"),
    ("block_timeline", ["--seq-len", "200"], "argument --seq-len: 200 is not a multiple of 128: each block's marks "
                                             "take whole tiles' rows"),
    ("ab", ["no-such-commit"], "argument commit: 'no-such-commit' is not a commit of this repository"),
    ("ab", ["HEAD", "--shapes", "4,16,4096"], "argument --shapes: '4,16,4096' is not B,H,N,d (four whole numbers "
                                              ">= 1)"),
    ("ab", ["HEAD", "--cases", "dropout"], "argument --cases: invalid choice: 'dropout'"),
    ("ab", ["HEAD", "--decode", "1"], "argument --decode: '1' is not batch,context (two whole numbers >= 1)"),
    ("emulation_times", ["--versions", "5"], "argument --versions: invalid choice: 5"),
    ("emulation_times", ["--repeat", "0"], "argument --repeat: must be at least 1, not 0"),
    ("emulation_times", ["--sizes", "-4"], "argument --sizes: must be at least 1, not -4")])
def test_bad_arguments_are_usage_errors(capsys, name, args, said):
    with pytest.raises(SystemExit) as exit:
        tool(name).main(args)
    assert exit.value.code == 2 and said in capsys.readouterr().err.splitlines()[-1]


# tools/ptx_compare.py


def ptx(path, *kernels):
    """A PTX file of kernels, each named NAME (mangled as a C++ function of a float pointer) and with its
    own instruction; its labels carry the function's index, as nvcc writes them."""
    entries = [f".visible .entry _Z{len(name)}{name}Pf(\n\t.param .u64 _Z{len(name)}{name}Pf_param_0\n)\n{{\n"
               f"$L__BB{i}_1:\n\t{instruction};\n\tret;\n}}\n" for i, (name, instruction) in enumerate(kernels)]
    path.write_text("//\n// Generated by NVIDIA NVVM Compiler\n\n" + "\n".join(entries))
    return str(path)


def test_ptx_compare_reports_kernels_only_in_new_and_fails(tmp_path, capsys):
    compare = tool("ptx_compare")
    old = ptx(tmp_path / "old.ptx", ("foo", "mov.u32 %r1, 1"))
    new = ptx(tmp_path / "new.ptx", ("bar", "mov.u32 %r1, 2"), ("foo", "mov.u32 %r1, 1"))  # foo's label index moved
    assert compare.main([old, new]) == 1
    assert capsys.readouterr().out.splitlines() == ["same     foo -> foo", "only in new: bar",
                                                     "1 of 1 kernels the same; 1 only in new"]
    assert compare.main([old, old]) == 0 and capsys.readouterr().out.splitlines()[-1] == "1 of 1 kernels the same"
    assert compare.main([new, old]) == 1 and "missing in new: bar (looked for bar)" in capsys.readouterr().out
    renamed = ptx(tmp_path / "renamed.ptx", ("baz", "mov.u32 %r1, 1"))
    assert compare.main([old, renamed, "--rename", "f.o=baz"]) == 0
    assert compare.main([old, renamed]) == 1


@pytest.mark.parametrize("args, said", [(["empty.ptx", "old.ptx"], "empty.ptx: no kernel (.entry) in it: not PTX?"),
                                        (["old.ptx", "nope.ptx"], "nope.ptx: No such file or directory"),
                                        (["old.ptx", "old.ptx", "--rename", "foo"], "'foo' is not OLD=NEW"),
                                        (["old.ptx", "old.ptx", "--rename", "(=x"], "'(' is not a regular expression")])
def test_ptx_compare_bad_files_and_arguments_are_usage_errors(tmp_path, monkeypatch, capsys, args, said):
    monkeypatch.chdir(tmp_path)
    ptx(tmp_path / "old.ptx", ("foo", "ret"))
    (tmp_path / "empty.ptx").write_text("")
    with pytest.raises(SystemExit) as exit:
        tool("ptx_compare").main(args)
    assert exit.value.code == 2 and said in capsys.readouterr().err.splitlines()[-1]


# tools/run_notebook.py


@pytest.mark.parametrize("text, said", [(None, "nope.ipynb: No such file or directory"),
                                        ("not json", "nope.ipynb is not a notebook (.ipynb): JSONDecodeError"),
                                        (json.dumps({"nbformat": 4}), "nope.ipynb is not a notebook (.ipynb): "
                                                                      "KeyError: 'cells'")])
def test_run_notebook_refuses_what_is_not_a_notebook_in_one_line(tmp_path, text, said):
    path = tmp_path / "nope.ipynb"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        tool("run_notebook").main(str(path))
    assert str(exit.value).startswith(f"run_notebook.py: {tmp_path}/{said}") and "\n" not in str(exit.value)


# tools/summary.py


def test_summary_says_a_missing_csv_or_marker_in_one_line(tmp_path, monkeypatch, capsys):
    summary = tool("summary")
    monkeypatch.setattr(summary, "RESULTS", tmp_path)  # no CSVs there
    assert summary.main([]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"summary.py: [Errno 2] No such file or directory: '{tmp_path / 'sweep.csv'}'"]
    monkeypatch.undo()
    monkeypatch.setattr(summary, "ROOT", tmp_path)  # the READMEs, without their markers
    for readme in ("README.md", "notebooks/results/README.md"):
        (tmp_path / readme).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / readme).write_text("no tables here\n")
    assert summary.main(["--check"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "summary.py: the markers <!-- summary: begin (generated by python tools/summary.py) --> ... "
        "<!-- summary: end --> are not there exactly once"]


# tools/gpu_check.sh


def fake_gpu_tools(tmp_path, failing_part=None):
    """A PATH with stand-ins for nvidia-smi and compute-sanitizer: the latter runs its command (sanitize.py)
    with --list, which prints a part's checks on any machine, and fails the part named."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version'\n")
    fail = f'case "$*" in *"--part {failing_part}"*) exit 1 ;; esac\n' if failing_part else ""
    (bin_dir / "compute-sanitizer").write_text(
        f'#!/bin/sh\nshift 4\n"$@" --list || exit 1\necho "========= ERROR SUMMARY: 0 errors"\n{fail}')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize("failing_part", [None, "2/3"])
def test_gpu_check_runs_a_sanitizer_in_parts_side_by_side(tmp_path, failing_part):
    """--jobs 3: sanitize.py's checks in three parts, one run each, their logs joined into STEP.txt in the
    parts' order (together, every check once), no part log left; a part that fails fails the step."""
    env = dict(os.environ, PATH=fake_gpu_tools(tmp_path, failing_part))
    run = subprocess.run(["bash", "tools/gpu_check.sh", "memcheck", "--versions", "3", "--jobs", "3", "--logs",
                          str(tmp_path / "logs")], cwd=ROOT, env=env, capture_output=True, text=True)
    log = (tmp_path / "logs" / "memcheck.txt").read_text()
    parts = re.findall(r"checks listed \(part (\d) of 3: (\d+) to (\d+) of (\d+)\)", log)
    assert [p[0] for p in parts] == ["1", "2", "3"], log
    assert int(parts[0][1]) == 1 and int(parts[2][2]) == int(parts[2][3])  # from the first check to the last
    assert all(int(a[2]) + 1 == int(b[1]) for a, b in zip(parts, parts[1:]))  # none twice, none left out
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["gpu.txt", "memcheck.txt"]
    if failing_part:
        assert run.returncode == 1 and "part 2/3 FAILED" in run.stdout and "memcheck: FAILED" in run.stdout
    else:
        assert run.returncode == 0 and "memcheck: PASSED" in run.stdout


@pytest.mark.parametrize("args,said", [(["--jobs", "0"], "--jobs wants a whole number >= 1, not '0'"),
                                       (["--jobs", "x"], "--jobs wants a whole number >= 1, not 'x'"),
                                       (["--jobs", "2", "--versions", "3 --part 1/2"], "leave --part out")])
def test_gpu_check_refuses_bad_jobs(tmp_path, args, said):
    run = subprocess.run(["bash", "tools/gpu_check.sh", "memcheck", *args, "--logs", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and said in run.stdout
