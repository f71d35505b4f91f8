"""GRPO: Group Relative Policy Optimization, with the Dr. GRPO, DAPO and 80/20 variants as flags.

Paper: Shao et al., "DeepSeekMath", arXiv 2402.03300 (2024). Docs: docs/grpo.md (the math, the
defaults and which source each follows).

For each prompt, sample a group of G completions, score each with a verifier, and give every
token of completion i the advantage (r_i - mean(r)) / std(r). The group mean replaces PPO's
critic. Train with PPO's clipped ratio against the weights that sampled the batch, for
`num_iterations` passes, plus an optional k3 KL penalty to a frozen reference.

    python grpo.py                                   # CPU: embedded tiny model + arithmetic task
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k   # one GPU, a hub model
    python grpo.py --loss-type dr_grpo --scale-rewards none          # Dr. GRPO
    python grpo.py --loss-type dapo --epsilon-high 0.28              # DAPO token-mean + clip-higher
    python grpo.py --top-entropy-quantile 0.2                        # the top-20% entropy tokens
    # the DeepSeekMath recipe (for reference, not our default; docs/grpo.md, "Defaults"):
    python grpo.py --model deepseek-ai/deepseek-math-7b-instruct --task gsm8k --beta 0.04 \\
        --num-generations 64 --num-iterations 1 --max-completion-length 1024 --learning-rate 1e-6

"The loss is ~0 but the model trains" is expected: on the first pass the ratio is exactly 1
and the group-centred advantages sum to 0, so the loss VALUE is ~0 while its gradient is the
REINFORCE gradient with a group baseline. Watch `reward` and `eval/accuracy`, not the loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Optional

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
        "folder with GSM8K train.jsonl/test.jsonl (default: ../shared/data/gsm8k)"})
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
    needs_entropy = args.top_entropy_quantile < 1.0     # the 80/20 mask ranks every token first

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

        # ---- 4. ALGO LOGIC: optimisation passes against the sampling weights ----
        loss_mask = completion_mask
        if args.mask_truncated_completions:  # DAPO: no EOS, no loss
            loss_mask = completion_mask * (completion_ids == eos).any(1, keepdim=True).float()
        num_tokens = loss_mask.sum().item()
        token_mask = loss_mask                          # the 80/20 mask gates the policy term
        if needs_entropy:
            token_mask, tau = entropy_token_mask(entropies, loss_mask, args.top_entropy_quantile)
            algo_metrics.update({"entropy_mask/threshold": tau,
                                 "entropy_mask/kept_fraction": token_mask.sum().item()
                                 / max(num_tokens, 1)})
        old_logps = torch.zeros_like(completion_mask)   # filled by pass 1
        avg = common.MetricAverager()
        for it in range(args.num_iterations):
            for mb in mbs:
                logps, ent = fwd(model, mb, with_entropy=it == 0 and entropies is None)
                if it == 0:
                    # On pass 1 the weights ARE the sampling weights: their log-probs are the
                    # old log-probs. Detaching them saves a whole no-grad forward, and ratio == 1.
                    old_logps[mb] = logps.detach()
                loss, metrics = grpo_loss(
                    logps, old_logps[mb], advantages[mb], loss_mask[mb],
                    epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
                    loss_type=args.loss_type, num_sequences=B, num_tokens=num_tokens,
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
            break

    return run.finish(eval_acc, time.time() - t_start)


if __name__ == "__main__":
    common.run_main(main, Args)
