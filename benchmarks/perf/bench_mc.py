"""SPO-chain's Monte Carlo values: one prefill per prefix against one per continuation.

spo.mc_rollout_rewards continues every boundary state (prompt + prefix) N times. It calls
common.generate_continuations, which encodes each prefix once and repeats its KV cache N
times, and drops a continuation from the batch when it ends. The reference is what it did
before: common.generate on the prefix rows repeated N times (each prefix encoded N times, and
every row stepped until the call's longest one ends). Both draw the same keyed samples, so the
rewards must be equal, and the script checks that they are.

    python benchmarks/perf/bench_mc.py --quick                      # smoke test
    OMP_NUM_THREADS=1 python benchmarks/perf/bench_mc.py            # 2-4: the oracle's prefixes
    OMP_NUM_THREADS=1 python benchmarks/perf/bench_mc.py --arith-ops 6-8

The prefixes are the oracle's (benchmarks/upper_bound.py: a cutpoint at every token below
rho = 0.9, N = 48) for one rollout batch of the shipped warm start, 16 prompts x 8 samples;
--max-prefixes takes an even spread over their lengths (sorted by length), so a run is short.
Each path runs --repeats times, alternating; the report gives the median. Printed, and written
as JSON to --out (runs/bench_mc/).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import spo  # noqa: E402


def repeated_rows(model, tok, rows, n, budgets, keys, temperature=1.0, top_p=1.0, top_k=0):
    """The previous path, as a stand-in for common.generate_continuations: one common.generate
    call on the rows repeated n times, to the longest budget (rows are cut at theirs later)."""
    ids, mask = common.left_pad(rows, tok.pad_token_id, "cpu")
    return common.generate(model, tok, ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0),
                           max(budgets), temperature=temperature, top_p=top_p, top_k=top_k,
                           row_keys=keys).tolist()


def reference_mc(model, tok, prefixes, prompts, answers, N, max_len, seed):
    """spo.mc_rollout_rewards with the previous path in place of generate_continuations."""
    new, common.generate_continuations = common.generate_continuations, repeated_rows
    try:
        return spo.mc_rollout_rewards(model, tok, prefixes, prompts, answers, N, max_len, seed=seed)
    finally:
        common.generate_continuations = new


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arith-ops", default="2-4", choices=["2-4", "6-8"], help="the task's length")
    p.add_argument("--num-rollouts", type=int, default=48, help="N, continuations per prefix")
    p.add_argument("--prompts", type=int, default=16, help="prompts in the rollout batch")
    p.add_argument("--max-prefixes", type=int, default=60,
                   help="prefixes timed, spread evenly over their lengths (0: all)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each path, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8 prefixes, N = 4, 1 repeat")
    p.add_argument("--out", default="runs/bench_mc", help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        args.max_prefixes, args.num_rollouts, args.repeats = 8, 4, 1

    common.seed_everything(args.seed)
    model, tok = common.load_model_and_tokenizer(common.TINY, torch.device("cpu"), torch.float32,
                                                 args.arith_ops)
    max_len, G = common.default_max_len("arith", args.arith_ops), 8
    train = common.load_task("arith", "train", None, args.arith_ops)[: args.prompts]
    prompts = common.tokenize_prompts(tok, train, "arith", common.context_length(model), max_len)
    answers = [ex["answer"] for ex in train]
    # one rollout batch, and the oracle's boundary states, as spo.chain_batch plans them
    ids, mask = common.left_pad(prompts, tok.pad_token_id, "cpu")
    completions = common.generate(model, tok, ids, mask, max_len, G)
    c_mask = common.completion_mask_from_ids(completions, tok.eos_token_id)
    old, _ = spo.old_logps_and_entropies(model, ids.repeat_interleave(G, 0),
                                         mask.repeat_interleave(G, 0), completions, c_mask, 1.0, 32)
    starts = spo.segment_starts(spo.probability_mask(old, c_mask, 0.9) > 0, 1, "even")
    prefixes, _ = spo.plan_mc_prefixes(completions, starts, torch.arange(len(completions)) // G)
    everything = len(prefixes)
    if args.max_prefixes and len(prefixes) > args.max_prefixes:
        by_len = sorted(prefixes, key=lambda q: len(q[1]))
        step = len(by_len) / args.max_prefixes
        prefixes = [by_len[int(i * step)] for i in range(args.max_prefixes)]

    N, times, results = args.num_rollouts, {"new": [], "reference": []}, {}
    for _ in range(args.repeats):
        for name, fn in [("reference", reference_mc), ("new", spo.mc_rollout_rewards)]:
            t0 = time.perf_counter()
            results[name] = fn(model, tok, prefixes, prompts, answers, N, max_len, seed=args.seed)
            times[name].append(time.perf_counter() - t0)
    same = torch.equal(results["new"][0], results["reference"][0])
    new, ref = statistics.median(times["new"]), statistics.median(times["reference"])
    report = dict(arith_ops=args.arith_ops, num_rollouts=N, prefixes=len(prefixes),
                  prefixes_in_batch=everything, rollouts=len(prefixes) * N,
                  tokens=results["new"][1], seconds_new=round(new, 2),
                  seconds_reference=round(ref, 2), speedup=round(ref / new, 2),
                  same_rewards=same, threads=torch.get_num_threads(),
                  cpu=common.cpu_description(), torch=torch.__version__)
    print(f"ops {args.arith_ops}: {len(prefixes)} of the batch's {everything} prefixes x N = {N} "
          f"= {len(prefixes) * N} continuations, {results['new'][1]} tokens; "
          f"one prefill per prefix {new:.2f}s, one per continuation {ref:.2f}s "
          f"({ref / new:.2f}x); same rewards: {same}; {torch.get_num_threads()} thread(s); "
          f"{common.cpu_description()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_mc_{args.arith_ops}.json").write_text(json.dumps(report, indent=1))
    if not same:
        sys.exit("the two paths gave different rewards")
    return report


if __name__ == "__main__":
    main()
