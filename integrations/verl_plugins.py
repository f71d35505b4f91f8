"""DCPO, TEMPO and SAS for verl (written against verl 0.9.1), where its registries take them.

    import verl_plugins          # in the driver and in the workers, before the trainer starts
    # then, as hydra overrides:
    actor_rollout_ref.actor.policy_loss.loss_mode=dcpo     # or dcpo_otm (the paper's aggregation)
    actor_rollout_ref.actor.clip_ratio_low=0.16 actor_rollout_ref.actor.clip_ratio_high=0.20
    actor_rollout_ref.actor.clip_ratio_c=10.0              # DCPO's eps_low, eps_high, ratio_max
    algorithm.adv_estimator=tempo                          # needs the one-line change below

What fits verl's registries as they are:
  "dcpo" and "dcpo_otm" policy losses (register_policy_loss). verl calls a policy loss with
  (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights),
  all [bs, response_length]: the tensors dcpo.dcpo_per_token_loss takes. The aggregation stays
  verl's agg_loss, so its normalisation over data-parallel ranks and micro-batches holds.
  DCPO's bounds come from verl's own fields: eps_low = clip_ratio_low, eps_high =
  clip_ratio_high, ratio_max = clip_ratio_c (verl's default 3.0 is NOT DCPO's 10: set it).
  "dcpo" aggregates with verl's loss_agg_mode (seq-mean-token-mean is the official DCPO code's
  "grpo" mode); "dcpo_otm" is the paper's only-token-mean: seq-mean-token-mean x rollout_n (G).

What does not fit as it is (docs/integrations.md, "verl"):
  TEMPO's advantage needs the response token ids; a registered estimator receives only
  token_level_rewards, response_mask, index (uid) and config. verl already passes the whole
  batch to one estimator (GDPO); the smallest change does the same for "tempo" and "sas", in
  verl/trainer/ppo/ray_trainer.py, compute_advantage:
      if adv_estimator in (AdvantageEstimator.GDPO, "gdpo"):                   # before
      if adv_estimator in (AdvantageEstimator.GDPO, "gdpo", "tempo", "sas"):   # after
  SAS also keeps state across steps: SAS_STATE below lives in the driver process, where
  compute_advantage runs once per step, so one copy serves every worker. To keep it across a
  resume, save SAS_STATE's state_dicts next to the dataloader state in
  RayPPOTrainer._save_checkpoint and load them in _load_checkpoint; and key prompts by a
  stable id (non_tensor_batch["index"]), not by verl's uid, which is a fresh uuid every batch.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

try:
    import numpy as np
    import torch
    from verl.trainer.ppo.core_algos import agg_loss, register_adv_est, register_policy_loss
except ImportError:
    raise ImportError("integrations/verl_plugins.py needs verl (tested with 0.9.1 on a CPU): "
                      "pip install verl into its own environment (it pins its own transformers)"
                      ) from None

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the method scripts, one level up
import dcpo  # noqa: E402
import tempo  # noqa: E402


# ----------------------------------------------------------------------------------------
# DCPO's policy loss, registered as verl takes it
# ----------------------------------------------------------------------------------------


def _dcpo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights, otm: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    eps_low, eps_high, cap = config.clip_ratio_low, config.clip_ratio_high, config.clip_ratio_c
    per_token, *_ = dcpo.dcpo_per_token_loss(log_prob, old_log_prob, advantages, response_mask,
                                             eps_low, eps_high, cap)               # [bs, T]
    if rollout_is_weights is not None:  # verl's rollout correction, as in its vanilla loss
        per_token = per_token * rollout_is_weights
    mode = "seq-mean-token-mean" if otm else loss_agg_mode
    loss = agg_loss(loss_mat=per_token, loss_mask=response_mask, loss_agg_mode=mode,
                    **config.global_batch_info)
    if otm:  # (1/P) sum_i token-mean_i = G * (1/B) sum_i token-mean_i
        loss = loss * config.rollout_n
    with torch.no_grad():  # dcpo.py's metrics on this micro-batch (its loss value is unused)
        _, m = dcpo.dcpo_loss(log_prob, old_log_prob, advantages, response_mask, eps_low=eps_low,
                              eps_high=eps_high, ratio_max=cap, loss_type="dapo",
                              num_sequences=response_mask.size(0),
                              num_tokens=float(response_mask.sum()), num_generations=1)
    metrics = {"actor/pg_clipfrac": m["clip_ratio/dcpo"], "actor/ppo_kl": m["approx_kl_old"]}
    metrics.update({f"actor/{k}": v for k, v in m.items() if k.startswith(("clip_ratio/", "dac/"))})
    return loss, metrics


@register_policy_loss("dcpo")
def compute_policy_loss_dcpo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                             advantages: torch.Tensor, response_mask: torch.Tensor,
                             loss_agg_mode: str = "token-mean", config=None,
                             rollout_is_weights: Optional[torch.Tensor] = None):
    """DCPO's dynamic-clip loss per token (dcpo.dcpo_per_token_loss), then verl's agg_loss."""
    return _dcpo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                             config, rollout_is_weights, otm=False)


@register_policy_loss("dcpo_otm")
def compute_policy_loss_dcpo_otm(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                 advantages: torch.Tensor, response_mask: torch.Tensor,
                                 loss_agg_mode: str = "token-mean", config=None,
                                 rollout_is_weights: Optional[torch.Tensor] = None):
    """As "dcpo", with the paper's only-token-mean: token mean per response, mean over prompts."""
    return _dcpo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                             config, rollout_is_weights, otm=True)


# ----------------------------------------------------------------------------------------
# TEMPO and SAS advantages on verl's layout (groups by uid, in any order)
# ----------------------------------------------------------------------------------------


def _group_order(index: np.ndarray) -> tuple[torch.Tensor, int]:
    """A stable permutation making each uid's rows contiguous (verl does not promise it), and G."""
    first = {u: k for k, u in enumerate(dict.fromkeys(index.tolist()))}     # uid -> first seen
    order = torch.tensor(sorted(range(len(index)), key=lambda i: first[index[i]]))
    sizes = set(Counter(index.tolist()).values())
    if len(sizes) != 1:
        raise ValueError(f"every uid needs the same number of responses, got {sorted(sizes)}")
    return order, sizes.pop()


@register_adv_est("tempo")
def compute_tempo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                            index: np.ndarray, config=None, batch=None, **kwargs):
    """tempo.compute_tempo_advantages on verl's batch: reward = token_level_rewards.sum(-1), one
    tree per uid over batch["responses"]. Returns (advantages, returns), [bs, T] each, in verl's
    row order. config.norm_adv_by_std_in_grpo=False -> scale_rewards="none";
    config.get("tempo_td_coef", 1.0) is td_coef."""
    if batch is None or "responses" not in batch:
        raise ValueError("adv_estimator=tempo needs the response token ids: in verl's "
                         "ray_trainer.py compute_advantage, pass batch= to it as to GDPO")
    order, G = _group_order(index)
    td_coef = float(config.get("tempo_td_coef", 1.0)) if config is not None else 1.0
    scale = "group" if config is None or config.get("norm_adv_by_std_in_grpo", True) else "none"
    rewards = token_level_rewards.sum(-1)
    adv, _ = tempo.compute_tempo_advantages(rewards[order].cpu(), G,
                                            batch["responses"][order].cpu(),
                                            response_mask[order].cpu(), td_coef, scale)
    adv = adv[torch.argsort(order)].to(token_level_rewards.device, token_level_rewards.dtype)
    return adv, adv


SAS_STATE: dict[str, dcpo.PromptStats] = {}  # the driver's SAS statistics by G; checkpoint it


@register_adv_est("sas")
def compute_sas_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                          index: np.ndarray, config=None, non_tensor_batch=None, **kwargs):
    """dcpo.sas_advantages on verl's batch, prompts keyed by non_tensor_batch[config.sas_key]
    (default "index", the dataset row id), NOT by uid (a fresh uuid every batch). The visits
    are committed to SAS_STATE[str(G)], one object in the driver process."""
    key_name = config.get("sas_key", "index") if config is not None else "index"
    if non_tensor_batch is None or key_name not in non_tensor_batch:
        raise ValueError(f"adv_estimator=sas needs a stable prompt id, non_tensor_batch"
                         f"[{key_name!r}]: pass non_tensor_batch= to it in compute_advantage")
    order, G = _group_order(index)
    sas_std = config.get("sas_std", "population") if config is not None else "population"
    stats = SAS_STATE.setdefault(str(G), dcpo.PromptStats(G, sas_std))
    keys = [int(k) for k in np.asarray(non_tensor_batch[key_name])[order.numpy()][::G]]
    rewards = token_level_rewards.sum(-1)[order].cpu()
    adv, new_stats, _ = dcpo.sas_advantages(rewards, G, keys, stats)
    stats.by_id.update(new_stats)
    adv = adv[torch.argsort(order)].to(token_level_rewards.device, token_level_rewards.dtype)
    adv = adv[:, None] * response_mask
    return adv, adv
