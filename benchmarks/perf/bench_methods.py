"""What each method adds to a GRPO step, from the scripts' own functions on one batch.

One batch sampled by the model (its natural lengths) with one _bench.grpo_step; then, paired
(benchmarks/perf/_bench.py): TEMPO's prefix tree and advantages, DCPO's SAS statistics and its loss,
SPO-chain's old-log-prob forward, segment planning and Monte Carlo continuations (with the extra
tokens generated), and TDPO2's full-vocabulary KL against DPO on pairs made from the batch. Each
"extra" is the method's time minus what GRPO does in its place, a median of paired differences.

    python benchmarks/perf/bench_methods.py --quick                     # smoke test, CPU
    python benchmarks/perf/bench_methods.py --model tiny                # the warm-started model
    python benchmarks/perf/bench_methods.py --device cuda --model /tmp/smollm2 --prompts 16 \\
        --num-generations 8 --completion-length 256 --repeats 3 --mc-rollouts 4 \\
        --out runs/bench_methods_smollm2                                          # GPU, SmolLM2

It is the slow one with a real model: SPO-chain continues every boundary state N times (spo.py's
default N is 9 for hub models), thousands of generated rows per step; --repeats and --mc-rollouts
keep it short. With a random model nearly every token has p < 0.9, so SPO-chain's cost is near its
worst case; --model tiny gives the typical case.

The report is printed and written, with the raw timings as JSON, to --out (runs/bench_methods/).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from _bench import (RANDOM_MODELS, Bench, Timed, fmt_t, grpo_step, make_policy, med, paired,
                    parity_reward, EPSILON)  # noqa: E402
import common  # noqa: E402
import dcpo  # noqa: E402
import grpo  # noqa: E402
import spo  # noqa: E402
import tempo  # noqa: E402
import token_dpo  # noqa: E402


def part_methods(b: Bench) -> None:
    rep, device, G, mu = b.report, b.device, b.G, b.mu
    B, T = b.P * b.G, b.args.temperature
    pol = make_policy(b, 0.0, fixed_length=False)  # natural lengths: trees, cutpoints need text
    ref = b.load(frozen=True)
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
        grpo.grpo_loss(logps, old, adv, c_mask, epsilon_low=EPSILON, epsilon_high=EPSILON,
                       loss_type="grpo", num_sequences=B, num_tokens=num_tokens,
                       max_completion_length=b.L)[0].backward()

    def dcpo_loss_bwd():
        logps.grad = None
        dcpo.dcpo_loss(logps, old, adv, c_mask, eps_low=0.16, eps_high=0.20, ratio_max=10.0,
                       loss_type="otm", num_sequences=B, num_tokens=num_tokens,
                       num_generations=G)[0].backward()

    # SPO-chain: the old-log-prob forward it needs before its advantages, then segments, MC values
    n_rollouts = b.args.mc_rollouts or (spo.TINY_NUM_ROLLOUTS
                                        if b.args.model in ("tiny", "tiny-random")
                                        else spo.HUB_NUM_ROLLOUTS)
    spo_out = {}

    def spo_old_logps():
        with torch.no_grad():
            outs = [common.per_token_logps(pol.model, p_ids[s:s + b.mbs], p_mask[s:s + b.mbs],
                                           c_ids[s:s + b.mbs], c_mask[s:s + b.mbs], T, True)
                    for s in range(0, B, b.mbs)]
        spo_out["old"] = torch.cat([o[0] for o in outs])

    def spo_plan_and_mc():
        prob_mask = spo.probability_mask(spo_out["old"], c_mask, 0.9)
        starts = spo.segment_starts(prob_mask.cpu() > 0, 5, "even")
        prefixes, index = spo.plan_mc_prefixes(c_ids.cpu(), starts, torch.arange(B) // G)
        mc_rewards, mc_tokens = spo.mc_rollout_rewards(pol.model, b.tokenizer, prefixes, rows,
                                                       answers, n_rollouts, b.L, T, 1.0, 0, 512)
        spo.chain_advantages(spo.mc_values(mc_rewards, index), rewards, starts, c_mask.cpu())
        spo_out.update(prefixes=len(prefixes), tokens=mc_tokens, rollouts=mc_rewards.numel())

    # TDPO2 against DPO, on pairs of neighbouring completions of one prompt, all in one micro-batch
    lengths = c_mask.sum(1).long().tolist()
    ids = c_ids.tolist()
    pairs = [{"prompt": rows[g], "chosen": ids[i][:lengths[i]],
              "rejected": ids[i + 1][:lengths[i + 1]]}
             for g in range(b.P) for i in range(g * G, g * G + G - 1, 2)]  # G // 2 pairs a prompt
    pair_batch = common.collate_pairs(pairs, b.tokenizer.pad_token_id, device)
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
        hidden = common.response_hidden_states(pol.model, *pair_batch)
        with torch.no_grad():
            ref_hidden = common.response_hidden_states(ref, *pair_batch)
        lp, rlp, kl = token_dpo.token_logps_and_kl(hidden, ref_hidden, pair_batch[2], pair_batch[3],
                                                   head, ref_head,
                                                   256)  # token_dpo.py's default --kl-chunk-size
        if loss_name == "dpo":
            kl = kl.detach()
        (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (x.chunk(2)
                                                  for x in (lp, rlp, pair_batch[3], kl))
        loss = (token_dpo.dpo_loss(pw, pl, rw, rl, mw, ml, 0.1, kw, kr)[0] if loss_name == "dpo"
                else token_dpo.tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, 0.1, 0.5, version=2)[0])
        loss.backward()

    def clear():
        pol.model.zero_grad(set_to_none=True)

    items = [Timed("grpo step", lambda: grpo_step(b, pol, rows, 0.0), clear),
             Timed("grpo advantages", lambda: grpo.compute_advantages(rewards, G)),
             Timed("tempo advantages",
                   lambda: tempo.compute_tempo_advantages(rewards, G, c_ids.cpu(), c_mask.cpu())),
             Timed("dcpo sas", lambda: dcpo.sas_advantages(rewards, G, keys, stats)),
             Timed("grpo loss+bwd", grpo_loss_bwd), Timed("dcpo loss+bwd", dcpo_loss_bwd),
             Timed("spo old logps", spo_old_logps),
             Timed("spo plan+mc", spo_plan_and_mc, spo_old_logps),
             Timed("dpo (gathered)", dpo_plain),
             Timed("dpo (token_dpo.py)", lambda: chunked("dpo")),
             Timed("tdpo2 (token_dpo.py)", lambda: chunked("tdpo2"))]
    t = paired(items, b.args.repeats, b.args.warmup, device)
    clear()
    step = med(t["grpo step"])
    diff = lambda x, y: [xi - yi for xi, yi in zip(t[x], t[y])]  # noqa: E731
    tempo_extra = med(diff("tempo advantages", "grpo advantages"))
    dcpo_extra = (med(diff("dcpo sas", "grpo advantages"))
                  + mu * med(diff("dcpo loss+bwd", "grpo loss+bwd")))
    spo_extra = med(t["spo old logps"]) + med(t["spo plan+mc"])
    tdpo_extra = med(diff("tdpo2 (token_dpo.py)", "dpo (gathered)"))
    rep.append("## Method overheads, as a share of the step\n")
    rep.append(f"One batch of {B} completions sampled by the model at its natural lengths (mean "
               f"{mean_len:.1f} tokens, max {b.L}); grpo.py step on it: {fmt_t(t['grpo step'])}. "
               "Extra = the method's time minus what GRPO does in its place, medians of paired "
               "differences.\n")
    rep.append("| method | what is timed | times | extra per step | share |")
    rep.append("|---|---|---|---|---|")
    rep.append(f"| TEMPO | tempo.compute_tempo_advantages (prefix tree, TD, advantages) vs "
               f"grpo.compute_advantages | {fmt_t(t['tempo advantages'])} vs "
               f"{fmt_t(t['grpo advantages'])} | {1e3 * tempo_extra:.1f} ms | "
               f"{100 * tempo_extra / step:.1f}% of the GRPO step |")
    rep.append(f"| DCPO | dcpo.sas_advantages (prompts seen once before) and dcpo.dcpo_loss + "
               f"backward on [B, L] log-probs (x mu) vs GRPO's | SAS {fmt_t(t['dcpo sas'])}; loss "
               f"{fmt_t(t['dcpo loss+bwd'])} vs {fmt_t(t['grpo loss+bwd'])} | "
               f"{1e3 * dcpo_extra:.1f} ms | {100 * dcpo_extra / step:.1f}% of the GRPO step |")
    rep.append(f"| SPO-chain | no-grad old-log-prob forward + probability mask, segments, "
               f"{spo_out.get('prefixes')} boundary states x N = {n_rollouts} MC continuations, "
               f"chain advantages | old log-probs {fmt_t(t['spo old logps'])}; plan + MC "
               f"{fmt_t(t['spo plan+mc'])} | {1e3 * spo_extra:.1f} ms, {spo_out.get('tokens')} "
               f"extra tokens ({spo_out.get('tokens', 0) / max(c_mask.sum().item(), 1):.1f}x the "
               f"batch's {int(c_mask.sum())}) | {100 * spo_extra / (step + spo_extra):.1f}% of "
               f"(GRPO step + this) |")
    rep.append(f"| TDPO2 | token_dpo.py step with the full-vocabulary KL in the loss vs DPO from "
               f"gathered log-probs (common.per_token_logps), {len(pairs)} pairs | tdpo2 "
               f"{fmt_t(t['tdpo2 (token_dpo.py)'])}; "
               f"dpo in token_dpo.py (KL logged) {fmt_t(t['dpo (token_dpo.py)'])}; dpo gathered "
               f"{fmt_t(t['dpo (gathered)'])} | {1e3 * tdpo_extra:.1f} ms | "
               f"{100 * tdpo_extra / med(t['tdpo2 (token_dpo.py)']):.1f}% of a TDPO2 loss step |")
    rep.append("")
    if b.args.model in RANDOM_MODELS:
        rep.append("With a random model nearly every token has p < 0.9, so SPO-chain cuts at "
                   "almost every token and its MC cost is near its worst case; TEMPO's groups "
                   "share almost no prefix. A trained model (--model tiny, or a real folder) gives "
                   "the typical case.\n")
    b.raw["methods"] = dict(t, mean_completion_length=mean_len, spo=spo_out, mc_rollouts=n_rollouts,
                            extra_s={"tempo": tempo_extra, "dcpo": dcpo_extra, "spo": spo_extra,
                                     "tdpo2": tdpo_extra})


def main(argv=None) -> None:
    p = _bench.arg_parser(__doc__, "runs/bench_methods")
    p.add_argument("--mc-rollouts", type=int, default=0,
                   help="SPO's N; 0 = spo.py's default for the model")
    args = _bench.parse_args(argv, p)
    b = _bench.start(args, "bench_methods: what each method adds to a GRPO step")
    part_methods(b)
    _bench.write_report(b.report, b.raw, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
