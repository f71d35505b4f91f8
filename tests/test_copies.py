"""The copies of grpo.py's functions stay identical to grpo.py's.

Each method script is standalone (CleanRL style): instead of importing grpo.py, tempo.py, dcpo.py
and spo.py copy the GRPO pieces they reuse (the advantage, the clipped objective, k3, the loss
reduction, ...). A copy that drifts would make `diff grpo.py X.py` lie about what the method
changes, so every top-level function of a method script that has the name of one of grpo.py's
must be grpo.py's, character for character (docstring included). The failure names the file to fix.
benchmarks/perf/_bench.py's `grpo_step` (the step every benchmark times) is a copy of grpo.main's
loop body, not of a function: it is checked by what it does (one step trains the weights exactly
as grpo.main's step does).
"""
import ast
import difflib
import sys

import pytest
import torch

from conftest import ROOT

import common  # noqa: E402
import dcpo  # noqa: E402
import grpo  # noqa: E402

SCRIPTS = ("tempo.py", "dcpo.py", "spo.py", "token_dpo.py")
TEMPLATE = {"main", "Args"}  # the parts every script rewrites on purpose
# Same name as in grpo.py but another function, on purpose. Reason, for whoever reads a failure:
# (none today: DCPO's own reduction, with its otm loss types and G, is `dcpo_aggregate_loss`)
DIFFERENT_ON_PURPOSE: dict = {}
# The copies there are today; a rename or a parse error must not make the test pass vacuously.
EXPECTED = {
    "tempo.py": {"compute_advantages", "clipped_objective", "k3_kl", "entropy_token_mask",
                 "aggregate_loss", "grpo_loss"},
    "dcpo.py": {"compute_advantages", "k3_kl"},
    "spo.py": {"clipped_objective", "k3_kl"},
}


def top_level(path) -> dict[str, str]:
    """name -> exact source of every top-level def/class, and of every top-level NAME = ... line."""
    src = path.read_text()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(src, node)
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)):
            out[node.targets[0].id] = ast.get_source_segment(src, node)
    return out


def test_every_copy_of_a_grpo_function_is_identical():
    reference = top_level(ROOT / "grpo.py")
    problems, checked = [], {}
    for script in SCRIPTS:
        own = top_level(ROOT / script)
        shared = (set(own) & set(reference)) - TEMPLATE
        checked[script] = shared
        for name in sorted(shared):
            if (script, name) in DIFFERENT_ON_PURPOSE:
                assert own[name] != reference[name], \
                    f"{script}: {name} is grpo.py's again; drop it from DIFFERENT_ON_PURPOSE"
                continue
            if own[name] != reference[name]:
                diff = "\n".join(difflib.unified_diff(
                    reference[name].splitlines(), own[name].splitlines(), "grpo.py", script,
                    lineterm="", n=1))
                problems.append(f"{script}: `{name}` differs from grpo.py's. Fix {script} (copy "
                                f"grpo.py's `{name}` over it), or give the new function another "
                                f"name.\n{diff}")
    assert not problems, "\n\n".join(problems)
    for script, names in EXPECTED.items():
        missing = sorted(names - checked[script])
        assert not missing, f"{script} no longer has copies of {missing}"


# ---------------------------------------------------------- masked positions never reach the loss
@pytest.mark.parametrize("loss_type, expected",
                         [("grpo", 2.5), ("dapo", 16 / 6), ("dr_grpo", 1.0)])
def test_nan_at_a_masked_position_does_not_reach_the_loss(loss_type, expected):
    """grpo.aggregate_loss's docstring example with NaN and inf in the two padded positions."""
    per_token = torch.tensor([[1.0, 3.0, float("nan"), float("inf")], [2.0, 2.0, 2.0, 6.0]],
                             requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    loss = grpo.aggregate_loss(per_token, mask, loss_type, num_sequences=2, num_tokens=6.0,
                               max_completion_length=8)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(per_token.grad).all() and (per_token.grad[0, 2:] == 0).all()
    # the same numbers as with the padding set to 0, so the where() form changes nothing else
    clean = torch.nan_to_num(per_token.detach(), nan=0.0, posinf=0.0)
    assert grpo.aggregate_loss(clean, mask, loss_type, 2, 6.0, 8).item() == loss.item()


def test_nan_log_prob_at_a_padded_position_does_not_reach_grpo_loss():
    """Through the whole grpo_loss (clip, k3): NaN log-probs at padded positions leave the
    loss finite and equal to the loss with finite padding."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logps = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -1.5, -1.0]])
    old = torch.tensor([[-1.1, -1.9, float("nan")], [-0.5, -1.4, -1.2]])
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, num_sequences=2, num_tokens=5.0,
              max_completion_length=3, beta=0.04, ref_logps=old - 0.1)
    clean = [torch.nan_to_num(x, nan=-3.0) for x in (logps, old)]
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        adv = torch.tensor([1.0, -0.5])
        loss, _ = grpo.grpo_loss(logps, old, adv, mask, loss_type=loss_type, **kw)
        ref, _ = grpo.grpo_loss(*clean, adv, mask, loss_type=loss_type,
                                **dict(kw, ref_logps=clean[1] - 0.1))
        assert torch.isfinite(loss) and loss.item() == ref.item(), loss_type


def test_dcpo_aggregate_loss_also_ignores_nan_at_masked_positions():
    per_token = torch.tensor([[1.0, 3.0, float("nan"), float("nan")], [2.0, 2.0, 2.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    loss = dcpo.dcpo_aggregate_loss(per_token, mask, "otm", num_sequences=2, num_tokens=6.0,
                                    num_generations=2)
    assert loss.item() == pytest.approx(5.0)   # one prompt: (2 + 3) / 1


# ------------------------------------------------------- the benchmarks' copy of grpo.main's step
def test_bench_grpo_step_trains_like_grpo_main(monkeypatch, tmp_path, random_tiny_model_dir):
    """benchmarks/perf/_bench.py's grpo_step is grpo.main's loop body (rollout, advantages, the mu
    passes, the optimizer step) without the logging. On the same completions and rewards, one
    step of each must leave bitwise the same weights, with beta > 0 (reference model) and two
    micro-batches. If this fails, grpo.main changed: change grpo_step in _bench.py with it.
    """
    sys.path.insert(0, str(ROOT / "benchmarks" / "perf"))
    import _bench as bench

    calls = []

    def fake_generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, num_generations=1,
                      temperature=1.0, top_p=1.0, top_k=0, greedy=False, row_keys=None):
        """Completions as a fixed function of the prompts: the same on both sides."""
        rows = prompt_ids.size(0) * (1 if greedy else num_generations)
        g = torch.Generator().manual_seed(int(prompt_ids.sum()))
        ids = torch.randint(4, len(tokenizer), (rows, max_new_tokens), generator=g)
        ends = torch.randint(2, max_new_tokens + 2, (rows,), generator=g)  # some never end
        for i, e in enumerate(ends.tolist()):
            if e < max_new_tokens:
                ids[i, e] = tokenizer.eos_token_id
        if not greedy:
            calls.append([p[m.bool()].tolist() for p, m in zip(prompt_ids, prompt_mask)])
        return ids.to(prompt_ids.device)

    parity = lambda completions, answers: bench.parity_reward(completions)  # noqa: E731
    monkeypatch.setattr(common, "generate", fake_generate)
    monkeypatch.setattr(common, "reward_fn", parity)
    models = []
    load = common.load_model_and_tokenizer
    monkeypatch.setattr(common, "load_model_and_tokenizer",
                        lambda *a, **k: models.append(load(*a, **k)) or models[-1])

    P, G, L, beta, lr = 2, 4, 6, 0.04, bench.LEARNING_RATE
    grpo.main(grpo.Args(model=str(random_tiny_model_dir), total_steps=1, prompts_per_step=P,
                        num_generations=G, max_completion_length=L, micro_batch_size=4, beta=beta,
                        learning_rate=lr, eval_size=1, output_dir=str(tmp_path), device="cpu"))
    trained_by_main = models[0][0]
    assert len(calls) == 1

    args = bench.parse_args([
        "--model", str(random_tiny_model_dir), "--device", "cpu", "--prompts", str(P),
        "--num-generations", str(G), "--completion-length", str(L), "--micro-batch-size", "4",
        "--num-iterations", "2"])
    b = bench.build_bench(args)
    pol = bench.make_policy(b, beta, fixed_length=False)
    before = [p.detach().clone() for p in pol.model.parameters()]
    bench.grpo_step(b, pol, calls[0], beta)
    after = list(pol.model.parameters())
    assert grpo.Args().num_iterations == b.mu and grpo.Args().epsilon == bench.EPSILON
    assert any(not torch.equal(x, y) for x, y in zip(before, after)), "the step did not train"
    for (name, p), q in zip(trained_by_main.named_parameters(), after):
        assert torch.equal(p, q), f"{name}: _bench.grpo_step no longer does what grpo.main does"
