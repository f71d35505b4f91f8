"""token_dpo.py: the losses on hand-computed examples (docs/token_dpo.md), plus end-to-end runs."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import common
import token_dpo as T
from common import UserError
from conftest import ROOT

LN2 = math.log(2.0)
BETA, ALPHA = 0.1, 0.5


# ------------------------------------------------------------------------------------ helpers


def gather_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids], fp32: [N, L, V], [N, L] -> [N, L] (the slow reference)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def random_masks(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[n, L] right-padded masks with lengths in [1, L]."""
    lens = torch.randint(1, length + 1, (n,), generator=gen)
    return (torch.arange(length)[None, :] < lens[:, None]).float()


def make_batch(n=3, length=5, vocab=11, seed=0, at_ref=False):
    """Random pairs. Policy logits are ONE leaf [2N, L, V] ([chosen; rejected]) so gradients can be
    compared; reference and guidance logits are fixed. Logits stand in for hidden states (head = identity)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(2 * n, length, vocab, generator=g)
    pol = ref.clone() if at_ref else ref + 0.5 * torch.randn(2 * n, length, vocab, generator=g)
    guid = ref + 0.7 * torch.randn(2 * n, length, vocab, generator=g)
    ids = torch.randint(0, vocab, (2 * n, length), generator=g)
    mask = random_masks(2 * n, length, g)
    return dict(policy=pol.requires_grad_(True), ref=ref, guidance=guid, ids=ids, mask=mask)


def loss_of(b, kind, alpha=ALPHA, guidance=None, reduction="mean"):
    """The training path: logits -> token_logps_and_kl -> split [chosen; rejected] -> loss."""
    lp, lq, kl = T.token_logps_and_kl(b["policy"], b["ref"], b["ids"], b["mask"], chunk_size=3)
    (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (t.chunk(2) for t in (lp, lq, b["mask"], kl))
    if kind == "dpo":
        return T.dpo_loss(pw, pl, rw, rl, mw, ml, BETA, reduction=reduction)
    if kind in ("tdpo1", "tdpo2"):
        return T.tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, BETA, alpha, version=int(kind[-1]), reduction=reduction)
    gw, gl = gather_logps(b["guidance"] if guidance is None else guidance, b["ids"]).chunk(2)
    return T.tgdpo_loss(pw, pl, rw, rl, gw, gl, mw, ml, BETA, alpha, reduction=reduction)


def grad_of(b, kind, **kw) -> torch.Tensor:
    b["policy"].grad = None
    loss_of(b, kind, **kw)[0].backward()
    g = b["policy"].grad.clone()
    b["policy"].grad = None
    return g


# ------------------------------------------------------------------- 5.1 at theta = theta_ref


@pytest.mark.parametrize("kind", ["dpo", "tdpo1", "tdpo2", "tgdpo"])
def test_every_loss_is_ln2_at_reference(kind):
    for seed in range(3):
        loss, m = loss_of(make_batch(seed=seed, at_ref=True), kind)
        assert abs(loss.item() - LN2) < 1e-6
        assert abs(m["rewards/margins"]) < 1e-6 and m["rewards/accuracies"] == 0.0


def test_tdpo_gradient_equals_dpo_gradient_at_reference():
    b = make_batch(seed=1, at_ref=True)
    g_dpo = grad_of(b, "dpo")
    assert g_dpo.abs().max() > 1e-4  # the DPO step itself is not zero
    for kind in ("tdpo1", "tdpo2"):
        torch.testing.assert_close(grad_of(b, kind), g_dpo, atol=1e-6, rtol=0)


def test_tgdpo_gradient_differs_at_reference_unless_rhat_zero():
    b = make_batch(seed=1, at_ref=True)
    g_dpo = grad_of(b, "dpo")
    assert (grad_of(b, "tgdpo") - g_dpo).abs().max() > 1e-6
    torch.testing.assert_close(grad_of(b, "tgdpo", guidance=b["ref"]), g_dpo, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------- 5.2 reductions


def test_tdpo2_alpha0_equals_dpo_value_and_gradient():
    b = make_batch(seed=2)
    assert abs(loss_of(b, "dpo")[0].item() - loss_of(b, "tdpo2", alpha=0.0)[0].item()) < 1e-7
    torch.testing.assert_close(grad_of(b, "tdpo2", alpha=0.0), grad_of(b, "dpo"), atol=1e-7, rtol=0)


def test_tdpo2_alpha1_has_tdpo1_value_but_other_gradient():
    b = make_batch(seed=3)
    assert abs(loss_of(b, "tdpo1")[0].item() - loss_of(b, "tdpo2", alpha=1.0)[0].item()) < 1e-7
    assert (grad_of(b, "tdpo1") - grad_of(b, "tdpo2", alpha=1.0)).abs().max() > 1e-5


@pytest.mark.parametrize("how", ["guidance_is_ref", "alpha0"])
def test_tgdpo_reduces_to_dpo(how):
    b = make_batch(seed=4)
    kw = dict(guidance=b["ref"]) if how == "guidance_is_ref" else dict(alpha=0.0)
    l_tg, m = loss_of(b, "tgdpo", **kw)
    assert abs(loss_of(b, "dpo")[0].item() - l_tg.item()) < 1e-7
    torch.testing.assert_close(grad_of(b, "tgdpo", **kw), grad_of(b, "dpo"), atol=1e-7, rtol=0)
    assert m["tgdpo/negative_weight_frac"] == 0.0


# -------------------------------------------------------------------------- 5.3 hand example


def hand_example():
    """V = {a, b, c}; chosen (a, a), rejected (b, c). Logits = log-probs, [2, 2, 3]. The hand values have 7
    digits and the math runs in fp32, hence a tolerance of 2e-7."""
    ln = lambda *p: torch.tensor(p).log()  # noqa: E731
    pol = torch.stack([torch.stack([ln(.5, .3, .2), ln(.6, .2, .2)]), torch.stack([ln(.5, .3, .2), ln(.1, .1, .8)])])
    ref = torch.stack([torch.stack([ln(.4, .4, .2), ln(.5, .25, .25)]), torch.stack([ln(.4, .4, .2), ln(.2, .2, .6)])])
    ids = torch.tensor([[0, 0], [1, 2]])
    guid = torch.tensor([[.6, .5], [.2, .6]]).log()  # guidance probabilities of the sampled tokens
    return pol, ref, ids, guid, torch.ones(2, 2)


def test_hand_example_kl():
    pol, ref, ids, guid, mask = hand_example()
    lp, lq, kl = T.token_logps_and_kl(pol, ref, ids, mask)
    torch.testing.assert_close(kl, torch.tensor([[0.0258154, 0.0204110], [0.0258154, 0.1046496]]), atol=2e-7, rtol=0)
    assert abs(kl[0].sum().item() - 0.0462264) < 2e-7 and abs(kl[1].sum().item() - 0.1304650) < 2e-7
    assert abs((lp - lq)[0].sum().item() - math.log(1.5)) < 2e-7 and abs((lp - lq)[1].sum().item()) < 2e-7


@pytest.mark.parametrize("kind,z,loss", [("dpo", 0.0405465, 0.6730794), ("tdpo1", 0.0321226, 0.6772148),
                                         ("tdpo2", 0.0363346, 0.6751449), ("tgdpo", 0.0419959, 0.6723697)])
def test_hand_example_table(kind, z, loss):
    pol, ref, ids, guid, mask = hand_example()
    lp, lq, kl = T.token_logps_and_kl(pol, ref, ids, mask)
    w, r = [t[:1] for t in (lp, lq, mask, kl, guid)], [t[1:] for t in (lp, lq, mask, kl, guid)]
    if kind == "dpo":
        out, m = T.dpo_loss(w[0], r[0], w[1], r[1], w[2], r[2], BETA)
    elif kind.startswith("tdpo"):
        out, m = T.tdpo_loss(w[0], r[0], w[1], r[1], w[2], r[2], w[3], r[3], BETA, ALPHA, version=int(kind[-1]))
    else:
        out, m = T.tgdpo_loss(w[0], r[0], w[1], r[1], w[4], r[4], w[2], r[2], BETA, ALPHA)
        assert abs(m["tgdpo/rhat_chosen_mean"] - 0.0405465 / 2) < 2e-7        # (0.0405465, 0) over 2 tokens
        assert abs(m["tgdpo/rhat_rejected_mean"] + 0.0693147 / 2) < 2e-7
    assert abs(m["z/mean"] - z) < 2e-7 and abs(out.item() - loss) < 2e-7
    for key, value in {"rewards/chosen": 0.0405465, "rewards/rejected": 0.0, "rewards/margins": 0.0405465,
                       "rewards/accuracies": 1.0, "logps/chosen": math.log(.5 * .6),
                       "logps/rejected": math.log(.3 * .8)}.items():
        assert abs(m[key] - value) < 2e-7, key
    if kind.startswith("tdpo"):
        assert abs(m["kl/chosen"] - 0.0462264) < 2e-7 and abs(m["kl/rejected"] - 0.1304650) < 2e-7
        assert abs(m["kl/margin"] - 0.0842386) < 2e-7
        assert abs(m["rewards_tdpo/chosen"] - 0.0451692) < 2e-7
        assert abs(m["rewards_tdpo/rejected"] - 0.0130465) < 2e-7


# ----------------------------------------------------------------------------------- 5.4 KL


def test_kl_matches_torch_kl_div_and_is_nonnegative():
    g = torch.Generator().manual_seed(5)
    pol, ref = 3 * torch.randn(4, 6, 50, generator=g), 3 * torch.randn(4, 6, 50, generator=g)
    _, _, ours = T.token_logps_and_kl(pol, ref, torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6))
    expected = F.kl_div(torch.log_softmax(pol, -1), torch.log_softmax(ref, -1), log_target=True,
                        reduction="none").sum(-1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert (ours >= -1e-6).all()


def test_kl_finite_when_a_probability_underflows_naive_form_is_nan():
    ref = torch.tensor([[[0.0, -200.0, 1.0]]])  # exp(-200) underflows to exactly 0 in fp32
    pol = torch.tensor([[[0.5, -1.0, 0.0]]], requires_grad=True)
    assert torch.softmax(ref, -1)[0, 0, 1] == 0.0
    _, _, kl = T.token_logps_and_kl(pol, ref, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
    assert torch.isfinite(kl).all() and kl.item() >= 0
    kl.sum().backward()
    assert torch.isfinite(pol.grad).all()
    q = torch.softmax(ref, -1)  # the TDPO repository's form: log 0 = -inf, then 0 * (-inf) = NaN
    assert torch.isnan((q * (q.log() - torch.log_softmax(pol.detach(), -1))).sum(-1)).all()


def test_kl_with_minus_inf_logits_is_finite():
    ref = torch.tensor([[[0.0, float("-inf"), 1.0]]])  # a masked vocabulary entry
    pol = torch.tensor([[[0.5, float("-inf"), 0.0]]], requires_grad=True)
    _, _, kl = T.token_logps_and_kl(pol, ref, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(pol.grad[..., [0, 2]]).all()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7])
def test_chunked_equals_unchunked_value_and_gradient(chunk_size):
    g = torch.Generator().manual_seed(6)
    pol = torch.randn(5, 4, 13, generator=g, requires_grad=True)
    ref = torch.randn(5, 4, 13, generator=g)
    ids = torch.randint(0, 13, (5, 4), generator=g)
    mask = random_masks(5, 4, g)
    w = torch.randn(5, 4, generator=g)  # a random upstream gradient

    def value_and_grad(cs):
        pol.grad = None
        lp, _, kl = T.token_logps_and_kl(pol, ref, ids, mask, chunk_size=cs)
        (kl * w).sum().backward()
        return kl.detach(), pol.grad.clone(), lp.detach()

    v_full, g_full, lp_full = value_and_grad(100)  # one chunk = unchunked
    v_c, g_c, lp_c = value_and_grad(chunk_size)
    torch.testing.assert_close(v_c, v_full, atol=1e-7, rtol=0)
    torch.testing.assert_close(g_c, g_full, atol=1e-7, rtol=0)
    torch.testing.assert_close(lp_c, lp_full, atol=0, rtol=0)
    # the closed form of the gradient: dKL_t/dlogits_t = (p - q) * m_t
    expected = (torch.softmax(pol.detach(), -1) - torch.softmax(ref, -1)) * (w * mask)[..., None]
    torch.testing.assert_close(g_c, expected, atol=1e-6, rtol=0)


def test_logps_from_the_kl_chunk_match_gather_and_are_zero_where_masked():
    b = make_batch(seed=7)
    lp, lq, kl = T.token_logps_and_kl(b["policy"], b["ref"], b["ids"], b["mask"], chunk_size=4)
    m = b["mask"] > 0
    torch.testing.assert_close(lp[m], gather_logps(b["policy"], b["ids"])[m])
    torch.testing.assert_close(lq[m], gather_logps(b["ref"], b["ids"])[m])
    assert (lp[~m] == 0).all() and (kl[~m] == 0).all() and not lq.requires_grad and lp.requires_grad


def test_lm_heads_are_applied_per_chunk_with_gradients_to_hidden_and_head():
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    ref_hidden = torch.randn(4, 5, 8, generator=g)
    head, ref_head = torch.nn.Linear(8, 30, bias=False), torch.nn.Linear(8, 30, bias=False)
    ids, mask = torch.randint(0, 30, (4, 5), generator=g), random_masks(4, 5, g)
    lp, lq, kl = T.token_logps_and_kl(hidden, ref_hidden, ids, mask, head, ref_head, chunk_size=3)
    (lp.sum() + kl.sum()).backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    assert ref_head.weight.grad is None  # the reference is frozen by construction
    hidden.grad, head.weight.grad = None, None
    lp2, lq2, kl2 = T.token_logps_and_kl(head(hidden), ref_head(ref_hidden), ids, mask, chunk_size=100)
    (lp2.sum() + kl2.sum()).backward()
    for a, b in ((lp, lp2), (lq, lq2), (kl, kl2), (grads[0], hidden.grad), (grads[1], head.weight.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_fp32_copy_of_the_whole_logits_is_kept_for_backward():
    n, length, vocab = 4, 6, 64
    pol = torch.randn(n, length, vocab).bfloat16().requires_grad_(True)
    ref = torch.randn(n, length, vocab).bfloat16()
    ids, mask = torch.zeros(n, length, dtype=torch.long), torch.ones(n, length)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, _, kl = T.token_logps_and_kl(pol, ref, ids, mask, chunk_size=6)
    assert [k for dt, k in saved if dt == torch.float32 and k > n * length] == []
    kl.sum().backward()  # recomputation inside the checkpoint works
    assert torch.isfinite(pol.grad.float()).all()
    saved.clear()  # the hook does see such copies in an unchunked computation
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        T._chunk_terms(pol.view(-1, vocab), ref.view(-1, vocab), ids.view(-1), lambda x: x, lambda x: x)
    assert any(dt == torch.float32 and k == n * length * vocab for dt, k in saved)


def test_negative_kl_raises(monkeypatch):
    """A KL below -1e-6 means a bug (say, the models' roles swapped in a hand-made KL): stop loudly."""
    monkeypatch.setattr(T, "_chunk_terms", lambda h, h_ref, ids, head, ref_head: (h[:, 0], h[:, 0], -h[:, 0] - 1.0))
    with pytest.raises(FloatingPointError, match="negative KL"):
        T.token_logps_and_kl(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long),
                             torch.ones(1, 1))


# -------------------------------------------------------------------------- 5.5 invariances


@pytest.mark.parametrize("kind", ["dpo", "tdpo1", "tdpo2", "tgdpo"])
def test_extra_padding_and_pair_order_leave_per_pair_losses_unchanged(kind):
    b = make_batch(n=4, seed=9)
    base, _ = loss_of(b, kind, reduction="none")  # [N]
    g = torch.Generator().manual_seed(1)
    pad = lambda t, fill: torch.cat([t, fill], 1)  # noqa: E731
    padded = dict(b, policy=pad(b["policy"].detach(), 50 * torch.randn(8, 3, 11, generator=g)).requires_grad_(),
                  ref=pad(b["ref"], 50 * torch.randn(8, 3, 11, generator=g)),
                  guidance=pad(b["guidance"], torch.randn(8, 3, 11, generator=g)),
                  ids=pad(b["ids"], torch.zeros(8, 3, dtype=torch.long)), mask=pad(b["mask"], torch.zeros(8, 3)))
    torch.testing.assert_close(loss_of(padded, kind, reduction="none")[0], base, atol=1e-6, rtol=0)
    perm = torch.tensor([2, 0, 3, 1])
    rows = torch.cat([perm, perm + 4])  # the same permutation on both halves
    shuffled = {k: v[rows] for k, v in b.items()}
    shuffled["policy"] = b["policy"].detach()[rows].requires_grad_()
    torch.testing.assert_close(loss_of(shuffled, kind, reduction="none")[0], base[perm], atol=1e-6, rtol=0)


def test_masked_garbage_nan_is_ignored():
    b = make_batch(n=2, seed=10)
    lp, lq, m = gather_logps(b["policy"], b["ids"]), gather_logps(b["ref"], b["ids"]), b["mask"]
    lp_bad = torch.where(m > 0, lp, torch.full_like(lp, float("nan")))
    a, _ = T.dpo_loss(*lp.chunk(2), *lq.chunk(2), *m.chunk(2))
    c, _ = T.dpo_loss(*lp_bad.chunk(2), *lq.chunk(2), *m.chunk(2))
    assert torch.isfinite(c) and abs(a.item() - c.item()) < 1e-7


def shared_prefix_case(k=2, tail=3, vocab=9, n=2, seed=11):
    """Chosen and rejected share their first k response tokens (same contexts, same logits).
    Returns run(kind, prefix_in_prompt) -> (loss, grads of [prefix, chosen tail, rejected tail])."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(n, k, vocab, generator=g, requires_grad=True)
    Tw = torch.randn(n, tail, vocab, generator=g, requires_grad=True)
    Tl = torch.randn(n, tail, vocab, generator=g, requires_grad=True)
    refP, refW, refL = (torch.randn(n, s, vocab, generator=g) for s in (k, tail, tail))
    S = torch.randint(0, vocab, (n, k), generator=g)
    Iw, Il = (torch.randint(0, vocab, (n, tail), generator=g) for _ in range(2))

    def run(kind, prefix_in_prompt):
        for p in (P, Tw, Tl):
            p.grad = None
        mask = torch.ones(2 * n, k + tail)
        if prefix_in_prompt:
            mask[:, :k] = 0.0  # the shared prefix is now part of the prompt
        ref = torch.cat([torch.cat([refP, refW], 1), torch.cat([refP, refL], 1)])
        b = dict(policy=torch.cat([torch.cat([P, Tw], 1), torch.cat([P, Tl], 1)]), ref=ref, guidance=ref,
                 ids=torch.cat([torch.cat([S, Iw], 1), torch.cat([S, Il], 1)]), mask=mask)
        loss, _ = loss_of(b, kind)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in (P, Tw, Tl)]

    return run


@pytest.mark.parametrize("kind", ["dpo", "tdpo1"])
def test_shared_prefix_cancels_in_value_and_gradient(kind):
    run = shared_prefix_case()
    (va, ga), (vb, gb) = run(kind, False), run(kind, True)
    assert abs(va - vb) < 1e-6
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_shared_prefix_tdpo2_cancels_in_value_only():
    run = shared_prefix_case()
    (va, ga), (vb, gb) = run("tdpo2", False), run("tdpo2", True)
    assert abs(va - vb) < 1e-6
    assert gb[0].abs().max() == 0  # prefix in the prompt: no gradient there
    assert ga[0].abs().max() > 1e-4  # the rejected copy keeps its KL gradient on the prefix


def test_shared_prefix_in_tgdpo_contributes_2_alpha_beta_rhat_rho():
    g = torch.Generator().manual_seed(13)
    k, L = 2, 5
    lp, lq, lg = (torch.randn(2, L, generator=g) for _ in range(3))  # [chosen; rejected] per-token log-probs
    for t in (lp, lq, lg):
        t[1, :k] = t[0, :k]  # the shared prefix: same tokens in the same contexts
    mask = torch.ones(2, L)
    in_prompt = mask.clone()
    in_prompt[:, :k] = 0.0

    def z(m):
        return T.tgdpo_loss(lp[:1], lp[1:], lq[:1], lq[1:], lg[:1], lg[1:], m[:1], m[1:], BETA, ALPHA)[1]["z/mean"]

    rhat, rho = BETA * (lg[0, :k] - lq[0, :k]), lp[0, :k] - lq[0, :k]
    assert abs((z(mask) - z(in_prompt)) - 2 * ALPHA * BETA * (rhat * rho).sum().item()) < 1e-6


# ------------------------------------------------------------------------- 5.6 pair builder


def group_data(rewards, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (len(rewards), length), generator=g)
    return torch.tensor(rewards, dtype=torch.float32), ids, random_masks(len(rewards), length, g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pair_builder_worked_example_and_skips():
    rewards, ids, mask = group_data([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0])
    pairs, stats = T.build_pairs(rewards, ids, mask, 4, 1, gen())
    assert [p[0] for p in pairs] == [0, 3]
    assert pairs[0][1] in (0, 3) and pairs[0][2] in (1, 2)
    assert pairs[1][1] == 13 and pairs[1][2] in (12, 14, 15)
    assert stats["pairs/built"] == 2
    assert stats["pairs/skipped_all_correct"] == 1 and stats["pairs/skipped_all_wrong"] == 1


def test_pair_builder_never_pairs_same_correctness_skips_unpairable_and_never_reuses():
    G = 6
    for seed in range(20):
        rewards = (torch.rand(8 * G, generator=gen(100 + seed)) < 0.4).float()
        _, ids, mask = group_data([0.0] * (8 * G), seed=seed)
        groups = rewards.view(-1, G)
        mixed = {i for i in range(8) if 0 < groups[i].sum() < G}
        for ppp in (1, 3, 10):
            pairs, stats = T.build_pairs(rewards, ids, mask, G, ppp, gen(seed))
            used = [i for _, c, w in pairs for i in (c, w)]
            assert len(used) == len(set(used))  # without reuse
            for grp, c, w in pairs:
                assert rewards[c] == 1.0 and rewards[w] == 0.0  # never two correct, never two wrong
                assert c // G == grp and w // G == grp
            assert {p[0] for p in pairs} == mixed  # all-correct and all-wrong prompts are skipped
            assert stats["pairs/skipped_all_correct"] + stats["pairs/skipped_all_wrong"] == 8 - len(mixed)
            expected = sum(min(ppp, int(r.sum()), G - int(r.sum())) for r in groups if 0 < r.sum() < G)
            assert stats["pairs/built"] == expected


def test_pair_builder_skips_token_identical_pairs():
    rewards, ids, mask = group_data([1, 0, 0, 0])
    for i in (1, 2, 3):
        ids[i], mask[i] = ids[0], mask[0]
    ids[1, int(mask[0].sum()):] = 7  # garbage after the end does not make them different
    pairs, stats = T.build_pairs(rewards, ids, mask, 4, 3, gen(1))
    assert pairs == [] and stats["pairs/skipped_identical"] == 1  # 1 correct -> 1 candidate pair


def test_pair_builder_is_deterministic_given_a_generator():
    rewards = (torch.rand(40, generator=gen(3)) < 0.5).float()
    _, ids, mask = group_data([0.0] * 40)
    assert T.build_pairs(rewards, ids, mask, 8, 1, gen(42)) == T.build_pairs(rewards, ids, mask, 8, 1, gen(42))
    assert len({tuple(T.build_pairs(rewards, ids, mask, 8, 1, gen(s))[0]) for s in range(10)}) > 1


def test_pair_stats_first_diff_and_lengths():
    stats = T.pair_stats([{"prompt": [1], "chosen": [5, 6, 7, 2], "rejected": [5, 6, 9]},
                          {"prompt": [1], "chosen": [5, 2], "rejected": [5, 6, 9, 9]}])
    assert stats == {"pairs/len_chosen": 3.0, "pairs/len_rejected": 3.5, "pairs/first_diff_pos": 1.5}
    assert T.pair_stats([]) == {}


def test_collate_pairs_stacks_chosen_then_rejected_with_masks_from_lengths():
    pad = eos = 1  # pad == EOS: a mask from ids != pad would drop the EOS
    pairs = [{"prompt": [7, 8], "chosen": [5, eos], "rejected": [6, 6, 6]}, {"prompt": [9], "chosen": [4], "rejected": [3, eos]}]
    p_ids, p_mask, c_ids, c_mask = common.collate_pairs(pairs, pad, "cpu")
    assert p_ids.tolist() == [[7, 8], [pad, 9], [7, 8], [pad, 9]] and p_mask.tolist() == [[1, 1], [0, 1]] * 2
    assert c_ids.tolist() == [[5, eos, pad], [4, pad, pad], [6, 6, 6], [3, eos, pad]]
    assert c_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]


def test_hidden_state_path_matches_common_per_token_logps(random_tiny_model_dir):
    """The body + chunked head reproduces the model's own log-probs at T = 1 (the position shift)."""
    model = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir).eval()
    pairs = [{"prompt": [10, 11, 12], "chosen": [20, 21, 1], "rejected": [22]},
             {"prompt": [13], "chosen": [23, 24], "rejected": [25, 26, 27, 1]}]
    batch = common.collate_pairs(pairs, 0, "cpu")
    with torch.no_grad():
        hidden = common.response_hidden_states(model, *batch)
        lp, lq, kl = T.token_logps_and_kl(hidden, hidden, batch[2], batch[3], model.lm_head, model.lm_head, 2)
        expected, _ = common.per_token_logps(model, *batch, 1.0)
    torch.testing.assert_close(lp * batch[3], expected * batch[3], atol=1e-5, rtol=0)
    assert kl.abs().max() < 1e-6  # the same model on both sides


# ----------------------------------------------------------------------------- 5.6 JSONL


def write(tmp_path, *lines):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_jsonl_reads_valid_rows(tmp_path):
    p = write(tmp_path, '{"prompt": "2+2", "chosen": "4", "rejected": "5", "id": 1}', "",
              '{"prompt": "3+3", "chosen": "6", "rejected": "7"}')
    assert common.read_preference_jsonl(str(p)) == [{"prompt": "2+2", "chosen": "4", "rejected": "5"},
                                               {"prompt": "3+3", "chosen": "6", "rejected": "7"}]


@pytest.mark.parametrize("bad_line,message", [
    ('{"prompt": "2+2", "chosen": "4"}', r"pairs\.jsonl:2: 'rejected' is missing; each line must be"),
    ('{"chosen": "4", "rejected": "5"}', r"pairs\.jsonl:2: 'prompt' is missing"),
    ('{"prompt": "2+2", "chosen": "4", "rejected": 5}', r":2: 'rejected' is not a non-empty string"),
    ('{"prompt": "2+2", "chosen": "  ", "rejected": "5"}', r":2: 'chosen' is not a non-empty string"),
    ('{"prompt": "2+2", "chosen": "4", "rejected": "4"}', r":2: 'chosen' equals 'rejected'.*drop the line"),
    ('{"prompt": "2+2", "chosen": "4" "rejected": "5"}', r":2: not valid JSON"),
    ('["2+2", "4", "5"]', r":2: expected a JSON object, got list"),
])
def test_jsonl_rejects_malformed_rows_with_line_number_and_fix(tmp_path, bad_line, message):
    p = write(tmp_path, '{"prompt": "1+1", "chosen": "2", "rejected": "3"}', bad_line)
    with pytest.raises(UserError, match=message) as e:
        common.read_preference_jsonl(str(p))
    assert "\n" not in str(e.value)


def test_jsonl_rejects_an_empty_or_missing_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no pairs"):
        common.read_preference_jsonl(str(p))
    with pytest.raises(UserError, match="--pairs-file .* does not exist"):
        common.read_preference_jsonl(str(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------- end to end

TINY_RUN = ["--total-steps", "2", "--pairs-per-step", "2", "--num-generations", "2", "--eval-size", "4",
            "--max-completion-length", "8", "--eval-every", "1", "--prompts-per-round", "2",
            "--epochs-per-round", "1", "--log-completions-every", "1"]


def pairs_file(tmp_path, n=2):
    """Arithmetic pairs: the gold solution vs the same solution with a wrong final number."""
    rows = []
    for ex in common.arith_dataset("train")[:n]:
        wrong = ex["solution"].rsplit("#### ", 1)[0] + f"#### {int(ex['answer']) + 1}"
        rows.append(json.dumps({"prompt": ex["question"], "chosen": ex["solution"], "rejected": wrong}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def params_changed(run_dir, start_dir, step=2):
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"step-{step:07d}")
    start = AutoModelForCausalLM.from_pretrained(start_dir)
    return any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


@pytest.mark.parametrize("loss", ["dpo", "tdpo1", "tdpo2", "tgdpo"])
def test_two_steps_end_to_end_with_a_pairs_file(loss, random_tiny_model_dir, tmp_path):
    path = pairs_file(tmp_path)
    out_dir = tmp_path / "runs"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # 2 pairs, 2 per step, 1 epoch: each step is a round, so TGDPO's step 2 is guided by step 1's policy
    out = subprocess.run([sys.executable, str(ROOT / "token_dpo.py"), "--model", str(random_tiny_model_dir),
                          "--output-dir", str(out_dir), "--loss", loss, "--pairs-file", str(path), *TINY_RUN],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list(out_dir.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected", "grad_norm", "eval/accuracy",
                "pairs/built", "round"):
        assert key in rows[1] and key in rows[2], key
    assert abs(rows[1]["loss"] - LN2) < 1e-5  # step 1: policy = reference
    assert ("tgdpo/rhat_chosen_mean" in rows[2]) == (loss == "tgdpo")
    assert "tgdpo/rhat_chosen_mean" not in rows[1]  # TGDPO's first round is DPO
    assert (run_dir / "guidance").exists() == (loss == "tgdpo")
    assert json.loads((run_dir / "config.json").read_text())["algo"] == "token_dpo"
    assert params_changed(run_dir, random_tiny_model_dir)
    assert "held-out greedy accuracy" in out.stdout


def run_in_process(monkeypatch, tmp_path, model_dir, reward, extra=()):
    """main() on freshly sampled pairs, with a stand-in verifier (a random model is never right)."""
    monkeypatch.setattr(common, "reward_fn", lambda texts, answers: [reward(i) for i in range(len(texts))])
    # a random model rarely emits EOS; count every sample as finished so that `reward` decides
    monkeypatch.setattr(common, "finished_rewards", lambda texts, answers, ids, eos: torch.tensor(common.reward_fn(texts, answers)))
    out_dir = tmp_path / "runs"
    common.run_main(T.main, T.Args, ["--model", str(model_dir), "--output-dir", str(out_dir), *TINY_RUN,
                                     "--save-every", "1", *extra])
    (run_dir,) = list(out_dir.iterdir())
    return run_dir, [json.loads(l) for l in open(run_dir / "metrics.jsonl")]


def test_on_policy_rounds_with_and_without_pairs(monkeypatch, tmp_path, random_tiny_model_dir):
    # every answer wrong: each round finds no pair, logs it, trains nothing, and the run goes on
    run_dir, rows = run_in_process(monkeypatch, tmp_path / "a", random_tiny_model_dir, lambda i: 0.0)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["round"] for r in rows[1:]] == [1, 2]
    assert all(r["pairs/built"] == 0 and r["pairs/skipped_all_wrong"] == 2 and "loss" not in r for r in rows[1:])
    assert not params_changed(run_dir, random_tiny_model_dir)
    # alternate right/wrong: every prompt gives a pair, sampled from the policy itself
    run_dir, rows = run_in_process(monkeypatch, tmp_path / "b", random_tiny_model_dir, lambda i: float(i % 2 == 0),
                                   ["--loss", "tdpo2"])
    assert all(r["pairs/built"] == 2 and r["num_pairs"] == 2 for r in rows[1:])
    for key in ("reward", "round/seq_kl_to_ref", "entropy", "pairs/len_chosen", "pairs/first_diff_pos", "kl/margin"):
        assert key in rows[2], key
    assert abs(rows[1]["round/seq_kl_to_ref"]) < 1e-5 and rows[2]["round/seq_kl_to_ref"] != 0.0
    assert params_changed(run_dir, random_tiny_model_dir)
    assert (run_dir / "completions.jsonl").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=False)["state"]["rounds"]
    assert state["round"] == 2 and len(state["pairs"]) == 2 and state["queue"] == []


def test_resume_mid_round_gives_the_same_model(tmp_path, random_tiny_model_dir):
    """The round (its pairs and the batches left) lives in Rounds, saved in every checkpoint."""
    path = pairs_file(tmp_path, n=4)
    base = ["--model", str(random_tiny_model_dir), "--pairs-file", str(path), *TINY_RUN, "--epochs-per-round", "2",
            "--eval-every", "100", "--save-every", "1"]
    common.run_main(T.main, T.Args, base + ["--output-dir", str(tmp_path / "a"), "--total-steps", "3"])
    common.run_main(T.main, T.Args, base + ["--output-dir", str(tmp_path / "b"), "--total-steps", "1"])
    (run_b,) = list((tmp_path / "b").iterdir())
    state = torch.load(run_b / "checkpoints" / "step-0000001" / "trainer_state.pt", weights_only=False)["state"]["rounds"]
    assert state["round"] == 1 and len(state["pairs"]) == 4 and len(state["queue"]) == 3  # 4 batches, 1 used
    common.run_main(T.main, T.Args, base + ["--output-dir", str(tmp_path / "b"), "--total-steps", "3",
                                            "--resume", str(run_b)])
    (run_a,) = list((tmp_path / "a").iterdir())
    a = AutoModelForCausalLM.from_pretrained(run_a / "checkpoints" / "step-0000003")
    b = AutoModelForCausalLM.from_pretrained(run_b / "checkpoints" / "step-0000003")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert [json.loads(l)["step"] for l in open(run_b / "metrics.jsonl")] == [0, 1, 2, 3]


def test_bad_pairs_file_is_one_line_exit_2(capsys, tmp_path, random_tiny_model_dir):
    bad = write(tmp_path, '{"prompt": "1+1", "chosen": "2"}')
    with pytest.raises(SystemExit) as e:
        common.run_main(T.main, T.Args, ["--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path),
                                         "--pairs-file", str(bad)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and line.startswith("error: ") and "pairs.jsonl:1: 'rejected' is missing" in line
