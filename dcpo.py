"""DCPO: Dynamic Clipping Policy Optimization, GRPO with per-token clip bounds, SAS and OTM.

Paper: Yang et al. (Baichuan), "DCPO: Dynamic Clipping Policy Optimization", arXiv 2509.02333
(2025). Docs: docs/dcpo.md (the math, bound tables, the defaults and which source each follows).

DCPO makes three changes to GRPO, all aimed at wasted gradient:
  1. Dynamic-adaptive clipping (DAC). GRPO clips every token's ratio to [0.8, 1.2], so a token
     with old probability q = 0.01 can only move to 0.012. DCPO bounds the probability-weighted
     change |(r - 1) * p| <= eps instead (p = r * q). Each token gets a band from its OLD
     probability: about GRPO's for likely tokens, wide for rare ones (q = 0.01 may reach r = 5),
     with a hard cap r <= 10, which is also the dual clip for negative advantages.
  2. Smooth advantage standardisation (SAS). Every prompt keeps running reward statistics
     (visits, mean, std) across the run, saved with each checkpoint. The advantage blends this
     visit's standardisation with the one over every reward the prompt has ever received, so an
     all-equal group of a prompt that varied before still gets a small nonzero advantage.
  3. Only-token-mean (OTM) loss: token mean within each response, summed over the responses of
     a prompt, mean over prompts. Each response counts once, whatever its length.

    python dcpo.py                                   # CPU: embedded tiny model + arithmetic task
    python dcpo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k   # one GPU, a hub model
    python dcpo.py --no-sas                          # DAC + OTM only (the released scripts)
    # the official code's choices where it departs from the paper (docs/dcpo.md, "Defaults"):
    python dcpo.py --eps-low 0.2 --eps-high 0.28 --sas-std unbiased --loss-type grpo

DAC acts only where the ratio differs from 1, that is from the second optimisation pass over a
rollout batch on (num_iterations = 2 here; the paper makes 16 updates per rollout). SAS acts only
on prompts that come back: the arithmetic task's 1000 training problems are revisited every
62.5 steps (16 prompts a step), so in the default 80-step run a prompt's second visit blends in
its first; watch `sas/mean_visits`. OTM's loss is G times GRPO's per-sequence mean, so the
gradient-norm clip binds more often; `grad_norm` is logged before clipping.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

import common
from common import UserError

TINY_LEARNING_RATE = 5e-5  # the one value for the embedded tiny model, shared by every script
HUB_LEARNING_RATE = 1e-6


@dataclass
class Args:
    """DCPO: dynamic-adaptive clipping, smooth advantage standardisation, only-token-mean loss."""
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
        "GRPO's fixed lower clip 1 - epsilon. DCPO does not clip with it (see --eps-low): it is "
        "only the band of the clip_ratio/fixed_0.2 comparison metrics"})
    epsilon_high: float = field(default=0.2, metadata={"range": ">=0", "help":
        "GRPO's fixed upper clip 1 + epsilon_high. DCPO does not clip with it (see --eps-high): "
        "it is only the band of the clip_ratio/fixed_0.2 comparison metrics"})
    # --- DCPO-specific: the paper by default, the official code's choices as flags ---
    loss_type: Literal["otm", "grpo", "dapo", "otm_token_sum"] = field(default="otm", metadata={
        "help": "otm: token mean per response, summed per prompt, mean over prompts (paper Eq. "
        "8); grpo: otm / G (current official code); dapo: token mean; otm_token_sum: token sum "
        "/ B (paper-era code)"})
    eps_low: float = field(default=0.16, metadata={"range": ">0", "help":
        "DAC lower bound: (1 - r) * r * q <= eps_low (paper 0.16; the official scripts 0.2)"})
    eps_high: float = field(default=0.20, metadata={"range": ">0", "help":
        "DAC upper bound: (r - 1) * r * q <= eps_high (paper 0.20; the official scripts 0.28)"})
    ratio_max: float = field(default=10.0, metadata={"range": ">0", "help":
        "r_max: cap of the upper bound (A > 0) and dual clip (A < 0), paper and code 10"})
    sas: bool = field(default=True, metadata={"help":
        "smooth advantage standardisation over each prompt's reward history (paper); --no-sas: "
        "this visit's group only, as the released scripts run"})
    sas_std: Literal["population", "unbiased"] = field(default="population", metadata={"help":
        "std in SAS: population, divide by G (paper); unbiased, torch.std (official code)"})


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the advantage
# ----------------------------------------------------------------------------------------


# grpo.py's, unchanged (tests/test_copies.py); DCPO uses it only for the `rur/grpo` metric
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


@dataclass(frozen=True)
class PromptStat:
    """One prompt's reward history, summarised: `visits` visits of G rewards, their mean and std."""
    visits: int           # i: how often the prompt was sampled, the latest visit included
    mean: float           # mu_tot over all G * i rewards
    std: float            # sigma_tot (population by default; see PromptStats.sas_std)
    text_hash: str = ""   # prompt_hash of the question, to catch a dataset that changed on resume


def prompt_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class PromptStats:
    """SAS's running state: example id -> PromptStat. Lives in run.state, so every checkpoint
    holds it and --resume restores it (a resumed run repeats its advantages bit for bit).

    state_dict() is plain python: ints, floats, strings, lists (no tensors, no classes). The
    pooled update assumes G rewards per visit, so G is stored and a different G refused; the
    std convention is stored too, since the stored sigma_tot depends on it.
    """

    def __init__(self, num_generations: int, sas_std: str = "population",
                 text_hashes: Optional[dict[int, str]] = None):
        self.num_generations, self.sas_std = num_generations, sas_std
        self.text_hashes = text_hashes  # id -> prompt_hash(question): load_state_dict checks them
        self.by_id: dict[int, PromptStat] = {}

    def state_dict(self) -> dict:
        rows = [[k, s.visits, s.mean, s.std, s.text_hash] for k, s in self.by_id.items()]
        return {"num_generations": self.num_generations, "sas_std": self.sas_std, "prompts": rows}

    def load_state_dict(self, state: dict, text_hashes: Optional[dict[int, str]] = None) -> None:
        """Restore a saved state; refuse another G, another std, or ids whose text changed."""
        if state["num_generations"] != self.num_generations:
            raise UserError(f"the saved SAS statistics assume G = {state['num_generations']} "
                            f"rewards per visit; resume with --num-generations "
                            f"{state['num_generations']}")
        if state["sas_std"] != self.sas_std:
            raise UserError(f"the saved SAS statistics use the {state['sas_std']} std; resume "
                            f"with --sas-std {state['sas_std']}")
        by_id = {int(k): PromptStat(int(v), float(m), float(s), h)
                 for k, v, m, s, h in state["prompts"]}
        text_hashes = self.text_hashes if text_hashes is None else text_hashes
        if text_hashes is not None:
            changed = [k for k, s in by_id.items() if text_hashes.get(k) != s.text_hash]
            if changed:
                raise UserError(f"{len(changed)} saved prompt ids (e.g. {changed[0]}) now name "
                                "other questions; resume with the same --task and --data-dir "
                                "as the run")
        self.by_id = by_id


def sas_blend(a_new: torch.Tensor, a_tot: torch.Tensor, visits: int) -> torch.Tensor:
    """SAS's choice between two mixtures of the two standardisations (i = visits):

        SA_new = ((i-1)/i) * A_new + (1/i) * A_tot
        SA_tot = (1/i) * A_new + ((i-1)/i) * A_tot
        A      = SA_new if |SA_new| < |SA_tot| else SA_tot        (ties -> SA_tot)

    a_new, a_tot: [G] -> [G]. i = 1 gives A_new; i = 2 gives the 50/50 average.
    Example: i = 3, A_new = 1, A_tot = -1 -> SA_new = 1/3, SA_tot = -1/3, a tie -> -1/3.
    """
    w_old, w_cur = (visits - 1) / visits, 1.0 / visits
    sa_new = w_old * a_new + w_cur * a_tot                  # [G]
    sa_tot = w_cur * a_new + w_old * a_tot                  # [G]
    return torch.where(sa_new.abs() < sa_tot.abs(), sa_new, sa_tot)


def sas_group_advantages(rewards: torch.Tensor, prev: Optional[PromptStat],
                         sas_std: str = "population", use_sas: bool = True,
                         text_hash: str = "") -> tuple[torch.Tensor, PromptStat]:
    """SAS for one visit of one prompt. Pure: returns the prompt's new stat, changes nothing.

        i = prev.visits + 1   (1 on the first visit)
        mu_new, sigma_new = mean and std of this visit's G rewards (population: divide by G)
        mu_tot     = ( mu_new + (i-1) * mu_old ) / i
        sigma_tot^2 = (1/i) * [ sigma_new^2 + (i-1) * sigma_old^2
                                + ((i-1)/i) * (mu_old - mu_new)^2 ]
        A_new = (R - mu_new) / sigma_new,  A_tot = (R - mu_tot) / sigma_tot  (0 if sigma < 1e-6)
        A = sas_blend(A_new, A_tot, i)            (use_sas=False: A = A_new; the stat still updates)

    The pooled variance is exact for the population std. With sas_std="unbiased" the same
    formulas take torch.std (n - 1), which is what the official code does.
    rewards: [G] (G >= 2). Returns (advantages [G] float64, new PromptStat).

    Worked example (G = 4, population std):
        visit 1 [1,0,0,0]: mu_tot 0.25,      sigma_tot 0.4330127 -> [1.7320508, -0.5773503 x3]
        visit 2 [1,1,1,1]: mu_tot 0.625,     sigma_tot 0.4841229 -> 0.3872983 for all four
        visit 3 [0,0,0,0]: mu_tot 0.4166667, sigma_tot 0.4930066 -> -0.2817181 for all four
    (grpo.py's unbiased std would give 1.5 at visit 1: the factor sqrt(3/4).)
    """
    r = rewards.detach().to(torch.float64).reshape(-1)      # [G] float64: the stats stay exact
    if r.numel() < 2:
        raise ValueError(f"SAS needs a group of at least 2 rewards, got {r.numel()}")
    mu_new, sigma_new = r.mean().item(), r.std(unbiased=sas_std == "unbiased").item()
    if prev is None:
        visits, mu_tot, sigma_tot = 1, mu_new, sigma_new
    else:
        visits, k = prev.visits + 1, prev.visits           # k = i - 1
        mu_tot = (mu_new + k * prev.mean) / visits
        var_tot = (sigma_new ** 2 + k * prev.std ** 2
                   + (k / visits) * (prev.mean - mu_new) ** 2) / visits
        sigma_tot = max(var_tot, 0.0) ** 0.5
    # no eps anywhere (the paper); a tolerance, not == 0: the std of equal floats can be 1e-17
    a_new = (r - mu_new) / sigma_new if sigma_new >= 1e-6 else torch.zeros_like(r)   # [G]
    a_tot = (r - mu_tot) / sigma_tot if sigma_tot >= 1e-6 else torch.zeros_like(r)   # [G]
    adv = sas_blend(a_new, a_tot, visits) if use_sas else a_new
    return adv, PromptStat(visits, mu_tot, sigma_tot, text_hash)


def sas_advantages(rewards: torch.Tensor, num_generations: int, prompt_ids: list[int],
                   stats: PromptStats,
                   use_sas: bool = True, text_hashes: Optional[list[str]] = None
                   ) -> tuple[torch.Tensor, dict[int, PromptStat], dict]:
    """SAS advantages of a rollout batch. Pure: reads `stats`; the caller commits the returned
    entries with stats.by_id.update(new_stats).

    Group g (rows [g*G:(g+1)*G]) of prompt id k gets sas_group_advantages(R_g, stats[k]). A
    prompt that occurs twice in one batch is two consecutive visits, in row order.

    rewards: [B] group-contiguous, B = P * G; prompt_ids, text_hashes: P values, one per group.
    Returns (advantages [B] fp32, new_stats {id: PromptStat}, metrics):
        rur       share of responses with A != 0;  rur/grpo: the same under grpo.py's
                  compute_advantages on this batch (the paper's "response utilisation")
        sas/prompts_tracked, sas/mean_visits (mean i of this batch's groups),
        sas/frac_zero_var_groups, sas/frac_zero_var_groups_with_signal (all-equal groups that
        still get A != 0 from their history), sas/adv_group_mean (groups are no longer centred)

    Example (G = 4): prompt 7 was seen once as [1,0,0,0]; the batch holds prompt 7 with
    [1,1,1,1] (A = 0.3872983 x4, visit 2) and new prompts 8 [0,0,0,0] and 9 [1,0,1,0]:
    rur 8/12, rur/grpo 4/12, frac_zero_var_groups 2/3, ..._with_signal 1/3, mean_visits 4/3.
    """
    G = num_generations
    if G != stats.num_generations:
        raise ValueError(f"the SAS statistics assume G = {stats.num_generations}, got G = {G}")
    P = rewards.numel() // G
    if len(prompt_ids) != P or P * G != rewards.numel():
        raise ValueError(f"need one prompt id per group: {rewards.numel()} rewards, G = {G}, "
                         f"{len(prompt_ids)} ids")
    r = rewards.detach().cpu().view(P, G)                   # [P, G]
    adv = torch.zeros(P, G, dtype=torch.float64)            # [P, G]
    new_stats: dict[int, PromptStat] = {}                   # this batch's visits, so repeats chain
    visits, zero_var, zero_var_signal = [], 0, 0
    for g, key in enumerate(prompt_ids):
        prev = new_stats.get(key, stats.by_id.get(key))
        adv[g], new_stats[key] = sas_group_advantages(r[g], prev, stats.sas_std, use_sas,
                                                      text_hashes[g] if text_hashes else "")
        visits.append(new_stats[key].visits)
        if r[g].double().std().item() < 1e-6:               # an all-equal group
            zero_var += 1
            zero_var_signal += int(bool((adv[g] != 0).any()))
    metrics = {"rur": (adv != 0).double().mean().item(),
               "rur/grpo": (compute_advantages(rewards.cpu(), G) != 0).double().mean().item(),
               "sas/prompts_tracked": float(len(stats.by_id.keys() | new_stats.keys())),
               "sas/mean_visits": sum(visits) / P, "sas/frac_zero_var_groups": zero_var / P,
               "sas/frac_zero_var_groups_with_signal": zero_var_signal / P,
               "sas/adv_group_mean": adv.mean(dim=1).mean().item()}
    return adv.view(-1).float(), new_stats, metrics


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the loss
# ----------------------------------------------------------------------------------------

# old-probability buckets [lo, hi) of the clip metrics (docs/dcpo.md, "Logged metrics")
Q_BUCKETS = (("q<0.1", 0.0, 0.1), ("q0.1-0.5", 0.1, 0.5), ("q0.5-0.9", 0.5, 0.9),
             ("q>=0.9", 0.9, float("inf")))


def dac_bounds(old_logps: torch.Tensor, eps_low: float = 0.16, eps_high: float = 0.20,
               ratio_max: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic-adaptive clipping: each token's ratio band from its OLD probability q.

    |(r - 1) * p| <= eps with p = r * q, solved on the root branch through r = 1:
        r_low(q)  = 1/2 + 1/2 * sqrt( max(1 - 4 * eps_low / q, 0) )     (= 0.5 for q <= 4 * eps_low)
        r_high(q) = min( 1/2 + 1/2 * sqrt(1 + 4 * eps_high / q), ratio_max )
    4 * eps / q is computed as 4 * eps * exp(-old_logp) with -old_logp clamped to [0, 80]
    (exp(80) is finite in fp32), so old_logp = -100 or -inf gives (0.5, ratio_max), never NaN.

    old_logps: [B, L] (no grad). Returns (r_low, r_high), [B, L] each, fp32 or wider (pass
    float64 to check the anchors to 1e-12). Why 0.16 / 0.20: r_low(1) = 0.8 and
    r_high(1/1.2) = 1.2, GRPO's band at two anchor points.

    Worked example (eps 0.16 / 0.20, cap 10):
        q = 1.0  -> 0.8,       1.1708204      q = 0.9  -> 0.7687419, 1.1871843
        q = 0.64 -> 0.5,       1.25           q = 0.1  -> 0.5,       2.0
        q = 0.01 -> 0.5,       5.0            q = 0.001 -> 0.5,      10 (uncapped 14.650972)
    """
    dtype = torch.promote_types(old_logps.dtype, torch.float32)
    inv_q = torch.exp((-old_logps.detach().to(dtype)).clamp(0.0, 80.0))          # [B, L] 1/q
    r_low = 0.5 + 0.5 * torch.sqrt((1.0 - 4.0 * eps_low * inv_q).clamp(min=0.0))  # clamp, sqrt
    r_high = (0.5 + 0.5 * torch.sqrt(1.0 + 4.0 * eps_high * inv_q)).clamp(max=ratio_max)
    return r_low, r_high


def dcpo_per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        completion_mask: torch.Tensor, eps_low: float = 0.16,
                        eps_high: float = 0.20,
                        ratio_max: float = 10.0) -> tuple[torch.Tensor, ...]:
    """PPO's clipped loss with the DAC band, plus the dual clip for negative advantages.

        r_t = exp(clamp(logp_t - old_logp_t, -20, 20))
        l_t = max( -A * r_t,  -A * clip(r_t, r_low(q_t), r_high(q_t)) )
        if A < 0:  l_t = min( l_t, -A * ratio_max )
    So A > 0 moves r freely in [0, r_high], A < 0 in [r_low, ratio_max]. Masked positions are
    selected away with where() before anything else (their log-probs may be NaN or inf).

    logps (grad), old_logps: [B, L]; advantages: [B] or [B, L]; completion_mask: [B, L].
    Returns (l [B, L] with 0 at masked positions, and detached ratio, r_low, r_high, A, [B, L]).

    Worked example (A, q, r -> l), next to GRPO's fixed [0.8, 1.2]:
        (+1, 0.1, 1.5) -> -1.5, gradient flows   (fixed clip: -1.2, clipped)
        (+1, 0.1, 2.5) -> -2.0, clipped at r_high = 2
        (-1, 0.5, 0.6) ->  0.6, gradient flows   (fixed clip: 0.8, clipped)
        (-1, 0.5, 0.4) ->  0.5, clipped at r_low = 0.5
        (-1, 0.5, 3.0) ->  3.0, gradient flows (no upper clip for A < 0 below the cap)
        (-1, 0.5, 12)  -> 10.0, the dual-clip cap
    """
    m = completion_mask > 0                                                       # [B, L] bool
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logp = torch.where(m, logps.to(dtype), 0.0)                                   # [B, L]
    old = torch.where(m, old_logps.detach().to(dtype), 0.0)                       # [B, L]
    adv = advantages.detach().to(dtype)
    adv = torch.where(m, adv if adv.dim() == 2 else adv[:, None], 0.0)            # [B, L]
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))                            # [B, L]
    r_low, r_high = dac_bounds(old, eps_low, eps_high, ratio_max)                 # [B, L] each
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, min=r_low, max=r_high))
    # with A < 0 the max grows without bound in r: the dual clip caps it at -A * ratio_max
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * ratio_max), loss)
    return torch.where(m, loss, 0.0), ratio.detach(), r_low, r_high, adv


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref), per token.

        d = log pi_ref - log pi_theta;   k3 = exp(d) - d - 1   (>= 0, 0 iff equal)

    Example: pi_theta=0.5, pi_ref=0.25 -> d = -ln 2 -> 0.5 + ln 2 - 1 = 0.1931472.
    """
    d = (ref_logps - logps).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def dcpo_aggregate_loss(per_token_loss: torch.Tensor, completion_mask: torch.Tensor,
                        loss_type: str, num_sequences: int, num_tokens: float,
                        num_generations: int) -> torch.Tensor:
    """Reduce per-token losses [B, L] to a scalar.

        otm           (paper Eq. 8)      (1/P) sum_i (1/|o_i|) sum_t m_it l_it     P = B / G prompts
        grpo          (current code)     (1/B) sum_i (1/|o_i|) sum_t m_it l_it  =  otm / G
        dapo          (token mean)       sum_it m_it l_it / sum_it m_it
        otm_token_sum (paper-era code)   sum_it m_it l_it / B

    num_sequences (B) and num_tokens (sum m) are those of the WHOLE optimizer-step batch, so
    that micro-batches add up to the full-batch gradient. Masked positions are selected away
    with where(), never multiplied (0 * NaN = NaN).
    Example, G = 2: prompt 1 has [1, 3] and [2, 2, 2, 6], prompt 2 [4] and [0, 2]; response
    means 2, 3, 4, 1: otm ((2+3) + (4+1))/2 = 5.0; grpo 2.5; dapo 22/9 = 2.444; otm_token_sum 5.5.
    OTM against token mean, A = 1 at length 500 and A = 0.5 at length 1500: OTM weighs the two
    responses 1 and 0.5, the token mean 0.25 and 0.375.
    """
    masked = torch.where(completion_mask > 0, per_token_loss, 0.0)                # [B, L]
    if loss_type in ("otm", "grpo"):
        per_seq = masked.sum(1) / completion_mask.sum(1).clamp(min=1.0)  # [B] token mean each
        num_prompts = num_sequences // num_generations
        return per_seq.sum() / (num_prompts if loss_type == "otm" else num_sequences)
    if loss_type == "dapo":
        return masked.sum() / max(num_tokens, 1.0)
    if loss_type == "otm_token_sum":
        return masked.sum() / num_sequences
    raise ValueError(f"unknown loss_type {loss_type!r}")


def dcpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              completion_mask: torch.Tensor, *, eps_low: float, eps_high: float, ratio_max: float,
              loss_type: str, num_sequences: int, num_tokens: float, num_generations: int,
              beta: float = 0.0,
              ref_logps: Optional[torch.Tensor] = None,
              fixed_band: tuple[float, float] = (0.2, 0.2)) -> tuple[torch.Tensor, dict]:
    """The DCPO loss of one micro-batch, and its metrics.

        l_it = dcpo_per_token_loss_it + beta * k3_it      (DCPO itself uses beta = 0)
        L    = dcpo_aggregate_loss(l, m, loss_type)

    logps, old_logps, ref_logps, completion_mask: [b, L]; advantages [b] or [b, L].
    Metrics, over this micro-batch's completion tokens (add them with add_dcpo_metrics):
        clip_ratio/dcpo (share of tokens whose gradient the clip zeroes), split into _low
        (A < 0, r < r_low), _high (A > 0, r > r_high) and _cap (A < 0, r > ratio_max);
        clip_ratio/fixed_0.2: what GRPO's [1 - fixed_band[0], 1 + fixed_band[1]] would have
        clipped on the same tokens; per old-probability bucket b: clip_ratio/dcpo/b,
        clip_ratio/fixed_0.2/b, dac/token_share/b and dac/mean_r_high/b.
    Worked example, eight tokens (A, q, r):
        (+1, 0.05, 1.5)  (+1, 0.05, 3.0)  (-1, 0.3, 0.7)   (-1, 0.3, 0.4)
        (+1, 0.95, 1.15) (-1, 0.95, 0.79) (-1, 0.7, 12)    (+1, 0.7, 1.0)
        DAC clips the 2nd (r_high(0.05) = 2.56), the 4th (r_low(0.3) = 0.5) and the 7th (cap):
            clip_ratio/dcpo 3/8; by bucket q<0.1 1/2, 0.1-0.5 1/2, 0.5-0.9 1/2, >=0.9 0/2
        the fixed band clips the 1st to 4th and the 6th (0.79 < 0.8, but r_low(0.95) = 0.786):
            clip_ratio/fixed_0.2 5/8; by bucket 2/2, 2/2, 0/2, 1/2
    """
    per_token_loss, ratio, r_low, r_high, adv = dcpo_per_token_loss(
        logps, old_logps, advantages, completion_mask, eps_low, eps_high, ratio_max)
    m = completion_mask > 0
    if beta > 0.0:
        # select before k3 too: its backward at a NaN would give 0 * NaN = NaN
        kl = torch.where(m, k3_kl(torch.where(m, logps, 0.0), torch.where(m, ref_logps, 0.0)), 0.0)
        per_token_loss = per_token_loss + beta * kl
    loss = dcpo_aggregate_loss(per_token_loss, completion_mask, loss_type, num_sequences,
                               num_tokens, num_generations)

    with torch.no_grad():  # metrics, averaged over the micro-batch's completion tokens
        # q: each token's old probability, [b, L]
        q = torch.exp(torch.where(m, old_logps.detach().float(), 0.0).clamp(max=0.0))
        low = m & (adv < 0) & (ratio < r_low)                                          # [b, L]
        high = m & (adv > 0) & (ratio > r_high)
        cap = m & (adv < 0) & (ratio > ratio_max)
        dcpo_clip = low | high | cap
        fixed_clip = m & (((adv > 0) & (ratio > 1 + fixed_band[1]))
                          | ((adv < 0) & (ratio < 1 - fixed_band[0])))
        n = m.sum().clamp(min=1)
        metrics = {"clip_ratio/dcpo": dcpo_clip.sum() / n, "clip_ratio/dcpo_low": low.sum() / n,
                   "clip_ratio/dcpo_high": high.sum() / n, "clip_ratio/dcpo_cap": cap.sum() / n,
                   "clip_ratio/fixed_0.2": fixed_clip.sum() / n,
                   "approx_kl_old": torch.where(m, k3_kl(logps, old_logps), 0.0).sum() / n,
                   "policy_loss": loss.detach()}
        for name, lo, hi in Q_BUCKETS:
            in_b = m & (q >= lo) & (q < hi)
            n_b = in_b.sum().clamp(min=1)
            metrics.update({f"clip_ratio/dcpo/{name}": (dcpo_clip & in_b).sum() / n_b,
                            f"clip_ratio/fixed_0.2/{name}": (fixed_clip & in_b).sum() / n_b,
                            f"dac/token_share/{name}": in_b.sum() / n,
                            f"dac/mean_r_high/{name}": torch.where(in_b, r_high, 0.0).sum() / n_b})
        if beta > 0.0:
            metrics["kl"] = kl.sum() / n
    return loss, {k: float(v) for k, v in metrics.items()}


def add_dcpo_metrics(avg: common.MetricAverager, metrics: dict, num_tokens: float,
                     last_pass: bool) -> None:
    """Average a micro-batch's metrics over the update: per-bucket rates weighted by that
    bucket's tokens (so they equal the whole batch's rate exactly), the rest by tokens."""
    rest = dict(metrics)
    for name, _, _ in Q_BUCKETS:
        n_b = rest[f"dac/token_share/{name}"] * num_tokens
        bucket = [k for k in metrics
                  if k.endswith("/" + name) and not k.startswith("dac/token_share")]
        avg.add({k: rest.pop(k) for k in bucket}, weight=n_b, last_pass=last_pass)
    avg.add(rest, weight=num_tokens, last_pass=last_pass)


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
    stats = PromptStats(G, args.sas_std, {ex["id"]: prompt_hash(ex["question"]) for ex in train})
    algo_state = {"prompt_stats": stats}                # SAS: every prompt's reward history
    needs_entropy = False                               # DCPO masks no token by entropy

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

        # ---- 3. ALGO LOGIC: SAS advantages, one per completion, from each prompt's history ----
        advantages, new_stats, algo_metrics = sas_advantages(
            rewards, G, [train[i]["id"] for i in idx], stats, args.sas,
            [prompt_hash(train[i]["question"]) for i in idx])
        stats.by_id.update(new_stats)                   # commit this batch's visits
        advantages = advantages.to(device)                                           # [B]
        algo_metrics["adv/abs_mean"] = advantages.abs().mean().item()

        # ---- 4. ALGO LOGIC: optimisation passes against the sampling weights ----
        num_tokens = completion_mask.sum().item()
        old_logps = torch.zeros_like(completion_mask)   # filled by pass 1
        avg = common.MetricAverager()
        for it in range(args.num_iterations):
            for mb in mbs:
                logps, ent = fwd(model, mb, with_entropy=it == 0 and entropies is None)
                if it == 0:
                    # On pass 1 the weights ARE the sampling weights: their log-probs are the
                    # old log-probs. Detaching them saves a whole no-grad forward, and ratio == 1.
                    old_logps[mb] = logps.detach()
                loss, metrics = dcpo_loss(
                    logps, old_logps[mb], advantages[mb], completion_mask[mb],
                    eps_low=args.eps_low, eps_high=args.eps_high, ratio_max=args.ratio_max,
                    loss_type=args.loss_type, num_sequences=B, num_tokens=num_tokens,
                    num_generations=G, beta=args.beta,
                    ref_logps=None if ref_logps is None else ref_logps[mb],
                    fixed_band=(args.epsilon, args.epsilon_high))
                loss.backward()
                if it == 0:
                    metrics["entropy"] = common.masked_mean(  # step 2 has them for the 80/20 mask
                        entropies[mb] if ent is None else ent, completion_mask[mb])
                add_dcpo_metrics(avg, metrics, completion_mask[mb].sum().item(),
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
