"""bench.py's functions on the CPU at tiny sizes: the sweep's table, CSV and plots are produced and
well formed, and its FLOP count and memory guard are right; the methods a GPU sweep times, with its
probes stood in for; --decode's CSV, checks and skips. No timing is asserted: CPU emulation times say
nothing about GPU speed."""
import contextlib
import csv
import io
import math
import pathlib
import warnings

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import bench

RESULTS = pathlib.Path(__file__).parent.parent / "notebooks/results/h200"

# (--min-repeats, which the default run does not read, is --repeats' 2: its default yields to a smaller --repeats)
TINY = ["--cpu", "-B", "1", "-H", "2", "-d", "8", "--warmup", "1", "--repeats", "2"]


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


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.csv")
                                         if p.name != "gpt_losses.csv"))  # (notebook 7's, read with csv alone)
def test_read_csv_gives_numbers_as_numbers(name):
    """Every column of the committed results that holds numbers reads back as numbers (a table that
    formats one with :.1f must not be handed a string); only labels stay strings."""
    labels = {"dtype", "method", "pass", "note", "checked_against", "mod", "lengths", "attention", "commit"}
    rows = bench.read_csv(RESULTS / name)
    assert rows
    strings = {k for r in rows for k, v in r.items() if isinstance(v, str)}
    assert strings <= labels, f"{name}: {sorted(strings - labels)} read as strings"


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


def gpu_args(*argv):
    """The sweep's arguments as on a GPU (the methods are chosen, not run: no GPU is needed). Tests
    that use it stand in for minimal_flash.version_unavailable (see hopper), which asks the GPU."""
    args = bench.parse_args(["--sweep", *TINY, *argv])
    args.device = "cuda"
    return args


def refusing(refused, calls=None):
    """A stand-in for the probe sdpa_refusal: `refused` {backend: why} does not run, the others do."""
    def refusal(backend, device, causal, dtype, head_dim):
        if calls is not None:
            calls.append((backend, device, causal, dtype, head_dim))
        return refused.get(backend)
    return refusal


@pytest.fixture(autouse=True)
def hopper(monkeypatch):
    """This CPU build of torch cannot be asked about a GPU: each version runs on the stand-in GPU but
    version 4 on a Hopper one (where it is not, the sweep leaves it out: tested below)."""
    monkeypatch.setattr(bench.mf, "version_unavailable", lambda version, device: None)


@pytest.fixture
def pins(monkeypatch):
    """The backends SDPA was pinned to, in order; the pin itself does nothing (this CPU has no cuDNN)."""
    pinned = []
    monkeypatch.setattr(bench, "sdpa_kernel", lambda backend: pinned.append(backend) or contextlib.nullcontext())
    return pinned


def test_half_precision_on_a_gpu_times_flash_and_cudnn_each_pinned(monkeypatch, pins):
    calls = []
    monkeypatch.setattr(bench, "sdpa_refusal", refusing({}, calls))
    methods = bench.sweep_methods(gpu_args("--dtype", "bf16", "-d", "64", "--causal"))
    # version 4 twice: its deterministic backward is a mode of its own, timed beside the default
    assert list(methods) == ["manual", "minimal-flash3", "minimal-flash4", "minimal-flash4-deterministic",
                             "sdpa-flash", "sdpa-cudnn"]
    # each probed for this very problem: on the GPU, in bf16, causal, at d = 64
    assert calls == [(b, "cuda", True, torch.bfloat16, 64) for b in (SDPBackend.FLASH_ATTENTION,
                                                                       SDPBackend.CUDNN_ATTENTION)]
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.bfloat16) for _ in range(3))
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        pins.clear()
        O = methods[name](q, k, v, True)
        assert pins == [backend]  # pinned to its own backend, alone
        assert torch.equal(O, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_the_deterministic_mode_is_asked_for_by_its_method_only(monkeypatch):
    asked = []
    monkeypatch.setattr(bench.mf, "flash_attention", lambda *args, **options: asked.append(options))
    monkeypatch.setattr(bench, "sdpa_refusal", refusing({}))
    methods = bench.sweep_methods(gpu_args("--dtype", "bf16"))
    for name in ("minimal-flash3", "minimal-flash4", "minimal-flash4-deterministic"):
        methods[name](None, None, None, False)
    assert [(o["version"], o["deterministic"]) for o in asked] == [(3, False), (4, False), (4, True)]


def test_a_backend_that_does_not_run_is_left_out_saying_why(monkeypatch, capsys):
    monkeypatch.setattr(bench, "sdpa_refusal", refusing({SDPBackend.CUDNN_ATTENTION: "cuDNN needs d <= 128"}))
    methods = bench.sweep_methods(gpu_args("--dtype", "fp16"))
    assert [m for m in methods if m.startswith("sdpa")] == ["sdpa-flash"]  # no other in cuDNN's place
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "sdpa" in line] == [
        "sdpa-cudnn left out: SDPA's CUDNN_ATTENTION does not run float16, causal=False, d=8 on this GPU: "
        "cuDNN needs d <= 128"]


def test_where_neither_runs_the_backend_sdpa_picks_is_timed_and_named(monkeypatch, capsys):
    refused = {b: "not on this GPU" for b in bench.SDPA_ORDER if b != SDPBackend.EFFICIENT_ATTENTION}
    monkeypatch.setattr(bench, "sdpa_refusal", refusing(refused))
    methods = bench.sweep_methods(gpu_args("--dtype", "bf16"))
    assert [m for m in methods if m.startswith("sdpa")] == ["sdpa-efficient"]
    out = capsys.readouterr().out
    assert "sdpa-flash left out" in out and "sdpa-cudnn left out" in out and "sdpa-efficient instead" in out


def test_fp32_on_a_gpu_times_the_one_backend_sdpa_picks(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "sdpa_refusal", refusing({SDPBackend.FLASH_ATTENTION: "no fp32"}, calls))
    methods = bench.sweep_methods(gpu_args())
    assert list(methods) == ["manual", "minimal-flash", "minimal-flash2", "sdpa-efficient"]
    assert [c[0] for c in calls] == [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def test_the_probe_on_this_cpu():
    """The real probe: the CPU runs SDPA's FlashAttention backend (forward and backward) and not cuDNN's,
    so bf16 on the CPU times sdpa-flash, as before."""
    assert bench.sdpa_refusal(SDPBackend.FLASH_ATTENTION, "cpu", True, torch.bfloat16, 8) is None
    assert bench.sdpa_refusal(SDPBackend.CUDNN_ATTENTION, "cpu", True, torch.bfloat16, 8)  # a reason, not empty
    methods = bench.sweep_methods(bench.parse_args(["--sweep", "--dtype", "bf16", *TINY]))
    assert [m for m in methods if m.startswith("sdpa")] == ["sdpa-flash"]


def test_a_version_that_cannot_run_here_is_left_out_saying_why(tmp_path, monkeypatch, capsys):
    asked = []

    def version_unavailable(version, device):  # as minimal_flash may say of a version for one GPU
        asked.append((version, device))
        return "needs an sm_90 GPU" if version == 2 else None
    monkeypatch.setattr(bench.mf, "version_unavailable", version_unavailable, raising=False)
    bench.main(["--sweep", "--seq-len", "17", "--out", str(tmp_path), *TINY])
    methods = {r["method"] for r in csv.DictReader(open(tmp_path / "sweep.csv"))}
    assert "minimal-flash" in methods and "minimal-flash2" not in methods
    assert asked[:2] == [(1, "cpu"), (2, "cpu")]  # by the sweep; then minimal_flash asks again, per call
    assert {(version, str(device)) for version, device in asked} == {(1, "cpu"), (2, "cpu")}
    assert "minimal-flash2 left out: needs an sm_90 GPU" in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):  # the default run, asked for that version, says why and stops
        bench.main(["--version", "2", *TINY])
    assert "version 2: needs an sm_90 GPU" in capsys.readouterr().err


def test_sweep_csv_table_and_plot_hold_sdpa_cudnn(tmp_path, monkeypatch, pins, capsys):
    """bf16 as on a GPU with both SDPA backends: each has its forward and backward rows, checked
    against manual, its table lines and its line in both panels of the plot."""
    monkeypatch.setattr(bench, "sdpa_backends", lambda *problem: [SDPBackend.FLASH_ATTENTION,
                                                                  SDPBackend.CUDNN_ATTENTION])
    legends, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: legends.append(
        [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]) or close(fig))
    bench.main(["--sweep", "--dtype", "bf16", "--seq-len", "9", "17", "--methods", "manual", "sdpa",
                "--out", str(tmp_path), *TINY])
    rows = bench.read_csv(tmp_path / "sweep.csv")
    cudnn = [r for r in rows if r["method"] == "sdpa-cudnn"]
    assert [(r["N"], r["pass"]) for r in cudnn] == [(N, p) for N in (9, 17) for p in bench.PASSES]
    assert all(r["dtype"] == "bfloat16" and r["ms"] > 0 and r["checked_against"] == "manual"
               and r["rel_err"] < 2e-2 for r in cudnn)
    assert pins.count(SDPBackend.CUDNN_ATTENTION) > 0 and pins.count(SDPBackend.FLASH_ATTENTION) > 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["9"], ["17"])]
    assert [line[2] for line in table] == ["manual", "sdpa-flash", "sdpa-cudnn"] * 2
    assert legends == [[["manual", "sdpa-flash", "sdpa-cudnn"]] * 2]  # the time plot: forward, backward


def test_unknown_method_lists_the_sdpa_backends(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "sdpa_backends", lambda *problem: [SDPBackend.FLASH_ATTENTION,
                                                                  SDPBackend.CUDNN_ATTENTION])
    methods = bench.sweep_methods(bench.parse_args(["--sweep", *TINY]))
    assert list(bench.chosen_methods(methods, ["sdpa-cudnn"])) == ["sdpa-cudnn"]
    assert list(bench.chosen_methods(methods, ["sdpa"])) == ["sdpa-flash", "sdpa-cudnn"]
    with pytest.raises(SystemExit, match=r"choose from manual, minimal-flash, minimal-flash2, "
                                         r"sdpa \(sdpa-flash, sdpa-cudnn\)"):
        bench.chosen_methods(methods, ["flash3"])


def test_the_probe_gives_torchs_reason_for_the_backend_alone(monkeypatch):
    """On a GPU torch warns about every backend when the pinned one refuses (these are its words on
    the H200 for cuDNN in fp32); the reason kept is the pinned backend's own."""
    said = ["Memory efficient kernel not used because:", "Memory Efficient attention has been runtime disabled.",
            "Flash attention kernel not used because:", "Flash attention has been runtime disabled.",
            "cuDNN attention kernel not used because:",
            "Expected query, key and value to all be of dtype: {Half, BFloat16}. Got Query dtype: float, Key "
            "dtype: float, and Value dtype: float instead. (Triggered internally at sdp_utils_cpp.h:123.)"]

    def refusing_sdpa(*args, **kwargs):
        for message in said:
            warnings.warn(message)
        raise RuntimeError("No available kernel. Aborting execution.")
    monkeypatch.setattr(bench.F, "scaled_dot_product_attention", refusing_sdpa)
    assert bench.sdpa_refusal(SDPBackend.CUDNN_ATTENTION, "cpu", False, torch.float32, 8) == (
        "Expected query, key and value to all be of dtype: {Half, BFloat16}. Got Query dtype: float, Key dtype: "
        "float, and Value dtype: float instead.")


# --decode: one step of generation over a KV cache, on the CPU at tiny sizes, 4 query heads sharing 2
# key/value heads. minimal_flash.flash_attn_with_kvcache runs for real (the emulation of its kernels).
DECODE = ["--decode", "--cpu", "-H", "4", "--heads-k", "2", "-d", "64", "--seconds", "0.05", "--warmup", "1",
          "--repeats", "2", "--min-repeats", "2"]
DECODE_METHODS = ["minimal-flash", "minimal-flash-paged", "sdpa-flash", "sdpa-cudnn", "manual"]


def decode_bytes(B, N, H=4, Hk=2, d=64):
    """What a step must move, in bf16: the k and v caches read, q read and out written."""
    return 2 * B * N * Hk * d * 2 + 2 * B * H * d * 2


def run_once(tmp_path_factory, mode, argv, by=None):
    """bench.main(argv) once, for a module's tests, into a fresh folder: the rows of the `mode`.csv it
    wrote (with `by`, columns' names: {their values: row}), and what it printed."""
    out, printed = tmp_path_factory.mktemp(mode), io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.main([*argv, "--out", str(out)])
    rows = list(csv.DictReader(open(out / f"{mode}.csv")))
    return (rows if by is None else {tuple(r[key] for key in by): r for r in rows}), printed.getvalue()


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
    """One tiny decode run, batch 1 and 2, context 64 and 300 (the last page of 256 part full);
    its rows by (batch, context, method), the ceilings' by method, and what it printed."""
    rows, printed = run_once(tmp_path_factory, "decode", [*DECODE, "--batch", "1", "2", "--context", "64", "300"])
    points = {(r["batch"], r["context"], r["method"]): r for r in rows if r["batch"]}
    return points, {r["method"]: r for r in rows if not r["batch"]}, printed


def test_decode_csv_has_the_columns_every_point_and_method(decode):
    points, ceilings, _ = decode
    assert set(points) == {(B, N, m) for B in ("1", "2") for N in ("64", "300") for m in DECODE_METHODS}
    for (B, N, method), r in points.items():
        assert (r["nheads"], r["nheads_k"], r["d"], r["dtype"]) == ("4", "2", "64", "bfloat16")
        assert int(r["bytes"]) == decode_bytes(int(B), int(N))
        if method == "sdpa-cudnn":  # no cuDNN on this CPU: refused, saying why, and the run went on
            assert r["note"].startswith("refused: ") and len(r["note"]) > 20 and r["eager_us"] == ""
            continue
        # no CUDA graph on the CPU: the note says so, and the speed is the eager time's
        assert r["graph_us"] == "" and "perf_counter" in r["note"]
        assert float(r["eager_us"]) > 0 and float(r["host_us"]) > 0 and int(r["repeats"]) >= 2
        assert float(r["gb_per_s"]) == pytest.approx(int(r["bytes"]) / float(r["eager_us"]) / 1e3)
        for ceiling in ("read", "copy"):
            assert float(r[f"fraction_of_{ceiling}"]) == pytest.approx(
                float(r["gb_per_s"]) / float(ceilings[ceiling]["gb_per_s"]))
        best = float(points[B, N, "sdpa-flash"]["eager_us"])  # the one SDPA backend that ran
        assert float(r["x_best_sdpa"]) == pytest.approx(best / float(r["eager_us"]))
        assert r["fraction_of_spec"] == ""  # the H200's 4.8 TB/s: on an H200 only


def test_decode_every_method_agrees_with_float64(decode):
    points, _, printed = decode
    errors = {key: float(r["rel_err"]) for key, r in points.items() if key[2] != "sdpa-cudnn"}
    assert len(errors) == 4 * 4 and all(0 < e < 1e-2 for e in errors.values())  # bf16: ~2e-3 seen
    # the paged cache holds the same keys and values: the same answer to the last bit, or nearly
    for B, N in (("1", "64"), ("2", "300")):
        assert errors[B, N, "minimal-flash-paged"] == pytest.approx(errors[B, N, "minimal-flash"], rel=0.1)
    table = [line.split() for line in printed.splitlines() if line.split()[:2] == ["2", "300"]]
    assert [line[2] for line in table] == DECODE_METHODS
    assert table[0][-1] == f"{errors['2', '300', 'minimal-flash']:.1e}"  # the CSV's error, printed


def test_decode_measures_the_ceilings_in_the_same_run(decode):
    _, ceilings, printed = decode
    assert set(ceilings) == {"read", "copy"}
    assert "x.sum()" in ceilings["read"]["note"] and "copy_" in ceilings["copy"]["note"]
    # the copy counts what it reads and what it writes: twice the tensor
    assert int(ceilings["copy"]["bytes"]) == 2 * int(ceilings["read"]["bytes"]) == 2 * bench.CEILING_BYTES["cpu"]
    assert all(float(r["gb_per_s"]) > 0 for r in ceilings.values())
    assert f"read {float(ceilings['read']['gb_per_s']):.0f} GB/s" in printed


def test_decode_skips_what_would_not_fit_saying_why(tmp_path, monkeypatch, capsys):
    # Room for batch 1's caches, contiguous and paged, but not for manual's k, v repeated to 4 heads,
    # nor for batch 2's caches.
    cache = decode_bytes(1, 64) - 2 * 4 * 64 * 2
    monkeypatch.setattr(bench, "decode_memory_cap", lambda device: 2 * cache + 1)
    bench.main([*DECODE, "--batch", "1", "2", "--context", "64", "--out", str(tmp_path)])
    rows = {(r["batch"], r["method"]): r for r in csv.DictReader(open(tmp_path / "decode.csv")) if r["batch"]}
    assert "would not fit" in rows["1", "manual"]["note"] and rows["1", "manual"]["eager_us"] == ""
    assert float(rows["1", "minimal-flash"]["rel_err"]) < 1e-2
    batch2 = [r for (B, _), r in rows.items() if B == "2"]
    assert len(batch2) == len(DECODE_METHODS)
    assert all(r["note"].startswith("skipped: its caches") and r["eager_us"] == "" for r in batch2)
    assert "batch=2 context=64: skipped: its caches, contiguous and paged" in capsys.readouterr().err


def test_decode_exits_when_a_method_is_wrong(tmp_path, monkeypatch):
    """The check is real: a method that answers zeros is off by 100%, in the CSV, and the run fails."""
    monkeypatch.setattr(bench, "decode_methods", lambda: {"zeros": lambda q, k, v: lambda: torch.zeros_like(q)})
    with pytest.raises(SystemExit, match="disagree with float64, e.g. zeros at batch=1 context=64"):
        bench.main([*DECODE, "--batch", "1", "--context", "64", "--out", str(tmp_path)])
    row = list(csv.DictReader(open(tmp_path / "decode.csv")))[-1]
    assert row["method"] == "zeros" and float(row["rel_err"]) == 1.0


def test_decode_reference_is_grouped_query_attention():
    q = torch.randn(2, 1, 6, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 37, 3, 16, dtype=torch.bfloat16) for _ in range(2))  # query heads 2h, 2h+1 read head h
    expected = F.scaled_dot_product_attention(q.double().transpose(1, 2), k.double().transpose(1, 2),
                                              v.double().transpose(1, 2), enable_gqa=True).transpose(1, 2)
    out = bench.decode_reference(q, k, v)
    assert out.dtype == torch.float64 and torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_paged_cache_holds_the_cache_page_by_page():
    cache = torch.randn(2, 300, 3, 4)  # 2 pages per sequence, the second 44 tokens full
    table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
    pages = bench.paged(cache, table)
    assert pages.shape == (4, bench.PAGE, 3, 4)
    assert torch.equal(pages[table.long()].flatten(1, 2)[:, :300], cache)  # as block_table reads it
    assert torch.equal(pages[0, :44], cache[0, 256:]) and not pages[0, 44:].any()  # the tail: zeros


def test_batch_takes_one_size_except_in_decode():
    assert bench.parse_args(["-B", "3", "--cpu"]).batch == 3
    assert bench.parse_args(["--decode", "-B", "1", "8", "--cpu"]).batch == [1, 8]
    with pytest.raises(SystemExit):
        bench.parse_args(["--sweep", "-B", "1", "8", "--cpu"])
    args = bench.parse_args(["--decode", "--cpu"])  # the model: bf16, 32 query heads over 8, d = 128
    assert (args.dtype, args.head_dim, bench.DECODE_HEADS, bench.DECODE_HEADS_K) == (torch.bfloat16, 128, 32, 8)


# --varlen: a causal prefill of sequences of different lengths, packed (flash_attn_varlen_func) and padded
# (flash_attention, SDPA), on the CPU at tiny sizes, 4 query heads sharing 2 key/value heads.
VARLEN = ["--varlen", "--cpu", "-B", "3", "--lengths", "1", "70", "-H", "4", "--heads-k", "2", "-d", "64",
          "--seconds", "0.05", "--warmup", "1", "--repeats", "2", "--min-repeats", "2"]


@pytest.fixture(scope="module")
def varlen(tmp_path_factory):
    """One tiny varlen run: its rows by (method, pass), and what it printed."""
    return run_once(tmp_path_factory, "varlen", VARLEN, by=("method", "pass"))


def test_varlen_csv_has_every_method_and_pass_per_real_token(varlen):
    rows, printed = varlen
    lengths = bench.varlen_lengths(3, 1, 70)
    methods = list(dict.fromkeys(m for m, _ in rows))
    assert methods[:2] == ["minimal-flash3-varlen", "minimal-flash3-padded"] and methods[2].startswith("sdpa-")
    assert set(rows) == {(m, p) for m in methods for p in bench.VARLEN_PASSES}
    padded = rows["minimal-flash3-padded", "forward"]
    for (method, pass_), r in rows.items():
        assert (r["batch"], r["nheads"], r["nheads_k"], r["d"], r["dtype"], r["causal"]) == \
            ("3", "4", "2", "64", "bfloat16", "True")
        assert r["lengths"] == " ".join(map(str, lengths)) and int(r["tokens"]) == sum(lengths)
        assert int(r["padded_tokens"]) == 3 * max(lengths) and int(r["repeats"]) >= 2
        ms = float(r["ms"])
        assert float(r["ns_per_token"]) == pytest.approx(ms * 1e6 / sum(lengths))
        assert float(r["tflops"]) == pytest.approx(bench.varlen_flops(lengths, 4, 64, pass_) / ms / 1e9)
        padded = rows["minimal-flash3-padded", pass_]
        assert float(r["x_padded"]) == pytest.approx(float(padded["ms"]) / ms)
        assert 0 < float(r["rel_err"]) < 1e-2  # bf16 against float64: ~3e-3 seen
    # the packed and the padded batch run the same kernels on the same tiles: the same out, to the bit
    assert rows["minimal-flash3-varlen", "forward"]["rel_err"] == rows["minimal-flash3-padded", "forward"]["rel_err"]
    table = [line.split() for line in printed.splitlines() if line.split()[:1] and line.split()[0] in methods]
    assert [line[0] for line in table] == methods


def test_varlen_exits_when_a_method_is_wrong(tmp_path, monkeypatch):
    """The check is real: a method that answers zeros is off by 100%, in the CSV, and the run fails."""
    zeros = ("packed", lambda q, k, v, causal: q * 0 + (k.sum() + v.sum()) * 0)  # in the graph: zero gradients
    monkeypatch.setattr(bench, "varlen_methods", lambda args, cu, longest: {"zeros": zeros})
    with pytest.raises(SystemExit, match="disagree with float64, e.g. zeros forward: rel err 1.0e"):
        bench.main([*VARLEN, "--out", str(tmp_path)])
    assert float(next(csv.DictReader(open(tmp_path / "varlen.csv")))["rel_err"]) == 1.0


def test_padded_and_unpadded_are_inverses():
    packed = torch.randn(3 + 5 + 1, 2, 4)
    batch = bench.padded(packed, [3, 5, 1])
    assert batch.shape == (3, 2, 5, 4) and not batch[0, :, 3:].any() and not batch[2, :, 1:].any()
    assert torch.equal(batch[1].transpose(0, 1), packed[3:8]) and torch.equal(bench.unpadded(batch, [3, 5, 1]), packed)


def test_varlen_takes_version_3_in_half_precision():
    args = bench.parse_args(["--varlen", "--cpu"])
    assert (args.version, args.dtype, args.head_dim, args.heads, args.heads_k, args.lengths) == \
        (3, torch.bfloat16, 64, 4, 2, (1, 130))
    for bad in (["--version", "4"], ["--dtype", "fp32"], ["-H", "6", "--heads-k", "4"], ["--lengths", "0", "9"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--varlen", "--cpu", *bad])


# --mods: chapter 6's mods on version 3's kernels (the CPU's default), against the same kernels without the mod
# and FlexAttention (eager: on the CPU it is not compiled, and has no backward), on the CPU at B=1, H=2, N=128,
# d=64. Each mod is a build of its own, compiled once (seconds, then cached).
MODS = ["--mods", "--cpu", "--seconds", "0.05", "--warmup", "1", "--repeats", "2", "--min-repeats", "2"]
MOD_NAMES = ["causal", "causal as mask_mod", "sliding window 32", "softcap 30", "alibi"]
# The (query, key) pairs each keeps at N = 128: causal, 128 * 129 / 2; a window of 32 keys before each
# query, queries 0..31 see 1..32 keys, the 96 others 33.
CAUSAL_PAIRS, WINDOW_PAIRS = 128 * 129 // 2, 32 * 33 // 2 + 96 * 33


@pytest.fixture(scope="module")
def mods(tmp_path_factory):
    """One tiny --mods run: its rows by (mod, method), and what it printed."""
    return run_once(tmp_path_factory, "mods", MODS, by=("mod", "method"))


def test_mods_csv_has_every_mod_and_method_with_finite_positive_numbers(mods):
    rows, _ = mods
    assert list(rows) == [(m, method) for m in MOD_NAMES for method in bench.mods_method_names(3)]
    for (mod, method), r in rows.items():
        assert (r["B"], r["H"], r["N"], r["d"], r["dtype"]) == ("1", "2", "128", "64", "bfloat16")
        # FlexAttention has no backward on the CPU: refused, in torch's words, and left empty, x flex with it
        passes = ("fwd",) if method == "flex-attention" else ("fwd", "bwd")
        keys = ["repeats_fwd", "x_flex_fwd", *(f"{name}_{p}" for p in passes
                                               for name in ("ms", "tflops", "x_no_mod", "rel_err", "plain_err"))]
        numbers = {key: float(r[key]) for key in keys}
        assert all(math.isfinite(x) and x > 0 for x in numbers.values()), (mod, method, numbers)
        pairs = WINDOW_PAIRS if mod.startswith("sliding") and method != "minimal-flash3-no-mod" else CAUSAL_PAIRS
        assert int(r["pairs"]) == pairs and int(r["repeats_fwd"]) >= 2
        assert numbers["tflops_fwd"] == pytest.approx(4 * 2 * 64 * pairs / numbers["ms_fwd"] / 1e9)
        for p in passes:
            for other, key in (("minimal-flash3-no-mod", "x_no_mod"), ("flex-attention", "x_flex")):
                theirs = rows[mod, other][f"ms_{p}"]
                if theirs:
                    assert numbers[f"{key}_{p}"] == pytest.approx(float(theirs) / numbers[f"ms_{p}"])
            assert numbers[f"rel_err_{p}"] <= 2 * numbers[f"plain_err_{p}"]  # the official rule against float64
        if method == "flex-attention":
            assert r["ms_bwd"] == r["ms_fwd_bwd"] == r["x_flex_bwd"] == "" and "fwd_bwd refused: " in r["note"]
            assert "eager" in r["note"]
        else:
            bwd = float(r["ms_fwd_bwd"]) - numbers["ms_fwd"]
            assert numbers["ms_bwd"] == pytest.approx(bwd) and r["x_flex_bwd"] == "" and r["note"] == ""
            assert numbers["tflops_bwd"] == pytest.approx(2.5 * 4 * 2 * 64 * pairs / bwd / 1e9)


def test_mods_prints_one_table_line_per_mod_and_method(mods):
    rows, printed = mods
    lines = [line for line in printed.splitlines() if "|" in line and line.split("|")[0].strip()]
    assert [line.split("|")[0].split()[-1] for line in lines[1:]] == [method for _, method in rows]
    assert lines[0].split("|")[0].split() == ["mod", "method"]
    assert all(line.startswith(f"{mod:<22} {method:<22}|") for line, (mod, method) in zip(lines[1:], rows))
    assert "flex-attention runs eagerly on the CPU" in printed


def test_mods_exits_when_a_method_is_wrong(tmp_path, monkeypatch):
    """The check is real: a method that answers zeros is off by 100%, not timed, in the CSV, and the run fails."""
    zeros = lambda q, k, v: q * 0 + (k.sum() + v.sum()) * 0  # noqa: E731 (in the graph: zero gradients)
    monkeypatch.setattr(bench, "mod_cases", lambda N, H, device: [bench.NO_MOD])
    monkeypatch.setattr(bench, "mods_methods", lambda mod, N, device, version: {"minimal-flash3": (zeros, mod)})
    with pytest.raises(SystemExit, match="disagree with float64, e.g. minimal-flash3 with causal: fwd rel err 1.0e"):
        bench.main([*MODS, "--out", str(tmp_path)])
    row = next(csv.DictReader(open(tmp_path / "mods.csv")))
    assert float(row["rel_err_fwd"]) == 1.0 and row["ms_fwd"] == row["ms_fwd_bwd"] == ""
    assert "fwd: disagrees with float64, not timed" in row["note"]


def test_interleaved_ms_takes_the_methods_in_turn_and_times_each_apart():
    """--mods's timing: one call of each method a round, in turn (so that a drifting clock falls on all of
    them alike), each method's own inputs rotated, and each method's median its own: a method that sleeps
    2 ms against one that does not."""
    order = []
    calls = {"fast": [lambda i=i: order.append(("fast", i)) for i in range(2)],
             "slow": [lambda: (order.append(("slow", 0)), bench.time.sleep(0.002))]}
    times = bench.interleaved_ms(calls, warmup=0, repeats=5, device="cpu", warm_seconds=0.0)
    timed = order[-10:]
    assert timed == [("fast", 0), ("slow", 0), ("fast", 1), ("slow", 0)] * 2 + [("fast", 0), ("slow", 0)]
    assert times["fast"][1] == times["slow"][1] == 5
    assert times["slow"][0] > 2.0 > 0.5 > times["fast"][0]


def test_mods_dense_builds_the_mods_as_flexattention_takes_them():
    """The reference: causal as plain causal attention; ALiBi and the window as a dense bias and mask."""
    q, k, v, dO = (torch.randn(1, 2, 40, 64, dtype=torch.float64) for _ in range(4))
    mods = {m.name: m for m in bench.mod_cases(40, 2, "cpu")}
    assert torch.allclose(bench.mods_dense(q, k, v, dO, mods["causal"], torch.float64)[0],
                          bench.mf.manual_attention(q, k, v, causal=True))
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    bias = -bench.alibi_slopes(2).double()[:, None, None] * (i - j) - 1e9 * (j > i)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8 + bias, dim=-1) @ v
    assert torch.allclose(bench.mods_dense(q, k, v, dO, mods["alibi"], torch.float64)[0], expected)
    window = (j <= i) & (i - j <= 10)  # N / 4 = 10 keys before each query
    expected = torch.softmax((q @ k.transpose(-2, -1) / 8).masked_fill(~window, -math.inf), dim=-1) @ v
    assert torch.allclose(bench.mods_dense(q, k, v, dO, mods["sliding window 10"], torch.float64)[0], expected)


def test_mods_takes_versions_3_and_4_in_half_precision():
    args = bench.parse_args(["--mods", "--cpu"])  # the CPU's default version: 3
    assert (args.version, args.dtype, args.heads, args.head_dim, args.seq_len) == (3, torch.bfloat16, 2, 64, [128])
    assert bench.parse_args(["--mods", "--cpu", "--version", "4"]).version == 4
    assert bench.mods_method_names(4) == ("minimal-flash4", "minimal-flash4-no-mod", "flex-attention")
    for bad in (["--version", "2"], ["--dtype", "fp32"], ["-d", "48"], ["--version", "4", "-d", "32"],
                ["-N", "64", "128"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--mods", "--cpu", *bad])


# The command line: every input gets the right answer or a usage error naming the problem.
MODE_ARGS = {"default": [], "sweep": ["--sweep"], "decode": ["--decode"], "varlen": ["--varlen"], "mods": ["--mods"],
             "replot": ["--replot", "sweep.csv"]}


def usage_error(capsys, *argv):
    """parse_args(argv)'s usage error: argparse's exit status 2 and the message of its last line."""
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(["--cpu", *argv])
    assert exit.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv, said", [
    (["--context", "5"], "--context applies to --decode, not the default run"),
    (["--lengths", "5", "1"], "--lengths applies to --varlen, not the default run"),
    (["--heads-k", "2"], "--heads-k applies to --decode or --varlen, not the default run"),
    (["--methods", "bogus"], "--methods applies to --sweep, --decode, --varlen or --mods, not the default run"),
    (["--seconds", "1"], "--seconds applies to --sweep, --decode, --varlen or --mods, not the default run"),
    (["--decode", "-N", "999"], "-N/--seq-len applies to the default run, --sweep or --mods, not --decode"),
    (["--decode", "--causal"], "--causal applies to the default run or --sweep, not --decode"),
    (["--decode", "--version", "3"], "--version applies to the default run or --mods, not --decode"),
    (["--decode", "--br", "64"], "--br applies to the default run or --sweep, not --decode"),
    (["--varlen", "--context", "5"], "--context applies to --decode, not --varlen"),
    (["--mods", "--heads-k", "1"], "--heads-k applies to --decode or --varlen, not --mods"),
    (["--sweep", "--version", "1"], "--version applies to the default run or --mods, not --sweep"),
    (["--replot", "x.csv", "--out", "y"], "--out applies to --sweep, --decode, --varlen or --mods, not --replot")])
def test_an_option_given_where_it_is_not_read_is_a_usage_error(capsys, argv, said):
    assert usage_error(capsys, *argv).endswith(f"error: {said}")


# A valid value of each option of bench.OPTION_MODES, for the test below.
VALUES = {"-B/--batch": ["1"], "-H/--heads": ["8"], "-N/--seq-len": ["128"], "-d/--head-dim": ["64"], "--br": ["32"],
          "--bc": ["32"], "--causal": [], "--dtype": ["bf16"], "--version": ["3"], "--warmup": ["1"],
          "--repeats": ["5"], "--min-repeats": ["2"], "--seconds": ["0.1"], "--methods": ["manual"],
          "--out": ["out"], "--context": ["64"], "--heads-k": ["2"], "--lengths": ["1", "9"]}


@pytest.mark.parametrize("mode", MODE_ARGS)
def test_each_option_is_refused_exactly_in_the_modes_that_do_not_read_it(capsys, mode):
    assert set(VALUES) == set(bench.OPTION_MODES)
    for flag, applies in bench.OPTION_MODES.items():
        try:
            bench.parse_args(["--cpu", *MODE_ARGS[mode], flag.split("/")[-1], *VALUES[flag]])
            said = ""
        except SystemExit:  # (another rule may refuse the value in a mode that reads it: not this test's)
            said = capsys.readouterr().err
        assert (f"{flag} applies to" in said) == (mode not in applies), (flag, mode, said)


@pytest.mark.parametrize("argv", [["--sweep", "--decode"], ["--mods", "--varlen"], ["--replot", "x.csv", "--sweep"]])
def test_modes_are_mutually_exclusive(capsys, argv):
    assert "not allowed with argument" in usage_error(capsys, *argv)


@pytest.mark.parametrize("argv, said", [
    (["-B", "0"], "argument -B/--batch: must be at least 1, not 0"),
    (["-H", "0"], "argument -H/--heads: must be at least 1, not 0"),
    (["-d", "0"], "argument -d/--head-dim: must be at least 1, not 0"),
    (["-N", "-3"], "argument -N/--seq-len: must be at least 1, not -3"),
    (["-N", "x"], "argument -N/--seq-len: 'x' is not a whole number"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, not 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, not -1"),
    (["--decode", "--heads-k", "0"], "argument --heads-k: must be at least 1, not 0"),
    (["--decode", "--context", "0"], "argument --context: must be at least 1, not 0"),
    (["--varlen", "--lengths", "0", "9"], "argument --lengths: must be at least 1, not 0"),
    (["--sweep", "--min-repeats", "0"], "argument --min-repeats: must be at least 1, not 0"),
    (["--sweep", "--seconds", "nan"], "argument --seconds: must be a finite number above 0, not nan"),
    (["--sweep", "--seconds", "inf"], "argument --seconds: must be a finite number above 0, not inf"),
    (["--sweep", "--seconds", "0"], "argument --seconds: must be a finite number above 0, not 0"),
    (["--sweep", "--seconds", "-1"], "argument --seconds: must be a finite number above 0, not -1"),
    (["--sweep", "--repeats", "2", "--min-repeats", "5"], "--repeats 2 is fewer than --min-repeats 5"),
    (["--sweep", "-N", "16", "16"], "argument -N/--seq-len: 16 given twice; give each once"),
    (["--decode", "--context", "64", "300", "64"], "argument --context: 64 given twice; give each once"),
    (["--decode", "-B", "1", "1"], "argument -B/--batch: 1 given twice; give each once"),
    (["--decode", "--dtype", "fp32"], "--decode: version 3's kernels take bf16 or fp16; give --dtype bf16, fp16 "
                                      "or none"),
    (["--decode", "-d", "100"], "--decode: -d 100: the decode kernels take a multiple of 8 up to 256"),
    (["--decode", "-d", "264"], "--decode: -d 264: the decode kernels take a multiple of 8 up to 256"),
    (["--varlen", "-d", "300"], "--varlen: -d 300: version 3's kernels take d up to 256"),
    (["--version", "3", "--dtype", "bf16", "-d", "264"], "-d 264: version 3 is compiled for d = 32, 64, 96, 128, "
                                                         "192 or 256 (a d between them runs padded up to the next)"),
    (["--sweep", "--dtype", "bf16", "-d", "512"], "-d 512: version 3 is compiled for d = 32, 64, 96, 128, 192 or 256 "
                                                  "(a d between them runs padded up to the next)"),
    (["--sweep", "--methods", "manual", "sdpa", "--br", "8"], "--br/--bc: none of the methods asked for is one of our "
                                                              "versions 1 and 2, which take block sizes")])
def test_sizes_and_counts_out_of_range_are_usage_errors(capsys, argv, said):
    assert usage_error(capsys, *argv).endswith(f"error: {said}")


def test_repeats_and_min_repeats_yield_to_the_one_given():
    # a default never overrides what was given, and a given 0 would never become a default
    args = bench.parse_args(["--sweep", "--cpu", "--repeats", "3"])
    assert (args.repeats, args.min_repeats) == (3, 3)
    args = bench.parse_args(["--sweep", "--cpu", "--min-repeats", "20"])
    assert (args.repeats, args.min_repeats) == (20, 20)
    args = bench.parse_args(["--sweep", "--cpu"])
    assert (args.repeats, args.min_repeats, args.seconds) == (10, 5, 2.0)
    assert bench.or_default(0, 5) == 0 and bench.or_default(None, 5) == 5


def test_block_sizes_are_checked_for_the_versions_that_run(capsys):
    """Version 1 takes 8 x 8 tiles and version 2 does not: a sweep of version 1 alone takes them."""
    args = bench.parse_args(["--sweep", "--cpu", "--methods", "manual", "minimal-flash", "--br", "8", "--bc", "8"])
    assert args.block_sizes == {1: (8, 8)}
    assert list(bench.chosen_methods(bench.sweep_methods(args), args.methods)) == ["manual", "minimal-flash"]
    assert "version 2 gives each thread 4 rows" in usage_error(capsys, "--sweep", "--br", "8", "--bc", "8")


def test_a_block_size_variable_that_is_not_a_number_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("MINIMAL_FLASH_BR", "abc")
    assert usage_error(capsys).endswith("error: Br = 'abc' (from MINIMAL_FLASH_BR): a block size is a whole number")


def test_methods_are_matched_by_their_exact_names(monkeypatch):
    decode = bench.decode_methods()
    assert list(bench.chosen_methods(decode, ["minimal-flash"])) == ["minimal-flash"]  # not also -paged
    assert list(bench.chosen_methods(decode, ["sdpa"])) == ["sdpa-flash", "sdpa-cudnn"]
    monkeypatch.setattr(bench, "sdpa_refusal", refusing({}))
    sweep = bench.sweep_methods(gpu_args("--dtype", "bf16"))
    assert list(bench.chosen_methods(sweep, ["minimal-flash4"])) == ["minimal-flash4"]  # not also -deterministic
    mods = dict.fromkeys(bench.mods_method_names(3))
    assert list(bench.chosen_methods(mods, ["minimal-flash3"])) == ["minimal-flash3"]  # not also -no-mod
    # --mods times no SDPA: "sdpa" is not a name there, and the error offers only names that are
    with pytest.raises(SystemExit) as exit:
        bench.chosen_methods(mods, ["sdpa"])
    assert str(exit.value) == ("bench: unknown method 'sdpa'; choose from minimal-flash3, minimal-flash3-no-mod, "
                               "flex-attention")


def test_decode_times_the_contiguous_cache_alone_when_asked(tmp_path):
    bench.main([*DECODE, "--batch", "1", "--context", "64", "--methods", "minimal-flash", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "decode.csv")))
    assert [r["method"] for r in rows if r["batch"]] == ["minimal-flash"] and float(rows[-1]["rel_err"]) < 1e-2


def test_an_unusable_out_stops_the_run_before_anything_is_measured(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(bench, "run_sweep", lambda args: runs.append(args.out.is_dir()))
    (tmp_path / "a_file").write_text("")
    for out, said in ((tmp_path / "a_file", "is not a folder"), (tmp_path / "a_file" / "sub", "Not a directory")):
        with pytest.raises(SystemExit, match=said):
            bench.main(["--sweep", "--cpu", "--out", str(out)])
    assert runs == []
    bench.main(["--sweep", "--cpu", "--out", str(tmp_path / "new" / "folder")])
    assert runs == [True]  # made before the run


def sweep_csv(path):
    """A small sweep.csv, as the sweep writes one (CPU: no memory)."""
    rows = [dict(N=N, B=1, H=2, d=8, causal=False, method=m, **{"pass": p}, ms=0.5 * N, repeats=3)
            for N in (16, 32) for m in ("manual", "minimal-flash") for p in bench.PASSES]
    bench.write_csv(rows, path)
    return path


@pytest.mark.parametrize("text, said", [
    (None, "No such file or directory"), ("", "no rows"), ("N,B,H\n", "no rows"),
    ("batch,context,method\n1,64,manual\n", "not a sweep's CSV (bench.py --sweep writes one): no column N, B, H, d, "
                                            "pass, ms"),
    ("N,B,H,d,method,pass,ms\nabc,1,2,8,manual,forward,1\n", "invalid literal for int() with base 10: 'abc'"),
    ("N,B,H,d,method,pass,ms\n16,1,2,8,manual,forward,1\n16,1,2\n", "fewer cells than the header: cut short?")])
def test_replot_of_what_is_not_a_sweep_csv_is_a_one_line_error(tmp_path, text, said):
    path = tmp_path / "sweep.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        bench.main(["--replot", str(path)])
    assert str(exit.value).startswith(f"bench: --replot {path}: ") and said in str(exit.value)
    assert not (tmp_path / "sweep_time.png").exists()


def test_replot_says_where_it_wrote(tmp_path, capsys):
    bench.main(["--replot", str(sweep_csv(tmp_path / "sweep.csv"))])
    assert capsys.readouterr().out.splitlines()[-1] == f"Wrote {tmp_path / 'sweep_time.png'}"
    assert read_png(tmp_path / "sweep_time.png").shape[0] > 200


def test_with_tf32_manual_attention_is_held_to_tf32s_accuracy(monkeypatch):
    """--tf32 rounds manual attention's fp32 matmuls to TF32 on a GPU (about 1e-3 relative error): the
    default run's check holds it to TF32_TOLERANCE then, and our kernels to fp32's 1e-4 still. Here a
    manual attention off by 1e-3 stands in (the CPU has no TF32)."""
    q, k, v, dO = (torch.randn(1, 2, 16, 8) for _ in range(4))
    tf32_manual = lambda q, k, v, causal: bench.plain_attention(q, k, v, causal) * (1 + 1e-3)  # noqa: E731
    errors = bench.check({"manual": tf32_manual, "flash": bench.plain_attention}, q, k, v, dO, False, tf32=("manual",))
    assert 5e-4 < max(errors["manual"]) < bench.TF32_TOLERANCE
    with pytest.raises(AssertionError):  # fp32's limit for it without --tf32
        bench.check({"manual": tf32_manual}, q, k, v, dO, False)
    with pytest.raises(AssertionError):  # and for our kernels with it
        bench.check({"manual": bench.plain_attention, "flash": tf32_manual}, q, k, v, dO, False, tf32=("manual",))
    asked, check = [], bench.check
    monkeypatch.setattr(bench, "check", lambda *args, **kwargs: asked.append(kwargs) or check(*args, **kwargs))
    bench.main(["--tf32", "--no-profile", "--seq-len", "9", *TINY])
    assert asked == [{"tf32": ("manual",)}]


def test_help_says_each_modes_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line an option: argparse wraps at hyphens too
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    help = " ".join(capsys.readouterr().out.split())
    for mode, d in (("decode", 128), ("varlen", 64), ("mods", 64)):  # the CPU's, said in the help
        args = bench.parse_args([f"--{mode}", "--cpu"])
        assert (args.dtype, args.head_dim) == (torch.bfloat16, d)
    assert "--decode, --varlen and --mods: bf16" in help and "--decode: 128" in help
    assert "--varlen: minimal-flash3-varlen, minimal-flash3-padded" in help
    assert "our kernels in the default run and --mods" in help and "--decode and --varlen: key/value heads" in help
    assert (bench.parse_args(["--decode", "--cpu"]).version, bench.parse_args(["--varlen", "--cpu"]).version) == (3, 3)


def test_busy_time_counts_an_overlap_once():
    # (0, 10) and (5, 12) overlap: busy 0..12; (11, 12) lies inside; (20, 25) stands apart; unsorted on purpose
    assert bench.busy_ms([(20, 25), (5, 12), (0, 10), (11, 12)]) == pytest.approx((12 + 5) / 1e3)
    assert bench.busy_ms([]) == 0.0
    assert bench.busy_ms([(3, 4)]) == pytest.approx(1e-3)
