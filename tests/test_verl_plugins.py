"""integrations/verl_plugins.py through verl's own call paths (verl 0.9.1 on a CPU).

Skipped without verl. verl pins its own transformers, so it lives in its own environment:
    python -m venv --system-site-packages /tmp/verlenv
    /tmp/verlenv/bin/pip install -r integrations/requirements-verl.txt
    /tmp/verlenv/bin/python -m pytest -q tests/test_verl_plugins.py
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT

pytest.importorskip("verl", reason="needs verl in a venv of its own: pip install -r integrations/requirements-verl.txt (see the module docstring)")
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


# ----------------------------------------------------------------------------------------
# Issue 23, items 1-4: verl's default (V1) trainer, its registration hook, the SAS keys
# ----------------------------------------------------------------------------------------

VERL = Path(core_algos.__file__).resolve().parents[2]        # the installed verl package
PATCH = ROOT / "integrations" / "verl-0.9.1-tempo-sas.patch"


def verl_function(path: Path, name: str, namespace: dict, cls: str = None):
    """verl's own source of one function (or one method of `cls`), compiled in `namespace`.

    V1's trainer module imports TransferQueue, Ray and its agent loop, which a CPU test cannot
    start; its _compute_advantage uses a few names only, so the function runs as written."""
    import __future__
    import ast
    import textwrap

    src = path.read_text()
    tree = ast.parse(src)
    scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls) \
        if cls else tree
    node = next(n for n in scope.body if isinstance(n, ast.FunctionDef) and n.name == name)
    code = compile(textwrap.dedent(ast.get_source_segment(src, node)), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return namespace[name]


def verl_sources(tmp_path, patched: bool) -> Path:
    """verl 0.9.1's two files that the patch touches, as installed or with the patch applied."""
    root = tmp_path / ("patched" if patched else "as_installed")
    for rel in ("trainer/ppo/ray_trainer.py", "trainer/ppo/v1/trainer_base.py",
                "trainer/ppo/v1/utils.py"):
        (root / "verl" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VERL / rel, root / "verl" / rel)
    if patched:
        proc = subprocess.run(["patch", "-p1", "-i", str(PATCH)], cwd=root, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr   # applies to verl 0.9.1 as is
    return root / "verl"


class BatchMeta(SimpleNamespace):
    """TransferQueue's KVBatchMeta as _compute_advantage uses it: keys, partition, a length."""

    def __init__(self, keys, partition_id):
        super().__init__(keys=keys, partition_id=partition_id)

    def __len__(self):
        return len(self.keys)


class FakeTransferQueue:
    """What V1's _compute_advantage asks of the TransferQueue: the selected fields of its rows
    (stored as the agent loop stores them: list_of_dict_to_tensordict), and a put."""

    def __init__(self, rows: dict):
        self.rows, self.put = rows, None

    def kv_batch_get(self, keys, partition_id, select_fields):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        return list_of_dict_to_tensordict([{f: self.rows[k][f] for f in select_fields
                                            if f in self.rows[k]} for k in keys])

    def kv_batch_put(self, keys, partition_id, fields):
        self.put = fields
        return BatchMeta(keys, partition_id)


def v1_compute_advantage(verl_dir: Path, estimator: str, rows: dict, G: int):
    """Run V1's PPOTrainer._compute_advantage (verl's source, from `verl_dir`) on `rows`."""
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from verl.protocol import DataProto
    from verl.workers.utils.padding import response_to_nested

    ns = {"np": np, "torch": torch, "DataProto": DataProto, "core_algos": core_algos,
          "AdvantageEstimator": core_algos.AdvantageEstimator, "Any": object}
    compute_advantage = verl_function(verl_dir / "trainer/ppo/ray_trainer.py",
                                      "compute_advantage", dict(ns))
    multi = verl_function(verl_dir / "trainer/ppo/v1/utils.py",
                          "compute_advantage_for_multi_trajectories",
                          {**ns, "compute_advantage": compute_advantage})
    tq = FakeTransferQueue(rows)
    method = verl_function(verl_dir / "trainer/ppo/v1/trainer_base.py", "_compute_advantage",
                           {**ns, "tq": tq, "TensorDict": TensorDict,
                            "response_to_nested": response_to_nested,
                            "compute_advantage_for_multi_trajectories": multi},
                           cls="PPOTrainer")
    config = OmegaConf.create({
        "algorithm": {"adv_estimator": estimator, "use_kl_in_reward": False, "gamma": 1.0,
                      "lam": 1.0, "norm_adv_by_std_in_grpo": True},
        "actor_rollout_ref": {"rollout": {"n": G}}})
    method(SimpleNamespace(config=config), BatchMeta(list(rows), "train"), {})
    return [t for t in tq.put["advantages"].unbind()]             # one [len_i] row each


def agent_loop_rows(uids, responses, rewards, index):
    """The TransferQueue rows of V1's agent loop, keyed {uid}_{session}_0 in verl's order."""
    rows, session = {}, {}
    for u, ids, r in zip(uids, responses, rewards):
        s = session[u] = session.get(u, -1) + 1
        scores = torch.zeros(len(ids))
        scores[-1] = r                                 # verl's outcome reward on the last token
        rows[f"{u}_{s}_0"] = {"uid": u, "index": index[u], "prompts": torch.tensor([1, 2]),
                              "responses": torch.tensor(ids), "rm_scores": scores,
                              "response_mask": torch.ones(len(ids), dtype=torch.long),
                              "old_log_probs": -torch.rand(len(ids))}
    return rows


UIDS = ["b", "a", "a", "b", "a", "b"]                     # interleaved, as verl may hand them over
RESPONSES = [[2, 3], [5, 6, 7], [5, 6, 8], [2, 4], [9, 1], [2, 3]]
REWARDS = [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_tempo_and_sas_run_on_the_batch_verl_v1_builds_with_the_patch(tmp_path):
    """Item 1: V1 (verl's default trainer) fetches neither responses nor the prompt index, so
    the legacy one-line change alone left TEMPO and SAS failing, with a message asking for
    the change already made. With the patch, both give tempo.py's and dcpo.py's numbers."""
    rows = agent_loop_rows(UIDS, RESPONSES, REWARDS, {"a": 11, "b": 12})
    installed, patched = verl_sources(tmp_path, False), verl_sources(tmp_path, True)
    for estimator in ("tempo", "sas"):
        with pytest.raises(ValueError, match="verl-0.9.1-tempo-sas.patch"):
            v1_compute_advantage(installed, estimator, rows, G=3)
    # only the legacy change (ray_trainer.py): V1's batch still lacks the fields; the message
    # says which part of the patch is missing
    legacy = tmp_path / "legacy" / "verl"
    shutil.copytree(installed, legacy)
    shutil.copy(patched / "trainer/ppo/ray_trainer.py", legacy / "trainer/ppo/ray_trainer.py")
    for estimator in ("tempo", "sas"):
        with pytest.raises(ValueError, match="trainer_base.py part"):
            v1_compute_advantage(legacy, estimator, rows, G=3)

    got = v1_compute_advantage(patched, "tempo", rows, G=3)
    for u in ("a", "b"):
        mine = [i for i, x in enumerate(UIDS) if x == u]
        ids, mask = [RESPONSES[i] for i in mine], None
        width = max(map(len, ids))
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in ids])
        padded = torch.tensor([r + [0] * (width - len(r)) for r in ids])
        want, _ = tempo.compute_tempo_advantages(torch.tensor([REWARDS[i] for i in mine]), 3,
                                                 padded, mask)
        for k, i in enumerate(mine):
            assert torch.allclose(got[i], want[k, :len(RESPONSES[i])], atol=1e-6), (u, k)

    verl_plugins.SAS_STATE.clear()
    got = v1_compute_advantage(patched, "sas", rows, G=3)
    order = [i for u in ("b", "a") for i, x in enumerate(UIDS) if x == u]   # first-seen order
    want, _, _ = dcpo.sas_advantages(torch.tensor([REWARDS[i] for i in order]), 3, [12, 11],
                                     dcpo.PromptStats(3))
    for k, i in enumerate(order):
        assert torch.allclose(got[i], want[k].expand(len(RESPONSES[i])), atol=1e-6)
    assert sorted(verl_plugins.SAS_STATE["3"].by_id) == [11, 12]      # keyed by index, not uid


def sas_call(uids, keys, rewards=None):
    fn = core_algos.get_adv_estimator_fn("sas")
    n = len(uids)
    tr = torch.zeros(n, 2)
    tr[:, -1] = torch.tensor(rewards or [float(i % 2) for i in range(n)])
    return fn(token_level_rewards=tr, response_mask=torch.ones(n, 2),
              index=np.array(uids, dtype=object),
              non_tensor_batch={"index": np.array(keys, dtype=object)})[0][:, 0]


def test_sas_hashes_string_prompt_ids():
    """Item 3: verl's SAS did int(k), which dies on a dataset with string ids."""
    verl_plugins.SAS_STATE.clear()
    sas_call(["u1", "u1", "u2", "u2"], ["q-7", "q-7", "q-8", "q-8"])
    assert sorted(verl_plugins.SAS_STATE["2"].by_id) == sorted(
        int(dcpo.prompt_hash(k), 16) for k in ("q-7", "q-8"))


def test_sas_refuses_a_batch_whose_prompts_share_one_index():
    """Item 4: without extra_info.index verl sets every index to 0 and SAS pooled every prompt
    into one statistic, silently. One repeated prompt in a batch stays allowed."""
    verl_plugins.SAS_STATE.clear()
    with pytest.raises(ValueError, match="extra_info.index") as e:
        sas_call(["u1", "u1", "u2", "u2", "u3", "u3"], [0] * 6)
    assert "\n" not in str(e.value)
    sas_call([f"u{i // 2}" for i in range(8)], [1, 1, 2, 2, 3, 3, 1, 1])   # prompt 1 twice: fine


def test_the_registration_hook_registers_in_a_fresh_process():
    """Item 2: verl looks estimators up in its Ray actors, so importing the module in the
    driver is not enough; VERL_USE_EXTERNAL_MODULES makes `import verl` import it anywhere."""
    code = ("import verl\n"
            "from verl.trainer.ppo import core_algos\n"
            "core_algos.get_adv_estimator_fn('tempo'); core_algos.get_adv_estimator_fn('sas')\n"
            "core_algos.get_policy_loss_fn('dcpo'); core_algos.get_policy_loss_fn('dcpo_otm')\n"
            "print('registered')\n")
    base = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env = dict(base, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "integrations"), base.get("PYTHONPATH", "")]))
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env=env)
    assert without.returncode != 0                        # nothing registers by itself
    hooked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=ROOT,
                            env=dict(env, VERL_USE_EXTERNAL_MODULES="verl_plugins"))
    assert hooked.returncode == 0 and "registered" in hooked.stdout, hooked.stderr[-2000:]
