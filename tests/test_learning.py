"""A short learning test: a few dozen GRPO steps from the warm start raise the train reward.

The seed is fixed and CPU kernels are deterministic, so this is not flaky on one machine; the
margin is wide so that another CPU's float rounding does not flip it either.
"""
import json

import common
import grpo


def test_grpo_raises_train_reward(warm_tiny_model_dir, tmp_path):
    common.run_main(grpo.main, grpo.Args, ["--total-steps", "30", "--eval-every", "1000", "--eval-size", "100",
                                           "--save-every", "1000", "--output-dir", str(tmp_path), "--seed", "0"])
    (run_dir,) = list(tmp_path.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl") if '"reward"' in l]
    first = sum(r["reward"] for r in rows[:8]) / 8
    last = sum(r["reward"] for r in rows[-8:]) / 8
    assert last > first + 0.05, (first, last)
