"""A run stopped by a real SIGINT and resumed writes the same metrics.jsonl as an uninterrupted run.

CPU, fixed seed, fp32: rewards, losses and every other metric are equal exactly; only the wall
clock fields (time, step_time, generation_share) differ.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAKE_REWARD, ROOT

CLOCK = ("time", "step_time", "generation_share")
RUN = ["--total-steps", "6", "--prompts-per-step", "2", "--num-generations", "2", "--eval-size", "4",
       "--max-completion-length", "8", "--eval-every", "3", "--save-every", "100"]


def rows(run_dir):
    out = []
    for line in open(run_dir / "metrics.jsonl"):
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in CLOCK})
    return out


@pytest.mark.parametrize("script", ["grpo", "dcpo"])
def test_sigint_then_resume_is_exact(script, random_tiny_model_dir, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", FAKE_REWARD, str(ROOT / f"{script}.py"), "--model", str(random_tiny_model_dir), *RUN]
    subprocess.run(cmd + ["--output-dir", str(tmp_path / "straight")], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen(cmd + ["--output-dir", str(tmp_path / "cut")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until step 2 is logged, then interrupt
        runs = list((tmp_path / "cut").glob("*/metrics.jsonl"))
        if runs and sum(1 for _ in open(runs[0])) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]  # 128 + SIGINT, the shell's convention
    (cut,) = list((tmp_path / "cut").iterdir())
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    stopped_at = len(rows(cut)) - 1
    assert stopped_at < 6, "the run was not interrupted"
    assert (cut / "checkpoints" / f"step-{stopped_at:07d}" / "COMPLETE").exists()
    assert summary["steps"] == stopped_at
    assert f"| {stopped_at}/6 [" in err.split("interrupted by SIGINT")[0].split("\r")[-1]  # the bar counts it
    subprocess.run(cmd + ["--resume", str(cut)], check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    (straight,) = list((tmp_path / "straight").iterdir())
    assert rows(cut) == rows(straight)
    assert json.loads((cut / "summary.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------- each resume case, one test each
# In-process runs of grpo.py (common.run_main, as the CLI does) with the alternating fake reward.
SMALL = ["--prompts-per-step", "2", "--num-generations", "2", "--eval-size", "4",
         "--max-completion-length", "8", "--eval-every", "1", "--save-every", "1",
         "--log-completions-every", "1"]


def grpo_run(argv, capsys=None):
    import common
    import grpo
    out = common.run_main(grpo.main, grpo.Args, argv)
    return out, (capsys.readouterr().err if capsys else "")


@pytest.fixture
def fake_reward(monkeypatch):
    import common
    monkeypatch.setattr(common, "reward_fn", lambda c, a: [float(i % 2) for i in range(len(c))])


@pytest.fixture
def straight_and_cut(random_tiny_model_dir, tmp_path, fake_reward):
    """4 steps straight; and the same run stopped after 3 (checkpoints step-2 and step-3 kept)."""
    base = ["--model", str(random_tiny_model_dir), *SMALL]
    grpo_run(base + ["--total-steps", "4", "--output-dir", str(tmp_path / "straight")])
    grpo_run(base + ["--total-steps", "3", "--output-dir", str(tmp_path / "cut")])
    (straight,) = list((tmp_path / "straight").iterdir())
    (cut,) = list((tmp_path / "cut").iterdir())
    kept = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000003"]
    return straight, cut


def resume_bare(cut, capsys, *extra):
    """`--resume RUN --total-steps 4` and nothing else: the other settings come from config.json."""
    return grpo_run(["--resume", str(cut), "--total-steps", "4", *extra], capsys)


def test_bare_resume_takes_the_runs_own_config(straight_and_cut, capsys):
    straight, cut = straight_and_cut
    summary, err = resume_bare(cut, capsys)
    assert rows(cut) == rows(straight)  # with the defaults, prompts_per_step would be 16, not 2
    config = json.loads((cut / "config.json").read_text())
    assert config["prompts_per_step"] == 2 and config["total_steps"] == 3  # the run's own settings
    (record,) = config["resumed"]
    assert record["from_step"] == 3 and record["changed"] == {"total_steps": [3, 4]}
    assert summary["status"] == "finished" and summary["steps"] == 4


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def nan_weights(ckpt):
    """NaN weights, their sha256 written into COMPLETE: only the load-time check sees them."""
    import common
    from safetensors.torch import load_file, save_file
    weights = load_file(ckpt / "model.safetensors")
    next(iter(weights.values())).fill_(float("nan"))
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    marker = json.loads((ckpt / "COMPLETE").read_text())
    marker["sha256"]["model.safetensors"] = common.sha256_file(ckpt / "model.safetensors")
    (ckpt / "COMPLETE").write_text(json.dumps(marker))


@pytest.mark.parametrize("damage,why", [
    (lambda c: truncate(c / "model.safetensors"), "model.safetensors does not match the sha256"),
    (lambda c: truncate(c / "trainer_state.pt"), "trainer_state.pt does not match the sha256"),
    (nan_weights, "non-finite weights"),
    (lambda c: (c / "COMPLETE").unlink(), "partial: no COMPLETE marker"),
])
def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(straight_and_cut, capsys, damage,
                                                                 why):
    straight, cut = straight_and_cut
    damage(cut / "checkpoints" / "step-0000003")
    _, err = resume_bare(cut, capsys)
    notes = [l for l in err.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "step-0000003" in notes[0] and why in notes[0]
    assert "falling back" in notes[0]
    assert "resumed" in err and "from step-0000002" in err
    assert rows(cut) == rows(straight)  # steps 3 and 4 run again, exactly
    assert json.loads((cut / "config.json").read_text())["resumed"][0]["from_step"] == 2


def test_old_checkpoints_without_hashes_still_resume(straight_and_cut, capsys):
    straight, cut = straight_and_cut
    (cut / "checkpoints" / "step-0000003" / "COMPLETE").write_text("3")  # the marker before sha256
    _, err = resume_bare(cut, capsys)
    assert "note:" not in err and rows(cut) == rows(straight)


def test_half_written_lines_are_dropped_and_completions_trimmed(straight_and_cut, capsys):
    straight, cut = straight_and_cut
    import shutil
    shutil.rmtree(cut / "checkpoints" / "step-0000003")  # as if killed before step 3's checkpoint
    with open(cut / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "reward": 0.5, "poli')  # a kill in the middle of a write
    with open(cut / "completions.jsonl", "a") as fh:
        fh.write('{"step": 4, "prompt": "1+1", "completion": "2"')
    resume_bare(cut, capsys)
    assert rows(cut) == rows(straight)
    steps = [json.loads(l)["step"] for l in open(cut / "completions.jsonl")]
    assert steps == [json.loads(l)["step"] for l in open(straight / "completions.jsonl")]
    assert steps == sorted(steps) and steps.count(3) == 2  # step 3 once (its G=2 lines), not twice


def signalled_run(tmp_path, random_tiny_model_dir, prelude, sig=None):
    """A grpo.py subprocess (fake reward); `sig` is sent once step 2 is logged."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    code = prelude + FAKE_REWARD
    cmd = [sys.executable, "-c", code, str(ROOT / "grpo.py"), "--model", str(random_tiny_model_dir),
           *SMALL, "--total-steps", "50", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if sig is not None:
        deadline = time.time() + 240
        while time.time() < deadline:
            runs = list(tmp_path.glob("*/metrics.jsonl"))
            if runs and sum(1 for _ in open(runs[0])) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    (run,) = list(tmp_path.iterdir())
    return proc.returncode, out, err, run


def test_sigterm_exits_143_and_the_summary_says_interrupted(tmp_path, random_tiny_model_dir):
    code, out, err, run = signalled_run(tmp_path, random_tiny_model_dir, "", signal.SIGTERM)
    summary = json.loads((run / "summary.json").read_text())
    assert code == 143, err[-2000:]
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert 2 <= summary["steps"] < 50
    assert (run / "checkpoints" / f"step-{summary['steps']:07d}" / "COMPLETE").exists()
    assert "Traceback" not in err and f"interrupted by SIGTERM at step {summary['steps']}" in out


# Two SIGINTs at once while step 3's trainer state is being written: the first asks for a clean
# stop, the second stops at once, inside the checkpoint write.
SECOND_SIGINT = ("import os, signal, torch\n"
                 "_save = torch.save\n"
                 "def save(obj, path, *a, **k):\n"
                 "    if 'step-0000003' in str(path):\n"
                 "        os.kill(os.getpid(), signal.SIGINT)\n"
                 "        os.kill(os.getpid(), signal.SIGINT)\n"
                 "    return _save(obj, path, *a, **k)\n"
                 "torch.save = save\n")


def test_second_sigint_during_the_checkpoint_write_keeps_the_last_good_one(tmp_path,
                                                                           random_tiny_model_dir):
    import common
    code, out, err, run = signalled_run(tmp_path, random_tiny_model_dir, SECOND_SIGINT)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: second SIGINT: stopped at once") and f"--resume {run}" in last
    kept = [c.name for c in common.checkpoints_newest_first(run)]
    assert kept == ["step-0000002", "step-0000001"]
    assert common.verify_checkpoint(run / "checkpoints" / "step-0000002") is None
    assert not (run / "summary.json").exists()


def test_resume_refuses_a_config_with_a_flag_this_version_lacks(tmp_path):
    """A run made by another version (a flag since renamed) is refused, never resumed with the
    renamed flag's default in place of the run's value."""
    import common
    import grpo

    config = {"algo": "grpo", "seed": 0, "temperature_old": 0.7, "resumed": []}
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = common.parse_args(grpo.Args, ["--resume", str(tmp_path)])
    with pytest.raises(common.UserError, match="--temperature-old"):
        common.resume_args(args, "grpo")


@pytest.mark.parametrize("older_checkpoint", [False, True])
def test_the_best_evaluation_survives_a_resume(older_checkpoint, random_tiny_model_dir, tmp_path,
                                               fake_reward, monkeypatch):
    """summary.json's best accuracy counts the evaluations before a resume: from run.state in the
    checkpoint, or, in a checkpoint written before the best was kept, from metrics.jsonl."""
    import common
    import torch
    evals = iter([0.25, 0.75, 0.5, 0.5, 0.6, 0.5])  # steps 0-3, then 4-5 after the resume
    monkeypatch.setattr(common, "evaluate", lambda *a, **k: next(evals))
    grpo_run(["--model", str(random_tiny_model_dir), *SMALL, "--total-steps", "3",
              "--output-dir", str(tmp_path)])
    (cut,) = list(tmp_path.iterdir())
    ckpt = cut / "checkpoints" / "step-0000003"
    if older_checkpoint:  # as written before best_accuracy/best_step were kept in run.state
        trainer = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        assert (trainer["state"].pop("best_accuracy"), trainer["state"].pop("best_step")) == (0.75, 1)
        torch.save(trainer, ckpt / "trainer_state.pt")
        marker = json.loads((ckpt / "COMPLETE").read_text())
        marker["sha256"]["trainer_state.pt"] = common.sha256_file(ckpt / "trainer_state.pt")
        (ckpt / "COMPLETE").write_text(json.dumps(marker))
    summary, _ = grpo_run(["--resume", str(cut), "--total-steps", "5"])
    assert (summary["best_accuracy"], summary["best_step"]) == (0.75, 1)
    assert (summary["final_accuracy"], summary["steps"]) == (0.5, 5)
