"""cDPO (token_dpo.py --loss cdpo): the contrastive weights, the loss, the data selection and
the rounds. Hand-computed numbers and brute-force references; tiny models, tiny sizes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
import token_dpo as T
from conftest import ROOT

LN2 = math.log(2.0)
BETA = 0.1


def ln(*p):
    return torch.tensor(p, dtype=torch.float64).log()


def logps_of(logits, ids):
    """log softmax(logits)[ids]: [N, L, V], [N, L] -> [N, L] (same dtype)."""
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------- the hand example
# V = {a, b, c}; chosen (a, a), rejected (b, c); policy/reference as in test_token_dpo.py, plus
# positive and negative models at the two rejected positions. Everything in fp64.


def hand(at_ref=False):
    pol_w, ref_w = torch.stack([ln(0.5, 0.3, 0.2), ln(0.6, 0.2, 0.2)]), torch.stack(
        [ln(0.4, 0.4, 0.2), ln(0.5, 0.25, 0.25)]
    )
    pol_l, ref_l = torch.stack([ln(0.5, 0.3, 0.2), ln(0.1, 0.1, 0.8)]), torch.stack(
        [ln(0.4, 0.4, 0.2), ln(0.2, 0.2, 0.6)]
    )
    if at_ref:
        pol_w, pol_l = ref_w.clone(), ref_l.clone()
    pos = (
        torch.stack([ln(0.6, 0.2, 0.2), ln(0.2, 0.2, 0.6)])[None] + 5.0
    )  # arbitrary per-model shifts
    neg = torch.stack([ln(0.3, 0.5, 0.2), ln(0.1, 0.1, 0.8)])[None] - 2.0
    return dict(
        pol_w=pol_w[None].requires_grad_(),
        pol_l=pol_l[None].requires_grad_(),
        ref_w=ref_w[None],
        ref_l=ref_l[None],
        ids_w=torch.tensor([[0, 0]]),
        ids_l=torch.tensor([[1, 2]]),
        pos=pos,
        neg=neg,
        mask=torch.ones(1, 2, dtype=torch.float64),
    )


def hand_loss(h, weights, kind="cdpo"):
    pw, pl = logps_of(h["pol_w"], h["ids_w"]), logps_of(h["pol_l"], h["ids_l"])
    rw, rl = logps_of(h["ref_w"], h["ids_w"]), logps_of(h["ref_l"], h["ids_l"])
    if kind == "dpo":
        return T.dpo_loss(pw, pl, rw, rl, h["mask"], h["mask"], BETA)
    return T.cdpo_loss(pw, pl, rw, rl, h["mask"], h["mask"], weights, BETA)


def test_hand_example_weights_and_shift_invariance():
    h = hand()
    w = T.cdpo_weights(h["pos"], h["neg"], h["ids_l"], h["mask"])
    torch.testing.assert_close(
        w, torch.tensor([[0.9459459, 0.64]], dtype=torch.float64), atol=1e-6, rtol=0
    )
    w_unshifted = T.cdpo_weights(h["pos"] - 5.0, h["neg"] + 2.0, h["ids_l"], h["mask"])
    torch.testing.assert_close(w, w_unshifted, atol=1e-12, rtol=0)
    c = lambda lam, pos=h["pos"], neg=h["neg"]: 1 - T.cdpo_weights(
        pos, neg, h["ids_l"], h["mask"], lam
    )  # noqa
    torch.testing.assert_close(
        c(0.0), torch.tensor([[0.2, 0.6]], dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        c(2.0), torch.tensor([[0.0121581, 0.1741935]], dtype=torch.float64), atol=1e-6, rtol=0
    )
    ref = h["ref_l"]  # pi_p = pi_n = pi_ref: c = pi_ref(y_t)
    torch.testing.assert_close(
        c(1.0, ref, ref), torch.tensor([[0.4, 0.6]], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_hand_example_loss_is_the_papers_not_the_official_per_position_form():
    h = hand()
    w = T.cdpo_weights(h["pos"], h["neg"], h["ids_l"], h["mask"])
    loss, m = hand_loss(h, w)
    assert abs(m["cdpo/weighted_rewards_rejected"] - BETA * -0.0880152) < 1e-7
    assert abs(m["z/mean"] - 0.0493480) < 1e-6 and abs(loss.item() - 0.6687775) < 1e-6
    assert (
        abs(m["rewards/rejected"]) < 1e-6 and abs(m["rewards/chosen"] - 0.0405465) < 1e-6
    )  # unweighted
    dpo, md = hand_loss(h, None, "dpo")
    assert abs(md["z/mean"] - 0.0405465) < 1e-6 and abs(dpo.item() - 0.6730794) < 1e-6
    # the official code's form: one softplus per label position (chosen j vs rejected j), mean
    rho_w = (logps_of(h["pol_w"], h["ids_w"]) - logps_of(h["ref_w"], h["ids_w"])).detach()[0]
    rho_l = (logps_of(h["pol_l"], h["ids_l"]) - logps_of(h["ref_l"], h["ids_l"])).detach()[0]
    z_code = BETA * (rho_w - w[0] * rho_l)
    torch.testing.assert_close(
        z_code, torch.tensor([0.0495275, -0.0001795], dtype=torch.float64), atol=1e-7, rtol=0
    )
    code = F.softplus(-z_code).mean().item()
    assert abs(code - 0.6809635) < 1e-6
    assert abs(loss.item() - code) > 1e-2  # we must not produce the per-position number


def test_hand_example_gradients():
    h = hand()
    w = T.cdpo_weights(h["pos"], h["neg"], h["ids_l"], h["mask"])
    pw, pl = logps_of(h["pol_w"], h["ids_w"]), logps_of(h["pol_l"], h["ids_l"])
    pw.retain_grad(), pl.retain_grad()
    rw, rl = logps_of(h["ref_w"], h["ids_w"]), logps_of(h["ref_l"], h["ids_l"])
    loss, _ = T.cdpo_loss(pw, pl, rw, rl, h["mask"], h["mask"], w, BETA)
    loss.backward()
    torch.testing.assert_close(
        pw.grad, torch.full((1, 2), -0.0487665, dtype=torch.float64), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(
        pl.grad, torch.tensor([[0.0461305, 0.0312106]], dtype=torch.float64), atol=1e-7, rtol=0
    )
    expect = torch.tensor(
        [[-0.0230653, 0.0322914, -0.0092261], [-0.0031211, -0.0031211, 0.0062421]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(h["pol_l"].grad[0], expect, atol=1e-7, rtol=0)


def test_hand_example_at_reference_is_ln2_and_dpo_gradient_times_w():
    h, hd = hand(at_ref=True), hand(at_ref=True)
    w = T.cdpo_weights(h["pos"], h["neg"], h["ids_l"], h["mask"])
    loss, _ = hand_loss(h, w)
    assert abs(loss.item() - LN2) < 1e-12
    loss.backward()
    expect = torch.tensor(
        [[-0.0189189, 0.0283784, -0.0094595], [-0.0064, -0.0064, 0.0128]], dtype=torch.float64
    )
    torch.testing.assert_close(h["pol_l"].grad[0], expect, atol=1e-7, rtol=0)
    hand_loss(hd, None, "dpo")[0].backward()
    torch.testing.assert_close(
        h["pol_l"].grad[0], hd["pol_l"].grad[0] * w[0][:, None], atol=1e-12, rtol=0
    )


# ------------------------------------------------------------------------- contrastive score


def random_ce(n=3, length=5, vocab=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, length, vocab, generator=g, dtype=dtype) * 2
    neg = torch.randn(n, length, vocab, generator=g, dtype=dtype) * 2
    ids = torch.randint(0, vocab, (n, length), generator=g)
    lens = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lens[:, None]).to(dtype)
    return pos, neg, ids, mask


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_score_equals_the_probability_form_and_sums_to_one(lam):
    pos, neg, ids, mask = random_ce(seed=1)
    pp, pn = pos.softmax(-1), neg.softmax(-1)
    direct = pp ** (1 + lam) * pn ** (-lam)
    direct = direct / direct.sum(-1, keepdim=True)  # [N, L, V]
    c = 1 - T.cdpo_weights(pos, neg, ids, mask, lam)
    expect = torch.where(mask > 0, direct.gather(-1, ids[..., None]).squeeze(-1), 1.0)
    torch.testing.assert_close(c, expect, atol=1e-10, rtol=0)
    total = sum(
        1 - T.cdpo_weights(pos, neg, torch.full_like(ids, v), torch.ones_like(mask), lam)
        for v in range(pos.size(-1))
    )  # sum over the vocabulary
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-10, rtol=0)


def test_score_is_invariant_to_per_position_logit_shifts():
    pos, neg, ids, mask = random_ce(seed=2)
    g = torch.Generator().manual_seed(0)
    shift = (
        lambda x: x + 30 * torch.randn(x.shape[:-1], generator=g, dtype=x.dtype)[..., None]
    )  # noqa: E731
    torch.testing.assert_close(
        T.cdpo_weights(shift(pos), shift(neg), ids, mask),
        T.cdpo_weights(pos, neg, ids, mask),
        atol=1e-10,
        rtol=0,
    )


def test_large_logit_gaps_are_finite_in_fp32_and_weights_in_0_1():
    pos, neg, ids, mask = random_ce(seed=3, dtype=torch.float32)
    pos[..., 0] += 200.0
    neg[..., 1] -= 200.0  # pi_n underflows to 0 in fp32: P_n^-1 would overflow in probability space
    w = T.cdpo_weights(pos, neg, ids, mask, 1.0)
    assert torch.isfinite(w).all() and w.min() >= 0 and w.max() <= 1
    assert (w[mask == 0] == 0).all()
    naive = pos.softmax(-1) ** 2 / neg.softmax(-1)
    assert not torch.isfinite(naive).all()  # the form we avoid does overflow on this input


def test_minus_inf_logit_in_the_negative_model_is_refused():
    pos, neg, ids, mask = random_ce(seed=4)
    neg[0, 0, 3] = float("-inf")
    with pytest.raises(FloatingPointError, match="-inf logit"):
        T.cdpo_weights(pos, neg, ids, torch.ones_like(mask), 1.0)
    T.cdpo_weights(pos, neg, ids, torch.ones_like(mask), 0.0)  # lam = 0 never looks at pi_n


def test_chunked_with_heads_equals_unchunked_and_never_sees_more_than_a_chunk(monkeypatch):
    g = torch.Generator().manual_seed(5)
    hp, hn = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    head_p, head_n = torch.nn.Linear(8, 13, bias=False), torch.nn.Linear(8, 13, bias=False)
    ids, mask = torch.randint(0, 13, (3, 6), generator=g), torch.ones(3, 6)
    mask[1, 4:] = 0
    with torch.no_grad():
        full = T.cdpo_weights(head_p(hp), head_n(hn), ids, mask, chunk_size=1000)
    rows, real = [], T._ce_chunk
    monkeypatch.setattr(
        T, "_ce_chunk", lambda a, b, *rest: rows.append(a.shape[0]) or real(a, b, *rest)
    )
    chunked = T.cdpo_weights(hp, hn, ids, mask, pos_head=head_p, neg_head=head_n, chunk_size=4)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert rows == [4, 4, 4, 4] and sum(rows) == int(
        mask.sum()
    )  # response positions only, 4 at a time


# ---------------------------------------------------------------------------------- reductions


def random_pairs(n=4, length=5, vocab=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(2 * n, length, vocab, generator=g, dtype=torch.float64)
    pol = (
        ref + 0.5 * torch.randn(2 * n, length, vocab, generator=g, dtype=torch.float64)
    ).requires_grad_()
    ids = torch.randint(0, vocab, (2 * n, length), generator=g)
    lens = torch.randint(1, length + 1, (2 * n,), generator=g)
    mask = (torch.arange(length)[None] < lens[:, None]).double()
    w = torch.rand(n, length, generator=g, dtype=torch.float64)
    return pol, ref, ids, mask, w


def loss_and_grad(pol, ref, ids, mask, w, kind, reduction="mean"):
    pol.grad = None
    lp, lq = logps_of(pol, ids), logps_of(ref, ids)
    (pw, pl), (rw, rl), (mw, ml) = lp.chunk(2), lq.chunk(2), mask.chunk(2)
    if kind == "dpo":
        loss, m = T.dpo_loss(pw, pl, rw, rl, mw, ml, BETA, reduction=reduction)
    else:
        loss, m = T.cdpo_loss(pw, pl, rw, rl, mw, ml, w, BETA, reduction=reduction)
    loss.sum().backward()
    return loss.detach(), pol.grad.clone(), m


def test_weights_one_equal_dpo_in_value_and_gradient():
    pol, ref, ids, mask, w = random_pairs(seed=1)
    l_c, g_c, _ = loss_and_grad(pol, ref, ids, mask, torch.ones_like(w), "cdpo")
    l_d, g_d, _ = loss_and_grad(pol, ref, ids, mask, None, "dpo")
    assert abs(l_c.item() - l_d.item()) < 1e-6 and g_d.abs().max() > 1e-4
    torch.testing.assert_close(g_c, g_d, atol=1e-6, rtol=0)


def test_any_weights_at_reference_give_ln2():
    pol, ref, ids, mask, w = random_pairs(seed=2)
    pol = ref.clone().requires_grad_()
    assert abs(loss_and_grad(pol, ref, ids, mask, w, "cdpo")[0].item() - LN2) < 1e-12


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_equal_contrastive_models_give_their_own_probability(lam):
    pos, _, ids, mask = random_ce(seed=6)
    c = 1 - T.cdpo_weights(pos, pos.clone(), ids, mask, lam)
    torch.testing.assert_close(
        c, torch.where(mask > 0, logps_of(pos, ids).exp(), 1.0), atol=1e-10, rtol=0
    )


def test_lambda0_gives_the_positive_models_probability():
    pos, neg, ids, mask = random_ce(seed=7)
    c = 1 - T.cdpo_weights(pos, neg, ids, mask, 0.0)
    torch.testing.assert_close(
        c, torch.where(mask > 0, logps_of(pos, ids).exp(), 1.0), atol=1e-10, rtol=0
    )


def test_nan_at_masked_positions_does_not_leak():
    pol, ref, ids, mask, w = random_pairs(seed=3)
    base, g_base, _ = loss_and_grad(pol, ref, ids, mask, w, "cdpo", reduction="none")
    ml = mask.chunk(2)[1]
    w_nan = torch.where(ml > 0, w, float("nan"))
    out, g_out, _ = loss_and_grad(pol, ref, ids, mask, w_nan, "cdpo", reduction="none")
    assert torch.isfinite(out).all() and torch.equal(out, base) and torch.equal(g_out, g_base)


# --------------------------------------------------------------------------------- invariances


def test_extra_padding_and_pair_order_leave_weights_and_losses_unchanged():
    pol, ref, ids, mask, _ = random_pairs(seed=4)
    pos, neg = ref + 0.3, ref.flip(-1)
    w = T.cdpo_weights(pos, neg, ids, mask).chunk(2)[1]  # rejected half [N, L]
    base, _, _ = loss_and_grad(pol, ref, ids, mask, w, "cdpo", reduction="none")
    g = torch.Generator().manual_seed(1)
    pad = lambda t, fill: torch.cat([t, fill], 1)  # noqa: E731
    junk = lambda: 50 * torch.randn(8, 3, 9, generator=g, dtype=torch.float64)  # noqa: E731
    ids_p, mask_p = pad(ids, torch.zeros(8, 3, dtype=torch.long)), pad(
        mask, torch.zeros(8, 3, dtype=torch.float64)
    )
    w_p = T.cdpo_weights(pad(pos, junk()), pad(neg, junk()), ids_p, mask_p).chunk(2)[1]
    torch.testing.assert_close(w_p[:, :5], w, atol=1e-12, rtol=0)
    assert (w_p[:, 5:] == 0).all()
    pol_p = pad(pol.detach(), junk()).requires_grad_()
    padded, _, _ = loss_and_grad(
        pol_p, pad(ref, junk()), ids_p, mask_p, w_p, "cdpo", reduction="none"
    )
    torch.testing.assert_close(padded, base, atol=1e-12, rtol=0)
    perm = torch.tensor([2, 0, 3, 1])
    rows = torch.cat([perm, perm + 4])
    shuffled, _, _ = loss_and_grad(
        pol.detach()[rows].requires_grad_(),
        ref[rows],
        ids[rows],
        mask[rows],
        w[perm],
        "cdpo",
        reduction="none",
    )
    torch.testing.assert_close(shuffled, base[perm], atol=1e-12, rtol=0)


def test_moving_a_shared_prefix_into_the_prompt_changes_z_by_beta_sum_c_rho():
    """Both answers share their first k tokens (same ids and contexts, so the same logits)."""
    k, length, vocab = 2, 5, 9
    pol, ref, ids, _, _ = random_pairs(n=1, length=length, vocab=vocab, seed=5)
    pos, neg = ref + 0.3 * torch.randn_like(ref), ref.flip(-1)
    share = lambda x: torch.cat([x[:1], torch.cat([x[:1, :k], x[1:, k:]], 1)])  # noqa: E731
    pol, ref, ids, pos, neg = (
        share(pol.detach()).requires_grad_(),
        share(ref),
        share(ids),
        share(pos),
        share(neg),
    )
    mask = torch.ones(2, length, dtype=torch.float64)
    w = T.cdpo_weights(pos, neg, ids, mask).chunk(2)[1]
    z_full = loss_and_grad(pol, ref, ids, mask, w, "cdpo")[2]["z/mean"]
    tail = lambda x: x[:, k:]  # noqa: E731  (the prefix now belongs to the prompt)
    z_moved = loss_and_grad(
        tail(pol.detach()).requires_grad_(), tail(ref), tail(ids), tail(mask), tail(w), "cdpo"
    )[2]["z/mean"]
    rho = (logps_of(pol, ids) - logps_of(ref, ids)).detach()[1, :k]
    c = 1 - w[0, :k]
    assert abs((z_moved - z_full) - (-BETA * (c * rho).sum().item())) < 1e-12
    assert abs((c * rho).sum().item()) > 1e-4  # the identity is not 0 = 0
    d_full = loss_and_grad(pol, ref, ids, mask, None, "dpo")[2]["z/mean"]
    d_moved = loss_and_grad(
        tail(pol.detach()).requires_grad_(), tail(ref), tail(ids), tail(mask), None, "dpo"
    )[2]["z/mean"]
    assert abs(d_full - d_moved) < 1e-12


# ------------------------------------------- the round: models, scoring, EOS and truncation


def tiny_models(model_dir):
    model, tok = common.load_model_and_tokenizer(str(model_dir), torch.device("cpu"), torch.float32)
    ref = common.load_frozen(str(model_dir), torch.device("cpu"), torch.float32)
    return model, ref, tok


def round_args(**kw):
    base = dict(
        seed=0,
        ce_sft_steps=2,
        ce_sft_rows=4,
        ce_sft_lr=3e-4,
        ce_beta=1.0,
        micro_batch_size=4,
        kl_chunk_size=5,
    )
    return SimpleNamespace(**{**base, **kw})


def some_pairs(tok, finished=True):
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    for ex in common.arith_dataset("train")[:3]:
        prompt = enc(common.format_prompt(tok, ex["question"], "arith"))
        wrong = enc(ex["solution"][:-1] + "7")
        out.append(
            {
                "prompt": prompt,
                "chosen": enc(ex["solution"]) + [eos],
                "rejected": wrong + [eos] if finished else wrong,
            }
        )
    return out


def brute_weights(pos_model, neg_model, pair, lam=1.0):
    """1 - softmax((1+lam) log pi_p - lam log pi_n)[y_t], from one unpadded forward per model."""
    ids = torch.tensor([pair["prompt"] + pair["rejected"]])
    P = len(pair["prompt"])
    with torch.no_grad():
        lp = torch.log_softmax(pos_model(input_ids=ids).logits[0, P - 1 : -1].double(), -1)
        lq = torch.log_softmax(neg_model(input_ids=ids).logits[0, P - 1 : -1].double(), -1)
    c = torch.softmax((1 + lam) * lp - lam * lq, -1).gather(-1, ids[0, P:, None]).squeeze(-1)
    return 1 - c


def spy_models(monkeypatch):
    """Keep the positive and negative models that add_cdpo_weights trains (it frees them)."""
    kept, real = [], T.train_ce_model
    monkeypatch.setattr(T, "train_ce_model", lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
    return kept


def test_round_weights_match_a_brute_force_on_unpadded_sequences(
    monkeypatch, random_tiny_model_dir
):
    model, ref, tok = tiny_models(random_tiny_model_dir)
    kept = spy_models(monkeypatch)
    pairs = some_pairs(tok)
    rows = [(p["prompt"], p["chosen"]) for p in pairs], [
        (p["prompt"], p["rejected"]) for p in pairs
    ]
    m = T.add_cdpo_weights(pairs, *rows, ref, tok, round_args(), 1, torch.device("cpu"))
    (pos_model, _), (neg_model, _) = kept
    for p in pairs:
        assert len(p["rejected_weights"]) == len(p["rejected"])
        bf = brute_weights(pos_model, neg_model, p)
        torch.testing.assert_close(
            torch.tensor(p["rejected_weights"], dtype=torch.float64), bf, atol=1e-5, rtol=0
        )
    assert m["cdpo/pos_rows"] == 3 and m["cdpo/neg_rows"] == 3 and m["cdpo/sft_seconds"] > 0
    assert math.isfinite(m["cdpo/contrast_chosen"]) and math.isfinite(m["cdpo/contrast_rejected"])


@pytest.mark.parametrize("finished", [True, False])
def test_eos_gets_its_ce_weight_and_a_truncated_answer_is_weighted_everywhere(
    finished, random_tiny_model_dir
):
    """No fine-tune (0 steps): pi_p = pi_n = pi_ref, so w_t = 1 - pi_ref(y_t), by brute force."""
    model, ref, tok = tiny_models(random_tiny_model_dir)
    pairs = some_pairs(tok, finished)
    rows = [(p["prompt"], p["chosen"]) for p in pairs], [
        (p["prompt"], p["rejected"]) for p in pairs
    ]
    T.add_cdpo_weights(pairs, *rows, ref, tok, round_args(ce_sft_steps=0), 1, torch.device("cpu"))
    for p in pairs:
        w, bf = torch.tensor(p["rejected_weights"], dtype=torch.float64), brute_weights(ref, ref, p)
        torch.testing.assert_close(w, bf, atol=1e-5, rtol=0)
        assert len(w) == len(p["rejected"]) and (w > 0).all()  # every token weighted, none dropped
        assert (
            p["rejected"][-1] == tok.eos_token_id
        ) == finished  # no EOS appended to a truncated one
        if finished:
            assert w[-1] < 0.999  # the EOS carries its CE weight, not the official code's 1
    stats = T.cdpo_weight_stats(pairs, tok.eos_token_id)
    assert ("cdpo/eos_weight_mean" in stats) == finished


def test_pad_equal_to_eos_and_batch_company_leave_weights_unchanged(random_tiny_model_dir):
    model, ref, tok = tiny_models(random_tiny_model_dir)
    eos_pad = SimpleNamespace(pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    alone, together = some_pairs(tok)[:1], some_pairs(tok)
    together[1]["rejected"] = together[1]["rejected"] * 2  # a longer neighbour: more right padding
    for pairs in (alone, together):
        rows = [(p["prompt"], p["chosen"]) for p in pairs], [
            (p["prompt"], p["rejected"]) for p in pairs
        ]
        T.add_cdpo_weights(
            pairs, *rows, ref, eos_pad, round_args(ce_sft_steps=0), 1, torch.device("cpu")
        )
    torch.testing.assert_close(
        torch.tensor(alone[0]["rejected_weights"]),
        torch.tensor(together[0]["rejected_weights"]),
        atol=1e-6,
        rtol=0,
    )


def test_only_the_policy_gets_a_gradient_and_the_other_models_are_bitwise_unchanged(
    monkeypatch, random_tiny_model_dir
):
    model, ref, tok = tiny_models(random_tiny_model_dir)
    kept = spy_models(monkeypatch)
    snap = lambda m: [p.detach().clone() for p in m.parameters()]  # noqa: E731
    ref_before, pol_before, rng_before = snap(ref), snap(model), torch.get_rng_state()
    pairs = some_pairs(tok)
    rows = [(p["prompt"], p["chosen"]) for p in pairs], [
        (p["prompt"], p["rejected"]) for p in pairs
    ]
    T.add_cdpo_weights(pairs, *rows, ref, tok, round_args(), 1, torch.device("cpu"))
    assert torch.equal(
        torch.get_rng_state(), rng_before
    )  # the fine-tunes leave the global RNG alone
    (pos_model, _), (neg_model, _) = kept
    ce_before = snap(pos_model), snap(neg_model)
    assert any(not torch.equal(a, b) for a, b in zip(snap(pos_model), ref_before))  # it did train

    stored = torch.zeros(len(pairs), max(len(p["rejected"]) for p in pairs))
    for i, p in enumerate(pairs):
        stored[i, : len(p["rejected"])] = torch.tensor(p["rejected_weights"])
    # Recomputed from the kept models on add_cdpo_weights' own micro-batches: the same shapes
    # give the same bits. (Other batch shapes pad differently, and fp32 matrix products round
    # differently by shape and instruction set: about 1e-7 apart, never bitwise.)
    n, fresh = max(1, round_args().micro_batch_size // 2), torch.zeros_like(stored)
    with torch.no_grad():
        for s in range(0, len(pairs), n):
            batch = common.collate_pairs(pairs[s:s + n], tok.pad_token_id, "cpu")
            hp, hn = (common.response_hidden_states(m, *batch) for m in (pos_model, neg_model))
            w = T.cdpo_weights(hp, hn, batch[2], batch[3], 1.0, pos_model.get_output_embeddings(),
                               neg_model.get_output_embeddings(), chunk_size=5).chunk(2)[1]
            fresh[s:s + len(w), : w.size(1)] = w
    assert torch.equal(stored, fresh)  # a pair's list of floats holds its fp32 weights exactly

    batch = common.collate_pairs(pairs, tok.pad_token_id, "cpu")
    hidden = common.response_hidden_states(model, *batch)
    with torch.no_grad():
        ref_hidden = common.response_hidden_states(ref, *batch)
    lp, lq, _ = T.token_logps_and_kl(hidden, ref_hidden, batch[2], batch[3],
                                     model.get_output_embeddings(), ref.get_output_embeddings())
    (pw, pl), (rw, rl), (mw, ml) = lp.chunk(2), lq.chunk(2), batch[3].chunk(2)
    loss, _ = T.cdpo_loss(pw, pl, rw, rl, mw, ml, stored, BETA)
    model.zero_grad(set_to_none=True)
    loss.backward()
    g_stored = [p.grad for p in model.parameters()]
    assert any(g.abs().max() > 0 for g in g_stored)
    for m, before in ((ref, ref_before), (pos_model, ce_before[0]), (neg_model, ce_before[1])):
        assert all(p.grad is None for p in m.parameters())
        assert all(torch.equal(a, b) for a, b in zip(snap(m), before))
    assert all(
        torch.equal(a, b) for a, b in zip(snap(model), pol_before)
    )  # no optimizer step was taken


# ------------------------------------------------------------------------------ data selection


def test_selection_the_papers_example():
    """One prompt, G = 12: two correct, ten incorrect with answers a a a b b c d e f g."""
    answers = ["x", "x"] + list("aaabbcdefg")
    correct = [True, True] + [False] * 10
    for seed in range(20):
        pos, neg, fallback = T.select_ce_rows(
            correct, [True] * 12, answers, 12, torch.Generator().manual_seed(seed)
        )
        assert not fallback and len(pos) == 1 and pos[0] in (0, 1)
        assert sorted(answers[i] for i in neg) == ["a", "b"]


def test_selection_ties_at_random_and_one_positive_per_prompt():
    # prompt 0: a a b b (need 2: one group, a or b); 1: all correct; 2: all wrong, one answer
    answers = list("aabb") + ["1"] * 4 + list("cccc")
    correct = [False] * 4 + [True] * 4 + [False] * 4
    seen, pos_seen = set(), set()
    for seed in range(30):
        pos, neg, _ = T.select_ce_rows(
            correct, [True] * 12, answers, 4, torch.Generator().manual_seed(seed)
        )
        assert len(pos) == 1 and 4 <= pos[0] < 8 and len(neg) == 2
        seen.add(answers[neg[0]])
        pos_seen.add(pos[0])
        assert answers[neg[1]] == "c"
    assert seen == {"a", "b"} and len(pos_seen) > 1  # random, not always the first


def test_selection_excludes_truncated_and_answerless_rows_unless_empty():
    answers = ["1", "a", None, "b", "b"]
    correct = [True, False, False, False, False]
    finished = [
        True,
        True,
        True,
        False,
        False,
    ]  # row 1 finished with an answer; 2 has none; 3, 4 truncated
    pos, neg, fallback = T.select_ce_rows(
        correct, finished, answers, 5, torch.Generator().manual_seed(0)
    )
    assert pos == [0] and neg == [1] and not fallback
    pos, neg, fallback = T.select_ce_rows(
        correct, [True, False, True, False, False], answers, 5, torch.Generator().manual_seed(0)
    )
    assert fallback and neg == [1, 2, 3, 4]  # nothing eligible: every incorrect row


def test_weight_stats_by_hand():
    pairs = [
        {
            "chosen": [1, 2, 3, 9],
            "rejected": [1, 2, 5, 9],
            "rejected_weights": [0.1, 0.2, 0.9, 0.3],
        },
        {"chosen": [4, 4], "rejected": [6, 7, 8], "rejected_weights": [0.8, 0.1, 0.0]},
    ]
    s = T.cdpo_weight_stats(pairs, eos_id=9, golds=[[1, 2, 3, 9], [6, 5, 8]])
    assert s["cdpo/weight_mean"] == pytest.approx(2.4 / 7) and s[
        "cdpo/weight_sum"
    ] == pytest.approx(1.2)
    assert s["cdpo/weight_max"] == pytest.approx(0.85) and s["cdpo/critical_frac"] == pytest.approx(
        2 / 7
    )
    assert s["cdpo/argmax_pos"] == 1.0 and s["cdpo/argmax_in_shared_prefix_frac"] == 0.0
    assert (
        s["cdpo/shared_prefix_weight_mean"] == pytest.approx(0.15)
        and s["cdpo/eos_weight_mean"] == 0.3
    )
    # first errors at 2 (weight 0.9, the argmax) and 1 (weight 0.1, argmax is 0)
    assert s["cdpo/argmax_at_first_error_frac"] == 0.5 and s[
        "cdpo/first_error_weight_mean"
    ] == pytest.approx(0.5)
    assert s["cdpo/first_error_chance"] == pytest.approx((1 / 4 + 1 / 3) / 2)


def test_credit_view_shows_each_rejected_tokens_weight(random_tiny_model_dir):
    tok = common.load_model_and_tokenizer(
        str(random_tiny_model_dir), torch.device("cpu"), torch.float32
    )[1]
    pair = {
        "rejected": tok("1+2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        "rejected_weights": [0.01, 0.5, 0.987, 0.0],
    }
    out = T.cdpo_credit_view(
        pair, tok, gold=tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    )
    assert (
        out.splitlines()[-1] == "o1: 1[+0.01]+[+0.50]2[+0.99]<eos>[+0.00]"
        and "gold solution '3'" in out
    )
    assert out.splitlines()[-2] == (
        "key: x[+0.12] = the weight w_t of token x, the token just before the [ ]"
    )


# --------------------------------------------------------------------------- end to end, rounds

TINY = [
    "--pairs-per-step",
    "1",
    "--num-generations",
    "2",
    "--eval-size",
    "2",
    "--max-completion-length",
    "6",
    "--eval-every",
    "100",
    "--epochs-per-round",
    "1",
    "--ce-sft-steps",
    "2",
    "--ce-sft-rows",
    "4",
]
# A random model is never right and rarely stops: count every sample finished, alternate right/wrong
FAKE = (
    "import runpy, sys, torch, common\n"
    "common.reward_fn = lambda c, a: [float(i % 2 == 0) for i in range(len(c))]\n"
    "common.finished_rewards = lambda c, a, ids, eos: torch.tensor(common.reward_fn(c, a))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)
CLOCK = ("time", "step_time", "cdpo/sft_seconds")


def test_round1_builds_the_same_pairs_under_cdpo_and_dpo(
    monkeypatch, tmp_path, random_tiny_model_dir
):
    monkeypatch.setattr(
        common, "reward_fn", lambda c, a: [float(i % 2 == 0) for i in range(len(c))]
    )
    monkeypatch.setattr(
        common, "finished_rewards", lambda c, a, ids, eos: torch.tensor(common.reward_fn(c, a))
    )
    states, rows = {}, {}
    for loss in ("dpo", "cdpo"):
        out = tmp_path / loss
        common.run_main(
            T.main,
            T.Args,
            [
                "--model",
                str(random_tiny_model_dir),
                "--output-dir",
                str(out),
                *TINY,
                "--loss",
                loss,
                "--total-steps",
                "1",
                "--prompts-per-round",
                "3",
            ],
        )
        (run_dir,) = list(out.iterdir())
        states[loss] = torch.load(
            run_dir / "checkpoints" / "step-0000001" / "trainer_state.pt", weights_only=False
        )["state"]["rounds"]
        rows[loss] = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][1]
    strip = lambda ps: [(p["prompt"], p["chosen"], p["rejected"]) for p in ps]  # noqa: E731
    assert (
        strip(states["dpo"]["pairs"]) == strip(states["cdpo"]["pairs"])
        and len(states["dpo"]["pairs"]) == 3
    )
    assert states["dpo"]["queue"] == states["cdpo"]["queue"]
    assert all(len(p["rejected_weights"]) == len(p["rejected"]) for p in states["cdpo"]["pairs"])
    for key in ("reward", "pairs/built", "pairs/len_rejected", "round/seq_kl_to_ref"):
        assert rows["dpo"][key] == rows["cdpo"][key], key
    # a random model never finishes with an answer: the negative set fell back to every wrong sample
    assert rows["cdpo"]["cdpo/neg_fallback"] == 1.0 and rows["cdpo"]["cdpo/neg_rows"] == 3
    assert rows["cdpo"]["cdpo/pos_rows"] == 3 and "cdpo/weighted_rewards_rejected" in rows["cdpo"]
    assert abs(rows["cdpo"]["loss"] - LN2) < 1e-6


def test_pairs_file_uses_chosen_and_rejected_as_the_two_sets(
    monkeypatch, tmp_path, random_tiny_model_dir
):
    rows = []
    for ex in common.arith_dataset("train")[:3]:
        rows.append(
            json.dumps(
                {
                    "prompt": ex["question"],
                    "chosen": ex["solution"],
                    "rejected": ex["solution"][:-1],
                }
            )
        )
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    seen, real = [], T.train_ce_model
    monkeypatch.setattr(
        T,
        "train_ce_model",
        lambda ref, tok, rows, *a: seen.append(rows) or real(ref, tok, rows, *a),
    )
    out = tmp_path / "runs"
    common.run_main(
        T.main,
        T.Args,
        [
            "--model",
            str(random_tiny_model_dir),
            "--output-dir",
            str(out),
            *TINY,
            "--loss",
            "cdpo",
            "--pairs-file",
            str(path),
            "--total-steps",
            "4",
        ],
    )
    (run_dir,) = list(out.iterdir())
    state = torch.load(
        run_dir / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=False
    )["state"]["rounds"]
    pairs = state["pairs"]
    assert seen == [
        [(p["prompt"], p["chosen"]) for p in pairs],
        [(p["prompt"], p["rejected"]) for p in pairs],
    ]
    assert (
        state["round"] == 2
    )  # 3 pairs, 1 per step: round 2 reused round 1's weights (the file is fixed)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert metrics[1]["cdpo/pos_rows"] == 3 and metrics[1]["cdpo/neg_rows"] == 3
    assert "cdpo/pos_rows" not in metrics[4] and metrics[4]["round"] == 2


@pytest.mark.parametrize(
    "flag,value", [("--ce-beta", "-1"), ("--ce-sft-steps", "-2"), ("--ce-sft-rows", "0")]
)
def test_bad_cdpo_flags_are_one_line_exit_2(flag, value, capsys, tmp_path, random_tiny_model_dir):
    with pytest.raises(SystemExit) as e:
        common.run_main(
            T.main,
            T.Args,
            [
                "--model",
                str(random_tiny_model_dir),
                "--output-dir",
                str(tmp_path),
                "--loss",
                "cdpo",
                flag,
                value,
            ],
        )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and line.startswith("error: ") and flag in line


def metric_rows(run_dir):
    return [
        {k: v for k, v in json.loads(line).items() if k not in CLOCK}
        for line in open(run_dir / "metrics.jsonl")
    ]


def test_sigint_mid_round_then_resume_reproduces_the_metrics_without_retraining(
    random_tiny_model_dir, tmp_path
):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-c",
        FAKE,
        str(ROOT / "token_dpo.py"),
        "--model",
        str(random_tiny_model_dir),
        *TINY,
        "--loss",
        "cdpo",
        "--prompts-per-round",
        "8",
        "--total-steps",
        "12",
        "--save-every",
        "100",
    ]
    trained = "cDPO fine-tuned"
    straight = subprocess.run(
        cmd + ["--output-dir", str(tmp_path / "straight")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert straight.stdout.count(trained) == 2  # rounds 1 (steps 1-8) and 2 (steps 9-12)
    proc = subprocess.Popen(
        cmd + ["--output-dir", str(tmp_path / "cut")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until step 2 is logged, then interrupt
        runs = list((tmp_path / "cut").glob("*/metrics.jsonl"))
        if runs and sum(1 for _ in open(runs[0])) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]  # SIGINT: the shell convention 128 + 2
    (cut,) = list((tmp_path / "cut").iterdir())
    stopped_at = len(metric_rows(cut)) - 1
    state = torch.load(
        cut / "checkpoints" / f"step-{stopped_at:07d}" / "trainer_state.pt", weights_only=False
    )["state"]["rounds"]
    assert state["round"] == 1 and state["queue"], "not stopped mid-round"
    assert out.count(trained) == 1 and all("rejected_weights" in p for p in state["pairs"])
    resumed = subprocess.run(
        cmd + ["--resume", str(cut)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        resumed.stdout.count(trained) == 1
    )  # round 2 only: round 1's weights came from the checkpoint
    (straight_dir,) = list((tmp_path / "straight").iterdir())
    assert metric_rows(cut) == metric_rows(straight_dir)


def test_sanity_on_the_embedded_task_after_one_round(tmp_path, warm_tiny_model_dir):
    """Diagnostic bounds, not exact numbers: one round of 32 prompts x 8 from the warm start."""
    common.run_main(
        T.main,
        T.Args,
        [
            "--loss",
            "cdpo",
            "--total-steps",
            "1",
            "--prompts-per-round",
            "32",
            "--eval-size",
            "4",
            "--output-dir",
            str(tmp_path),
        ],
    )
    (run_dir,) = list(tmp_path.iterdir())
    row = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][1]
    assert row["pairs/built"] >= 5 and row["cdpo/neg_fallback"] == 0.0
    assert row["cdpo/contrast_rejected"] < 0 < row["cdpo/contrast_chosen"]
    # the first token that leaves the gold solution carries far more weight than the average token
    assert row["cdpo/first_error_weight_mean"] > row["cdpo/weight_mean"] + 0.3
    assert row["cdpo/argmax_at_first_error_frac"] > 5 * row["cdpo/first_error_chance"]
