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
        with capture.global_and_fixture_disabled():
            print(f"\nminimal_flash: {message}", file=sys.stderr, flush=True)

    original, mf._say = mf._say, say
    yield
    mf._say = original
