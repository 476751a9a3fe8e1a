"""bench.py's functions on the CPU at tiny sizes: the sweep's table, CSV and plots are produced and
well formed, and its FLOP count and memory guard are right. No timing is asserted: CPU emulation
times say nothing about GPU speed."""
import csv

import matplotlib.image
import pytest

import bench

TINY = ["--cpu", "-B", "1", "-H", "2", "-d", "8", "--warmup", "1", "--repeats", "2", "--min-repeats", "2"]


def read_png(path):
    """The image as an array; a file that is not a well-formed PNG raises."""
    return matplotlib.image.imread(path, format="png")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One tiny CPU sweep, N = 1 (one key), 17 (a partial tile) and 40, causal (the harder mask)."""
    out = tmp_path_factory.mktemp("sweep")
    bench.main(["--sweep", "--seq-len", "1", "17", "40", "--causal", "--out", str(out), *TINY])
    return out


def test_sweep_csv_has_every_method_pass_and_size(sweep):
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    methods = {r["method"] for r in rows}
    assert {"manual", "minimal-flash", "minimal-flash2"} < methods and any(m.startswith("sdpa-") for m in methods)
    assert len(rows) == 3 * len(methods) * 2  # 3 sizes x methods x (forward, backward)
    for r in rows:
        assert r["N"] in ("1", "17", "40") and r["pass"] in ("forward", "backward") and r["causal"] == "True"
        assert float(r["ms"]) > 0 and int(r["repeats"]) >= 2
        if r["method"] == "manual":
            assert r["rel_err"] == "" and float(r["x_manual"]) == 1.0
        else:  # checked against manual on the same inputs
            assert r["checked_against"] == "manual" and float(r["rel_err"]) < 1e-5


def test_sweep_prints_one_table_line_per_size_and_method(sweep, capsys):
    bench.main(["--sweep", "--seq-len", "9", "--out", str(sweep / "again"), *TINY])
    out = capsys.readouterr().out
    assert "CPU emulation" in out
    lines = [line.split() for line in out.splitlines() if line.split()[:1] == ["9"]]
    assert [line[2] for line in lines] == ["manual", "minimal-flash", "minimal-flash2", lines[3][2]]
    assert lines[0][-1] == "ref" and all(float(line[-1]) < 1e-5 for line in lines[1:])


def test_sweep_time_plot_is_a_png(sweep):
    image = read_png(sweep / "sweep_time.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 0  # not blank


def test_memory_plot_is_a_png(tmp_path):
    """On a GPU the sweep also plots extra memory; here fed rows as the sweep makes them."""
    rows = [dict(N=N, method=m, **{"pass": p}, extra_mib=mib * N)
            for N in (64, 128) for m, mib in (("manual", 2.0), ("minimal-flash", 0.1)) for p in bench.PASSES]
    bench.plot(rows, tmp_path / "memory.png", "extra_mib", "extra peak MiB", bench.PASSES, "memory")
    assert read_png(tmp_path / "memory.png").shape[0] > 200


def test_flops_counts_the_products_by_hand():
    # N = 4, d = 2: S = Q K^T is 4 x 4 dot products of length 2, 2 flops each: 64 flops; P V as many.
    assert bench.flops(1, 1, 4, 2, False, "forward") == 128
    assert bench.flops(1, 1, 4, 2, False, "backward") == 256  # dV, dP, dQ, dK
    # causal: 1 + 2 + 3 + 4 = 10 visible (query, key) pairs of the 16; B * H slices multiply
    assert bench.flops(3, 2, 4, 2, True, "forward") == 6 * 10 * 2 * 4


def test_manual_attention_is_skipped_when_it_would_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "manual_fits", lambda shape, device: False)
    bench.main(["--sweep", "--seq-len", "20", "--out", str(tmp_path), *TINY])
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    manual = [r for r in rows if r["method"] == "manual"]
    assert len(manual) == 2 and all(r["ms"] == "" and "would not fit" in r["note"] for r in manual)
    others = [r for r in rows if r["method"] != "manual"]
    assert others and all(r["x_manual"] == "" for r in others)
    assert all(r["checked_against"] == "minimal-flash" for r in others if r["method"] != "minimal-flash")
    assert "would not fit" in capsys.readouterr().out


def test_default_run_checks_profiles_and_times(capsys):
    bench.main(["--seq-len", "17", *TINY])
    out = capsys.readouterr().out
    assert "=== flash backward (5 calls) ===" in out and "=== manual (5 calls) ===" in out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["17"])
    assert row.count("x") == 2  # a forward and a backward speed-up


def test_csv_round_trip_and_replot(tmp_path):
    """A sweep.csv reads back as the rows that were written, and --replot redraws both plots from
    it, as for the committed H200 results (which have memory, measured on the GPU)."""
    rows = [dict(N=N, B=1, H=2, d=8, causal=False, method=m, **{"pass": p}, ms=0.5 * N, repeats=3,
                 tflops=1.5, x_manual=1.0, extra_mib=0.25 * N)
            for N in (64, 128) for m in ("manual", "minimal-flash") for p in bench.PASSES]
    rows[-1].update(checked_against="manual", rel_err=3e-7)
    bench.write_csv(rows, tmp_path / "sweep.csv")
    assert bench.read_csv(tmp_path / "sweep.csv") == rows
    bench.main(["--replot", str(tmp_path / "sweep.csv")])
    for name in ("sweep_time.png", "sweep_memory.png"):
        assert read_png(tmp_path / name).shape[0] > 200


def test_sweep_runs_only_the_methods_asked_for(tmp_path):
    bench.main(["--sweep", "--seq-len", "17", "--methods", "manual", "sdpa", "--out", str(tmp_path), *TINY])
    methods = {r["method"] for r in csv.DictReader(open(tmp_path / "sweep.csv"))}
    assert "manual" in methods and len(methods) == 2 and any(m.startswith("sdpa-") for m in methods)
    with pytest.raises(SystemExit, match="unknown method 'flash3'"):
        bench.main(["--sweep", "--seq-len", "17", "--methods", "flash3", "--out", str(tmp_path), *TINY])
