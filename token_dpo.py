"""Token-level DPO: DPO, TDPO1, TDPO2 and TGDPO on verified on-policy pairs (iterative DPO).

Papers: Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290 (NeurIPS 2023);
Zeng et al., "Token-level Direct Preference Optimization", arXiv 2404.11999 (ICML 2024);
Zhu et al., "TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference
Optimization", arXiv 2506.14574 (ICML 2025); Rafailov et al., "From r to Q*", arXiv 2404.12358.
Docs: docs/token_dpo.md (algorithm card: ../shared/algorithms/token_dpo.md).

Each round samples G answers per prompt from the current policy, verifies them, and pairs a
correct answer (chosen) with an incorrect one (rejected). The policy then trains a few epochs
on that round's pairs with a logistic loss on how much more it prefers the chosen answer than
the frozen reference does. TDPO adds each answer's full-vocabulary KL to the reference, token
by token; TGDPO weights each token by a frozen guidance model's token reward.

    python token_dpo.py                               # CPU: embedded tiny model + arithmetic, TDPO2
    python token_dpo.py --loss dpo                    # plain DPO (also: tdpo1, tgdpo)
    python token_dpo.py --pairs-file pairs.jsonl      # your own {"prompt", "chosen", "rejected"} lines
    python token_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k   # one GPU, a hub model

On a CPU the default run takes about 2-3 minutes after the warm start: 7 rounds of 128 prompts x
8 samples, 2 epochs over each round's ~90 pairs, 80 optimizer steps. Seed 0 measured, held-out
greedy accuracy from 0.375: TDPO2 0.475, TDPO1 0.49, DPO 0.465, TGDPO 0.425 (one seed and 200
problems, so about +-3.5 points of noise); on the last round's fresh samples the sequence KL to
the reference was 0.82 nats for TDPO2 against 1.39 for DPO.

The loss starts at ln 2 = 0.693 exactly (policy = reference, so every log-ratio is 0), and the
first TDPO step equals the DPO step (the KL's gradient is 0 there). `logps/chosen` often FALLS
while training works: watch `rewards/margins`, `rewards/accuracies` and `eval/accuracy`.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from common import UserError

TINY_LEARNING_RATE = 5e-5  # the one value for the embedded tiny model, shared by every script
HUB_LEARNING_RATE = 1e-6


@dataclass
class Args:
    """Token-level DPO (DPO, TDPO1, TDPO2, TGDPO) on verified on-policy pairs, in rounds."""
    # --- run ---
    seed: int = field(default=0, metadata={"range": "[0, SEED_MAX]", "help":
        "random seed (python, numpy, torch, prompt order)"})
    model: str = field(default="tiny", metadata={"range": "model", "help":
        "'tiny' (embedded, warm-started on first use), a hub id or a save_pretrained folder"})
    task: Literal["arith", "gsm8k"] = field(default="arith", metadata={"help": "arith: embedded multi-step arithmetic; gsm8k: grade-school math"})
    data_dir: Optional[str] = field(default=None, metadata={"range": "data_dir", "help":
        "folder with GSM8K train.jsonl/test.jsonl (default: ../shared/data/gsm8k)"})
    total_steps: int = field(default=80, metadata={"range": ">0", "help":
        "optimizer steps, each on a batch of prompts_per_step pairs (a round with no pairs uses "
        "one step)"})
    eval_every: int = field(default=20, metadata={"range": ">0", "help":
        "greedy held-out evaluation every N steps"})
    eval_size: int = field(default=200, metadata={"range": ">0", "help":
        "held-out examples for greedy evaluation"})
    save_every: int = field(default=50, metadata={"range": ">0", "help":
        "checkpoint every N steps (also on SIGINT/SIGTERM and at the end)"})
    output_dir: str = field(default="runs", metadata={"range": "output_dir", "help":
        "parent folder of the run folder"})
    resume: Optional[str] = field(default=None, metadata={"range": "run_dir", "help":
        "a run folder to continue from its last good checkpoint"})
    device: str = field(default="auto", metadata={"range": "device", "help":
        "auto, cpu, cuda, cuda:1, ..."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "weights dtype; auto = bfloat16 on a GPU that has it, else float32"})
    micro_batch_size: int = field(default=32, metadata={"range": ">0", "help":
        "sequences per forward/backward, a pair being 2 (gradient accumulation; same result)"})
    log_completions_every: int = field(default=10, metadata={"range": ">0", "help":
        "write the first group of every N-th round's samples to completions.jsonl"})
    # --- shared base settings: identical in every script (card grpo.md, section 3.2) ---
    num_generations: int = field(default=8, metadata={"range": ">=1", "help":
        "G, completions sampled per prompt to build pairs"})
    prompts_per_step: int = field(default=16, metadata={"range": ">0", "help":
        "pairs per optimizer step"})
    learning_rate: Optional[float] = field(default=None, metadata={"range": ">0", "help":
        f"AdamW lr; default {HUB_LEARNING_RATE} for hub models, {TINY_LEARNING_RATE} for the "
        "tiny model"})
    max_grad_norm: float = field(default=1.0, metadata={"range": ">0", "help":
        "gradient-norm clip"})
    max_bad_steps: int = field(default=5, metadata={"range": ">=0", "help":
        "stop after this many steps in a row with a non-finite loss or gradient (0: never)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward: less memory for bigger models, about one more forward of compute"})
    temperature: float = field(default=1.0, metadata={"range": ">0", "help":
        "sampling temperature for pair building (log-probs always use T = 1)"})
    top_p: float = field(default=1.0, metadata={"range": "(0, 1]", "help":
        "nucleus sampling for pair building"})
    top_k: int = field(default=0, metadata={"range": ">=0", "help":
        "top-k sampling for pair building, 0 = off"})
    max_completion_length: Optional[int] = field(default=None, metadata={"range": ">0", "help":
        "max new tokens; default 48 for arith, 512 for gsm8k"})
    # --- token_dpo-specific ---
    loss: Literal["dpo", "tdpo1", "tdpo2", "tgdpo"] = field(default="tdpo2", metadata={"help": "dpo; tdpo1/tdpo2: + sequential KL (Zeng et al.); tgdpo: guidance token weights (Zhu et al.)"})
    beta: float = field(default=0.1, metadata={"range": ">0", "help":
        "DPO's beta: scale of the log-ratios (not the RL scripts' KL coefficient)"})
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


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: per-token log-probs and the full-vocabulary KL, one chunk of positions at a time
# ----------------------------------------------------------------------------------------

KL_MIN = -1e-6  # a KL is >= 0; fp32 rounding stays above this (card, section 4), a bug does not


def _chunk_terms(h: torch.Tensor, h_ref: torch.Tensor, ids: torch.Tensor, head: Callable,
                 ref_head: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi_theta(y_t), log pi_ref(y_t) and KL_t for c positions: h, h_ref [c, H], ids [c] -> [c] x 3."""
    logp = torch.log_softmax(head(h).float(), dim=-1)                  # [c, V] fp32, this chunk only
    with torch.no_grad():                                              # the reference never gets a gradient
        logq = torch.log_softmax(ref_head(h_ref).float(), dim=-1)      # [c, V]
    q = logq.exp()
    # log_softmax keeps log q finite where softmax().log() gives log 0 = -inf and 0 * -inf = NaN.
    # The where also zeroes terms with q == 0 exactly (a -inf logit): they contribute 0.
    kl = torch.where(q > 0, q * (logq - logp), 0.0).sum(-1)            # [c]
    return logp.gather(-1, ids[:, None]).squeeze(-1), logq.gather(-1, ids[:, None]).squeeze(-1), kl


def token_logps_and_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, completion_ids: torch.Tensor,
                       completion_mask: torch.Tensor, head: Optional[Callable] = None,
                       ref_head: Optional[Callable] = None,
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

    Example (card 5.3): pi_theta = (.5, .3, .2), pi_ref = (.4, .4, .2) gives
    KL = .4 ln(.4/.5) + .4 ln(.4/.3) + 0 = 0.0258154; (.1, .1, .8) vs (.2, .2, .6) gives 0.1046496.
    """
    identity = lambda x: x  # noqa: E731
    head, ref_head = head or identity, ref_head or identity
    keep = completion_mask > 0                                                    # [N, L]
    h, h_ref, ids = hidden[keep], ref_hidden[keep].detach(), completion_ids[keep]  # [T, H], [T, H], [T]
    parts = []
    for s in range(0, ids.numel(), chunk_size):
        args = (h[s:s + chunk_size], h_ref[s:s + chunk_size], ids[s:s + chunk_size], head, ref_head)
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_terms, *args, use_reentrant=False))
        else:
            parts.append(_chunk_terms(*args))
    zeros = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)     # [N, L]
    if not parts:
        return zeros, zeros, zeros
    logp, ref_logp, kl = (torch.cat(x) for x in zip(*parts))                      # [T] each
    if kl.detach().min() < KL_MIN:
        raise FloatingPointError(f"negative KL_t ({kl.detach().min().item():.3g}): check the order of the models")
    return zeros.masked_scatter(keep, logp), zeros.masked_scatter(keep, ref_logp).detach(), zeros.masked_scatter(keep, kl)


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


def _pair_metrics(z, losses, beta, rho_w, rho_l, logps_w, logps_l, seqkl_w=None, seqkl_l=None) -> dict:
    """TRL's names: rewards = beta * rho (what TRL logs), logps = sums of policy log-probs."""
    r_w, r_l = beta * rho_w.detach(), beta * rho_l.detach()                      # [N]
    m = {"loss": losses.detach().mean(), "z/mean": z.detach().mean(),
         "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(), "rewards/margins": (r_w - r_l).mean(),
         "rewards/accuracies": (r_w > r_l).float().mean(),
         "logps/chosen": logps_w.detach().mean(), "logps/rejected": logps_l.detach().mean()}
    if seqkl_w is not None:
        kw, kr = seqkl_w.detach(), seqkl_l.detach()
        m.update({"kl/chosen": kw.mean(), "kl/rejected": kr.mean(), "kl/margin": (kr - kw).mean()})
    return {k: float(v) for k, v in m.items()}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, beta: float = 0.1,
             chosen_kl: Optional[torch.Tensor] = None, rejected_kl: Optional[torch.Tensor] = None,
             reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023), per pair:

        rho(y) = sum_t [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)] * m_t     (a sum, no length norm)
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

    Example (card 5.3): rho(y_w) = ln(.5/.4) + ln(.6/.5) = ln 1.5 = 0.4054651, rho(y_l) =
    ln(.3/.4) + ln(.8/.6) = 0 -> z = 0.0405465, L = 0.6730794. At pi_theta = pi_ref, L = ln 2.
    """
    rho_w = masked_sum(policy_chosen_logps - ref_chosen_logps, chosen_mask)      # [N]
    rho_l = masked_sum(policy_rejected_logps - ref_rejected_logps, rejected_mask)  # [N]
    z = beta * (rho_w - rho_l)                                                     # [N]
    losses = F.softplus(-z)  # never log(sigmoid(z)): it underflows to log 0 for z << 0
    kls = (None, None) if chosen_kl is None else (masked_sum(chosen_kl, chosen_mask), masked_sum(rejected_kl, rejected_mask))
    metrics = _pair_metrics(z, losses, beta, rho_w, rho_l, masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask), *kls)
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

    Example (card 5.3): SeqKL(y_w) = 0.0462264, SeqKL(y_l) = 0.1304650. TDPO1: z = 0.0405465 -
    0.1 * 0.0842386 = 0.0321226, L = 0.6772148. TDPO2 (alpha 0.5): z = 0.0363346, L = 0.6751449.
    """
    rho_w = masked_sum(policy_chosen_logps - ref_chosen_logps, chosen_mask)      # [N]
    rho_l = masked_sum(policy_rejected_logps - ref_rejected_logps, rejected_mask)  # [N]
    seqkl_w, seqkl_l = masked_sum(chosen_kl, chosen_mask), masked_sum(rejected_kl, rejected_mask)  # [N]
    if version == 1:
        z = beta * (rho_w - rho_l) - beta * (seqkl_l - seqkl_w)
    elif version == 2:
        z = beta * (rho_w - rho_l) - alpha * beta * (seqkl_l - seqkl_w.detach())
    else:
        raise ValueError(f"TDPO version must be 1 or 2, got {version}")
    losses = F.softplus(-z)                                                        # [N]
    metrics = _pair_metrics(z, losses, beta, rho_w, rho_l, masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask), seqkl_w, seqkl_l)
    metrics["rewards_tdpo/chosen"] = float((beta * (rho_w + seqkl_w)).detach().mean())
    metrics["rewards_tdpo/rejected"] = float((beta * (rho_l + seqkl_l)).detach().mean())
    return _reduce(losses, reduction), metrics


def tgdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               guidance_chosen_logps: torch.Tensor, guidance_rejected_logps: torch.Tensor,
               chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, beta: float = 0.1, alpha: float = 0.5,
               chosen_kl: Optional[torch.Tensor] = None, rejected_kl: Optional[torch.Tensor] = None,
               reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """TGDPO (Zhu et al. 2025), in its official code's form:

        r_hat_t(y) = beta [log pi_g(y_t|s_t) - log pi_ref(y_t|s_t)] * m_t        guidance token reward, no grad
        rho_t(y)   = [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)] * m_t
        z = sum_t beta (1 + alpha r_hat_t(y_w)) rho_t(y_w) - sum_t beta (1 - alpha r_hat_t(y_l)) rho_t(y_l)
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

    Example (card 5.3): r_hat(y_w) = 0.1 (ln(.6/.4), ln(.5/.5)) = (0.0405465, 0), r_hat(y_l) =
    0.1 (ln(.2/.4), 0) = (-0.0693147, 0) -> z = 0.0419959, L = 0.6723697.
    """
    rho_t_w = torch.where(chosen_mask > 0, policy_chosen_logps - ref_chosen_logps, 0.0)        # [N, L]
    rho_t_l = torch.where(rejected_mask > 0, policy_rejected_logps - ref_rejected_logps, 0.0)  # [N, L]
    rhat_w = beta * torch.where(chosen_mask > 0, guidance_chosen_logps - ref_chosen_logps, 0.0).detach()
    rhat_l = beta * torch.where(rejected_mask > 0, guidance_rejected_logps - ref_rejected_logps, 0.0).detach()
    weight_w, weight_l = 1.0 + alpha * rhat_w, 1.0 - alpha * rhat_l                             # [N, L]
    z = beta * (weight_w * rho_t_w).sum(-1) - beta * (weight_l * rho_t_l).sum(-1)               # [N]
    losses = F.softplus(-z)
    kls = (None, None) if chosen_kl is None else (masked_sum(chosen_kl, chosen_mask), masked_sum(rejected_kl, rejected_mask))
    metrics = _pair_metrics(z, losses, beta, rho_t_w.sum(-1), rho_t_l.sum(-1), masked_sum(policy_chosen_logps, chosen_mask),
                            masked_sum(policy_rejected_logps, rejected_mask), *kls)
    mw, ml = chosen_mask > 0, rejected_mask > 0
    negative = ((weight_w < 0) & mw).sum() + ((weight_l < 0) & ml).sum()
    metrics.update({"tgdpo/rhat_chosen_mean": float(rhat_w.sum() / mw.sum().clamp(min=1)),
                    "tgdpo/rhat_rejected_mean": float(rhat_l.sum() / ml.sum().clamp(min=1)),
                    "tgdpo/negative_weight_frac": float(negative / (mw.sum() + ml.sum()).clamp(min=1))})
    return _reduce(losses, reduction), metrics


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: on-policy, verified pairs
# ----------------------------------------------------------------------------------------


def build_pairs(rewards: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                num_generations: int, pairs_per_prompt: int, generator: torch.Generator
                ) -> tuple[list[tuple[int, int, int]], dict]:
    """Pair a verified-correct answer with a verified-incorrect one of the same prompt.

        group g = rows [g*G, (g+1)*G);   C = {i : r_i > 0.5},  W = the rest (truncated rows come with r = 0)
        C or W empty -> skip the prompt (counted as all-correct or all-wrong)
        else shuffle C and W, zip them: pairs (C[k], W[k]) without reuse, at most pairs_per_prompt;
        a pair whose response token ids are identical is skipped (it carries no signal)

    rewards [B]; completion_ids, completion_mask [B, L] (mask 1 up to and incl. the first EOS).
    Returns [(g, chosen_row, rejected_row)] and counts pairs/built, pairs/skipped_all_correct,
    pairs/skipped_all_wrong, pairs/skipped_identical.

    Example, G = 4: rewards [1,0,0,1, 1,1,1,1, 0,0,0,0, 0,1,0,0] -> (0, 0 or 3, 1 or 2) and
    (3, 13, 12/14/15); one prompt skipped all-correct and one all-wrong.
    """
    G = num_generations
    lengths = completion_mask.sum(-1).long().tolist()
    ids, correct = completion_ids.tolist(), (rewards > 0.5).tolist()
    pairs, counts = [], {"pairs/skipped_all_correct": 0, "pairs/skipped_all_wrong": 0, "pairs/skipped_identical": 0}
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
            if ids[c][:lengths[c]] == ids[w][:lengths[w]]:  # impossible with a deterministic verifier
                counts["pairs/skipped_identical"] += 1
                continue
            pairs.append((g, c, w))
            made += 1
    return pairs, {"pairs/built": len(pairs), **counts}


def pair_stats(pairs: list[dict]) -> dict:
    """Mean response lengths (sums grow with length: watch for length bias) and where pairs diverge."""
    if not pairs:
        return {}
    first_diff = []
    for p in pairs:
        c, r = p["chosen"], p["rejected"]
        first_diff.append(next((t for t, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r))))
    n = len(pairs)
    return {"pairs/len_chosen": sum(len(p["chosen"]) for p in pairs) / n,
            "pairs/len_rejected": sum(len(p["rejected"]) for p in pairs) / n,
            "pairs/first_diff_pos": sum(first_diff) / n}


# ----------------------------------------------------------------------------------------
# Preference data from a file, and batching of pairs (boilerplate)
# ----------------------------------------------------------------------------------------


def read_preference_jsonl(path: str) -> list[dict]:
    """Rows {"prompt": str, "chosen": str, "rejected": str} of a JSONL file (extra keys ignored).

    Any bad line raises UserError with one line "<path>:<line>: <problem>; <fix>".
    """
    fields = 'each line must be a JSON object with non-empty string fields "prompt", "chosen" and "rejected"'
    if not Path(path).is_file():
        raise UserError(f"--pairs-file {path} does not exist; pass a JSONL file, one pair per line ({fields})")
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, 1):
            common.check_utf8(line, f"{path}:{lineno}", "--pairs-file")  # one line, no traceback
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); {fields}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; {fields}")
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    problem = "missing" if key not in row else "not a non-empty string"
                    raise UserError(f"{path}:{lineno}: '{key}' is {problem}; {fields}")
            if row["chosen"] == row["rejected"]:
                raise UserError(f"{path}:{lineno}: 'chosen' equals 'rejected', which carries no preference; "
                                "drop the line or fix one answer")
            rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    if not rows:
        raise UserError(f"{path} holds no pairs; {fields}")
    return rows


def tokenize_pairs(rows: list[dict], tokenizer, task: str, context: Optional[int]) -> list[dict]:
    """Text pairs -> token-id pairs. The prompt is formatted like the task's prompts; a response
    is tokenised on its own (no merge across the boundary) and ends with EOS, as a finished answer."""
    out = []
    for i, r in enumerate(rows, 1):
        prompt = tokenizer(common.format_prompt(tokenizer, r["prompt"], task), add_special_tokens=False)["input_ids"]
        chosen, rejected = (tokenizer(r[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                            for k in ("chosen", "rejected"))
        if context is not None and len(prompt) + max(len(chosen), len(rejected)) > context:
            raise UserError(f"pair {i} of --pairs-file has {len(prompt) + max(len(chosen), len(rejected))} tokens, "
                            f"more than the model's context of {context}; shorten it or drop it")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5,6],[7]] -> ids [[5,6],[7,pad]], mask [[1,1],[1,0]] (float, built from lengths, never ids != pad)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    return ids.to(device), mask.to(device)


def collate_pairs(pairs: list[dict], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """N pairs -> one batch of 2N sequences, [chosen_1..chosen_N; rejected_1..rejected_N]:
    prompt ids/mask [2N, P] (left-padded), completion ids/mask [2N, L] (right-padded)."""
    prompt_ids, prompt_mask = common.left_pad([p["prompt"] for p in pairs] * 2, pad_id, device)
    completion_ids, completion_mask = right_pad([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                                pad_id, device)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def response_hidden_states(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, L, H] at the positions that predict each completion token.

    The model body runs without its LM head, so no [B, L, V] logits are built: the head is
    applied chunk by chunk in `token_logps_and_kl`. Position ids as in common.per_token_logps.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)                  # [B, P+L]
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state              # [B, P+L, H]
    P, L = prompt_ids.size(1), completion_ids.size(1)
    return hidden[:, P - 1:P - 1 + L]                                           # hidden j predicts token j+1


def check_plain_lm_head(model, device) -> None:
    """Refuse models whose logits are not head(last hidden state) (e.g. soft-capped logits)."""
    ids = torch.tensor([[1, 2, 3]], device=device)
    with torch.no_grad():
        full = model(input_ids=ids).logits.float()
        ours = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state).float()
    if not torch.allclose(full, ours, rtol=1e-2, atol=1e-2 * max(1.0, full.abs().max().item())):
        raise UserError("this model transforms its logits after the LM head (e.g. soft-capping), which "
                        "token_dpo.py does not reproduce; pass --model with a plain causal LM (Llama, Qwen, ...)")


def load_frozen(name: str, device, dtype):
    m, _ = common.load_model_and_tokenizer(name, device, dtype)
    return m.requires_grad_(False)


@torch.no_grad()
def fresh_sample_stats(model, ref_model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                       micro_batch_size: int) -> dict:
    """On the round's fresh samples y ~ pi_theta: the sequence KL(pi_theta || pi_ref), estimated as
    mean_y sum_t [log pi_theta - log pi_ref] (the x-axis of TDPO's reward-KL frontier), and the
    mean token entropy. T = 1, in micro-batches."""
    seq_kl, ent_sum = [], 0.0
    for s in range(0, completion_ids.size(0), micro_batch_size):
        b = (prompt_ids[s:s + micro_batch_size], prompt_mask[s:s + micro_batch_size],
             completion_ids[s:s + micro_batch_size], completion_mask[s:s + micro_batch_size])
        lp, ent = common.per_token_logps(model, *b, 1.0, with_entropy=True)
        lq, _ = common.per_token_logps(ref_model, *b, 1.0)
        seq_kl.append(masked_sum(lp - lq, b[3]))
        ent_sum += (ent * b[3]).sum().item()
    return {"round/seq_kl_to_ref": torch.cat(seq_kl).mean().item(), "entropy": ent_sum / completion_mask.sum().item()}


# ----------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    # ---- setup (boilerplate) ----
    if args.num_generations < 2 and args.pairs_file is None:
        raise UserError(f"--num-generations must be at least 2 (got {args.num_generations}): a pair needs a "
                        "correct and an incorrect answer to the same prompt; pass --num-generations 2 or more")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    max_len = ({"arith": 48, "gsm8k": 512}[args.task] if args.max_completion_length is None
               else args.max_completion_length)
    lr = ((TINY_LEARNING_RATE if args.model == common.TINY else HUB_LEARNING_RATE)
          if args.learning_rate is None else args.learning_rate)
    G, P = args.num_generations, args.prompts_per_step
    pairs_per_micro = max(1, args.micro_batch_size // 2)

    train = common.load_task(args.task, "train", args.data_dir)
    heldout = common.load_task(args.task, "test", args.data_dir)[: args.eval_size]
    file_rows = read_preference_jsonl(args.pairs_file) if args.pairs_file else None
    common.seed_everything(args.seed)
    model, tokenizer = common.load_model_and_tokenizer(args.model, device, dtype)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    check_plain_lm_head(model, device)
    train_prompt_ids = common.tokenize_prompts(tokenizer, train, args.task, common.context_length(model), max_len)
    file_pairs = None if file_rows is None else tokenize_pairs(file_rows, tokenizer, args.task, common.context_length(model))
    # pi_ref is the warm-start model, frozen for every round (card, section 3: "reference across rounds: fixed")
    ref_model = load_frozen(args.model, device, dtype)
    guidance = load_frozen(args.guidance_model, device, dtype) if args.loss == "tgdpo" and args.guidance_model else None
    head, ref_head = model.get_output_embeddings(), ref_model.get_output_embeddings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sampler = common.PromptSampler(len(train), args.seed)

    run = common.Run(args, "token_dpo", model, tokenizer, optimizer, sampler)
    state = run.state  # step, start accuracy, and the round: its number, its pairs, the batches left
    for key, value in {"round": 0, "rounds_trained": 0, "pairs": [], "queue": []}.items():
        state.setdefault(key, value)
    if guidance is None and state.get("guidance_dir"):
        guidance = load_frozen(state["guidance_dir"], device, dtype)
    if "start_accuracy" not in state:
        state["start_accuracy"] = common.evaluate(model, tokenizer, heldout, args.task, max_len)
        run.logger.log(0, {"eval/accuracy": state["start_accuracy"]})
    eval_acc, t_start = state["start_accuracy"], time.time()

    bar = common.progress(range(state["step"] + 1, args.total_steps + 1), "token_dpo")
    for step in bar:
        t0, metrics = time.time(), {}
        # ---- 1. a new round when the last one's batches are used up ----
        if not state["queue"]:
            if args.loss == "tgdpo" and guidance is None and state["rounds_trained"] >= 1:
                # TGDPO's guidance: the policy after a DPO round, frozen (saved so --resume finds it)
                guidance = copy.deepcopy(model).requires_grad_(False)
                state["guidance_dir"] = str(run.run_dir / "guidance")
                guidance.save_pretrained(state["guidance_dir"])
                tokenizer.save_pretrained(state["guidance_dir"])
            state["round"] += 1
            gen = torch.Generator().manual_seed(args.seed * 100003 + state["round"])
            if file_pairs is not None:  # the user's pairs replace sampling; the same loss code runs
                pairs = file_pairs
                metrics["pairs/built"] = len(pairs)
            else:  # ALGO LOGIC: G answers per prompt from the CURRENT policy, verified, then paired
                idx = sampler.next(args.prompts_per_round)
                prompt_ids, prompt_mask = common.left_pad([train_prompt_ids[i] for i in idx], tokenizer.pad_token_id, device)
                completion_ids = common.generate(model, tokenizer, prompt_ids, prompt_mask, max_len, G,
                                                 args.temperature, args.top_p, args.top_k)
                completion_mask = common.completion_mask_from_ids(completion_ids, tokenizer.eos_token_id)
                texts = common.decode_completions(tokenizer, completion_ids)
                # truncated = wrong (card section 2): a cut-off answer is never "chosen"
                rewards = common.finished_rewards(texts, [train[i]["answer"] for i in idx for _ in range(G)],
                                                  completion_ids, tokenizer.eos_token_id)
                found, counts = build_pairs(rewards, completion_ids.cpu(), completion_mask.cpu(), G,
                                            args.pairs_per_prompt, gen)
                ids, lengths = completion_ids.tolist(), completion_mask.sum(1).long().tolist()
                pairs = [{"prompt": train_prompt_ids[idx[g]], "chosen": ids[c][:lengths[c]],
                          "rejected": ids[w][:lengths[w]]} for g, c, w in found]
                metrics.update(common.rollout_metrics(rewards, completion_ids, completion_mask, tokenizer.eos_token_id, G),
                               **counts, **fresh_sample_stats(model, ref_model, prompt_ids.repeat_interleave(G, 0),
                                                              prompt_mask.repeat_interleave(G, 0), completion_ids,
                                                              completion_mask, args.micro_batch_size))
                if (state["round"] - 1) % args.log_completions_every == 0:
                    run.logger.log_completions(step, [train[idx[0]]["question"]] * G, texts[:G], rewards[:G].tolist())
            state["pairs"] = pairs
            for _ in range(args.epochs_per_round):
                order = torch.randperm(len(pairs), generator=gen).tolist()
                state["queue"] += [order[s:s + P] for s in range(0, len(pairs), P)]
            metrics.update(pair_stats(pairs), round=state["round"])
            if not pairs:
                bar.write(f"step {step}: round {state['round']} found no pair (every prompt all-correct or "
                          "all-wrong); it trains nothing, the next step samples a new round")

        # ---- 2. ALGO LOGIC: one optimizer step on a batch of pairs ----
        if state["queue"]:
            batch = [state["pairs"][i] for i in state["queue"].pop(0)]
            loss_name = "dpo" if args.loss == "tgdpo" and guidance is None else args.loss  # TGDPO's first round is DPO
            avg = common.MetricAverager()
            for s in range(0, len(batch), pairs_per_micro):
                mb = batch[s:s + pairs_per_micro]
                prompt_ids, prompt_mask, completion_ids, completion_mask = collate_pairs(mb, tokenizer.pad_token_id, device)
                # ONE forward for [chosen; rejected]; the reference (and guidance) without gradients
                hidden = response_hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
                with torch.no_grad():
                    ref_hidden = response_hidden_states(ref_model, prompt_ids, prompt_mask, completion_ids, completion_mask)
                logps, ref_logps, kl = token_logps_and_kl(hidden, ref_hidden, completion_ids, completion_mask,
                                                          head, ref_head, args.kl_chunk_size)      # [2n, L] each
                if not loss_name.startswith("tdpo"):
                    kl = kl.detach()  # logged only: TDPO's panels, for every loss
                (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (t.chunk(2) for t in (logps, ref_logps, completion_mask, kl))
                if loss_name == "dpo":
                    loss, m = dpo_loss(pw, pl, rw, rl, mw, ml, args.beta, kw, kr, reduction="sum")
                elif loss_name in ("tdpo1", "tdpo2"):
                    loss, m = tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, args.beta, args.alpha,
                                        version=int(loss_name[-1]), reduction="sum")
                else:
                    with torch.no_grad():
                        g_logps, _ = common.per_token_logps(guidance, prompt_ids, prompt_mask, completion_ids,
                                                            completion_mask, 1.0)
                    gw, gl = g_logps.chunk(2)
                    loss, m = tgdpo_loss(pw, pl, rw, rl, gw, gl, mw, ml, args.beta, args.alpha, kw, kr, reduction="sum")
                (loss / len(batch)).backward()  # sum over micro-batches / pairs in the step = mean over pairs
                avg.add(m, weight=len(mb))
            grad_norm = common.optimizer_step(model, optimizer, args.max_grad_norm, avg)
            metrics.update(avg.means(), grad_norm=grad_norm, num_pairs=len(batch))
            if not state["queue"]:
                state["rounds_trained"] += 1

        # ---- 3. log, evaluate, checkpoint (boilerplate) ----
        state["step"] = step
        metrics.update(learning_rate=lr, step_time=time.time() - t0)
        if step % args.eval_every == 0 or step == args.total_steps:
            eval_acc = metrics["eval/accuracy"] = common.evaluate(model, tokenizer, heldout, args.task, max_len)
        run.log(step, metrics)
        bar.set_postfix(margin=f"{metrics.get('rewards/margins', 0.0):.3f}", eval_acc=f"{eval_acc:.2f}")
        if step % args.save_every == 0 or step == args.total_steps or run.stop_requested:
            run.save(step)
        if run.stop_requested:
            break

    return run.finish(eval_acc, time.time() - t_start)


if __name__ == "__main__":
    common.run_main(main, Args)
