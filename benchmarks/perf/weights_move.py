"""Do the weights really move? A few grpo.py steps in bf16 compute and in fp32, from one start.

    python benchmarks/perf/weights_move.py --model /tmp/smollm2 --task gsm8k \
        --data-dir ../shared/data/gsm8k --device cuda             # the GPU check (gpu_check.sh)
    python benchmarks/perf/weights_move.py --device cpu --steps 2       # its plumbing, tiny model

For each --dtype (bfloat16, then float32) it runs grpo.py's main for --steps rollout steps at
lr 1e-6 (the hub default) and compares the checkpoint with the start: the share of weights that
changed and the mean |dw|. AdamW's first steps move each weight by about lr a step, so the mean
|dw| of a run that trains is a sizeable fraction of steps * num_iterations * lr; weights stored
in bf16 would move in under 5% of places (tests/test_precision.py). Also reports the median step
time (metrics.jsonl) and, on a GPU, the peak memory torch allocated.

The reward is replaced by 1 for every other completion, so every group has a spread and every
step a gradient, whatever the model's accuracy (SmolLM2-135M solves almost no GSM8K problem):
this measures whether the weights move, not whether the model learns.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import common  # noqa: E402
import grpo  # noqa: E402


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(args, dtype: str, out: Path, start: dict[str, torch.Tensor]) -> dict:
    device = common.resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    argv = ["--model", args.model, "--task", args.task, "--device", args.device, "--dtype", dtype,
            "--learning-rate", str(args.learning_rate), "--total-steps", str(args.steps),
            "--eval-every", str(10**6), "--eval-size", "1", "--prompts-per-step",
            str(args.prompts_per_step), "--max-completion-length", str(args.max_completion_length),
            "--micro-batch-size", str(args.micro_batch_size), "--output-dir", str(out)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    common.run_main(grpo.main, grpo.Args, argv)
    (run_dir,) = list(out.iterdir())
    (ckpt,) = list((run_dir / "checkpoints").glob("step-*"))
    after = weights(ckpt)
    delta = torch.cat([(after[k] - start[k]).abs().flatten() for k in start])
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    times = [r["step_time"] for r in rows if "step_time" in r]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"dtype": dtype, "moved_frac": (delta > 0).float().mean().item(),
            "mean_abs_dw": delta.mean().item(), "median_step_s": statistics.median(times),
            "peak_alloc_gib": peak, "reward": statistics.mean(r["reward"] for r in rows
                                                             if "reward" in r)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="as grpo.py's --model (default: tiny)")
    p.add_argument("--task", default="arith", choices=["arith", "gsm8k"])
    p.add_argument("--data-dir", default=None, help="GSM8K folder (with --task gsm8k)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=3, help="rollout steps per run (default 3)")
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    args = p.parse_args()
    common.reward_fn = lambda completions, answers: [float(i % 2) for i in range(len(completions))]
    model = str(common.ensure_tiny_model()) if args.model == common.TINY else args.model
    start = weights(Path(model))
    args.model = model
    expected = args.steps * grpo.Args().num_iterations * args.learning_rate
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bfloat16", "float32"):
            results.append(run(args, dtype, Path(tmp) / dtype, start))
    for r in results:
        peak = "" if r["peak_alloc_gib"] is None else f", peak allocated {r['peak_alloc_gib']:.2f} GiB"
        print(f"weights_move {r['dtype']}: {100 * r['moved_frac']:.2f}% of weights moved, mean "
              f"|dw| {r['mean_abs_dw']:.3g} ({r['mean_abs_dw'] / expected:.2f} x steps * passes * "
              f"lr = {expected:.3g}), median step {r['median_step_s']:.2f} s{peak}, "
              f"mean reward {r['reward']:.3f}")
    ratio = results[0]["mean_abs_dw"] / max(results[1]["mean_abs_dw"], 1e-30)
    print(f"weights_move bf16 / fp32 mean |dw| = {ratio:.2f} (1 = bf16 compute loses nothing)")


if __name__ == "__main__":
    main()
