"""Token-level DPO: DPO, TDPO1/2, TGDPO, cDPO and TAB-PO on verified on-policy pairs (iterative).

Papers: Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290 (NeurIPS 2023);
Zeng et al., "Token-level Direct Preference Optimization", arXiv 2404.11999 (ICML 2024);
Zhu et al., "TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference
Optimization", arXiv 2506.14574 (ICML 2025); Rafailov et al., "From r to Q*", arXiv 2404.12358;
Lin et al., "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning
Capability", arXiv 2411.19943 (ICML 2025); Fodeh et al., "TAB-PO: Preference Optimization with
a Token-Level Adaptive Barrier for Token-Critical Structured Generation", arXiv 2603.00025.
Docs: docs/token_dpo.md (the math, the defaults and where each choice comes from).

Each round samples G answers per prompt from the current policy, verifies them, and pairs a
correct answer (chosen) with an incorrect one (rejected). The policy then trains a few epochs
on that round's pairs with a logistic loss on how much more it prefers the chosen answer than
the frozen reference does. TDPO adds each answer's full-vocabulary KL to the reference, token
by token; TGDPO weights each token by a frozen guidance model's token reward. cDPO weights each
token of the rejected answer by how "critical" it is: 1 - c_t, where c_t is the token's
probability under the contrast of two models briefly fine-tuned each round, one on the round's
correct answers and one on its incorrect ones. TAB-PO compares token-weighted MEAN log-ratios
(tokens where the two answers differ weigh 1.2) and adds an NLL "barrier" on the chosen answer's
tokens that the current policy gives probability below 0.66.

    python token_dpo.py                               # CPU: tiny model + arithmetic, TDPO2
    python token_dpo.py --loss dpo                    # plain DPO (also: tdpo1, tgdpo, cdpo)
    python token_dpo.py --loss tabpo                  # TAB-PO (its own beta: 0.5)
    python token_dpo.py --loss cdpo --show-credit 1   # cDPO, printing one rejected answer's weights
    python token_dpo.py --pairs-file pairs.jsonl      # your own {prompt, chosen, rejected} lines
    python token_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k   # one GPU, a hub model

On a 2-core CPU the default run takes about 3 minutes after the warm start (cDPO about twice
that): about 8 rounds of 128 prompts x 8 samples, 2 epochs over each round's pairs, 80 optimizer
steps. docs/token_dpo.md, "Our results", has every loss over 3 seeds, with the command.

The loop is grpo.py's, one optimizer step a step: a step that finds no batch left opens a new
round (1. rollout, 2. a no-grad pass over the fresh samples, 3. the round's pairs), then
4. one optimizer step on a batch of pairs, 5. log, evaluate, checkpoint. Two flags differ from
the RL scripts' on purpose: --pairs-per-step (pairs, not prompts, per optimizer step) and
--sampling-temperature (it shapes only the data: DPO's log-probs always use T = 1).

The loss starts at ln 2 = 0.693 exactly (policy = reference, so every log-ratio is 0; TAB-PO adds
its barrier to that), and the first TDPO step equals the DPO step (the KL's gradient is 0 there).
`logps/chosen` often FALLS while training works: watch `rewards/margins`, `rewards/accuracies`
and `eval/accuracy`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from common import UserError

TINY_LEARNING_RATE = 5e-5  # the one value for the embedded tiny model, shared by every script
HUB_LEARNING_RATE = 1e-6
DPO_BETA = 0.1    # the sum-based losses' beta (DPO, TDPO, TGDPO, cDPO)
TABPO_BETA = 0.5  # TAB-PO's (its official code's): it scales a weighted MEAN, not a sum


@dataclass
class Args:
    """Token-level DPO (DPO, TDPO1, TDPO2, TGDPO, cDPO, TAB-PO) on verified on-policy pairs."""
    # --- run ---
    seed: int = field(default=0, metadata={"range": "[0, SEED_MAX]", "help":
        "random seed (python, numpy, torch, prompt order)"})
    model: str = field(default="tiny", metadata={"range": "model", "help":
        "'tiny' (embedded, warm-started on first use), a hub id or a save_pretrained folder"})
    task: Literal["arith", "gsm8k"] = field(default="arith", metadata={"help":
        "arith: embedded multi-step arithmetic; gsm8k: grade-school math"})
    arith_ops: str = field(default="2-4", metadata={"range": "arith_ops", "help":
        "arith: operations per problem, LO-HI (at least 2; longer chains, longer answers)"})
    data_dir: Optional[str] = field(default=None, metadata={"range": "data_dir", "help":
        "folder with GSM8K train.jsonl/test.jsonl, or hub (needs `datasets`)"})
    total_steps: int = field(default=80, metadata={"range": ">0", "help":
        "optimizer steps, each on a batch of pairs_per_step pairs (a round with no pairs uses "
        "one step)"})
    eval_every: int = field(default=20, metadata={"range": ">0", "help":
        "greedy held-out evaluation every N steps"})
    eval_size: int = field(default=500, metadata={"range": ">0", "help":
        "held-out examples for greedy evaluation"})
    save_every: int = field(default=50, metadata={"range": ">0", "help":
        "checkpoint every N steps (also on SIGINT/SIGTERM and at the end)"})
    output_dir: str = field(default="runs", metadata={"range": "output_dir", "help":
        "parent folder of the run folder"})
    resume: Optional[str] = field(default=None, metadata={"range": "run_dir", "help":
        "a run folder to continue from its last good checkpoint"})
    device: str = field(default="auto", metadata={"range": "device", "help":
        "auto, cpu, cuda, cuda:1, ..."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "range": "dtype", "help": "compute dtype of every forward pass (autocast); the policy's "
        "weights, gradients and AdamW state are always fp32, frozen models are stored in it; "
        "auto = bfloat16 on a GPU that has it, else float32; float16 is refused"})
    micro_batch_size: int = field(default=32, metadata={"range": ">0", "help":
        "sequences per forward/backward, a pair being 2 (gradient accumulation; same result)"})
    log_completions_every: int = field(default=10, metadata={"range": ">0", "help":
        "write the first group of every N-th round's samples to completions.jsonl"})
    # --- shared base settings: identical in every script (docs/grpo.md, "Defaults") ---
    num_generations: int = field(default=8, metadata={"range": ">=1", "help":
        "G, completions sampled per prompt to build pairs"})
    pairs_per_step: int = field(default=16, metadata={"range": ">0", "help":
        "pairs per optimizer step (the RL scripts' --prompts-per-step, counted in pairs)"})
    learning_rate: Optional[float] = field(default=None, metadata={"range": ">0", "help":
        f"AdamW lr; default {HUB_LEARNING_RATE} for hub models, {TINY_LEARNING_RATE} for the "
        "tiny model"})
    max_grad_norm: float = field(default=1.0, metadata={"range": ">0", "help":
        "gradient-norm clip"})
    max_bad_steps: int = field(default=5, metadata={"range": ">=0", "help":
        "stop after this many steps in a row with a non-finite loss or gradient (0: never)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help":
        "recompute activations in backward: less memory for bigger models, about one more "
        "forward of compute"})
    sampling_temperature: float = field(default=1.0, metadata={"range": ">0", "help":
        "temperature of the rounds' samples; unlike the RL scripts' --temperature it never "
        "touches the log-probs, which always use T = 1"})
    top_p: float = field(default=1.0, metadata={"range": "(0, 1]", "help":
        "nucleus sampling for pair building"})
    top_k: int = field(default=0, metadata={"range": ">=0", "help":
        "top-k sampling for pair building, 0 = off"})
    max_completion_length: Optional[int] = field(default=None, metadata={"range": ">0", "help":
        "max new tokens; default 48 for arith, 512 for gsm8k"})
    # --- token_dpo-specific ---
    loss: Literal["dpo", "tdpo1", "tdpo2", "tgdpo", "cdpo", "tabpo"] = field(
        default="tdpo2", metadata={"help":
            "dpo; tdpo1/tdpo2: + sequential KL (Zeng et al.); tgdpo: guidance token weights "
            "(Zhu et al.); cdpo: critical-token weights on the rejected answer (Lin et al.); "
            "tabpo: weighted mean margin + barrier on unlikely chosen tokens (Fodeh et al.)"})
    beta: Optional[float] = field(default=None, metadata={"range": ">0", "help":
        f"DPO's beta: scale of the log-ratios (not the RL scripts' KL coefficient); default "
        f"{DPO_BETA}, and {TABPO_BETA} for tabpo (it scales a weighted mean, not a sum)"})
    alpha: float = field(default=0.5, metadata={"range": ">=0", "help":
        "TDPO2: weight of the KL term; TGDPO: weight of the guidance token reward"})
    prompts_per_round: int = field(default=128, metadata={"range": ">0", "help":
        "prompts sampled (G answers each, one generate call) to build one round's pairs"})
    epochs_per_round: int = field(default=2, metadata={"range": ">0", "help":
        "passes over a round's pairs before the next round samples new ones"})
    pairs_per_prompt: int = field(default=1, metadata={"range": ">0", "help":
        "(correct, incorrect) pairs drawn per prompt, without reuse"})
    pairs_file: Optional[str] = field(default=None, metadata={"range": "file", "help":
        "JSONL of {prompt, chosen, rejected} to train on instead of sampling (prompt = the "
        "question)"})
    guidance_model: Optional[str] = field(default=None, metadata={"range": "model", "help":
        "TGDPO guidance model (same tokenizer); default: the policy after the first DPO round"})
    kl_chunk_size: int = field(default=256, metadata={"range": ">0", "help":
        "response positions per chunk of the full-vocabulary log-softmax (memory vs speed)"})
    ce_beta: float = field(default=1.0, metadata={"range": ">=0", "help":
        "cDPO: lambda in log c = (1+lambda) log pi_pos - lambda log pi_neg - log Z (the "
        "paper's beta); 0 = the positive model's own probability"})
    ce_sft_steps: int = field(default=30, metadata={"range": ">=0", "help":
        "cDPO: AdamW steps of each round's positive and negative fine-tune (each from a "
        "fresh copy of the reference)"})
    ce_sft_rows: int = field(default=32, metadata={"range": ">0", "help":
        "cDPO: rows per fine-tune step, drawn with replacement from the positive (or "
        "negative) set"})
    ce_sft_lr: float = field(default=3e-4, metadata={"range": ">0", "help":
        "cDPO: learning rate of the positive and negative fine-tunes (the paper's 3e-4)"})
    tabpo_tau: float = field(default=0.66, metadata={"range": ">=0", "help":
        "TAB-PO: a chosen token whose policy probability is below tau enters the barrier"})
    tabpo_barrier_weight: float = field(default=0.5, metadata={"range": ">=0", "help":
        "TAB-PO: lambda, the barrier's weight (0 = no barrier)"})
    tabpo_diff_weight: float = field(default=1.2, metadata={"range": ">0", "help":
        "TAB-PO: token weight where the two answers differ at the same offset (1 = none)"})
    show_credit: int = field(default=0, metadata={"range": ">=0", "help":
        "cDPO: every N rounds print one rejected answer with each token's weight w_t "
        "(colour on a terminal); 0 = off"})


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: on-policy, verified pairs (what the advantage is to the RL scripts)
# ----------------------------------------------------------------------------------------


def build_pairs(rewards: torch.Tensor, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, num_generations: int, pairs_per_prompt: int,
                generator: torch.Generator) -> tuple[list[tuple[int, int, int]], dict]:
    """Pair a verified-correct answer with a verified-incorrect one of the same prompt.

        group g = rows [g*G, (g+1)*G);  C = {i : r_i > 0.5},  W = the rest (truncated: r = 0)
        C or W empty -> skip the prompt (counted as all-correct or all-wrong)
        else shuffle C and W, zip them: pairs (C[k], W[k]) without reuse, at most
        pairs_per_prompt; a pair whose response token ids are identical is skipped (no signal)

    rewards [B]; completion_ids, completion_mask [B, L] (mask 1 up to and incl. the first EOS).
    Returns [(g, chosen_row, rejected_row)] and counts pairs/built, pairs/skipped_all_correct,
    pairs/skipped_all_wrong, pairs/skipped_identical.

    Example, G = 4: rewards [1,0,0,1, 1,1,1,1, 0,0,0,0, 0,1,0,0] -> (0, 0 or 3, 1 or 2) and
    (3, 13, 12/14/15); one prompt skipped all-correct and one all-wrong.
    """
    G = num_generations
    lengths = completion_mask.sum(-1).long().tolist()
    ids, correct = completion_ids.tolist(), (rewards > 0.5).tolist()
    pairs, counts = [], {"pairs/skipped_all_correct": 0, "pairs/skipped_all_wrong": 0,
                         "pairs/skipped_identical": 0}
    for g in range(len(correct) // G):
        C = [i for i in range(g * G, (g + 1) * G) if correct[i]]
        W = [i for i in range(g * G, (g + 1) * G) if not correct[i]]
        if not C or not W:
            counts["pairs/skipped_all_correct" if C else "pairs/skipped_all_wrong"] += 1
            continue
        C = [C[k] for k in torch.randperm(len(C), generator=generator).tolist()]
        W = [W[k] for k in torch.randperm(len(W), generator=generator).tolist()]
        made = 0
        for c, w in zip(C, W):
            if made == pairs_per_prompt:
                break
            if ids[c][:lengths[c]] == ids[w][:lengths[w]]:  # not with a deterministic verifier
                counts["pairs/skipped_identical"] += 1
                continue
            pairs.append((g, c, w))
            made += 1
    return pairs, {"pairs/built": len(pairs), **counts}


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where a and b differ (the shorter length if one is a prefix)."""
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def pair_stats(pairs: list[dict]) -> dict:
    """Mean response lengths (sums grow with length: watch for length bias) and where pairs
    diverge."""
    if not pairs:
        return {}
    n = len(pairs)
    return {"pairs/len_chosen": sum(len(p["chosen"]) for p in pairs) / n,
            "pairs/len_rejected": sum(len(p["rejected"]) for p in pairs) / n,
            "pairs/first_diff_pos": sum(first_difference(p["chosen"], p["rejected"])
                                        for p in pairs) / n}


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: per-token log-probs and the full-vocabulary KL, one chunk of positions at a time
# ----------------------------------------------------------------------------------------

KL_MIN = -1e-6  # a KL is >= 0; fp32 rounding stays above this, a bug does not


def _chunk_terms(h: torch.Tensor, h_ref: torch.Tensor, ids: torch.Tensor, head: Callable,
                 ref_head: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi_theta(y_t), log pi_ref(y_t) and KL_t for c positions: h, h_ref [c, H], ids [c]
    -> [c] x 3."""
    logp = torch.log_softmax(head(h).float(), dim=-1)              # [c, V] fp32, this chunk only
    with torch.no_grad():                                          # the reference: no gradient
        logq = torch.log_softmax(ref_head(h_ref).float(), dim=-1)  # [c, V]
    q = logq.exp()
    # log_softmax keeps log q finite where softmax().log() gives log 0 = -inf and 0 * -inf = NaN.
    # The where also zeroes terms with q == 0 exactly (a -inf logit): they contribute 0.
    kl = torch.where(q > 0, q * (logq - logp), 0.0).sum(-1)        # [c]
    pick = lambda x: x.gather(-1, ids[:, None]).squeeze(-1)        # noqa: E731
    return pick(logp), pick(logq), kl


def token_logps_and_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor,
                       completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                       head: Optional[Callable] = None, ref_head: Optional[Callable] = None,
                       chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of both models and the forward KL from the reference, at T = 1.

        log pi(y_t|s_t) = log_softmax(head(h_t))[y_t]                 policy (grad) and reference
        KL_t = sum_{v in vocab} pi_ref(v|s_t) [log pi_ref(v|s_t) - log pi_theta(v|s_t)] * m_t

    hidden, ref_hidden: [N, L, H], the final hidden states of policy and reference at the
    positions that predict completion_ids (position t predicts token t). completion_ids,
    completion_mask: [N, L]. head, ref_head: hidden -> logits (the LM heads); None = identity,
    so the "hidden states" are logits themselves (the tests use this). Returns (logps, ref_logps,
    kl), each [N, L] fp32 and 0 where the mask is 0; only logps and kl carry gradients.

    Memory: only response positions are kept, and they go through the LM head `chunk_size` at
    a time: [chunk, V] fp32 tensors exist for one chunk, never [N, L, V]. With a gradient, each
    chunk runs under activation checkpointing, so backward keeps only the hidden-state chunk
    and recomputes the rest. The gathered log-probs come from the same chunk as the KL.

    Example: pi_theta = (.5, .3, .2), pi_ref = (.4, .4, .2) gives
    KL = .4 ln(.4/.5) + .4 ln(.4/.3) + 0 = 0.0258154; (.1, .1, .8) vs (.2, .2, .6) gives 0.1046496.
    """
    identity = lambda x: x  # noqa: E731
    head, ref_head = head or identity, ref_head or identity
    keep = completion_mask > 0                                                    # [N, L]
    h, h_ref, ids = hidden[keep], ref_hidden[keep].detach(), completion_ids[keep]  # [T, H], [T]
    parts = []
    for s in range(0, ids.numel(), chunk_size):
        args = (h[s:s + chunk_size], h_ref[s:s + chunk_size], ids[s:s + chunk_size], head,
                ref_head)
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_terms, *args, use_reentrant=False))
        else:
            parts.append(_chunk_terms(*args))
    zeros = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)     # [N, L]
    if not parts:
        return zeros, zeros, zeros
    logp, ref_logp, kl = (torch.cat(x) for x in zip(*parts))                      # [T] each
    if kl.detach().min() < KL_MIN:
        raise FloatingPointError(f"negative KL_t ({kl.detach().min().item():.3g}): check the "
                                 "order of the models")
    scatter = lambda x: zeros.masked_scatter(keep, x)                             # noqa: E731
    return scatter(logp), scatter(ref_logp).detach(), scatter(kl)


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the losses. Inputs are [N, L] per-token tensors of N pairs; garbage at masked
# positions is ignored (a `where`, so even NaN there cannot leak into a sum).
# ----------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t x_t * m_t over the last dim: [N, L] -> [N]."""
    return torch.where(mask > 0, x, 0.0).sum(-1)


def _reduce(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    # "sum" is for micro-batches: the caller divides by the whole step's number of pairs
    return {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[reduction]()


def _pair_metrics(z, losses, beta, rho_w, rho_l, logps_w, logps_l, seqkl_w=None,
                  seqkl_l=None) -> dict:
    """TRL's names: rewards = beta * rho (what TRL logs), logps = sums of policy log-probs."""
    r_w, r_l = beta * rho_w.detach(), beta * rho_l.detach()                      # [N]
    m = {"loss": losses.detach().mean(), "z/mean": z.detach().mean(),
         "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
         "rewards/margins": (r_w - r_l).mean(), "rewards/accuracies": (r_w > r_l).float().mean(),
         "logps/chosen": logps_w.detach().mean(), "logps/rejected": logps_l.detach().mean()}
    if seqkl_w is not None:
        kw, kr = seqkl_w.detach(), seqkl_l.detach()
        m.update({"kl/chosen": kw.mean(), "kl/rejected": kr.mean(), "kl/margin": (kr - kw).mean()})
    return {k: float(v) for k, v in m.items()}


def _seq_kls(chosen_kl, rejected_kl, chosen_mask, rejected_mask) -> tuple:
    """SeqKL(y_w), SeqKL(y_l) [N] for the kl/* metrics, or (None, None) without the KL."""
    if chosen_kl is None:
        return None, None
    return masked_sum(chosen_kl, chosen_mask), masked_sum(rejected_kl, rejected_mask)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, beta: float = 0.1,
             chosen_kl: Optional[torch.Tensor] = None, rejected_kl: Optional[torch.Tensor] = None,
             reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023), per pair:

        rho(y) = sum_t [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)] * m_t   (a sum, no length norm)
        z = beta * [rho(y_w) - rho(y_l)],   L = softplus(-z) = -log sigmoid(z),  mean over pairs

    All [N, L]: policy_* (with gradient), ref_* (without), masks (1 on response tokens incl.
    EOS). chosen_kl / rejected_kl: optional per-token KL [N, L], only logged (kl/*). Returns
    (loss, metrics) with rewards/chosen = beta * rho(y_w), rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected, loss, z/mean.

    Why both log-probs may fall while the margin grows: the loss sees only the DIFFERENCE
    rho(y_w) - rho(y_l); nothing in it asks log pi(y_w) to rise. A chosen and a rejected answer
    share the prompt and most contexts and tokens, so the step that pushes y_l down drags y_w
    down too, and the loss still falls as long as y_l falls faster. Watch rewards/margins and
    rewards/accuracies, not logps/chosen (a known behaviour, discussed in TRL's and the original
    DPO repository's issues).

    Example: rho(y_w) = ln(.5/.4) + ln(.6/.5) = ln 1.5 = 0.4054651, rho(y_l) =
    ln(.3/.4) + ln(.8/.6) = 0 -> z = 0.0405465, L = 0.6730794. At pi_theta = pi_ref, L = ln 2.
    """
    rho_w = masked_sum(policy_chosen_logps - ref_chosen_logps, chosen_mask)        # [N]
    rho_l = masked_sum(policy_rejected_logps - ref_rejected_logps, rejected_mask)  # [N]
    z = beta * (rho_w - rho_l)                                                     # [N]
    losses = F.softplus(-z)  # never log(sigmoid(z)): it underflows to log 0 for z << 0
    metrics = _pair_metrics(z, losses, beta, rho_w, rho_l,
                            masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask),
                            *_seq_kls(chosen_kl, rejected_kl, chosen_mask, rejected_mask))
    return _reduce(losses, reduction), metrics


def tdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
              chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, chosen_kl: torch.Tensor,
              rejected_kl: torch.Tensor, beta: float = 0.1, alpha: float = 0.5, version: int = 2,
              reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """TDPO (Zeng et al. 2024): DPO plus each response's sequential KL, SeqKL(y) = sum_t KL_t(y).

        TDPO1  z = beta [rho(y_w) - rho(y_l)] - beta [SeqKL(y_l) - SeqKL(y_w)]
        TDPO2  z = beta [rho(y_w) - rho(y_l)] - alpha beta [SeqKL(y_l) - sg(SeqKL(y_w))]
        L = softplus(-z)                          sg = stop-gradient; version 1 ignores alpha

    Args as `dpo_loss`, plus chosen_kl, rejected_kl: KL_t [N, L] from `token_logps_and_kl`,
    with gradient. TDPO1's flaw: SeqKL(y_w) enters z with a plus sign, so lowering the loss
    RAISES the chosen-side KL; TDPO2 detaches it and weights the rejected side by alpha.
    alpha = 0 gives DPO exactly; alpha = 1 gives TDPO1's value with another gradient. A prefix
    shared by both answers cancels in value, but in TDPO2 the rejected copy keeps its gradient.
    Extra metrics: kl/chosen, kl/rejected, kl/margin, and the TDPO repository's reward
    rewards_tdpo/* = beta (rho + SeqKL).

    Example: SeqKL(y_w) = 0.0462264, SeqKL(y_l) = 0.1304650. TDPO1: z = 0.0405465 -
    0.1 * 0.0842386 = 0.0321226, L = 0.6772148. TDPO2 (alpha 0.5): z = 0.0363346, L = 0.6751449.
    """
    rho_w = masked_sum(policy_chosen_logps - ref_chosen_logps, chosen_mask)        # [N]
    rho_l = masked_sum(policy_rejected_logps - ref_rejected_logps, rejected_mask)  # [N]
    seqkl_w, seqkl_l = _seq_kls(chosen_kl, rejected_kl, chosen_mask, rejected_mask)  # [N]
    if version == 1:
        z = beta * (rho_w - rho_l) - beta * (seqkl_l - seqkl_w)
    elif version == 2:
        z = beta * (rho_w - rho_l) - alpha * beta * (seqkl_l - seqkl_w.detach())
    else:
        raise ValueError(f"TDPO version must be 1 or 2, got {version}")
    losses = F.softplus(-z)                                                        # [N]
    metrics = _pair_metrics(z, losses, beta, rho_w, rho_l,
                            masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask), seqkl_w, seqkl_l)
    metrics["rewards_tdpo/chosen"] = float((beta * (rho_w + seqkl_w)).detach().mean())
    metrics["rewards_tdpo/rejected"] = float((beta * (rho_l + seqkl_l)).detach().mean())
    return _reduce(losses, reduction), metrics


def tgdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               guidance_chosen_logps: torch.Tensor, guidance_rejected_logps: torch.Tensor,
               chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, beta: float = 0.1,
               alpha: float = 0.5, chosen_kl: Optional[torch.Tensor] = None,
               rejected_kl: Optional[torch.Tensor] = None,
               reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """TGDPO (Zhu et al. 2025), in its official code's form:

        r_hat_t(y) = beta [log pi_g(y_t|s_t) - log pi_ref(y_t|s_t)] * m_t     (no gradient)
        rho_t(y)   = [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)] * m_t
        z = sum_t beta (1 + alpha r_hat_t(y_w)) rho_t(y_w)
            - sum_t beta (1 - alpha r_hat_t(y_l)) rho_t(y_l)
        L = softplus(-z)

    A token the guidance model likes in y_w (r_hat > 0), or dislikes in y_l (r_hat < 0), gets a
    weight above beta and is pushed harder. Weights are not clipped: |alpha r_hat| > 1 makes a
    token's weight negative (logged as tgdpo/negative_weight_frac). pi_g = pi_ref or alpha = 0
    gives DPO exactly. guidance_*: log pi_g of the same token ids [N, L], so pi_g must share
    the policy's tokenizer. Other args as `dpo_loss`.

    OUR GUIDANCE MODEL IS NOT THE PAPER'S. The paper's pi_g is trained separately: a DPO or
    SimPO model from other data or another algorithm, or a token-level reward model. Ours, by
    default, is this run's own policy after its first DPO round, frozen. Its token rewards are
    therefore correlated with the pairs being trained on (same task, same prompts, same kind
    of pairs), so here TGDPO re-weights tokens by what an earlier DPO round already learned
    rather than bringing in independent token-level knowledge. --guidance-model loads another.

    Example: r_hat(y_w) = 0.1 (ln(.6/.4), ln(.5/.5)) = (0.0405465, 0), r_hat(y_l) =
    0.1 (ln(.2/.4), 0) = (-0.0693147, 0) -> z = 0.0419959, L = 0.6723697.
    """
    mw, ml = chosen_mask > 0, rejected_mask > 0
    rho_t_w = torch.where(mw, policy_chosen_logps - ref_chosen_logps, 0.0)            # [N, L]
    rho_t_l = torch.where(ml, policy_rejected_logps - ref_rejected_logps, 0.0)        # [N, L]
    rhat_w = beta * torch.where(mw, guidance_chosen_logps - ref_chosen_logps, 0.0).detach()
    rhat_l = beta * torch.where(ml, guidance_rejected_logps - ref_rejected_logps, 0.0).detach()
    weight_w, weight_l = 1.0 + alpha * rhat_w, 1.0 - alpha * rhat_l                   # [N, L]
    z = beta * (weight_w * rho_t_w).sum(-1) - beta * (weight_l * rho_t_l).sum(-1)     # [N]
    losses = F.softplus(-z)
    metrics = _pair_metrics(z, losses, beta, rho_t_w.sum(-1), rho_t_l.sum(-1),
                            masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask),
                            *_seq_kls(chosen_kl, rejected_kl, chosen_mask, rejected_mask))
    negative = ((weight_w < 0) & mw).sum() + ((weight_l < 0) & ml).sum()
    metrics.update({"tgdpo/rhat_chosen_mean": float(rhat_w.sum() / mw.sum().clamp(min=1)),
                    "tgdpo/rhat_rejected_mean": float(rhat_l.sum() / ml.sum().clamp(min=1)),
                    "tgdpo/negative_weight_frac": float(negative
                                                        / (mw.sum() + ml.sum()).clamp(min=1))})
    return _reduce(losses, reduction), metrics


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: TAB-PO, a token-weighted mean margin plus a barrier on unlikely chosen tokens
# ----------------------------------------------------------------------------------------

def tabpo_differ_mask(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                      chosen_mask: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """[N, L] bool: response offsets k < min(n_w, n_l) where the two answers' token ids differ
    (offset-aligned from the first response token, as the official collator)."""
    n = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))                  # [N]
    within = torch.arange(chosen_ids.size(-1), device=chosen_ids.device) < n[:, None]
    return within & (chosen_ids != rejected_ids)


def tabpo_token_weights(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                        chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
                        diff_weight: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
    """TAB-PO's raw token weights omega, the official code's difference rule (no value weights:
    our answers have no JSON fields).

        omega_t = diff_weight on BOTH answers at offsets k < min(n_w, n_l) where y_w,k != y_l,k,
                  1 on the other response tokens, 0 off the response

    All [N, L], the two answers right-padded to one L (common.collate_pairs). Returns (omega_w,
    omega_l). After an insertion every later offset differs, so the whole suffix gets the
    weight. Example: y_w = (a, a, c), y_l = (a, b, c) -> omega = (1, 1.2, 1) on both.
    """
    differ = tabpo_differ_mask(chosen_ids, rejected_ids, chosen_mask, rejected_mask)
    factor = torch.where(differ, diff_weight, 1.0)
    return (torch.where(chosen_mask > 0, factor, 0.0),
            torch.where(rejected_mask > 0, factor, 0.0))


def tabpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
               chosen_ids: torch.Tensor, rejected_ids: torch.Tensor, beta: float = TABPO_BETA,
               tau: float = 0.66, barrier_weight: float = 0.5, diff_weight: float = 1.2,
               chosen_kl: Optional[torch.Tensor] = None, rejected_kl: Optional[torch.Tensor] = None,
               reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """TAB-PO (Fodeh et al., arXiv 2603.00025), in its official code's form, per pair:

        w^_t = omega_t / sum_t omega_t          (tabpo_token_weights; sums to 1 per answer)
        z    = sum_t w^_t rho_t(y_w) - sum_t w^_t rho_t(y_l)      weighted MEAN log-ratios
        L_pref = softplus(-beta z)
        w_t  = omega_t n_w / sum_t omega_t      (mean 1 over y_w)
        g_t  = 1[pi_theta(y_w,t | s_t) < tau] * m_t                a 0/1 gate, no gradient
        L_bar = sum_t w_t g_t (-log pi_theta(y_w,t)) / max(sum_t w_t g_t, 1)
        L    = L_pref + barrier_weight * L_bar

    The barrier is an NLL on the chosen tokens the current policy finds unlikely, recomputed
    at every forward; per gated token it pushes far harder than the length-normalised margin.
    Args as `dpo_loss`, plus chosen_ids, rejected_ids [N, L] (for omega). beta 0.5 (its own:
    beta multiplies a mean here, about 1/n of DPO's sum). barrier_weight = 0 and diff_weight
    = 1 give a length-normalised DPO (DPO with beta / n when n_w = n_l = n); tau <= 0 turns the
    barrier off; tau > 1 makes it the weighted NLL of y_w. Extra metrics, the official names:
    loss/dpo, loss/barrier (barrier_weight included), pref/p_pref, logits/mean|max|min (of z),
    barrier/active_pct, policy/prob_chosen; and tabpo/z_mean, tabpo/diff_token_frac,
    tabpo/first_diff_offset, tabpo/gated_prob_mean. z/mean is beta z, the sigmoid's argument.

    Example: y_w = (a, a, c), y_l = (a, b, c); pi_theta / pi_ref of the tokens: y_w (.5/.4,
    .55/.5, .9/.8), y_l (.5/.4, .35/.4, .6/.7). omega = (1, 1.2, 1), w = (0.9375, 1.125, 0.9375)
    -> z = 0.1707949, L_pref = 0.6513598; gate g = (1, 1, 0), L_bar = 0.6411598, L = 0.9719397
    (DPO with beta 0.1: L = 0.6684219).
    """
    mw, ml = chosen_mask > 0, rejected_mask > 0
    omega_w, omega_l = tabpo_token_weights(chosen_ids, rejected_ids, chosen_mask, rejected_mask,
                                           diff_weight)
    hat_w = omega_w / omega_w.sum(-1, keepdim=True).clamp(min=1e-12)                # [N, L]
    hat_l = omega_l / omega_l.sum(-1, keepdim=True).clamp(min=1e-12)
    rho_t_w = torch.where(mw, policy_chosen_logps - ref_chosen_logps, 0.0)          # [N, L]
    rho_t_l = torch.where(ml, policy_rejected_logps - ref_rejected_logps, 0.0)
    z = (hat_w * rho_t_w).sum(-1) - (hat_l * rho_t_l).sum(-1)                       # [N]
    pref = F.softplus(-beta * z)  # never log(sigmoid): it underflows for beta z << 0
    logp_w = torch.where(mw, policy_chosen_logps, 0.0)                              # [N, L]
    with torch.no_grad():  # the gate is a hard 0/1 step: nothing flows through it
        gate = (mw & (logp_w.exp() < tau)).to(logp_w.dtype)
    wg = hat_w * mw.sum(-1, keepdim=True) * gate                                    # w_t g_t
    barrier = (wg * -logp_w).sum(-1) / wg.sum(-1).clamp(min=1.0)                     # [N]
    losses = pref + barrier_weight * barrier
    metrics = _pair_metrics(beta * z, losses, beta, rho_t_w.sum(-1), rho_t_l.sum(-1),
                            masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask),
                            *_seq_kls(chosen_kl, rejected_kl, chosen_mask, rejected_mask))
    with torch.no_grad():
        zd = z.detach()
        differ = tabpo_differ_mask(chosen_ids, rejected_ids, chosen_mask, rejected_mask)
        n = torch.minimum(mw.sum(-1), ml.sum(-1))
        first = torch.where(differ.any(-1), differ.float().argmax(-1), n)           # [N]
        gated = gate.sum()
        extra = {"loss/dpo": pref.mean(), "loss/barrier": barrier_weight * barrier.mean(),
                 "pref/p_pref": torch.sigmoid(beta * zd).mean(), "logits/mean": zd.mean(),
                 "logits/max": zd.max(), "logits/min": zd.min(),
                 "barrier/active_pct": gated / mw.sum().clamp(min=1),
                 "policy/prob_chosen": (hat_w * logp_w).sum(-1).exp().mean(),
                 "tabpo/z_mean": zd.mean(),
                 "tabpo/diff_token_frac": 2 * differ.sum() / (mw.sum() + ml.sum()).clamp(min=1),
                 "tabpo/first_diff_offset": first.float().mean(),
                 "tabpo/gated_prob_mean": (gate * logp_w.exp()).sum() / gated.clamp(min=1)}
    metrics.update({k: float(v) for k, v in extra.items()})
    return _reduce(losses, reduction), metrics


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: cDPO, critical-token weights from contrastive estimation (docs/token_dpo.md)
# ----------------------------------------------------------------------------------------

CE_NEG_COVERAGE = 0.5  # the negative set's answer groups cover half of a prompt's wrong answers
CE_SFT_MAX_GRAD_NORM = 1.0


def _ce_chunk(hp: torch.Tensor, hn: torch.Tensor, ids: torch.Tensor, pos_head: Callable,
              neg_head: Callable, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log c_t, log pi_p(y_t), log pi_n(y_t) for c positions: [c, H] x 2, [c] -> [c] x 3.
    At least fp32 (fp64 stays fp64)."""
    up = lambda x: x.to(torch.promote_types(x.dtype, torch.float32))  # noqa: E731
    lp = torch.log_softmax(up(pos_head(hp)), dim=-1)              # [c, V], this chunk only
    ln = torch.log_softmax(up(neg_head(hn)), dim=-1)              # [c, V]
    # log of P_p^(1+lam) * P_n^(-lam), unnormalised; never formed in probability space, where
    # P_n underflows and the ratio overflows. lam = 0 skips P_n (0 * -inf would be NaN).
    mix = lp if lam == 0 else (1.0 + lam) * lp - lam * ln
    log_c = torch.log_softmax(mix, dim=-1)                        # minus log Z_t (full vocabulary)
    pick = lambda x: x.gather(-1, ids[:, None]).squeeze(-1)       # noqa: E731
    return pick(log_c), pick(lp), pick(ln)


@torch.no_grad()
def cdpo_weights(pos_logits: torch.Tensor, neg_logits: torch.Tensor, tokens: torch.Tensor,
                 mask: torch.Tensor, lam: float = 1.0, pos_head: Optional[Callable] = None,
                 neg_head: Optional[Callable] = None, chunk_size: int = 256,
                 with_logps: bool = False):
    """cDPO's per-token weights w_t = 1 - c_t from contrastive estimation (Lin et al., eq. 1).

        log c_t = (1+lam) log pi_p(y_t|s_t) - lam log pi_n(y_t|s_t) - log Z_t
        Z_t     = sum_{v in vocab} pi_p(v|s_t)^(1+lam) pi_n(v|s_t)^(-lam)
        w_t     = (1 - c_t) * m_t  in [0, 1]       no gradient, no clipping, no normalisation

    pi_p / pi_n: frozen models fine-tuned on correct / incorrect answers (the positive and
    negative models). A token the positive model finds unlikely and the negative model likely
    has a low c_t, so a weight near 1: it is "critical" and DPO's push on it is kept; tokens
    with c_t near 1 are hardly pushed. The paper calls lam its beta and c_t its s_t.

    pos_logits, neg_logits: [N, L, V] logits at the positions that predict tokens [N, L], or
    [N, L, H] final hidden states when pos_head / neg_head (hidden -> logits) are given. mask
    [N, L]: 1 on response tokens incl. EOS. The vocabulary is handled `chunk_size` response
    positions at a time, in fp32 (fp64 inputs stay fp64): no [N, L, V] fp32 copy is built. A
    per-position constant added to a model's logits cancels. Returns w [N, L] (0 where mask =
    0); with with_logps also log pi_p(y_t) and log pi_n(y_t), each [N, L].

    Example (lam = 1), rejected answer (b, c) of V = {a, b, c}:
      position 1, y = b: pi_p = (.6, .2, .2), pi_n = (.3, .5, .2) -> P_p^2/P_n = (1.2, .08, .2),
        Z = 1.48, c = .08/1.48 = 0.0540541, w = 0.9459459
      position 2, y = c: pi_p = (.2, .2, .6), pi_n = (.1, .1, .8) -> (.4, .4, .45), Z = 1.25,
        c = 0.36, w = 0.64.   lam = 0 gives c = pi_p(y) = (.2, .6); pi_p = pi_n gives c = pi_p(y).
    """
    identity = lambda x: x  # noqa: E731
    pos_head, neg_head = pos_head or identity, neg_head or identity
    keep = mask > 0                                                              # [N, L]
    hp, hn, ids = pos_logits[keep], neg_logits[keep], tokens[keep]               # [T, .], [T]
    parts = [_ce_chunk(hp[s:s + chunk_size], hn[s:s + chunk_size], ids[s:s + chunk_size],
                       pos_head, neg_head, lam) for s in range(0, ids.numel(), chunk_size)]
    if parts:
        log_c, lp, ln = (torch.cat(x) for x in zip(*parts))                      # [T] each
    else:
        log_c = lp = ln = torch.zeros(0, device=tokens.device)
    zeros = torch.zeros(keep.shape, dtype=log_c.dtype, device=tokens.device)    # [N, L]
    w = 1.0 - log_c.exp()                                                        # [T]
    if not torch.isfinite(w).all() or (w.numel() and (w.min() < 0 or w.max() > 1)):
        raise FloatingPointError("non-finite or out-of-range cDPO weight: a -inf logit in the "
                                 "negative model (a masked vocabulary) gives -lam * -inf = +inf; "
                                 "use finite logits")
    out = zeros.masked_scatter(keep, w)
    if with_logps:
        return out, zeros.masked_scatter(keep, lp), zeros.masked_scatter(keep, ln)
    return out


def cdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
              chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
              rejected_weights: torch.Tensor, beta: float = 0.1,
              chosen_kl: Optional[torch.Tensor] = None, rejected_kl: Optional[torch.Tensor] = None,
              reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """cDPO (Lin et al. 2025), the paper's form: one sigmoid per pair over weighted sums.

        rho_t(y) = [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)] * m_t
        z = beta * [ sum_t rho_t(y_w)  -  sum_t w_t rho_t(y_l) ],   L = softplus(-z)

    Only the rejected side is weighted (w_t = 1 - c_t from `cdpo_weights`, a constant: no
    gradient reaches it); the chosen side is DPO's. w = 1 everywhere is DPO exactly. Args as
    `dpo_loss`, plus rejected_weights [N, L] (garbage or NaN at masked positions is ignored).
    Gradient: dL/d rho_t(y_w) = -beta sigma(-z); dL/d rho_t(y_l) = +beta w_t sigma(-z).

    NOT the official code's loss: that one applies softplus(-beta [rho_j(y_w) - w_j rho_j(y_l)])
    at every label position j of the right-padded batch (chosen token j against rejected token
    j) and averages over all positions, prompt and padding included. docs/token_dpo.md compares
    both on the example below. The weights are not normalised, so rewards/margins is not
    comparable with DPO's; cdpo/weighted_rewards_rejected = beta sum_t w_t rho_t(y_l) is what
    the loss sees (rewards/* stay unweighted, as TRL's).

    Example: the hand example of `dpo_loss` (rho(y_w) = 0.4054651, rho_t(y_l) = (-0.2876821,
    +0.2876821)) with w = (0.9459459, 0.64): sum_t w_t rho_t(y_l) = -0.0880152, z = 0.1 *
    (0.4054651 + 0.0880152) = 0.0493480, L = 0.6687775 (DPO: z = 0.0405465, L = 0.6730794; the
    official per-position form: 0.6809635).
    """
    rho_w = masked_sum(policy_chosen_logps - ref_chosen_logps, chosen_mask)                 # [N]
    rho_t_l = torch.where(rejected_mask > 0, policy_rejected_logps - ref_rejected_logps, 0.0)
    w = torch.where(rejected_mask > 0, rejected_weights, 0.0).detach()                     # [N, L]
    weighted_l = (w * rho_t_l).sum(-1)                                                      # [N]
    z = beta * (rho_w - weighted_l)
    losses = F.softplus(-z)
    kls = (None, None) if chosen_kl is None else (masked_sum(chosen_kl, chosen_mask),
                                                  masked_sum(rejected_kl, rejected_mask))
    metrics = _pair_metrics(z, losses, beta, rho_w, rho_t_l.sum(-1),
                            masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask), *kls)
    metrics["cdpo/weighted_rewards_rejected"] = float((beta * weighted_l).detach().mean())
    return _reduce(losses, reduction), metrics


def select_ce_rows(correct: list[bool], finished: list[bool], answers: list, num_generations: int,
                   generator: torch.Generator,
                   coverage: float = CE_NEG_COVERAGE) -> tuple[list[int], list[int], bool]:
    """The rows that fine-tune cDPO's positive and negative models (the paper's selection rule).

        per prompt (G rows): positive set <- one random correct row, if there is one
          W = its incorrect rows that finished (EOS) with a parseable answer, grouped by answer;
          largest group first (ties at random): one random row per group, until the groups
          taken cover ceil(coverage * |W|) rows
        fallback: if no prompt gave a negative row, every incorrect row of the batch

    correct, finished: [B] flags; answers: [B] normalised final answers (None = none found).
    Returns (positive rows, negative rows, fallback used).

    Example (the paper's): 10 incorrect rows with answers a a a b b c d e f g -> need 5; group a
    covers 3, then b brings 5: the negative set gets one row with a and one with b.
    """
    G, rand = num_generations, lambda n: int(torch.randint(n, (1,), generator=generator))
    pos, neg = [], []
    for g in range(len(correct) // G):
        rows = range(g * G, (g + 1) * G)
        right = [i for i in rows if correct[i]]
        if right:
            pos.append(right[rand(len(right))])
        wrong = [i for i in rows if not correct[i] and finished[i] and answers[i] is not None]
        groups: dict = {}
        for i in wrong:
            groups.setdefault(answers[i], []).append(i)
        keys = list(groups)
        keys = [keys[k] for k in torch.randperm(len(keys), generator=generator).tolist()]
        keys.sort(key=lambda a: -len(groups[a]))  # stable: largest first, ties in random order
        covered, need = 0, math.ceil(coverage * len(wrong))
        for a in keys:
            if covered >= need:
                break
            neg.append(groups[a][rand(len(groups[a]))])
            covered += len(groups[a])
    if not neg:
        return pos, [i for i in range(len(correct)) if not correct[i]], True
    return pos, neg, False


def train_ce_model(ref_model, tokenizer, rows: list[tuple[list[int], list[int]]], steps: int,
                   rows_per_step: int, lr: float, generator: torch.Generator,
                   autocast=contextlib.nullcontext):
    """A positive or negative model: an fp32 deep copy of pi_ref, fine-tuned with
    common.sft_loss on `rows` (prompt ids, answer ids), `steps` AdamW steps of rows drawn with
    replacement, then frozen. Eval mode (no dropout); `generator` draws the rows, the global RNG
    is untouched. Its forwards run under `autocast` (common.autocast), one region each, since
    the optimizer steps between them. Returns (model, last step's loss)."""
    model = copy.deepcopy(ref_model).float().requires_grad_(True).eval()  # fp32 master weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = float("nan")
    for _ in range(steps):
        pick = torch.randint(len(rows), (rows_per_step,), generator=generator).tolist()
        with autocast():
            out = common.sft_loss(model, tokenizer, [rows[i] for i in pick])
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CE_SFT_MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.item()
    return model.requires_grad_(False), loss


def add_cdpo_weights(pairs: list[dict], pos_rows: list, neg_rows: list, ref_model, tokenizer, args,
                     round_no: int, device, autocast=contextlib.nullcontext) -> dict:
    """One round's contrastive estimation: fine-tune pi_p then pi_n from fresh copies of pi_ref,
    score every pair's rejected answer once, store its weights in the pair as
    p["rejected_weights"] (a list of floats, one per token: saved with the round's pairs, so a
    resumed run never retrains), then free both models. Returns the round's cdpo/* metrics.

    Each fine-tune draws its rows from its own generator, seeded from (seed, round, which).
    The pairs are scored on exactly the collated ids and positions the policy sees; the chosen
    half is scored only for cdpo/contrast_chosen. Peak memory: two extra model copies (plus one
    AdamW state while fine-tuning); LoRA adapters on the reference, as the official code does,
    would share the base weights, at the price of a `peft` dependency.
    """
    t0, seed = time.time(), args.seed * 100003 + round_no
    def fit(rows, k):
        gen = torch.Generator().manual_seed(seed + k * 1_000_000_007)
        return train_ce_model(ref_model, tokenizer, rows, args.ce_sft_steps, args.ce_sft_rows,
                              args.ce_sft_lr, gen, autocast)

    pos_model, pos_loss = fit(pos_rows, 1)
    neg_model, neg_loss = fit(neg_rows, 2)
    heads = pos_model.get_output_embeddings(), neg_model.get_output_embeddings()
    contrast = {"chosen": [0.0, 0.0], "rejected": [0.0, 0.0]}  # sum of log pi_p - log pi_n, tokens
    n = max(1, args.micro_batch_size // 2)
    with torch.no_grad(), autocast():
        for s in range(0, len(pairs), n):
            mb = pairs[s:s + n]
            batch = common.collate_pairs(mb, tokenizer.pad_token_id, device)
            hp, hn = (common.response_hidden_states(m, *batch) for m in (pos_model, neg_model))
            w, lp, ln = cdpo_weights(hp, hn, batch[2], batch[3], args.ce_beta, *heads,
                                     chunk_size=args.kl_chunk_size, with_logps=True)   # [2n, L]
            for half, d, m in zip(("chosen", "rejected"), (lp - ln).chunk(2), batch[3].chunk(2)):
                contrast[half][0] += masked_sum(d, m).sum().item()
                contrast[half][1] += m.sum().item()
            for i, p in enumerate(mb):  # the chosen half's weights are not used
                p["rejected_weights"] = w[len(mb) + i, :len(p["rejected"])].tolist()
    del pos_model, neg_model, heads  # only the weights are kept
    losses = {"cdpo/pos_sft_loss": pos_loss, "cdpo/neg_sft_loss": neg_loss}
    losses = losses if args.ce_sft_steps else {}
    return {"cdpo/pos_rows": len(pos_rows), "cdpo/neg_rows": len(neg_rows), **losses,
            "cdpo/contrast_chosen": contrast["chosen"][0] / max(contrast["chosen"][1], 1.0),
            "cdpo/contrast_rejected": contrast["rejected"][0] / max(contrast["rejected"][1], 1.0),
            "cdpo/sft_seconds": time.time() - t0}


def cdpo_weight_stats(pairs: list[dict], eos_id: int, golds: Optional[list] = None) -> dict:
    """Where cDPO's weights sit, over the round's rejected answers (docs/token_dpo.md lists them).

    golds: per pair the gold solution's ids (arith), or None. Its first difference from the
    rejected answer is the task's natural error token: cdpo/argmax_at_first_error_frac is how
    often the top-weight token is that one (chance: cdpo/first_error_chance = mean 1/|y_l|),
    cdpo/first_error_weight_mean its mean weight (against cdpo/weight_mean).
    """
    ws = [torch.tensor(p["rejected_weights"], dtype=torch.float64) for p in pairs]
    if not ws:
        return {}
    every = torch.cat(ws)
    argmax = [int(w.argmax()) for w in ws]
    split = [first_difference(p["chosen"], p["rejected"]) for p in pairs]
    prefix = torch.cat([w[:k] for w, k in zip(ws, split)])
    eos = [float(w[-1]) for w, p in zip(ws, pairs) if p["rejected"][-1] == eos_id]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    m = {"cdpo/weight_mean": float(every.mean()),
         "cdpo/weight_sum": mean([float(w.sum()) for w in ws]),
         "cdpo/weight_max": mean([float(w.max()) for w in ws]),
         "cdpo/critical_frac": float((every > 0.5).double().mean()),  # c_t < 0.5 (our threshold)
         "cdpo/argmax_pos": mean(argmax),
         "cdpo/argmax_in_shared_prefix_frac": mean([float(a < k) for a, k in zip(argmax, split)]),
         "cdpo/shared_prefix_weight_mean": float(prefix.mean()) if prefix.numel() else float("nan"),
         "cdpo/eos_weight_mean": mean(eos)}
    if golds is not None:
        hits, weights, chance = [], [], []
        for w, a, p, gold in zip(ws, argmax, pairs, golds):
            t = first_difference(gold, p["rejected"])
            if t < len(p["rejected"]):  # a rejected answer that is a prefix of the gold has none
                hits.append(float(a == t))
                weights.append(float(w[t]))
                chance.append(1.0 / len(p["rejected"]))
        m.update({"cdpo/argmax_at_first_error_frac": mean(hits),
                  "cdpo/first_error_chance": mean(chance),
                  "cdpo/first_error_weight_mean": mean(weights)})
    return {k: v for k, v in m.items() if not math.isnan(v)}


def cdpo_sets(texts: list[str], rewards: torch.Tensor, completion_ids: torch.Tensor, tokenizer,
              idx: list[int], train: list[dict], train_prompt_ids: list, G: int, found: list,
              args, round_no: int) -> tuple[tuple[list, list], Optional[list], dict]:
    """A round's fine-tuning rows for cDPO's two models, (prompt ids, answer ids incl. its EOS),
    chosen by `select_ce_rows` from all the round's samples; and per pair the gold solution's
    ids (arith only), for the diagnostics. The selection has its own generator."""
    eos, ids = tokenizer.eos_token_id, completion_ids.cpu()
    lengths = common.completion_mask_from_ids(ids, eos).sum(1).long().tolist()
    answers = [common.normalize_number(common.extract_answer(t)) for t in texts]
    gen = torch.Generator().manual_seed(args.seed * 100003 + round_no + 3 * 1_000_000_007)
    finished = (ids == eos).any(1).tolist()
    pos, neg, fallback = select_ce_rows((rewards > 0.5).tolist(), finished, answers, G, gen)
    row = lambda i: (train_prompt_ids[idx[i // G]], ids[i, :lengths[i]].tolist())  # noqa: E731
    golds = None
    if args.task == "arith":
        golds = [tokenizer(train[idx[g]]["solution"], add_special_tokens=False)["input_ids"] + [eos]
                 for g, _, _ in found]
    rows = [row(i) for i in pos], [row(i) for i in neg]
    return rows, golds, {"cdpo/neg_fallback": float(fallback)}


def cdpo_credit_view(pair: dict, tokenizer, gold: Optional[list[int]] = None) -> str:
    """One rejected answer, each token followed by its cDPO weight w_t (near 1 = critical)."""
    w = torch.tensor([pair["rejected_weights"]])
    head = "cDPO weight w_t = 1 - c_t of each token of one rejected answer (near 1: critical)"
    if gold is not None:
        head += f"; gold solution {tokenizer.decode(gold[:-1])!r}"
    ids = torch.tensor([pair["rejected"]])
    return head + ":\n" + common.credit_view(tokenizer, ids, w, torch.ones_like(w),
                                             value="weight w_t")


# ----------------------------------------------------------------------------------------
# The rounds: the method's state across steps, and what each round measures
# ----------------------------------------------------------------------------------------


@dataclass
class Rounds:
    """The DPO rounds, saved in every checkpoint under one name (Run's algo_state).

    round: the current round's number; rounds_trained: rounds whose batches are all used;
    pairs: the round's pairs of token ids (cDPO: with their "rejected_weights", so a resume
    never fine-tunes again); queue: the round's batches still to train on, as indices into
    pairs; guidance_dir: TGDPO's frozen guidance model, once saved.
    """
    round: int = 0
    rounds_trained: int = 0
    pairs: list = field(default_factory=list)
    queue: list = field(default_factory=list)
    guidance_dir: Optional[str] = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def fresh_sample_stats(logps: torch.Tensor, ref_logps: torch.Tensor, entropies: torch.Tensor,
                       completion_mask: torch.Tensor) -> dict:
    """On the round's fresh samples y ~ pi_theta: the sequence KL(pi_theta || pi_ref),
    estimated as mean_y sum_t [log pi_theta - log pi_ref] (the x-axis of TDPO's reward-KL
    frontier), and the mean token entropy. All [B, L], from step 2's no-grad pass at T = 1."""
    return {"round/seq_kl_to_ref": masked_sum(logps - ref_logps, completion_mask).mean().item(),
            "entropy": common.masked_mean(entropies, completion_mask)}


# ----------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    # ---- setup (boilerplate) ----
    if args.num_generations < 2 and args.pairs_file is None:
        raise UserError(f"--num-generations must be at least 2 (got {args.num_generations}): a "
                        "pair needs a correct and an incorrect answer to the same prompt; pass "
                        "--num-generations 2 or more")
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)  # compute dtype: bf16 on a GPU that has it
    autocast = common.autocast(device, dtype)        # `with autocast():` computes in it
    max_len = (common.default_max_len(args.task, args.arith_ops)
               if args.max_completion_length is None else args.max_completion_length)
    lr = ((TINY_LEARNING_RATE if args.model == common.TINY else HUB_LEARNING_RATE)
          if args.learning_rate is None else args.learning_rate)
    G, P = args.num_generations, args.pairs_per_step

    train = common.load_task(args.task, "train", args.data_dir, args.arith_ops)
    heldout = common.load_task(args.task, "test", args.data_dir, args.arith_ops)[: args.eval_size]
    file_rows = common.read_preference_jsonl(args.pairs_file) if args.pairs_file else None
    common.seed_everything(args.seed)
    # fp32 master weights: AdamW's small updates would round away in bf16 (common.autocast)
    model, tokenizer = common.load_model_and_tokenizer(args.model, device, torch.float32,
                                                       args.arith_ops)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.check_plain_lm_head(model, device)
    eos = tokenizer.eos_token_id
    train_prompt_ids = common.tokenize_prompts(tokenizer, train, args.task,
                                               common.context_length(model), max_len)
    file_pairs = None if file_rows is None else common.tokenize_pairs(
        file_rows, tokenizer, args.task, common.context_length(model))
    # pi_ref is the warm-start model, frozen for every round (docs/token_dpo.md)
    ref_model = common.load_frozen(args.model, device, dtype, args.arith_ops)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sampler = common.PromptSampler(len(train), args.seed)

    # ---- ALGO LOGIC: the method's state across steps, and what it needs before each update ----
    rounds = Rounds()                                   # the round's pairs and batches left
    beta = args.beta if args.beta is not None else TABPO_BETA if args.loss == "tabpo" else DPO_BETA
    algo_state = {"rounds": rounds}
    guidance = None  # TGDPO's pi_g: --guidance-model, else the policy after round 1 (step 3)
    if args.loss == "tgdpo" and args.guidance_model:
        guidance = common.load_frozen(args.guidance_model, device, dtype)
    head, ref_head = model.get_output_embeddings(), ref_model.get_output_embeddings()

    run = common.Run(args, model, tokenizer, optimizer, sampler, algo_state)
    state = run.state  # step, start accuracy, and algo_state (restored on --resume)
    if guidance is None and rounds.guidance_dir:
        guidance = common.load_frozen(rounds.guidance_dir, device, dtype)
    if "start_accuracy" not in state:
        with autocast():
            state["start_accuracy"] = common.evaluate(model, tokenizer, heldout, args.task,
                                                      max_len)
        run.logger.log(0, {"eval/accuracy": state["start_accuracy"]})
    eval_acc, t_start = state["start_accuracy"], time.time()

    bar = common.progress(range(state["step"] + 1, args.total_steps + 1), run.algo)
    for step in bar:
        t0, metrics = time.time(), {}
        if not rounds.queue:  # steps 1-3 open a new round when the last one's batches are used
            rounds.round += 1
            gen = torch.Generator().manual_seed(args.seed * 100003 + rounds.round)
            # ---- 1. rollout: G answers per prompt from the CURRENT policy, verified ----
            if file_pairs is None:
                idx = sampler.next(args.prompts_per_round)
                prompt_ids, prompt_mask = common.left_pad([train_prompt_ids[i] for i in idx],
                                                          tokenizer.pad_token_id, device)
                with autocast():
                    completion_ids = common.generate(model, tokenizer, prompt_ids, prompt_mask,
                                                     max_len, G, args.sampling_temperature,
                                                     args.top_p, args.top_k)
                prompt_ids = prompt_ids.repeat_interleave(G, 0)
                prompt_mask = prompt_mask.repeat_interleave(G, 0)
                completion_mask = common.completion_mask_from_ids(completion_ids, eos)
                texts = common.decode_completions(tokenizer, completion_ids)
                answers = [train[i]["answer"] for i in idx for _ in range(G)]
                # truncated = wrong: a cut-off answer is never "chosen"
                rewards = common.finished_rewards(texts, answers, completion_ids, eos)
                metrics.update(common.rollout_metrics(rewards, completion_ids, completion_mask,
                                                      eos, G))

                # ---- 2. one no-grad pass: the fresh samples' KL to the reference, entropy ----
                mbs = [slice(s, s + args.micro_batch_size)
                       for s in range(0, len(completion_ids), args.micro_batch_size)]

                def fwd(m, mb, with_entropy=False):  # log-probs [b, L] at T = 1 (and entropies)
                    with autocast():
                        return common.per_token_logps(m, prompt_ids[mb], prompt_mask[mb],
                                                      completion_ids[mb], completion_mask[mb],
                                                      1.0, with_entropy)

                logps, entropies, ref_logps = common.no_grad_pass(fwd, mbs, model, ref_model)
                metrics.update(fresh_sample_stats(logps, ref_logps, entropies, completion_mask))
                if (rounds.round - 1) % args.log_completions_every == 0:
                    run.logger.log_completions(step, [train[idx[0]]["question"]] * G, texts[:G],
                                               rewards[:G].tolist())

            # ---- 3. ALGO LOGIC: the round's pairs (cDPO: and their token weights) ----
            golds = ce_rows = None
            if file_pairs is not None:  # the user's pairs replace sampling; the same loss runs
                # cDPO: the file never changes, so round 1's weights (kept in rounds) are reused
                pairs = rounds.pairs if args.loss == "cdpo" and rounds.pairs else file_pairs
                metrics["pairs/built"] = len(pairs)
                ce_rows = ([(p["prompt"], p["chosen"]) for p in pairs],
                           [(p["prompt"], p["rejected"]) for p in pairs])
            else:
                found, counts = build_pairs(rewards, completion_ids.cpu(), completion_mask.cpu(),
                                            G, args.pairs_per_prompt, gen)
                ids, lengths = completion_ids.tolist(), completion_mask.sum(1).long().tolist()
                pairs = [{"prompt": train_prompt_ids[idx[g]], "chosen": ids[c][:lengths[c]],
                          "rejected": ids[w][:lengths[w]]} for g, c, w in found]
                metrics.update(counts)
                if args.loss == "cdpo" and pairs:  # cDPO's two sets, from the round's samples
                    ce_rows, golds, fallback = cdpo_sets(texts, rewards, completion_ids,
                                                         tokenizer, idx, train, train_prompt_ids,
                                                         G, found, args, rounds.round)
                    metrics.update(fallback)
            if args.loss == "cdpo" and pairs and "rejected_weights" not in pairs[0]:
                metrics.update(add_cdpo_weights(pairs, *ce_rows, ref_model, tokenizer, args,
                                                rounds.round, device, autocast))
                metrics.update(cdpo_weight_stats(pairs, eos, golds))
                bar.write(f"step {step}: round {rounds.round}: cDPO fine-tuned its positive and "
                          f"negative models on {len(ce_rows[0])} and {len(ce_rows[1])} rows "
                          f"({metrics['cdpo/sft_seconds']:.1f} s)")
                if args.show_credit and (rounds.round - 1) % args.show_credit == 0:
                    bar.write(cdpo_credit_view(pairs[0], tokenizer, golds[0] if golds else None))
            if args.loss == "tgdpo" and guidance is None and rounds.rounds_trained >= 1:
                # TGDPO's guidance: the policy after a DPO round, frozen (saved for --resume)
                guidance = copy.deepcopy(model).to(dtype).requires_grad_(False)  # frozen
                rounds.guidance_dir = str(run.run_dir / "guidance")
                guidance.save_pretrained(rounds.guidance_dir)
                tokenizer.save_pretrained(rounds.guidance_dir)
            rounds.pairs = pairs
            for _ in range(args.epochs_per_round):
                order = torch.randperm(len(pairs), generator=gen).tolist()
                rounds.queue += [order[s:s + P] for s in range(0, len(pairs), P)]
            metrics.update(pair_stats(pairs), round=rounds.round)
            if not pairs:
                bar.write(f"step {step}: round {rounds.round} found no pair (every prompt "
                          "all-correct or all-wrong); it trains nothing, the next step samples "
                          "a new round")

        # ---- 4. ALGO LOGIC: one optimizer step on a batch of pairs ----
        if rounds.queue:
            batch = [rounds.pairs[i] for i in rounds.queue.pop(0)]
            # TGDPO's first round, before it has a guidance model, is DPO
            loss_name = "dpo" if args.loss == "tgdpo" and guidance is None else args.loss
            avg = common.MetricAverager()
            n = max(1, args.micro_batch_size // 2)  # pairs per micro-batch
            for mb in [batch[s:s + n] for s in range(0, len(batch), n)]:
                inputs = common.collate_pairs(mb, tokenizer.pad_token_id, device)
                completion_ids, completion_mask = inputs[2:]   # [2n, L]: chosen; rejected
                # ONE forward for [chosen; rejected]; the reference (and guidance) without grad
                with autocast():
                    hidden = common.response_hidden_states(model, *inputs)
                    with torch.no_grad():
                        ref_hidden = common.response_hidden_states(ref_model, *inputs)
                    logps, ref_logps, kl = token_logps_and_kl(hidden, ref_hidden, completion_ids,
                                                              completion_mask, head, ref_head,
                                                              args.kl_chunk_size)  # [2n, L] each
                if not loss_name.startswith("tdpo"):
                    kl = kl.detach()  # logged only: TDPO's panels, for every loss
                (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (
                    t.chunk(2) for t in (logps, ref_logps, completion_mask, kl))
                if loss_name == "dpo":
                    loss, m = dpo_loss(pw, pl, rw, rl, mw, ml, beta, kw, kr, reduction="sum")
                elif loss_name in ("tdpo1", "tdpo2"):
                    loss, m = tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, beta, args.alpha,
                                        version=int(loss_name[-1]), reduction="sum")
                elif loss_name == "cdpo":  # the stored weights, right-padded like y_l
                    wl = torch.zeros_like(ml)
                    for i, p in enumerate(mb):
                        wl[i, :len(p["rejected"])] = torch.tensor(p["rejected_weights"])
                    loss, m = cdpo_loss(pw, pl, rw, rl, mw, ml, wl, beta, kw, kr,
                                        reduction="sum")
                elif loss_name == "tabpo":  # the gate reads this forward's own log-probs
                    cw, cl = completion_ids.chunk(2)
                    loss, m = tabpo_loss(pw, pl, rw, rl, mw, ml, cw, cl, beta, args.tabpo_tau,
                                         args.tabpo_barrier_weight, args.tabpo_diff_weight, kw,
                                         kr, reduction="sum")
                else:
                    with torch.no_grad(), autocast():
                        g_logps, _ = common.per_token_logps(guidance, *inputs, 1.0)
                    gw, gl = g_logps.chunk(2)
                    loss, m = tgdpo_loss(pw, pl, rw, rl, gw, gl, mw, ml, beta, args.alpha,
                                         kw, kr, reduction="sum")
                (loss / len(batch)).backward()  # sum over micro-batches / pairs = mean over pairs
                avg.add(m, weight=len(mb))
            grad_norm = common.optimizer_step(model, optimizer, args.max_grad_norm, avg)
            metrics.update(avg.means(), grad_norm=grad_norm, num_pairs=len(batch))
            if not rounds.queue:
                rounds.rounds_trained += 1

        # ---- 5. log, evaluate, checkpoint (boilerplate) ----
        state["step"] = step
        metrics.update(learning_rate=lr, step_time=time.time() - t0)
        if step % args.eval_every == 0 or step == args.total_steps:
            with autocast():
                eval_acc = metrics["eval/accuracy"] = common.evaluate(model, tokenizer, heldout,
                                                                      args.task, max_len)
        run.log(step, metrics)
        bar.set_postfix(margin=f"{metrics.get('rewards/margins', 0.0):.3f}",
                        eval_acc=f"{eval_acc:.2f}")
        if step % args.save_every == 0 or step == args.total_steps or run.stop_requested:
            run.save(step)
        if run.stop_requested:
            common.close_bar(bar, args.total_steps - step)  # the bar shows this step as done
            break

    return run.finish(eval_acc, time.time() - t_start)


if __name__ == "__main__":
    common.run_main(main, Args)
