"""Whose credit is right? Each method's per-token credit, scored against the true advantage.

    python benchmarks/credit_truth.py                       # the warm start of 2-4, 16 groups
    python benchmarks/credit_truth.py --arith-ops 6-8 --groups 8
    python benchmarks/credit_truth.py --run runs/grpo__tiny__arith__0__1700000000   # a checkpoint
    python benchmarks/credit_truth.py --quick               # a smoke run: 2 groups, K = 4

The truth. A completion y = y_0 .. y_{n-1} of a prompt x (y_{n-1} is EOS, or the length ran
out) earns r in {0, 1}. The value of a prefix is the chance that the policy, sampling from
there as training does (temperature 1), ends with a right and finished answer:

    V(s)  = P(reward 1 | x, s)
    A*_t  = V(y_<=t) - V(y_<t)          the true advantage of token t (VinePPO's target)
    V(y_<=n-1) = r                      the completion itself: nothing is left to sample
    sum_t A*_t = r - V(x)               it telescopes along the completion

V is estimated by K continuations of every DISTINCT prefix of the group's completions (shared
prefixes are continued once: the group's prefix tree), each from its own keyed random stream
(common.KeyedSampler, through spo.mc_rollout_rewards), so a run is reproducible and a prefix's
estimate does not depend on its batch. The streams are keyed apart from SPO-chain's own Monte
Carlo (TRUTH_SEED_OFFSET), so SPO is never scored against its own samples. Each A*_t has a
standard error, and the truth has a noise floor: the split-half reliability, the correlation of
A* from continuations 1..K/2 with A* from K/2+1..K over the same tokens.

The methods, on the very same groups, each with its own script's functions (credit_map.py's
credit_matrices, plus Dr. GRPO and the 80/20 mask from grpo.py). The credit of a token is the
signed number its method multiplies that token's log-prob gradient by, before the loss's
normaliser (GRPO's 1/|o|, Dr. GRPO's 1/L_max, DCPO's token mean), which is left out for every
method alike:

    GRPO, Dr. GRPO   grpo.compute_advantages (group / no std scaling), on every token
    GRPO 80/20       GRPO's A times grpo.entropy_token_mask (top 20% entropy, within the group)
    TEMPO            tempo.compute_tempo_advantages
    DCPO             dcpo.sas_advantages, a first visit
    SPO-chain        its defaults (rho 0.9, interval 5, even, N = 2), times its probability mask
    TW-GRPO          GRPO's A times grpo.tw_token_weights' w_t (the loss's per-token factor)
    D3S              GRPO's A on the rollouts and tokens D3S trains at its first step
    TDPO             minus its per-token KL (a penalty), only where it is not 0 everywhere
    TGDPO            the guidance token reward r_hat_t, only with a guidance model
    cDPO             +1 on a right answer's tokens (chosen, unweighted), -w_t on a wrong one's
                     (rejected, weighted); its two models from --cdpo-models, else fitted here
                     from the reference as token_dpo.py's first round fits them, on every prompt
                     sampled for the groups (--cdpo-sft-steps; 0 leaves the row out)

At the warm start policy = reference, so TDPO's KL is 0 and there is no guidance model: those
rows are left out, and the table says so.

The measures, per method, pooled over every completion token of every group, each with a 95%
percentile bootstrap interval over groups (the same resampled groups for every method):
  - Pearson r and Spearman rho of credit with A*, over all tokens, within wrong answers and
    within right ones. Pooling mixes groups: a method whose credit is constant in a completion
    (GRPO) correlates only through differences between completions and between groups.
  - first-error hit rate: over wrong answers, how often the token the method blames most (its
    lowest credit; ties share the hit evenly) is the first token that leaves the gold solution
    (the task's solution is determined step by step). Chance is the mean of 1/length.
  - blame on the innocent: of the negative credit a method puts on wrong answers, the share
    that falls before their first error, on tokens still on the gold path.
The row "MC truth" scores the truth itself: half 1 against half 2 for the correlations (the
split-half reliability: no method can be expected above it), and full-K A* for the rest.

Groups are sampled as training samples them (the same prompt format, G = 8, temperature 1, one
batched generate call of 8 prompts at a time, prompts in a seeded order), and only groups whose
rewards differ are kept: in the others every group-relative method gives no credit at all.

Cost: the truth's continuations dominate, about (distinct prefixes) x K x (mean tokens left)
generated tokens a group, so it grows with the square of the completion length. Measured on the
2-4 warm start, 16 groups, K = 64, one thread of a 2-core CPU (docs/study.md): 763 s in all, 738
s of them for 2,178 prefixes and 1.8M continuation tokens; the methods and the bootstrap, 18 s.
6-8 costs about five times as much a group (300 s against 59 s, both measured while other jobs
shared the cores). Fitting cDPO's two models adds 30 to 50 s. --quick (2 groups, K = 4, 50
bootstrap draws, 2 cDPO fitting steps) is a smoke run for the tests: 14 s.

Writes OUT.md, OUT.csv and OUT.json (default runs/credit_truth/credit_truth).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import credit_map  # noqa: E402
import grpo  # noqa: E402
import spo  # noqa: E402
import token_dpo  # noqa: E402

TRUTH_SEED_OFFSET = 1_000_003  # the truth's streams are never SPO-chain's (keyed by this + seed)
ENTROPY_QUANTILE = 0.2         # the 80/20 mask's share of tokens (Wang et al.)
SPO_RHO = 0.9                  # SPO's default probability threshold (spo.Args.rho)
MEASURES = ("pearson_all", "spearman_all", "pearson_wrong", "spearman_wrong",
            "pearson_correct", "spearman_correct", "first_error_hit", "innocent_blame")
TRUTH_ROW, CHANCE_ROW = "MC truth", "chance"


# ----------------------------------------------------------------------------------------
# Groups, sampled as training samples them
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def sample_groups(model, tokenizer, examples: list[dict], G: int, max_len: int, seed: int,
                  n_groups: int, prompts_per_call: int = 8,
                  max_prompts: int = 1000,
                  batches: Optional[list] = None) -> tuple[list[dict], int]:
    """Up to n_groups groups of G completions whose rewards differ, and the prompts drawn.

    Prompts in a seeded order, prompts_per_call at a time in one generate call (as a training
    step's rollout, temperature 1); rewards are common.finished_rewards. Each group is a dict in
    credit_map.sample_group's format (CPU tensors), so credit_map.credit_matrices reads it.
    With a list `batches`, every generate call's prompts and completions are appended to it, in
    credit_map.sample_group's "batch" format (the round cDPO's models are fitted on).
    """
    device = next(model.parameters()).device
    common.seed_everything(seed)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    order = order[:max_prompts]
    eos, groups, drawn = tokenizer.eos_token_id, [], 0
    for s in range(0, len(order), prompts_per_call):
        idx = order[s:s + prompts_per_call]
        drawn += len(idx)
        rows = common.tokenize_prompts(tokenizer, [examples[i] for i in idx], "arith", None,
                                       max_len)
        p_ids, p_mask = common.left_pad(rows, tokenizer.pad_token_id, device)
        c_ids = common.generate(model, tokenizer, p_ids, p_mask, max_len, G).cpu()
        texts = common.decode_completions(tokenizer, c_ids)
        rewards = common.finished_rewards(
            texts, [examples[i]["answer"] for i in idx for _ in range(G)], c_ids, eos)
        if batches is not None:
            batches.append({"examples": [examples[i] for i in idx], "prompt_rows": rows,
                            "completion_ids": c_ids, "texts": texts, "rewards": rewards})
        for g in range(len(idx)):
            r = rewards[g * G:(g + 1) * G]
            if r.min() == r.max():
                continue
            ids = c_ids[g * G:(g + 1) * G]
            mask = common.completion_mask_from_ids(ids, eos)
            L = int(mask.sum(1).max())  # drop the columns that are padding in every row
            groups.append({
                "example": examples[idx[g]], "prompt_row": rows[g],
                "prompt_ids": p_ids[g:g + 1].cpu().repeat(G, 1),
                "prompt_mask": p_mask[g:g + 1].cpu().repeat(G, 1),
                "completion_ids": ids[:, :L], "completion_mask": mask[:, :L],
                "rewards": r, "texts": texts[g * G:(g + 1) * G]})
            if len(groups) == n_groups:
                return groups, drawn
    return groups, drawn


def merge_batches(batches: list[dict], eos: int) -> dict:
    """sample_groups' generate calls as one round: a "batch" for credit_map.fit_cdpo_models.

    Completions are right-padded with EOS to the widest call's width; a completion's tokens end
    at its first EOS, so the padding changes no row (one without EOS already has the full width).
    """
    width = max(b["completion_ids"].size(1) for b in batches)
    pad = lambda ids: torch.nn.functional.pad(ids, (0, width - ids.size(1)), value=eos)  # noqa
    return {"examples": [e for b in batches for e in b["examples"]],
            "prompt_rows": [r for b in batches for r in b["prompt_rows"]],
            "completion_ids": torch.cat([pad(b["completion_ids"]) for b in batches]),
            "texts": [t for b in batches for t in b["texts"]],
            "rewards": torch.cat([b["rewards"] for b in batches])}


# ----------------------------------------------------------------------------------------
# The truth: Monte Carlo values of every distinct prefix, and the true advantages
# ----------------------------------------------------------------------------------------


def truth_prefixes(completion_ids: torch.Tensor,
                   completion_mask: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The distinct prefixes y_<t of a group's completions, and where each token's lies.

        index[i, t] = id of the prefix y_i,0 .. y_i,t-1 (t = 0: the prompt alone)   t < n_i
        index[i, t] = -1                                                            t >= n_i

    A prefix shared by several completions (the group's prefix tree) is listed once, so it is
    continued once. completion_ids, completion_mask [G, L]. Returns (prefixes as spo.py's
    PrefixKey (0, tokens), index [G, L]). The full completions are not prefixes: V = r there.
    Example: [7, 8, EOS] and [7, 9, EOS] -> prefixes (), (7,), (7, 8), (7, 9); index
    [[0, 1, 2], [0, 1, 3]]: 4 prefixes instead of 6.
    """
    G, L = completion_ids.shape
    t = torch.arange(L)[None, :].expand(G, L)
    starts = torch.where(completion_mask > 0, t, torch.full_like(t, -1))   # every token starts one
    return spo.plan_mc_prefixes(completion_ids, starts, torch.zeros(G, dtype=torch.long))


def true_advantages(mc_rewards: torch.Tensor, index: torch.Tensor, rewards: torch.Tensor,
                    completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """V-hat before and after each token, A* and its standard error, from K rollouts a prefix.

        V_hat(p)  = (1/K) sum_j R_pj                     se(p) = std_j(R_pj) / sqrt(K)  (K-1)
        before_t  = V_hat(y_<t)                          after_t = V_hat(y_<=t), = r at t = n-1
        A*_t      = after_t - before_t                   se_t = sqrt(se(y_<t)^2 + se(y_<=t)^2)
        (the two prefixes have independent streams; the last token's after is exact)

    mc_rewards [P, K] (rows as truth_prefixes' prefixes), index [G, L], rewards [G],
    completion_mask [G, L]. Returns float64 [G, L] tensors "before", "after", "adv", "se", 0 on
    padding. Example: one completion [a, b, EOS] with r = 1, V_hat((), (a,), (a, b)) = (0.5,
    0.75, 1.0) -> A* = [0.25, 0.25, 0.0], summing to r - V_hat(prompt) = 0.5.
    """
    R = mc_rewards.double()
    K = R.size(1)
    v = R.mean(1)                                                         # [P]
    se = R.std(1) / math.sqrt(K) if K > 1 else torch.zeros_like(v)        # [P]
    m = completion_mask > 0
    n = m.sum(1)                                                          # [G]
    i = index.clamp(min=0)
    before, se_b = torch.where(m, v[i], 0.0), torch.where(m, se[i], 0.0)
    nxt = torch.cat([i[:, 1:], i[:, :1]], 1)                              # y_<=t = y_<t+1
    last = torch.arange(index.size(1))[None, :] == (n - 1)[:, None]       # [G, L]
    after = torch.where(last, rewards.double()[:, None], v[nxt])
    se_a = torch.where(last, 0.0, se[nxt])
    after, se_a = torch.where(m, after, 0.0), torch.where(m, se_a, 0.0)
    return {"before": before, "after": after, "adv": after - before,
            "se": (se_b ** 2 + se_a ** 2).sqrt()}


@torch.no_grad()
def mc_truth(model, tokenizer, group: dict, K: int, max_len: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K continuations of every distinct prefix of one group, scored as training scores them.

    Returns (rewards [P, K], index [G, L] from truth_prefixes, tokens generated). Continuation
    j of prefix p comes from the stream keyed by (TRUTH_SEED_OFFSET + seed, p, j).
    """
    prefixes, index = truth_prefixes(group["completion_ids"], group["completion_mask"])
    mc, tokens = spo.mc_rollout_rewards(model, tokenizer, prefixes, [group["prompt_row"]],
                                        [group["example"]["answer"]], K, max_len,
                                        seed=TRUTH_SEED_OFFSET + seed)
    return mc, index, tokens


def split_half(mc_rewards: torch.Tensor, index: torch.Tensor, rewards: torch.Tensor,
               completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A* from continuations 1..K/2 and from K/2+1..K (two independent estimates), [G, L] each."""
    h = mc_rewards.size(1) // 2
    return tuple(true_advantages(part, index, rewards, completion_mask)["adv"]
                 for part in (mc_rewards[:, :h], mc_rewards[:, h:2 * h]))


# ----------------------------------------------------------------------------------------
# Where a wrong answer first leaves the gold solution
# ----------------------------------------------------------------------------------------


def gold_ids(tokenizer, example: dict) -> list[int]:
    """The gold solution's tokens and EOS: '25+2=27 27-13=14 14+28=42 #### 42' + EOS."""
    return tokenizer(example["solution"], add_special_tokens=False)["input_ids"] + \
        [tokenizer.eos_token_id]


def first_error(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                gold: list[int]) -> torch.Tensor:
    """The first token of each completion that differs from the gold solution, -1 if none.

        e_i = min { t < n_i : t >= |gold| or y_i,t != gold_t }      (-1 when the set is empty)

    Every step of the task's solution is determined by the question, so the first token off the
    gold path is the first error. completion_ids, completion_mask [G, L]; gold: ids with EOS.
    Returns LongTensor [G]. Example (tiny model, one token a character): gold '25+2=27 27-13=14
    14+28=42 #### 42' and completion '25+2=27 27-13=15 15+28=43 #### 43': e = 15, the '5'.
    """
    out = []
    for row, n in zip(completion_ids.tolist(), (completion_mask > 0).sum(1).tolist()):
        off = [t for t in range(n) if t >= len(gold) or row[t] != gold[t]]
        out.append(off[0] if off else -1)
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------------------
# Each method's credit on a group (each matrix comes from the method's own functions)
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def method_credits(group: dict, model, tokenizer, ref_model=None, guidance_model=None, *,
                   max_len: int, mc_seed: int = 0,
                   cdpo_models: Optional[tuple] = None) -> tuple[dict, list[str]]:
    """{method: signed credit [G, L]} for one group, and notes on the methods left out.

    credit_map.credit_matrices' panels, turned into the signed per-token factor of each method's
    policy gradient (see the module docstring), plus Dr. GRPO and GRPO 80/20 from grpo.py.
    """
    mats, notes = credit_map.credit_matrices(group, model, tokenizer, ref_model, guidance_model,
                                             max_len=max_len, mc_seed=mc_seed,
                                             cdpo_models=cdpo_models)
    ids, mask, r = group["completion_ids"], group["completion_mask"], group["rewards"]
    G, m = ids.size(0), mask > 0
    out = {"GRPO": mats["GRPO"],
           "Dr. GRPO": torch.where(m, grpo.compute_advantages(r, G, "none")[:, None], 0.0)}
    device = next(model.parameters()).device
    with common.autocast(device, torch.float32)():  # fp32 here: a no-op kept for the pattern
        _, ent = common.per_token_logps(model, group["prompt_ids"].to(device),
                                        group["prompt_mask"].to(device), ids.to(device),
                                        mask.to(device), 1.0, with_entropy=True)
    keep, _ = grpo.entropy_token_mask(ent.cpu(), mask.float(), ENTROPY_QUANTILE)
    out["GRPO 80/20"] = mats["GRPO"] * keep
    out["TEMPO"], out["DCPO"] = mats["TEMPO"], mats["DCPO"]
    out["SPO-chain"] = mats["SPO-chain"]
    out["TW-GRPO"] = mats["GRPO"] * mats["TW-GRPO: w_t"]
    out["D3S"] = mats["D3S: kept tokens' A"]
    if "TDPO: per-token KL" in mats:
        out["TDPO"] = -mats["TDPO: per-token KL"]
    if "TGDPO: guidance r_hat" in mats:
        out["TGDPO"] = mats["TGDPO: guidance r_hat"]
    if "cDPO: w_t" in mats:
        out["cDPO"] = torch.where(r[:, None] > 0, mask, -mats["cDPO: w_t"]) * mask
    return {k: v.double() for k, v in out.items()}, notes


# ----------------------------------------------------------------------------------------
# The measures (pure functions of per-group arrays, so the bootstrap reuses them)
# ----------------------------------------------------------------------------------------


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant (or has fewer than 2 values)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    top = np.cumsum(counts)                            # the highest rank of each distinct value
    return (top - (counts - 1) / 2.0)[inv]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the ranks (ties averaged)."""
    return pearson(ranks(x), ranks(y)) if len(x) >= 2 else float("nan")


def blamed_most(credit: torch.Tensor, n: int, e: int) -> float:
    """The share of the hit when the lowest-credit token of credit[:n] is token e.

    Ties share it evenly (a constant credit scores 1/n, chance), within a relative 1e-9.
    Example: credit [0.2, -0.5, -0.5, 0.1], e = 1 -> 0.5; e = 0 -> 0.
    """
    c = credit[:n].double()
    tied = c <= c.min() + 1e-9 * max(float(c.abs().max()), 1e-30)
    return float(tied[e]) / float(tied.sum())


def group_stats(credit: torch.Tensor, truth: torch.Tensor, completion_mask: torch.Tensor,
                rewards: torch.Tensor, errors: torch.Tensor,
                blame: Optional[torch.Tensor] = None) -> dict:
    """One group's numbers for pooled_measures: tokens, and hit and blame sums over wrong answers.

    credit, truth [G, L] (correlated), blame [G, L] (used for the hit rate and the blame on the
    innocent; default credit), completion_mask [G, L], rewards [G], errors [G] (first_error).
    """
    blame = credit if blame is None else blame
    m = completion_mask > 0
    wrong_tok = (rewards[:, None] <= 0).expand_as(m)[m]
    hit = chance = innocent = negative = 0.0
    n_err = 0
    for i in range(credit.size(0)):
        n, e = int(m[i].sum()), int(errors[i])
        if rewards[i] > 0 or e < 0:
            continue
        n_err += 1
        hit += blamed_most(blame[i], n, e)
        chance += 1.0 / n
        neg = (-blame[i, :n].double()).clamp(min=0)
        innocent, negative = innocent + float(neg[:e].sum()), negative + float(neg.sum())
    return {"x": credit[m].double().numpy(), "y": truth[m].double().numpy(),
            "wrong": wrong_tok.numpy(), "hit": hit, "n_err": n_err, "chance": chance,
            "innocent": innocent, "negative": negative}


def pooled_measures(stats: list[dict]) -> dict[str, float]:
    """The eight measures over the groups in `stats` (a group may appear more than once).

        pearson/spearman_{all, wrong, correct}   over the pooled tokens (wrong: reward 0)
        first_error_hit   sum hit / number of wrong answers with a first error
        innocent_blame    sum negative credit before the first error / sum negative credit
    NaN where undefined (constant credit, no wrong answer, no negative credit).
    """
    x = np.concatenate([s["x"] for s in stats])
    y = np.concatenate([s["y"] for s in stats])
    w = np.concatenate([s["wrong"] for s in stats])
    out = {}
    for part, sel in (("all", slice(None)), ("wrong", w), ("correct", ~w)):
        out[f"pearson_{part}"] = pearson(x[sel], y[sel])
        out[f"spearman_{part}"] = spearman(x[sel], y[sel])
    n_err, neg = sum(s["n_err"] for s in stats), sum(s["negative"] for s in stats)
    out["first_error_hit"] = sum(s["hit"] for s in stats) / n_err if n_err else float("nan")
    out["innocent_blame"] = sum(s["innocent"] for s in stats) / neg if neg > 0 else float("nan")
    return out


def bootstrap(stats_by_row: dict[str, list[dict]], n_boot: int,
              seed: int) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{row: {measure: (value, lo, hi)}}: the 95% percentile interval over groups.

    Every row is resampled with the same group indices (paired), n_boot times; a draw where a
    measure is undefined is left out of that measure's interval.
    """
    rng = np.random.default_rng(seed)
    n = len(next(iter(stats_by_row.values())))
    draws = [rng.integers(0, n, n) for _ in range(n_boot)]
    out = {}
    for row, stats in stats_by_row.items():
        point = pooled_measures(stats)
        boots = [pooled_measures([stats[j] for j in d]) for d in draws]
        out[row] = {}
        for k in MEASURES:
            vals = np.array([b[k] for b in boots])
            vals = vals[~np.isnan(vals)]
            lo, hi = (np.percentile(vals, [2.5, 97.5]) if len(vals) else (math.nan, math.nan))
            out[row][k] = (point[k], float(lo), float(hi))
    return out


def spearman_brown(r: float, factor: float) -> float:
    """The reliability of an average of `factor` times as many continuations, from r:
    factor * r / (1 + (factor - 1) * r). Example: split-half r = 0.6, factor 2 -> 0.75."""
    return factor * r / (1 + (factor - 1) * r) if r == r and r > 0 else math.nan


def rollouts_for(r_half: float, n_half: float, target: float) -> float:
    """Continuations a prefix needs for A* of reliability `target`, by Spearman-Brown from the
    split-half r of n_half continuations: n_half * target (1 - r) / (r (1 - target)).
    Example: r = 0.6 from 32 each -> 32 * 0.9 * 0.4 / (0.6 * 0.1) = 192 for 0.9."""
    if not (r_half == r_half and 0 < r_half < 1):
        return math.nan
    return n_half * target * (1 - r_half) / (r_half * (1 - target))


def score_groups(records: list[dict], n_boot: int, seed: int) -> dict:
    """The table's numbers from per-group records, each {"credits": {method: [G, L]},
    "truth", "half1", "half2": [G, L], "mask": [G, L], "rewards": [G], "errors": [G]}, and
    optionally "truth_se" [G, L] and "K" (for the reliability line).

    Rows: every method present in all records; "MC truth" (half 1 vs half 2 correlated, full-K
    A* for the hit rate and the blame); "chance" (uniform blame: the hit rate 1/length).
    Returns {"rows": bootstrap(...), "reliability": {...}, "counts": {...}}.
    """
    methods = [k for k in records[0]["credits"] if all(k in r["credits"] for r in records)]
    by_row = {k: [group_stats(r["credits"][k], r["truth"], r["mask"], r["rewards"], r["errors"])
                  for r in records] for k in methods}
    by_row[TRUTH_ROW] = [group_stats(r["half1"], r["half2"], r["mask"], r["rewards"],
                                     r["errors"], blame=r["truth"]) for r in records]
    table = bootstrap(by_row, n_boot, seed)
    chance = sum(s["chance"] for s in by_row[TRUTH_ROW])
    n_err = sum(s["n_err"] for s in by_row[TRUTH_ROW])
    table[CHANCE_ROW] = {k: (math.nan,) * 3 for k in MEASURES}
    table[CHANCE_ROW]["first_error_hit"] = ((chance / n_err) if n_err else math.nan,
                                            math.nan, math.nan)
    half = table[TRUTH_ROW]["pearson_all"][0]
    m = torch.cat([r["mask"].flatten() for r in records]) > 0
    se = torch.cat([r["truth_se"].flatten() for r in records])[m] if "truth_se" in records[0] \
        else torch.zeros(0)
    wrong = sum(int((r["rewards"] <= 0).sum()) for r in records)
    K = min(r["K"] for r in records) if "K" in records[0] else math.nan
    rel = {"split_half_r": half, "spearman_brown_K": spearman_brown(half, 2.0),
           "K_for_0.9": rollouts_for(half, K / 2, 0.9),
           "mean_se_of_A*": float(se.mean()) if se.numel() else math.nan}
    if "cutpoints" in records[0]:  # the same, over SPO's cutpoints only
        c = torch.cat([r["cutpoints"].flatten() for r in records])
        h1, h2 = (torch.cat([r[k].flatten() for r in records])[c].numpy()
                  for k in ("half1", "half2"))
        rel["cutpoint_tokens"] = int(c.sum())
        rel["split_half_r_cutpoints"] = pearson(h1, h2)
        rel["K_for_0.9_cutpoints"] = rollouts_for(rel["split_half_r_cutpoints"], K / 2, 0.9)
    return {"rows": table, "reliability": rel,
            "counts": {"groups": len(records), "tokens": int(m.sum()),
                       "completions": sum(r["rewards"].numel() for r in records),
                       "wrong": wrong, "wrong_with_first_error": int(n_err)}}


# ----------------------------------------------------------------------------------------
# The table: markdown, CSV, JSON
# ----------------------------------------------------------------------------------------

HEADERS = ("r all", "rho all", "r wrong", "rho wrong", "r right", "rho right",
           "first-error hit", "blame on innocent")


def _cell(v: tuple) -> str:
    value, lo, hi = v
    if value != value:
        return "n/a"
    if lo != lo:  # no interval (the chance row)
        return f"{value:.2f}"
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def table_markdown(scores: dict, notes: list[str], fitted: tuple = ()) -> str:
    """The markdown table: one row per method, then the truth and chance rows, then what was
    fitted here (cDPO's models) and the methods left out."""
    lines = ["| method | " + " | ".join(HEADERS) + " |", "|---" * (len(HEADERS) + 1) + "|"]
    for row, vals in scores["rows"].items():
        lines.append(f"| {row} | " + " | ".join(_cell(vals[k]) for k in MEASURES) + " |")
    rel, c = scores["reliability"], scores["counts"]
    lines += ["", f"{c['groups']} groups, {c['completions']} completions ({c['wrong']} wrong, "
              f"{c['wrong_with_first_error']} of them with a first error), {c['tokens']} tokens. "
              f"Split-half reliability of A*: r = {rel['split_half_r']:.3f} (Spearman-Brown for "
              f"all K: {rel['spearman_brown_K']:.3f}; continuations for 0.9: "
              f"{rel['K_for_0.9']:.0f}); mean standard error of A*: "
              f"{rel['mean_se_of_A*']:.3f}."
              + (f" On SPO's {rel['cutpoint_tokens']} cutpoints (p < {SPO_RHO}): split-half r = "
                 f"{rel['split_half_r_cutpoints']:.3f}, continuations for 0.9: "
                 f"{rel['K_for_0.9_cutpoints']:.0f}." if "cutpoint_tokens" in rel else "")
              + " n/a: undefined (a constant credit, or no case)."]
    lines += [f"- {n}" for n in fitted] + [f"- left out: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, scores: dict, notes: list[str], meta: dict) -> None:
    """OUT.md, OUT.csv (value, lo, hi per measure) and OUT.json (everything, with meta)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table_markdown(scores, notes, meta.get("fitted", ())))
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method"] + [f"{k}{s}" for k in MEASURES for s in ("", "_lo", "_hi")])
        for row, vals in scores["rows"].items():
            w.writerow([row] + [f"{x:.6g}" for k in MEASURES for x in vals[k]])
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "notes": notes, "reliability": scores["reliability"],
         "counts": scores["counts"],
         "rows": {r: {k: list(v) for k, v in vals.items()} for r, vals in scores["rows"].items()}},
        indent=1, default=float))


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def group_record(group: dict, model, tokenizer, ref, guidance, cdpo_models, *, K: int,
                 max_len: int, key: int, timer: Callable[[str, float], None]) -> tuple[dict, list]:
    """The truth and every method's credit on one group: a record for score_groups, and notes."""
    t0 = time.time()
    mc, index, tokens = mc_truth(model, tokenizer, group, K, max_len, key)
    timer("truth", time.time() - t0)
    timer("truth_tokens", tokens)
    timer("truth_prefixes", mc.size(0))
    r, mask = group["rewards"], group["completion_mask"]
    truth = true_advantages(mc, index, r, mask)
    h1, h2 = split_half(mc, index, r, mask)
    t0 = time.time()
    credits, notes = method_credits(group, model, tokenizer, ref, guidance, max_len=max_len,
                                    mc_seed=key, cdpo_models=cdpo_models)
    timer("methods", time.time() - t0)
    errors = first_error(group["completion_ids"], mask, gold_ids(tokenizer, group["example"]))
    # SPO's cutpoints (p < rho): the only tokens a dense SPO-chain would train, so the tokens
    # whose A* reliability sets the continuations it needs (part 2's oracle)
    device = next(model.parameters()).device
    with common.autocast(device, torch.float32)():
        old, _ = common.per_token_logps(model, group["prompt_ids"].to(device),
                                        group["prompt_mask"].to(device),
                                        group["completion_ids"].to(device), mask.to(device), 1.0)
    cut = spo.probability_mask(old.cpu(), mask, SPO_RHO) > 0
    return {"credits": credits, "truth": truth["adv"], "truth_se": truth["se"], "half1": h1,
            "half2": h2, "mask": mask, "rewards": r, "errors": errors, "K": K,
            "cutpoints": cut}, notes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default=None, help="a run folder: its last checkpoint is the policy")
    p.add_argument("--arith-ops", default=None, help="length setting; default: the run's, else 2-4")
    p.add_argument("--groups", type=int, default=16, help="groups (prompts) scored")
    p.add_argument("--k", type=int, default=64, help="K, continuations of each distinct prefix")
    p.add_argument("--seed", type=int, default=0, help="prompt order, sampling and MC keys")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap draws over groups")
    p.add_argument("--guidance-model", default=None, help="TGDPO's guidance model")
    p.add_argument("--cdpo-models", nargs=2, default=None, metavar=("POS", "NEG"),
                   help="cDPO's positive and negative model folders")
    p.add_argument("--cdpo-sft-steps", type=int, default=token_dpo.Args.ce_sft_steps,
                   help="without --cdpo-models: fit cDPO's two models for this many steps on "
                   "every prompt sampled here, as token_dpo.py's first round fits them on its "
                   "round (its --ce-sft-steps; about 30 s a thread); 0: no cDPO row")
    p.add_argument("--out", default="runs/credit_truth/credit_truth",
                   help="output prefix: OUT.md, OUT.csv, OUT.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 groups, K = 4, 50 draws, "
                   "at most 2 cDPO fitting steps")
    a = p.parse_args(argv)
    if a.quick:
        a.groups, a.k, a.boot = 2, 4, 50
        a.cdpo_sft_steps = min(a.cdpo_sft_steps, 2)
    try:
        _main(a)
    except common.UserError as e:
        common.fail(str(e))


def _main(a) -> None:
    if a.cdpo_sft_steps < 0:
        raise common.UserError(f"--cdpo-sft-steps must be at least 0 (got {a.cdpo_sft_steps}); "
                               "0 leaves the cDPO row out")
    if a.groups < 1 or a.k < 2 or a.boot < 1:
        raise common.UserError(f"--groups {a.groups}, --k {a.k}, --boot {a.boot}: need groups "
                               ">= 1, K >= 2 (two halves) and boot >= 1; pass e.g. --k 64")
    t_start = time.time()
    s = credit_map.load_setting(a.run, a.arith_ops, a.guidance_model, a.cdpo_models)
    config = s["config"]
    if float(config.get("temperature", 1.0)) != 1.0:
        raise common.UserError(f"{a.run} trained at temperature {config['temperature']}; the "
                               "methods' credit is computed at 1, the scripts' default")
    G = int(config.get("num_generations", 8))
    model, tok, max_len = s["model"], s["tokenizer"], s["max_len"]
    train = common.load_task("arith", "train", None, s["ops"])
    t0 = time.time()
    batches = []
    groups, drawn = sample_groups(model, tok, train, G, max_len, a.seed, a.groups,
                                  batches=batches)
    t_sample = time.time() - t0
    if not groups:
        raise common.UserError("no group with differing rewards in 1000 prompts; try another "
                               "--seed or a less or more trained --run")
    cdpo_models, fitted, t_cdpo = s["cdpo_models"], [], 0.0
    if cdpo_models is None and a.cdpo_sft_steps > 0:
        # one round: every prompt drawn above, as token_dpo.py fits its models on a round's samples
        t0 = time.time()
        round_ = {"batch": merge_batches(batches, tok.eos_token_id),
                  "completion_ids": groups[0]["completion_ids"]}
        cdpo_models, note = credit_map.fit_cdpo_models(round_, s["ref"], tok, a.cdpo_sft_steps,
                                                       a.seed)
        fitted.append(note)
        t_cdpo = time.time() - t0
    cost = {"truth": 0.0, "truth_tokens": 0, "truth_prefixes": 0, "methods": 0.0}

    def timer(k, v):
        cost[k] += v

    records, notes = [], []
    for g, group in enumerate(groups):
        rec, n = group_record(group, model, tok, s["ref"], s["guidance"], cdpo_models,
                              K=a.k, max_len=max_len, key=a.seed * 100_000 + g, timer=timer)
        records.append(rec)
        notes = notes or n
        print(f"group {g + 1}/{len(groups)}: {group['example']['question']} "
              f"rewards {group['rewards'].tolist()}, truth {cost['truth']:.0f}s so far",
              flush=True)
    t0 = time.time()
    scores = score_groups(records, a.boot, a.seed)
    t_boot = time.time() - t0
    meta = {"run": a.run, "arith_ops": s["ops"], "G": G, "K": a.k, "groups": len(groups),
            "prompts_drawn": drawn, "seed": a.seed, "boot": a.boot, "max_len": max_len,
            "threads": torch.get_num_threads(),
            "seconds": {"sample": round(t_sample, 1), "cdpo_fit": round(t_cdpo, 1),
                        "truth": round(cost["truth"], 1),
                        "methods": round(cost["methods"], 1), "bootstrap": round(t_boot, 1),
                        "total": round(time.time() - t_start, 1)},
            "truth_prefixes": cost["truth_prefixes"], "truth_tokens": cost["truth_tokens"],
            "fitted": fitted}
    out = Path(a.out)
    write_outputs(out, scores, notes, meta)
    print(table_markdown(scores, notes, fitted))
    print(f"{len(groups)} groups from {drawn} prompts; K = {a.k}: {cost['truth_prefixes']} "
          f"prefixes, {cost['truth_tokens']} continuation tokens; seconds {meta['seconds']}")
    print(f"wrote {out.with_suffix('.md')}, .csv and .json")


if __name__ == "__main__":
    main()
