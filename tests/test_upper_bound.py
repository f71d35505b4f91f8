"""benchmarks/upper_bound.py: planning, parts that stop and resume, and the tables, on fixtures
and stand-in commands (no training here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import compare  # noqa: E402
import study  # noqa: E402
import upper_bound as ub  # noqa: E402


def _run(out, setting, method, seed, name="1", status=None, evals=None, step_time=2.0,
         checkpoint=False, logged=None):
    """A run folder: metrics.jsonl with steps 0..4, evals, and summary.json if status is given;
    logged: {metric: value at step s = value * s} on the training steps."""
    run = out / f"ops{setting}" / "runs" / method / f"seed{seed}" / f"{method}__{seed}__{name}"
    run.mkdir(parents=True)
    evals = evals or {0: 0.4, 4: 0.5}
    rows = [dict({"step": s, "time": 1000.0 * s},  # wall time with a gap: not what is plotted
                 **({"step_time": step_time} if s else {}),
                 **({k: v * s for k, v in (logged or {}).items()} if s else {}),
                 **({"eval/accuracy": evals[s]} if s in evals else {})) for s in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        (run / "summary.json").write_text(json.dumps({"status": status}))
    if checkpoint:
        (run / "checkpoints" / "step-0000003").mkdir(parents=True)
    return run


@pytest.fixture
def fake_checkpoints(monkeypatch):
    """A checkpoint is any checkpoints/step-N folder (the real check verifies hashes)."""
    def latest(run_dir):
        c = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
        return c[-1] if c else None
    monkeypatch.setattr(common, "latest_checkpoint", latest)


def test_the_oracle_is_spo_chain_at_its_dense_limit():
    assert ub.METHODS["oracle"] == ("spo", ["--variant", "chain", "--cutpoint-interval", "1",
                                            "--num-rollouts", "48"])
    assert ub.METHODS["spo-chain"] == compare.METHODS["spo-chain"]


def test_plan_skips_finished_resumes_interrupted_and_starts_the_rest(tmp_path, fake_checkpoints):
    _run(tmp_path, "2-4", "grpo", 0, status="finished")
    stopped = _run(tmp_path, "2-4", "oracle", 0, status="interrupted", checkpoint=True)
    _run(tmp_path, "2-4", "tempo", 0, name="0", status=None)  # killed before any checkpoint
    todo = ub.plan(tmp_path, ["2-4"], list(ub.METHODS), [0, 1], study.STEPS_FLAGS)
    got = [(j["method"], j["seed"]) for j in todo]
    assert got == [("tempo", 0), ("spo-chain", 0), ("oracle", 0),
                   ("grpo", 1), ("tempo", 1), ("spo-chain", 1), ("oracle", 1)]  # seed by seed
    oracle0 = todo[2]
    assert oracle0["resume"] == stopped and oracle0["cmd"][1:] == [str(ROOT / "spo.py"),
                                                                    "--resume", str(stopped)]
    assert todo[0]["resume"] is None and "--resume" not in todo[0]["cmd"]
    oracle1 = todo[-1]["cmd"]
    assert oracle1[oracle1.index("--variant"):][:6] == ub.ORACLE_FLAGS
    assert oracle1[-2:] == ["--save-every", "5"] and "--arith-ops" in oracle1


def test_the_shared_methods_run_exactly_the_study_s_command(tmp_path, fake_checkpoints):
    """So the study's runs are this benchmark's runs for grpo, tempo and spo-chain."""
    for setting in ["2-4", "6-8"]:
        d = tmp_path / f"ops{setting}"
        for m in ["grpo", "tempo", "spo-chain"]:
            mine = ub.plan(tmp_path, [setting], [m], [3], study.STEPS_FLAGS)[0]["cmd"]
            theirs = compare.plan_runs(d, [m], [3], ["--arith-ops", setting,
                                                     *study.STEPS_FLAGS])[0][3]
            assert sorted(mine) == sorted(theirs)
            assert mine[:mine.index("--arith-ops")] == theirs[:theirs.index("--arith-ops")]


STAND_IN = """
import os, signal, sys, time
def stop(*_):
    print("checkpointed", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("started threads=" + os.environ["OMP_NUM_THREADS"], flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_a_part_stops_at_its_budget_with_sigint_and_starts_nothing_new(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    job = lambda m, secs: dict(setting="2-4", method=m, seed=0, resume=None,  # noqa: E731
                               seed_dir=tmp_path / m, cmd=[sys.executable, str(script), secs])
    todo = [job("quick", "0.1"), job("long", "60"), job("slow", "60"), job("never", "0.1")]
    outcomes = ub.run_part(todo, 2, tmp_path / "logs", budget_s=3.0)
    got = {o["method"]: o["status"] for o in outcomes}
    assert got == {"quick": "finished", "long": "interrupted", "slow": "interrupted"}
    assert "checkpointed" in (tmp_path / "logs" / "ops2-4-long-seed0.log").read_text()
    assert all(o["seconds"] < 30 for o in outcomes)
    assert all(o["commit"] == compare._git_commit() for o in outcomes)  # the code each started with
    assert {o["threads"] for o in outcomes} == {max(1, (os.cpu_count() or 2) // 2)}


def test_a_lone_run_gets_every_core(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    job = dict(setting="6-8", method="oracle", seed=4, resume=None, seed_dir=tmp_path / "o",
               cmd=[sys.executable, str(script), "0.1"])
    (outcome,) = ub.run_part([job], 2, tmp_path / "logs", budget_s=None)
    cores = os.cpu_count() or 2
    assert outcome["status"] == "finished" and outcome["threads"] == cores
    assert f"threads={cores}" in (tmp_path / "logs" / "ops6-8-oracle-seed4.log").read_text()


def test_tables_pair_by_seed_and_plot_training_seconds(tmp_path, fake_checkpoints):
    for seed, (g, o) in enumerate([(0.45, 0.50), (0.47, 0.46)]):
        _run(tmp_path, "2-4", "grpo", seed, status="finished", evals={0: 0.4, 2: 0.42, 4: g})
        _run(tmp_path, "2-4", "oracle", seed, status="finished", step_time=100.0,
             evals={0: 0.4, 2: 0.44, 4: o})
    _run(tmp_path, "2-4", "oracle", 2, status="interrupted", checkpoint=True)
    records, unfinished = ub.collect(tmp_path, ["2-4"], list(ub.METHODS))
    assert unfinished == ["2-4 oracle seed 2: step 3"]
    oracle = [r for r in records if r["method"] == "oracle"][0]
    assert oracle["curve"] == [(0, 0.0, 0.4), (2, 200.0, 0.44), (4, 400.0, 0.50)]
    rows = ub.summarize(records, list(ub.METHODS))
    assert [r["method"] for r in rows] == ["grpo", "oracle"]
    vs = rows[1]["gain_vs_grpo"]
    assert vs[0] == pytest.approx(((0.50 - 0.45) + (0.46 - 0.47)) / 2)
    assert rows[1]["sec_per_step"][0] == pytest.approx(100.0)
    curves = ub.curve_table(records, list(ub.METHODS))
    assert "| 2-4 | grpo | 2 | 40.0 | 42.0 | 46.0 |" in curves             # (45 + 47) / 2 at step 4
    assert "| 2-4 | oracle | 2 | 40.0 | 44.0 (+2.0) | 48.0 (+2.0) |" in curves   # paired by seed
    md = ub.markdown_table(rows, unfinished)
    assert "| 2-4 | oracle | 2 | 48.0 ± 2.8 | +8.0 ± 2.8 | +2.0 ± 4.2 (2) | 100.0 |" in md
    assert "Not finished yet: 2-4 oracle seed 2: step 3." in md
    table = ub.build_outputs(tmp_path, ["2-4"], list(ub.METHODS))
    assert table.startswith(md) and (tmp_path / "upper_bound.csv").read_text().count("\n") == 5


def test_study_reads_only_finished_runs(tmp_path):
    _run(tmp_path, "2-4", "grpo", 0, status="finished")
    _run(tmp_path, "2-4", "oracle", 0, status="interrupted")
    assert [r["method"] for r in study.collect(tmp_path, ["2-4"])] == ["grpo"]


def test_bad_budget_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "upper_bound.py"),
                          "--budget-min", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--budget-min" in out.stderr


def test_tables_only_without_runs_says_so(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "upper_bound.py"),
                          "--tables-only", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "No finished runs yet." in out.stdout


def test_the_picture_has_a_row_per_setting(tmp_path, fake_checkpoints):
    pytest.importorskip("matplotlib", reason="needs `pip install -r benchmarks/requirements-plots.txt` (matplotlib)")
    for setting in ["2-4", "6-8"]:
        _run(tmp_path, setting, "grpo", 0, status="finished")
    ub.build_outputs(tmp_path, ["2-4", "6-8"], list(ub.METHODS))
    from matplotlib.image import imread
    h, w = imread(tmp_path / "upper_bound.png").shape[:2]
    assert h > 0.6 * w  # two rows of two panels (one row: 4 by 11)


def test_diagnostics_are_means_over_steps_then_seeds(tmp_path, fake_checkpoints):
    for seed, reward in enumerate([0.1, 0.2]):   # steps 1..4 log reward * s: mean 2.5 * reward
        _run(tmp_path, "2-4", "grpo", seed, status="finished",
             logged={"reward": reward, "frac_reward_zero_std": 0.2})
    _run(tmp_path, "2-4", "oracle", 0, status="finished", logged={"spo/mask_keep_frac": 0.04})
    records, _ = ub.collect(tmp_path, ["2-4"], list(ub.METHODS))
    md = ub.diagnostics_table(records, list(ub.METHODS))
    assert "| 2-4 | grpo | 0.375 | 0.5 | — | — | — | — |" in md    # (0.25 + 0.5) / 2; 0.5
    assert "| 2-4 | oracle | — | — | — | — | — | 0.1 |" in md
    assert md.index("| 2-4 | grpo") < md.index("| 2-4 | oracle")
    assert ub.diagnostics_table(records, list(ub.METHODS)) in ub.build_outputs(
        tmp_path, ["2-4"], list(ub.METHODS))
    header = (tmp_path / "upper_bound.csv").read_text().splitlines()[0]
    assert header.endswith(",reward,frac_reward_zero_std,grad_norm,approx_kl_old,entropy,"
                           "spo/mask_keep_frac")
