"""Building the kernels: a build holds one version (and the block sizes, where they shape it), lives
in a folder named by what it is built from, so two checkouts never rebuild each other's, and is made
of the files it includes only, so an edit elsewhere leaves it alone; every compile says what and why;
an edited kernel is noticed by the running process, recompiled and loaded; a compile error shows the
compiler's first error line and keeps the whole output in a file; a compile killed midway leaves
nothing that makes the next one wait for ever. On copies of kernels/, in a temporary build folder."""
import shutil
import subprocess
import sys
import time

import pytest
import torch

import minimal_flash as mf


@pytest.fixture
def checkouts(tmp_path, monkeypatch):
    """Two copies of kernels/ (two checkouts), a fresh build folder, and the build messages."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    monkeypatch.setattr(mf, "_loaded", {})
    messages = []
    monkeypatch.setattr(mf, "_say", messages.append)
    copies = [tmp_path / name / "kernels" for name in ("a", "b")]
    for copy in copies:
        shutil.copytree(mf.KERNELS, copy)

    def use(kernels):  # as if minimal_flash.py had been imported from that checkout
        monkeypatch.setattr(mf, "KERNELS", kernels)
        monkeypatch.setattr(mf, "_sources", mf._Sources())
        return mf.load_kernels("cpu", 1, 8, 8)

    return copies, use, messages


def attention(kernels):
    q = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(1, 2, 5, 4).sin()
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1])
    assert kernels.run("forward", False, 0.5, q, q, q, O, L) == ""
    return O


def test_build_folders_are_named_by_what_is_built(checkouts, monkeypatch):
    (a, b), _, _ = checkouts
    folders = set()
    for kernels in (a, b):
        monkeypatch.setattr(mf, "KERNELS", kernels)
        sources = mf._Sources().current()
        folders |= {mf.build_directory(device, 1, Br, 8, mf._build_sources(sources, device, 1))
                    for device in ("cpu", "cuda") for Br in (8, 16)}
        folders |= {mf.build_directory(device, 3, None, None, mf._build_sources(sources, device, 3))
                    for device in ("cpu", "cuda")}
    assert len(folders) == 12
    assert str(sorted(folders)[0].name).startswith("cpu_v1_br16_bc8_")


def test_a_build_is_made_of_the_files_it_includes_only(checkouts, monkeypatch):
    """Editing version 2's kernel changes version 2's build, not version 1's or 3's: they do not
    include it. Editing a header they share changes each."""
    (a, _), _, _ = checkouts
    monkeypatch.setattr(mf, "KERNELS", a)
    builds = lambda: {v: mf._build_sources(mf._Sources().current(), "cpu", v) for v in mf.VERSIONS}  # noqa: E731
    before = builds()
    assert {"flash2.cu", "flash2_backward.cu", "version2.cuh", "tiles.cuh", "cpu_cuda.h"} <= \
        {n for n, _ in before[2][1]}
    assert "flash2.cu" not in {n for n, _ in before[1][1] + before[3][1]}
    (a / "flash2.cu").write_text((a / "flash2.cu").read_text() + "\n// an edit\n")
    after = builds()
    assert after[2] != before[2] and after[1] == before[1] and after[3] == before[3]
    (a / "tiles.cuh").write_text((a / "tiles.cuh").read_text() + "\n// an edit\n")
    assert all(builds()[v] != after[v] for v in mf.VERSIONS)


def test_a_build_with_more_nvcc_flags_has_a_folder_of_its_own(monkeypatch):
    """tools/hopper_steps.py's and block_timeline.py's builds of version 4 (-DHOPPER_STEP=n,
    -DBLOCK_TIMELINE) are never taken for the one every other call loads, nor for each other; the CPU's
    build (no nvcc) is the same folder."""
    sources = {device: mf._build_sources(mf._sources.current(), device, 4) for device in ("cpu", "cuda")}
    plain = mf.VERSIONS[4]
    folders = {}
    for flags in ((), ("-DHOPPER_STEP=1",), ("-DHOPPER_STEP=2",), ("-DBLOCK_TIMELINE",)):
        monkeypatch.setitem(mf.VERSIONS, 4, plain.with_cuda_flags(*flags))
        assert mf.VERSIONS[4].cuda_flags == plain.cuda_flags + flags
        folders[flags] = {device: mf.build_directory(device, 4, None, None, sources[device]) for device in sources}
    assert len({f["cuda"] for f in folders.values()}) == 4 and len({f["cpu"] for f in folders.values()}) == 1


def test_checkouts_do_not_rebuild_each_other_and_an_edit_is_picked_up(checkouts):
    (a, b), use, messages = checkouts
    first = use(a)
    assert len(messages) == 2 and "compiling version 1 (kernels/cpu.cpp) for cpu with Br=8, Bc=8" in messages[0]
    assert "no build of these sources yet" in messages[0] and messages[1].startswith("compiled in")
    use(b)
    assert len(messages) == 4  # the second checkout builds its own
    again = use(a)
    assert len(messages) == 4 and again.library == first.library  # the first's build is still there
    O = attention(again)

    flash = a / "flash.cu"
    flash.write_text(flash.read_text().replace("o = (alpha * o + beta * pv) * inv_l;",
                                               "o = 2.0f * (alpha * o + beta * pv) * inv_l;"))
    time.sleep(1.1)  # kernels/ is looked at once a second at most
    edited = mf.load_kernels("cpu", 1, 8, 8)
    assert "flash.cu changed" in messages[4] and edited.library != first.library
    assert not torch.allclose(attention(edited), O)  # this process now runs the edited kernel


def test_a_compile_error_shows_its_line_and_keeps_the_log(checkouts):
    (a, _), use, _ = checkouts
    lines = (a / "flash.cu").read_text().splitlines()
    number = next(n for n, line in enumerate(lines, 1) if "const int Tr = ceil_div" in line)
    lines[number - 1] = lines[number - 1].replace("ceil_div", "ceil_dvi", 1)  # a misspelt name
    (a / "flash.cu").write_text("\n".join(lines) + "\n")
    with pytest.raises(RuntimeError) as error:
        use(a)
    message = str(error.value)
    assert message.splitlines()[1].startswith(f"  kernels/flash.cu:{number}:") and "ceil_dvi" in message
    assert len(message.splitlines()) <= 5
    log = message.split("the whole compiler output: ")[1].strip()
    assert "error" in open(log).read()


@pytest.fixture
def fake_compile(checkouts, monkeypatch):
    """_build of version 1 in checkout a's build folder, torch's compile replaced by one that records
    whether torch's lock file was there when it began (torch's load would wait on it)."""
    (a, _), _, messages = checkouts
    monkeypatch.setattr(mf, "KERNELS", a)
    sources = mf._build_sources(mf._Sources().current(), "cpu", 1)
    folder = mf.build_directory("cpu", 1, 8, 8, sources)
    folder.mkdir(parents=True)
    seen = []

    def load(name, build_directory, **options):
        seen.append((folder / "lock").exists())
        return str(folder / f"{name}.so")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    return lambda: mf._build("cpu", 1, 8, 8, sources, None), folder, seen, messages


def test_a_compile_killed_midway_does_not_hang_the_next(fake_compile):
    """A compile killed before it finished (a notebook's kernel restarted, kill) leaves torch's lock file,
    on which every later torch load waits for ever: the next build removes it, says so, and compiles."""
    build, folder, seen, messages = fake_compile
    (folder / "lock").touch()  # what a killed compile leaves
    assert build() == folder / f"{folder.name}.so"
    assert seen == [False] and (folder / "built").exists()
    assert any("left by a compile that did not finish" in m for m in messages)


def test_a_compile_running_in_another_process_is_waited_for(fake_compile):
    """Another process compiling the same build (pytest's workers, two notebooks) is waited for, and said
    to be; its lock file is not taken for a leftover while it runs."""
    build, folder, seen, messages = fake_compile
    other = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, pathlib, sys, time\n"
        f"folder = pathlib.Path({str(folder)!r})\n"
        "held = open(folder / 'building.lock', 'w'); fcntl.flock(held, fcntl.LOCK_EX)\n"
        "(folder / 'lock').touch(); print('compiling', flush=True); time.sleep(1.0)\n"
        "(folder / 'lock').unlink()\n")], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "compiling\n"  # it holds the lock now
    build()
    assert other.wait() == 0
    assert seen == [False]
    assert any("waiting for another process" in m for m in messages)
    assert not any("did not finish" in m for m in messages)
