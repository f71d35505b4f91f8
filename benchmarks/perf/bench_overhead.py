"""A grpo.py step against the machine's limit: its essential compute, and where generation goes.

In one process, timed alone and paired (benchmarks/perf/_bench.py): (a) the batched generation,
(b) one forward+backward of the policy over the whole batch (completion log-probs and a trivial
loss), (c) the reference forward when beta > 0, (d) the optimizer step (shown, not in the goal),
then the full step (_bench.grpo_step, grpo.main's loop body). Reported: full / (a + mu*b + c),
goal <= 1.15, a per-section breakdown of one step, and, when above the goal, the torch.profiler
table of one full step (top ops by self time). Then generation itself: a profile per generated
token (aten ops, their kernel time, the top ops), and common.generate paired with two ways around
generate()'s overhead that we tried and did not adopt (a static KV cache, a hand-written loop).

    python benchmarks/perf/bench_overhead.py --quick                           # smoke test, CPU
    OMP_NUM_THREADS=2 python benchmarks/perf/bench_overhead.py         # CPU, tiny random model
    OMP_NUM_THREADS=2 python benchmarks/perf/bench_overhead.py --betas 0 --repeats 9  # decode profile
    python benchmarks/perf/bench_overhead.py --device cuda --model qwen2.5-0.5b-random \\
        --prompts 16 --num-generations 8 --completion-length 256                  # GPU
    python benchmarks/perf/bench_overhead.py --device cuda --model /tmp/smollm2 \\
        --prompts 16 --num-generations 8 --completion-length 256                  # GPU, SmolLM2

The report is printed and written, with the raw timings as JSON, to --out (runs/bench_overhead/).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from _bench import (Bench, Timed, fmt_ratio, fmt_t, grpo_step, make_policy, med, now, paired,
                    profiler_activities, self_time_key)  # noqa: E402
import common  # noqa: E402
from torch.profiler import profile  # noqa: E402

OVERHEAD_GOAL = 1.15       # full step / (a + mu*b + c)


def part_overhead(b: Bench) -> None:
    rep, raw = b.report, {}
    rep.append("## Overhead: a grpo.py step against its essential compute\n")
    rep.append(f"(a) one batched generate of {b.P * b.G} x {b.L} tokens; (b) one forward+backward "
               "of the policy over the batch (common.per_token_logps, loss = masked sum of "
               "log-probs), in the step's micro-batches; (c) the reference forward, no grad "
               "(beta > 0); (d) one optimizer step (clip + AdamW), shown but not in the goal. "
               f"Goal: full / (a + mu*b + c) <= {OVERHEAD_GOAL}.\n")
    rep.append("| beta | (a) generate | (b) fwd+bwd | (c) reference | (d) optimizer | a + mu*b + c "
               "| full step | full / (a + mu*b + c) | with mu*d |")
    rep.append("|---|---|---|---|---|---|---|---|---|")
    extra = []
    for beta in b.args.betas:
        r = overhead_one(b, beta)
        raw[f"beta={beta}"] = {k: v for k, v in r.items() if k != "profile"}
        ok = "ok" if med(r["ratio"]) <= OVERHEAD_GOAL else "ABOVE GOAL"
        ref = fmt_t(r["ref"]) if r["ref"] else "–"
        rep.append(f"| {beta} | {fmt_t(r['gen'])} | {fmt_t(r['fb'])} | {ref} | {fmt_t(r['opt'])} | "
                   f"{fmt_t(r['essential'])} | {fmt_t(r['full'])} | **{fmt_ratio(r['ratio'])}** "
                   f"{ok} | {fmt_ratio(r['ratio_opt'])} |")
        extra.append(f"Breakdown of one step, beta = {beta} (3b and 3c summed over the mu passes; "
                     "synchronised per section, so it adds up to a little more than the step): "
                     + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r["sections"].items()))
        d = r["decode"]
        extra.append(f"\nGeneration under torch.profiler (beta = {beta}): "
                     f"{d['ms_per_token']:.2f} ms per generated token for the whole batch, "
                     f"{d['aten_ops_per_token']:.0f} aten ops per token taking "
                     f"{d['aten_ms_per_token']:.2f} ms of self time (the rest is Python); most "
                     "self time: "
                     + ", ".join(f"{k} {ms:.2f} ms ({n:.0f} calls)" for k, ms, n in d["top"])
                     + " per token (aten::cat is the KV cache growing by one position per layer).")
        if r.get("decode_alternatives"):
            alt = r["decode_alternatives"]
            extra.append(f"Ways around generate()'s overhead, paired, {b.P * b.G} x {b.L} tokens: "
                         + ", ".join(f"{k} {fmt_t(v)}" for k, v in alt.items())
                         + " (the loop: prefill, then L - 1 one-token forwards with a "
                           "DynamicCache).")
        if r.get("profile"):
            extra.append(f"\nbeta = {beta} is above the goal: torch.profiler of one full step, "
                         "top ops by self time\n")
            extra.append("```text\n" + r["profile"] + "\n```")
    b.raw["overhead"] = raw
    rep.append("")
    rep.extend(extra)
    rep.append("")



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
    return {"ms_per_token": 1e3 * wall / n_tokens,
            "aten_ops_per_token": sum(e.count for e in ev) / n_tokens,
            "aten_ms_per_token": sum(getattr(e, key) for e in ev) / 1e3 / n_tokens,
            "top": [(e.key, getattr(e, key) / 1e3 / n_tokens, e.count / n_tokens) for e in ops]}


def decode_alternatives(model, tokenizer, prompt_ids, prompt_mask, L: int, G: int,
                        temperature: float, repeats: int, warmup: int,
                        device: torch.device) -> dict[str, list[float]]:
    """common.generate against two ways around generate()'s overhead that we tried and did not
    adopt: transformers' static KV cache, and a hand-written decode loop over the model's forward
    (a DynamicCache, multinomial sampling). Each makes exactly L tokens per row, G rows a prompt."""
    from transformers import DynamicCache, GenerationConfig

    ids, mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)

    def ours():
        common.generate(model, tokenizer, prompt_ids, prompt_mask, L, G, temperature, 1.0, 0)

    def static():
        cfg = GenerationConfig(max_new_tokens=L, min_new_tokens=L, do_sample=True,
                               temperature=temperature, top_p=1.0, top_k=0,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, cache_implementation="static")
        model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)

    def sample(logits):
        return torch.multinomial(torch.softmax(logits[:, -1].float() / temperature, -1), 1)

    def loop():  # prefill, then L - 1 one-token forwards: the same forwards as generate()
        cache, am = DynamicCache(), mask.clone()
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        nxt, last = sample(out.logits), pos[:, -1:]
        for _ in range(L - 1):
            am, last = torch.cat([am, am.new_ones(am.size(0), 1)], 1), last + 1
            out = model(input_ids=nxt, attention_mask=am, position_ids=last, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
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
        completion_ids = common.generate(pol.model, b.tokenizer, prompt_ids, prompt_mask, b.L, G,
                                         b.args.temperature)
    p_ids, p_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    c_mask = common.completion_mask_from_ids(completion_ids, b.tokenizer.eos_token_id)
    mbs = [slice(s, s + b.mbs) for s in range(0, B, b.mbs)]
    n = c_mask.sum()

    def gen():
        common.generate(pol.model, b.tokenizer, prompt_ids, prompt_mask, b.L, G, b.args.temperature,
                        1.0, 0)

    def fwd_bwd():
        for mb in mbs:
            logps, _ = common.per_token_logps(pol.model, p_ids[mb], p_mask[mb], completion_ids[mb],
                                              c_mask[mb], b.args.temperature)
            ((logps * c_mask[mb]).sum() / n).backward()

    def opt():
        common.optimizer_step(pol.model, pol.optimizer, 1.0, common.MetricAverager())

    def ref_fwd():
        with torch.no_grad():
            for mb in mbs:
                common.per_token_logps(pol.ref, p_ids[mb], p_mask[mb], completion_ids[mb],
                                       c_mask[mb], b.args.temperature)

    def clear_grads():
        pol.model.zero_grad(set_to_none=True)

    items = [Timed("gen", gen), Timed("fb", fwd_bwd, clear_grads), Timed("opt", opt, fwd_bwd)]
    if pol.ref is not None:
        items.append(Timed("ref", ref_fwd))
    items.append(Timed("full", lambda: grpo_step(b, pol, rows, beta), clear_grads))
    t = paired(items, b.args.repeats, b.args.warmup, device)
    t.setdefault("ref", [])
    R = len(t["full"])
    t["essential"] = [t["gen"][i] + mu * t["fb"][i] + (t["ref"][i] if t["ref"] else 0.0)
                      for i in range(R)]
    t["ratio"] = [t["full"][i] / t["essential"][i] for i in range(R)]
    t["ratio_opt"] = [t["full"][i] / (t["essential"][i] + mu * t["opt"][i]) for i in range(R)]
    sections: dict = {}
    grpo_step(b, pol, rows, beta, sections=sections)
    t["sections"] = sections
    t["decode"] = decode_profile(gen, b.L, device)
    if beta == b.args.betas[0]:
        t["decode_alternatives"] = decode_alternatives(
            pol.model, b.tokenizer, prompt_ids, prompt_mask, b.L, G, b.args.temperature,
            b.args.repeats, b.args.warmup, device)
    if med(t["ratio"]) > OVERHEAD_GOAL:
        with profile(activities=profiler_activities(device)) as prof:
            grpo_step(b, pol, rows, beta)
            now(device)
        t["profile"] = prof.key_averages().table(sort_by=self_time_key(device),
                                                 row_limit=b.args.profile_rows)
    return t


def main(argv=None) -> None:
    p = _bench.arg_parser(__doc__, "runs/bench_overhead")
    p.add_argument("--profile-rows", type=int, default=20, help="rows of the profiler table")
    args = _bench.parse_args(argv, p)
    b = _bench.start(args, "bench_overhead: a grpo.py step against its essential compute")
    part_overhead(b)
    _bench.write_report(b.report, b.raw, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
