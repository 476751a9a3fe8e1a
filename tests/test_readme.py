"""The README's Python example runs as written, on whatever device this machine has (in CI, the
CPU), from the repository root as the README says; and its tables of results are the committed
CSVs', as tools/summary.py writes them, not numbers typed by hand."""
import re
from pathlib import Path

from helpers import tool

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme[readme.index("## What is here"):], re.S).group(1)
    monkeypatch.chdir(ROOT)
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    assert names["q"].grad is not None and names["out"].shape == (2, 100, 8, 64)
    assert names["O1"].shape == names["O"].shape and len(names["steps"]) > 0 and names["dec"].shape == (2, 1, 8, 64)
    assert names["var"].shape == (100, 8, 64)


def test_results_tables_are_generated_from_the_csvs():
    """README.md's summary table and notebooks/results/README.md's tables are what
    `python tools/summary.py` writes from the CSVs in notebooks/results/h200/."""
    out_of_date, _ = tool("summary").stale()
    assert not out_of_date, f"run python tools/summary.py: these tables differ from the CSVs': {out_of_date}"


def test_summary_has_a_row_per_version():
    summary = tool("summary")
    import minimal_flash as mf
    rows = [line for line in summary.summary().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(row.split("|")[1]) for row in rows] == list(mf.VERSIONS)
    assert "not measured" not in "".join(rows)


def test_bf16_table_adds_cudnn_beside_flashattention2_where_the_csv_has_it(tmp_path, monkeypatch):
    """A sweep with SDPA's cuDNN backend (from a GPU that runs it) gets its two columns in each pass;
    a point where it was left out shows "-". Without it the table stays as committed (test above)."""
    import bench
    summary = tool("summary")
    ms = {"manual": 4.0, "minimal-flash3": 1.0, "sdpa-flash": 0.8, "sdpa-cudnn": 0.5}
    rows = [dict(N=N, B=1, H=16, d=128, causal=False, dtype="bfloat16", method=m, **{"pass": p}, ms=ms[m] * N,
                 repeats=5, tflops=100 / ms[m], x_manual=4.0 / ms[m])
            for N in (1024, 2048) for m in ms for p in bench.PASSES if (N, m) != (2048, "sdpa-cudnn")]
    bench.write_csv(rows, tmp_path / "sweep_bf16.csv")
    monkeypatch.setattr(summary, "RESULTS", tmp_path)
    header, rule, *lines = summary.bf16_table().splitlines()
    assert header == ("| d | causal | N | forward: ours TFLOP/s | SDPA-FA2 | ours / SDPA | SDPA-cuDNN | ours / cuDNN "
                      "| ours x manual | backward: ours TFLOP/s | SDPA-FA2 | ours / SDPA | SDPA-cuDNN | ours / cuDNN |")
    assert rule.count("---") == 14
    assert lines == ["| 128 | no | 1024 | 100 | 125 | 0.80 | 200 | 0.50 | 4.00x | 100 | 125 | 0.80 | 200 | 0.50 |",
                     "| 128 | no | 2048 | 100 | 125 | 0.80 | - | - | 4.00x | 100 | 125 | 0.80 | - | - |"]


def test_mods_table_is_made_from_mods_csv_and_only_once_there_is_one(tmp_path, monkeypatch):
    """bench.py --mods' CSV as a table: ours and FlexAttention's TFLOP/s, and the ratios, by mod; a pass not
    measured shows "-". tables() holds it only where mods.csv exists."""
    import bench
    summary = tool("summary")
    monkeypatch.setattr(summary, "RESULTS", tmp_path)
    for name in ("summary", "sweep_table", "bf16_table", "steps_table", "decode_table", "varlen_table", "gpt_table"):
        monkeypatch.setattr(summary, name, lambda *args, **kwargs: "")  # they read the committed CSVs: not here
    assert ("notebooks/results/README.md", "mods") not in summary.tables()
    ours = dict(method="minimal-flash3", tflops_fwd=400.0, tflops_bwd=300.0, x_flex_fwd=1.5, x_no_mod_fwd=0.9,
                x_no_mod_bwd=0.8)
    rows = [dict(ours, mod="causal", x_flex_bwd=1.25),
            dict(mod="causal", method="minimal-flash3-no-mod", tflops_fwd=444.0),
            dict(mod="causal", method="flex-attention", tflops_fwd=266.7, tflops_bwd=240.0),
            dict(ours, mod="alibi"), dict(mod="alibi", method="flex-attention", tflops_fwd=250.0, note="bwd refused")]
    bench.write_csv(rows, tmp_path / "mods.csv", bench.MODS_FIELDS)
    assert summary.mods_table().splitlines() == [
        "| mod | forward: ours TFLOP/s | FlexAttention | x FlexAttention | x no mod | backward: ours TFLOP/s "
        "| FlexAttention | x FlexAttention | x no mod |", "|---" * 9 + "|",
        "| causal | 400 | 267 | 1.50 | 0.90 | 300 | 240 | 1.25 | 0.80 |",
        "| alibi | 400 | 250 | 1.50 | 0.90 | 300 | - | - | 0.80 |"]  # no backward for FlexAttention: "-"
    assert summary.tables()["notebooks/results/README.md", "mods"] == summary.mods_table()
