"""DCPO's bounds, loss, SAS and OTM against hand-computed numbers (the worked numbers of
docs/dcpo.md, "The math"); then the training loop: resumed SAS statistics, and dcpo.py run as a
user runs it."""
import dataclasses
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import dcpo
import grpo
from common import UserError
from conftest import ROOT, run_script
from dcpo import (PromptStat, PromptStats, add_dcpo_metrics, dac_bounds, dcpo_aggregate_loss,
                  dcpo_loss, dcpo_per_token_loss, prompt_hash, sas_advantages, sas_blend, sas_group_advantages)

T = torch.tensor
PAPER = dict(eps_low=0.16, eps_high=0.20, ratio_max=10.0)


def loss_kw(num_sequences=2, num_tokens=1.0, num_generations=2, loss_type="otm", **over):
    return dict(PAPER, loss_type=loss_type, num_sequences=num_sequences, num_tokens=num_tokens,
                num_generations=num_generations, **over)


def bounds_at(q, **kw):
    """(r_low, r_high) as python floats at old probability q, computed in float64."""
    lo, hi = dac_bounds(torch.tensor([[math.log(q)]], dtype=torch.float64), **kw)
    return lo.item(), hi.item()


# ---------------------------------------------------------------- 1-3. DAC bounds


def test_anchor_bounds():
    assert bounds_at(1.0)[0] == pytest.approx(0.8, abs=1e-12)
    assert bounds_at(1 / 1.2)[1] == pytest.approx(1.2, abs=1e-12)
    assert bounds_at(1.0)[1] == pytest.approx(1.1708204, abs=1e-7)
    lo, hi = bounds_at(0.9)
    assert lo == pytest.approx(0.7687419, abs=1e-7) and hi == pytest.approx(1.1871843, abs=1e-7)
    lo, hi = bounds_at(0.64)
    assert lo == pytest.approx(0.5, abs=1e-12) and hi == pytest.approx(1.25, abs=1e-12)
    assert bounds_at(0.1)[1] == pytest.approx(2.0, abs=1e-12)
    assert bounds_at(0.01)[1] == pytest.approx(5.0, abs=1e-12)
    assert bounds_at(0.001)[1] == 10.0  # the cap
    assert bounds_at(0.001, ratio_max=math.inf)[1] == pytest.approx(14.650972, abs=1e-6)


def test_bounds_fp32_by_default():
    lo, hi = dac_bounds(torch.log(T([[1.0, 0.1]])))
    assert lo.dtype == torch.float32 and lo.shape == (1, 2)
    assert torch.allclose(lo, T([[0.8, 0.5]])) and torch.allclose(hi, T([[1.1708204, 2.0]]))


def test_bounds_shape():
    q = torch.logspace(-6, 0, 2001, dtype=torch.float64)  # (0, 1], increasing
    lo, hi = dac_bounds(torch.log(q)[None])
    lo, hi = lo[0], hi[0]
    assert (lo[1:] >= lo[:-1]).all() and (hi[1:] <= hi[:-1]).all()
    assert (lo <= 1).all() and (hi >= 1).all()
    assert (lo[q <= 0.64] == 0.5).all()
    big = q > 0.64
    assert torch.allclose((1 - lo[big]) * lo[big] * q[big], torch.full_like(q[big], 0.16), atol=1e-12)
    free = hi < 10
    assert torch.allclose((hi[free] - 1) * hi[free] * q[free], torch.full_like(q[free], 0.20), atol=1e-12)
    assert (hi[q <= 0.8 / 360] == 10).all()  # the cap binds below q = 0.00222


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounds_no_nan_extremes(dtype):
    lo, hi = dac_bounds(T([[0.0, -30.0, -100.0, -math.inf]], dtype=dtype))
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert lo[0, 1:].eq(0.5).all() and hi[0, 1:].eq(10.0).all()
    assert lo[0, 0].item() == pytest.approx(0.8) and hi[0, 0].item() == pytest.approx(1.1708204)


def test_code_preset_bounds():  # --eps-low 0.2 --eps-high 0.28, the released launch scripts
    kw = dict(eps_low=0.2, eps_high=0.28)
    lo, hi = bounds_at(1.0, **kw)
    assert lo == pytest.approx(0.7236068, abs=1e-7) and hi == pytest.approx(1.2280110, abs=1e-7)
    for q in (0.8, 0.5, 0.1, 1e-4):
        assert bounds_at(q, **kw)[0] == pytest.approx(0.5, abs=1e-12)
    assert bounds_at(0.81, **kw)[0] > 0.5
    assert bounds_at(0.01, **kw)[1] == pytest.approx(5.8150729, abs=1e-7)


# ---------------------------------------------------------------- 4. loss values

LOSS_TABLE = [  # A, q, r, DCPO loss, gradient flows?, fixed +-0.2 loss
    (+1.0, 0.1, 1.5, -1.5, True, -1.2),
    (+1.0, 0.1, 2.5, -2.0, False, -1.2),
    (-1.0, 0.5, 0.6, 0.6, True, 0.8),
    (-1.0, 0.5, 0.4, 0.5, False, 0.8),
    (-1.0, 0.5, 3.0, 3.0, True, 3.0),
    (-1.0, 0.5, 12.0, 10.0, False, 12.0),
]


@pytest.mark.parametrize("A,q,r,want,flows,fixed", LOSS_TABLE)
def test_loss_values(A, q, r, want, flows, fixed):
    old = torch.tensor([[math.log(q)]], dtype=torch.float64)
    logp = (old + math.log(r)).clone().requires_grad_(True)
    loss = dcpo_per_token_loss(logp, old, torch.tensor([A], dtype=torch.float64), torch.ones(1, 1))[0]
    assert loss.item() == pytest.approx(want, abs=1e-9)
    loss.sum().backward()
    if flows:  # d(-A r)/dlogp = -A r
        assert logp.grad.item() == pytest.approx(-A * r, abs=1e-9)
    else:
        assert logp.grad.item() == 0.0
    # GRPO's fixed [0.8, 1.2] clip on the same token (grpo.py's own function)
    s, _ = grpo.clipped_objective(logp.detach(), old, torch.tensor([[A]], dtype=torch.float64), 0.2, 0.2)
    assert -s.item() == pytest.approx(fixed, abs=1e-9)


def test_extreme_log_ratios_finite():
    old = torch.log(T([[0.5, 0.5, 0.01, 0.01]]))
    logp = (old + T([[100.0, -100.0, 100.0, -100.0]])).requires_grad_(True)
    for A in (1.0, -1.0):
        loss, _ = dcpo_loss(logp, old, T([A]), torch.ones(1, 4), **loss_kw(num_tokens=4))
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_garbage_at_masked_positions(beta):
    old = torch.log(T([[0.5, 0.2, 0.3, 0.3]]))
    logp_val = old + T([[0.1, -0.2, 0.0, 0.0]])
    ref = old + 0.05
    mask = T([[1.0, 1.0, 0.0, 0.0]])
    kw = loss_kw(num_tokens=2, beta=beta)
    clean = logp_val.clone().requires_grad_(True)
    loss_c, m_c = dcpo_loss(clean, old, T([1.0]), mask, ref_logps=ref, **kw)
    (g_c,) = torch.autograd.grad(loss_c, clean)
    dirty = logp_val.clone()
    dirty[0, 2:] = T([math.nan, math.inf])
    dirty_old, dirty_ref = old.clone(), ref.clone()
    dirty_old[0, 2:] = T([-math.inf, math.nan])
    dirty_ref[0, 2:] = T([math.nan, -math.inf])
    dirty = dirty.requires_grad_(True)
    loss_d, m_d = dcpo_loss(dirty, dirty_old, T([1.0]), mask, ref_logps=dirty_ref, **kw)
    (g_d,) = torch.autograd.grad(loss_d, dirty)
    assert loss_d.item() == loss_c.item()
    assert torch.equal(g_d, g_c) and torch.isfinite(g_d).all()
    assert m_d == m_c


def test_optional_k3_term():
    # (pi_theta, pi_ref) = (0.5, 0.25), A = 0 so only the KL term is left: k3 = 0.5 + ln 2 - 1
    logp, ref = torch.log(T([[0.5]])), torch.log(T([[0.25]]))
    kw = loss_kw(loss_type="dapo")
    loss, m = dcpo_loss(logp, logp, T([0.0]), torch.ones(1, 1), beta=1.0, ref_logps=ref, **kw)
    assert loss.item() == pytest.approx(0.1931472, abs=1e-6) and m["kl"] == pytest.approx(0.1931472, abs=1e-6)
    loss0, m0 = dcpo_loss(logp, logp, T([0.0]), torch.ones(1, 1), **kw)  # beta = 0: no KL at all
    assert loss0.item() == 0.0 and "kl" not in m0


# ---------------------------------------------------------------- 8. OTM aggregation

OTM_ROWS = [[1, 3], [2, 2, 2, 6], [4], [0, 2]]  # G = 2: prompt 1 = rows 0, 1; prompt 2 = rows 2, 3


def otm_batch(garbage=1e6):
    loss, mask = torch.full((4, 4), garbage), torch.zeros(4, 4)
    for i, row in enumerate(OTM_ROWS):
        loss[i, :len(row)] = T(row, dtype=torch.float32)
        mask[i, :len(row)] = 1.0
    return loss, mask


@pytest.mark.parametrize("loss_type,want", [("otm", 5.0), ("grpo", 2.5), ("dapo", 22 / 9), ("otm_token_sum", 5.5)])
@pytest.mark.parametrize("garbage", [1e6, math.nan, math.inf])
def test_aggregation(loss_type, want, garbage):
    loss, mask = otm_batch(garbage)
    assert dcpo_aggregate_loss(loss, mask, loss_type, 4, 9, 2).item() == pytest.approx(want, abs=1e-6)


def test_aggregation_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        dcpo_aggregate_loss(*otm_batch(), "token-mean", 4, 9, 2)


def test_otm_paper_example_weights():
    # A = 1 at length 500, A = 0.5 at length 1500. The weight on each response's mean log-prob is
    # 1 and 0.5 under OTM; the token mean gives 500/2000 * 1 = 0.25 and 1500/2000 * 0.5 = 0.375.
    logp = torch.zeros(2, 1500, requires_grad=True)
    mask = torch.zeros(2, 1500)
    mask[0, :500] = 1
    mask[1, :] = 1
    for loss_type, w in (("otm", (1.0, 0.5)), ("dapo", (0.25, 0.375))):
        loss, _ = dcpo_loss(logp, logp.detach(), T([1.0, 0.5]), mask, **loss_kw(2, 2000, 2, loss_type))
        (g,) = torch.autograd.grad(loss, logp)
        assert (-g[0].sum()).item() == pytest.approx(w[0], rel=1e-5)
        assert (-g[1].sum()).item() == pytest.approx(w[1], rel=1e-5)


@pytest.mark.parametrize("loss_type", ["otm", "grpo", "dapo", "otm_token_sum"])
def test_microbatch_accumulation_equals_full_batch(loss_type):
    torch.manual_seed(0)
    B, L, G = 4, 6, 2
    old = torch.log_softmax(torch.randn(B, L, 5), -1)[..., 0]  # [B, L] plausible log-probs
    base = old + 0.3 * torch.randn(B, L)  # ratio != 1, so the clip binds somewhere
    mask = torch.zeros(B, L)
    for i, n in enumerate([2, 6, 3, 1]):
        mask[i, :n] = 1
    adv = T([1.0, -1.0, 0.5, -0.5])
    kw = loss_kw(B, float(mask.sum()), G, loss_type)
    full = base.clone().requires_grad_(True)
    loss_full, _ = dcpo_loss(full, old, adv, mask, **kw)
    loss_full.backward()
    micro, total = base.clone().requires_grad_(True), 0.0
    for i in range(B):  # micro-batches of one row, each scaled by the whole batch's counts
        loss_i, _ = dcpo_loss(micro[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], **kw)
        loss_i.backward()
        total += loss_i.item()
    assert total == pytest.approx(loss_full.item(), abs=1e-6)
    assert torch.allclose(micro.grad, full.grad, atol=1e-6) and full.grad.abs().sum() > 0


# ---------------------------------------------------------------- 9. counterfactual metrics

CLIP_TOKENS = [(+1, 0.05, 1.5), (+1, 0.05, 3.0), (-1, 0.3, 0.7), (-1, 0.3, 0.4),
               (+1, 0.95, 1.15), (-1, 0.95, 0.79), (-1, 0.7, 12.0), (+1, 0.7, 1.0)]  # (A, q, r)


def clip_batch():
    """The docstring example of dcpo_loss as 8 rows of one token (+ a garbage padded position)."""
    A = T([t[0] for t in CLIP_TOKENS], dtype=torch.float32)
    old = torch.log(T([[t[1], 1e-30] for t in CLIP_TOKENS]))
    logp = old + torch.log(T([[t[2], 50.0] for t in CLIP_TOKENS]))
    mask = T([[1.0, 0.0]] * len(CLIP_TOKENS))
    return logp, old, A, mask


def test_clip_metrics_hand_counts():
    logp, old, A, mask = clip_batch()
    _, m = dcpo_loss(logp, old, A, mask, **loss_kw(8, 8))
    assert m["clip_ratio/dcpo"] == pytest.approx(3 / 8)
    assert m["clip_ratio/dcpo_low"] == m["clip_ratio/dcpo_high"] == m["clip_ratio/dcpo_cap"] == pytest.approx(1 / 8)
    assert m["clip_ratio/fixed_0.2"] == pytest.approx(5 / 8)
    want_dcpo = {"q<0.1": 0.5, "q0.1-0.5": 0.5, "q0.5-0.9": 0.5, "q>=0.9": 0.0}
    want_fixed = {"q<0.1": 1.0, "q0.1-0.5": 1.0, "q0.5-0.9": 0.0, "q>=0.9": 0.5}
    for b in want_dcpo:
        assert m[f"clip_ratio/dcpo/{b}"] == pytest.approx(want_dcpo[b])
        assert m[f"clip_ratio/fixed_0.2/{b}"] == pytest.approx(want_fixed[b])
        assert m[f"dac/token_share/{b}"] == pytest.approx(0.25)
    assert m["dac/mean_r_high/q<0.1"] == pytest.approx(0.5 + 0.5 * math.sqrt(1 + 0.8 / 0.05), rel=1e-6)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    # the fixed band is the shared --epsilon / --epsilon-high: 0.28 above no longer clips token 5 (r 1.15)
    _, m28 = dcpo_loss(logp, old, A, mask, fixed_band=(0.2, 0.28), **loss_kw(8, 8))
    assert m28["clip_ratio/fixed_0.2"] == pytest.approx(5 / 8)  # token 1 (r 1.5) still clipped
    _, m6 = dcpo_loss(logp, old, A, mask, fixed_band=(0.2, 0.6), **loss_kw(8, 8))
    assert m6["clip_ratio/fixed_0.2"] == pytest.approx(4 / 8)


def test_metrics_averaged_over_microbatches_equal_the_whole_batch():
    logp, old, A, mask = clip_batch()
    _, whole = dcpo_loss(logp, old, A, mask, **loss_kw(8, 8))
    avg = common.MetricAverager()
    for rows in ([0, 2, 4], [1, 3, 5, 6, 7]):  # uneven micro-batches, uneven buckets
        _, m = dcpo_loss(logp[rows], old[rows], A[rows], mask[rows], **loss_kw(8, 8))
        add_dcpo_metrics(avg, m, mask[rows].sum().item(), last_pass=True)
    means = avg.means()
    for k, v in whole.items():
        if k != "policy_loss":  # a partial sum per micro-batch, not a mean
            assert means[k] == pytest.approx(v, abs=1e-6), k


# ---------------------------------------------------------------- 5-7. SAS


def run_visits(seq, sas_std="population", key=0):
    """Visit one prompt with each reward list in seq; return [(advantages, stat)] per visit."""
    stats = PromptStats(len(seq[0]), sas_std)
    out = []
    for rewards in seq:
        adv, new, _ = sas_advantages(T(rewards, dtype=torch.float32), len(rewards), [key], stats)
        stats.by_id.update(new)
        out.append((adv, stats.by_id[key]))
    return out


def test_sas_first_visit_is_plain_population_standardisation():
    torch.manual_seed(1)
    r = torch.rand(3 * 5)
    adv, _, m = sas_advantages(r, 5, [0, 1, 2], PromptStats(5))
    g = r.view(3, 5).double()
    plain = (g - g.mean(1, keepdim=True)) / g.std(1, unbiased=False, keepdim=True)
    assert torch.allclose(adv.double(), plain.reshape(-1), atol=1e-6)
    assert m["rur"] == m["rur/grpo"] == 1.0 and m["sas/mean_visits"] == 1.0


def test_sas_g4_three_visits():
    (a1, s1), (a2, s2), (a3, s3) = run_visits([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert (s1.visits, s1.mean, s1.std) == (1, pytest.approx(0.25), pytest.approx(0.4330127, abs=1e-7))
    assert torch.allclose(a1, T([1.7320508, -0.5773503, -0.5773503, -0.5773503]))
    # grpo.py's unbiased std gives 1.5; the ratio is sqrt(3/4)
    assert grpo.compute_advantages(T([1.0, 0, 0, 0]), 4, eps_std=0.0)[0].item() == pytest.approx(1.5)
    assert a1[0].item() * math.sqrt(3 / 4) == pytest.approx(1.5, abs=1e-6)
    assert (s2.visits, s2.mean, s2.std) == (2, pytest.approx(0.625), pytest.approx(0.4841229, abs=1e-7))
    assert torch.allclose(a2, torch.full((4,), 0.3872983))
    assert (s3.visits, s3.mean, s3.std) == (3, pytest.approx(0.4166667, abs=1e-7), pytest.approx(0.4930066, abs=1e-7))
    assert torch.allclose(a3, torch.full((4,), -0.2817181))


def test_sas_all_equal_gets_signal_only_after_variance():
    out = run_visits([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(out[0][0], torch.zeros(4)) and torch.equal(out[1][0], torch.zeros(4))
    a3, s3 = out[2]
    assert s3.mean == pytest.approx(0.8333333, abs=1e-7) and s3.std == pytest.approx(0.3726780, abs=1e-7)
    assert torch.allclose(a3, T([0.6314757, 0.6314757, -1.4120227, -1.4120227]))  # SA_tot, SA_new win
    a4, s4 = out[3]  # all-equal again, but the prompt has shown variance: (1/i) * A_tot > 0
    want = 0.25 * (1 - s4.mean) / s4.std
    assert want > 0 and torch.allclose(a4, torch.full((4,), want))
    for adv, stat in run_visits([[0, 0, 0, 0]] * 3):  # always all-wrong: exactly zero forever
        assert torch.equal(adv, torch.zeros(4)) and stat.std == 0.0


def test_sas_g16_population_and_unbiased():
    seq = [[1] * 8 + [0] * 8, [1] * 16, [1] * 16, [1] * 12 + [0] * 4]
    pop = run_visits(seq)
    assert [a[0].item() for a, _ in pop] == pytest.approx([1.0, 0.2886751, 0.1490712, 0.5046259], abs=1e-6)
    assert pop[0][0][-1].item() == pytest.approx(-1.0, abs=1e-6)
    assert pop[3][0][-1].item() == pytest.approx(-1.8194546, abs=1e-6)
    unb = run_visits(seq, sas_std="unbiased")  # the official code's torch.std
    assert [a[0].item() for a, _ in unb] == pytest.approx([0.9682458, 0.2824663, 0.1461763, 0.4917180], abs=1e-6)
    assert unb[3][0][-1].item() == pytest.approx(-1.7661803, abs=1e-6)


def test_sas_running_stats_equal_pooled_stats():
    rng = random.Random(0)
    for _ in range(20):
        G = rng.choice([2, 4, 8])
        stat, seen = None, []
        for _ in range(rng.randint(1, 8)):
            r = [rng.choice([0.0, 1.0, -1.0, rng.random()]) for _ in range(G)]
            seen += r
            _, stat = sas_group_advantages(T(r, dtype=torch.float64), stat)
        allr = T(seen, dtype=torch.float64)
        assert stat.mean == pytest.approx(allr.mean().item(), abs=1e-9)
        assert stat.std == pytest.approx(allr.std(unbiased=False).item(), abs=1e-9)


def test_sas_tie_selects_sa_tot():
    got = sas_blend(T([1.0], dtype=torch.float64), T([-1.0], dtype=torch.float64), 3)
    assert got.item() == pytest.approx(-1 / 3)  # SA_new = +1/3, SA_tot = -1/3
    assert sas_blend(T([2.0]), T([1.0]), 2).item() == 1.5  # i = 2: the 50/50 average
    assert sas_blend(T([2.0]), T([2.0]), 1).item() == 2.0  # i = 1: A_tot = A_new, as mu_tot = mu_new


def test_sas_save_mid_run_resume_identical_advantages(tmp_path):
    """Save after visit 2 exactly as a checkpoint does (torch.save of run.state), reload, go on."""
    visits = [[1, 0, 0, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1, 1, 1]]
    ids, hashes = [17, 42], [prompt_hash("what is 2+2?"), prompt_hash("what is 3+3?")]
    batches = [T(v, dtype=torch.float32) for v in visits]

    straight, straight_advs = PromptStats(4), []
    for b in batches:
        adv, new, _ = sas_advantages(b, 4, ids, straight, True, hashes)
        straight.by_id.update(new)
        straight_advs.append(adv)

    first = PromptStats(4)
    for b in batches[:2]:
        _, new, _ = sas_advantages(b, 4, ids, first, True, hashes)
        first.by_id.update(new)
    torch.save({"state": {"step": 2, "prompt_stats": first.state_dict()}}, tmp_path / "trainer_state.pt")
    assert json.loads(json.dumps(first.state_dict())) == first.state_dict()  # plain python, JSON-safe too
    saved = torch.load(tmp_path / "trainer_state.pt", weights_only=False)["state"]["prompt_stats"]
    resumed = PromptStats(4)
    resumed.load_state_dict(saved, {17: hashes[0], 42: hashes[1]})
    assert resumed.by_id == first.by_id and isinstance(resumed.by_id[42], PromptStat)
    adv3, new3, _ = sas_advantages(batches[2], 4, ids, resumed, True, hashes)
    assert torch.equal(adv3, straight_advs[2])  # bit-identical
    assert new3 == {k: straight.by_id[k] for k in ids}
    # without the saved statistics visit 3 would be a first visit: different advantages
    assert not torch.equal(sas_advantages(batches[2], 4, ids, PromptStats(4))[0], adv3)


def test_sas_repeated_prompt_in_one_batch_is_consecutive_visits():
    stats = PromptStats(4)
    adv, new, m = sas_advantages(T([1.0, 0, 0, 0, 1, 1, 1, 1]), 4, [5, 5], stats)
    assert torch.allclose(adv[4:], torch.full((4,), 0.3872983))  # the second occurrence is visit 2
    assert new[5].visits == 2 and len(stats.by_id) == 0  # pure: stats untouched until the caller commits
    assert m["sas/mean_visits"] == 1.5


def test_sas_metrics_and_no_sas_flag():
    stats = PromptStats(4)
    stats.by_id.update(sas_advantages(T([1.0, 0, 0, 0]), 4, [7], stats)[1])
    rewards = T([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0])  # prompts 7 (seen before), 8, 9 (new)
    adv, _, m = sas_advantages(rewards, 4, [7, 8, 9], stats)
    assert m["rur"] == pytest.approx(8 / 12) and m["rur/grpo"] == pytest.approx(4 / 12)
    assert m["sas/frac_zero_var_groups"] == pytest.approx(2 / 3)
    assert m["sas/frac_zero_var_groups_with_signal"] == pytest.approx(1 / 3)
    assert m["sas/prompts_tracked"] == 3.0 and m["sas/mean_visits"] == pytest.approx(4 / 3)
    assert m["sas/adv_group_mean"] == pytest.approx(0.3872983 / 3, abs=1e-6)
    adv_off, new_off, m_off = sas_advantages(rewards, 4, [7, 8, 9], stats, use_sas=False)
    assert torch.equal(adv_off[:8], torch.zeros(8)) and m_off["rur"] == m_off["rur/grpo"]
    assert new_off[7].visits == 2  # --no-sas still keeps the statistics (for the metrics)


def test_sas_refusals():
    stats = PromptStats(4)
    with pytest.raises(ValueError):  # group size changed
        sas_advantages(torch.zeros(6), 2, [0, 1, 2], stats)
    with pytest.raises(ValueError):  # singleton groups
        sas_group_advantages(torch.zeros(1), None)
    with pytest.raises(ValueError):  # one id per group
        sas_advantages(torch.zeros(8), 4, [0, 0, 1], stats)
    stats.by_id.update(sas_advantages(T([1.0, 0, 0, 0]), 4, [0], stats, True, [prompt_hash("a")])[1])
    state = stats.state_dict()
    with pytest.raises(UserError, match="--num-generations 4"):
        PromptStats(8).load_state_dict(state)
    with pytest.raises(UserError, match="--sas-std population"):
        PromptStats(4, "unbiased").load_state_dict(state)
    with pytest.raises(UserError, match="now name other questions"):  # a reordered or other dataset
        PromptStats(4).load_state_dict(state, {0: prompt_hash("b")})
    PromptStats(4).load_state_dict(state, {0: prompt_hash("a")})


# ---------------------------------------------------------------- Args: shared settings, DCPO flags


def test_shared_settings_match_grpo():
    ours = {f.name: f for f in dataclasses.fields(dcpo.Args)}
    for f in dataclasses.fields(grpo.Args):
        if f.name in ours and f.name != "loss_type":
            assert (ours[f.name].default, ours[f.name].type) == (f.default, f.type), f.name
    src = {name: [l for l in (ROOT / f"{name}.py").read_text().splitlines() if l.startswith(("TINY_", "HUB_"))]
           for name in ("grpo", "dcpo")}
    assert src["dcpo"] == src["grpo"] and len(src["grpo"]) == 2
    a = common.parse_args(dcpo.Args, [])
    assert (a.eps_low, a.eps_high, a.ratio_max, a.sas, a.sas_std, a.loss_type) == (0.16, 0.20, 10.0, True, "population", "otm")
    a = common.parse_args(dcpo.Args, ["--eps-low", "0.2", "--eps-high", "0.28", "--no-sas", "--sas-std", "unbiased",
                                      "--loss-type", "grpo"])
    assert (a.eps_low, a.eps_high, a.sas, a.sas_std, a.loss_type) == (0.2, 0.28, False, "unbiased", "grpo")


# ---------------------------------------------------------------- the training loop

LOOP = ["--prompts-per-step", "2", "--num-generations", "4", "--eval-size", "2", "--max-completion-length", "8",
        "--eval-every", "1000", "--save-every", "1000", "--log-completions-every", "1000"]


def test_loop_resume_restores_stats_and_repeats_advantages(random_tiny_model_dir, tmp_path, monkeypatch):
    """3 training prompts (so they come back every 1.5 steps) and a reward with variance: run 4 steps
    straight, or 2 steps + --resume to 4. SAS must give bit-identical advantages at steps 3 and 4."""
    real_load = common.load_task
    monkeypatch.setattr(common, "load_task", lambda task, split, d=None, *ops: real_load(task, split, d, *ops)[:3])
    monkeypatch.setattr(common, "reward_fn", lambda texts, answers: [float(len(t) % 2) for t in texts])
    seen = []

    def recording(*a, **k):
        out = real_sas(*a, **k)
        seen.append(out[0].clone())
        return out

    real_sas = dcpo.sas_advantages
    monkeypatch.setattr(dcpo, "sas_advantages", recording)
    base = ["--model", str(random_tiny_model_dir), *LOOP]

    common.run_main(dcpo.main, dcpo.Args, base + ["--total-steps", "4", "--output-dir", str(tmp_path / "a")])
    straight, seen[:] = list(seen), []
    common.run_main(dcpo.main, dcpo.Args, base + ["--total-steps", "2", "--output-dir", str(tmp_path / "b")])
    (run_b,) = list((tmp_path / "b").iterdir())
    common.run_main(dcpo.main, dcpo.Args, base + ["--total-steps", "4", "--resume", str(run_b)])
    assert len(straight) == 4 and len(seen) == 4
    for s, r in zip(straight[2:], seen[2:]):
        assert torch.equal(s, r)
    assert any((a != 0).any() for a in straight)

    (run_a,) = list((tmp_path / "a").iterdir())
    final = [torch.load(run / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=False)["state"]
             for run in (run_a, run_b)]
    assert final[0]["prompt_stats"] == final[1]["prompt_stats"]
    visits = {k: v for k, v, *_ in final[0]["prompt_stats"]["prompts"]}
    assert sorted(visits) == [0, 1, 2] and sum(visits.values()) == 8  # 4 steps x 2 prompts, revisited


TINY_RUN = ["--prompts-per-step", "2", "--num-generations", "2", "--eval-size", "4",
            "--max-completion-length", "8", "--eval-every", "1", "--log-completions-every", "1"]
DCPO_METRICS = ("clip_ratio/dcpo", "clip_ratio/dcpo_low", "clip_ratio/dcpo_high", "clip_ratio/dcpo_cap",
                "clip_ratio/fixed_0.2", "clip_ratio/dcpo/q>=0.9", "clip_ratio/fixed_0.2/q<0.1",
                "dac/token_share/q>=0.9", "dac/mean_r_high/q0.5-0.9", "rur", "rur/grpo", "sas/prompts_tracked",
                "sas/mean_visits", "sas/frac_zero_var_groups", "sas/frac_zero_var_groups_with_signal",
                "sas/adv_group_mean", "grad_norm", "entropy", "reward", "policy_loss", "approx_kl_old")


def saved_stats(run_dir, step):
    state = torch.load(run_dir / "checkpoints" / f"step-{step:07d}" / "trainer_state.pt", weights_only=False)["state"]
    return {k: (v, m, s, h) for k, v, m, s, h in state["prompt_stats"]["prompts"]}


def test_two_steps_end_to_end_then_resume(random_tiny_model_dir, tmp_path):
    m = ["--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path), *TINY_RUN]
    out = run_script("dcpo", *m, "--total-steps", "2", fake_reward=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list(tmp_path.iterdir())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in DCPO_METRICS:
        assert key in rows[1], key
    assert json.loads((run_dir / "config.json").read_text())["algo"] == "dcpo"
    ckpt = run_dir / "checkpoints" / "step-0000002"
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))
    assert "held-out greedy accuracy" in out.stdout and str(run_dir) in out.stdout
    assert any(r.get("rur", 0) > 0 for r in rows) and any(r.get("grad_norm", 0) > 0 for r in rows)
    stats2 = saved_stats(run_dir, 2)
    assert len(stats2) == 4 and all(v == 1 for v, *_ in stats2.values())  # 2 steps x 2 new prompts

    out = run_script("dcpo", *m, "--total-steps", "3", "--resume", str(run_dir))  # plain `python dcpo.py`
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed" in out.stderr
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "rur" in rows[3]
    stats3 = saved_stats(run_dir, 3)
    assert len(stats3) == 6 and {k: stats3[k] for k in stats2} == stats2  # restored, then 2 new prompts
