"""benchmarks/study.py: the table, CSV and picture code, on hand-made fixture runs."""

import builtins
import csv
import json
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import study  # noqa: E402


def _write_run(out, setting, method, seed, evals, extra):
    """A finished run: metrics.jsonl with steps 0..4, evals at the given steps, summary.json."""
    run = (
        out
        / f"ops{setting}"
        / "runs"
        / method
        / f"seed{seed}"
        / f"{method}__tiny__arith__{seed}__1"
    )
    run.mkdir(parents=True)
    rows = []
    for step in range(5):
        row = {"step": step, "time": 100.0 + 10 * step}
        if step > 0:
            row.update(
                step_time=2.0,
                **{k: v[step - 1] if isinstance(v, list) else v for k, v in extra.items()},
            )
        if step in evals:
            row["eval/accuracy"] = evals[step]
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text("{}")


@pytest.fixture
def fixture_dir(tmp_path):
    # 2-4: grpo gains 0.20 and 0.10 (seeds 0, 1); tempo 0.25 and 0.05 -> vs GRPO +0.05, -0.05
    _write_run(tmp_path, "2-4", "grpo", 0, {0: 0.30, 4: 0.50}, {"completions/mean_length": 30.0})
    _write_run(tmp_path, "2-4", "grpo", 1, {0: 0.30, 4: 0.40}, {"completions/mean_length": 34.0})
    _write_run(
        tmp_path,
        "2-4",
        "tempo",
        0,
        {0: 0.30, 4: 0.55},
        {
            "completions/mean_length": 32.0,
            "tempo/frac_tokens_td_nonzero": [0.1, 0.2, 0.3, 0.4],
            "tempo/branch_nodes_per_group_mean": 3.0,
        },
    )
    _write_run(
        tmp_path,
        "2-4",
        "tempo",
        1,
        {0: 0.30, 4: 0.35},
        {"completions/mean_length": 32.0, "tempo/frac_tokens_td_nonzero": 0.05},
    )
    # 6-8: grpo gains 0.10; spo-chain 0.20 (one seed) -> +0.10; spo-chain seed 3 has no grpo twin
    _write_run(
        tmp_path, "6-8", "grpo", 0, {0: 0.30, 2: 0.35, 4: 0.40}, {"completions/mean_length": 70.0}
    )
    _write_run(
        tmp_path,
        "6-8",
        "spo-chain",
        0,
        {0: 0.30, 4: 0.50},
        {
            "completions/mean_length": 66.0,
            "spo/segments_per_response": 2.0,
            "spo/mask_keep_frac": 0.1,
        },
    )
    _write_run(
        tmp_path,
        "6-8",
        "spo-chain",
        3,
        {0: 0.30, 4: 0.30},
        {
            "completions/mean_length": 60.0,
            "spo/segments_per_response": 4.0,
            "spo/mask_keep_frac": 0.3,
        },
    )
    return tmp_path


def test_records_and_rows(fixture_dir):
    records = study.collect(fixture_dir, ["2-4", "6-8"])
    assert [(r["setting"], r["method"], r["seed"]) for r in records] == [
        ("2-4", "grpo", 0),
        ("2-4", "grpo", 1),
        ("2-4", "tempo", 0),
        ("2-4", "tempo", 1),
        ("6-8", "grpo", 0),
        ("6-8", "spo-chain", 0),
        ("6-8", "spo-chain", 3),
    ]
    assert records[2]["gain"] == pytest.approx(0.25)
    assert records[2]["tempo/frac_tokens_td_nonzero"] == pytest.approx(0.25)  # mean over steps 1..4
    rows = {(r["setting"], r["method"]): r for r in study.summarize(records)}
    assert rows[("2-4", "grpo")]["gain"][0] == pytest.approx(0.15)
    t = rows[("2-4", "tempo")]
    assert t["gain_vs_grpo"][0] == pytest.approx(0.0) and t["gain_vs_grpo"][1] == pytest.approx(
        math.sqrt(0.005)
    )
    assert t["paired"] == 2 and t["diagnostics"]["tempo/frac_tokens_td_nonzero"] == pytest.approx(
        0.15
    )
    s = rows[("6-8", "spo-chain")]
    assert s["seeds"] == 2 and s["paired"] == 1 and s["gain_vs_grpo"] == (pytest.approx(0.10), 0.0)
    assert s["diagnostics"]["spo/segments_per_response"] == pytest.approx(3.0)
    assert s["diagnostics"]["completions/mean_length"] == pytest.approx(63.0)


def test_outputs_from_fixture(fixture_dir):
    study.build_outputs(fixture_dir, ["2-4", "6-8"])
    table = (fixture_dir / "study.md").read_text().splitlines()
    assert table[0].startswith("| ops | method | seeds | start | final | gain | gain vs GRPO |")
    assert table[2].startswith(
        "| 2-4 | grpo | 2 | 30.0 ± 0.0 | 45.0 ± 7.1 | +15.0 ± 7.1 | — |")
    assert table[3].startswith(
        "| 2-4 | tempo | 2 | 30.0 ± 0.0 | 45.0 ± 14.1 | +15.0 ± 14.1 | +0.0 ± 7.1 (2) |"
    )
    assert "TD-active 0.15" in table[3] and "length 32" in table[3]
    assert table[5].startswith(
        "| 6-8 | spo-chain | 2 | 30.0 ± 0.0 | 40.0 ± 14.1 | +10.0 ± 14.1 | +10.0 ± 0.0 (1) |"
    )
    assert "segments/response 3" in table[5] and "mask keep 0.2" in table[5]
    with open(fixture_dir / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["method"], r["seed"], r["gain"]) for r in rows][:2] == [
        ("2-4", "grpo", "0", "0.2"),
        ("2-4", "grpo", "1", str(0.4 - 0.3)),
    ]
    assert rows[2]["tempo/frac_tokens_td_nonzero"] == "0.25" and rows[0]["spo/mask_keep_frac"] == ""


def test_png_or_one_line_without_matplotlib(fixture_dir, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    study.build_outputs(fixture_dir, ["2-4", "6-8"])
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and err.count("\n") == 1
    assert (fixture_dir / "study.md").exists() and not (fixture_dir / "study.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib", reason="needs `pip install -r benchmarks/requirements-plots.txt` (matplotlib)")
    study.build_outputs(fixture_dir, ["2-4", "6-8"])
    assert (fixture_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_runs_and_bad_lengths(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no finished runs"):
        study.build_outputs(tmp_path, ["2-4"])
    with pytest.raises(SystemExit) as e:
        study.main(["--tables-only", "--lengths", "8-6", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--arith-ops" in capsys.readouterr().err


def test_mean_ops():
    assert study.mean_ops("2-4") == 3.0 and study.mean_ops("6-8") == 7.0
