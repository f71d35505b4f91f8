"""Shared fixtures. Everything here runs on a CPU in seconds, offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# With TRL installed, `datasets` is importable: no test may reach the hub.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
torch.set_num_threads(min(2, torch.get_num_threads()))

import common  # noqa: E402


@pytest.fixture(scope="session")
def random_tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model + char tokenizer saved like any HF model (no warm start)."""
    path = tmp_path_factory.mktemp("random_tiny")
    torch.manual_seed(0)
    tok = common.build_char_tokenizer()
    model = common.build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def warm_tiny_model_dir() -> Path:
    """The embedded warm-started model (built once and cached, as `python grpo.py` does)."""
    return common.ensure_tiny_model(seed=0, quiet=True)


# A random model never answers right, so every advantage would be 0 and nothing would train.
# With fake_reward the script runs exactly as `python script.py ...` does, with a reward that
# alternates 0, 1 by position (so every group has a spread).
FAKE_REWARD = ("import runpy, sys, common\n"
               "common.reward_fn = lambda completions, answers: [float(i % 2) for i in range(len(completions))]\n"
               "sys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")


# The shared settings whose meaning differs in token_dpo.py, so whose name does too.
RENAMED_IN_TOKEN_DPO = {"prompts_per_step": "pairs_per_step",
                        "temperature": "sampling_temperature"}


def field_name(script: str, name: str) -> str:
    """A shared setting's Args field in `script` (token_dpo.py renames two of them)."""
    return RENAMED_IN_TOKEN_DPO.get(name, name) if script == "token_dpo" else name


def flag_name(script: str, name: str) -> str:
    """The command-line flag of a shared setting in `script`: "--" + its field, dashed."""
    return "--" + field_name(script, name).replace("_", "-")


def batch_flag(script: str) -> str:
    """The flag of a step's batch: prompts per rollout batch in the RL scripts, pairs per
    optimizer step in token_dpo.py (another meaning, so another name)."""
    return flag_name(script, "prompts_per_step")


def run_script(script, *argv, timeout=300, fake_reward=False):
    """`python {script}.py argv` in a subprocess (2 threads), output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    prefix = [sys.executable, "-c", FAKE_REWARD] if fake_reward else [sys.executable]
    return subprocess.run([*prefix, str(ROOT / f"{script}.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def run_grpo_main(tmp_path, model_dir, monkeypatch, reward, *extra, steps=2, prompts=2,
                  micro_batch=3):
    """grpo.main in this process on `model_dir`, with `reward` (completions, answers) -> floats
    in place of the verifier; returns (metrics rows, the policy it trained)."""
    import grpo

    monkeypatch.setattr(common, "reward_fn", reward)
    models = []
    load = common.load_model_and_tokenizer
    monkeypatch.setattr(common, "load_model_and_tokenizer",
                        lambda *a, **k: models.append(load(*a, **k)) or models[-1])
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    summary = common.run_main(grpo.main, grpo.Args, [
        "--model", str(model_dir), "--total-steps", str(steps), "--prompts-per-step",
        str(prompts), "--num-generations", "4", "--eval-size", "1", "--max-completion-length",
        "8", "--micro-batch-size", str(micro_batch), "--device", "cpu", "--output-dir", str(out),
        *extra])
    rows = [json.loads(line) for line in open(Path(summary["run_dir"]) / "metrics.jsonl")]
    return rows, models[0][0]
