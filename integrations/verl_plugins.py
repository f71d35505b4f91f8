"""DCPO, TEMPO and SAS for verl (written against verl 0.9.1), where its registries take them.

Registration: verl looks its registries up inside its Ray actors (the TaskRunner that runs the
trainer and computes advantages; the actor workers that compute the loss), not in the process
that starts it. So name this module in verl's own hook, read by `import verl` in every process:
    export PYTHONPATH=/path/to/this/repo/integrations:$PYTHONPATH
    export VERL_USE_EXTERNAL_MODULES=verl_plugins    # verl/__init__.py imports it
(on a Ray cluster started apart from the driver, pass both in
+ray_kwargs.ray_init.runtime_env.env_vars). Then, as hydra overrides:
    actor_rollout_ref.actor.policy_loss.loss_mode=dcpo     # or dcpo_otm (the paper's aggregation)
    actor_rollout_ref.actor.clip_ratio_low=0.16 actor_rollout_ref.actor.clip_ratio_high=0.20
    actor_rollout_ref.actor.clip_ratio_c=10.0              # DCPO's eps_low, eps_high, ratio_max
    algorithm.adv_estimator=tempo                          # or sas: needs the patch below

What fits verl's registries as they are:
  "dcpo" and "dcpo_otm" policy losses (register_policy_loss). verl calls a policy loss with
  (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights),
  all [bs, response_length]: the tensors dcpo.dcpo_per_token_loss takes. The aggregation stays
  verl's agg_loss, so its normalisation over data-parallel ranks and micro-batches holds.
  DCPO's bounds come from verl's own fields: eps_low = clip_ratio_low, eps_high =
  clip_ratio_high, ratio_max = clip_ratio_c (verl's default 3.0 is NOT DCPO's 10: set it).
  "dcpo" aggregates with verl's loss_agg_mode (seq-mean-token-mean is the official DCPO code's
  "grpo" mode); "dcpo_otm" is the paper's only-token-mean: seq-mean-token-mean x rollout_n (G).
  Its actor/ppo_kl is DCPO's k3 estimate of KL(old || new), not verl's k1 mean.

What does not fit as it is (docs/integrations.md, "verl"): TEMPO needs the response token ids
and SAS a stable prompt id; a registered estimator receives only token_level_rewards,
response_mask, index (uid) and config. integrations/verl-0.9.1-tempo-sas.patch changes two
places of verl 0.9.1:
  verl/trainer/ppo/ray_trainer.py, compute_advantage (both trainers call it): pass batch= and
      non_tensor_batch= to "tempo" and "sas" as to GDPO;
  verl/trainer/ppo/v1/trainer_base.py, _compute_advantage (the default V1 trainer): fetch
      "responses" and "index" from the TransferQueue too (it fetches only uid, response_mask,
      rm_scores, rollout_log_probs, old_log_probs, ref_log_prob and values).
  The legacy trainer (trainer.use_v1=false) has responses and index in its batch already.
SAS also keeps state across steps: SAS_STATE below lives in the process that computes the
advantages (the TaskRunner), once per step, so one copy serves every worker. To keep it across
a resume, save SAS_STATE's state_dicts next to the dataloader state in the trainer's
_save_checkpoint and load them in _load_checkpoint (not done here). Prompts are keyed by the
dataset row's extra_info.index, not by verl's uid (a fresh uuid every batch); a dataset without
it gets index 0 for every row, which SAS refuses rather than pool every prompt into one.
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
    # actor/ppo_kl is DCPO's k3 estimate of KL(old || new), where verl's own losses log k1
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


PATCH_HINT = "apply integrations/verl-0.9.1-tempo-sas.patch to verl (docs/integrations.md)"
V1_FIELDS = "uid, response_mask, rm_scores, rollout_log_probs, old_log_probs, ref_log_prob, values"


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
    if batch is None:
        raise ValueError(f"adv_estimator=tempo needs the response token ids, which this verl's "
                         f"compute_advantage does not pass: {PATCH_HINT}")
    if "responses" not in batch.keys():
        raise ValueError(f"adv_estimator=tempo got a batch without 'responses' (verl's V1 "
                         f"trainer fetches only {V1_FIELDS}): {PATCH_HINT} (its "
                         "trainer_base.py part)")
    order, G = _group_order(index)
    td_coef = float(config.get("tempo_td_coef", 1.0)) if config is not None else 1.0
    scale = "group" if config is None or config.get("norm_adv_by_std_in_grpo", True) else "none"
    rewards = token_level_rewards.sum(-1)
    adv, _ = tempo.compute_tempo_advantages(rewards[order].cpu(), G,
                                            batch["responses"][order].cpu(),
                                            response_mask[order].cpu(), td_coef, scale)
    adv = adv[torch.argsort(order)].to(token_level_rewards.device, token_level_rewards.dtype)
    return adv, adv


def sas_key(value) -> int:
    """A prompt id as SAS's key: an integer as is, anything else (a string id) hashed as
    dcpo.py hashes prompts, never int("q-17")."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return int(dcpo.prompt_hash(str(value)), 16)


SAS_STATE: dict[str, dcpo.PromptStats] = {}  # the driver's SAS statistics by G; checkpoint it


@register_adv_est("sas")
def compute_sas_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                          index: np.ndarray, config=None, non_tensor_batch=None, **kwargs):
    """dcpo.sas_advantages on verl's batch, prompts keyed by non_tensor_batch[config.sas_key]
    (default "index", the dataset row id), NOT by uid (a fresh uuid every batch). The visits
    are committed to SAS_STATE[str(G)], one object in the driver process."""
    key_name = config.get("sas_key", "index") if config is not None else "index"
    if non_tensor_batch is None:
        raise ValueError(f"adv_estimator=sas needs a stable prompt id, which this verl's "
                         f"compute_advantage does not pass: {PATCH_HINT}")
    if key_name not in non_tensor_batch:
        raise ValueError(f"adv_estimator=sas got no non_tensor_batch[{key_name!r}] (verl's V1 "
                         f"trainer fetches only {V1_FIELDS}): {PATCH_HINT} (its "
                         "trainer_base.py part)")
    order, G = _group_order(index)
    sas_std = config.get("sas_std", "population") if config is not None else "population"
    stats = SAS_STATE.setdefault(str(G), dcpo.PromptStats(G, sas_std))
    keys = [sas_key(k) for k in np.asarray(non_tensor_batch[key_name])[order.numpy()][::G]]
    # verl sets index = extra_info.get("index", 0): without it every prompt shares key 0 and one
    # statistic. A dataset may repeat a prompt, but not for half of a batch's prompts.
    shared = len(keys) - len(set(keys))
    if shared and 2 * shared >= len(keys):
        raise ValueError(f"adv_estimator=sas: {shared} of the batch's {len(keys)} prompts share "
                         f"a {key_name} with another, so SAS would pool their statistics (verl "
                         "sets index 0 when a row has no extra_info.index); give every dataset "
                         "row a distinct extra_info.index")
    rewards = token_level_rewards.sum(-1)[order].cpu()
    adv, new_stats, _ = dcpo.sas_advantages(rewards, G, keys, stats)
    stats.by_id.update(new_stats)
    adv = adv[torch.argsort(order)].to(token_level_rewards.device, token_level_rewards.dtype)
    adv = adv[:, None] * response_mask
    return adv, adv
