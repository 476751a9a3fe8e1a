"""The scripts in tools/ on the CPU: each refuses what it cannot do here (no GPU) and every bad argument
in one line (argparse's usage error, or a message and a non-zero exit), never a traceback; and what
they were found to get wrong (emulation_times' version 4)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name):
    """tools/NAME.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    ("hopper_steps", ["--steps", "5"], "argument --steps: invalid choice: 5"),
    ("hopper_steps", ["--seq-len", "0"], "argument --seq-len: must be at least 1, not 0"),
    ("emulation_times", ["--versions", "5"], "argument --versions: invalid choice: 5"),
    ("emulation_times", ["--repeat", "0"], "argument --repeat: must be at least 1, not 0"),
    ("emulation_times", ["--sizes", "-4"], "argument --sizes: must be at least 1, not -4")])
def test_bad_arguments_are_usage_errors(capsys, name, args, said):
    with pytest.raises(SystemExit) as exit:
        tool(name).main(args)
    assert exit.value.code == 2 and said in capsys.readouterr().err.splitlines()[-1]
