"""End-to-end: the scripts as a user runs them (subprocess), --help, and bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import grpo
from conftest import ROOT, run_script

SCRIPTS = [s for s in ("grpo", "tempo", "dcpo", "spo", "token_dpo") if (ROOT / f"{s}.py").exists()]
TINY_RUN = ["--total-steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--eval-size", "4",
            "--max-completion-length", "8", "--eval-every", "1", "--log-completions-every", "1"]


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
    out = run_script(script, "--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path), *TINY_RUN,
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


def _bad(capsys, argv):
    with pytest.raises(SystemExit) as e:
        common.run_main(grpo.main, grpo.Args, argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1]


def test_bad_inputs(capsys, random_tiny_model_dir, tmp_path):
    m = ["--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path)]
    code, line = _bad(capsys, ["--model", "./no/such/model"])
    assert code == 2 and "does not exist" in line and "--model" in line
    code, line = _bad(capsys, m + ["--num-generations", "1"])
    assert code == 2 and "--num-generations must be at least 2" in line
    code, line = _bad(capsys, m + ["--prompts-per-step", "0"])
    assert code == 2 and "--prompts-per-step must be positive" in line
    code, line = _bad(capsys, m + ["--micro-batch-size", "-1"])
    assert code == 2 and "--micro-batch-size must be positive" in line
    code, line = _bad(capsys, m + ["--max-completion-length", "300"])  # tiny context is 256
    assert code == 2 and "exceeds the model's context" in line and "--max-completion-length" in line
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("")
    (tmp_path / "empty" / "test.jsonl").write_text("")
    code, line = _bad(capsys, m + ["--task", "gsm8k", "--data-dir", str(tmp_path / "empty")])
    assert code == 2 and "holds no examples" in line
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.jsonl").write_text("{not json\n")
    code, line = _bad(capsys, m + ["--task", "gsm8k", "--data-dir", str(tmp_path / "broken")])
    assert code == 2 and "is not a GSM8K record" in line
    code, line = _bad(capsys, m + ["--loss-type", "nope"])
    assert code == 2 and "invalid choice" in line
    code, line = _bad(capsys, m + ["--resume", str(tmp_path / "empty")])
    assert code == 2 and "is not a run folder" in line
