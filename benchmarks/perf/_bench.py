"""What grpo.py's benchmarks share: the clock, peak memory, paired repeats, the set-up, one step.

One script per question, each printing a report and writing it with the raw timings as JSON:

  bench_trl.py       one training step of grpo.py against one of TRL's GRPOTrainer
  bench_overhead.py  a grpo.py step against its essential compute, and where generation's time goes
  bench_logps.py     peak memory of common.selective_log_softmax against the naive log_softmax
  bench_methods.py   what each method (TEMPO, DCPO, SPO-chain, TDPO2) adds to a GRPO step

Every number is a median with its spread (min-max) over --repeats runs after --warmup runs, and
every comparison is PAIRED: the things compared run alternately in the same process, on the same
model and the same prompts, so a machine that slows down or speeds up during the run moves both
sides alike (`paired` below).

Memory: "peak" is the most tensor bytes allocated during the measured code and alive at once,
above what was allocated when it started (weights, optimizer state and the reference model are
there before and are equal for both sides by construction). On CUDA:
torch.cuda.max_memory_allocated. On CPU: the torch profiler's allocation events, as in
benchmarks/perf/bench_token_dpo_memory.py, on one extra run that is not timed (the profiler slows
it); the profiler does not see the freeing of tensors allocated before it started, so a CPU peak
can only err upward.

Models (--model): tiny-random, the embedded tiny Llama (common.build_tiny_model) with random
weights; qwen2.5-0.5b-random, a Qwen2 of Qwen2.5-0.5B's shape (494M parameters) with random
weights, for GPUs (throughput needs no pretrained weights); tiny, the warm-started embedded model;
or a local save_pretrained folder.

`grpo_step` below is grpo.main's loop body, section by section (tests/test_copies.py checks that
one step of it trains the weights exactly as grpo.main's step does).
"""
from __future__ import annotations

import argparse
import atexit
import gc
import itertools
import json
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

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/perf/ -> the repository root
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import grpo  # noqa: E402

LEARNING_RATE = 1e-6       # any value: the benchmark times steps, it does not train
EPSILON = 0.2              # grpo.py's default clip, both sides


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
    events (benchmarks/perf/bench_token_dpo_memory.py's method), which counts tensors only.
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
        events = self.prof.profiler.kineto_results.events()
        events = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
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


def paired(items: list[Timed], repeats: int, warmup: int,
           device: torch.device) -> dict[str, list[float]]:
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

    def load(self, frozen: bool = False):
        """A fresh copy of the model, loaded the way every script loads one: the policy with
        fp32 master weights, a frozen model (the reference) in the compute dtype."""
        if frozen:
            return common.load_frozen(self.path, self.device, self.dtype)
        model, _ = common.load_model_and_tokenizer(self.path, self.device, torch.float32)
        return model

    def rows(self, block: int) -> tuple[list[list[int]], list[str]]:
        """The prompts (token ids) and answers of GRPO step `block`: P prompts, cycling."""
        n = len(self.prompt_ids)
        idx = [(block * self.P + j) % n for j in range(self.P)]
        return [self.prompt_ids[i] for i in idx], [self.answers[i] for i in idx]


QWEN_05B_SHAPE = dict(  # Qwen2.5-0.5B's config.json
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
RANDOM_MODELS = ("tiny-random", "qwen2.5-0.5b-random")


def random_model(name: str):
    """(model, tokenizer) with random weights: throughput needs no pretrained weights."""
    if name == "tiny-random":
        tok = common.build_char_tokenizer()
        return common.build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id), tok
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = common.build_char_tokenizer(vocab_size=QWEN_05B_SHAPE["vocab_size"])
    config = Qwen2Config(**QWEN_05B_SHAPE, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, attention_dropout=0.0)
    return Qwen2ForCausalLM(config), tok


def model_folder(args) -> str:
    """tiny-random: the embedded tiny Llama (common.build_tiny_model) with random weights;
    qwen2.5-0.5b-random: a Qwen2 of Qwen2.5-0.5B's shape (494M parameters) with random weights
    and a character tokenizer padded to its vocabulary; either is saved once to a temporary
    folder. tiny: the warm-started embedded model. Else a local save_pretrained folder."""
    if args.model in RANDOM_MODELS:
        common.seed_everything(args.seed)
        model, tok = random_model(args.model)
        folder = Path(temp_dir("bench_random_"))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return str(folder)
    if args.model == common.TINY:
        return str(common.ensure_tiny_model(seed=0))
    if not Path(args.model).expanduser().is_dir():
        raise SystemExit(f"error: --model {args.model} is not a folder; pass "
                         f"{', '.join(RANDOM_MODELS)}, tiny, or a folder made by save_pretrained "
                         "(e.g. python /work/shared/tools/smollm2_to_hf.py /tmp/smollm2)")
    return str(Path(args.model).expanduser())


def build_bench(args) -> Bench:
    device = resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    path = model_folder(args)
    model, tokenizer = common.load_model_and_tokenizer(path, device, dtype)
    examples = common.arith_dataset("train")
    texts = [common.format_prompt(tokenizer, ex["question"], "arith") for ex in examples]
    ids = tokenizer(text=texts)["input_ids"]
    context = common.context_length(model)
    if context is not None and max(map(len, ids)) + args.completion_length > context:
        raise SystemExit(f"error: prompts of up to {max(map(len, ids))} tokens + "
                         f"--completion-length {args.completion_length} exceed the model's context "
                         f"of {context}")
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
        ref = b.load(frozen=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999),
                                  weight_decay=0.0)
    return Policy(model, ref, optimizer)


def parity_reward(texts: list[str]) -> list[float]:
    """A cheap deterministic reward both sides share: parity of the sum of character codes."""
    return [float(sum(map(ord, t)) % 2) for t in texts]


# ----------------------------------------------------------------------------------------
# Ours: one GRPO step, grpo.main's loop body section by section (tests/test_copies.py)
# ----------------------------------------------------------------------------------------


def grpo_step(b: Bench, pol: Policy, rows: list[list[int]], beta: float,
              sections: Optional[dict] = None) -> dict:
    """One training step of grpo.py with its defaults (loss_type grpo, scale_rewards group, no
    entropy mask, no truncation mask), mirroring grpo.main's steps 1-5; evaluation, checkpoints
    and metrics.jsonl are left out. `sections`, if given, receives each section's seconds (the
    clock then synchronises between sections: use it for a breakdown, not for the timing).
    Returns the completion ids and mask and the number of completion tokens trained on.
    """
    model, ref_model, optimizer = pol.model, pol.ref, pol.optimizer
    tokenizer, device = b.tokenizer, b.device
    G, mu, max_len, mbs_size, T = b.G, b.mu, b.L, b.mbs, b.args.temperature
    B = len(rows) * G
    autocast = common.autocast(device, b.dtype)
    clock = [now(device)] if sections is not None else None

    def lap(name: str) -> None:
        if clock is not None:
            t = now(device)
            sections[name] = sections.get(name, 0.0) + t - clock[0]
            clock[0] = t

    # ---- 1. rollout: G completions for each of P prompts, one batched generate call ----
    with record_function("grpo/1 rollout"):
        prompt_ids, prompt_mask = common.left_pad(rows, tokenizer.pad_token_id, device)
        with autocast():
            completion_ids = common.generate(model, tokenizer, prompt_ids, prompt_mask, max_len,
                                             G, T, 1.0, 0)
        prompt_ids = prompt_ids.repeat_interleave(G, 0)
        prompt_mask = prompt_mask.repeat_interleave(G, 0)
        completion_mask = common.completion_mask_from_ids(completion_ids,
                                                          tokenizer.eos_token_id)  # [B, L]
        lap("1a generate")
        texts = common.decode_completions(tokenizer, completion_ids)
        rewards = torch.tensor(parity_reward(texts))
        lap("1b decode + reward")

    # ---- 2. one no-grad pass: what the update needs before it starts ----
    with record_function("grpo/2 no-grad pass"):
        mbs = [slice(s, s + mbs_size) for s in range(0, B, mbs_size)]

        def fwd(m, mb, with_entropy=False):  # log-probs [b, L] (and entropies) of rows mb under m
            with autocast():
                return common.per_token_logps(m, prompt_ids[mb], prompt_mask[mb],
                                              completion_ids[mb], completion_mask[mb], T,
                                              with_entropy)

        # the reference's log-probs if beta > 0; no entropies (no 80/20 mask), no old log-probs
        _, entropies, ref_logps = common.no_grad_pass(fwd, mbs, None, ref_model)
        lap("2 reference forward")

    # ---- 3. ALGO LOGIC: group-relative advantages, one per completion ----
    with record_function("grpo/3 advantages"):
        advantages = grpo.compute_advantages(rewards, G, "group").to(device)   # [B]
        lap("3 advantages")

    # ---- 4. ALGO LOGIC: optimisation passes against the sampling weights ----
    with record_function("grpo/4 passes"):
        loss_mask = completion_mask
        num_tokens = loss_mask.sum().item()
        token_mask = loss_mask
        old_logps = torch.zeros_like(completion_mask)   # filled by pass 1
        avg = common.MetricAverager()
        grad_norm = 0.0
        for it in range(mu):
            for mb in mbs:
                logps, ent = fwd(model, mb, with_entropy=it == 0 and entropies is None)
                if it == 0:
                    old_logps[mb] = logps.detach()
                loss, metrics = grpo.grpo_loss(
                    logps, old_logps[mb], advantages[mb], loss_mask[mb],
                    epsilon_low=EPSILON, epsilon_high=EPSILON,
                    loss_type="grpo", num_sequences=B, num_tokens=num_tokens,
                    max_completion_length=max_len, beta=beta,
                    ref_logps=None if ref_logps is None else ref_logps[mb],
                    token_mask=token_mask[mb])
                loss.backward()
                if it == 0:
                    metrics["entropy"] = common.masked_mean(
                        entropies[mb] if ent is None else ent, completion_mask[mb])
                avg.add(metrics, weight=completion_mask[mb].sum().item(), last_pass=it == mu - 1)
            lap("4a forward + loss + backward")
            grad_norm = common.optimizer_step(model, optimizer, 1.0, avg)
            lap("4b optimizer step")

    # ---- 5. the step's metrics (logging, evaluation and checkpoints left out) ----
    with record_function("grpo/5 metrics"):
        metrics = common.rollout_metrics(rewards, completion_ids, completion_mask,
                                         tokenizer.eos_token_id, G)
        metrics.update(avg.means(), grad_norm=grad_norm,
                       **{"adv/abs_mean": advantages.abs().mean().item()})
        lap("5 metrics")
    return {"completion_ids": completion_ids, "completion_mask": completion_mask,
            "tokens": int(num_tokens), "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


def profiler_activities(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def self_time_key(device: torch.device) -> str:
    """The profiler's self time of an op where its kernels run."""
    return "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"


# ----------------------------------------------------------------------------------------
# The command line, the report's header, writing the report
# ----------------------------------------------------------------------------------------

# --quick: the smallest sizes and 2 repeats; flags given explicitly still win
QUICK = dict(prompts=2, num_generations=2, completion_length=8, repeats=2, warmup=1)


def arg_parser(doc: str, out: str, step: bool = True) -> argparse.ArgumentParser:
    """The flags every benchmark shares; step=True adds the model and the sizes of a GRPO step."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What is measured and how: the docstring at the top of this "
                                       "script and of benchmarks/perf/_bench.py.")
    if step:
        p.add_argument("--model", default="tiny-random",
                       help="tiny-random (the embedded tiny Llama, random weights), "
                            "qwen2.5-0.5b-random (Qwen2.5-0.5B's shape, random weights; for GPUs), "
                            "tiny (warm-started), or a local save_pretrained folder "
                            "(default: tiny-random)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    if step:
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="weights dtype for both sides; auto = bf16 on a GPU that has it, "
                            "else fp32")
        p.add_argument("--prompts", type=int, default=4, help="P, prompts per step (default: 4)")
        p.add_argument("--num-generations", type=int, default=8, help="G (default: 8)")
        p.add_argument("--completion-length", type=int, default=48,
                       help="L, tokens per completion (default: 48)")
        p.add_argument("--num-iterations", type=int, default=2,
                       help="mu, passes per step (default: 2)")
        p.add_argument("--micro-batch-size", type=int, default=0,
                       help="completions per forward/backward; 0 = whole batch")
        p.add_argument("--betas", default="0,0.04", help="KL coefficients to run (default: 0,0.04)")
        p.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in backward (grpo.py's flag; TRL's default "
                            "is on)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smallest sizes and 2 repeats (explicit flags win): a smoke test on a CPU")
    p.add_argument("--out", default=out,
                   help=f"folder for report.md and timings.json (default: {out})")
    return p


def parse_args(argv=None, p: Optional[argparse.ArgumentParser] = None,
               quick: Optional[dict] = None) -> argparse.Namespace:
    """Parse with --quick's defaults (QUICK, updated by `quick`) and check the sizes."""
    p = p or arg_parser(__doc__, "runs/bench")
    known = {a.dest for a in p._actions}
    if p.parse_known_args(argv)[0].quick:  # new defaults; flags given explicitly still win
        p.set_defaults(**{k: v for k, v in dict(QUICK, **(quick or {})).items() if k in known})
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("need --repeats >= 1 and --warmup >= 0")
    if "betas" in known:
        try:
            args.betas = [float(x) for x in args.betas.split(",")]
        except ValueError:
            p.error(f"--betas must be comma-separated numbers, got {args.betas!r}")
        sizes = (args.prompts, args.completion_length, args.num_iterations)
        if args.num_generations < 2 or min(sizes) < 1:
            p.error("need --num-generations >= 2 and positive --prompts, --completion-length, "
                    "--num-iterations")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; pass --device cpu")
    return device


def header(title: str, args: argparse.Namespace, device: torch.device,
           b: Optional[Bench] = None) -> list[str]:
    """The report's first lines: where, with what, and for a step benchmark the model and sizes."""
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        where = f"CPU {cpu}, {torch.get_num_threads()} torch threads"
    lines = [f"# {title}\n", f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; device: {where}",
             (f"- torch {torch.__version__}, transformers {transformers.__version__}, "
              f"trl {trl_version}, python {platform.python_version()}")]
    if b is not None:
        lines += [(f"- model: {args.model} ({b.num_params / 1e6:.2f}M parameters, vocabulary "
                   f"{b.vocab:,}), {str(b.dtype).replace('torch.', '')}"),
                  (f"- step: P = {b.P} prompts x G = {b.G}, L = {b.L} tokens, mu = {b.mu}, "
                   f"micro-batch {b.mbs}, betas {args.betas}, temperature {args.temperature}, "
                   f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")]
    return lines + [(f"- every time: median [min–max] of {args.repeats} paired runs after "
                     f"{args.warmup} warm-up" + (" (--quick)" if args.quick else "")),
                    f"- command: {' '.join([Path(sys.executable).name] + sys.argv)}", ""]


def start(args: argparse.Namespace, title: str) -> Bench:
    """Seed, build the bench (model folder, prompts), and begin its report with the header."""
    torch.manual_seed(args.seed)
    b = build_bench(args)
    b.report.extend(header(title, args, b.device, b))
    b.raw["config"] = dict(vars(args), device=str(b.device), dtype=str(b.dtype),
                           num_params=b.num_params, vocab=b.vocab)
    return b


def write_report(report: list[str], raw: dict, out: str) -> None:
    """Print the report; write it as report.md and the raw numbers as timings.json under `out`."""
    print("\n".join(report), flush=True)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text("\n".join(report) + "\n")
    (folder / "timings.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {folder / 'report.md'} and {folder / 'timings.json'}", file=sys.stderr)
