"""benchmarks/compare.py: the table-building code, on a hand-made fixture of metrics.jsonl files."""
import builtins
import csv
import json
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402


def _write_run(root, method, seed, evals, step_times, extra=None):
    """A finished run folder: metrics.jsonl with step 0..n, eval rows at the given steps, summary.json."""
    run = root / "runs" / method / f"seed{seed}" / f"{method}__tiny__arith__{seed}__1"
    run.mkdir(parents=True)
    rows, t = [], 1000.0
    for step in range(len(step_times) + 1):
        row = {"step": step, "time": t}
        if step > 0:
            row["step_time"] = step_times[step - 1]
            row.update(extra or {})
        if step in evals:
            row["eval/accuracy"] = evals[step]
        rows.append(row)
        t += 10.0  # 10 s between logged steps
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text("{}")
    return run


@pytest.fixture
def fixture_dir(tmp_path):
    # grpo, two seeds: 0.30 -> 0.50 -> 0.60, and 0.30 -> 0.40 -> 0.40
    _write_run(tmp_path, "grpo", 0, {0: 0.30, 2: 0.50, 4: 0.60}, [1.0, 2.0, 3.0, 2.0],
               {"clip_ratio/region_mean": 0.1, "approx_kl_old": 0.01})
    _write_run(tmp_path, "grpo", 1, {0: 0.30, 2: 0.40, 4: 0.40}, [2.0, 2.0, 2.0, 2.0],
               {"clip_ratio/region_mean": 0.3, "approx_kl_old": 0.03})
    # tempo, one seed, reaches 0.5 at step 4
    _write_run(tmp_path, "tempo", 0, {0: 0.30, 2: 0.45, 4: 0.55}, [4.0, 4.0, 4.0, 4.0],
               {"tempo/frac_tokens_td_nonzero": 0.2})
    return tmp_path


def test_read_run_takes_everything_from_metrics(fixture_dir):
    run = next((fixture_dir / "runs" / "grpo" / "seed0").iterdir())
    r = compare.read_run(run, "grpo", 0, target=0.5)
    assert r["curve"] == [(0, 0.0, 0.30), (2, 20.0, 0.50), (4, 40.0, 0.60)]
    assert (r["start_acc"], r["final_acc"], r["best_acc"], r["steps_to_target"]) == (0.30, 0.60, 0.60, 2)
    assert r["sec_per_step"] == pytest.approx(2.0) and r["wall_s"] == 40.0 and r["steps"] == 4
    assert r["clip_ratio/region_mean"] == pytest.approx(0.1)
    assert compare.read_run(run, "grpo", 0, target=0.9)["steps_to_target"] is None


def test_table_from_fixture(fixture_dir):
    rows = compare.build_outputs(fixture_dir, target=0.5)
    grpo, tempo = rows
    assert grpo["method"] == "grpo" and grpo["seeds"] == 2
    assert grpo["final_acc"][0] == pytest.approx(0.50) and grpo["final_acc"][1] == pytest.approx(math.sqrt(0.02))  # sample std of 0.6, 0.4
    assert grpo["gain"][0] == pytest.approx(0.20)
    assert grpo["reached"] == 1 and grpo["steps_to_target"] == (2, 0.0)
    assert grpo["diagnostics"]["clip_ratio/region_mean"] == pytest.approx(0.2)
    assert tempo["steps_to_target"] == (4, 0.0) and tempo["seeds"] == 1
    table = (fixture_dir / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | seeds | start | final | gain | best | steps to 50% |")
    # mean ± std in points; std of (0.6, 0.4) is 14.1 points
    assert table[2].startswith("| grpo | 2 | 30.0 ± 0.0 | 50.0 ± 14.1 | 20.0 ± 14.1 | 50.0 ± 14.1 | 2 ± 0 (1/2) | 2.00 ± 0.00 | 40 ± 0 |")
    assert "clip_ratio/region_mean=0.2" in table[2]
    assert table[3].startswith("| tempo | 1 | 30.0 ± 0.0 | 55.0 ± 0.0 | 25.0 ± 0.0 | 55.0 ± 0.0 | 4 ± 0 (1/1) | 4.00 ± 0.00 |")
    with open(fixture_dir / "runs.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["method"], r["seed"], r["final_acc"], r["steps_to_target"]) for r in records] == [
        ("grpo", "0", "0.6", "2"), ("grpo", "1", "0.4", ""), ("tempo", "0", "0.55", "4")]


def test_paired_table_is_each_method_minus_its_baseline_seed_by_seed(fixture_dir):
    compare.build_outputs(fixture_dir, target=0.5)
    lines = (fixture_dir / "paired.md").read_text().splitlines()
    assert lines[0] == "| method | final | vs | by seed | mean |"
    assert lines[2] == "| grpo | 50.0 ± 14.1 | — | — | — |"  # the baseline itself
    assert lines[3] == "| tempo | 55.0 ± 0.0 | grpo | -5.0 | -5.0 |"  # seed 0 only: 0.55 - 0.60
    records = [{"method": m, "seed": s, "final_acc": a, "start_acc": 0.3, "best_acc": a, "sec_per_step": 1.0,
                "wall_s": 1.0, "steps_to_target": None}
               for m, s, a in [("grpo", 0, 0.46), ("grpo", 1, 0.43), ("tempo", 0, 0.48), ("tempo", 1, 0.40)]]
    assert compare.paired_table(records).splitlines()[3] == "| tempo | 44.0 ± 5.7 | grpo | +2.0, -3.0 | -0.5 |"


def test_every_method_has_a_baseline_that_is_a_method():
    assert set(compare.BASELINE) | {"grpo"} == set(compare.METHODS)
    assert set(compare.BASELINE.values()) <= set(compare.METHODS)


def test_missing_matplotlib_still_writes_tables(fixture_dir, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    compare.build_outputs(fixture_dir, target=0.5)
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert (fixture_dir / "table.md").exists() and (fixture_dir / "runs.csv").exists()
    assert not (fixture_dir / "curves.png").exists()


def test_curves_png_when_matplotlib_is_there(fixture_dir):
    pytest.importorskip("matplotlib", reason="needs `pip install -r benchmarks/requirements-plots.txt` (matplotlib)")
    compare.build_outputs(fixture_dir, target=0.5)
    assert (fixture_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_runs_is_a_clear_error(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="no finished runs"):
        compare.build_outputs(tmp_path, target=0.5)


def test_every_method_is_a_valid_flag_set_with_its_diagnostics():
    """Each method's flags parse and pass the checks of its script (issue 24 added tw-grpo, d3s
    and tabpo), and each has its diagnostics."""
    import common

    assert {"tw-grpo", "d3s", "tabpo"} <= set(compare.METHODS)
    assert set(compare.DIAGNOSTICS) == set(compare.METHODS)
    for method, (script, flags) in compare.METHODS.items():
        mod = __import__(script)
        common.check_args(common.parse_args(mod.Args, flags), script)
