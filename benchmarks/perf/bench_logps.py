"""Per-token log-probs: peak memory and time of common.selective_log_softmax against the naive way.

The naive way is torch.log_softmax(logits.float(), -1).gather(...). Both run forward and backward
on random logits of --shape (default 8 x 256 x 49,152: SmolLM2's vocabulary), in each of --dtypes,
paired (benchmarks/perf/_bench.py), with the largest difference of the values and of the gradients.
Goal: a peak of at most 0.5 x the naive one. No model is needed.

    python benchmarks/perf/bench_logps.py --quick              # smoke test: logits 2 x 1024 x 8192
    OMP_NUM_THREADS=1 python benchmarks/perf/bench_logps.py    # the numbers in docs/performance.md
    python benchmarks/perf/bench_logps.py --device cuda        # GPU

The report is printed and written, with the raw timings as JSON, to --out (runs/bench_logps/).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from _bench import Timed, fmt_mib, fmt_t, free_memory, measure_peak, paired  # noqa: E402
import common  # noqa: E402

LOGPS_MEMORY_GOAL = 0.5    # selective peak / naive peak


def part_logps(b: SimpleNamespace) -> None:
    rep, raw = b.report, {}
    Bq, Lq, V = b.args.shape
    one = Bq * Lq * V * 4
    rep.append("## Per-token log-probs: common.selective_log_softmax against the naive log_softmax "
               "+ gather\n")
    rep.append(f"Random logits [{Bq}, {Lq}, {V:,}] (leaf, requires grad), random targets; forward, "
               f"then backward of a weighted sum. One fp32 [B, L, V] tensor = {fmt_mib(one)}. "
               f"Peak: above the logits, which exist before; both peaks include the gradient of "
               f"the logits (one [B, L, V] in the logits' dtype), which the next column takes out. "
               f"selective_log_softmax works on chunks of {common.CHUNK_ELEMENTS:,} fp32 elements "
               f"({max(1, common.CHUNK_ELEMENTS // V)} rows here). Goal: selective <= "
               f"{LOGPS_MEMORY_GOAL} x naive.\n")
    rep.append("| logits dtype | naive peak | selective peak | selective / naive | the same "
               "without the logits' gradient | naive time | selective time | max abs diff, "
               "log-probs | max abs diff, gradient |")
    rep.append("|---|---|---|---|---|---|---|---|---|")
    for name in b.args.dtypes:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
        r = logps_one(b, dt)
        raw[name] = r
        ok = "ok" if r["peak_ratio"] <= LOGPS_MEMORY_GOAL else "ABOVE GOAL"
        g = Bq * Lq * V * torch.tensor([], dtype=dt).element_size()
        rest = f"{fmt_mib(r['peak_naive'] - g)} vs {fmt_mib(r['peak_selective'] - g)}"
        rep.append(f"| {name} | {fmt_mib(r['peak_naive'])} | {fmt_mib(r['peak_selective'])} | "
                   f"**{r['peak_ratio']:.2f}** {ok} | {rest} | {fmt_t(r['naive'])} | "
                   f"{fmt_t(r['selective'])} | "
                   f"{r['max_diff_logps']:.2e} | {r['max_diff_grad']:.2e} |")
    b.raw["logps"] = raw
    rep.append("")


def logps_one(b: SimpleNamespace, dt: torch.dtype) -> dict:
    device = b.device
    Bq, Lq, V = b.args.shape
    g = torch.Generator(device="cpu").manual_seed(b.args.seed)
    logits = 3.0 * torch.randn(Bq, Lq, V, generator=g)
    logits = logits.to(device=device, dtype=dt).requires_grad_(True)
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

    t = paired([Timed("naive", naive), Timed("selective", selective)], b.args.repeats,
               b.args.warmup, device)
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


def main(argv=None) -> None:
    p = _bench.arg_parser(__doc__, "runs/bench_logps", step=False)
    p.add_argument("--shape", default="8,256,49152",
                   help="B,L,V of the logits (default: 8,256,49152)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="logits dtypes (default: float32,bfloat16)")
    args = _bench.parse_args(argv, p, quick=dict(shape="2,1024,8192"))
    try:
        args.shape = [int(x) for x in args.shape.split(",")]
    except ValueError:
        args.shape = []
    if len(args.shape) != 3 or any(x <= 0 for x in args.shape):
        p.error("--shape must be three positive integers B,L,V")
    args.dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    if not args.dtypes or set(args.dtypes) - {"float32", "bfloat16"}:
        p.error("--dtypes must be float32, bfloat16 or both, comma-separated")
    torch.manual_seed(args.seed)
    device = _bench.resolve_device(args.device)
    title = "bench_logps: selective against naive log-probs"
    raw = {"config": dict(vars(args), device=str(device))}
    report = _bench.header(title, args, device)
    b = SimpleNamespace(args=args, device=device, raw=raw, report=report)
    part_logps(b)
    _bench.write_report(b.report, b.raw, args.out)


if __name__ == "__main__":
    main()
