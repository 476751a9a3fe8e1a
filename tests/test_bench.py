"""bench.py's functions on the CPU at tiny sizes: the sweep's table, CSV and plots are produced and
well formed, and its FLOP count and memory guard are right; the methods a GPU sweep times, with its
probes stood in for. No timing is asserted: CPU emulation times say nothing about GPU speed."""
import contextlib
import csv
import warnings

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

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
