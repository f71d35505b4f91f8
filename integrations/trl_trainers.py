"""TEMPO, DCPO and token-level DPO as TRL 1.16 trainers: the scripts' own functions inside TRL.

    from integrations.trl_trainers import TempoGRPOTrainer, DCPOGRPOTrainer, TokenDPOTrainer
    trainer = TempoGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                               train_dataset=..., td_coef=1.0)  # the parent's + the method's
    trainer.train()

Each class overrides one or two of TRL's methods and calls the pure functions of tempo.py,
dcpo.py and token_dpo.py (imported, never copied), so a fix there lands here too. What each
override does, and why there, is in docs/integrations.md. The overrides use TRL's private
methods (`_generate_and_score_completions`, `_compute_loss`, `_calculate_rewards`,
`_save_checkpoint`, `_load_optimizer_and_scheduler`), so the TRL version is pinned in
integrations/requirements.txt.

    TempoGRPOTrainer  per-token TEMPO advantages [B, T] in place of GRPO's [B]; TRL's loss as it is
    DCPOGRPOTrainer   SAS advantages (per-prompt statistics kept across steps and checkpoints) and
                      DCPO's loss: dynamic clip bounds, dual clip, only-token-mean aggregation
    TokenDPOTrainer   DPOTrainer with loss="tdpo1" | "tdpo2" | "tgdpo" (full-vocabulary KL)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

try:
    import trl
    from trl import DPOTrainer, GRPOTrainer
except ImportError:
    raise ImportError("integrations/trl_trainers.py needs TRL 1.16: "
                      "pip install -r integrations/requirements.txt") from None
if not trl.__version__.startswith("1.16."):
    raise ImportError(f"integrations/trl_trainers.py is written against TRL 1.16's internals, "
                      f"found {trl.__version__}: pip install -r integrations/requirements.txt")

import torch
from accelerate.utils import gather_object

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the method scripts, one level up
import dcpo  # noqa: E402
import tempo  # noqa: E402
import token_dpo  # noqa: E402

SAS_STATE_FILE = "dcpo_sas_state.json"  # DCPOGRPOTrainer writes it into every checkpoint folder


class ResumeError(ValueError):
    """A checkpoint DCPOGRPOTrainer cannot resume from exactly (train_trl.py: one line, exit 2)."""


def log_process_means(trainer, mode: str, metrics: dict) -> None:
    """Append each metric's mean over the processes to TRL's `_metrics` (one gather)."""
    names = sorted(metrics)
    values = torch.tensor([metrics[k] for k in names], device=trainer.accelerator.device)
    means = trainer.accelerator.gather(values[None]).mean(0).tolist()
    for k, v in zip(names, means):
        trainer._metrics[mode][k].append(v)


class _RewardTap:
    """Keeps what TRL's advantage code sees but does not return: the summed reward of every
    completion of the generation batch, gathered over processes ([B_global], TRL's order), and
    this process's completion lengths (TRL's mask is 1 on exactly those tokens, EOS included)."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = self.reward_weights.to(per_func.device)
        # TRL's own weighted sum; a completion no reward function scored (all NaN) counts as 0
        self._tap_rewards = (per_func * weights).nansum(dim=1)                  # [B_global]
        self._tap_lengths = [len(ids) for ids in completion_ids_list]           # this process's
        return per_func

    def _log_advantages(self, per_completion: torch.Tensor) -> None:
        """TRL's completions table (log_completions) holds the advantages of its own GRPO step
        for the generation batch it just logged, [B_global]: put the method's in their place."""
        logged = self._logs["advantages"]
        for _ in range(len(per_completion)):
            logged.pop()
        logged.extend(per_completion.tolist())

    def _process_slice(self, local_batch: int) -> slice:
        i = self.accelerator.process_index
        return slice(i * local_batch, (i + 1) * local_batch)

    def _refuse_multi_turn(self, name: str) -> None:
        if self.tools or self.environment_factories is not None:
            raise ValueError(f"{name} does not support tools or environments (their tokens would "
                             "enter the tree and the statistics); train without them")
        if self.args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"{name} needs multi_objective_aggregation='sum_then_normalize' (one "
                             "reward per completion, then the method's own standardisation)")


# ----------------------------------------------------------------------------------------
# TEMPO: replace the [B] advantages by tempo.py's [B, T] ones; TRL's loss accepts either
# ----------------------------------------------------------------------------------------


class TempoGRPOTrainer(_RewardTap, GRPOTrainer):
    """GRPOTrainer with TEMPO's per-token advantages (tempo.compute_tempo_advantages).

        A_i,t = [ (r_i - mu_g) + td_coef * (V(s_i,t+1) - V(s_i,t)) ] / (sigma_g + 1e-4)

    Override: `_generate_and_score_completions`. After TRL has generated, scored and computed
    its flat advantages, the completion ids of the WHOLE generation batch are gathered (padded
    to the longest), the prefix trees are built over every group, and this process keeps its
    rows, cut to its own padded length. A group whose G completions sit on several processes
    is thus one tree, as on one process. TRL's `_compute_loss` takes [B, T] advantages as is.
    """

    def __init__(self, *args, td_coef: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.td_coef = td_coef
        self._refuse_multi_turn("TempoGRPOTrainer")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError("TempoGRPOTrainer needs scale_rewards='group' or 'none' (TEMPO "
                             f"divides by the group's std), got {self.scale_rewards!r}")

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        if G == 1:  # num_generations_eval=1: one completion is one path, TD = 0, A = r - r = 0,
            return out                                  # which is TRL's advantage already
        ids = out["completion_ids"]                                  # [b, T] this process
        b, T = ids.shape
        acc, pad = self.accelerator, self._tokenizer.pad_token_id
        # groups across processes: every process builds the same trees from the same batch
        all_ids = acc.gather(acc.pad_across_processes(ids, dim=1, pad_index=pad))  # [B, T_max]
        all_lengths = acc.gather(torch.tensor(self._tap_lengths, device=ids.device))
        positions = torch.arange(all_ids.size(1), device=ids.device)[None]
        all_mask = (positions < all_lengths[:, None]).float()         # from lengths, never ids
        adv, metrics = tempo.compute_tempo_advantages(
            self._tap_rewards.float().cpu(), G, all_ids.cpu(), all_mask.cpu(), self.td_coef,
            self.scale_rewards)
        out["advantages"] = adv[self._process_slice(b), :T].to(out["advantages"].device)
        # one number a completion for the table: the mean of its tokens' advantages
        self._log_advantages((adv * all_mask.cpu()).sum(1) / all_mask.cpu().sum(1).clamp(min=1))
        for k, v in metrics.items():                                  # equal on every process
            self._metrics[mode][k].append(v)
        return out


# ----------------------------------------------------------------------------------------
# DCPO: SAS advantages with persistent per-prompt statistics, and DCPO's loss
# ----------------------------------------------------------------------------------------


class DCPOGRPOTrainer(_RewardTap, GRPOTrainer):
    """GRPOTrainer with DCPO: SAS advantages (dcpo.sas_advantages), DAC/OTM loss (dcpo.dcpo_loss).

    Options (keyword arguments; the defaults are the paper's, as in dcpo.py):
        eps_low=0.16, eps_high=0.20, ratio_max=10.0   dynamic clip bounds and the dual-clip cap
        dcpo_loss_type="otm" | "grpo" | "dapo" | "otm_token_sum"   (TRL's loss_type is unused)
        sas=True, sas_std="population" | "unbiased"
        sas_key_column="id"   the dataset column naming a prompt across steps: an integer as
                              is, any other value (a string id) hashed as dcpo.py hashes
                              prompts; without the column, a hash of the prompt text

    Overrides:
      `_generate_and_score_completions` (train mode): SAS advantages of the whole generation
        batch from the gathered rewards and prompt keys. Every process runs the same update on
        the same data, so the statistics are the same everywhere; each keeps its own rows. In
        eval mode TRL's advantages stay and the statistics are not touched.
      `_compute_loss`: dcpo.dcpo_loss on TRL's log-probs, with the normalisers of the whole
        optimizer step over every process (DDP averages gradients: the loss is scaled by the
        number of processes to undo that).
      `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler`: the statistics go
        into every checkpoint folder as dcpo_sas_state.json, with the optimizer state and so
        before TRL pushes the folder to the Hub, and come back with
        `trainer.train(resume_from_checkpoint=...)`. TRL does not save its generation buffer,
        so only a checkpoint on a generation boundary resumes exactly: save_steps must be a
        multiple of the generation period, and another checkpoint is refused (ResumeError).
    """

    def __init__(self, *args, eps_low: float = 0.16, eps_high: float = 0.20,
                 ratio_max: float = 10.0, dcpo_loss_type: str = "otm", sas: bool = True,
                 sas_std: str = "population", sas_key_column: Optional[str] = "id", **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_multi_turn("DCPOGRPOTrainer")
        if dcpo_loss_type not in ("otm", "grpo", "dapo", "otm_token_sum"):
            raise ValueError("dcpo_loss_type must be otm, grpo, dapo or otm_token_sum, "
                             f"got {dcpo_loss_type!r}")
        if sas_std not in ("population", "unbiased"):
            raise ValueError(f"sas_std must be 'population' or 'unbiased', got {sas_std!r}")
        a = self.args
        ignored = [name for name, on in (
            ("importance_sampling_level='sequence'", a.importance_sampling_level != "token"),
            ("off_policy_mask_threshold", a.off_policy_mask_threshold is not None),
            ("top_entropy_quantile < 1", a.top_entropy_quantile < 1.0),
            ("delta", a.delta is not None),
            ("entropy_coef / use_adaptive_entropy", self._entropy_bonus_enabled)) if on]
        if ignored:
            raise ValueError(f"DCPOGRPOTrainer's loss does not apply {', '.join(ignored)}; "
                             "unset it")
        step_batch = (a.per_device_train_batch_size * a.gradient_accumulation_steps
                      * self.accelerator.num_processes)
        if dcpo_loss_type == "otm" and step_batch % self.num_generations:
            raise ValueError(f"OTM averages over the prompts of an optimizer step: its "
                             f"{step_batch} completions must be a multiple of num_generations "
                             f"({self.num_generations})")
        # a generation every steps_per_generation x num_iterations MICRO-steps; a checkpoint
        # between two has a half-used buffer that TRL does not save
        self._generate_every = a.steps_per_generation * self.num_iterations
        if a.save_strategy == "steps" and a.save_steps >= 1 and \
                int(a.save_steps) * a.gradient_accumulation_steps % self._generate_every:
            raise ValueError(
                f"DCPOGRPOTrainer's checkpoints must fall on generation boundaries (TRL does not "
                f"save its generation buffer): save_steps={a.save_steps} optimizer steps of "
                f"{a.gradient_accumulation_steps} micro-steps is not a multiple of "
                f"steps_per_generation x num_iterations = {self._generate_every} micro-steps")
        self.eps_low, self.eps_high, self.ratio_max = eps_low, eps_high, ratio_max
        self.dcpo_loss_type, self.sas, self.sas_key_column = dcpo_loss_type, sas, sas_key_column
        self.prompt_stats = dcpo.PromptStats(self.num_generations, sas_std)

    # ---- SAS: advantages from each prompt's reward history ----

    def _prompt_key(self, example: dict) -> int:
        if self.sas_key_column and self.sas_key_column in example:
            key = example[self.sas_key_column]
            if isinstance(key, int) and not isinstance(key, bool):
                return key
            return int(dcpo.prompt_hash(str(key)), 16)  # a string id: hashed, never int("q-17")
        return int(dcpo.prompt_hash(str(example["prompt"])), 16)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        G = self.num_generations
        keys = gather_object([self._prompt_key(x) for x in inputs])            # [B_global]
        hashes = gather_object([dcpo.prompt_hash(str(x["prompt"])) for x in inputs])
        if any(len(set(keys[g:g + G])) != 1 for g in range(0, len(keys), G)):
            raise RuntimeError("the gathered batch is not G-contiguous (did TRL's sampler change?)")
        adv, new_stats, metrics = dcpo.sas_advantages(
            self._tap_rewards.float().cpu(), G, keys[::G], self.prompt_stats, self.sas, hashes[::G])
        self.prompt_stats.by_id.update(new_stats)                  # commit this batch's visits
        out["advantages"] = adv[self._process_slice(len(inputs))].to(out["advantages"].device)
        self._log_advantages(adv)
        for k, v in metrics.items():
            self._metrics["train"][k].append(v)
        return out

    # ---- DCPO's loss on TRL's log-probs ----

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, mask], 1),
            completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled)                        # [b, T] each
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old   # TRL skips that forward when ratio == 1
        adv = inputs["advantages"]
        if "importance_sampling_ratio" in inputs:
            # vLLM's correction w >= 0 commutes with DCPO's max/min: w * l(A) = l(w * A)
            adv = adv[:, None] * inputs["importance_sampling_ratio"]
        loss_type, scale = self.dcpo_loss_type, 1.0
        if mode == "train":
            W = self.accelerator.num_processes
            accum = self.current_gradient_accumulation_steps
            G = self.num_generations
            # the normalisers of the whole optimizer step over all processes (dcpo.py: its batch)
            num_sequences = completion_ids.size(0) * accum * W
            spg = self.args.steps_per_generation
            num_tokens = float(inputs["num_items_in_batch"]) * accum / spg
        else:  # one process's eval batch, which may hold part of a group (fewer rows than G)
            W, accum, G = 1, 1, self.num_generations_eval
            num_sequences, num_tokens = completion_ids.size(0), float(mask.sum())
            if loss_type == "otm":  # 1/P as G/b: "grpo"'s 1/b times G, never b // G = 0
                loss_type, scale = "grpo", float(G)
        loss, metrics = dcpo.dcpo_loss(
            logps, old, adv, mask, eps_low=self.eps_low, eps_high=self.eps_high,
            ratio_max=self.ratio_max, loss_type=loss_type, num_sequences=num_sequences,
            num_tokens=num_tokens, num_generations=G, beta=self.beta,
            ref_logps=inputs.get("ref_per_token_logps"),
            fixed_band=(self.epsilon_low, self.epsilon_high))
        metrics["entropy"] = float((entropies.detach() * mask).sum() / mask.sum().clamp(min=1))
        log_process_means(self, mode, metrics)
        loss = loss * scale * W                        # DDP averages gradients over W processes
        if self.aux_loss_enabled:  # an MoE's load-balancing loss, exactly as TRL adds it
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    # ---- the statistics in TRL's checkpoints ----

    def _save_optimizer_and_scheduler(self, output_dir):
        # Trainer._save_checkpoint calls this after the weights and before its Hub upload
        # (push_to_hub), so the uploaded folder always has the file; SAS state is optimizer state
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            with open(os.path.join(output_dir, SAS_STATE_FILE), "w") as f:
                json.dump(self.prompt_stats.state_dict(), f)  # json round-trips python floats

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            step = json.load(f)["global_step"]
        if step * self.args.gradient_accumulation_steps % self._generate_every:
            raise ResumeError(
                f"{checkpoint} lies between two generations (step {step}; one every "
                f"{self._generate_every} micro-steps): TRL did not save its generation buffer, "
                "so the SAS statistics would diverge; resume from a checkpoint on a boundary")
        path = os.path.join(checkpoint, SAS_STATE_FILE)
        if not os.path.exists(path):
            raise ResumeError(f"{checkpoint} has no {SAS_STATE_FILE} (not a DCPOGRPOTrainer "
                              "checkpoint), so SAS would restart empty; resume from a DCPO one")
        with open(path) as f:
            self.prompt_stats.load_state_dict(json.load(f))  # every process reads the same file


# ----------------------------------------------------------------------------------------
# Token-level DPO: TDPO1, TDPO2, TGDPO on TRL's preference batches
# ----------------------------------------------------------------------------------------

TOKEN_DPO_LOSSES = ("tdpo1", "tdpo2", "tgdpo")  # cDPO: add its name and a branch in _pair_loss


class TokenDPOTrainer(DPOTrainer):
    """DPOTrainer with token_dpo.py's losses: loss = "tdpo1" | "tdpo2" | "tgdpo".

    Options: alpha=0.5 (TDPO2's KL weight, TGDPO's guidance weight), guidance_model (TGDPO: a
    frozen model with the policy's tokenizer), kl_chunk_size=256; beta is DPOConfig's.

    Override: `_compute_loss`. TRL's DPO forward returns only the log-prob of each label token
    (its fused LM head never builds the logits); TDPO needs the reference's whole distribution
    at every response position. So the policy, the reference (and the guidance model) each
    run one forward with output_hidden_states=True and logits_to_keep=1, and
    token_dpo.token_logps_and_kl applies their LM heads `kl_chunk_size` positions at a time:
    log pi_theta(y_t), log pi_ref(y_t) and KL_t, never a [B, T, V] tensor.

    Cost: a reference forward on every batch (as TRL without precomputation) plus, per
    response token, two [V] log-softmaxes in fp32 and their KL, with the policy's chunks
    recomputed in backward (activation checkpointing). TRL's precomputed reference log-probs
    are one sum per sequence and cannot give the KL: precompute_ref_log_probs=True is refused.
    The pair metrics are token_dpo.py's (TRL's names rewards/*, logps/*, plus kl/*); TRL's
    entropy, logits/* and mean_token_accuracy are not logged (they need the logits).
    """

    def __init__(self, *args, loss: str = "tdpo2", alpha: float = 0.5, guidance_model=None,
                 kl_chunk_size: int = 256, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if loss not in TOKEN_DPO_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(TOKEN_DPO_LOSSES)}, got {loss!r}")
        if config is not None and config.precompute_ref_log_probs:
            raise ValueError("TokenDPOTrainer needs the reference's full-vocabulary distributions "
                             "on every batch, which precomputed log-probs do not carry: set "
                             "precompute_ref_log_probs=False")
        # TRL's options that shape its own loss, which this trainer replaces: each refused
        ignored = [name for name, on in (
            ("loss_type", list(getattr(config, "loss_type", ["sigmoid"])) != ["sigmoid"]),
            ("loss_weights", getattr(config, "loss_weights", None) is not None),
            ("label_smoothing", getattr(config, "label_smoothing", 0.0) != 0.0),
            ("use_weighting", getattr(config, "use_weighting", False)),
            ("ld_alpha", getattr(config, "ld_alpha", None) is not None),
            ("f_divergence_type", getattr(config, "f_divergence_type", "reverse_kl")
             != "reverse_kl")) if on]
        if ignored:
            raise ValueError(f"TokenDPOTrainer's losses replace TRL's, which {', '.join(ignored)} "
                             "would change: unset them (loss= picks tdpo1, tdpo2 or tgdpo)")
        if kwargs.get("compute_metrics", args[7] if len(args) > 7 else None) is not None:
            raise ValueError("TokenDPOTrainer does not return logits, which compute_metrics "
                             "needs: drop compute_metrics (its kl/* and rewards/* are logged)")
        if loss == "tgdpo" and guidance_model is None:
            raise ValueError("loss='tgdpo' needs guidance_model= (a frozen model with the policy's "
                             "tokenizer)")
        dataset = kwargs.get("train_dataset", args[4] if len(args) > 4 else None)
        if dataset is not None and {"image", "images"} & set(next(iter(dataset))):
            raise ValueError("TokenDPOTrainer does not pass images to the model (its forward "
                             "takes input_ids only): train on text pairs")
        super().__init__(*args, **kwargs)
        self._refuse_sharded_weights()
        if self.ref_model is None:
            raise ValueError("TokenDPOTrainer needs a reference model (PEFT without one is not "
                             "supported)")
        self.token_loss, self.alpha, self.kl_chunk_size = loss, alpha, kl_chunk_size
        self.guidance_model = None
        if guidance_model is not None:
            guidance_model = guidance_model.to(self.accelerator.device).eval()
            self.guidance_model = guidance_model.requires_grad_(False)

    def _refuse_sharded_weights(self) -> None:
        # the LM heads are applied outside the model's forward, where a sharded weight is an
        # empty shard: torch fails with a shape error deep in the first step
        zero3 = self.is_deepspeed_enabled and \
            self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 or self.is_fsdp_enabled:
            raise ValueError("TokenDPOTrainer does not support DeepSpeed ZeRO-3 or FSDP yet (it "
                             "applies the LM heads outside the forward): use DDP or ZeRO-1/2")

    def _hidden(self, model, inputs, aux: bool = False):
        """Final hidden states [N, S-1, H] at positions 0..S-2 (position j predicts token j+1);
        with aux=True, (hidden, the MoE router's load-balancing loss)."""
        extra = {"output_router_logits": True} if aux else {}  # as TRL: the policy's only
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    use_cache=False, output_hidden_states=True, logits_to_keep=1, **extra)
        hidden = out.hidden_states[-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        # the last position's logits come for free: check they are head(hidden), else refuse
        full, ours = out.logits.float(), head(hidden[:, -1:]).float()  # token_dpo.py's tolerance
        if not torch.allclose(full, ours, rtol=1e-2, atol=1e-2 * max(1.0, full.abs().max().item())):
            raise ValueError("this model's logits are not lm_head(last hidden state) (e.g. "
                             "soft-capping), which TokenDPOTrainer does not reproduce; use a "
                             "plain causal LM")
        return (hidden[:, :-1], out.aux_loss) if aux else hidden[:, :-1]

    def _compute_loss(self, model, inputs, return_outputs=False):
        if return_outputs:
            raise ValueError("TokenDPOTrainer does not return logits (return_outputs=True)")
        mode = "train" if self.model.training else "eval"
        ids, cmask = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:]  # [2n, S-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        ref_head = self.accelerator.unwrap_model(self.ref_model).get_output_embeddings()
        hidden = self._hidden(model, inputs, aux=self.aux_loss_enabled)
        if self.aux_loss_enabled:
            hidden, aux_loss = hidden
        with torch.no_grad():
            ref_hidden = self._hidden(self.ref_model, inputs)
        logps, ref_logps, kl = token_dpo.token_logps_and_kl(
            hidden, ref_hidden, ids, cmask, head, ref_head, self.kl_chunk_size)  # [2n, S-1] each
        loss, metrics = self._pair_loss(inputs, ids, cmask, ref_hidden, ref_head, logps,
                                        ref_logps, kl)
        log_process_means(self, mode, metrics)
        if self.aux_loss_enabled:  # an MoE's load-balancing loss, exactly as TRL's DPO adds it
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    def _pair_loss(self, inputs, ids, cmask, ref_hidden, ref_head, logps, ref_logps, kl):
        """token_dpo.py's loss on the [chosen; rejected] halves of the batch (TRL's layout)."""
        halves = (t.chunk(2) for t in (logps, ref_logps, cmask, kl))
        (pw, pl), (rw, rl), (mw, ml), (kw, kr) = halves
        if self.token_loss in ("tdpo1", "tdpo2"):
            return token_dpo.tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, self.beta, self.alpha,
                                       version=int(self.token_loss[-1]))
        # tgdpo: the guidance model's log-probs of the same tokens, through the same chunked head
        with torch.no_grad():
            g_head = self.guidance_model.get_output_embeddings()
            g_hidden = self._hidden(self.guidance_model, inputs)
            g_logps, _, _ = token_dpo.token_logps_and_kl(g_hidden, ref_hidden, ids, cmask, g_head,
                                                         ref_head, self.kl_chunk_size)
        gw, gl = g_logps.chunk(2)
        return token_dpo.tgdpo_loss(pw, pl, rw, rl, gw, gl, mw, ml, self.beta, self.alpha,
                                    kw.detach(), kr.detach())
