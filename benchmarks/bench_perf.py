"""Performance of grpo.py: side by side with TRL's GRPOTrainer, and against the machine's own limit.

Four parts, each chosen with --parts (default: all four). Every number is a median with its
spread (min-max) over --repeats runs after --warmup runs, and every comparison is PAIRED: the
things compared run alternately in the same process, on the same model and the same prompts,
so a machine that slows down or speeds up during the run moves both sides alike.

  trl       One training step of grpo.py against one of TRL's GRPOTrainer, for each --betas value.
            Ours: `grpo_step` below, which is grpo.main's loop body copied section by section
            (1 rollout with common.generate, 2 advantages with grpo.compute_advantages, 3 the
            num_iterations passes with common.per_token_logps + grpo.grpo_loss + common.optimizer_step,
            4 the step's metrics; evaluation, checkpoints and file writing left out). If grpo.main
            changes, change grpo_step with it.
            TRL: a GRPOTrainer built from the same folder, run by `trainer.train()` for
            num_iterations optimizer steps per GRPO step; a TrainerCallback reads the clock at the
            first on_step_begin and the last on_step_end of each GRPO step (so generation, reward,
            advantages, the old/ref log-probs, every pass and optimizer step are inside, and
            Trainer set-up, logging and saving are outside). The same callback runs our step
            between TRL's steps, alternately before and after, so each pair shares the moment.
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
              *dtype: the weights' dtype with no autocast on either side (TRL: bf16 autocast),
              *gradient checkpointing off on both sides, or on for both with --gradient-checkpointing
              (TRL: on; grpo.py: off), *optimizer torch AdamW (TRL: fused AdamW where
              available), lr, betas, weight decay 0, max_grad_norm 1, constant schedule,
              the reward: one cheap deterministic function for both (the parity of the
              completion's character codes; a constant reward would make every advantage 0).
            Not made equal, because each is how that implementation works: with mu > 1 TRL runs
            an extra no-grad forward for the old log-probs (grpo.py takes pass 1's, detached);
            TRL computes the entropy on every pass (grpo.py on pass 1 only); TRL's LM head runs
            chunked with its own fused log-softmax (grpo.py: common.selective_log_softmax).
  overhead  grpo.py against the machine: in one process, timed alone, (a) the batched generation,
            (b) one forward+backward of the policy over the whole batch (completion log-probs and a
            trivial loss), (c) the reference forward when beta > 0, (d) the optimizer step (shown,
            not in the goal), then the full step. Reported: full / (a + mu*b + c), goal <= 1.15, a
            per-section breakdown of one step, and, when above the goal, the torch.profiler table
            of one full step (top ops by self time). Then generation itself: a profile per
            generated token (aten ops, their kernel time, the top ops), and common.generate paired
            with two ways around generate()'s overhead (a static KV cache, a hand-written loop).
  logps     Peak memory and time of common.selective_log_softmax against the naive
            torch.log_softmax(logits.float(), -1).gather(...), forward and backward, on random
            logits of --logps-shape (default 8 x 256 x 49,152: SmolLM2's vocabulary), in fp32 and
            bf16, with the largest difference of the values and of the gradients. Goal: <= 0.5 x
            the naive peak.
  methods   What each method adds to a GRPO step, from the scripts' own functions on one batch
            sampled by the model (its natural lengths): TEMPO's prefix tree and advantages, DCPO's
            SAS statistics and its loss, SPO-chain's old-log-prob forward, segment planning and
            Monte Carlo continuations (with the extra tokens generated), and TDPO2's full-vocabulary
            KL against DPO on pairs made from the batch.

Memory: "peak" is the most tensor bytes allocated during the measured code and alive at once,
above what was allocated when it started (weights, optimizer state and the reference model are
there before and are equal for both sides by construction). On CUDA: torch.cuda.max_memory_allocated.
On CPU: the torch profiler's allocation events, as in benchmarks/bench_token_dpo_memory.py, on one
extra run that is not timed (the profiler slows it); the profiler does not see the freeing of tensors
allocated before it started, so a CPU peak can only err upward.

Run (TRL lives in its own environment, see benchmarks/requirements-perf.txt):

    python -m venv --system-site-packages /tmp/trlenv
    /tmp/trlenv/bin/pip install -r benchmarks/requirements-perf.txt
    OMP_NUM_THREADS=2 /tmp/trlenv/bin/python benchmarks/bench_perf.py --quick            # smoke test, CPU
    OMP_NUM_THREADS=2 /tmp/trlenv/bin/python benchmarks/bench_perf.py                    # CPU, tiny random model
    python benchmarks/bench_perf.py --parts overhead,logps,methods                       # without TRL
    python /work/shared/tools/smollm2_to_hf.py /tmp/smollm2                              # a real model folder
    /tmp/trlenv/bin/python benchmarks/bench_perf.py --device cuda --model qwen2.5-0.5b-random \\
        --prompts 16 --num-generations 8 --completion-length 256 --parts trl,overhead,logps  # GPU
    /tmp/trlenv/bin/python benchmarks/bench_perf.py --device cuda --model /tmp/smollm2 \\
        --prompts 16 --num-generations 8 --completion-length 256 --parts trl,overhead       # GPU, SmolLM2
    /tmp/trlenv/bin/python benchmarks/bench_perf.py --device cuda --model /tmp/smollm2 \\
        --prompts 16 --num-generations 8 --completion-length 256 --parts methods \\
        --repeats 3 --mc-rollouts 4 --out runs/bench_perf_methods                       # GPU, part 4

Part 4 is the slow one with a real model: SPO-chain continues every boundary state N times (spo.py's
default N is 9 for hub models), thousands of generated rows per step; --repeats and --mc-rollouts
keep it short. --quick runs all four parts in about 30 s on a 2-core CPU.

The report is printed and written, with the raw timings as JSON, to --out (runs/bench_perf/).
"""
from __future__ import annotations

import argparse
import atexit
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import dcpo  # noqa: E402
import grpo  # noqa: E402
import spo  # noqa: E402
import tempo  # noqa: E402
import token_dpo  # noqa: E402

PARTS = ("trl", "overhead", "logps", "methods")
LEARNING_RATE = 1e-6       # any value: the benchmark times steps, it does not train
EPSILON = 0.2              # grpo.py's default clip, both sides
OVERHEAD_GOAL = 1.15       # full step / (a + mu*b + c)
LOGPS_MEMORY_GOAL = 0.5    # selective peak / naive peak


# ----------------------------------------------------------------------------------------
# Measuring: the clock, peak memory, paired repeats, summaries
# ----------------------------------------------------------------------------------------


def now(device: torch.device) -> float:
    """perf_counter after every queued kernel has finished (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PeakMemory:
    """Peak tensor bytes allocated between start() and stop() and alive at once, above the start.

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of the profiler's allocation
    events (benchmarks/bench_token_dpo_memory.py's method), which counts tensors only.
    enabled=False makes both calls free and stop() return None.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled, self.prof, self.base = device, enabled, None, 0

    def start(self) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.start()

    def stop(self) -> Optional[int]:
        if not self.enabled:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        self.prof.stop()
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        self.prof = None
        return max(itertools.accumulate(n for _, n in events), default=0)


def measure_peak(fn: Callable, device: torch.device) -> int:
    mem = PeakMemory(device)
    mem.start()
    fn()
    return mem.stop()


@dataclass
class Timed:
    """One thing to time: fn, after an untimed setup (e.g. gradients for an optimizer step)."""
    name: str
    fn: Callable
    setup: Optional[Callable] = None


def paired(items: list[Timed], repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Run every item once per round, warmup + repeats rounds; keep the last `repeats` times.

    The order flips every round (A B C, C B A, ...) so no item always runs first or last.
    """
    times: dict[str, list[float]] = {it.name: [] for it in items}
    for r in range(warmup + repeats):
        for it in (items if r % 2 == 0 else items[::-1]):
            if it.setup is not None:
                it.setup()
            t0 = now(device)
            it.fn()
            dt = now(device) - t0
            if r >= warmup:
                times[it.name].append(dt)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_t(xs: list[float]) -> str:
    """'12.3 ms [11.9-13.0]' or '1.234 s [1.201-1.250]': median [min-max]."""
    m = med(xs)
    if m < 1.0:
        return f"{1e3 * m:.1f} ms [{1e3 * min(xs):.1f}–{1e3 * max(xs):.1f}]"
    return f"{m:.3f} s [{min(xs):.3f}–{max(xs):.3f}]"


def fmt_ratio(xs: list[float]) -> str:
    return f"{med(xs):.2f} [{min(xs):.2f}–{max(xs):.2f}]"


def fmt_mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def temp_dir(prefix: str) -> str:
    """A fresh folder under the system's temp dir, removed when the process ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# Set-up: the model folder, the prompts, and a policy bundle (model, reference, optimizer)
# ----------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    path: str                       # the model folder every copy is loaded from
    tokenizer: object
    prompt_texts: list[str]
    prompt_ids: list[list[int]]     # tokenizer(text=...)["input_ids"], exactly as TRL tokenizes
    answers: list[str]
    num_params: int = 0
    vocab: int = 0
    report: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def G(self) -> int:
        return self.args.num_generations

    @property
    def P(self) -> int:
        return self.args.prompts

    @property
    def L(self) -> int:
        return self.args.completion_length

    @property
    def mu(self) -> int:
        return self.args.num_iterations

    @property
    def mbs(self) -> int:
        return self.args.micro_batch_size or self.P * self.G

    def load(self):
        """A fresh copy of the model, loaded the way every script loads one."""
        model, _ = common.load_model_and_tokenizer(self.path, self.device, self.dtype)
        return model

    def rows(self, block: int) -> tuple[list[list[int]], list[str]]:
        """The prompts (token ids) and answers of GRPO step `block`: P prompts, cycling."""
        n = len(self.prompt_ids)
        idx = [(block * self.P + j) % n for j in range(self.P)]
        return [self.prompt_ids[i] for i in idx], [self.answers[i] for i in idx]


QWEN_05B_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # Qwen2.5-0.5B's config.json
RANDOM_MODELS = ("tiny-random", "qwen2.5-0.5b-random")


def random_model(name: str):
    """(model, tokenizer) with random weights: throughput needs no pretrained weights."""
    if name == "tiny-random":
        tok = common.build_char_tokenizer()
        return common.build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id), tok
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = common.build_char_tokenizer(vocab_size=QWEN_05B_SHAPE["vocab_size"])
    config = Qwen2Config(**QWEN_05B_SHAPE, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, attention_dropout=0.0)
    return Qwen2ForCausalLM(config), tok


def model_folder(args) -> str:
    """tiny-random: the embedded tiny Llama (common.build_tiny_model) with random weights;
    qwen2.5-0.5b-random: a Qwen2 of Qwen2.5-0.5B's shape (494M parameters) with random weights
    and a character tokenizer padded to its vocabulary; either is saved once to a temporary
    folder. tiny: the warm-started embedded model. Else a local save_pretrained folder."""
    if args.model in RANDOM_MODELS:
        common.seed_everything(args.seed)
        model, tok = random_model(args.model)
        folder = Path(temp_dir("bench_perf_random_"))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return str(folder)
    if args.model == common.TINY:
        return str(common.ensure_tiny_model(seed=0))
    if not Path(args.model).expanduser().is_dir():
        raise SystemExit(f"error: --model {args.model} is not a folder; pass {', '.join(RANDOM_MODELS)}, tiny, or a folder made by "
                         "save_pretrained (e.g. python /work/shared/tools/smollm2_to_hf.py /tmp/smollm2)")
    return str(Path(args.model).expanduser())


def build_bench(args) -> Bench:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; pass --device cpu")
    dtype = common.resolve_dtype(args.dtype, device)
    path = model_folder(args)
    model, tokenizer = common.load_model_and_tokenizer(path, device, dtype)
    examples = common.arith_dataset("train")
    texts = [common.format_prompt(tokenizer, ex["question"], "arith") for ex in examples]
    ids = tokenizer(text=texts)["input_ids"]
    context = common.context_length(model)
    if context is not None and max(map(len, ids)) + args.completion_length > context:
        raise SystemExit(f"error: prompts of up to {max(map(len, ids))} tokens + --completion-length "
                         f"{args.completion_length} exceed the model's context of {context}")
    b = Bench(args, device, dtype, path, tokenizer, texts, ids, [ex["answer"] for ex in examples],
              num_params=sum(p.numel() for p in model.parameters()), vocab=model.config.vocab_size)
    del model
    free_memory(device)
    return b


@dataclass
class Policy:
    model: torch.nn.Module
    ref: Optional[torch.nn.Module]
    optimizer: torch.optim.Optimizer


def make_policy(b: Bench, beta: float, fixed_length: bool) -> Policy:
    """grpo.main's set-up: the policy, a frozen reference only when beta > 0, AdamW."""
    model = b.load()
    if b.args.gradient_checkpointing:  # as grpo.main with --gradient-checkpointing
        common.enable_gradient_checkpointing(model)
    if fixed_length:  # every completion exactly L tokens (see the module docstring)
        model.generation_config.min_new_tokens = b.L
    ref = None
    if beta > 0.0:
        ref = b.load()
        ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=0.0)
    return Policy(model, ref, optimizer)


def parity_reward(texts: list[str]) -> list[float]:
    """A cheap deterministic reward both sides share: parity of the sum of character codes."""
    return [float(sum(map(ord, t)) % 2) for t in texts]


# ----------------------------------------------------------------------------------------
# Ours: one GRPO step, grpo.main's loop body section by section (keep the two in step)
# ----------------------------------------------------------------------------------------


def grpo_step(b: Bench, pol: Policy, rows: list[list[int]], beta: float,
              sections: Optional[dict] = None) -> dict:
    """One training step of grpo.py with its defaults (loss_type grpo, scale_rewards group, no
    entropy mask, no truncation mask), mirroring grpo.main sections 1-4; evaluation, checkpoints
    and metrics.jsonl are left out. `sections`, if given, receives each section's seconds (the
    clock then synchronises between sections: use it for a breakdown, not for the timing).
    Returns the completion ids and mask and the number of completion tokens trained on.
    """
    model, ref_model, optimizer, tokenizer, device = pol.model, pol.ref, pol.optimizer, b.tokenizer, b.device
    G, mu, max_len, mbs_size, T = b.G, b.mu, b.L, b.mbs, b.args.temperature
    B = len(rows) * G
    clock = [now(device)] if sections is not None else None

    def lap(name: str) -> None:
        if clock is not None:
            t = now(device)
            sections[name] = sections.get(name, 0.0) + t - clock[0]
            clock[0] = t

    # ---- 1. rollout: G completions for each of P prompts, one batched generate call ----
    with record_function("grpo/1 rollout"):
        prompt_ids, prompt_mask = common.left_pad(rows, tokenizer.pad_token_id, device)
        completion_ids = common.generate(model, tokenizer, prompt_ids, prompt_mask, max_len, G, T, 1.0, 0)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
        completion_mask = common.completion_mask_from_ids(completion_ids, tokenizer.eos_token_id)  # [B, L]
        lap("1a generate")
        texts = common.decode_completions(tokenizer, completion_ids)
        rewards = torch.tensor(parity_reward(texts))
        lap("1b decode + reward")

    # ---- 2. ALGO LOGIC: group-relative advantages, one per completion ----
    with record_function("grpo/2 advantages"):
        advantages = grpo.compute_advantages(rewards, G, "group").to(device)   # [B]
        lap("2 advantages")

    # ---- 3. ALGO LOGIC: optimisation passes against the sampling weights ----
    with record_function("grpo/3 passes"):
        loss_mask = completion_mask
        num_tokens = loss_mask.sum().item()
        old_logps = torch.zeros_like(completion_mask)
        ref_logps = None
        mbs = [slice(s, s + mbs_size) for s in range(0, B, mbs_size)]

        def fwd(m, mb, with_entropy=False):
            return common.per_token_logps(m, prompt_ids[mb], prompt_mask[mb], completion_ids[mb],
                                          completion_mask[mb], T, with_entropy)

        with torch.no_grad():
            if ref_model is not None:
                ref_logps = torch.cat([fwd(ref_model, mb)[0] for mb in mbs])
        lap("3a reference forward")
        avg = common.MetricAverager()
        grad_norm = 0.0
        for it in range(mu):
            for mb in mbs:
                want_entropy = it == 0
                logps, ent = fwd(model, mb, want_entropy)
                if it == 0:
                    old_logps[mb] = logps.detach()
                loss, metrics = grpo.grpo_loss(
                    logps, old_logps[mb], advantages[mb], loss_mask[mb], epsilon_low=EPSILON, epsilon_high=EPSILON,
                    loss_type="grpo", num_sequences=B, num_tokens=num_tokens, max_completion_length=max_len,
                    beta=beta, ref_logps=None if ref_logps is None else ref_logps[mb], token_mask=None)
                loss.backward()
                if want_entropy:
                    metrics["entropy"] = ((ent * completion_mask[mb]).sum() / completion_mask[mb].sum()).item()
                avg.add(metrics, weight=completion_mask[mb].sum().item(), last_pass=it == mu - 1)
            lap("3b forward + loss + backward")
            grad_norm = common.optimizer_step(model, optimizer, 1.0, avg)
            lap("3c optimizer step")

    # ---- 4. the step's metrics (logging, evaluation and checkpoints left out) ----
    with record_function("grpo/4 metrics"):
        metrics = common.rollout_metrics(rewards, completion_ids, completion_mask, tokenizer.eos_token_id, G)
        metrics.update(avg.means(), grad_norm=grad_norm, **{"adv/abs_mean": advantages.abs().mean().item()})
        lap("4 metrics")
    return {"completion_ids": completion_ids, "completion_mask": completion_mask, "tokens": int(num_tokens),
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


# ----------------------------------------------------------------------------------------
# Part 1: grpo.py against TRL's GRPOTrainer
# ----------------------------------------------------------------------------------------


def part_trl(b: Bench) -> None:
    rep = b.report
    rep.append("## 1. One GRPO step: grpo.py against TRL's GRPOTrainer\n")
    try:
        import trl
        from datasets import Dataset  # noqa: F401  (TRL needs it; checked here for a clear message)
    except ImportError as e:
        rep.append(f"Skipped: {e}. Install TRL in its own environment (benchmarks/requirements-perf.txt) and run "
                   "this script with that environment's python.\n")
        return
    rows, raw = [], {}
    for beta in b.args.betas:
        r = trl_pair(b, beta)
        raw[f"beta={beta}"] = r
        rows.append(r)
        free_memory(b.device)
    b.raw["trl"] = raw
    B = b.P * b.G
    rep.append(f"trl {trl.__version__}; P = {b.P} prompts x G = {b.G} = {B} completions of exactly L = {b.L} tokens, "
               f"mu = {b.mu} passes, micro-batch {b.mbs}, {str(b.dtype).replace('torch.', '')}, "
               f"{b.args.repeats} paired steps after {b.args.warmup} warm-up.\n")
    rep.append("| beta | grpo.py step | TRL step | grpo.py / TRL, paired (< 1: grpo.py faster) | peak memory grpo.py "
               "| peak memory TRL "
               "| tokens generated per step, grpo.py / TRL |")
    rep.append("|---|---|---|---|---|---|---|")
    for r in rows:
        tok = f"{r['tokens_ours']} / {r['tokens_trl']}" + ("" if r["tokens_equal"] else " (DIFFERENT)")
        tok += "" if r["same_prompts"] else "; PROMPTS DIFFER"
        rep.append(f"| {r['beta']} | {fmt_t(r['ours_s'])} | {fmt_t(r['trl_s'])} | {fmt_ratio(r['ratio'])} | "
                   f"{fmt_mib(r['peak_ours'])} | {fmt_mib(r['peak_trl'])} | {tok} |")
    rep.append("")
    rep.append("Peak memory: tensor bytes allocated during the step above what existed before it (weights, "
               "optimizer state and reference model, the same on both sides, are not in it); "
               + ("the largest over the timed steps (torch.cuda.max_memory_allocated)." if b.device.type == "cuda"
                  else "one extra, untimed step under the profiler's allocation events.")
               + " Both sides got the same prompts in the same order (checked every step) and generated "
               "exactly B x L tokens (checked every step; a difference is flagged in the table).")
    if b.mu > 1:
        rep.append(f"With mu = {b.mu} > 1, TRL runs one extra no-grad forward per step for the old log-probs "
                   "(grpo.py takes pass 1's); TRL also computes the entropy on every pass. Both are part of "
                   "TRL's step as it is.")
    rep.append("")


def trl_pair(b: Bench, beta: float) -> dict:
    """TRL's trainer.train() drives the steps; a callback times each GRPO step (mu optimizer
    steps) and runs ours in between, alternately right before and right after TRL's."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    a, device, mu, B = b.args, b.device, b.mu, b.P * b.G
    if B % b.mbs:
        raise SystemExit(f"error: the batch ({B}) must be a multiple of --micro-batch-size ({b.mbs})")
    cpu_profile = device.type == "cpu"  # CPU memory: one extra, untimed, profiled step per side
    blocks = a.warmup + a.repeats + (1 if cpu_profile else 0)
    last = blocks - 1
    timed = range(a.warmup, a.warmup + a.repeats)

    ours = make_policy(b, beta, fixed_length=True)
    res = {"beta": beta, "ours": {}, "trl": {}, "peak_ours": {}, "peak_trl": {}, "tok_ours": {}, "tok_trl": [],
           "prompts_trl": []}

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
    texts = [b.prompt_texts[(k * b.P + j) % len(b.prompt_texts)] for k in range(blocks) for j in range(b.P)]
    config = GRPOConfig(
        output_dir=temp_dir("bench_perf_trl_"), max_steps=mu * blocks, seed=a.seed,
        per_device_train_batch_size=b.mbs, gradient_accumulation_steps=B // b.mbs, num_generations=b.G,
        max_completion_length=b.L, generation_kwargs={"min_new_tokens": b.L}, temperature=a.temperature,
        top_p=1.0, top_k=0, num_iterations=mu, beta=beta, epsilon=EPSILON, epsilon_high=EPSILON,
        loss_type="grpo", scale_rewards="group", shuffle_dataset=False, bf16=False, fp16=False,
        gradient_checkpointing=a.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch", learning_rate=LEARNING_RATE, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=10**9, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        use_cpu=device.type == "cpu", dataloader_pin_memory=False)
    trainer = GRPOTrainer(model=b.load(), reward_funcs=[parity], args=config,
                          train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
                          processing_class=b.tokenizer, callbacks=[PairedClock()])
    trainer.train()
    if not len(res["trl"]) == len(res["ours"]) == len(res["tok_trl"]) == blocks:
        raise RuntimeError(f"expected {blocks} GRPO steps (one generation each) per side; got TRL {len(res['trl'])} "
                           f"steps, {len(res['tok_trl'])} generations, ours {len(res['ours'])} steps")
    same_prompts = all(res["prompts_trl"][k] == texts[k * b.P:(k + 1) * b.P] for k in range(blocks))

    peak_k = [last] if cpu_profile else list(timed)
    out = {"beta": beta,
           "ours_s": [res["ours"][k] for k in timed], "trl_s": [res["trl"][k] for k in timed],
           "ratio": [res["ours"][k] / res["trl"][k] for k in timed],
           "peak_ours": max(res["peak_ours"][k] for k in peak_k), "peak_trl": max(res["peak_trl"][k] for k in peak_k),
           "tokens_ours": res["tok_ours"][a.warmup], "tokens_trl": res["tok_trl"][a.warmup] if res["tok_trl"] else None}
    out["tokens_equal"] = (all(t == B * b.L for t in res["tok_ours"].values())
                           and all(t == B * b.L for t in res["tok_trl"]))
    out["same_prompts"] = same_prompts
    return out


# ----------------------------------------------------------------------------------------
# Part 2: grpo.py against its own essential compute
# ----------------------------------------------------------------------------------------


def part_overhead(b: Bench) -> None:
    rep, raw = b.report, {}
    rep.append("## 2. Overhead: a grpo.py step against its essential compute\n")
    rep.append(f"(a) one batched generate of {b.P * b.G} x {b.L} tokens; (b) one forward+backward of the policy over "
               "the batch (common.per_token_logps, loss = masked sum of log-probs), in the step's micro-batches; "
               "(c) the reference forward, no grad (beta > 0); (d) one optimizer step (clip + AdamW), shown but "
               f"not in the goal. Goal: full / (a + mu*b + c) <= {OVERHEAD_GOAL}.\n")
    rep.append("| beta | (a) generate | (b) fwd+bwd | (c) reference | (d) optimizer | a + mu*b + c | full step "
               "| full / (a + mu*b + c) | with mu*d |")
    rep.append("|---|---|---|---|---|---|---|---|---|")
    extra = []
    for beta in b.args.betas:
        r = overhead_one(b, beta)
        raw[f"beta={beta}"] = {k: v for k, v in r.items() if k != "profile"}
        ok = "ok" if med(r["ratio"]) <= OVERHEAD_GOAL else "ABOVE GOAL"
        ref = fmt_t(r["ref"]) if r["ref"] else "–"
        rep.append(f"| {beta} | {fmt_t(r['gen'])} | {fmt_t(r['fb'])} | {ref} | {fmt_t(r['opt'])} | "
                   f"{fmt_t(r['essential'])} | {fmt_t(r['full'])} | **{fmt_ratio(r['ratio'])}** {ok} | "
                   f"{fmt_ratio(r['ratio_opt'])} |")
        extra.append(f"Breakdown of one step, beta = {beta} (3b and 3c summed over the mu passes; synchronised "
                     "per section, so it adds up to a little more than the step): "
                     + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r["sections"].items()))
        d = r["decode"]
        extra.append(f"\nGeneration under torch.profiler (beta = {beta}): {d['ms_per_token']:.2f} ms per generated "
                     f"token for the whole batch, {d['aten_ops_per_token']:.0f} aten ops per token taking "
                     f"{d['aten_ms_per_token']:.2f} ms of self time (the rest is Python); most self time: "
                     + ", ".join(f"{k} {ms:.2f} ms ({n:.0f} calls)" for k, ms, n in d["top"])
                     + " per token (aten::cat is the KV cache growing by one position per layer).")
        if r.get("decode_alternatives"):
            alt = r["decode_alternatives"]
            extra.append(f"Ways around generate()'s overhead, paired, {b.P * b.G} x {b.L} tokens: "
                         + ", ".join(f"{k} {fmt_t(v)}" for k, v in alt.items())
                         + " (the loop: prefill, then L - 1 one-token forwards with a DynamicCache).")
        if r.get("profile"):
            extra.append(f"\nbeta = {beta} is above the goal: torch.profiler of one full step, top ops by self time\n")
            extra.append("```text\n" + r["profile"] + "\n```")
    b.raw["overhead"] = raw
    rep.append("")
    rep.extend(extra)
    rep.append("")


def profiler_activities(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def self_time_key(device: torch.device) -> str:
    """The profiler's self time of an op where its kernels run."""
    return "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"


def decode_profile(gen, n_tokens: int, device: torch.device, top: int = 4) -> dict:
    """Where one batched generate spends its time, per generated token: the profiler's count of
    aten ops and the ops with the most self time. For a small model this is the whole story of
    its step: the decode forward is hundreds of tiny kernels, each costing about its launch."""
    with profile(activities=profiler_activities(device)) as prof:
        t0 = now(device)
        gen()
        wall = now(device) - t0
    key = self_time_key(device)
    ev = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sorted(ev, key=lambda e: getattr(e, key), reverse=True)[:top]
    # self times of nested aten ops do not overlap, so their sum is the time spent inside kernels
    return {"ms_per_token": 1e3 * wall / n_tokens, "aten_ops_per_token": sum(e.count for e in ev) / n_tokens,
            "aten_ms_per_token": sum(getattr(e, key) for e in ev) / 1e3 / n_tokens,
            "top": [(e.key, getattr(e, key) / 1e3 / n_tokens, e.count / n_tokens) for e in ops]}


def decode_alternatives(model, tokenizer, prompt_ids, prompt_mask, L: int, G: int, temperature: float,
                        repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """common.generate against two ways around generate()'s overhead that we tried and did not
    adopt: transformers' static KV cache, and a hand-written decode loop over the model's forward
    (a DynamicCache, multinomial sampling). Each makes exactly L tokens per row, G rows a prompt."""
    from transformers import DynamicCache, GenerationConfig

    ids, mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)

    def ours():
        common.generate(model, tokenizer, prompt_ids, prompt_mask, L, G, temperature, 1.0, 0)

    def static():
        cfg = GenerationConfig(max_new_tokens=L, min_new_tokens=L, do_sample=True, temperature=temperature,
                               top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, cache_implementation="static")
        model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)

    def sample(logits):
        return torch.multinomial(torch.softmax(logits[:, -1].float() / temperature, -1), 1)

    def loop():  # prefill, then L - 1 one-token forwards: the same forwards as generate()
        cache, am = DynamicCache(), mask.clone()
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        nxt, last = sample(out.logits), pos[:, -1:]
        for _ in range(L - 1):
            am, last = torch.cat([am, am.new_ones(am.size(0), 1)], 1), last + 1
            out = model(input_ids=nxt, attention_mask=am, position_ids=last, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            nxt = sample(out.logits)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return paired([Timed("common.generate", ours), Timed("generate, static cache", static),
                           Timed("hand-written loop", loop)], repeats, warmup, device)
    finally:
        model.train(was_training)


def overhead_one(b: Bench, beta: float) -> dict:
    pol = make_policy(b, beta, fixed_length=True)
    device, G, mu, B = b.device, b.G, b.mu, b.P * b.G
    rows, _ = b.rows(0)
    prompt_ids, prompt_mask = common.left_pad(rows, b.tokenizer.pad_token_id, device)
    with torch.no_grad():
        completion_ids = common.generate(pol.model, b.tokenizer, prompt_ids, prompt_mask, b.L, G, b.args.temperature)
    p_ids, p_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    c_mask = common.completion_mask_from_ids(completion_ids, b.tokenizer.eos_token_id)
    mbs = [slice(s, s + b.mbs) for s in range(0, B, b.mbs)]
    n = c_mask.sum()

    def gen():
        common.generate(pol.model, b.tokenizer, prompt_ids, prompt_mask, b.L, G, b.args.temperature, 1.0, 0)

    def fwd_bwd():
        for mb in mbs:
            logps, _ = common.per_token_logps(pol.model, p_ids[mb], p_mask[mb], completion_ids[mb], c_mask[mb],
                                              b.args.temperature)
            ((logps * c_mask[mb]).sum() / n).backward()

    def opt():
        common.optimizer_step(pol.model, pol.optimizer, 1.0, common.MetricAverager())

    def ref_fwd():
        with torch.no_grad():
            for mb in mbs:
                common.per_token_logps(pol.ref, p_ids[mb], p_mask[mb], completion_ids[mb], c_mask[mb],
                                       b.args.temperature)

    def clear_grads():
        pol.model.zero_grad(set_to_none=True)

    items = [Timed("gen", gen), Timed("fb", fwd_bwd, clear_grads), Timed("opt", opt, fwd_bwd)]
    if pol.ref is not None:
        items.append(Timed("ref", ref_fwd))
    items.append(Timed("full", lambda: grpo_step(b, pol, rows, beta), clear_grads))
    t = paired(items, b.args.repeats, b.args.warmup, device)
    t.setdefault("ref", [])
    R = len(t["full"])
    t["essential"] = [t["gen"][i] + mu * t["fb"][i] + (t["ref"][i] if t["ref"] else 0.0) for i in range(R)]
    t["ratio"] = [t["full"][i] / t["essential"][i] for i in range(R)]
    t["ratio_opt"] = [t["full"][i] / (t["essential"][i] + mu * t["opt"][i]) for i in range(R)]
    sections: dict = {}
    grpo_step(b, pol, rows, beta, sections=sections)
    t["sections"] = sections
    t["decode"] = decode_profile(gen, b.L, device)
    if beta == b.args.betas[0]:
        t["decode_alternatives"] = decode_alternatives(pol.model, b.tokenizer, prompt_ids, prompt_mask, b.L, G,
                                                       b.args.temperature, b.args.repeats, b.args.warmup, device)
    if med(t["ratio"]) > OVERHEAD_GOAL:
        with profile(activities=profiler_activities(device)) as prof:
            grpo_step(b, pol, rows, beta)
            now(device)
        t["profile"] = prof.key_averages().table(sort_by=self_time_key(device), row_limit=b.args.profile_rows)
    return t


# ----------------------------------------------------------------------------------------
# Part 3: per-token log-probs, selective against naive
# ----------------------------------------------------------------------------------------


def part_logps(b: Bench) -> None:
    rep, raw = b.report, {}
    Bq, Lq, V = b.args.logps_shape
    one = Bq * Lq * V * 4
    rep.append("## 3. Per-token log-probs: common.selective_log_softmax against the naive log_softmax + gather\n")
    rep.append(f"Random logits [{Bq}, {Lq}, {V:,}] (leaf, requires grad), random targets; forward, then backward of "
               f"a weighted sum. One fp32 [B, L, V] tensor = {fmt_mib(one)}. Peak: above the logits, which exist "
               f"before; both peaks include the gradient of the logits (one [B, L, V] in the logits' dtype), "
               f"which the next column takes out. selective_log_softmax works on chunks of "
               f"{common.CHUNK_ELEMENTS:,} fp32 elements ({max(1, common.CHUNK_ELEMENTS // V)} rows here). Goal: selective <= {LOGPS_MEMORY_GOAL} x naive.\n")
    rep.append("| logits dtype | naive peak | selective peak | selective / naive | the same without the logits' "
               "gradient | naive time | selective time | max abs diff, log-probs | max abs diff, gradient |")
    rep.append("|---|---|---|---|---|---|---|---|---|")
    for name in b.args.logps_dtypes:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
        r = logps_one(b, dt)
        raw[name] = r
        ok = "ok" if r["peak_ratio"] <= LOGPS_MEMORY_GOAL else "ABOVE GOAL"
        g = Bq * Lq * V * torch.tensor([], dtype=dt).element_size()
        rest = f"{fmt_mib(r['peak_naive'] - g)} vs {fmt_mib(r['peak_selective'] - g)}"
        rep.append(f"| {name} | {fmt_mib(r['peak_naive'])} | {fmt_mib(r['peak_selective'])} | "
                   f"**{r['peak_ratio']:.2f}** {ok} | {rest} | {fmt_t(r['naive'])} | {fmt_t(r['selective'])} | "
                   f"{r['max_diff_logps']:.2e} | {r['max_diff_grad']:.2e} |")
    b.raw["logps"] = raw
    rep.append("")


def logps_one(b: Bench, dt: torch.dtype) -> dict:
    device = b.device
    Bq, Lq, V = b.args.logps_shape
    g = torch.Generator(device="cpu").manual_seed(b.args.seed)
    logits = (3.0 * torch.randn(Bq, Lq, V, generator=g)).to(device=device, dtype=dt).requires_grad_(True)
    targets = torch.randint(V, (Bq, Lq), generator=g).to(device)
    weight = torch.rand(Bq, Lq, generator=g).to(device)

    def selective():
        logits.grad = None
        lp = common.selective_log_softmax(logits, targets, b.args.temperature)
        (lp * weight).sum().backward()
        return lp.detach()

    def naive():
        logits.grad = None
        z = logits.float()
        if b.args.temperature != 1.0:
            z = z / b.args.temperature
        lp = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
        (lp * weight).sum().backward()
        return lp.detach()

    t = paired([Timed("naive", naive), Timed("selective", selective)], b.args.repeats, b.args.warmup, device)
    lp_s = selective()
    grad_s = logits.grad.float()
    lp_n = naive()
    grad_n = logits.grad.float()
    t["max_diff_logps"] = (lp_s - lp_n).abs().max().item()
    t["max_diff_grad"] = (grad_s - grad_n).abs().max().item()
    del grad_s, grad_n
    logits.grad = None
    free_memory(device)
    t["peak_naive"] = measure_peak(naive, device)
    logits.grad = None
    free_memory(device)
    t["peak_selective"] = measure_peak(selective, device)
    t["peak_ratio"] = t["peak_selective"] / max(t["peak_naive"], 1)
    return t


# ----------------------------------------------------------------------------------------
# Part 4: what each method adds to a step
# ----------------------------------------------------------------------------------------


def part_methods(b: Bench) -> None:
    rep, device, G, mu = b.report, b.device, b.G, b.mu
    B, T = b.P * b.G, b.args.temperature
    pol = make_policy(b, 0.0, fixed_length=False)   # natural lengths: trees and cutpoints need real text
    ref = b.load().requires_grad_(False)
    rows, answers = b.rows(0)
    common.seed_everything(b.args.seed)
    batch = grpo_step(b, pol, rows, 0.0)  # one step, also the batch the methods work on
    c_ids, c_mask = batch["completion_ids"], batch["completion_mask"]      # [B, L]
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_mask"]              # [B, P_len]
    texts = common.decode_completions(b.tokenizer, c_ids)
    rewards = torch.tensor(parity_reward(texts))
    mean_len = c_mask.sum(1).float().mean().item()

    # DCPO: every prompt seen once before, so SAS blends two standardisations
    stats = dcpo.PromptStats(G)
    keys = list(range(b.P))
    _, first, _ = dcpo.sas_advantages(1.0 - rewards, G, keys, stats)
    stats.by_id.update(first)
    with torch.no_grad():
        old = common.per_token_logps(pol.model, p_ids, p_mask, c_ids, c_mask, T)[0]
    logps = (old + 0.01 * torch.randn_like(old)).requires_grad_(True)
    adv = grpo.compute_advantages(rewards, G).to(device)
    num_tokens = c_mask.sum().item()

    def grpo_loss_bwd():
        logps.grad = None
        grpo.grpo_loss(logps, old, adv, c_mask, epsilon_low=EPSILON, epsilon_high=EPSILON, loss_type="grpo",
                       num_sequences=B, num_tokens=num_tokens, max_completion_length=b.L)[0].backward()

    def dcpo_loss_bwd():
        logps.grad = None
        dcpo.dcpo_loss(logps, old, adv, c_mask, eps_low=0.16, eps_high=0.20, ratio_max=10.0, loss_type="otm",
                       num_sequences=B, num_tokens=num_tokens, num_generations=G)[0].backward()

    # SPO-chain: the old-log-prob forward it needs before its advantages, then segments and MC values
    n_rollouts = b.args.mc_rollouts or (spo.TINY_NUM_ROLLOUTS if b.args.model in ("tiny", "tiny-random")
                                        else spo.HUB_NUM_ROLLOUTS)
    spo_out = {}

    def spo_old_logps():
        with torch.no_grad():
            outs = [common.per_token_logps(pol.model, p_ids[s:s + b.mbs], p_mask[s:s + b.mbs], c_ids[s:s + b.mbs],
                                           c_mask[s:s + b.mbs], T, True) for s in range(0, B, b.mbs)]
        spo_out["old"] = torch.cat([o[0] for o in outs])

    def spo_plan_and_mc():
        prob_mask = spo.probability_mask(spo_out["old"], c_mask, 0.9)
        starts = spo.segment_starts(prob_mask.cpu() > 0, 5, "even")
        prefixes, index = spo.plan_mc_prefixes(c_ids.cpu(), starts, torch.arange(B) // G)
        mc_rewards, mc_tokens = spo.mc_rollout_rewards(pol.model, b.tokenizer, prefixes, rows, answers, n_rollouts,
                                                       b.L, T, 1.0, 0, 512)
        spo.chain_advantages(spo.mc_values(mc_rewards, index), rewards, starts, c_mask.cpu())
        spo_out.update(prefixes=len(prefixes), tokens=mc_tokens, rollouts=mc_rewards.numel())

    # TDPO2 against DPO, on pairs of neighbouring completions of one prompt, all in one micro-batch
    lengths = c_mask.sum(1).long().tolist()
    ids = c_ids.tolist()
    pairs = [{"prompt": rows[g], "chosen": ids[i][:lengths[i]], "rejected": ids[i + 1][:lengths[i + 1]]}
             for g in range(b.P) for i in range(g * G, g * G + G - 1, 2)]   # G // 2 pairs per prompt
    pair_batch = token_dpo.collate_pairs(pairs, b.tokenizer.pad_token_id, device)
    head, ref_head = pol.model.get_output_embeddings(), ref.get_output_embeddings()

    def dpo_plain():  # DPO from gathered log-probs, no KL anywhere (TRL-style)
        pol.model.zero_grad(set_to_none=True)
        lp, _ = common.per_token_logps(pol.model, *pair_batch, 1.0)
        with torch.no_grad():
            rlp, _ = common.per_token_logps(ref, *pair_batch, 1.0)
        (pw, pl), (rw, rl), (mw, ml) = (x.chunk(2) for x in (lp, rlp, pair_batch[3]))
        token_dpo.dpo_loss(pw, pl, rw, rl, mw, ml, 0.1)[0].backward()

    def chunked(loss_name: str):  # token_dpo.py's training step on one micro-batch of pairs
        pol.model.zero_grad(set_to_none=True)
        hidden = token_dpo.response_hidden_states(pol.model, *pair_batch)
        with torch.no_grad():
            ref_hidden = token_dpo.response_hidden_states(ref, *pair_batch)
        lp, rlp, kl = token_dpo.token_logps_and_kl(hidden, ref_hidden, pair_batch[2], pair_batch[3], head, ref_head,
                                                   256)  # token_dpo.py's default --kl-chunk-size
        if loss_name == "dpo":
            kl = kl.detach()
        (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (x.chunk(2) for x in (lp, rlp, pair_batch[3], kl))
        loss = (token_dpo.dpo_loss(pw, pl, rw, rl, mw, ml, 0.1, kw, kr)[0] if loss_name == "dpo" else
                token_dpo.tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, 0.1, 0.5, version=2)[0])
        loss.backward()

    def clear():
        pol.model.zero_grad(set_to_none=True)

    items = [Timed("grpo step", lambda: grpo_step(b, pol, rows, 0.0), clear),
             Timed("grpo advantages", lambda: grpo.compute_advantages(rewards, G)),
             Timed("tempo advantages", lambda: tempo.compute_tempo_advantages(rewards, G, c_ids.cpu(), c_mask.cpu())),
             Timed("dcpo sas", lambda: dcpo.sas_advantages(rewards, G, keys, stats)),
             Timed("grpo loss+bwd", grpo_loss_bwd), Timed("dcpo loss+bwd", dcpo_loss_bwd),
             Timed("spo old logps", spo_old_logps), Timed("spo plan+mc", spo_plan_and_mc, spo_old_logps),
             Timed("dpo (gathered)", dpo_plain), Timed("dpo (token_dpo.py)", lambda: chunked("dpo")),
             Timed("tdpo2 (token_dpo.py)", lambda: chunked("tdpo2"))]
    t = paired(items, b.args.repeats, b.args.warmup, device)
    clear()
    step = med(t["grpo step"])
    diff = lambda x, y: [xi - yi for xi, yi in zip(t[x], t[y])]  # noqa: E731
    tempo_extra = med(diff("tempo advantages", "grpo advantages"))
    dcpo_extra = med(diff("dcpo sas", "grpo advantages")) + mu * med(diff("dcpo loss+bwd", "grpo loss+bwd"))
    spo_extra = med(t["spo old logps"]) + med(t["spo plan+mc"])
    tdpo_extra = med(diff("tdpo2 (token_dpo.py)", "dpo (gathered)"))
    rep.append("## 4. Method overheads, as a share of the step\n")
    rep.append(f"One batch of {B} completions sampled by the model at its natural lengths (mean {mean_len:.1f} "
               f"tokens, max {b.L}); grpo.py step on it: {fmt_t(t['grpo step'])}. Extra = the method's time minus "
               "what GRPO does in its place, medians of paired differences.\n")
    rep.append("| method | what is timed | times | extra per step | share |")
    rep.append("|---|---|---|---|---|")
    rep.append(f"| TEMPO | tempo.compute_tempo_advantages (prefix tree, TD, advantages) vs grpo.compute_advantages | "
               f"{fmt_t(t['tempo advantages'])} vs {fmt_t(t['grpo advantages'])} | {1e3 * tempo_extra:.1f} ms | "
               f"{100 * tempo_extra / step:.1f}% of the GRPO step |")
    rep.append(f"| DCPO | dcpo.sas_advantages (prompts seen once before) and dcpo.dcpo_loss + backward on [B, L] "
               f"log-probs (x mu) vs GRPO's | SAS {fmt_t(t['dcpo sas'])}; loss "
               f"{fmt_t(t['dcpo loss+bwd'])} vs {fmt_t(t['grpo loss+bwd'])} | {1e3 * dcpo_extra:.1f} ms | "
               f"{100 * dcpo_extra / step:.1f}% of the GRPO step |")
    rep.append(f"| SPO-chain | no-grad old-log-prob forward + probability mask, segments, {spo_out.get('prefixes')} "
               f"boundary states x N = {n_rollouts} MC continuations, chain advantages | old log-probs "
               f"{fmt_t(t['spo old logps'])}; plan + MC {fmt_t(t['spo plan+mc'])} | {1e3 * spo_extra:.1f} ms, "
               f"{spo_out.get('tokens')} extra tokens ({spo_out.get('tokens', 0) / max(c_mask.sum().item(), 1):.1f}x "
               f"the batch's {int(c_mask.sum())}) | {100 * spo_extra / (step + spo_extra):.1f}% of (GRPO step + this) |")
    rep.append(f"| TDPO2 | token_dpo.py step with the full-vocabulary KL in the loss vs DPO from gathered "
               f"log-probs (common.per_token_logps), {len(pairs)} pairs | tdpo2 {fmt_t(t['tdpo2 (token_dpo.py)'])}; "
               f"dpo in token_dpo.py (KL logged) {fmt_t(t['dpo (token_dpo.py)'])}; dpo gathered "
               f"{fmt_t(t['dpo (gathered)'])} | {1e3 * tdpo_extra:.1f} ms | "
               f"{100 * tdpo_extra / med(t['tdpo2 (token_dpo.py)']):.1f}% of a TDPO2 loss step |")
    rep.append("")
    if b.args.model in RANDOM_MODELS:
        rep.append("With a random model nearly every token has p < 0.9, so SPO-chain cuts at almost every token and "
                   "its MC cost is near its worst case; TEMPO's groups share almost no prefix. A trained model "
                   "(--model tiny, or a real folder) gives the typical case.\n")
    b.raw["methods"] = dict(t, mean_completion_length=mean_len, spo=spo_out, mc_rollouts=n_rollouts,
                            extra_s={"tempo": tempo_extra, "dcpo": dcpo_extra, "spo": spo_extra, "tdpo2": tdpo_extra})


# ----------------------------------------------------------------------------------------
# Main: CLI, header, the parts, the report
# ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The method, what is paired with what, and how to run it: the docstring "
                                       "at the top of this file.")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)} (default: all)")
    p.add_argument("--model", default="tiny-random",
                   help="tiny-random (the embedded tiny Llama, random weights), qwen2.5-0.5b-random (Qwen2.5-0.5B's "
                        "shape, random weights; for GPUs), tiny (warm-started), or a local save_pretrained folder "
                        "(default: tiny-random)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights dtype for both sides; auto = bf16 on a GPU that has it, else fp32")
    p.add_argument("--prompts", type=int, default=4, help="P, prompts per step (default: 4)")
    p.add_argument("--num-generations", type=int, default=8, help="G (default: 8)")
    p.add_argument("--completion-length", type=int, default=48, help="L, tokens per completion (default: 48)")
    p.add_argument("--num-iterations", type=int, default=2, help="mu, passes per step (default: 2)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="completions per forward/backward; 0 = whole batch")
    p.add_argument("--betas", default="0,0.04", help="KL coefficients to run (default: 0,0.04)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward, on both sides (grpo.py's flag; TRL's default is on)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--logps-shape", default="8,256,49152", help="B,L,V of part 3 (default: 8,256,49152)")
    p.add_argument("--logps-dtypes", default="float32,bfloat16", help="logits dtypes of part 3")
    p.add_argument("--mc-rollouts", type=int, default=0, help="SPO's N in part 4; 0 = spo.py's default for the model")
    p.add_argument("--profile-rows", type=int, default=20, help="rows of the profiler table (part 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smallest sizes and 2 repeats (P=2, G=2, L=8, logits 2x1024x8192; explicit flags win): a "
                        "smoke test in under a minute on CPU")
    p.add_argument("--out", default="runs/bench_perf", help="folder for report.md and timings.json")
    if p.parse_known_args(argv)[0].quick:  # new defaults; flags given explicitly still win
        p.set_defaults(prompts=2, num_generations=2, completion_length=8, repeats=2, warmup=1,
                       logps_shape="2,1024,8192")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    args.betas = [float(x) for x in args.betas.split(",")]
    args.logps_shape = [int(x) for x in args.logps_shape.split(",")]
    args.logps_dtypes = [s.strip() for s in args.logps_dtypes.split(",")]
    if len(args.logps_shape) != 3 or any(x <= 0 for x in args.logps_shape):
        p.error("--logps-shape must be three positive integers B,L,V")
    if args.num_generations < 2 or min(args.prompts, args.completion_length, args.num_iterations, args.repeats) < 1:
        p.error("need --num-generations >= 2 and positive --prompts, --completion-length, --num-iterations, --repeats")
    return args


def header(b: Bench) -> list[str]:
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    a = b.args
    if b.device.type == "cuda":
        where = f"{torch.cuda.get_device_name(b.device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return ["# bench_perf: grpo.py against TRL and against the machine\n",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; device: {where}",
            (f"- torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
             f"python {platform.python_version()}"),
            (f"- model: {a.model} ({b.num_params / 1e6:.2f}M parameters, vocabulary {b.vocab:,}), "
             f"{str(b.dtype).replace('torch.', '')}"),
            (f"- step: P = {b.P} prompts x G = {b.G}, L = {b.L} tokens, mu = {b.mu}, micro-batch {b.mbs}, "
             f"betas {a.betas}, temperature {a.temperature}, gradient checkpointing "
             f"{'on' if a.gradient_checkpointing else 'off'}"),
            (f"- every time: median [min–max] of {a.repeats} paired runs after {a.warmup} warm-up"
             + (" (--quick)" if a.quick else "")),
            f"- command: {' '.join([Path(sys.executable).name] + sys.argv)}", ""]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    b = build_bench(args)
    b.report.extend(header(b))
    b.raw["config"] = {k: v for k, v in vars(args).items()}
    b.raw["config"].update(device=str(b.device), dtype=str(b.dtype), num_params=b.num_params, vocab=b.vocab)
    runners = {"trl": part_trl, "overhead": part_overhead, "logps": part_logps, "methods": part_methods}
    for part in args.parts:
        t0 = time.perf_counter()
        n = len(b.report)
        runners[part](b)
        free_memory(b.device)
        print("\n".join(b.report[n if part != args.parts[0] else 0:]), flush=True)
        print(f"({part}: {time.perf_counter() - t0:.1f} s)\n", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(b.report) + "\n")
    (out / "timings.json").write_text(json.dumps(b.raw, indent=1, default=str))
    print(f"wrote {out / 'report.md'} and {out / 'timings.json'}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
