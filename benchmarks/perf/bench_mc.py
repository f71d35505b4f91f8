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
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import spo  # noqa: E402


def reference_mc(model, tok, prefixes, prompts, answers, N, max_len, seed, batch_size=512):
    """The previous path: each chunk's rows repeated N times into one common.generate call."""
    rewards, tokens, eos = torch.zeros(len(prefixes), N), 0, tok.eos_token_id
    order = sorted(range(len(prefixes)), key=lambda p: len(prefixes[p][1]))
    per_call = max(1, batch_size // N)
    for s in range(0, len(order), per_call):
        chunk = order[s:s + per_call]
        rows = [prompts[prefixes[p][0]] + list(prefixes[p][1]) for p in chunk]
        ids, mask = common.left_pad(rows, tok.pad_token_id, "cpu")
        keys = [spo.mc_stream_key(seed, prefixes[p], j) for p in chunk for j in range(N)]
        out = common.generate(model, tok, ids.repeat_interleave(N, 0), mask.repeat_interleave(N, 0),
                              max_len - len(prefixes[chunk[0]][1]), row_keys=keys).tolist()
        texts, finished = [], []
        for r, row in enumerate(out):
            prefix = list(prefixes[chunk[r // N]][1])
            cont, done = spo._cut_at_eos(row, eos, max_len - len(prefix))
            tokens += len(cont)
            texts.append(tok.decode(prefix + cont, skip_special_tokens=True))
            finished.append(done)
        golds = [answers[prefixes[p][0]] for p in chunk for _ in range(N)]
        scores = torch.tensor(common.reward_fn(texts, golds)) * torch.tensor(finished).float()
        rewards[chunk] = scores.view(len(chunk), N)
    return rewards, tokens


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
        for name, fn in [("reference", reference_mc), ("new", None)]:
            t0 = time.perf_counter()
            if fn is None:
                results[name] = spo.mc_rollout_rewards(model, tok, prefixes, prompts, answers, N,
                                                       max_len, seed=args.seed)
            else:
                results[name] = fn(model, tok, prefixes, prompts, answers, N, max_len, args.seed)
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
