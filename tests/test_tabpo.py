"""TAB-PO (token_dpo.py --loss tabpo): the hand example, the reductions, the token weights, the
gradient paths (no gradient through the gate), and token_dpo.main on on-policy pairs."""
import json
import math

import pytest
import torch

import common
import token_dpo as T
from token_dpo import dpo_loss, tabpo_loss, tabpo_token_weights

LN2 = math.log(2.0)


def L(*p):
    return torch.tensor([[math.log(x) for x in p]], dtype=torch.float64)


# The card's pair: y_w = (a, a, c), y_l = (a, b, c) over {a, b, c = EOS}; one token differs.
POL_W, REF_W = L(.5, .55, .9), L(.4, .5, .8)
POL_L, REF_L = L(.5, .35, .6), L(.4, .4, .7)
IDS_W, IDS_L = torch.tensor([[0, 0, 2]]), torch.tensor([[0, 1, 2]])
ONES = torch.ones(1, 3, dtype=torch.float64)


def hand(**kw):
    pw, pl = POL_W.clone().requires_grad_(), POL_L.clone().requires_grad_()
    loss, m = tabpo_loss(pw, pl, REF_W, REF_L, ONES, ONES, IDS_W, IDS_L, **kw)
    gw, gl = torch.autograd.grad(loss, (pw, pl))
    return loss.item(), m, gw[0].tolist(), gl[0].tolist()


def test_hand_example_official_form():
    loss, m, gw, gl = hand()   # defaults: beta 0.5, tau 0.66, lambda 0.5, difference weight 1.2
    assert m["tabpo/z_mean"] == pytest.approx(0.1707949, abs=1e-6)
    assert m["z/mean"] == pytest.approx(0.5 * 0.1707949, abs=1e-6)     # the sigmoid's argument
    assert m["loss/dpo"] == pytest.approx(0.6513598, abs=1e-6)
    assert m["pref/p_pref"] == pytest.approx(0.5213364, abs=1e-6)
    assert m["loss/barrier"] == pytest.approx(0.5 * 0.6411598, abs=1e-6)   # lambda included
    assert loss == pytest.approx(0.9719397, abs=1e-6)
    assert gw == pytest.approx([-0.3020639, -0.3624767, -0.0747912], abs=1e-6)
    assert gl == pytest.approx([0.0747912, 0.0897494, 0.0747912], abs=1e-6)
    assert m["barrier/active_pct"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["policy/prob_chosen"] == pytest.approx(0.6226800, abs=1e-6)
    assert m["tabpo/first_diff_offset"] == 1.0
    assert m["tabpo/diff_token_frac"] == pytest.approx(1 / 3)
    assert m["tabpo/gated_prob_mean"] == pytest.approx((0.5 + 0.55) / 2)
    # rewards/* stay TRL's: beta * the unweighted sums of log-ratios
    assert m["rewards/chosen"] == pytest.approx(0.5 * 0.4362368, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(0.5 * -0.0645385, abs=1e-6)
    # the project's DPO on the same pair (beta 0.1, sums)
    d, _ = dpo_loss(POL_W, POL_L, REF_W, REF_L, ONES, ONES, beta=0.1)
    assert d.item() == pytest.approx(0.6684219, abs=1e-6)


def test_at_the_reference_and_the_denominator_clamp():
    loss, m = tabpo_loss(REF_W, REF_L, REF_W, REF_L, ONES, ONES, IDS_W, IDS_L)
    assert m["loss/dpo"] == pytest.approx(LN2, abs=1e-12)    # z = 0 exactly
    assert m["loss/barrier"] == pytest.approx(0.5 * 0.7945761, abs=1e-6)
    assert loss.item() == pytest.approx(1.0904352, abs=1e-6)
    # one gated token of normalised weight 0.9375 and probability .5: its weighted NLL, not ln 2
    pw = L(.5, .9, .9)
    _, m = tabpo_loss(pw, REF_L, pw, REF_L, ONES, ONES, IDS_W, IDS_L, barrier_weight=1.0)
    assert m["loss/barrier"] == pytest.approx(0.6498255, abs=1e-6)


def test_gradient_formula_with_a_constant_gate():
    """dL/dlog pi(y_w,t) = -beta s(-beta z) w_t / n_w - lambda g_t w_t / max(sum w g, 1);
    dL/dlog pi(y_l,t) = +beta s(-beta z) w_t / n_l. Nothing flows through the gate g."""
    g = torch.Generator().manual_seed(0)
    N, Lw = 3, 5
    pw = (-2 * torch.rand(N, Lw, generator=g, dtype=torch.float64)).requires_grad_()
    pl = (-2 * torch.rand(N, Lw, generator=g, dtype=torch.float64)).requires_grad_()
    rw, rl = pw.detach() - 0.3, pl.detach() + 0.2
    mw = (torch.arange(Lw) < torch.tensor([5, 3, 4])[:, None]).double()
    ml = (torch.arange(Lw) < torch.tensor([4, 5, 2])[:, None]).double()
    iw, il = torch.randint(0, 3, (N, Lw), generator=g), torch.randint(0, 3, (N, Lw), generator=g)
    beta, lam = 0.5, 0.5
    loss, _ = tabpo_loss(pw, pl, rw, rl, mw, ml, iw, il, reduction="sum")
    gw, gl = torch.autograd.grad(loss, (pw, pl))
    ow, ol = tabpo_token_weights(iw, il, mw, ml)
    hw, hl = ow / ow.sum(-1, keepdim=True), ol / ol.sum(-1, keepdim=True)
    z = (hw * (pw - rw) * mw).sum(-1) - (hl * (pl - rl) * ml).sum(-1)
    s = torch.sigmoid(-beta * z)[:, None]
    gate = ((pw.exp() < 0.66) & (mw > 0)).double()
    w = hw * mw.sum(-1, keepdim=True)
    den = (w * gate).sum(-1, keepdim=True).clamp(min=1.0)
    assert torch.allclose(gw, (-beta * s * hw - lam * gate * w / den) * mw, atol=1e-9)
    assert torch.allclose(gl, beta * s * hl * ml, atol=1e-9)


# ------------------------------------------------------------------------------- reductions
def test_no_barrier_no_weights_is_dpo_with_beta_over_n():
    pw, pl = POL_W.clone().requires_grad_(), POL_L.clone().requires_grad_()
    loss, m = tabpo_loss(pw, pl, REF_W, REF_L, ONES, ONES, IDS_W, IDS_L, barrier_weight=0.0,
                         diff_weight=1.0)
    assert m["tabpo/z_mean"] == pytest.approx(0.1669251, abs=1e-6)
    assert loss.item() == pytest.approx(0.6522864, abs=1e-6)
    ref, _ = dpo_loss(pw, pl, REF_W, REF_L, ONES, ONES, beta=0.5 / 3)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-8)  # beta / 3 vs a mean: rounding
    g1 = torch.autograd.grad(loss, (pw, pl))
    g2 = torch.autograd.grad(ref, (pw, pl))
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(g1, g2))


def test_tau_zero_and_tau_above_one():
    loss, m, _, _ = hand(tau=0.0)
    assert m["loss/barrier"] == 0.0 and loss == m["loss/dpo"]
    _, m, _, _ = hand(tau=1.5)  # every chosen token gated: the w-weighted mean NLL of y_w
    w = torch.tensor([0.9375, 1.125, 0.9375], dtype=torch.float64)
    nll = (w * -POL_W[0]).sum() / w.sum()
    assert m["loss/barrier"] == pytest.approx(0.5 * nll.item(), abs=1e-9)


# ---------------------------------------------------------------------------------- weights
def test_weights_rule_padding_and_mean_one():
    iw = torch.tensor([[5, 6, 7, 8, 2, 2], [5, 6, 2, 2, 2, 2]])   # 2 = EOS = pad
    il = torch.tensor([[5, 9, 7, 2, 2, 2], [5, 6, 7, 7, 2, 2]])
    mw = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    ml = torch.tensor([[1.0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    ow, ol = tabpo_token_weights(iw, il, mw, ml, 1.2)
    # offsets < min(n_w, n_l) where the ids differ: pair 0 at 1 and 3, pair 1 at 2
    assert torch.allclose(ow, torch.tensor([[1, 1.2, 1, 1.2, 1, 0], [1, 1, 1.2, 0, 0, 0]]))
    assert torch.allclose(ol, torch.tensor([[1, 1.2, 1, 1.2, 0, 0], [1, 1, 1.2, 1, 1, 0]]))
    w = ow / ow.sum(-1, keepdim=True) * mw.sum(-1, keepdim=True)
    assert (w * mw).sum(-1).tolist() == pytest.approx(mw.sum(-1).tolist())   # mean 1
    # extra right padding (pad == EOS) changes neither the weights nor the loss
    pad = lambda x, v: torch.cat([x, torch.full((2, 3), v, dtype=x.dtype)], 1)  # noqa: E731
    ow2, ol2 = tabpo_token_weights(pad(iw, 2), pad(il, 2), pad(mw, 0.0), pad(ml, 0.0))
    assert torch.equal(ow2[:, :6], ow) and (ow2[:, 6:] == 0).all() and torch.equal(ol2[:, :6], ol)
    g = torch.Generator().manual_seed(1)
    x = [-torch.rand(2, 6, generator=g) for _ in range(4)]
    a, _ = tabpo_loss(*x, mw, ml, iw, il)
    xp = [pad(t, float("nan")) for t in x]   # NaN at masked positions must not leak
    b, _ = tabpo_loss(*xp, pad(mw, 0.0), pad(ml, 0.0), pad(iw, 2), pad(il, 2))
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), abs=1e-6)


def test_micro_batches_summed_equal_the_full_batch():
    g = torch.Generator().manual_seed(2)
    N, Lw = 4, 6
    pw = (-2 * torch.rand(N, Lw, generator=g)).requires_grad_()
    pl = (-2 * torch.rand(N, Lw, generator=g)).requires_grad_()
    rw, rl = -2 * torch.rand(N, Lw, generator=g), -2 * torch.rand(N, Lw, generator=g)
    mw = (torch.arange(Lw) < torch.tensor([6, 3, 4, 2])[:, None]).float()
    ml = (torch.arange(Lw) < torch.tensor([5, 6, 2, 4])[:, None]).float()
    iw, il = torch.randint(0, 4, (N, Lw), generator=g), torch.randint(0, 4, (N, Lw), generator=g)
    full, _ = tabpo_loss(pw, pl, rw, rl, mw, ml, iw, il)
    g_full = torch.autograd.grad(full, (pw, pl))
    total = sum(tabpo_loss(pw[s], pl[s], rw[s], rl[s], mw[s], ml[s], iw[s], il[s],
                           reduction="sum")[0] / N for s in (slice(0, 1), slice(1, 3), slice(3, 4)))
    g_mb = torch.autograd.grad(total, (pw, pl))
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_mb))


def test_z_is_zero_at_the_reference_on_random_pairs():
    g = torch.Generator().manual_seed(3)
    rw, rl = -torch.rand(5, 7, generator=g), -torch.rand(5, 7, generator=g)
    mw = (torch.arange(7) < torch.randint(1, 8, (5,), generator=g)[:, None]).float()
    ml = (torch.arange(7) < torch.randint(1, 8, (5,), generator=g)[:, None]).float()
    ids = torch.randint(0, 5, (2, 5, 7), generator=g)
    _, m = tabpo_loss(rw, rl, rw, rl, mw, ml, ids[0], ids[1])
    assert m["tabpo/z_mean"] == 0.0 and m["loss/dpo"] == pytest.approx(LN2, abs=1e-7)


# ---------------------------------------------------------------- through token_dpo.main
TINY_RUN = ["--total-steps", "2", "--pairs-per-step", "2", "--num-generations", "2",
            "--eval-size", "2", "--max-completion-length", "8", "--eval-every", "1",
            "--prompts-per-round", "2", "--epochs-per-round", "1", "--log-completions-every", "1"]


def test_main_on_policy_pairs(monkeypatch, tmp_path, random_tiny_model_dir):
    """The verified on-policy pairs and rounds of the other losses; beta defaults to 0.5; the
    reference is frozen and unchanged."""
    alternate = lambda texts, answers: [float(i % 2 == 0) for i in range(len(texts))]  # noqa
    monkeypatch.setattr(common, "reward_fn", alternate)
    monkeypatch.setattr(common, "finished_rewards",
                        lambda texts, answers, ids, eos: torch.tensor(alternate(texts, answers)))
    frozen, betas = [], []
    load_frozen = common.load_frozen
    monkeypatch.setattr(common, "load_frozen",
                        lambda *a, **k: frozen.append(load_frozen(*a, **k)) or frozen[-1])
    real = T.tabpo_loss
    monkeypatch.setattr(T, "tabpo_loss", lambda *a, **k: betas.append(a[8]) or real(*a, **k))
    before = [p.detach().clone() for p in load_frozen(str(random_tiny_model_dir), "cpu",
                                                      torch.float32).parameters()]
    out_dir = tmp_path / "runs"
    common.run_main(T.main, T.Args, ["--model", str(random_tiny_model_dir), "--output-dir",
                                     str(out_dir), "--loss", "tabpo", *TINY_RUN])
    (run_dir,) = list(out_dir.iterdir())
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert set(betas) == {0.5} and len(betas) == 2
    for row in rows[1:]:
        assert row["pairs/built"] == 2 and row["num_pairs"] == 2
        for key in ("loss/dpo", "loss/barrier", "pref/p_pref", "logits/mean", "logits/max",
                    "logits/min", "barrier/active_pct", "policy/prob_chosen", "tabpo/z_mean",
                    "tabpo/diff_token_frac", "tabpo/first_diff_offset", "tabpo/gated_prob_mean",
                    "rewards/margins", "kl/chosen", "grad_norm"):
            assert key in row, key
    assert rows[1]["loss/dpo"] == pytest.approx(LN2, abs=1e-5)   # step 1: policy = reference
    (ref,) = frozen
    assert all(not p.requires_grad and p.grad is None for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["beta"] is None and config["tabpo_tau"] == 0.66
