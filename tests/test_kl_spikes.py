"""benchmarks/kl_spikes.py: replays grpo.py and names the tokens whose log-prob moved most."""
import subprocess
import sys

from conftest import ROOT


def test_kl_spikes_prints_the_moved_tokens_of_a_real_run(warm_tiny_model_dir, tmp_path):
    # a large learning rate moves some tokens by more than half a nat in one update
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kl_spikes.py"), "--nats", "0.5", "--",
                          "--model", str(warm_tiny_model_dir), "--total-steps", "1", "--prompts-per-step", "4",
                          "--learning-rate", "1e-3",
                          "--eval-every", "1", "--eval-size", "4", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("step 1: token ")]
    assert lines and all("after one update, advantage" in line and " -> " in line for line in lines)
