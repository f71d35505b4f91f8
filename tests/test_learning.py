"""A short learning test: 40 GRPO steps from the warm start raise the reward on training prompts.

The reward is measured greedily on a fixed set of 100 training prompts, before and after (the
sampled reward at T = 1 is too noisy to compare over a few dozen steps). The seed is fixed and
CPU kernels are deterministic, so this is not flaky on one machine; the margin is wide so that
another CPU's float rounding does not flip it either. (From the shipped start, held-out accuracy
moves little in the first 20 steps and rises between 20 and 40: benchmarks/run_defaults.sh.)
"""
import json

import torch

import common
import grpo


def test_grpo_raises_train_reward(warm_tiny_model_dir, tmp_path):
    train = common.arith_dataset("train")[:100]
    model, tok = common.load_model_and_tokenizer(str(warm_tiny_model_dir), torch.device("cpu"), torch.float32)
    before = common.evaluate(model, tok, train, "arith", max_new_tokens=48)
    common.run_main(grpo.main, grpo.Args, ["--total-steps", "40", "--eval-every", "40", "--eval-size", "100",
                                           "--output-dir", str(tmp_path), "--seed", "0"])
    (run_dir,) = list(tmp_path.iterdir())
    model, tok = common.load_model_and_tokenizer(str(run_dir / "checkpoints" / "step-0000040"), torch.device("cpu"),
                                                 torch.float32)
    after = common.evaluate(model, tok, train, "arith", max_new_tokens=48)
    assert after > before + 0.05, (before, after)
    evals = [json.loads(l)["eval/accuracy"] for l in open(run_dir / "metrics.jsonl") if "eval/accuracy" in l]
    assert evals[-1] > evals[0], evals  # held-out greedy accuracy rose too
