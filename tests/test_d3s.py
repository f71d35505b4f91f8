"""D3S (grpo.py --d3s cross|intra): the hand examples, the k-scan solver against brute force,
the schedule, the reductions to GRPO and to the 80/20 mask, dropped rows, and grpo.main."""
import itertools
import json
import random
import shutil

import pytest
import torch

import common
import grpo
from conftest import run_grpo_main
from grpo import (compute_advantages, d3s_schedule, d3s_select, d3s_token_mask,
                  entropy_token_mask, grpo_loss, max_variance_subset)

REWARDS = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])  # g1, g2, g3 of the card


def pvar(values):
    x = torch.tensor(values, dtype=torch.float64)
    return x.var(correction=0).item()


def brute_force_best(values, m):
    return max(pvar([values[i] for i in s]) if m else 0.0
               for s in itertools.combinations(range(len(values)), m))


# ----------------------------------------------------------------------- hand examples
def test_hand_example_sample_level():
    adv = compute_advantages(REWARDS, 4)
    assert adv.tolist() == pytest.approx([1.4997001, -0.4999, -0.4999, -0.4999,
                                          0.8658754, 0.8658754, -0.8658754, -0.8658754,
                                          0, 0, 0, 0], abs=1e-6)
    intra = d3s_select(adv, 4, 2, "intra").tolist()
    assert intra == [0, 1, 4, 6, 8, 9]
    assert [pvar(adv[s].tolist()) for s in ([0, 1], [4, 6], [8, 9])] == pytest.approx(
        [0.9996001, 0.7497403, 0.0], abs=1e-6)
    assert pvar(adv[intra].tolist()) == pytest.approx(0.6386468, abs=1e-6)
    kept, k, variances = max_variance_subset(adv, 6)
    assert variances == pytest.approx([0.0848002, 0.6664090, 0.8292997, 0.8885602, 0.8122019,
                                       0.5942772, 0.3347003], abs=1e-6)
    assert k == 3 and kept == [0, 1, 4, 5, 6, 7]
    assert d3s_select(adv, 4, 2, "cross").tolist() == kept
    assert adv[kept].mean().item() == pytest.approx(0.1666333, abs=1e-6)
    assert pvar(adv.tolist()) == pytest.approx(0.4998134, abs=1e-6)
    assert brute_force_best(adv.tolist(), 6) == pytest.approx(variances[3], abs=1e-9)  # 924 sets


def test_hand_example_token_level():
    adv = torch.tensor([1.4997001, -0.4999000])
    H = torch.tensor([[0.1, 0.9, 0.3, 7.0], [1.2, 0.05, 0.6, 2.0]])  # 7.0: padding
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    scores = (adv.abs()[:, None] * H)[mask > 0]
    assert scores.tolist() == pytest.approx([0.1499700, 1.3497301, 0.4499100, 0.5998800,
                                             0.0249950, 0.2999400, 0.9998000], abs=1e-6)
    e, tau = d3s_token_mask(adv, H, mask, torch.tensor([0, 1]), 0.3)
    assert tau == pytest.approx(0.6798640, abs=1e-6)
    assert e.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    e_h, tau_h = entropy_token_mask(H, mask, 0.3)  # the 80/20 rule at the same share, H alone
    assert tau_h == pytest.approx(0.96, abs=1e-6) and e_h.tolist() == [[0, 0, 0, 0], [1, 0, 0, 1]]


def test_schedule():
    assert d3s_schedule(1, 80, 4, 8, 0.2, 1.0, 8) == (0.0, 4, pytest.approx(0.2))
    p, n, k = d3s_schedule(40, 80, 4, 8, 0.2, 1.0, 8)
    assert p == pytest.approx(0.4936709, abs=1e-6) and n == 6 and k == pytest.approx(0.5949367,
                                                                                      abs=1e-6)
    assert d3s_schedule(80, 80, 4, 8, 0.2, 1.0, 8) == (1.0, 8, pytest.approx(1.0))
    assert d3s_schedule(1, 1, 4, 8, 0.2, 1.0, 8)[:2] == (0.0, 4)   # one step: p = 0
    assert d3s_schedule(3, 3, 1, 12, 0.5, 0.5, 8)[1] == 8          # N clamped to G


# ------------------------------------------------------------------------------- solver
def test_kscan_equals_brute_force_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 10)
        values = [float(rng.choice([-2, -1, -0.5, 0, 0, 0.5, 1, 3])) for _ in range(n)]
        for m in range(n + 1):
            kept, k, variances = max_variance_subset(torch.tensor(values), m)
            assert len(kept) == m == len(set(kept))
            best = brute_force_best(values, m)
            assert pvar([values[i] for i in kept]) == pytest.approx(best, abs=1e-9) if m else True
            assert max(variances) == pytest.approx(best, abs=1e-9)


def test_binary_closed_form_equals_kscan():
    """c correct of G, m kept: the feasible number of positives k closest to m/2 (ties: smaller)."""
    rng = random.Random(1)
    for _ in range(200):
        G = rng.randint(2, 10)
        r = torch.tensor([float(rng.random() < 0.5) for _ in range(G)])
        adv = compute_advantages(r, G)
        c = int(r.sum())
        for m in range(1, G + 1):
            kept, _, _ = max_variance_subset(adv, m)
            positives = sum(1 for i in kept if r[i] > 0)
            if 0 < c < G:
                feasible = range(max(0, m - (G - c)), min(c, m) + 1)
                assert positives == min(feasible, key=lambda k: (abs(k - m / 2), k))
    for c, k in ((1, 1), (2, 2), (4, 2), (6, 2), (7, 3)):  # G = 8, m = 4, from the card
        adv = compute_advantages(torch.tensor([1.0] * c + [0.0] * (8 - c)), 8)
        assert sum(1 for i in max_variance_subset(adv, 4)[0] if i < c) == k


def test_selection_invariant_to_permutation():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(16, generator=g)
    perm = torch.randperm(16, generator=g)
    a, _, _ = max_variance_subset(values, 7)
    b, _, _ = max_variance_subset(values[perm], 7)
    assert sorted(values[a].tolist()) == sorted(values[perm][b].tolist())


def test_all_zero_advantages_keep_the_first_rows():
    assert d3s_select(torch.zeros(12), 4, 2, "cross").tolist() == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------- reductions
def batch(seed=0, P=3, G=4, L=6):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(L) < torch.randint(1, L + 1, (P * G,), generator=g)[:, None]).float()
    logps = (-torch.rand(P * G, L, generator=g)).requires_grad_()
    old = logps.detach() + 0.1 * torch.randn(P * G, L, generator=g)
    adv = compute_advantages((torch.rand(P * G, generator=g) > 0.5).float(), G)
    return logps, old, adv, mask, torch.rand(P * G, L, generator=g)


@pytest.mark.parametrize("mode", ["cross", "intra"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_n_equal_g_and_k_one_is_grpo(mode, loss_type):
    logps, old, adv, mask, H = batch()
    kept = d3s_select(adv, 4, 4, mode)
    assert kept.tolist() == list(range(12))
    e, _ = d3s_token_mask(adv, H, mask, kept, 1.0)
    assert torch.equal(e, mask)
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, loss_type=loss_type, num_sequences=12,
              num_tokens=mask.sum().item(), max_completion_length=6)
    ref, _ = grpo_loss(logps, old, adv, mask, **kw)
    ours, _ = grpo_loss(logps[kept], old[kept], adv[kept], mask[kept], token_mask=e[kept],
                        **dict(kw, num_sequences=len(kept), num_tokens=mask[kept].sum().item()))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    g_ref, = torch.autograd.grad(ref, logps)
    g_ours, = torch.autograd.grad(ours, logps)
    assert torch.allclose(g_ref, g_ours, atol=1e-6)


def test_unit_advantages_all_rows_is_the_80_20_mask():
    _, _, _, mask, H = batch(seed=1)
    ones = torch.ones(12)
    for q in (0.2, 0.5):
        assert torch.equal(d3s_token_mask(ones, H, mask, torch.arange(12), q)[0],
                           entropy_token_mask(H, mask, q)[0])


def test_dropped_rows_change_nothing():
    logps, old, adv, mask, H = batch(seed=2)
    kept = d3s_select(adv, 4, 2, "cross")
    e, _ = d3s_token_mask(adv, H, mask, kept, 0.5)
    dropped = [i for i in range(12) if i not in kept.tolist()]
    assert (e[dropped] == 0).all() and len(dropped) == 6
    H2 = H.clone()
    H2[dropped] = 100.0  # a dropped row's entropies do not enter the kept tokens' threshold
    assert torch.equal(d3s_token_mask(adv, H2, mask, kept, 0.5)[0], e)


# ------------------------------------------------------------------------ through grpo.main
def run_main(tmp_path, model_dir, monkeypatch, *extra, steps=2):
    reward = lambda completions, answers: [float(i % 2 and i % 3 != 1)  # noqa: E731
                                           for i in range(len(completions))]
    return run_grpo_main(tmp_path, model_dir, monkeypatch, reward, *extra, steps=steps,
                         prompts=3, micro_batch=5)


@pytest.mark.parametrize("mode", ["cross", "intra"])
def test_main_full_schedule_trains_exactly_as_grpo(mode, tmp_path, random_tiny_model_dir,
                                                   monkeypatch):
    _, plain = run_main(tmp_path, random_tiny_model_dir, monkeypatch, "--loss-type", "dapo",
                        steps=1)
    _, d3s = run_main(tmp_path, random_tiny_model_dir, monkeypatch, "--loss-type", "dapo",
                      "--d3s", mode, "--d3s-n-init", "4", "--d3s-n-final", "4", "--d3s-k-init", "1",
                      steps=1)
    for (name, p), q in zip(plain.named_parameters(), d3s.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_main_forwards_only_the_kept_rows(tmp_path, random_tiny_model_dir, monkeypatch):
    """Step 4 runs on the rows of S, with |S| and their tokens as the normalisers; the metrics
    follow the schedule."""
    seen = []
    real = grpo.grpo_loss

    def spy(logps, old_logps, advantages, completion_mask, **kw):
        seen.append((logps.size(0), kw["num_sequences"], kw["num_tokens"]))
        return real(logps, old_logps, advantages, completion_mask, **kw)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    rows, _ = run_main(tmp_path, random_tiny_model_dir, monkeypatch, "--d3s", "cross",
                       "--d3s-n-init", "2", "--d3s-n-final", "3", "--d3s-k-init", "0.3")
    first, last = rows[1], rows[2]
    assert (first["d3s/n_per_prompt"], first["d3s/k"], first["d3s/progress"]) == (2, 0.3, 0.0)
    assert (last["d3s/n_per_prompt"], last["d3s/k"], last["d3s/progress"]) == (3, 1.0, 1.0)
    assert first["d3s/kept_rollouts"] == 6 and last["d3s/kept_rollouts"] == 9
    assert "d3s/token_threshold" in first and "d3s/token_threshold" not in last
    per_pass = [sum(s[0] for s in seen[:2]), sum(s[0] for s in seen[4:6])]  # 2 mbs of <= 5 rows
    assert per_pass == [6, 9]
    assert {s[1] for s in seen[:4]} == {6} and {s[1] for s in seen[4:]} == {9}
    assert first["num_tokens"] == seen[0][2] and last["num_tokens"] == seen[-1][2]
    assert last["d3s/tokens_used_cum"] == pytest.approx(
        (first["d3s/tokens_used_frac"] + last["d3s/tokens_used_frac"]) / 2, abs=1e-6)
    for key in ("d3s/kept_frac", "d3s/groups_touched", "d3s/adv_var_kept", "d3s/adv_var_all",
                "d3s/adv_mean_kept", "d3s/useful_frac", "d3s/token_kept_frac",
                "d3s/token_kept_frac_nonzero", "grad_norm", "entropy", "approx_kl_old"):
        assert key in first, key
    assert first["d3s/adv_var_kept"] >= first["d3s/adv_var_all"]


def test_flag_combinations_are_refused():
    with pytest.raises(common.UserError, match="--top-entropy-quantile 1.0"):
        common.check_args(grpo.Args(d3s="cross", top_entropy_quantile=0.2), "grpo")
    with pytest.raises(common.UserError, match="--d3s-n-final must be at most --num-generations"):
        common.check_args(grpo.Args(d3s="intra", num_generations=4), "grpo")
    common.check_args(grpo.Args(num_generations=4), "grpo")           # D3S off: no such check
    common.check_args(grpo.Args(d3s="cross", d3s_n_final=4, num_generations=4), "grpo")
    for bad in (dict(d3s_k_init=0.0), dict(d3s_k_final=1.5), dict(d3s_n_init=0)):
        with pytest.raises(common.UserError):
            common.check_args(grpo.Args(d3s="cross", **bad), "grpo")


def test_resume_continues_the_schedule_and_the_running_mean(tmp_path, random_tiny_model_dir,
                                                            monkeypatch):
    """p comes from the absolute step, and d3s/tokens_used_cum's sums live in the checkpoint."""
    flags = ["--d3s", "cross", "--d3s-n-init", "2", "--d3s-n-final", "4", "--save-every", "1"]
    straight, _ = run_main(tmp_path, random_tiny_model_dir, monkeypatch, *flags, steps=3)
    run_main(tmp_path, random_tiny_model_dir, monkeypatch, *flags, steps=3)  # the same run
    assert [r.get("d3s/progress") for r in straight] == [None, 0.0, 0.5, 1.0]
    # the same run stopped after step 2 and resumed: its step 3 logs what the straight run did
    run_dir = next((tmp_path / "out1").iterdir())
    common.trim_jsonl(run_dir / "metrics.jsonl", 2)
    shutil.rmtree(run_dir / "checkpoints" / "step-0000003")
    common.run_main(grpo.main, grpo.Args, ["--resume", str(run_dir)])
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    for key in ("d3s/progress", "d3s/n_per_prompt", "d3s/tokens_used_cum"):
        assert rows[-1][key] == pytest.approx(straight[-1][key], abs=1e-6), key
