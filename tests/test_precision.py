"""Mixed precision: fp32 master weights, forward passes in the compute dtype (common.autocast).

The test that would have caught bf16 master weights: in every script, one optimizer step with
--dtype bfloat16 at lr 1e-6 must move (nearly) every weight, by about as much as the same step
in fp32. AdamW's first step moves each weight by about lr, far below the spacing of bf16 near
0.02 (1.2e-4), so a bf16 weight would keep its value and the run would learn nothing.
Runs on the CPU (bf16 there is emulated where the CPU lacks it: slow, but the tiny model is).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import batch_flag

SCRIPTS = ["grpo", "tempo", "dcpo", "spo", "token_dpo"]
ONE_STEP = {"token_dpo": ["--prompts-per-round", "8", "--num-generations", "4"],
            "spo": ["--num-rollouts", "2", "--num-iterations", "1", "--num-generations", "4"]}


def one_step(script: str, dtype: str, out) -> dict[str, torch.Tensor]:
    """The weights after one optimizer step of `script` with --dtype `dtype`, lr 1e-6."""
    mod = __import__(script)
    extra = ONE_STEP.get(script, ["--num-iterations", "1", "--num-generations", "4"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common.run_main(mod.main, mod.Args, [
            "--model", "tiny", "--dtype", dtype, "--learning-rate", "1e-6", "--total-steps", "1",
            batch_flag(script), "8", "--eval-size", "1", "--max-completion-length", "40",
            "--output-dir", str(out), *extra])
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = list(out.iterdir())
    (ckpt,) = list((run_dir / "checkpoints").glob("step-*"))
    return load_file(ckpt / "model.safetensors")


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_bf16_step_moves_the_weights_as_an_fp32_step_does(script, tmp_path):
    start = load_file(common.ensure_tiny_model(seed=0) / "model.safetensors")
    moved, mean = {}, {}
    for dtype in ("float32", "bfloat16"):
        after = one_step(script, dtype, tmp_path / dtype)
        assert all(t.dtype == torch.float32 for t in after.values())  # checkpoints hold fp32
        delta = torch.cat([(after[k] - start[k]).abs().flatten() for k in start])
        moved[dtype], mean[dtype] = (delta > 0).float().mean().item(), delta.mean().item()
    assert moved["float32"] >= 0.99, moved  # the reference step itself trains every weight
    assert moved["bfloat16"] >= 0.99, moved
    assert 1 / 1.5 <= mean["bfloat16"] / mean["float32"] <= 1.5, mean


def test_bf16_weights_would_round_the_update_away():
    """Why the policy is fp32: the same AdamW step on bf16 weights leaves most of them as they
    were (this is what the scripts did before), while the fp32 step moves all of them."""
    torch.manual_seed(0)
    w = torch.randn(100_000) * 0.02
    g = torch.randn(100_000)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(w.to(dtype, copy=True))
        opt = torch.optim.AdamW([p], lr=1e-6, weight_decay=0.0)
        p.grad = g.to(dtype)
        opt.step()
        moved[dtype] = (p.detach().float() != w.to(dtype).float()).float().mean().item()
    assert moved[torch.float32] > 0.999 and moved[torch.bfloat16] < 0.05, moved


def test_autocast_computes_in_bf16_on_fp32_weights_and_fp32_is_a_no_op():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with common.autocast(torch.device("cpu"), torch.bfloat16)():
        assert lin(x).dtype == torch.bfloat16
    assert lin.weight.dtype == torch.float32
    with common.autocast(torch.device("cpu"), torch.float32)():
        assert lin(x).dtype == torch.float32


def test_auto_is_fp32_on_a_cpu():
    assert common.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert common.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_frozen_models_are_stored_in_the_compute_dtype_and_the_policy_in_fp32(tmp_path,
                                                                             monkeypatch):
    """grpo with beta > 0 loads a reference: bf16 under --dtype bfloat16, the policy fp32.
    TW-GRPO's own no-grad pass (hidden states, then the LM head a chunk at a time) runs too."""
    import grpo

    seen, real = {}, common.load_frozen

    def spy(*a, **k):
        model = real(*a, **k)
        seen["ref"] = next(model.parameters()).dtype
        return model

    monkeypatch.setattr(common, "load_frozen", spy)
    common.run_main(grpo.main, grpo.Args, [
        "--dtype", "bfloat16", "--beta", "0.04", "--token-weighting", "tw", "--total-steps", "1",
        "--eval-size", "1", "--prompts-per-step", "2", "--num-generations", "2",
        "--num-iterations", "1", "--max-completion-length", "8", "--output-dir", str(tmp_path)])
    assert seen["ref"] == torch.bfloat16
    (run_dir,) = list(tmp_path.iterdir())
    config = json.loads(next((run_dir / "checkpoints").glob("step-*")).joinpath(
        "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
