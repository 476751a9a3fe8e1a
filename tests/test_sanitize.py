"""tools/sanitize.py, the script compute-sanitizer runs on a GPU machine: its --part slices (for
racecheck, too slow for one 10-minute call on all of version 3) must cover every check once, in order.
Listed, not run: the checks themselves run only on a GPU."""
import pytest

from helpers import tool


def listed(capsys, *args):
    sanitize = tool("sanitize")
    sanitize.main([*args, "--list"])
    *lines, summary = capsys.readouterr().out.splitlines()
    return lines, summary


@pytest.mark.parametrize("args", [[], ["3"], ["decode", "mods:4", "dropout"]])
def test_parts_cover_every_check_once(capsys, args):
    every, summary = listed(capsys, *args)
    assert summary == f"{len(every)} checks listed" and len(every) > 20
    parts = [listed(capsys, *args, "--part", f"{k}/3")[0] for k in (1, 2, 3)]
    assert sum(parts, []) == every
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("given", ["3", "0/3", "4/3", "a/b"])
def test_a_part_that_is_not_k_of_n_is_refused(capsys, given):
    with pytest.raises(SystemExit, match="--part wants K/N"):
        listed(capsys, "3", "--part", given)
