"""TW-GRPO (grpo.py --token-weighting tw): the hand example, the reductions, the invariances,
the numerics, the stop-gradient on the weights, and short runs through grpo.main."""
import math

import pytest
import torch

import common
import grpo
from conftest import run_grpo_main
from grpo import compute_advantages, grpo_loss, tw_divergence, tw_metrics, tw_token_weights

T64 = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731


def f(x):
    return math.exp(x) - x - 1.0


# ------------------------------------------------------------------------- the hand example
# G = 2, V = {a, b, c = EOS}; completion 1 = (a, a, c), completion 2 = (b, c); rewards (1, 0).
# Row 2's t = 2 distribution is garbage (it has ended): it must not matter.
PROBS = T64([[.6, .3, .1], [.5, .3, .2], [.1, .1, .8]],
            [[.6, .3, .1], [.2, .2, .6], [.3, .3, .4]])                          # [2, 3, V]
MASK = T64([1, 1, 1], [1, 1, 0])
TOKENS = [[0, 0, 2], [1, 2, 2]]


def hand_logps():
    """log pi of the sampled tokens, [2, 3] (pass 1: the old ones are the same, detached)."""
    return torch.stack([PROBS[i, t, TOKENS[i][t]] for i in range(2) for t in range(3)]
                       ).view(2, 3).log().requires_grad_()


def loss_and_grad(weights, loss_type="dapo"):
    logps = hand_logps()
    adv = compute_advantages(torch.tensor([1.0, 0.0]), 2).double()
    loss, _ = grpo_loss(logps, logps.detach(), adv, MASK, epsilon_low=0.2, epsilon_high=0.2,
                        loss_type=loss_type, num_sequences=2, num_tokens=5.0,
                        max_completion_length=3, token_mask=MASK * weights)
    loss.backward()
    return loss.item(), logps.grad


def test_hand_example_divergences_and_weights():
    w, d = tw_token_weights(PROBS.log(), MASK, 2, alpha=1.7)
    assert d[0].tolist() == pytest.approx([0.0, 0.2821184, 0.4708097], abs=1e-6)
    assert w[0].tolist() == pytest.approx([1.0, 1.4194538, 1.7], abs=1e-6)
    assert w[1].tolist() == pytest.approx([1.0, 1.4194538, 0.0], abs=1e-6)
    # the row sums of f at t = 1 and t = 2 (each row against the mean of log-probs)
    lbar = PROBS[:, 1].log().mean(0)
    assert lbar.tolist() == pytest.approx([-1.1512925, -1.4067054, -1.0601317], abs=1e-6)
    rows = [sum(f(x) for x in (lbar - PROBS[i, 1].log()).tolist()) for i in range(2)]
    assert rows == pytest.approx([0.2925747, 0.2716622], abs=1e-6)
    alive, _ = tw_token_weights(PROBS.log(), MASK, 2, alpha=1.7, ended="alive")
    assert alive[0].tolist() == pytest.approx([1.0, 1.7, 1.0], abs=1e-6)


def test_hand_example_losses_and_gradients():
    adv = compute_advantages(torch.tensor([1.0, 0.0]), 2)
    assert adv.tolist() == pytest.approx([0.7070068, -0.7070068], abs=1e-6)
    w, _ = tw_token_weights(PROBS.log(), MASK, 2, alpha=1.7)
    loss, grad = loss_and_grad(w, "dapo")
    assert loss == pytest.approx(-0.2403823, abs=1e-6)
    assert grad[0].tolist() == pytest.approx([-0.1414014, -0.2007127, -0.2403823], abs=1e-6)
    assert grad[1].tolist() == pytest.approx([0.1414014, 0.2007127, 0.0], abs=1e-6)
    assert loss_and_grad(w, "grpo")[0] == pytest.approx(-0.0577711, abs=1e-6)
    alive, _ = tw_token_weights(PROBS.log(), MASK, 2, alpha=1.7, ended="alive")
    loss, grad = loss_and_grad(alive, "dapo")
    assert loss == pytest.approx(-0.1414014, abs=1e-6)
    assert grad[0].tolist() == pytest.approx([-0.1414014, -0.2403823, -0.1414014], abs=1e-6)
    assert grad[1].tolist() == pytest.approx([0.1414014, 0.2403823, 0.0], abs=1e-6)
    one, _ = tw_token_weights(PROBS.log(), MASK, 2, alpha=1.0)
    loss, grad = loss_and_grad(one, "dapo")
    assert loss == pytest.approx(-0.1414014, abs=1e-6)
    assert grad[MASK > 0].abs().tolist() == pytest.approx([0.1414014] * 5, abs=1e-6)


def test_hand_example_metrics():
    w, d = tw_token_weights(PROBS.log(), MASK, 2, alpha=1.7)
    m = tw_metrics(w, d, MASK, MASK, 2, 1.7)
    total = 1 + 1.4194538 + 1.7 + 1 + 1.4194538
    assert m["tw/first_token_weight"] == 1.0
    assert m["tw/weight_mean"] == pytest.approx(total / 5, abs=1e-6)
    assert m["tw/frac_at_alpha"] == pytest.approx(0.2)
    assert m["tw/ended_weight_share"] == pytest.approx(1.7 / total, abs=1e-6)  # only t = 2
    assert m["tw/div_mean"] == pytest.approx((0.2821184 + 0.4708097) / 3, abs=1e-6)


# ------------------------------------------------------------------------------- reductions
def random_batch(P=3, G=4, L=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(P * G, L, V, generator=g)
    logits[:, 0] = logits[::G, 0].repeat_interleave(G, 0)  # a group shares its first row
    lengths = torch.randint(1, L + 1, (P * G,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).float()
    return logits, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_alpha_one_is_grpo(loss_type):
    logits, mask = random_batch()
    w, _ = tw_token_weights(logits, mask, 4, alpha=1.0)
    assert torch.equal(w, mask)
    g = torch.Generator().manual_seed(1)
    logps = (-torch.rand(12, 7, generator=g)).requires_grad_()
    old = logps.detach() + 0.1 * torch.randn(12, 7, generator=g)
    adv = compute_advantages((torch.rand(12, generator=g) > 0.5).float(), 4)
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, loss_type=loss_type, num_sequences=12,
              num_tokens=mask.sum().item(), max_completion_length=7)
    out = []
    for token_mask in (mask, mask * w):
        loss, _ = grpo_loss(logps, old, adv, mask, token_mask=token_mask, **kw)
        out.append((loss.item(), torch.autograd.grad(loss, logps)[0]))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
    assert torch.allclose(out[0][1], out[1][1], atol=1e-6)


def test_identical_completions_give_weight_one_and_no_nan():
    logits = torch.randn(1, 5, 9).repeat(4, 1, 1)
    w, d = tw_token_weights(logits, torch.ones(4, 5), 4, alpha=1.7)
    assert torch.equal(w, torch.ones(4, 5)) and (d == 0).all()


# ------------------------------------------------------------------------------ invariances
def test_padding_other_groups_and_row_order_change_nothing():
    logits, mask = random_batch()
    w, _ = tw_token_weights(logits, mask, 4, alpha=1.7)
    # extra right padding (garbage logits there)
    padded = torch.cat([logits, 100 * torch.randn(12, 3, 11)], 1)
    wp, _ = tw_token_weights(padded, torch.cat([mask, torch.zeros(12, 3)], 1), 4, alpha=1.7)
    assert torch.allclose(wp[:, :7], w, atol=1e-6) and (wp[:, 7:] == 0).all()
    # one group alone equals that group inside the batch
    w1, _ = tw_token_weights(logits[4:8], mask[4:8], 4, alpha=1.7)
    assert torch.allclose(w1, w[4:8], atol=1e-6)
    # rows permuted within a group: the weights follow their rows
    perm = torch.tensor([2, 0, 3, 1])
    wperm, _ = tw_token_weights(logits[:4][perm], mask[:4][perm], 4, alpha=1.7)
    assert torch.allclose(wperm, w[:4][perm], atol=1e-6)


def test_weights_range_first_token_and_the_guard():
    alpha = 1.7
    logits, mask = random_batch(seed=3)
    w, d = tw_token_weights(logits, mask, 4, alpha=alpha)
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        L_g = int(mask[rows].sum(1).max())
        vals = w[rows, :L_g][mask[rows, :L_g] > 0]
        dg = d[g, :L_g]
        assert vals.min() >= 1.0 and vals.max() <= alpha
        assert w[rows, :L_g].max() == pytest.approx(
            alpha - (alpha - 1) * 1e-8 / (dg.max() - dg.min() + 1e-8).item(), abs=1e-6)
        assert (w[rows, 0] == 1.0).all()   # D_0 = 0 in fp32: the rows share their first logits
    assert (w[mask == 0] == 0).all()
    # the hand example in fp64: the largest weight sits 1e-8 * 0.7 / 0.4708 below alpha
    wh, _ = tw_token_weights(PROBS.log(), MASK, 2, alpha=1.7)
    assert wh[0, 2].item() == pytest.approx(1.7 - 0.7e-8 / 0.4708097, abs=1e-12)


def test_nan_at_masked_positions_does_not_leak():
    logits, mask = random_batch(seed=4)
    w, _ = tw_token_weights(logits, mask, 4, alpha=1.7)
    poisoned = logits.clone()
    poisoned[mask == 0] = float("nan")
    for ended in ("uniform", "alive"):
        wp, _ = tw_token_weights(poisoned, mask, 4, alpha=1.7, ended=ended)
        assert torch.isfinite(wp).all()
    assert torch.equal(tw_token_weights(poisoned, mask, 4, alpha=1.7)[0], w)


# -------------------------------------------------------------------------------- numerics
def test_clamp_values_and_extreme_log_probs():
    assert f(11) == pytest.approx(59862.1417, abs=1e-4) and f(-11) == pytest.approx(10.0000167,
                                                                                     abs=1e-7)
    # two rows, one entry apart by 100 nats: each gap is clamped to +-11 before exp
    lp = torch.zeros(2, 1, 2, dtype=torch.float64)
    lp[1, 0, 0] = -100.0
    d = tw_divergence(lp, torch.ones(2, 1, dtype=torch.bool))
    assert d.item() == pytest.approx((f(-11) + f(11)) / 2, abs=1e-6)
    # a log-prob of -50 where the mean is -5 (the rest near 0): finite
    lp = torch.tensor([[[-50.0, 0.0]], [[40.0, 0.0]]])
    assert torch.isfinite(tw_divergence(lp, torch.ones(2, 1, dtype=torch.bool))).all()


def test_chunked_equals_unchunked_and_head_sees_one_chunk():
    logits, mask = random_batch(L=9)
    whole, d_whole = tw_token_weights(logits, mask, 4, alpha=1.7, chunk_size=64)
    shapes = []
    head = lambda x: shapes.append(tuple(x.shape)) or x  # noqa: E731
    parts, d_parts = tw_token_weights(logits, mask, 4, alpha=1.7, head=head, chunk_size=2)
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(d_whole, d_parts, atol=1e-6)
    assert max(s[0] * s[1] for s in shapes) <= 4 * 2  # G x chunk rows, never B x L


# -------------------------------------------------------------------------- stop-gradient
def test_the_weights_carry_no_gradient():
    logits, mask = random_batch()
    logits.requires_grad_()
    w, d = tw_token_weights(logits, mask, 4, alpha=1.7)
    assert not w.requires_grad and not d.requires_grad


def official_loss(logits, tokens, mask, adv, alpha, detach):
    """The official code's tw_grpo loss on pass 1 (rho = 1), weights WITH gradient unless
    `detach`: sum w m l / sum m over one group (test only)."""
    lp = torch.log_softmax(logits, -1)
    divs = tw_divergence(lp, mask > 0)
    w = grpo.tw_weights(divs, alpha)
    w = w.detach() if detach else w
    logp = lp.gather(-1, tokens[..., None]).squeeze(-1)
    per_token = -torch.exp(logp - logp.detach()) * adv[:, None] * w
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("equal_lengths", [True, False])
def test_official_gradient_equals_ours_only_with_equal_lengths(equal_lengths):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    logits[:, 0] = logits[0, 0]
    tokens = torch.randint(0, 7, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.float64)
    if not equal_lengths:
        mask[1, 4:] = 0
        mask[3, 2:] = 0
    adv = compute_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4).double()
    grads = []
    for detach in (True, False):
        x = logits.clone().requires_grad_()
        official_loss(x, tokens, mask, adv, 1.7, detach).backward()
        grads.append(x.grad)
    same = torch.allclose(grads[0], grads[1], atol=1e-9)
    assert same == equal_lengths


# ------------------------------------------------------------------------ through grpo.main
def run_main(tmp_path, model_dir, monkeypatch, *extra, steps=2):
    """grpo.main on the random tiny model, a reward that alternates 0, 1 (every group has a
    spread); returns (metrics rows, the trained policy)."""
    alternate = lambda completions, answers: [float(i % 2) for i in range(len(completions))]  # noqa
    return run_grpo_main(tmp_path, model_dir, monkeypatch, alternate, *extra, steps=steps)


def test_main_logs_the_weights(tmp_path, random_tiny_model_dir, monkeypatch):
    rows, _ = run_main(tmp_path, random_tiny_model_dir, monkeypatch, "--token-weighting", "tw")
    for row in rows[1:]:
        assert row["tw/first_token_weight"] == 1.0
        assert 1.0 <= row["tw/weight_mean"] <= 1.7
        assert {"tw/weight_std", "tw/frac_at_alpha", "tw/ended_weight_share",
                "tw/div_mean"} <= set(row)
    rows, _ = run_main(tmp_path, random_tiny_model_dir, monkeypatch, "--token-weighting", "tw",
                       "--tw-ended", "alive", "--top-entropy-quantile", "0.5")
    assert "tw/weight_entropy_corr" in rows[1] and "entropy_mask/threshold" in rows[1]


def test_main_alpha_one_trains_exactly_as_grpo(tmp_path, random_tiny_model_dir, monkeypatch):
    _, plain = run_main(tmp_path, random_tiny_model_dir, monkeypatch, steps=1)
    _, tw = run_main(tmp_path, random_tiny_model_dir, monkeypatch, "--token-weighting", "tw",
                     "--tw-alpha", "1", steps=1)
    for (name, p), q in zip(plain.named_parameters(), tw.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_main_weights_are_computed_once_per_batch(tmp_path, random_tiny_model_dir, monkeypatch):
    """From pi_old, before the first update, and fixed for the mu = 2 passes."""
    calls = []
    real = grpo.tw_token_weights

    def spy(hidden, *a, **k):
        calls.append(hidden.requires_grad)
        return real(hidden, *a, **k)

    monkeypatch.setattr(grpo, "tw_token_weights", spy)
    run_main(tmp_path, random_tiny_model_dir, monkeypatch, "--token-weighting", "tw")
    assert calls == [False, False]  # 2 steps x 1 call, on no-grad hidden states
