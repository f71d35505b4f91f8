"""integrations/verl_plugins.py through verl's own call paths (verl 0.9.1 on a CPU).

Skipped without verl. verl pins its own transformers, so it lives in its own environment:
    python -m venv --system-site-packages /tmp/verlenv && /tmp/verlenv/bin/pip install -r integrations/requirements-verl.txt
    /tmp/verlenv/bin/python -m pytest -q tests/test_verl_plugins.py
"""
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

pytest.importorskip("verl", reason="verl is not installed (see the module docstring)")
sys.path.insert(0, str(ROOT / "integrations"))
import dcpo  # noqa: E402
import tempo  # noqa: E402
import verl_plugins  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402


def actor_config(loss_mode, loss_agg_mode, rollout_n=2):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=rollout_n, ppo_micro_batch_size_per_gpu=4,
                       clip_ratio_low=0.16, clip_ratio_high=0.20, clip_ratio_c=10.0,
                       loss_agg_mode=loss_agg_mode, policy_loss={"loss_mode": loss_mode},
                       use_torch_compile=False)


def verl_batch(gen, b=4, P=3, R=6):
    """verl's actor input: padded prompts/responses, and the model's log-probs without padding
    (one flat row of all tokens, as its FSDP engine returns them)."""
    from verl.utils import tensordict_utils as tu

    lengths = torch.tensor([6, 4, 1, 5])
    response_mask = (torch.arange(R)[None] < lengths[:, None]).float()              # [b, R]
    attention_mask = torch.cat([torch.ones(b, P), response_mask], 1).long()
    logps = (-torch.rand(b, R, generator=gen) * 3) * response_mask
    old = (logps + 1.5 * torch.randn(b, R, generator=gen)) * response_mask  # ratios far from 1
    adv = torch.randn(b, generator=gen)[:, None].expand(b, R) * response_mask  # one A a response
    flat = []
    for i in range(b):  # sequence i: P + len_i tokens; response token t's log-prob at P - 1 + t
        seq = torch.zeros(P + int(lengths[i]))
        seq[P - 1:P - 1 + int(lengths[i])] = logps[i, :lengths[i]]
        flat.append(seq)
    leaf = torch.cat(flat).requires_grad_(True)
    data = tu.get_tensordict(
        {"prompts": torch.ones(b, P, dtype=torch.long),
         "responses": torch.ones(b, R, dtype=torch.long), "attention_mask": attention_mask,
         "response_mask": response_mask, "old_log_probs": old, "advantages": adv},
        {"dp_size": 1, "batch_num_tokens": int(response_mask.sum()), "global_batch_size": b})
    return leaf, data, logps, old, adv, response_mask


@pytest.mark.parametrize("loss_mode,agg,dcpo_type", [("dcpo", "token-mean", "dapo"),
                                                     ("dcpo", "seq-mean-token-mean", "grpo"),
                                                     ("dcpo_otm", "token-mean", "otm")])
def test_dcpo_policy_loss_through_verls_ppo_loss_equals_dcpo_py(loss_mode, agg, dcpo_type):
    from verl.workers.utils.losses import ppo_loss

    assert core_algos.get_policy_loss_fn(loss_mode) is not None
    leaf, data, logps, old, adv, mask = verl_batch(torch.Generator().manual_seed(0))
    config = actor_config(loss_mode, agg, rollout_n=2)
    got, metrics = ppo_loss(config, {"log_probs": leaf}, data)            # verl's own path
    want, ours = dcpo.dcpo_loss(logps, old, adv, mask, eps_low=0.16, eps_high=0.20, ratio_max=10.0,
                                loss_type=dcpo_type, num_sequences=4, num_tokens=float(mask.sum()),
                                num_generations=2)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert ours["clip_ratio/dcpo"] > 0
    got.backward()
    assert leaf.grad.abs().sum() > 0                 # the gradient reaches the model's log-probs


def test_tempo_estimator_on_verls_layout_equals_tempo_py_with_shuffled_groups():
    # two groups of G = 3 by uid, interleaved as verl may hand them over
    rows = {"a": [[5, 6, 7], [5, 6, 8], [9, 1, 0]], "b": [[2, 3, 0], [2, 4, 0], [2, 3, 0]]}
    rewards = {"a": [1.0, 0.0, 1.0], "b": [0.0, 1.0, 1.0]}
    lens = {"a": [3, 3, 2], "b": [2, 2, 2]}
    uid_order = ["b", "a", "a", "b", "a", "b"]
    seen = {"a": 0, "b": 0}
    idx = []
    for u in uid_order:
        idx.append((u, seen[u]))
        seen[u] += 1
    responses = torch.tensor([rows[u][k] for u, k in idx])
    mask = (torch.arange(3)[None] < torch.tensor([lens[u][k] for u, k in idx])[:, None]).float()
    token_rewards = torch.zeros(6, 3)
    for r, (u, k) in enumerate(idx):   # verl puts the outcome reward on the last response token
        token_rewards[r, lens[u][k] - 1] = rewards[u][k]
    fn = core_algos.get_adv_estimator_fn("tempo")
    index = np.array(uid_order, dtype=object)
    with pytest.raises(ValueError, match="compute_advantage"):  # unpatched verl passes no batch
        fn(token_level_rewards=token_rewards, response_mask=mask, index=index)
    adv, ret = fn(token_level_rewards=token_rewards, response_mask=mask, index=index,
                  batch={"responses": responses})
    for u in ("b", "a"):   # tempo.py on each group, contiguous
        ids = torch.tensor(rows[u])
        m = (torch.arange(3)[None] < torch.tensor(lens[u])[:, None]).float()
        want, _ = tempo.compute_tempo_advantages(torch.tensor(rewards[u]), 3, ids, m)
        got = torch.stack([adv[r] for r, (uu, _) in enumerate(idx) if uu == u])
        assert torch.equal(got, want)
    assert torch.equal(adv, ret)


def test_sas_estimator_keeps_statistics_by_stable_prompt_id_across_calls():
    verl_plugins.SAS_STATE.clear()
    fn = core_algos.get_adv_estimator_fn("sas")
    mask = torch.ones(4, 2)

    def call(rewards, uids, prompt_ids):
        tr = torch.zeros(4, 2)
        tr[:, -1] = torch.tensor(rewards)
        return fn(token_level_rewards=tr, response_mask=mask, index=np.array(uids, dtype=object),
                  non_tensor_batch={"index": np.array(prompt_ids)})[0][:, 0]

    # G = 2: prompt 7 gets [1, 0], then [1, 1] (all equal, but it varied before)
    first = call([1.0, 0.0, 0.0, 1.0], ["u1", "u1", "u2", "u2"], [7, 7, 8, 8])
    second = call([1.0, 1.0, 1.0, 0.0], ["x", "x", "y", "y"], [7, 7, 9, 9])  # new uids, prompt 7
    stats = dcpo.PromptStats(2)
    want1, new1, _ = dcpo.sas_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, [7, 8], stats)
    stats.by_id.update(new1)
    want2, new2, _ = dcpo.sas_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2, [7, 9], stats)
    stats.by_id.update(new2)
    assert torch.equal(first, want1) and torch.equal(second, want2)
    assert second[0] != 0                     # an all-equal group that varied before keeps a signal
    assert verl_plugins.SAS_STATE["2"].state_dict() == stats.state_dict()
