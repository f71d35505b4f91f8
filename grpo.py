"""GRPO: Group Relative Policy Optimization, with Dr. GRPO, DAPO, 80/20, TW-GRPO and D3S as flags.

Paper: Shao et al., "DeepSeekMath", arXiv 2402.03300 (2024). TW-GRPO: Dang et al., "Reinforcing
Video Reasoning with Focused Thinking", arXiv 2505.24718. D3S: Wang et al., "Learning More with
Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient Policy Optimization", arXiv
2509.22115 (ICLR 2026). Docs: docs/grpo.md (the math, the defaults and which source each follows).

For each prompt, sample a group of G completions, score each with a verifier, and give every
token of completion i the advantage (r_i - mean(r)) / std(r). The group mean replaces PPO's
critic. Train with PPO's clipped ratio against the weights that sampled the batch, for
`num_iterations` passes, plus an optional k3 KL penalty to a frozen reference.

    python grpo.py                                   # CPU: embedded tiny model + arithmetic task
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k   # one GPU, a hub model
    python grpo.py --loss-type dr_grpo --scale-rewards none          # Dr. GRPO
    python grpo.py --loss-type dapo --epsilon-high 0.28              # DAPO token-mean + clip-higher
    python grpo.py --top-entropy-quantile 0.2                        # the top-20% entropy tokens
    python grpo.py --token-weighting tw                  # TW-GRPO: weights from group disagreement
    python grpo.py --d3s cross                           # D3S: high-variance rollouts, |A|*H tokens
    # the DeepSeekMath recipe (for reference, not our default; docs/grpo.md, "Defaults"):
    python grpo.py --model deepseek-ai/deepseek-math-7b-instruct --task gsm8k --beta 0.04 \\
        --num-generations 64 --num-iterations 1 --max-completion-length 1024 --learning-rate 1e-6

"The loss is ~0 but the model trains" is expected: on the first pass the ratio is exactly 1
and the group-centred advantages sum to 0, so the loss VALUE is ~0 while its gradient is the
REINFORCE gradient with a group baseline. Watch `reward` and `eval/accuracy`, not the loss.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

import common

TINY_LEARNING_RATE = 5e-5  # the one value for the embedded tiny model, shared by every script
HUB_LEARNING_RATE = 1e-6


@dataclass
class Args:
    """GRPO (DeepSeekMath) with the Dr. GRPO, DAPO and top-entropy variants."""
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
        "rollout batches to train on (each gives num_iterations optimizer steps)"})
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
        "completions per forward/backward (gradient accumulation; same result)"})
    log_completions_every: int = field(default=10, metadata={"range": ">0", "help":
        "write a few completions to completions.jsonl every N steps"})
    # --- shared base settings: identical in every script (docs/grpo.md, "Defaults") ---
    num_generations: int = field(default=8, metadata={"range": ">=2", "help":
        "G, completions per prompt"})
    prompts_per_step: int = field(default=16, metadata={"range": ">0", "help":
        "prompts per rollout batch (B = prompts_per_step * G)"})
    num_iterations: int = field(default=2, metadata={"range": ">0", "help":
        "mu, optimisation passes over each rollout batch"})
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
    temperature: float = field(default=1.0, metadata={"range": ">0", "help":
        "sampling temperature T (log-probs use logits / T too)"})
    top_p: float = field(default=1.0, metadata={"range": "(0, 1]", "help":
        "nucleus sampling; keep 1.0 so the sampler equals softmax(z/T)"})
    top_k: int = field(default=0, metadata={"range": ">=0", "help":
        "top-k sampling, 0 = off; keep 0 so the sampler equals softmax(z/T)"})
    max_completion_length: Optional[int] = field(default=None, metadata={"range": ">0", "help":
        "max new tokens; default 48 for arith, 512 for gsm8k"})
    beta: float = field(default=0.0, metadata={"range": ">=0", "help":
        "k3 KL coefficient to the frozen reference; 0 loads no reference model"})
    epsilon: float = field(default=0.2, metadata={"range": "[0, 1]", "help":
        "lower clip: ratio >= 1 - epsilon"})
    epsilon_high: float = field(default=0.2, metadata={"range": ">=0", "help":
        "upper clip: ratio <= 1 + epsilon_high (0.28 = DAPO clip-higher)"})
    # --- GRPO-specific ---
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = field(default="grpo", metadata={"help":
        "grpo: per-sequence mean then mean (paper); dapo: token mean; dr_grpo: / (B * L_max)"})
    scale_rewards: Literal["group", "none"] = field(default="group", metadata={"help":
        "group: divide by the group std (paper); none: Dr. GRPO"})
    top_entropy_quantile: float = field(default=1.0, metadata={"range": "(0, 1]", "help":
        "train only on this top share of tokens by entropy (0.2 = 80/20 paper; 1.0 = off)"})
    mask_truncated_completions: bool = field(default=False, metadata={"help":
        "drop completions with no EOS from the loss (DAPO overlong filtering)"})
    # --- TW-GRPO (Dang et al.): token weights from how much the group's predictions disagree ---
    token_weighting: Literal["none", "tw"] = field(default="none", metadata={"help":
        "tw: multiply each token's policy term by w_t in [1, tw_alpha], shared by the group, "
        "from the divergence of its G next-token distributions at index t (TW-GRPO)"})
    tw_alpha: float = field(default=1.7, metadata={"range": ">=1", "help":
        "TW-GRPO: the largest token weight alpha (1 = GRPO; 1.7 = the paper's run)"})
    tw_ended: Literal["uniform", "alive"] = field(default="uniform", metadata={"help":
        "TW-GRPO: an ended completion counts as a uniform distribution (official code), or "
        "is left out (alive, an ablation)"})
    # --- D3S (Wang et al.): train on the rollouts of largest advantage variance, top |A|*H tokens
    d3s: Literal["none", "cross", "intra"] = field(default="none", metadata={"help":
        "cross: keep the n*P rollouts of the batch whose advantages vary most (D3S); intra: n "
        "per group (D3S-I); then the top-k share of their tokens by |A|*entropy"})
    d3s_n_init: int = field(default=4, metadata={"range": ">0", "help":
        "D3S: rollouts kept per prompt on the first step (ours: the paper's value is unknown)"})
    d3s_n_final: int = field(default=8, metadata={"range": ">0", "help":
        "D3S: rollouts kept per prompt on the last step, linear in between (ours)"})
    d3s_k_init: float = field(default=0.2, metadata={"range": "(0, 1]", "help":
        "D3S: share of the kept rollouts' tokens trained on the first step (ours)"})
    d3s_k_final: float = field(default=1.0, metadata={"range": "(0, 1]", "help":
        "D3S: share of the kept rollouts' tokens trained on the last step (ours)"})

    def check(self) -> None:
        """Flag combinations, after each flag's own range (common.check_args calls this)."""
        if self.d3s == "none":
            return
        if self.top_entropy_quantile < 1.0:
            raise common.UserError(
                f"--d3s {self.d3s} with --top-entropy-quantile {self.top_entropy_quantile}: two "
                "token masks with no defined composition; pass --top-entropy-quantile 1.0")
        for name in ("d3s_n_init", "d3s_n_final"):
            if getattr(self, name) > self.num_generations:
                flag = "--" + name.replace("_", "-")
                raise common.UserError(
                    f"{flag} must be at most --num-generations ({self.num_generations}), got "
                    f"{getattr(self, name)}; pass e.g. {flag} {self.num_generations}")


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the advantage
# ----------------------------------------------------------------------------------------


def compute_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                       eps_std: float = 1e-4) -> torch.Tensor:
    """Group-relative advantage, one number per completion.

        mu_g    = mean_j r_j                         over the G completions of the group
        sigma_g = sqrt( sum_j (r_j - mu_g)^2 / (G-1) )   unbiased, as torch.std
        A_i     = (r_i - mu_g) / (sigma_g + eps_std)     scale_rewards="group"
        A_i     =  r_i - mu_g                            scale_rewards="none" (Dr. GRPO)
        A_i     = 0 exactly when sigma_g < 1e-6 (all rewards equal), before any division

    rewards: [B] with B = num_groups * G, group-contiguous.  Returns [B] (fp32).

    Example: rewards [1, 0, 0, 0] -> mu 0.25, sigma 0.5 -> [1.4997, -0.4999, -0.4999, -0.4999]
    (eps_std=0 gives [1.5, -0.5, -0.5, -0.5]; "none" gives [0.75, -0.25, -0.25, -0.25]).
    """
    if num_generations < 2:
        raise ValueError("num_generations must be at least 2: a group of one has no std")
    r = rewards.float().view(-1, num_generations)           # [num_groups, G]
    mean = r.mean(dim=1, keepdim=True)                      # [num_groups, 1]
    std = r.std(dim=1, keepdim=True)                        # unbiased (G-1)
    centred = r - mean
    if scale_rewards == "group":
        centred = centred / (std + eps_std)
    # an all-equal group gives no signal: exactly zero, never 0/0
    adv = torch.where(std < 1e-6, torch.zeros_like(centred), centred)
    return adv.view(-1)


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the loss
# ----------------------------------------------------------------------------------------


def clipped_objective(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (to MAXIMISE), and the ratio.

        rho = exp(clamp(logp - old_logp, -20, 20))
        s   = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)

    logps, old_logps: [B, L]; advantages: [B, L] (or broadcastable). Returns (s, rho), [B, L].
    Example, eps 0.2: A=+1, rho=1.5 -> s=1.2 (clipped, no gradient); A=-1, rho=1.5 -> s=-1.5
    (not clipped: the min keeps the pessimistic side); A=+1, rho=1.25, eps_high=0.28 -> 1.25.
    The clamp of the log-ratio changes nothing inside the clip region; it stops inf * 0.
    """
    ratio = torch.exp((logps - old_logps).clamp(-20.0, 20.0))
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    return torch.min(ratio * advantages, clipped * advantages), ratio


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref), per token.

        d = log pi_ref - log pi_theta;   k3 = exp(d) - d - 1   (>= 0, 0 iff equal)

    Example: pi_theta=0.5, pi_ref=0.25 -> d = -ln 2 -> 0.5 + ln 2 - 1 = 0.1931472.
    """
    d = (ref_logps - logps).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def entropy_token_mask(entropies: torch.Tensor, completion_mask: torch.Tensor,
                       quantile: float) -> tuple[torch.Tensor, float]:
    """Keep the top `quantile` share of completion tokens by entropy (Wang et al., 80/20).

        tau = torch.quantile({H_t : m_t = 1}, 1 - quantile)  over the whole rollout batch
        e_t = m_t * 1[H_t >= tau]                            quantile = 1.0 -> e = m

    entropies, completion_mask: [B, L]. Returns (e [B, L], tau).
    Example: H = 0.1..1.0 on 10 valid tokens, quantile 0.2 -> tau = 0.82, keeps 0.9 and 1.0.
    """
    if quantile >= 1.0:
        return completion_mask, float("-inf")
    valid = entropies[completion_mask.bool()].float()
    tau = torch.quantile(valid, 1.0 - quantile).item()
    return completion_mask * (entropies >= tau).float(), tau


def aggregate_loss(per_token_loss: torch.Tensor, completion_mask: torch.Tensor, loss_type: str,
                   num_sequences: int, num_tokens: float,
                   max_completion_length: int) -> torch.Tensor:
    """Reduce per-token losses [B, L] to a scalar, TRL's `loss_type` names.

        grpo    (DeepSeekMath)  (1/B) sum_i (1/|o_i|) sum_t m_it l_it
        dapo    (DAPO)          sum_it m_it l_it / sum_it m_it
        dr_grpo (Dr. GRPO)      sum_it m_it l_it / (B * L_max)

    num_sequences (B) and num_tokens (sum m) are those of the WHOLE optimizer-step batch, so
    that micro-batches add up to the full-batch gradient. Masked positions are selected away
    with where(), never multiplied: 0 * NaN = NaN, so a NaN at a padded position would survive.
    Example: seq1 losses [1, 3] (+2 masked), seq2 [2, 2, 2, 6]: grpo (2 + 3)/2 = 2.5;
    dapo 16/6 = 2.667; dr_grpo, L_max 8: 1.0.
    """
    masked = torch.where(completion_mask > 0, per_token_loss, 0.0)     # [B, L], padding -> 0
    if loss_type == "grpo":
        per_seq = masked.sum(1) / completion_mask.sum(1).clamp(min=1.0)
        return per_seq.sum() / num_sequences
    if loss_type == "dapo":
        return masked.sum() / max(num_tokens, 1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (num_sequences * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              completion_mask: torch.Tensor, *, epsilon_low: float, epsilon_high: float,
              loss_type: str, num_sequences: int, num_tokens: float, max_completion_length: int,
              beta: float = 0.0,
              ref_logps: Optional[torch.Tensor] = None,
              token_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch, and its metrics.

        l_it = -e_it * s_it + beta * k3_it        s: clipped_objective, e: entropy mask (else m)
        L    = aggregate_loss(l, m, loss_type)

    logps, old_logps, ref_logps, completion_mask, token_mask: [b, L]; advantages [b] or [b, L].
    The entropy mask gates only the policy term; it never changes a normaliser.
    """
    adv = advantages if advantages.dim() == 2 else advantages[:, None]      # [b, L] or [b, 1]
    s, ratio = clipped_objective(logps, old_logps, adv, epsilon_low, epsilon_high)
    e = completion_mask if token_mask is None else token_mask
    per_token_loss = -e * s
    if beta > 0.0:
        kl = k3_kl(logps, ref_logps)
        per_token_loss = per_token_loss + beta * kl
    loss = aggregate_loss(per_token_loss, completion_mask, loss_type, num_sequences, num_tokens,
                          max_completion_length)

    with torch.no_grad():  # metrics, averaged over the micro-batch's completion tokens
        m, n = completion_mask, completion_mask.sum().clamp(min=1.0)
        adv_full = adv.expand_as(ratio)
        low = ((adv_full < 0) & (ratio < 1 - epsilon_low)).float()
        high = ((adv_full > 0) & (ratio > 1 + epsilon_high)).float()
        metrics = {"clip_ratio/low_mean": (low * m).sum() / n,
                   "clip_ratio/high_mean": (high * m).sum() / n,
                   "clip_ratio/region_mean": ((low + high) * m).sum() / n,
                   "approx_kl_old": (k3_kl(logps, old_logps) * m).sum() / n,
                   "policy_loss": loss.detach()}
        if beta > 0.0:
            metrics["kl"] = (kl * m).sum() / n
    return loss, {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: TW-GRPO, token weights from the group's disagreement (docs/grpo.md, "TW-GRPO")
# ----------------------------------------------------------------------------------------

TW_CLAMP = 11.0  # the official code's clamp of each log-prob gap: f(11) = 59,862.14
TW_CHUNK = 64    # positions per chunk: G x 64 x V fp32 (0.31 GB for G = 8 and Qwen's 151,936)


def tw_divergence(logps: torch.Tensor, alive: torch.Tensor, ended: str = "uniform") -> torch.Tensor:
    """TW-GRPO's divergence D_t of one group's G next-token distributions at each index t.

        l~_it = l_it if row i is alive at t, else -log V      an ended row counts as UNIFORM
        lbar_t = (1/G) sum_i l~_it                             mean of LOG-probs (not the mixture)
        D_t = (1/G) sum_i sum_v f(clamp(lbar_tv - l~_itv, -11, 11)),   f(x) = e^x - x - 1

    (the official code's compute_token_importance_kl_logs_uniform). ended="alive" (an ablation,
    ours): the means run over the alive rows only, and D_t = 0 where fewer than 2 are alive.
    logps: [G, c, V] full-vocabulary log-probs (fp32 or fp64) of c positions; alive: [G, c] bool.
    Returns D [c]. Not a KL: f is summed over the vocabulary without weighting by p, so D grows
    with V and only its min-max normalisation (tw_weights) means anything.

    Example, V = 3, G = 2: rows (.5, .3, .2) and (.2, .2, .6) give row sums of f 0.2925747 and
    0.2716622, D = 0.2821184; rows (.1, .1, .8) and an ended row (uniform) give D = 0.4708097;
    identical rows give D = 0.
    """
    keep = alive[..., None]                                               # [G, c, 1]
    if ended == "uniform":
        lp = torch.where(keep, logps, -math.log(logps.size(-1)))          # [G, c, V]
        d = (lp.mean(0, keepdim=True) - lp).clamp(-TW_CLAMP, TW_CLAMP)
        return (torch.exp(d) - d - 1.0).sum(-1).mean(0)                   # [c]
    if ended != "alive":
        raise ValueError(f"unknown tw_ended {ended!r}")
    n = alive.sum(0)                                                      # [c] alive rows
    lp = torch.where(keep, logps, 0.0)                                    # NaN-safe: a where
    mean = lp.sum(0, keepdim=True) / n.clamp(min=1)[None, :, None]        # [1, c, V]
    d = (mean - lp).clamp(-TW_CLAMP, TW_CLAMP)
    f = torch.where(keep, torch.exp(d) - d - 1.0, 0.0).sum(-1)            # [G, c]
    return torch.where(n >= 2, f.sum(0) / n.clamp(min=1), 0.0)


def tw_weights(divergence: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_t = 1 + (alpha - 1) (D_t - min D) / (max D - min D + 1e-8), min and max over the
    group's positions t < L_g (divergence [L_g] -> [L_g], in [1, alpha]).

    Example, alpha 1.7: D = (0, 0.2821184, 0.4708097) -> w = (1, 1.4194538, 1.7) (the largest
    is 1.7 - 0.7e-8 / 0.4708 below alpha: the 1e-8 guard); D constant -> w = 1 everywhere.
    """
    lo, hi = divergence.min(), divergence.max()
    return 1.0 + (alpha - 1.0) * (divergence - lo) / (hi - lo + 1e-8)


@torch.no_grad()
def tw_token_weights(hidden: torch.Tensor, completion_mask: torch.Tensor, num_generations: int,
                     alpha: float, temperature: float = 1.0, ended: str = "uniform",
                     head: Optional[Callable] = None,
                     chunk_size: int = TW_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """TW-GRPO's token weights (Dang et al., arXiv 2505.24718), one group at a time, no grad.

        l_it = log_softmax(head(h_it) / T)                    full vocabulary, pi_old, fp32
        D_t  = tw_divergence(l_.t, alive_.t)                  t = 0..L_g-1, L_g = longest in g
        W_it = tw_weights(D, alpha)_t * m_it                  one weight per index, whole group

    hidden: [B, L, H] final hidden states of pi_old at the positions that predict each
    completion token (common.response_hidden_states), or [B, L, V] logits with head None;
    completion_mask: [B, L], B = groups * G, group-contiguous. Returns (W [B, L], D [B/G, L]);
    both 0 from a group's longest completion on, so padding added by other groups changes
    nothing. Only [G, chunk_size, V] fp32 tensors exist at a time, never [B, L, V].
    The weights are constants: no gradient reaches them (the official code's does; ours is
    detached, docs/grpo.md). alpha = 1 gives W = m: GRPO.

    Example, G = 2, V = {a, b, c = EOS}, alpha 1.7: completions (a, a, c) and (b, c); both rows
    are (.6, .3, .1) at t = 0, as they share the prompt, so D_0 = 0; D_1 = 0.2821184 (the two
    contexts disagree); D_2 = 0.4708097 (row 2 has ended: uniform) -> W = [[1, 1.4194538, 1.7],
    [1, 1.4194538, 0]].
    """
    head = head or (lambda x: x)
    B, L = completion_mask.shape
    G = num_generations
    assert B % G == 0, "the batch must hold whole groups"
    dt = torch.promote_types(hidden.dtype, torch.float32)
    weights = torch.zeros(B, L, dtype=dt, device=hidden.device)
    div = torch.zeros(B // G, L, dtype=dt, device=hidden.device)
    for g in range(B // G):
        rows = slice(g * G, (g + 1) * G)
        alive = completion_mask[rows] > 0                                     # [G, L]
        L_g = int(alive.sum(1).max())
        if L_g == 0:
            continue
        for t0 in range(0, L_g, chunk_size):
            t1 = min(t0 + chunk_size, L_g)
            logps = torch.log_softmax(head(hidden[rows, t0:t1]).to(dt) / temperature, -1)
            div[g, t0:t1] = tw_divergence(logps, alive[:, t0:t1], ended)      # [G, c, V] -> [c]
        w = tw_weights(div[g, :L_g], alpha)                                   # [L_g]
        weights[rows, :L_g] = torch.where(alive[:, :L_g], w, 0.0)
    return weights, div


def tw_metrics(weights: torch.Tensor, divergence: torch.Tensor, loss_mask: torch.Tensor,
               completion_mask: torch.Tensor, num_generations: int, alpha: float,
               entropies: Optional[torch.Tensor] = None) -> dict:
    """TW-GRPO's diagnostics over the loss-mask tokens (docs/grpo.md, "TW-GRPO").

    tw/ended_weight_share: the share of the weight at positions where some completion of the
    group has already ended, the padding effect that dominates short answers.
    """
    B, L = completion_mask.shape
    tok = loss_mask > 0
    w = weights[tok].float()
    alive = (completion_mask > 0).view(-1, num_generations, L)                # [P, G, L]
    in_group = alive.any(1)                                                   # t < L_g, [P, L]
    some_ended = (in_group & ~alive.all(1)).repeat_interleave(num_generations, 0)  # [B, L]
    out = {"tw/weight_mean": w.mean().item() if w.numel() else 0.0,
           "tw/weight_std": w.std(correction=0).item() if w.numel() else 0.0,
           "tw/frac_at_alpha": (w >= alpha - 1e-6).float().mean().item() if w.numel() else 0.0,
           "tw/first_token_weight": weights[tok[:, 0], 0].float().mean().item(),
           "tw/ended_weight_share": (weights[tok & some_ended].sum() / max(w.sum(), 1e-12)).item(),
           "tw/div_mean": divergence[in_group].float().mean().item()}
    if entropies is not None and w.numel() > 1:
        out["tw/weight_entropy_corr"] = torch.corrcoef(
            torch.stack([w, entropies[tok].float()]))[0, 1].nan_to_num(0.0).item()
    return out


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: D3S, dual-level down-sampling (docs/grpo.md, "D3S")
# ----------------------------------------------------------------------------------------


def max_variance_subset(values: torch.Tensor, m: int) -> tuple[list[int], int, list[float]]:
    """The m of n values whose (population) variance is largest: the exact k-scan.

        the best subset is the k largest plus the m - k smallest values, for some k in 0..m:
        sort once (stable, ties by index); for each k, the variance of that candidate from
        prefix sums of x and x^2; keep the SMALLEST k within 1e-12 of the largest variance

    values: [n]; 0 <= m <= n. Returns (kept indices, ascending; k = how many come from the top;
    the variance of each candidate k = 0..m). The smallest values are taken in ascending order,
    ties by index; so are the largest, in descending order. O(n log n); checked against brute
    force in tests/test_d3s.py. The kept values are not re-centred: D3S keeps them as they are.

    Example: advantages of g1 = [1, 0, 0, 0], g2 = [1, 1, 0, 0], g3 = [1, 1, 1, 1] (rows 0..11),
    (1.4997, -0.4999 x3, 0.8659 x2, -0.8659 x2, 0 x4), m = 6: variances for k = 0..6 are
    0.0848, 0.6664, 0.8293, 0.8886, 0.8122, 0.5943, 0.3347 -> k = 3, kept {0, 1, 4, 5, 6, 7}:
    all of g2, g1's correct rollout and one wrong one, none of g3 (whose advantages are 0).
    """
    x = values.double().tolist()
    n = len(x)
    if not 0 <= m <= n:
        raise ValueError(f"cannot keep {m} of {n} values")
    if m == 0:
        return [], 0, [0.0]
    desc = sorted(range(n), key=lambda i: (-x[i], i))
    v = [x[i] for i in desc]
    s1, s2 = [0.0], [0.0]
    for a in v:
        s1.append(s1[-1] + a)
        s2.append(s2[-1] + a * a)
    variances = []
    for k in range(m + 1):  # the top k, and the m - k smallest (they never overlap: m <= n)
        lo = n - (m - k)
        mean = (s1[k] + s1[n] - s1[lo]) / m
        variances.append(max((s2[k] + s2[n] - s2[lo]) / m - mean * mean, 0.0))
    best = max(variances)
    k = next(k for k, var in enumerate(variances) if var >= best - 1e-12)
    top = desc[:k]
    taken = set(top)
    bottom = [i for i in sorted(range(n), key=lambda i: (x[i], i)) if i not in taken][:m - k]
    return sorted(top + bottom), k, variances


def d3s_schedule(step: int, total_steps: int, n_init: int, n_final: int, k_init: float,
                 k_final: float, num_generations: int) -> tuple[float, int, float]:
    """D3S's linear schedule of the rollouts kept per prompt and the token share.

        p = (step - 1) / (total_steps - 1)        0 on the first step, 1 on the last (0 if one)
        N_s = round((1 - p) n_init + p n_final), clamped to [1, G];   K = (1 - p) k_init + p k_final

    Returns (p, N_s, K). Depends on the absolute step only, so a resumed run continues it.
    Example, 80 steps, 4 -> 8 and 0.2 -> 1.0: step 1 (0, 4, 0.2); step 40 (0.4936709, 6 (from
    5.9746835), 0.5949367); step 80 (1, 8, 1.0).
    """
    p = 0.0 if total_steps <= 1 else (step - 1) / (total_steps - 1)
    n = (1.0 - p) * n_init + p * n_final
    n_s = min(max(math.floor(n + 0.5), 1), num_generations)
    k = min(max((1.0 - p) * k_init + p * k_final, 1e-12), 1.0)
    return p, n_s, k


def d3s_select(advantages: torch.Tensor, num_generations: int, n_per_prompt: int,
               mode: str) -> torch.Tensor:
    """D3S's sample level: the rollouts to train on (row indices, ascending, LongTensor).

        cross (D3S):    one max_variance_subset of all B advantages, N = n_per_prompt * P
        intra (D3S-I):  max_variance_subset of each group's G advantages, N_s = n_per_prompt

    advantages: [B], computed from ALL G rollouts of each group and not re-normalised after.
    Cross mode drops zero-advantage groups first (their 0s sit mid-list; the scan takes both
    ends); intra keeps N_s rollouts of every group, all-zero ones included.
    Example, the max_variance_subset example, N_s = 2: cross keeps [0, 1, 4, 5, 6, 7]; intra
    keeps [0, 1, 4, 6, 8, 9].
    """
    G = num_generations
    P = advantages.numel() // G
    if mode == "cross":
        kept = max_variance_subset(advantages, n_per_prompt * P)[0]
    elif mode == "intra":
        kept = [g * G + i for g in range(P)
                for i in max_variance_subset(advantages[g * G:(g + 1) * G], n_per_prompt)[0]]
    else:
        raise ValueError(f"unknown d3s mode {mode!r}")
    return torch.tensor(kept, dtype=torch.long, device=advantages.device)


def d3s_token_mask(advantages: torch.Tensor, entropies: Optional[torch.Tensor],
                   loss_mask: torch.Tensor, kept: torch.Tensor,
                   k: float) -> tuple[torch.Tensor, float]:
    """D3S's token level: the top-k share, by |A_i| * H_it, of the kept rollouts' tokens.

        pool  = {(i, t) : i kept, m_it = 1}          pooled over the whole rollout batch
        e_it  = entropy_token_mask(|A_i| * H_it, m * 1[i kept], k)     k = 1 -> e = the pool

    advantages [B]; entropies, loss_mask [B, L] (entropies from pi_old; unused when k = 1);
    kept: row indices. Returns (e [B, L], tau). With |A| = 1 and every row kept, this is the
    80/20 mask. Within a rollout the ranking is the entropy ranking; zero-advantage tokens
    score 0, so they go first (if a share 1 - k or more of the pool is 0, tau = 0 and all of
    the pool is kept, which changes no gradient).
    Example, k = 0.3: rollout a, |A| = 1.4997, H = (0.1, 0.9, 0.3); rollout b, |A| = 0.4999,
    H = (1.2, 0.05, 0.6, 2.0): scores (0.14997, 1.34973, 0.44991, 0.59988, 0.02500, 0.29994,
    0.99980), tau = 0.679864 (linear quantile 0.7): keeps a's 2nd token and b's 4th (the 80/20
    rule on H alone would keep b's 1st and 4th).
    """
    pool = torch.zeros_like(loss_mask)
    pool[kept] = loss_mask[kept]
    if k >= 1.0:
        return pool, float("-inf")
    return entropy_token_mask(advantages.abs()[:, None] * entropies, pool, k)


@dataclass
class D3SHistory:
    """The running mean of d3s/tokens_used_frac, saved in checkpoints (Run's algo_state)."""
    steps: int = 0
    tokens_used_sum: float = 0.0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "tokens_used_sum": self.tokens_used_sum}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.tokens_used_sum = state["steps"], state["tokens_used_sum"]


def d3s_metrics(advantages: torch.Tensor, kept: torch.Tensor, token_mask: torch.Tensor,
                loss_mask: torch.Tensor, completion_mask: torch.Tensor,
                num_generations: int) -> dict:
    """D3S's diagnostics of one rollout batch (docs/grpo.md, "D3S"). token_mask: the kept
    tokens (d3s_token_mask), before any TW-GRPO weight."""
    B = advantages.numel()
    a, a_kept = advantages.double(), advantages[kept].double()
    pool = loss_mask[kept]
    nonzero = pool * (a_kept != 0)[:, None]
    touched = torch.zeros(B // num_generations, dtype=torch.bool)
    touched[(kept // num_generations).cpu()] = True
    return {"d3s/kept_rollouts": len(kept), "d3s/kept_frac": len(kept) / B,
            "d3s/groups_touched": touched.float().mean().item(),
            "d3s/adv_var_kept": a_kept.var(correction=0).item(),
            "d3s/adv_var_all": a.var(correction=0).item(),
            "d3s/adv_mean_kept": a_kept.mean().item(),
            "d3s/useful_frac": (a_kept != 0).double().mean().item(),
            "d3s/token_kept_frac": (token_mask[kept].sum() / pool.sum().clamp(min=1)).item(),
            "d3s/token_kept_frac_nonzero": ((token_mask[kept] * nonzero).sum()
                                            / nonzero.sum().clamp(min=1)).item(),
            "d3s/tokens_used_frac": (token_mask.sum()
                                     / completion_mask.sum().clamp(min=1)).item()}


# ----------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    # ---- setup (boilerplate) ----
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)  # compute dtype: bf16 on a GPU that has it
    autocast = common.autocast(device, dtype)        # `with autocast():` computes in it
    max_len = (common.default_max_len(args.task, args.arith_ops)
               if args.max_completion_length is None else args.max_completion_length)
    lr = ((TINY_LEARNING_RATE if args.model == common.TINY else HUB_LEARNING_RATE)
          if args.learning_rate is None else args.learning_rate)
    G, P = args.num_generations, args.prompts_per_step
    B = G * P

    train = common.load_task(args.task, "train", args.data_dir, args.arith_ops)
    heldout = common.load_task(args.task, "test", args.data_dir, args.arith_ops)[: args.eval_size]
    common.seed_everything(args.seed)
    # fp32 master weights: AdamW's small updates would round away in bf16 (common.autocast)
    model, tokenizer = common.load_model_and_tokenizer(args.model, device, torch.float32,
                                                       args.arith_ops)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    eos = tokenizer.eos_token_id
    train_prompt_ids = common.tokenize_prompts(tokenizer, train, args.task,
                                               common.context_length(model), max_len)
    ref_model = None  # with beta == 0, no reference model is ever built
    if args.beta > 0.0:  # frozen: it never steps, so it is stored in the compute dtype
        ref_model = common.load_frozen(args.model, device, dtype, args.arith_ops)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sampler = common.PromptSampler(len(train), args.seed)

    # ---- ALGO LOGIC: the method's state across steps, and what it needs before each update ----
    algo_state = {}                                     # none: each batch stands alone
    # the 80/20 mask ranks every token by entropy first; so does D3S, by |A| * entropy
    needs_entropy = args.top_entropy_quantile < 1.0 or (
        args.d3s != "none" and min(args.d3s_k_init, args.d3s_k_final) < 1.0)
    if args.d3s != "none":
        algo_state["d3s"] = D3SHistory()                # the running mean of the tokens used
    if args.token_weighting == "tw":  # TW-GRPO applies the LM head to hidden states itself
        common.check_plain_lm_head(model, device)

    run = common.Run(args, model, tokenizer, optimizer, sampler, algo_state)
    state = run.state  # step, start accuracy, and algo_state (restored on --resume)
    if "start_accuracy" not in state:
        with autocast():
            state["start_accuracy"] = common.evaluate(model, tokenizer, heldout, args.task,
                                                      max_len)
        run.logger.log(0, {"eval/accuracy": state["start_accuracy"]})
    eval_acc, t_start = state["start_accuracy"], time.time()

    bar = common.progress(range(state["step"] + 1, args.total_steps + 1), run.algo)
    for step in bar:
        t0 = time.time()
        # ---- 1. rollout: G completions for each of P prompts, one batched generate call ----
        idx = sampler.next(P)
        prompt_ids, prompt_mask = common.left_pad([train_prompt_ids[i] for i in idx],
                                                  tokenizer.pad_token_id, device)
        with autocast():
            completion_ids = common.generate(model, tokenizer, prompt_ids, prompt_mask, max_len,
                                             G, args.temperature, args.top_p, args.top_k)
        prompt_ids = prompt_ids.repeat_interleave(G, 0)
        prompt_mask = prompt_mask.repeat_interleave(G, 0)
        completion_mask = common.completion_mask_from_ids(completion_ids, eos)  # [B, L]
        texts = common.decode_completions(tokenizer, completion_ids)
        answers = [train[i]["answer"] for i in idx for _ in range(G)]
        rewards = torch.tensor(common.reward_fn(texts, answers))                   # [B]
        rollout = common.rollout_metrics(rewards, completion_ids, completion_mask, eos, G)
        t_gen = time.time() - t0

        # ---- 2. one no-grad pass: what the update needs before it starts ----
        mbs = [slice(s, s + args.micro_batch_size) for s in range(0, B, args.micro_batch_size)]

        def fwd(m, mb, with_entropy=False):  # log-probs [b, L] (and entropies) of rows mb under m
            with autocast():
                return common.per_token_logps(m, prompt_ids[mb], prompt_mask[mb],
                                              completion_ids[mb], completion_mask[mb],
                                              args.temperature, with_entropy)

        # the reference's log-probs if beta > 0; the policy's entropies if needed first. No old
        # log-probs: nothing reads them before pass 1, which gives them detached (see no_grad_pass)
        _, entropies, ref_logps = common.no_grad_pass(fwd, mbs, model if needs_entropy else None,
                                                      ref_model)

        # ---- 3. ALGO LOGIC: group-relative advantages, one per completion ----
        advantages = compute_advantages(rewards, G, args.scale_rewards).to(device)   # [B]
        algo_metrics = {"adv/abs_mean": advantages.abs().mean().item()}
        if args.token_weighting == "tw":
            # TW-GRPO's weights, from pi_old: no update has run yet, so `model` IS pi_old. One
            # more no-grad pass of the model body (the head runs a chunk at a time, per group).
            with torch.no_grad(), autocast():
                hidden = torch.cat([common.response_hidden_states(
                    model, prompt_ids[mb], prompt_mask[mb], completion_ids[mb],
                    completion_mask[mb]) for mb in mbs])                       # [B, L, H]
                tw_w, tw_div = tw_token_weights(hidden, completion_mask, G, args.tw_alpha,
                                                args.temperature, args.tw_ended,
                                                model.get_output_embeddings())  # [B, L], [P, L]
            del hidden

        # ---- 4. ALGO LOGIC: optimisation passes against the sampling weights ----
        loss_mask = completion_mask
        if args.mask_truncated_completions:  # DAPO: no EOS, no loss
            loss_mask = completion_mask * (completion_ids == eos).any(1, keepdim=True).float()
        num_tokens = loss_mask.sum().item()
        token_mask = loss_mask                          # the 80/20 mask gates the policy term
        if args.top_entropy_quantile < 1.0:
            token_mask, tau = entropy_token_mask(entropies, loss_mask, args.top_entropy_quantile)
            algo_metrics.update({"entropy_mask/threshold": tau,
                                 "entropy_mask/kept_fraction": token_mask.sum().item()
                                 / max(num_tokens, 1)})
        rows, num_sequences = mbs, B                    # every rollout trains
        if args.d3s != "none":
            # D3S: only the kept rollouts enter the passes and the normalisers; of their tokens,
            # the top share by |A| * H. Chosen once per batch, fixed for the mu passes.
            p, n_s, k = d3s_schedule(step, args.total_steps, args.d3s_n_init, args.d3s_n_final,
                                     args.d3s_k_init, args.d3s_k_final, G)
            kept = d3s_select(advantages, G, n_s, args.d3s)
            token_mask, tau = d3s_token_mask(advantages, entropies, loss_mask, kept, k)
            history = algo_state["d3s"]
            d3s = d3s_metrics(advantages, kept, token_mask, loss_mask, completion_mask, G)
            history.steps += 1
            history.tokens_used_sum += d3s["d3s/tokens_used_frac"]
            algo_metrics.update(d3s, **{"d3s/progress": p, "d3s/n_per_prompt": n_s, "d3s/k": k,
                                        "d3s/tokens_used_cum": history.tokens_used_sum
                                        / history.steps})
            if k < 1.0:  # (k = 1 has no threshold: the whole pool trains)
                algo_metrics["d3s/token_threshold"] = tau
            num_sequences, num_tokens = len(kept), loss_mask[kept].sum().item()
            rows = [kept[s:s + args.micro_batch_size]
                    for s in range(0, len(kept), args.micro_batch_size)]
        if args.token_weighting == "tw":                # the weights multiply the kept tokens
            token_mask = token_mask * tw_w
            algo_metrics.update(tw_metrics(tw_w, tw_div, loss_mask, completion_mask, G,
                                           args.tw_alpha, entropies))
        old_logps = torch.zeros_like(completion_mask)   # filled by pass 1
        avg = common.MetricAverager()
        for it in range(args.num_iterations):
            for mb in rows:
                logps, ent = fwd(model, mb, with_entropy=it == 0 and entropies is None)
                if it == 0:
                    # On pass 1 the weights ARE the sampling weights: their log-probs are the
                    # old log-probs. Detaching them saves a whole no-grad forward, and ratio == 1.
                    old_logps[mb] = logps.detach()
                loss, metrics = grpo_loss(
                    logps, old_logps[mb], advantages[mb], loss_mask[mb],
                    epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
                    loss_type=args.loss_type, num_sequences=num_sequences, num_tokens=num_tokens,
                    max_completion_length=max_len, beta=args.beta,
                    ref_logps=None if ref_logps is None else ref_logps[mb],
                    token_mask=token_mask[mb])
                loss.backward()
                if it == 0:
                    metrics["entropy"] = common.masked_mean(  # step 2 has them for the 80/20 mask
                        entropies[mb] if ent is None else ent, completion_mask[mb])
                avg.add(metrics, weight=completion_mask[mb].sum().item(),
                        last_pass=it == args.num_iterations - 1)
            grad_norm = common.optimizer_step(model, optimizer, args.max_grad_norm, avg)

        # ---- 5. log, evaluate, checkpoint (boilerplate) ----
        state["step"] = step
        metrics = dict(rollout)
        metrics.update(avg.means(), **algo_metrics, grad_norm=grad_norm, learning_rate=lr,
                       num_tokens=num_tokens, step_time=time.time() - t0,
                       generation_share=t_gen / (time.time() - t0))
        if step % args.eval_every == 0 or step == args.total_steps:
            with autocast():
                eval_acc = metrics["eval/accuracy"] = common.evaluate(model, tokenizer, heldout,
                                                                      args.task, max_len)
        run.end_step(step, metrics, texts, rewards, idx, train, G)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", eval_acc=f"{eval_acc:.2f}")
        if step % args.save_every == 0 or step == args.total_steps or run.stop_requested:
            run.save(step)
        if run.stop_requested:
            common.close_bar(bar, args.total_steps - step)  # the bar shows this step as done
            break

    return run.finish(eval_acc, time.time() - t_start)


if __name__ == "__main__":
    common.run_main(main, Args)
