import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minimal_flash as mf  # noqa: E402


@pytest.fixture
def generator(request):
    """A seeded CPU generator per test: fresh random inputs for every test, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


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
