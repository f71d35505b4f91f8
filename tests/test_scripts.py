"""End-to-end: the scripts as a user runs them (subprocess), --help, and bad input."""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import grpo
from conftest import ROOT, batch_flag, run_script

SCRIPTS = [s for s in ("grpo", "tempo", "dcpo", "spo", "token_dpo") if (ROOT / f"{s}.py").exists()]
TINY_FLAGS = ["--total-steps", "2", "--num-generations", "2", "--eval-size", "4",
              "--max-completion-length", "8", "--eval-every", "1", "--log-completions-every", "1"]


def tiny_run(script):
    return [*TINY_FLAGS, batch_flag(script), "2"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag(script):
    out = run_script(script, "--help")
    assert out.returncode == 0, out.stderr
    mod = __import__(script)
    import dataclasses
    for f in dataclasses.fields(mod.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out.stdout, f"{flag} missing from --help"
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert out.stdout.count("(default:") >= len(dataclasses.fields(mod.Args))


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "token_dpo"])
def test_two_steps_end_to_end(script, random_tiny_model_dir, tmp_path):
    out = run_script(script, "--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path), *tiny_run(script),
                     fake_reward=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list(tmp_path.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward", "policy_loss", "grad_norm", "completions/mean_length", "eval/accuracy", "entropy"):
        assert key in rows[1], key
    assert json.loads((run_dir / "config.json").read_text())["algo"] == script
    assert (run_dir / "completions.jsonl").read_text().strip()
    # parameters changed, and the checkpoint loads with from_pretrained
    ckpt = run_dir / "checkpoints" / "step-0000002"
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))
    assert "held-out greedy accuracy" in out.stdout and str(run_dir) in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_summary_gives_the_last_and_the_best_evaluation(script, random_tiny_model_dir, tmp_path,
                                                            monkeypatch, capsys):
    """The last line: start -> last accuracy, the best with its step, "1 step" or "3 steps"; the
    same in summary.json, beside the keys benchmarks/compare.py reads (issue 26, items 2d, 2e)."""
    import re
    mod = __import__(script)
    argv = ["--model", str(random_tiny_model_dir), *tiny_run(script), "--save-every", "100"]
    for steps, accs, words in [
            (3, [0.25, 0.5, 0.75, 0.5], "0.250 -> 0.500 (+25.0 pts; best 0.750 at step 2) in 3 steps"),
            (1, [0.5, 0.25], "0.500 -> 0.250 (-25.0 pts; best 0.500 at step 0) in 1 step")]:
        evals = iter(accs)  # step 0 (the start), then every step (--eval-every 1)
        monkeypatch.setattr(common, "evaluate", lambda *a, **k: next(evals))
        out = tmp_path / str(steps)
        summary = common.run_main(mod.main, mod.Args, [*argv, "--total-steps", str(steps),
                                                       "--output-dir", str(out)])
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert re.fullmatch(rf"{script}: held-out greedy accuracy {re.escape(words)}, \d+s; "
                            rf"saved to {re.escape(summary['run_dir'])}", last), last
        assert json.loads((out / Path(summary["run_dir"]).name / "summary.json").read_text()) == summary
        best = max(accs)
        assert {k: summary[k] for k in ("start_accuracy", "final_accuracy", "best_accuracy",
                                        "best_step", "steps", "status")} == {
            "start_accuracy": accs[0], "final_accuracy": accs[-1], "best_accuracy": best,
            "best_step": accs.index(best), "steps": steps, "status": "finished"}
        assert {"algo", "wall_time_s", "run_dir"} <= set(summary)


def _bad(capsys, script, argv):
    mod = __import__(script)
    with pytest.raises(SystemExit) as e:
        common.run_main(mod.main, mod.Args, argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1]


# One bad input of each kind, per script, with the words the user sees (README, "Bad input").
UNKNOWN_CHOICE = {"grpo": "--loss-type", "tempo": "--loss-type", "dcpo": "--loss-type", "spo": "--variant",
                  "token_dpo": "--loss"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_inputs(script, capsys, random_tiny_model_dir, tmp_path, monkeypatch):
    m = ["--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path)]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as without the optional `datasets` (else: the hub)
    code, line = _bad(capsys, script, ["--model", "./no/such/model"])
    assert code == 2 and "does not exist" in line and "--model" in line
    code, line = _bad(capsys, script, m + ["--num-generations", "1"])
    assert code == 2 and "--num-generations must be at least 2" in line
    code, line = _bad(capsys, script, m + [batch_flag(script), "0"])
    assert code == 2 and f"{batch_flag(script)} must be positive" in line
    code, line = _bad(capsys, script, m + ["--micro-batch-size", "-1"])
    assert code == 2 and "--micro-batch-size must be positive" in line
    code, line = _bad(capsys, script, m + ["--max-completion-length", "300"])  # tiny context is 256
    assert code == 2 and "exceeds the model's context" in line and "--max-completion-length" in line
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("")
    (tmp_path / "empty" / "test.jsonl").write_text("")
    code, line = _bad(capsys, script, m + ["--task", "gsm8k", "--data-dir", str(tmp_path / "empty")])
    assert code == 2 and "holds no examples" in line
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.jsonl").write_text("{not json\n")
    code, line = _bad(capsys, script, m + ["--task", "gsm8k", "--data-dir", str(tmp_path / "broken")])
    assert code == 2 and "is not a GSM8K record" in line
    code, line = _bad(capsys, script, m + ["--task", "gsm8k", "--data-dir", str(tmp_path / "missing")])
    assert code == 2 and "not found" in line
    code, line = _bad(capsys, script, m + [UNKNOWN_CHOICE[script], "nope"])
    assert code == 2 and "invalid choice" in line
    code, line = _bad(capsys, script, m + ["--resume", str(tmp_path / "empty")])
    assert code == 2 and "is not a run folder" in line


# After the 4th optimizer update (2 per step with num_iterations 2), every gradient norm is NaN.
NAN_FROM_STEP_3 = ("import runpy, sys, torch, common\n"
                   "common.reward_fn = lambda completions, answers: [float(i % 2) for i in range(len(completions))]\n"
                   "_clip, calls = torch.nn.utils.clip_grad_norm_, [0]\n"
                   "def clip(params, max_norm):\n"
                   "    calls[0] += 1\n"
                   "    norm = _clip(params, max_norm)\n"
                   "    return norm if calls[0] <= 4 else torch.tensor(float('nan'))\n"
                   "torch.nn.utils.clip_grad_norm_ = clip\n"
                   "sys.argv = sys.argv[1:]\n"
                   "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(random_tiny_model_dir, tmp_path):
    import subprocess
    import sys
    argv = ["--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path), *tiny_run("grpo"),
            "--total-steps", "8", "--save-every", "2", "--eval-every", "100", "--max-bad-steps", "3"]
    out = subprocess.run([sys.executable, "-c", NAN_FROM_STEP_3, str(ROOT / "grpo.py"), *argv],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 3, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: 3 steps in a row had a non-finite loss or gradient (step 5)"), last
    assert "step-0000004" in last and "--max-bad-steps" in last
    (run_dir,) = list(tmp_path.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]            # every step is logged, the bad ones too
    assert [r["skipped_updates"] for r in rows[1:]] == [0, 0, 2, 2, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-0000004")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # and skipped steps left the weights as they were after step 2
    at2 = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-0000002")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), at2.parameters()))
    # --max-bad-steps 0 never stops
    out = subprocess.run([sys.executable, "-c", NAN_FROM_STEP_3, str(ROOT / "grpo.py"), *argv[:-1], "0",
                          "--output-dir", str(tmp_path / "never")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("script", ["grpo", "token_dpo"])
def test_gradient_checkpointing_flag_runs(script, random_tiny_model_dir, tmp_path):
    out = run_script(script, "--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path), *tiny_run(script),
                     "--gradient-checkpointing", fake_reward=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out greedy accuracy" in out.stdout
