"""SPO's mask, cutpoints, partitions, chain and tree advantages and loss against hand-computed
numbers (the worked numbers of docs/spo.md, "The math"; "card" in a test name means one of
those), plus loop references for the vectorised pieces and end-to-end runs of both variants."""
import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import spo
from conftest import ROOT
from spo import (chain_advantages, draw_replay, mc_rollout_rewards, mc_values, plan_mc_prefixes,
                 probability_mask, segment_batch, segment_starts, spo_loss, tree_advantages, tree_examples,
                 tree_node_values, whiten_advantages)

T = torch.tensor
DOCS_P = [0.99, 0.5, 0.95, 0.3, 0.97, 0.8, 0.2, 0.99, 0.6, 0.98]  # docs/spo.md: U = [1, 3, 5, 6, 8]


def logps(p, dtype=torch.float64):
    return torch.log(torch.tensor(p, dtype=dtype))


def loss_kw(z, **kw):
    return dict(epsilon_low=0.2, epsilon_high=kw.pop("epsilon_high", 0.2), num_masked_tokens=z, **kw)


# ---------------------------------------------------------------------- 1. the probability mask


def test_mask_docs_example():
    assert probability_mask(logps([[0.95, 0.5, 0.9, 0.8999, 1.0]]), torch.ones(1, 5)).tolist() == [[0, 1, 0, 1, 0]]


def test_mask_never_keeps_padding_even_with_garbage():
    lp = logps([[0.95, 0.5, 0.9, 0.1, 0.2]])
    lp[0, 4] = float("nan")
    assert probability_mask(lp, T([[1.0, 1, 1, 0, 0]])).tolist() == [[0, 1, 0, 0, 0]]


def test_mask_vs_loop_random():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(6, 13, generator=g, dtype=torch.float64)
    m = (torch.rand(6, 13, generator=g) > 0.3).float()
    got = probability_mask(p.log(), m)
    for b, t in itertools.product(range(6), range(13)):
        assert got[b, t] == float(m[b, t] == 1 and p[b, t] < 0.9)


# ---------------------------------------------------------------------- 2. cutpoints and partition


def starts_of(n, interval, partition):  # n cutpoints at positions 0..n-1: the starts ARE the indices c_k
    return [s for s in segment_starts(torch.ones(1, n, dtype=torch.bool), interval, partition)[0].tolist() if s >= 0]


def counts(idx, n):
    return [b - a for a, b in zip(idx, idx[1:] + [n])]


@pytest.mark.parametrize("partition", ["even", "stride"])
def test_partition_docs_example_interval2(partition):
    cut = probability_mask(logps([DOCS_P]), torch.ones(1, 10)) > 0
    assert cut.nonzero()[:, 1].tolist() == [1, 3, 5, 6, 8]
    assert segment_starts(cut, 2, partition).tolist() == [[1, 5, 8]]  # counts 2, 2, 1


def test_partition_docs_counts():
    assert starts_of(11, 5, "stride") == [0, 5, 10] and counts([0, 5, 10], 11) == [5, 5, 1]
    assert starts_of(11, 5, "even") == [0, 4, 8] and counts([0, 4, 8], 11) == [4, 4, 3]
    for rule in ("even", "stride"):
        assert starts_of(10, 5, rule) == [0, 5]
        assert segment_starts(torch.zeros(2, 4, dtype=torch.bool), 5, rule).shape == (2, 0)  # n = 0


def test_even_partition_minimises_sum_of_squares():
    for interval, n in itertools.product((1, 2, 3, 5), range(1, 12)):
        k = -(-n // interval)
        best = min(sum(c * c for c in counts([0, *cuts], n)) for cuts in itertools.combinations(range(1, n), k - 1))
        idx = starts_of(n, interval, "even")
        assert len(idx) == k and sum(c * c for c in counts(idx, n)) == best
        assert max(counts(idx, n)) - min(counts(idx, n)) <= 1


def test_segment_starts_vs_loop_random():
    rng = random.Random(0)
    for _ in range(30):
        b, seq, interval = rng.randint(1, 5), rng.randint(1, 25), rng.randint(1, 6)
        cut = torch.rand(b, seq) < rng.random()
        for rule in ("even", "stride"):
            got = segment_starts(cut, interval, rule)
            for i in range(b):
                u = [t for t in range(seq) if cut[i, t]]
                k = math.ceil(len(u) / interval)
                if rule == "stride":
                    ref = u[::interval]
                else:  # sizes ceil(n/K) first, then floor(n/K)
                    ref, c = [], 0
                    for j in range(k):
                        ref.append(u[c])
                        c += len(u) // k + (1 if j < len(u) % k else 0)
                assert [s for s in got[i].tolist() if s >= 0] == ref


# ---------------------------------------------------------------------- 3-4. chain advantages, telescoping


def test_chain_docs_example_and_loss():
    lp, m = logps([DOCS_P]), torch.ones(1, 10)
    mask = probability_mask(lp, m)
    starts = segment_starts(mask > 0, 2)
    seg, adv = chain_advantages(T([[0.5, 0.75, 0.25]]), T([1.0]), starts, m)
    assert seg.tolist() == [[0.25, -0.5, 0.75]]
    assert seg.sum().item() == pytest.approx(1.0 - 0.5, abs=1e-12)  # R - V_hat_0
    assert adv.tolist() == [[0, 0.25, 0.25, 0.25, 0.25, -0.5, -0.5, -0.5, 0.75, 0.75]]
    z = mask.sum().item()
    assert z == 5
    loss, metrics = spo_loss(lp.float(), lp.float(), adv, mask, **loss_kw(z))  # ratio 1
    assert loss.item() == pytest.approx(-0.05, abs=1e-7)
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_telescoping_random():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        b, seq = 7, 30
        cut = torch.rand(b, seq, generator=g) < 0.4
        starts = segment_starts(cut, int(torch.randint(1, 5, (1,), generator=g)))
        values = torch.rand(starts.shape, generator=g, dtype=torch.float64)
        r = torch.rand(b, generator=g, dtype=torch.float64)
        seg, adv = chain_advantages(values, r, starts, torch.ones(b, seq))
        for i in range(b):
            k = int((starts[i] >= 0).sum())
            if k == 0:
                assert seg[i].abs().sum() == 0 and adv[i].abs().sum() == 0
                continue
            assert abs(seg[i, :k].sum().item() - (r[i] - values[i, 0]).item()) < 1e-12
            assert abs(adv[i, starts[i, :k]].sum().item() - (r[i] - values[i, 0]).item()) < 1e-12


def test_token_advantages_vs_loop_random():
    g = torch.Generator().manual_seed(2)
    b, seq = 9, 17
    m = (torch.arange(seq)[None] < torch.randint(0, seq + 1, (b,), generator=g)[:, None]).float()
    cut = (torch.rand(b, seq, generator=g) < 0.3) & (m > 0)
    starts = segment_starts(cut, 2, "stride")
    values, r = torch.rand(starts.shape, generator=g), torch.rand(b, generator=g)
    seg, adv = chain_advantages(values, r, starts, m)
    for i in range(b):
        s = [x for x in starts[i].tolist() if x >= 0]
        v = values[i, :len(s)].tolist() + [r[i].item()]
        for t in range(seq):
            ref = 0.0
            for k, st in enumerate(s):
                if st <= t:
                    ref = v[k + 1] - v[k]
            assert adv[i, t].item() == pytest.approx(ref if m[i, t] else 0.0, abs=1e-6)


def test_no_cutpoints_gives_zero_advantages():
    starts = segment_starts(torch.zeros(3, 4, dtype=torch.bool))
    seg, adv = chain_advantages(torch.zeros(3, 0), torch.ones(3), starts, torch.ones(3, 4))
    assert seg.shape == (3, 0) and adv.shape == (3, 4) and adv.abs().sum() == 0 and not adv.isnan().any()


# ---------------------------------------------------------------------- MC planning (pure)


def test_planner_dedups_identical_prefixes():
    ids = T([[7, 8, 9], [7, 8, 9], [7, 5, 9]])
    prefixes, index = plan_mc_prefixes(ids, T([[0, 2], [0, 2], [0, 2]]), T([0, 0, 1]))
    assert prefixes == [(0, ()), (0, (7, 8)), (1, ()), (1, (7, 5))]
    assert index.tolist() == [[0, 1], [0, 1], [2, 3]]


def test_planner_vs_loop_random():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 2, (12, 8), generator=g)  # a tiny vocabulary: many shared prefixes
    ids[1] = ids[0]
    starts = segment_starts(torch.rand(12, 8, generator=g) < 0.4, 1)
    prefixes, index = plan_mc_prefixes(ids, starts, torch.arange(12) // 4)
    assert len(set(prefixes)) == len(prefixes)
    requests = 0
    for i, k in itertools.product(range(12), range(starts.size(1))):
        s = starts[i, k].item()
        if s < 0:
            assert index[i, k] == -1
            continue
        requests += 1
        assert prefixes[index[i, k]] == (i // 4, tuple(ids[i, :s].tolist()))
    assert len(prefixes) < requests


def test_mc_values_example_and_loop():
    assert mc_values(T([[1.0, 0.0], [1.0, 1.0]]), T([[0, 1], [1, -1]])).tolist() == [[0.5, 1.0], [1.0, 0.0]]
    g = torch.Generator().manual_seed(4)
    r = (torch.rand(5, 9, generator=g) < 0.5).float()
    index = torch.randint(-1, 5, (6, 3), generator=g)
    got = mc_values(r, index)
    for i, k in itertools.product(range(6), range(3)):
        j = index[i, k].item()
        assert got[i, k].item() == pytest.approx(0.0 if j < 0 else r[j].sum().item() / 9, abs=1e-7)


# ---------------------------------------------------------------------- 5. tree


def docs_tree():  # 0 root -> {1 a, 2 b}; a -> {3, 4} = {1, 1}; b -> {5, 6} = {1, 0}
    return T([-1, 0, 0, 1, 1, 2, 2]), T([0, 0, 0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)


def test_tree_docs_example():
    parent, leaf = docs_tree()
    v = tree_node_values(parent, leaf)
    assert v[:3].tolist() == [0.75, 1.0, 0.5]
    a = tree_advantages(parent, v)
    assert a.tolist() == [0.0, 0.25, -0.25, 0.0, 0.0, 0.5, -0.5]
    ctx, resp, adv = tree_examples(parent, [[], [2, 3], [6], [4], [5], [8], [9]], a, [1])
    assert len(resp) == 4 and adv == [0.25, -0.25, 0.5, -0.5]  # a's children (A = 0) are dropped


def test_tree_early_leaf_and_paper_figure():
    v = tree_node_values(T([-1, 0, 0, 2, 2, 2]), T([0, 1.0, 0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert v[2].item() == pytest.approx(1 / 3, abs=1e-15) and v[0].item() == pytest.approx(2 / 3, abs=1e-15)
    parent = T([-1, 0, 0, 0, 2, 2, 2])  # children valued 1, 2/3, 0
    v = tree_node_values(parent, T([0, 1.0, 0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert v[0].item() == pytest.approx(5 / 9, abs=1e-15)
    assert tree_advantages(parent, v)[1].item() == pytest.approx(4 / 9, abs=1e-15)


def test_tree_normalized_and_equal_siblings():
    parent, leaf = docs_tree()
    a = tree_advantages(parent, tree_node_values(parent, leaf), normalized=True)
    assert a[1].item() == pytest.approx(1.0, abs=1e-6) and a[2].item() == pytest.approx(-1.0, abs=1e-6)
    assert a[3] == 0 and a[4] == 0
    # six siblings all worth 1/3 (each the mean of {1, 0, 0}): rounding never leaks into A
    p2 = T([-1] + [0] * 6 + [1 + i // 3 for i in range(18)])
    l2 = T([0.0] * 7 + [1.0 if i % 3 == 0 else 0.0 for i in range(18)])
    for norm in (False, True):
        a2 = tree_advantages(p2, tree_node_values(p2, l2), normalized=norm)
        assert a2[1:7].abs().sum() == 0 and not a2.isnan().any()


def test_tree_vs_recursive_reference():
    rng = random.Random(5)
    for _ in range(20):
        parent, frontier = [-1], [0]
        for d, nb in enumerate((3, 2, 3)):
            nxt = []
            for node in frontier:
                for _ in range(nb):
                    parent.append(node)
                    if d < 2 and rng.random() > 0.3:
                        nxt.append(len(parent) - 1)
            frontier = nxt
        leaf = [float(rng.random() < 0.5) for _ in parent]
        children = {i: [j for j, p in enumerate(parent) if p == i] for i in range(len(parent))}

        def value(i):
            return leaf[i] if not children[i] else sum(value(c) for c in children[i]) / len(children[i])

        v = tree_node_values(T(parent), T(leaf, dtype=torch.float64))
        a, an = tree_advantages(T(parent), v), tree_advantages(T(parent), v, normalized=True)
        for i in range(1, len(parent)):
            sib = [value(c) for c in children[parent[i]]]
            mu, std = sum(sib) / len(sib), math.sqrt(sum((s - sum(sib) / len(sib)) ** 2 for s in sib) / len(sib))
            assert v[i].item() == pytest.approx(value(i), abs=1e-12)
            assert a[i].item() == pytest.approx(0.0 if max(sib) == min(sib) else value(i) - value(parent[i]), abs=1e-12)
            assert an[i].item() == pytest.approx(0.0 if max(sib) == min(sib) else (value(i) - mu) / (std + 1e-8), abs=1e-9)


# 8. segment examples: context = prompt + ancestors, A(n) on every token, then the mask
def test_tree_segment_examples_and_mask():
    parent, leaf = docs_tree()
    a = tree_advantages(parent, tree_node_values(parent, leaf))
    ctx, resp, adv = tree_examples(parent, [[], [2, 3], [6], [4], [5], [8, 0], [9, 0]], a, [1])  # 0 = EOS
    assert ctx == [[1], [1], [1, 6], [1, 6]] and resp == [[2, 3], [6], [8, 0], [9, 0]]
    ex = [{"context": c, "response": r, "advantage": x} for c, r, x in zip(ctx, resp, adv)]
    p_ids, p_mask, c_ids, c_mask, adv_t, _ = segment_batch(ex, pad_id=0)
    assert p_ids.tolist() == [[0, 1], [0, 1], [1, 6], [1, 6]] and p_mask.tolist() == [[0, 1], [0, 1], [1, 1], [1, 1]]
    assert c_mask.tolist() == [[1, 1], [1, 0], [1, 1], [1, 1]]
    assert adv_t.tolist() == [[0.25, 0.25], [-0.25, 0], [0.5, 0.5], [-0.5, -0.5]]
    old = logps([[0.5, 0.95], [0.3, 0.1], [0.99, 0.7], [0.2, 0.9]])
    assert probability_mask(old, c_mask).tolist() == [[1, 0], [1, 0], [0, 1], [1, 0]]


def test_replay_buffer_draws_ages_and_removes():
    buf = [{"question": 5, "step": 10, "k": k} for k in range(3)] + [{"question": 6, "step": 2, "k": 9}]
    drawn, waiting = draw_replay(buf, 10, max_age=8, per_question=2, rng=random.Random(0))
    assert len(drawn) == 2 and all(e["question"] == 5 for e in drawn)      # question 6's segment is stale
    assert len(waiting) == 1 and waiting[0] not in drawn
    drawn2, waiting2 = draw_replay(waiting, 11, 8, 2, random.Random(0))     # the leftover comes next step
    assert drawn2 == waiting and waiting2 == []
    drawn3, waiting3 = draw_replay(buf[:3], 10, 1, 2, random.Random(0))    # on-policy: leftovers dropped
    assert len(drawn3) == 2 and waiting3 == []


# ---------------------------------------------------------------------- 7. loss


def loop_loss(lp, old, adv, mask, z, eps_low=0.2, eps_high=0.2):
    total = 0.0
    for b, t in itertools.product(range(len(lp)), range(len(lp[0]))):
        if mask[b][t]:
            r = math.exp(max(-20.0, min(20.0, lp[b][t] - old[b][t])))
            total += min(r * adv[b][t], min(max(r, 1 - eps_low), 1 + eps_high) * adv[b][t])
    return -total / z


def random_step(seed, b=6, seq=11):
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(b, seq, generator=g) * 0.999 + 1e-3)
    lp = old + 0.4 * torch.randn(b, seq, generator=g)
    m = (torch.arange(seq)[None] < torch.randint(1, seq + 1, (b,), generator=g)[:, None]).float()
    old = torch.where(m > 0, old, torch.full_like(old, float("nan")))  # garbage where masked
    lp = torch.where(m > 0, lp, torch.full_like(lp, float("inf")))
    return lp, old, torch.randn(b, seq, generator=g), m


def test_loss_vs_loop_random():
    for seed in range(5):
        lp, old, adv, m = random_step(seed)
        mask = probability_mask(old, m)
        z = mask.sum().item()
        loss, metrics = spo_loss(lp, old, adv, mask, **loss_kw(z, epsilon_high=0.28))
        assert loss.item() == pytest.approx(loop_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), z,
                                                      0.2, 0.28), abs=1e-6)
        assert 0.0 <= metrics["clip_ratio/region_mean"] <= 1.0


def test_loss_zero_z_is_zero_without_nan():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = spo_loss(lp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), **loss_kw(0.0))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss) and lp.grad.abs().sum() == 0


def test_loss_microbatches_sum_to_full_step():
    lp, old, adv, m = random_step(7, b=8)
    mask = probability_mask(old, m)
    z = mask.sum().item()  # Z of the WHOLE step, passed to every micro-batch
    full_lp, parts_lp = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    full, _ = spo_loss(full_lp, old, adv, mask, **loss_kw(z))
    full.backward()
    total = 0.0
    for sl in (slice(0, 3), slice(3, 5), slice(5, 8)):
        part, _ = spo_loss(parts_lp[sl], old[sl], adv[sl], mask[sl], **loss_kw(z))
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(parts_lp.grad, full_lp.grad, atol=1e-6) and not parts_lp.grad.isnan().any()


def test_loss_uses_raw_advantages_and_only_masked_tokens():
    lp, old, adv, m = random_step(8)
    mask = probability_mask(old, m)
    z = mask.sum().item()
    same = torch.where(m > 0, old, torch.zeros_like(old))  # ratio 1 on every real token
    l1, _ = spo_loss(same, old, adv, mask, **loss_kw(z))
    l100, _ = spo_loss(same, old, 100.0 * adv, mask, **loss_kw(z))
    assert l1.item() == pytest.approx(-(adv * mask).sum().item() / z, abs=1e-6)  # no whitening
    assert l100.item() == pytest.approx(100.0 * l1.item(), rel=1e-5)
    x = same.clone().requires_grad_(True)
    spo_loss(x, old, adv, mask, **loss_kw(z))[0].backward()
    assert (x.grad[mask == 0] == 0).all() and (x.grad[mask > 0] != 0).any()


def test_whiten_example():
    w = whiten_advantages(T([1.0, 3.0, 100.0]), T([1.0, 1.0, 0.0]))
    assert w.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 98 / math.sqrt(2)], abs=1e-5)


def test_kl_term_on_all_completion_tokens():
    lp, old, adv, m = random_step(9)
    lp = torch.where(m > 0, lp, torch.zeros_like(lp))
    mask = probability_mask(old, m)
    z = mask.sum().item()
    ref = torch.where(m > 0, lp + 0.3, torch.zeros_like(lp))
    l0, _ = spo_loss(lp, old, adv, mask, **loss_kw(z))
    l1, metrics = spo_loss(lp, old, adv, mask, **loss_kw(z, beta=0.1, ref_logps=ref, completion_mask=m))
    k3 = math.exp(0.3) - 0.3 - 1.0
    assert (l1 - l0).item() == pytest.approx(0.1 * k3 * m.sum().item() / z, rel=1e-4)
    assert metrics["kl"] == pytest.approx(k3, rel=1e-4)


# ---------------------------------------------------------------------- 6. the MC estimator on a model


@pytest.fixture(scope="module")
def warm(warm_tiny_model_dir):
    model, tok = common.load_model_and_tokenizer(str(warm_tiny_model_dir), torch.device("cpu"), torch.float32)
    examples = common.load_task("arith", "train")[:4]
    prompts = [tok(common.format_prompt(tok, ex["question"], "arith"), add_special_tokens=False)["input_ids"]
               for ex in examples]
    prefixes = []  # per problem: the prompt alone, the gold solution minus its last digit, a wrong "#### 9"
    for i, ex in enumerate(examples):
        sol = ex["solution"]
        wrong = sol[:sol.index("####") + 5] + ("8" if ex["answer"].startswith("9") else "9")
        prefixes += [(i, ()), (i, tuple(tok(sol[:-1], add_special_tokens=False)["input_ids"])),
                     (i, tuple(tok(wrong, add_special_tokens=False)["input_ids"]))]
    return model, tok, prompts, [ex["answer"] for ex in examples], prefixes


def one_at_a_time(model, tok, prefix, prompt, answer, n, max_len, greedy, keys=None):
    """The slow reference: one boundary per generate call, written out without spo.py's helpers.
    keys: one random-stream key per continuation (sampling); greedy repeats the argmax row."""
    ids, mask = common.left_pad([prompt + list(prefix)] * (1 if greedy else n), tok.pad_token_id, "cpu")
    budget = max_len - len(prefix)
    out = common.generate(model, tok, ids, mask, budget, greedy=greedy, row_keys=keys)
    out = out.repeat(n, 1) if greedy else out
    rewards = []
    for row in out.tolist():
        row = row[:budget]
        if tok.eos_token_id not in row:
            rewards.append(0.0)  # unfinished
            continue
        text = tok.decode(list(prefix) + row[:row.index(tok.eos_token_id) + 1], skip_special_tokens=True)
        rewards.append(common.reward_fn([text], [answer])[0])
    return rewards


def test_mc_estimator_equals_one_at_a_time_under_greedy(warm):
    model, tok, prompts, answers, prefixes = warm
    got, _ = mc_rollout_rewards(model, tok, prefixes, prompts, answers, 3, 48, greedy=True, batch_size=512)
    for p, (pi, prefix) in enumerate(prefixes):
        assert got[p].tolist() == one_at_a_time(model, tok, prefix, prompts[pi], answers[pi], 3, 48, True)


@pytest.mark.parametrize("batch_size", [512, 40])
def test_mc_estimator_equals_one_at_a_time_when_sampling(warm, batch_size):
    """Each continuation has its own random stream (seed, prefix, j), so the batched estimator
    (12 prefixes x 16 rows in 1 call, or 5 calls of 2-3 prefixes) gives exactly the rewards of
    one generate call per prefix, sample for sample, whatever else shares the call."""
    model, tok, prompts, answers, prefixes = warm
    n, seed = 16, 7
    batched, _ = mc_rollout_rewards(model, tok, prefixes, prompts, answers, n, 48, batch_size=batch_size, seed=seed)
    ref = torch.tensor([one_at_a_time(model, tok, prefix, prompts[pi], answers[pi], n, 48, False,
                                      keys=[spo.mc_stream_key(seed, (pi, prefix), j) for j in range(n)])
                        for pi, prefix in prefixes])
    assert torch.equal(batched, ref)
    v = batched.mean(1)  # and the values make sense: near 1 after the gold prefix, near 0 after a wrong answer
    assert (v[1::3] > 0.8).all() and (v[2::3] < 0.2).all()
    other, _ = mc_rollout_rewards(model, tok, prefixes, prompts, answers, n, 48, batch_size=batch_size, seed=seed + 1)
    assert not torch.equal(other[0::3], batched[0::3])  # another seed, other samples (prompt-only prefixes vary)


def test_mc_estimator_sends_each_prefix_once_with_its_budget(warm, monkeypatch):
    model, tok, prompts, answers, _ = warm
    ids = T([[5, 6, 7, 1], [5, 6, 7, 1], [5, 6, 8, 1]])      # two identical responses to prompt 0
    prefixes, index = plan_mc_prefixes(ids, T([[0, 3], [0, 3], [0, 3]]), T([0, 0, 0]))
    assert len(prefixes) == 3 and index.tolist() == [[0, 1], [0, 1], [0, 2]]
    calls = []
    real = common.generate_continuations

    def spy(model, tok, rows, n, budgets, *a, **kw):
        calls.append((len(rows), n, budgets))
        return real(model, tok, rows, n, budgets, *a, **kw)

    monkeypatch.setattr(common, "generate_continuations", spy)
    rewards, tokens = mc_rollout_rewards(model, tok, prefixes, prompts, answers, 4, 10, batch_size=512)
    assert calls == [(3, 4, [10, 7, 7])] and rewards.shape == (3, 4)  # one call: 3 distinct prefixes x N = 4
    assert 0 < tokens <= 4 * (10 + 7 + 7)                             # budgets: 10 - prefix length
    calls.clear()
    mc_rollout_rewards(model, tok, prefixes, prompts, answers, 4, 10, batch_size=8)  # 2 prefixes per call
    assert [c[0] for c in calls] == [2, 1]


def test_grow_trees_structure(warm):
    model, tok, prompts, answers, _ = warm
    torch.manual_seed(0)
    trees, generated = spo.grow_trees(model, tok, prompts[:2], answers[:2], [3, 2, 2], 8, 30)
    for tree in trees:
        n = len(tree["parent"])
        children = {i: [j for j in range(n) if tree["parent"][j] == i] for i in range(n)}
        assert len(children[0]) == 3
        for i in range(1, n):
            assert tree["parent"][i] < i and tree["depth"][i] == tree["depth"][tree["parent"][i]] + 1
            if children[i]:  # expanded: exactly M tokens, no EOS, full branching
                assert len(tree["tokens"][i]) == 8 and not tree["finished"][i]
                assert len(children[i]) == (2 if tree["depth"][i] < 3 else 0)
            elif tree["finished"][i]:  # a leaf that ends in its EOS, graded on its whole path
                path = spo.tree_path_tokens(tree, i)
                assert path[-1] == tok.eos_token_id and len(path) == tree["length"][i] <= 30
                assert tree["reward"][i] == common.reward_fn([tok.decode(path, skip_special_tokens=True)],
                                                             [answers[trees.index(tree)]])[0]
            else:  # unfinished: the last level or the length limit, reward 0
                assert tree["reward"][i] == 0.0 and (tree["depth"][i] == 3 or tree["length"][i] == 30)
    assert generated == sum(len(t) for tree in trees for t in tree["tokens"])


# ---------------------------------------------------------------------- end to end


# seed 1: with seed 0 every tree of step 1 ties (from the shipped start), which trains nothing, a
# legitimate outcome, but not the one whose logging this test checks
RUN = ["--seed", "1", "--total-steps", "2", "--prompts-per-step", "3", "--num-generations", "4", "--eval-size", "4",
       "--eval-every", "1", "--log-completions-every", "1", "--num-rollouts", "3",
       "--tree-branching", "3,2,2", "--tree-segment-length", "12", "--tree-replay-per-question", "8"]
CHAIN_KEYS = ("spo/segments_per_response", "spo/cutpoints_per_response", "spo/mask_keep_frac", "spo/mc_rollouts",
              "spo/mc_tokens", "spo/mc_time_share", "spo/mc_dedup_saved", "spo/seg_adv_abs_mean", "spo/v_hat_std")
TREE_KEYS = ("spo/tree_nodes", "spo/early_leaf_frac", "spo/nonzero_segments", "spo/replay_size",
             "spo/replay_age_mean", "spo/mask_keep_frac", "spo/mc_tokens", "spo/mc_time_share")


@pytest.mark.parametrize("variant,keys", [("chain", CHAIN_KEYS), ("tree", TREE_KEYS)])
def test_two_steps_end_to_end(variant, keys, warm_tiny_model_dir, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, str(ROOT / "spo.py"), "--variant", variant, "--model", str(warm_tiny_model_dir),
                          "--output-dir", str(tmp_path), *RUN], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list(tmp_path.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward", "policy_loss", "grad_norm", "completions/mean_length", "eval/accuracy", "entropy") + keys:
        assert key in rows[1], key
    assert 0.0 < rows[1]["spo/mask_keep_frac"] < 1.0 and rows[1]["spo/mc_tokens"] > 0
    assert json.loads((run_dir / "config.json").read_text())["algo"] == "spo"
    assert (run_dir / "completions.jsonl").read_text().strip()
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-0000002")
    start = AutoModelForCausalLM.from_pretrained(warm_tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


def test_step_with_no_kept_token_is_skipped(random_tiny_model_dir, tmp_path):
    # rho = 0: no token has p < 0, so Z = 0: loss 0, no NaN, and no optimizer step at all
    common.run_main(spo.main, spo.Args, ["--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path),
                                         "--rho", "0", "--total-steps", "2", "--prompts-per-step", "2",
                                         "--num-generations", "2", "--max-completion-length", "6",
                                         "--eval-size", "2"])
    (run_dir,) = list(tmp_path.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")][1:]
    assert all(r["spo/skipped_step"] == 1.0 and r["policy_loss"] == 0.0 and r["spo/mc_rollouts"] == 0 for r in rows)
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-0000002")
    start = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


def test_bad_spo_flags(capsys, random_tiny_model_dir, tmp_path):
    m = ["--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path)]
    for argv, words in ((["--tree-branching", "6,x"], "--tree-branching must be"), (["--rho", "1.5"], "--rho is"),
                        (["--num-rollouts", "0"], "--num-rollouts must be positive")):
        with pytest.raises(SystemExit) as e:
            common.run_main(spo.main, spo.Args, m + argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
