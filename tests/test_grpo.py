"""GRPO's advantage, clip, k3, aggregation, entropy mask and log-probs against hand-computed
numbers (the worked numbers of docs/grpo.md, "The math"), numbered 1-12."""
import dataclasses
import importlib
import math

import pytest
import torch

import common
import grpo
from conftest import RENAMED_IN_TOKEN_DPO, field_name
from grpo import (aggregate_loss, clipped_objective, compute_advantages, entropy_token_mask, grpo_loss, k3_kl)

T = torch.tensor


# 1. advantages of [1, 0, 0, 0]: mu 0.25, unbiased sigma 0.5
def test_advantages_hand_numbers():
    r = T([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(compute_advantages(r, 4, eps_std=0.0), T([1.5, -0.5, -0.5, -0.5]))
    a = compute_advantages(r, 4)  # eps_std = 1e-4
    assert torch.allclose(a, T([1.4997000600, -0.4999000200, -0.4999000200, -0.4999000200]), atol=1e-7)
    assert torch.allclose(compute_advantages(r, 4, "none"), T([0.75, -0.25, -0.25, -0.25]))
    # the population std would give 0.75 / 0.4330127 = 1.7320508: must NOT be what we compute
    assert not math.isclose(compute_advantages(r, 4, eps_std=0.0)[0].item(), 1.7320508, abs_tol=1e-3)


# 2. groups are independent
def test_groups_independent():
    a = compute_advantages(T([1.0, 0, 0, 0, 1, 1, 0, 0]), 4, eps_std=0.0)
    assert torch.allclose(a[:4], T([1.5, -0.5, -0.5, -0.5]))
    assert torch.allclose(a[4:], T([0.8660254, 0.8660254, -0.8660254, -0.8660254]), atol=1e-6)


# 3. all-equal groups: exactly 0, no NaN, finite gradients; G = 1 refused
def test_all_equal_groups_zero():
    for r in (T([1.0, 1, 1, 1]), T([0.3, 0.3, 0.3, 0.3])):
        for scale in ("group", "none"):
            a = compute_advantages(r, 4, scale)
            assert torch.equal(a, torch.zeros(4))
    logps = torch.randn(4, 3, requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), compute_advantages(T([0.3] * 4), 4), torch.ones(4, 3),
                        epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", num_sequences=4, num_tokens=12,
                        max_completion_length=3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages(T([1.0, 0.0]), 1)


# 4. aggregation with garbage at masked positions
def test_aggregation_hand_numbers():
    losses = T([[1.0, 3.0, 1e6, 1e6], [2.0, 2.0, 2.0, 6.0]])
    mask = T([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    assert aggregate_loss(losses, mask, "grpo", 2, 6, 8).item() == pytest.approx(2.5)
    assert aggregate_loss(losses, mask, "dapo", 2, 6, 8).item() == pytest.approx(16 / 6)
    assert aggregate_loss(losses, mask, "dr_grpo", 2, 6, 8).item() == pytest.approx(1.0)


# 5. micro-batches of 1 accumulate to the full-batch gradient
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_microbatch_accumulation(loss_type):
    torch.manual_seed(0)
    B, L = 4, 5
    logps = torch.randn(B, L, requires_grad=True)
    old = logps.detach() + 0.1 * torch.randn(B, L)
    adv = torch.randn(B)
    mask = T([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, num_sequences=B,
              num_tokens=mask.sum().item(), max_completion_length=L)
    full, _ = grpo_loss(logps, old, adv, mask, **kw)
    (g_full,) = torch.autograd.grad(full, logps)
    g_acc = torch.zeros_like(logps)
    for i in range(B):
        part, _ = grpo_loss(logps[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], **kw)
        g_acc += torch.autograd.grad(part, logps)[0]
    assert torch.allclose(g_full, g_acc, atol=1e-6)


# 6. clipping, per-token objective s with eps 0.2
@pytest.mark.parametrize("adv,ratio,eps_high,s_expected,grad_expected", [
    (1.0, 1.5, 0.2, 1.2, 0.0),     # clipped above: no gradient
    (1.0, 1.25, 0.28, 1.25, None),  # clip-higher: not clipped
    (-1.0, 0.5, 0.2, -0.8, 0.0),    # clipped below: no gradient
    (-1.0, 1.5, 0.2, -1.5, 1.5),    # pessimistic side, not clipped: d loss / d logp = 1.5
])
def test_clipping(adv, ratio, eps_high, s_expected, grad_expected):
    logp = torch.tensor([math.log(ratio)], requires_grad=True)
    s, _ = clipped_objective(logp, torch.zeros(1), torch.tensor([adv]), 0.2, eps_high)
    assert s.item() == pytest.approx(s_expected, abs=1e-6)
    (-s).sum().backward()  # the loss is -s
    if grad_expected is not None:
        assert logp.grad.item() == pytest.approx(grad_expected, abs=1e-6)
    else:
        assert logp.grad.item() != 0.0


# 7. first pass: ratio == 1 exactly, loss 0 with a non-zero gradient; then ratio != 1
def test_first_pass_ratio_one(random_tiny_model_dir):
    model, tok = common.load_model_and_tokenizer(str(random_tiny_model_dir), torch.device("cpu"), torch.float32)
    prompt_ids, prompt_mask = common.left_pad([[5, 6, 7], [8, 9]] * 2, tok.pad_token_id, "cpu")
    completion_ids = torch.tensor([[10, 11, 1, 0], [12, 1, 0, 0], [13, 14, 15, 16], [17, 18, 1, 0]])
    mask = common.completion_mask_from_ids(completion_ids, tok.eos_token_id)
    with torch.no_grad():
        old, _ = common.per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 1.0)
    logps, _ = common.per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 1.0)
    assert torch.equal(logps.detach(), old)  # bit-identical: dropout is off, same layout
    adv = compute_advantages(T([1.0, 0, 0, 0]), 4, eps_std=0.0)
    loss, m = grpo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                        num_sequences=4, num_tokens=mask.sum().item(), max_completion_length=4)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert gnorm > 0
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    with torch.no_grad():
        new, _ = common.per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 1.0)
    assert not torch.equal(new, old)


# 8. k3
def test_k3():
    assert k3_kl(T([math.log(0.5)]), T([math.log(0.25)])).item() == pytest.approx(0.1931472, abs=1e-6)
    x = torch.randn(100)
    assert torch.equal(k3_kl(x, x), torch.zeros(100))
    assert (k3_kl(torch.randn(1000), torch.randn(1000)) >= 0).all()
    assert torch.isfinite(k3_kl(T([0.0, 0.0]), T([50.0, -50.0]))).all()


# 9. with beta = 0 no reference model is constructed
def test_no_reference_model_when_beta_zero(random_tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = common.load_model_and_tokenizer
    monkeypatch.setattr(common, "load_model_and_tokenizer", lambda *a, **k: calls.append(a) or real(*a, **k))
    base = ["--model", str(random_tiny_model_dir), "--total-steps", "1", "--prompts-per-step", "2",
            "--num-generations", "2", "--eval-size", "2", "--max-completion-length", "4",
            "--output-dir", str(tmp_path)]
    common.run_main(grpo.main, grpo.Args, base)
    assert len(calls) == 1
    common.run_main(grpo.main, grpo.Args, base + ["--beta", "0.04"])
    assert len(calls) == 3  # policy + reference


# 10. top-entropy mask
def test_entropy_mask():
    ent = torch.cat([torch.arange(1, 11) / 10.0, T([5.0, 5.0])])[None]     # [1, 12]
    mask = torch.cat([torch.ones(10), torch.zeros(2)])[None]
    kept, tau = entropy_token_mask(ent, mask, 0.2)
    assert tau == pytest.approx(0.82, abs=1e-6)
    assert kept[0].tolist() == [0.0] * 8 + [1.0, 1.0, 0.0, 0.0]
    kept_all, _ = entropy_token_mask(ent, mask, 1.0)
    assert torch.equal(kept_all, mask)
    V = 50
    assert common.entropy_from_logits(torch.zeros(1, V)).item() == pytest.approx(math.log(V), abs=1e-5)
    assert common.entropy_from_logits(T([[100.0] + [0.0] * (V - 1)])).item() == pytest.approx(0.0, abs=1e-6)


# 11. log-prob utility and masks (pad == EOS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logps_match_reference(random_tiny_model_dir, temperature):
    model, tok = common.load_model_and_tokenizer(str(random_tiny_model_dir), torch.device("cpu"), torch.float32)
    prompt_ids, prompt_mask = common.left_pad([[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu")
    completion_ids = torch.tensor([[20, 21, 22], [23, 1, 1]])
    mask = common.completion_mask_from_ids(completion_ids, tok.eos_token_id)
    with torch.no_grad():
        ours, _ = common.per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, temperature)
        # reference: each row on its own, unpadded, full logits, plain log_softmax.gather
        for i in range(2):
            p = prompt_ids[i][prompt_mask[i].bool()]
            ids = torch.cat([p, completion_ids[i]])[None]
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float() / temperature
            ref = torch.log_softmax(logits, -1).gather(-1, completion_ids[i][:, None]).squeeze(-1)
            m = mask[i].bool()
            assert torch.allclose(ours[i][m], ref[m], atol=1e-5)


def test_selective_log_softmax_values_and_grad():
    torch.manual_seed(0)
    for T_ in (1.0, 0.7):
        z = torch.randn(3, 7, 11, requires_grad=True)
        y = torch.randint(0, 11, (3, 7))
        ours = common.selective_log_softmax(z, y, T_, chunk=4)
        ref = torch.log_softmax(z.float() / T_, -1).gather(-1, y[..., None]).squeeze(-1)
        assert torch.allclose(ours, ref, atol=1e-6)
        w = torch.randn(3, 7)
        (g1,) = torch.autograd.grad((ours * w).sum(), z)
        (g2,) = torch.autograd.grad((ref * w).sum(), z)
        assert torch.allclose(g1, g2, atol=1e-6)


def test_completion_masks_pad_equals_eos():
    EOS = 2
    ids = T([[5, 7, EOS, EOS, EOS], [5, 7, 8, 9, 9], [EOS, EOS, EOS, EOS, EOS]]).long()
    assert common.completion_mask_from_ids(ids, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


# 12. shared base settings (docs/grpo.md, implementation details, item 1) are equal in the Args of
# all five scripts
SHARED_DEFAULTS = dict(num_generations=8, prompts_per_step=16, num_iterations=2, learning_rate=None,
                       max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=None,
                       beta=0.0, epsilon=0.2, epsilon_high=0.2, seed=0, model="tiny", task="arith",
                       total_steps=80, eval_every=20, eval_size=500, micro_batch_size=32)


@pytest.mark.parametrize("script", ["grpo", "tempo", "dcpo", "spo", "token_dpo"])
def test_shared_base_settings(script):
    try:
        mod = importlib.import_module(script)
    except ModuleNotFoundError:
        pytest.skip(f"{script}.py is not written yet")
    defaults = {f.name: f.default for f in dataclasses.fields(mod.Args)}
    for name, value in SHARED_DEFAULTS.items():
        if script == "token_dpo" and name in ("beta", "epsilon", "epsilon_high", "num_iterations"):
            continue  # DPO's beta is its own; it has no clip (docs/token_dpo.md)
        if script == "token_dpo":
            assert name not in RENAMED_IN_TOKEN_DPO or name not in defaults, \
                f"token_dpo.Args.{name} is back"
            name = field_name(script, name)  # its two settings with another meaning
        assert defaults.get(name) == value, f"{script}.Args.{name} = {defaults.get(name)!r}, shared default {value!r}"
    assert mod.TINY_LEARNING_RATE == grpo.TINY_LEARNING_RATE and mod.HUB_LEARNING_RATE == 1e-6
