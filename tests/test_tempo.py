"""TEMPO's tree, TD term and advantage against hand-computed numbers (the worked example of
docs/tempo.md, "The math") and two references, plus the training script end to end.

Two independent references for the tree:
  brute_force  a plain dict trie over tuple prefixes (V(prefix) = mean reward of the responses
               starting with it), the definition itself;
  dense_td     an O(G^2 L) vectorised form (same[i,k,t] = cumulative token agreement).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import grpo
import tempo
from conftest import run_script

EOS = 2  # vocabulary {0, 1, 2} in the random tests; pad == EOS unless said otherwise
END = "<end>"  # the brute force's virtual end marker (a response stops at this prefix)


# ----------------------------------------------------------------------------- helpers
def make_batch(rows: list[list[int]], rewards: list[float], pad: int = 0, extra: int = 0):
    """Right-pad token lists to a common width (+ extra pad columns); mask = real tokens."""
    L = max(len(r) for r in rows) + extra
    ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (L - len(r)) for r in rows])
    return ids, mask, torch.tensor(rewards, dtype=torch.float64)


def brute_force(ids: torch.Tensor, mask: torch.Tensor, r: torch.Tensor):
    """Dict trie over tuple prefixes of ONE group: the definition, no cleverness."""
    lengths = (mask > 0).sum(1).tolist()
    seqs = [tuple(ids[i, : lengths[i]].tolist()) for i in range(len(lengths))]
    members: dict[tuple, list[int]] = defaultdict(list)
    nexts: dict[tuple, set] = defaultdict(set)
    for i, s in enumerate(seqs):
        for t in range(len(s) + 1):
            members[s[:t]].append(i)
            nexts[s[:t]].add(s[t] if t < len(s) else END)
    rv = r.tolist()
    V = {p: sum(rv[k] for k in ks) / len(ks) for p, ks in members.items()}
    delta = torch.zeros(ids.shape, dtype=torch.float64)
    for i, s in enumerate(seqs):
        for t in range(len(s)):
            delta[i, t] = V[s[: t + 1]] - V[s[:t]]
    branching = {p for p, nx in nexts.items() if len(nx) >= 2}
    udepth = [next((t for t in range(len(s) + 1) if len(members[s[:t]]) == 1), len(s)) for s in seqs]
    return dict(V=V, delta=delta, branching=branching, udepth=udepth, seqs=seqs, n_nodes=len(members))


def dense_td(ids: torch.Tensor, mask: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The O(G^2 L) form for ONE group (test-only; the module never does this)."""
    valid = mask > 0  # [G, L]
    agree = (ids[:, None, :] == ids[None, :, :]) & valid[:, None, :] & valid[None, :, :]  # [G, G, L]
    same = agree.long().cumprod(2).double()  # [G, G, L] i and k agree on tokens 0..t
    v_next = (same * r[None, :, None]).sum(1) / same.sum(1).clamp(min=1)  # [G, L] V(s_i,t+1)
    v_prev = torch.cat([r.mean().expand(ids.shape[0], 1), v_next[:, :-1]], 1)  # [G, L] V(s_i,t)
    return torch.where(valid, v_next - v_prev, torch.zeros_like(v_next))


def random_group(rng: np.random.Generator, G: int, reward_mode: str = "binary"):
    """One random group over vocab {0,1,2}, EOS = 2, lengths 1..8: shared prefixes, forced
    duplicates, truncated rows (no EOS, cut at the common L_max), pad == EOS or garbage after
    the EOS, and 0..3 extra padding columns."""
    L_max = int(rng.integers(1, 9))
    toks = rng.integers(0, 3, size=(G, L_max))
    for i in range(1, G):
        u = rng.random()
        if u < 0.2:  # forced duplicate of an earlier row
            toks[i] = toks[rng.integers(0, i)]
        elif u < 0.7:  # share a random-length prefix with an earlier row
            k = int(rng.integers(0, L_max + 1))
            toks[i, :k] = toks[rng.integers(0, i), :k]
    mask = np.zeros((G, L_max))
    for i in range(G):
        eos_pos = np.nonzero(toks[i] == EOS)[0]
        n = int(eos_pos[0]) + 1 if len(eos_pos) else L_max  # no EOS: truncated at L_max
        mask[i, :n] = 1
    extra = int(rng.integers(0, 4))
    ids = np.concatenate([toks, np.full((G, extra), EOS)], 1)
    mask = np.concatenate([mask, np.zeros((G, extra))], 1)
    if rng.random() < 0.5:  # garbage after the first EOS instead of pad == EOS
        ids = np.where(mask > 0, ids, rng.integers(0, 3, size=ids.shape))
    else:
        ids = np.where(mask > 0, ids, EOS)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.float32)
    if reward_mode == "binary":
        r = rng.integers(0, 2, size=G).astype(float)
    elif reward_mode == "float":
        r = rng.normal(size=G)
    else:  # "deterministic": a function of the real tokens (identical responses, equal rewards)
        r = np.array([hash(tuple(ids[i, : int(mask[i].sum())])) % 3 / 2.0 for i in range(G)])
    return ids_t, mask_t, torch.tensor(r, dtype=torch.float64)


def tree_and_td(ids, mask, r, G):
    tree = tempo.build_prefix_tree(ids, mask, r, G)
    return tree, tempo.tree_td(tree, mask)


# ----------------------------------------------------------------------------- 5.1
A_, B_, C_, D_, E_, F_ = 10, 11, 12, 13, 14, 15
E0 = 0  # EOS of the hand-made examples


def worked_example(pad: int = E0):
    rows = [[A_, B_, C_, E0], [A_, B_, D_, E0], [A_, E_, E0], [F_, E0]]
    return make_batch(rows, [1.0, 0.0, 1.0, 0.0], pad=pad)


def test_worked_example_values_td_advantages():
    ids, mask, r = worked_example()
    tree, td = tree_and_td(ids, mask, r, 4)
    node_v = {}  # prefix tuple -> V from the tree
    for i, n in enumerate(mask.sum(1).long().tolist()):
        for t in range(n + 1):
            node_v[tuple(ids[i, :t].tolist())] = float(tree.values[tree.node_ids[i, t]])
    expect = {(): 1 / 2, (A_,): 2 / 3, (F_,): 0.0, (A_, B_): 1 / 2, (A_, E_): 1.0,
              (A_, B_, C_): 1.0, (A_, B_, D_): 0.0}
    for p, v in expect.items():
        assert node_v[p] == pytest.approx(v, abs=1e-12)
    assert int(tree.branching.sum()) == 3
    assert len(tree.values) == 11  # root + 10 distinct prefixes
    exp_td = [[1 / 6, -1 / 6, 1 / 2, 0], [1 / 6, -1 / 6, -1 / 2, 0], [1 / 6, 1 / 3, 0, 0], [-1 / 2, 0, 0, 0]]
    assert torch.allclose(td, torch.tensor(exp_td, dtype=torch.float64), atol=1e-12)
    assert int(((td != 0) & (mask > 0)).sum()) == 9 and int(mask.sum()) == 13
    adv = tempo.tempo_advantages(r, td, mask, 4, eps_std=0.0)
    exp_a = [[1.154701, 0.577350, 1.732051, 0.866025], [-0.577350, -1.154701, -1.732051, -0.866025],
             [1.154701, 1.443376, 0.866025, 0], [-1.732051, -0.866025, 0, 0]]
    assert torch.allclose(adv, torch.tensor(exp_a, dtype=torch.float64), atol=1e-6)
    assert r.view(1, 4).std(1).item() == pytest.approx(0.5773503, abs=1e-7)


def test_worked_example_metrics():
    ids, mask, r = worked_example()
    adv, m = tempo.compute_tempo_advantages(r, 4, ids, mask)
    assert m["tempo/frac_tokens_td_nonzero"] == pytest.approx(9 / 13)
    assert m["tempo/branch_nodes_per_group_mean"] == 3.0 and m["tempo/branch_nodes_per_group_max"] == 3.0
    assert m["tempo/unique_depth_mean"] == pytest.approx((3 + 3 + 2 + 1) / 4)
    assert m["tempo/td_abs_share"] == pytest.approx((8 / 3) / 8.5)
    assert m["tempo/first_token_td_share"] == pytest.approx(1 / (8 / 3))
    assert brute_force(ids, mask, r)["udepth"] == [3, 3, 2, 1]


# ----------------------------------------------------------------------------- 5.2, 5.3
def test_no_shared_first_token():
    ids, mask, r = make_batch([[A_, E0], [B_, E0]], [1.0, 0.0])
    tree, td = tree_and_td(ids, mask, r, 2)
    assert torch.equal(td, torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64))
    adv = tempo.tempo_advantages(r, td, mask, 2, eps_std=0.0)
    s = 0.7071068
    assert torch.allclose(adv, torch.tensor([[2 * s, s], [-2 * s, -s]], dtype=torch.float64), atol=1e-6)
    grpo = tempo.tempo_advantages(r, td, mask, 2, td_coef=0.0, eps_std=0.0)  # GRPO: +-0.7071 flat
    assert torch.allclose(grpo, torch.tensor([[s, s], [-s, -s]], dtype=torch.float64), atol=1e-6)
    assert int(tree.branching.sum()) == 1  # only the root


def test_duplicates():
    ids, mask, r = make_batch([[A_, B_, E0], [A_, B_, E0], [A_, C_, E0]], [1.0, 1.0, 0.0])
    tree, td = tree_and_td(ids, mask, r, 3)
    root, node_a = tree.node_ids[0, 0], tree.node_ids[0, 1]
    assert not bool(tree.branching[root]) and bool(tree.branching[node_a])
    assert int(tree.branching.sum()) == 1
    exp_td = torch.tensor([[0, 1 / 3, 0], [0, 1 / 3, 0], [0, -2 / 3, 0]], dtype=torch.float64)
    assert torch.allclose(td, exp_td, atol=1e-12)
    assert td[0, 0] == 0.0 and td[0, 2] == 0.0  # exact zeros, not 1e-17
    adv = tempo.tempo_advantages(r, td, mask, 3, eps_std=0.0)
    exp_a = [[0.577350, 1.154701, 0.577350]] * 2 + [[-1.154701, -2.309401, -1.154701]]
    assert torch.allclose(adv, torch.tensor(exp_a, dtype=torch.float64), atol=1e-6)
    assert brute_force(ids, mask, r)["udepth"] == [3, 3, 2]  # duplicates count their full length


# ----------------------------------------------------------------------------- 5.4 - 5.6
def test_branch_gating_random():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        G = int(rng.integers(2, 9))
        ids, mask, r = random_group(rng, G, "float")  # float rewards: a leak would show as 1e-17
        tree, td = tree_and_td(ids, mask, r, G)
        for i, n in enumerate(mask.sum(1).long().tolist()):
            for t in range(n):
                node = tree.node_ids[i, t]
                if not bool(tree.branching[node]) or int(tree.counts[node]) == 1:
                    assert td[i, t].item() == 0.0  # EXACT zero
                    checked += 1
        assert torch.all(td[mask == 0] == 0)
    assert checked > 1000


def test_telescoping_random():
    rng = np.random.default_rng(1)
    eps = 1e-4
    for _ in range(300):
        G = int(rng.integers(2, 9))
        ids, mask, r = random_group(rng, G, "deterministic")  # equal rewards for equal leaves
        _, td = tree_and_td(ids, mask, r, G)
        mu, sigma = r.mean(), r.std()
        assert torch.allclose(td.sum(1), r - mu, atol=1e-12, rtol=0)
        adv = tempo.tempo_advantages(r, td, mask, G, eps_std=eps)
        if sigma >= 1e-6:
            n = mask.sum(1).double()
            assert torch.allclose(adv.sum(1), (n + 1) * (r - mu) / (sigma + eps), atol=1e-9, rtol=0)


def test_brute_force_random():
    """>= 500 random groups (vocab 3, G in [2, 8], lengths 1..8; duplicates, truncation,
    pad == EOS, garbage padding): tree == dict trie == dense O(G^2 L) form, to 1e-12."""
    rng = np.random.default_rng(2)
    n_trunc = n_dup = 0
    for k in range(600):
        G = int(rng.integers(2, 9))
        ids, mask, r = random_group(rng, G, ["binary", "float", "deterministic"][k % 3])
        ref = brute_force(ids, mask, r)
        tree, td = tree_and_td(ids, mask, r, G)
        assert torch.allclose(td, ref["delta"], atol=1e-12, rtol=0)
        assert torch.allclose(td, dense_td(ids, mask, r), atol=1e-12, rtol=0)
        assert len(tree.values) == ref["n_nodes"]
        assert int(tree.branching.sum()) == len(ref["branching"])
        for i, s in enumerate(ref["seqs"]):  # every node value on every path
            for t in range(len(s) + 1):
                assert float(tree.values[tree.node_ids[i, t]]) == pytest.approx(ref["V"][s[:t]], abs=1e-12)
        m = tempo.tree_metrics(tree, td, mask, r, G)
        assert m["tempo/unique_depth_mean"] == pytest.approx(sum(ref["udepth"]) / G, abs=1e-12)
        # advantage = brute-force formula
        mu, sd = r.mean(), r.std()
        exp = torch.zeros_like(td) if sd < 1e-6 else ((r - mu)[:, None] + ref["delta"]) / (sd + 1e-4) * mask
        assert torch.allclose(tempo.tempo_advantages(r, td, mask, G), exp, atol=1e-10, rtol=0)
        last_tok = ids.gather(1, (mask.sum(1).long() - 1)[:, None]).squeeze(1)  # [G]
        n_trunc += int((last_tok != EOS).any())  # a response without EOS (truncated)
        n_dup += int(len(set(ref["seqs"])) < G)
    assert n_trunc > 50 and n_dup > 100  # the generator really made the hard cases


def test_whole_batch_equals_per_group():
    """Many groups in one call = one call per group; identical responses in DIFFERENT groups
    are never merged (grouping is by position, not by content)."""
    rng = np.random.default_rng(3)
    G, parts = 4, []
    for _ in range(30):
        parts.append(random_group(rng, G, "float"))
    L = max(p[0].shape[1] for p in parts)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, L - x.shape[1]), value=v)  # noqa: E731
    ids = torch.cat([pad(p[0], EOS) for p in parts])
    mask = torch.cat([pad(p[1], 0.0) for p in parts])
    r = torch.cat([p[2] for p in parts])
    ids[G:2 * G], mask[G:2 * G] = ids[:G], mask[:G]  # group 1 has group 0's tokens ...
    r[G:2 * G] = r[:G] + 1.0  # ... with other rewards
    adv, _ = tempo.compute_tempo_advantages(r, G, ids, mask)
    for g in range(30):
        sl = slice(g * G, (g + 1) * G)
        one, _ = tempo.compute_tempo_advantages(r[sl], G, ids[sl], mask[sl])
        assert torch.allclose(adv[sl], one, atol=1e-12, rtol=0)
    tree = tempo.build_prefix_tree(ids, mask, r, G)
    nodes0, nodes1 = (set(tree.node_ids[sl].flatten().tolist()) - {-1}
                      for sl in (slice(0, G), slice(G, 2 * G)))
    assert nodes0.isdisjoint(nodes1) and len(nodes0) == len(nodes1)


# ----------------------------------------------------------------------------- 5.7, 5.8
@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_equal_rewards_zero_no_nan(scale, dtype):
    rng = np.random.default_rng(4)
    for value in (0.0, 1.0, 0.1, -0.3):
        ids, mask, _ = random_group(rng, 6)
        r = torch.full((6,), value, dtype=dtype)
        tree, td = tree_and_td(ids, mask, r, 6)
        assert torch.all(td == 0.0)  # exact, thanks to the centred sums
        for eps in (1e-4, 0.0):
            adv = tempo.tempo_advantages(r, td, mask, 6, scale_rewards=scale, eps_std=eps)
            assert adv.dtype == dtype and torch.all(adv == 0.0) and not torch.isnan(adv).any()


@pytest.mark.parametrize("scale", ["group", "none"])
def test_td_coef_zero_is_grpo_exactly(scale):
    rng = np.random.default_rng(5)
    for k in range(100):
        G = int(rng.integers(2, 9))
        ids, mask, r = random_group(rng, G, "float" if k % 2 else "binary")
        r = r.float()  # the training dtype
        adv, _ = tempo.compute_tempo_advantages(r, G, ids, mask, td_coef=0.0, scale_rewards=scale)
        flat = grpo.compute_advantages(r, G, scale)[:, None].expand_as(adv) * mask
        assert torch.equal(adv, flat)


def test_scale_none_is_centred_reward_plus_td():
    rng = np.random.default_rng(6)
    for _ in range(100):
        G = int(rng.integers(2, 9))
        ids, mask, r = random_group(rng, G, "float")
        _, td = tree_and_td(ids, mask, r, G)
        for c in (1.0, 0.5):
            adv = tempo.tempo_advantages(r, td, mask, G, td_coef=c, scale_rewards="none")
            assert torch.allclose(adv, ((r - r.mean())[:, None] + c * td) * mask, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- 5.9
def test_padding_invariance():
    """More right padding (pad == EOS) and garbage after the EOS change nothing. (Prompt left
    padding cannot matter: the functions never see the prompt; the root is the prompt.)"""
    rng = np.random.default_rng(7)
    for _ in range(100):
        G = int(rng.integers(2, 9))
        ids, mask, r = random_group(rng, G, "float")
        adv, m = tempo.compute_tempo_advantages(r, G, ids, mask)
        ids2 = torch.cat([ids, torch.full((G, 5), EOS)], 1)
        mask2 = torch.cat([mask, torch.zeros(G, 5)], 1)
        adv2, m2 = tempo.compute_tempo_advantages(r, G, ids2, mask2)
        assert torch.equal(adv2[:, : ids.shape[1]], adv) and torch.all(adv2[:, ids.shape[1]:] == 0)
        assert m2 == pytest.approx(m, abs=1e-12)  # sums over more zeros may round differently
        ids3 = torch.where(mask2 > 0, ids2, torch.randint(0, 3, ids2.shape))
        adv3, _ = tempo.compute_tempo_advantages(r, G, ids3, mask2)
        assert torch.equal(adv3, adv2)


def test_pad_equals_eos_makes_no_fake_nodes():
    ids, mask, r = make_batch([[A_, E0], [B_, E0], [A_, B_, C_, D_, E0]], [1.0, 0.0, 0.5], pad=E0)
    tree = tempo.build_prefix_tree(ids, mask, r, 3)
    # root; A, B; Ae, Be, AB; ABC; ABCD; ABCDe = 9 nodes; comparing padded tails would add more
    assert len(tree.values) == brute_force(ids, mask, r)["n_nodes"] == 9


def test_permutation_invariance():
    rng = np.random.default_rng(8)
    for _ in range(100):
        G = int(rng.integers(2, 9))
        ids, mask, r = random_group(rng, G, "float")
        adv, _ = tempo.compute_tempo_advantages(r, G, ids, mask)
        p = torch.as_tensor(rng.permutation(G))
        adv_p, _ = tempo.compute_tempo_advantages(r[p], G, ids[p], mask[p])
        assert torch.allclose(adv_p, adv[p], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- edge cases
def test_strict_prefix_response_branches_where_it_stops():
    """A response that stops early without EOS (stop string) is a strict prefix of another:
    its last node counts as branching (as a virtual end marker would make it); telescoping then
    gives V(its last node) - mu instead of r - mu: that node's value mixes in the longer one."""
    ids, mask, r = make_batch([[A_, B_], [A_, B_, C_, E0], [D_, E0]], [1.0, 0.0, 0.0])
    tree, td = tree_and_td(ids, mask, r, 3)
    ref = brute_force(ids, mask, r)
    assert torch.allclose(td, ref["delta"], atol=1e-12)
    assert int(tree.branching.sum()) == len(ref["branching"]) == 2  # root and AB
    assert bool(tree.branching[tree.node_ids[0, 2]])
    assert td[1, 2].item() == pytest.approx(0.0 - 0.5)  # C leaves the shared node AB
    assert td[0].sum().item() == pytest.approx(0.5 - 1 / 3)  # V(AB) - mu, not r - mu


def test_long_shared_prefix_and_fp32():
    G, L = 8, 600
    ids = torch.full((G, L), 7)
    ids[:, 500] = torch.arange(G)  # all branch at depth 500
    mask = torch.ones(G, L)
    r = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.float32)
    tree, td = tree_and_td(ids, mask, r, G)
    assert int(tree.branching.sum()) == 1 and int(tree.node_ids[0, 500]) >= 0
    assert torch.count_nonzero(td) == G and torch.all(td[:, 500] != 0)
    adv, m = tempo.compute_tempo_advantages(r, G, ids, mask)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert m["tempo/unique_depth_mean"] == 501.0


def test_input_checks():
    ids, mask, r = worked_example()
    with pytest.raises(ValueError):
        tempo.build_prefix_tree(ids[:1], mask[:1], r[:1], 1)  # G < 2
    with pytest.raises(ValueError):
        tempo.build_prefix_tree(ids[:3], mask[:3], r[:3], 2)  # B not a multiple of G
    bad = mask.clone()
    bad[0, 1] = 0.0  # a hole
    with pytest.raises(ValueError):
        tempo.build_prefix_tree(ids, bad, r, 4)
    with pytest.raises(ValueError):
        tempo.compute_tempo_advantages(r, 4, ids, mask, scale_rewards="batch")


# ----------------------------------------------------------------------------- copied GRPO pieces
def test_grpo_pieces_copied_unchanged():
    """tempo.py copies grpo.py's advantage and loss (no import) and its shared settings."""
    for name in ("compute_advantages", "clipped_objective", "k3_kl", "entropy_token_mask", "aggregate_loss",
                 "grpo_loss"):
        assert inspect.getsource(getattr(tempo, name)) == inspect.getsource(getattr(grpo, name)), name
    assert (tempo.TINY_LEARNING_RATE, tempo.HUB_LEARNING_RATE) == (grpo.TINY_LEARNING_RATE, grpo.HUB_LEARNING_RATE)
    g_fields = {f.name: f for f in dataclasses.fields(grpo.Args)}
    t_fields = {f.name: f for f in dataclasses.fields(tempo.Args)}
    # grpo.py's own variants (TW-GRPO, D3S) are flags of grpo.py only
    g_fields = {k: f for k, f in g_fields.items() if not k.startswith(("tw_", "d3s", "token_weighting"))}
    assert set(t_fields) - set(g_fields) == {"td_coef", "show_credit"} and set(g_fields) <= set(t_fields)
    for name, f in g_fields.items():
        assert (t_fields[name].default, t_fields[name].type) == (f.default, f.type), name
    g_src, t_src = inspect.getsource(grpo), inspect.getsource(tempo)
    def shared_block(src: str) -> str:  # the lines under "# --- shared base settings", up to the next "# ---"
        start = src.index("    # --- shared base settings")
        return src[start:src.index("    # --- ", start + 10)]
    assert shared_block(t_src) == shared_block(g_src) and "--- shared base settings" in shared_block(t_src)


def test_loss_accepts_token_advantages():
    """grpo_loss with [B, L] TEMPO advantages: on pass 1 (ratio 1) the gradient is -A * m / |o_i| / B."""
    ids, mask, r = worked_example()
    adv, _ = tempo.compute_tempo_advantages(r.float(), 4, ids, mask)
    logps = torch.zeros(4, ids.shape[1], requires_grad=True)
    loss, _ = tempo.grpo_loss(logps, logps.detach(), adv, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                              num_sequences=4, num_tokens=mask.sum().item(), max_completion_length=ids.shape[1])
    loss.backward()
    expected = -adv * mask / mask.sum(1, keepdim=True) / 4
    assert torch.allclose(logps.grad, expected, atol=1e-7)


# ----------------------------------------------------------------------------- credit view (common.py)
def test_render_plain():
    adv = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert common.render_credit([["A", "B"], ["C"]], adv, mask) == "o1: A[+0.50]B[-0.25]\no2: C[+1.00]"
    out = common.render_credit([["A\n", " B"], ["C", "junk"]], adv, mask, flat=torch.tensor([0.7, -0.7]),
                               rewards=torch.tensor([1.0, 0.0]))
    assert out == "o1 (r=1.00, GRPO +0.70): A\\n[+0.50] B[-0.25]\no2 (r=0.00, GRPO -0.70): C[+1.00]"
    # a sequence-level advantage [G] is shown on every token
    assert common.render_credit([["A", "B"], ["C"]], torch.tensor([0.5, -1.0]), mask) == \
        "o1: A[+0.50]B[+0.50]\no2: C[-1.00]"


def test_render_color():
    adv = torch.tensor([[0.5, -0.25, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = common.render_credit([["A", "B", "e"], ["C"]], adv, mask, color=True)
    assert "\x1b[38;5;" in out and "[+" not in out
    assert out.split("\n")[0].endswith("\x1b[0me")  # A == 0 stays uncoloured
    assert "\x1b[38;5;46mC\x1b[0m" in out  # the largest |A| shown gets the strongest green
    with pytest.raises(ValueError):
        common.render_credit([["A"], ["C"]], adv, mask)  # fewer strings than masked tokens


def test_credit_view_decodes_tokens():
    tok = common.build_char_tokenizer()
    ids = torch.tensor([tok("7+1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    out = common.credit_view(tok, torch.cat([ids, ids]), torch.tensor([[1.0, 0, 0, -1], [0.5, 0, 0, 0]]),
                             torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]]), color=False)
    assert out == ("key: x[+0.12] = the advantage of token x, the token just before the [ ]\n"
                   "o1: 7[+1.00]+[+0.00]1[+0.00]<eos>[-1.00]\no2: 7[+0.50]+[+0.00]")


# ----------------------------------------------------------------------------- the script, end to end
TINY_RUN = ["--total-steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--eval-size", "4",
            "--max-completion-length", "8", "--eval-every", "1", "--log-completions-every", "1"]


@pytest.fixture(scope="module")
def tiny_run(random_tiny_model_dir, tmp_path_factory):
    """tempo.py for 2 steps on the random tiny model, with the credit view every step."""
    out_dir = tmp_path_factory.mktemp("tempo_run")
    out = run_script("tempo", "--model", str(random_tiny_model_dir), "--output-dir", str(out_dir),
                     "--show-credit", "1", *TINY_RUN, fake_reward=True)
    return out, out_dir


def test_two_steps_end_to_end(tiny_run, random_tiny_model_dir):
    out, out_dir = tiny_run
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list(out_dir.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward", "policy_loss", "grad_norm", "eval/accuracy", "entropy", "adv/abs_mean",
                "tempo/frac_tokens_td_nonzero", "tempo/branch_nodes_per_group_mean",
                "tempo/branch_nodes_per_group_max", "tempo/unique_depth_mean", "tempo/td_abs_share",
                "tempo/first_token_td_share"):
        assert key in rows[1] and math.isfinite(rows[1][key]), key
    assert rows[1]["reward"] == 0.5 and rows[1]["adv/abs_mean"] > 0  # the swapped verifier
    assert 0.0 < rows[1]["tempo/frac_tokens_td_nonzero"] <= 1.0  # a group's two responses diverge somewhere
    assert rows[1]["tempo/unique_depth_mean"] <= 8  # max completion length
    assert json.loads((run_dir / "config.json").read_text())["algo"] == "tempo"
    ckpt = run_dir / "checkpoints" / "step-0000002"
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))
    assert "held-out greedy accuracy" in out.stdout and str(run_dir) in out.stdout


def test_show_credit_prints_plain_numbers(tiny_run):
    """stdout is a pipe here, so the credit view prints numbers, never ANSI colour codes."""
    out, _ = tiny_run
    assert out.returncode == 0, out.stderr[-3000:]
    assert "\x1b[" not in out.stdout
    for step in (1, 2):
        assert f"step {step}, credit view of " in out.stdout
    rows = re.findall(r"^o(\d) \(r=(\d\.\d\d), GRPO ([+-]\d\.\d\d)\): (.*)$", out.stdout, re.M)
    assert [(int(r[0]), r[1], r[2]) for r in rows] == [(1, "0.00", "-0.71"), (2, "1.00", "+0.71")] * 2
    for _, _, flat, body in rows:  # numbers only where TEMPO differs from GRPO: the branch point(s)
        numbers = re.findall(r"\[([+-]\d+\.\d\d)\]", body)
        assert numbers and flat not in numbers, body  # a random model's two answers branch somewhere
