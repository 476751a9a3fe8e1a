import math
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minimal_flash as mf  # noqa: E402

# torch.compile keeps compiled graphs on disk (/tmp/torchinductor_$USER), keyed without the Python source of
# our operators' backward formulas: a later edit that broke one would not run, its test passing on a graph
# of the old one. The tests compile afresh.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False


@pytest.fixture
def generator(request):
    """A seeded CPU generator per test: fresh random inputs for every test, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor that torch.empty_like and Tensor.new_empty allocate, the kernels' outputs among them,
    is NaN until written: an element the kernels never write fails the checks."""
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty

    def nan(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: nan(new_empty(self, *a, **kw)))


@pytest.fixture(scope="session", autouse=True)
def show_build_messages(pytestconfig):
    """minimal_flash says when it compiles a configuration (a few seconds each): show that as it
    happens, past pytest's output capture, instead of a silent pause."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(message):
        # Resuming the capture sets sys.stdout and sys.stderr to pytest's own: a test's redirect_stdout
        # around the build (bench's tables) would lose the rest of its output. They are put back as found.
        streams = sys.stdout, sys.stderr
        with capture.global_and_fixture_disabled():
            print(f"\nminimal_flash: {message}", file=sys.stderr, flush=True)
        sys.stdout, sys.stderr = streams

    original, mf._say = mf._say, say
    yield
    mf._say = original
