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
    assert proc.returncode == 0, err[-2000:]
    (cut,) = list((tmp_path / "cut").iterdir())
    stopped_at = len(rows(cut)) - 1
    assert stopped_at < 6, "the run was not interrupted"
    assert (cut / "checkpoints" / f"step-{stopped_at:07d}" / "COMPLETE").exists()
    subprocess.run(cmd + ["--resume", str(cut)], check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    (straight,) = list((tmp_path / "straight").iterdir())
    assert rows(cut) == rows(straight)
