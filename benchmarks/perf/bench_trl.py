"""One training step of grpo.py against one of TRL's GRPOTrainer, for each --betas value.

Ours: _bench.grpo_step, which is grpo.main's loop body section by section (1 rollout with
common.generate, 2 advantages with grpo.compute_advantages, 3 the num_iterations passes with
common.per_token_logps + grpo.grpo_loss + common.optimizer_step, 4 the step's metrics; evaluation,
checkpoints and file writing left out); tests/test_copies.py checks that it trains the weights
exactly as grpo.main's step does.
TRL: a GRPOTrainer built from the same folder, run by `trainer.train()` for num_iterations
optimizer steps per GRPO step; a TrainerCallback reads the clock at the first on_step_begin and
the last on_step_end of each GRPO step (so generation, reward, advantages, the old/ref log-probs,
every pass and optimizer step are inside, and Trainer set-up, logging and saving are outside).
The same callback runs our step between TRL's steps, alternately before and after, so each pair
shares the moment (the pairing of benchmarks/perf/_bench.py).

Made equal on purpose (TRL's defaults differ in the ones marked *):
  model and weights (both loaded from one folder with common.load_model_and_tokenizer),
  prompts (the same token ids, in the same order: tokenised as TRL does, tokenizer(text=...),
  and TRL's shuffle_dataset off; both checked every step), G,
  completion length: exactly L tokens for both (EOS suppressed until L new tokens:
    min_new_tokens = max_new_tokens = L, transformers' MinNewTokensLengthLogitsProcessor;
    TRL gets it through generation_kwargs, ours through model.generation_config, which
    common.generate leaves in force because it does not set min_new_tokens; the
    generated token counts of both sides are checked and reported),
  temperature, top_p 1, top_k 0, num_iterations (mu), beta, epsilon 0.2 both sides,
  *loss_type "grpo" (TRL: "dapo"), scale_rewards "group", micro-batch size
  (TRL: per_device_train_batch_size, gradient_accumulation_steps = B / micro-batch),
  dtype: fp32 weights, forward passes under autocast in --dtype on both sides (TRL: bf16=True),
  *gradient checkpointing off on both sides, or on for both with --gradient-checkpointing
  (TRL: on; grpo.py: off), *optimizer torch AdamW (TRL: fused AdamW where
  available), lr, betas, weight decay 0, max_grad_norm 1, constant schedule,
  the reward: one cheap deterministic function for both (the parity of the
  completion's character codes; a constant reward would make every advantage 0).
Not made equal, because each is how that implementation works: with mu > 1 TRL runs an extra
no-grad forward for the old log-probs (grpo.py takes pass 1's, detached); TRL computes the
entropy on every pass (grpo.py on pass 1 only); TRL's LM head runs chunked with its own fused
log-softmax (grpo.py: common.selective_log_softmax).

Run (TRL lives in its own environment, see benchmarks/perf/requirements-perf.txt; without it the
report says "Skipped" in one line):

    python -m venv --system-site-packages /tmp/trlenv
    /tmp/trlenv/bin/pip install -r benchmarks/perf/requirements-perf.txt
    OMP_NUM_THREADS=2 /tmp/trlenv/bin/python benchmarks/perf/bench_trl.py --quick  # smoke test, CPU
    OMP_NUM_THREADS=2 /tmp/trlenv/bin/python benchmarks/perf/bench_trl.py   # CPU, tiny random model
    python /work/shared/tools/smollm2_to_hf.py /tmp/smollm2            # a real model folder
    /tmp/trlenv/bin/python benchmarks/perf/bench_trl.py --device cuda --model qwen2.5-0.5b-random \\
        --prompts 16 --num-generations 8 --completion-length 256                  # GPU
    /tmp/trlenv/bin/python benchmarks/perf/bench_trl.py --device cuda --model /tmp/smollm2 \\
        --prompts 16 --num-generations 8 --completion-length 256                  # GPU, SmolLM2

The report is printed and written, with the raw timings as JSON, to --out (runs/bench_trl/).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from _bench import (PeakMemory, free_memory, fmt_mib, fmt_ratio, fmt_t, grpo_step, make_policy, now,
                    parity_reward, temp_dir, Bench, EPSILON, LEARNING_RATE)  # noqa: E402


def part_trl(b: Bench) -> None:
    rep = b.report
    rep.append("## One GRPO step: grpo.py against TRL's GRPOTrainer\n")
    try:
        import trl
        from datasets import Dataset  # noqa: F401  (TRL needs it; checked here for a clear message)
    except ImportError as e:
        rep.append(f"Skipped: {e}. Install TRL in its own environment "
                   "(benchmarks/perf/requirements-perf.txt) and run this script with that "
                   "environment's python.\n")
        return
    rows, raw = [], {}
    for beta in b.args.betas:
        r = trl_pair(b, beta)
        raw[f"beta={beta}"] = r
        rows.append(r)
        free_memory(b.device)
    b.raw["trl"] = raw
    B = b.P * b.G
    rep.append(f"trl {trl.__version__}; P = {b.P} prompts x G = {b.G} = {B} completions of exactly "
               f"L = {b.L} tokens, mu = {b.mu} passes, micro-batch {b.mbs}, "
               f"{str(b.dtype).replace('torch.', '')}, "
               f"{b.args.repeats} paired steps after {b.args.warmup} warm-up.\n")
    rep.append("| beta | grpo.py step | TRL step | grpo.py / TRL, paired (< 1: grpo.py faster) "
               "| peak memory grpo.py | peak memory TRL "
               "| tokens generated per step, grpo.py / TRL |")
    rep.append("|---|---|---|---|---|---|---|")
    for r in rows:
        tok = (f"{r['tokens_ours']} / {r['tokens_trl']}"
               + ("" if r["tokens_equal"] else " (DIFFERENT)"))
        tok += "" if r["same_prompts"] else "; PROMPTS DIFFER"
        rep.append(f"| {r['beta']} | {fmt_t(r['ours_s'])} | {fmt_t(r['trl_s'])} | "
                   f"{fmt_ratio(r['ratio'])} | {fmt_mib(r['peak_ours'])} | "
                   f"{fmt_mib(r['peak_trl'])} | {tok} |")
    rep.append("")
    rep.append("Peak memory: tensor bytes allocated during the step above what existed before it "
               "(weights, optimizer state and reference model, the same on both sides, are not in "
               "it); "
               + ("the largest over the timed steps (torch.cuda.max_memory_allocated)."
                  if b.device.type == "cuda"
                  else "one extra, untimed step under the profiler's allocation events.")
               + " Both sides got the same prompts in the same order (checked every step) and "
               "generated exactly B x L tokens (checked every step; a difference is flagged in the "
               "table).")
    if b.mu > 1:
        rep.append(f"With mu = {b.mu} > 1, TRL runs one extra no-grad forward per step for the old "
                   "log-probs (grpo.py takes pass 1's); TRL also computes the entropy on every "
                   "pass. Both are part of TRL's step as it is.")
    rep.append("")


def trl_pair(b: Bench, beta: float) -> dict:
    """TRL's trainer.train() drives the steps; a callback times each GRPO step (mu optimizer
    steps) and runs ours in between, alternately right before and right after TRL's."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    a, device, mu, B = b.args, b.device, b.mu, b.P * b.G
    if B % b.mbs:
        raise SystemExit(f"error: the batch ({B}) must be a multiple of --micro-batch-size "
                         f"({b.mbs})")
    cpu_profile = device.type == "cpu"  # CPU memory: one extra, untimed, profiled step per side
    blocks = a.warmup + a.repeats + (1 if cpu_profile else 0)
    last = blocks - 1
    timed = range(a.warmup, a.warmup + a.repeats)

    ours = make_policy(b, beta, fixed_length=True)
    res = {"beta": beta, "ours": {}, "trl": {}, "peak_ours": {}, "peak_trl": {}, "tok_ours": {},
           "tok_trl": [], "prompts_trl": []}

    def run_ours(k: int) -> None:
        rows, _ = b.rows(k)
        mem = PeakMemory(device, enabled=device.type == "cuda" or k == last)
        mem.start()
        t0 = now(device)
        out = grpo_step(b, ours, rows, beta)
        res["ours"][k] = now(device) - t0
        res["peak_ours"][k] = mem.stop()
        res["tok_ours"][k] = out["tokens"]

    class PairedClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % mu:
                return
            k = state.global_step // mu
            if k % 2 == 1:
                run_ours(k)
            self.mem = PeakMemory(device, enabled=device.type == "cuda" or k == last)
            self.mem.start()
            self.t0 = now(device)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % mu:
                return
            k = state.global_step // mu - 1
            res["trl"][k] = now(device) - self.t0
            res["peak_trl"][k] = self.mem.stop()
            if k % 2 == 0:
                run_ours(k)

    def parity(prompts, completions, completion_ids, **kwargs):  # TRL calls it once per generation
        res["tok_trl"].append(sum(len(c) for c in completion_ids))
        res["prompts_trl"].append(list(prompts[::b.G]))
        return parity_reward(completions)

    # block k's prompts are rows(k): the dataset holds them in order, read without shuffling
    texts = [b.prompt_texts[(k * b.P + j) % len(b.prompt_texts)]
             for k in range(blocks) for j in range(b.P)]
    config = GRPOConfig(
        output_dir=temp_dir("bench_trl_"), max_steps=mu * blocks, seed=a.seed,
        per_device_train_batch_size=b.mbs, gradient_accumulation_steps=B // b.mbs,
        num_generations=b.G, max_completion_length=b.L, generation_kwargs={"min_new_tokens": b.L},
        temperature=a.temperature, top_p=1.0, top_k=0, num_iterations=mu, beta=beta,
        epsilon=EPSILON, epsilon_high=EPSILON, loss_type="grpo", scale_rewards="group",
        shuffle_dataset=False, bf16=b.dtype == torch.bfloat16, fp16=False,
        gradient_checkpointing=a.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch",
        learning_rate=LEARNING_RATE, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**9,
        save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        use_cpu=device.type == "cpu", dataloader_pin_memory=False)
    trainer = GRPOTrainer(model=b.load(), reward_funcs=[parity], args=config,
                          train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
                          processing_class=b.tokenizer, callbacks=[PairedClock()])
    trainer.train()
    if not len(res["trl"]) == len(res["ours"]) == len(res["tok_trl"]) == blocks:
        raise RuntimeError(f"expected {blocks} GRPO steps (one generation each) per side; got TRL "
                           f"{len(res['trl'])} steps, {len(res['tok_trl'])} generations, ours "
                           f"{len(res['ours'])} steps")
    same_prompts = all(res["prompts_trl"][k] == texts[k * b.P:(k + 1) * b.P] for k in range(blocks))

    peak_k = [last] if cpu_profile else list(timed)
    out = {"beta": beta,
           "ours_s": [res["ours"][k] for k in timed], "trl_s": [res["trl"][k] for k in timed],
           "ratio": [res["ours"][k] / res["trl"][k] for k in timed],
           "peak_ours": max(res["peak_ours"][k] for k in peak_k),
           "peak_trl": max(res["peak_trl"][k] for k in peak_k),
           "tokens_ours": res["tok_ours"][a.warmup],
           "tokens_trl": res["tok_trl"][a.warmup] if res["tok_trl"] else None}
    out["tokens_equal"] = (all(t == B * b.L for t in res["tok_ours"].values())
                           and all(t == B * b.L for t in res["tok_trl"]))
    out["same_prompts"] = same_prompts
    return out

def main(argv=None) -> None:
    p = _bench.arg_parser(__doc__, "runs/bench_trl")
    args = _bench.parse_args(argv, p)
    b = _bench.start(args, "bench_trl: one grpo.py step against one TRL GRPOTrainer step")
    part_trl(b)
    _bench.write_report(b.report, b.raw, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
