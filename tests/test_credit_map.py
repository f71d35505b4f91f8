"""benchmarks/credit_map.py: the DATA of the picture (one matrix per method for one group) equals
each method's own function on that group; the picture itself is only checked to be a PNG."""

import builtins
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import dcpo
import grpo
import spo
import tempo
import token_dpo
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import credit_map  # noqa: E402

TEXTS = ["3+4=7 #### 7", "3+4=8 #### 8", "3+4=7 #### 7", "3+5=8 #### 8"]
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0])


@pytest.fixture(scope="module")
def models(random_tiny_model_dir, tmp_path_factory):
    """A random policy, and a reference and a guidance model that differ from it (other inits)."""
    policy = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir).eval()
    tok = common.build_char_tokenizer()
    others = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        others.append(common.build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id).eval())
    return policy, others, tok


@pytest.fixture(scope="module")
def group(models):
    """A hand-made group of 4 completions of one prompt, with the last one shorter (padding)."""
    _, _, tok = models
    eos = tok.eos_token_id
    texts = TEXTS[:3] + ["3+5=8"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    L = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (L - len(r)) for r in rows])
    ex = {"id": 5, "question": "3+4", "answer": "7"}
    prompt = tok(common.format_prompt(tok, ex["question"], "arith"), add_special_tokens=False)[
        "input_ids"
    ]
    p_ids, p_mask = common.left_pad([prompt] * 4, tok.pad_token_id, "cpu")
    return {
        "example": ex,
        "prompt_row": prompt,
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "completion_ids": ids,
        "completion_mask": common.completion_mask_from_ids(ids, eos),
        "rewards": REWARDS,
        "texts": texts,
    }


def test_each_panel_is_its_methods_own_function(models, group):
    policy, (other, guide), tok = models
    mats, notes = credit_map.credit_matrices(
        group, policy, tok, ref_model=other, guidance_model=guide, max_len=16, mc_seed=3
    )
    ids, mask, r = group["completion_ids"], group["completion_mask"], group["rewards"]
    m = mask > 0
    assert set(mats) >= {
        "GRPO",
        "TEMPO",
        "SPO-chain",
        "DCPO",
        "TDPO: per-token KL",
        "TGDPO: guidance r_hat",
    }
    for name, mat in mats.items():
        assert mat.shape == ids.shape and (mat[~m] == 0).all(), name  # 0 on padding
    # GRPO: one number per completion, on each of its tokens
    flat = grpo.compute_advantages(r, 4)
    assert torch.allclose(mats["GRPO"], flat[:, None] * mask)
    assert mats["GRPO"][0, 0] == pytest.approx(0.866, abs=1e-3)  # [1,0,1,0]: 0.5 / (0.57735 + 1e-4)
    # TEMPO
    assert torch.allclose(mats["TEMPO"], tempo.compute_tempo_advantages(r, 4, ids, mask)[0].float())
    # SPO-chain: the same pipeline, called here step by step
    old, _ = common.per_token_logps(
        policy, group["prompt_ids"], group["prompt_mask"], ids, mask, 1.0
    )
    pm = spo.probability_mask(old, mask, 0.9)
    starts = spo.segment_starts(pm > 0, 5, "even")
    prefixes, index = spo.plan_mc_prefixes(ids, starts, torch.zeros(4, dtype=torch.long))
    mc, _ = spo.mc_rollout_rewards(
        policy, tok, prefixes, [group["prompt_row"]], ["7"], spo.TINY_NUM_ROLLOUTS, 16, seed=3
    )
    _, adv = spo.chain_advantages(spo.mc_values(mc, index), r, starts, mask)
    assert torch.equal(mats["SPO-chain"], (adv * pm).float())
    assert ((mats["SPO-chain"] != 0) <= (pm > 0)).all()  # only trained tokens carry credit
    # DCPO on a first visit: SAS with the population std (0.5 here, GRPO's unbiased one is 0.577)
    sas, _, _ = dcpo.sas_advantages(r, 4, [5], dcpo.PromptStats(4))
    assert torch.allclose(mats["DCPO"], sas[:, None] * mask)
    assert mats["DCPO"][0, 0] == pytest.approx(1.0)  # (1 - 0.5) / 0.5
    # TW-GRPO: grpo's own weights from the policy (= pi_old), one weight per index for the group
    h = common.response_hidden_states(
        policy, group["prompt_ids"], group["prompt_mask"], ids, mask
    )
    tw, _ = grpo.tw_token_weights(h, mask, 4, 1.7, head=policy.get_output_embeddings())
    assert torch.allclose(mats["TW-GRPO: w_t"], tw.float())
    assert (mats["TW-GRPO: w_t"][:, 0] == 1.0).all() and mats["TW-GRPO: w_t"].max() <= 1.7
    # D3S at its first step: 2 of the 4 rollouts, then 20% of their tokens by |A| * H
    _, ent = common.per_token_logps(
        policy, group["prompt_ids"], group["prompt_mask"], ids, mask, 1.0, with_entropy=True
    )
    kept = grpo.d3s_select(flat, 4, 2, "cross")
    e, _ = grpo.d3s_token_mask(flat, ent, mask.float(), kept, 0.2)
    assert torch.equal(mats["D3S: kept tokens' A"], (flat[:, None] * e).float())
    assert len(kept) == 2 and ((mats["D3S: kept tokens' A"] != 0).sum(1) > 0).sum() <= 2
    # TDPO: the per-token KL of token_dpo's own function, policy vs reference
    h = common.response_hidden_states(
        policy, group["prompt_ids"], group["prompt_mask"], ids, mask
    )
    h_ref = common.response_hidden_states(
        other, group["prompt_ids"], group["prompt_mask"], ids, mask
    )
    _, ref_logps, kl = token_dpo.token_logps_and_kl(
        h, h_ref, ids, mask, policy.get_output_embeddings(), other.get_output_embeddings()
    )
    assert torch.allclose(mats["TDPO: per-token KL"], kl) and (kl[m] > 0).all()
    # TGDPO: r_hat_t = beta (log pi_g - log pi_ref), tgdpo_loss's formula, beta 0.1
    g_logps, _ = common.per_token_logps(
        guide, group["prompt_ids"], group["prompt_mask"], ids, mask, 1.0
    )
    assert torch.allclose(mats["TGDPO: guidance r_hat"], 0.1 * (g_logps - ref_logps) * mask)
    assert (mats["TGDPO: guidance r_hat"][m] != 0).all() and not notes[:-1]  # only the cDPO note


def test_policy_equal_to_reference_leaves_the_preference_panels_out(models, group):
    policy, _, tok = models
    mats, notes = credit_map.credit_matrices(group, policy, tok, ref_model=policy, max_len=16)
    assert list(mats) == ["GRPO", "TEMPO", "SPO-chain", "DCPO", "TW-GRPO: w_t",
                          "D3S: kept tokens' A"]
    assert "TDPO: per-token KL" not in mats and any("KL is 0" in n for n in notes)
    assert any(n.startswith("TGDPO: no guidance model") for n in notes)
    has_cdpo = hasattr(token_dpo, "cdpo_weights")
    assert any(n.startswith("cDPO:") for n in notes) and "cDPO: w_t" not in mats
    assert any(("--cdpo-models" in n) == has_cdpo for n in notes if n.startswith("cDPO:"))


def test_token_texts_and_outputs(models, group, tmp_path, monkeypatch, capsys):
    policy, _, tok = models
    toks = credit_map.token_texts(tok, group)
    assert toks[0] == list("3+4=7 #### 7") + ["$"] and toks[3] == list("3+5=8") + ["$"]
    mats, notes = credit_map.credit_matrices(group, policy, tok, max_len=16)
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert not credit_map.draw(tmp_path / "x.png", mats, toks, group, notes, "t")
    assert (
        "matplotlib is not installed" in capsys.readouterr().err
        and not (tmp_path / "x.png").exists()
    )
    monkeypatch.undo()
    pytest.importorskip("matplotlib", reason="needs `pip install -r benchmarks/requirements-plots.txt` (matplotlib)")
    assert credit_map.draw(tmp_path / "x.png", mats, toks, group, notes, "t")
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_is_no_run_is_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "credit_map.py"), "--run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode == 2
        and out.stderr.strip().count("\n") == 0
        and "not a run folder" in out.stderr
    )


def test_sample_group_picks_a_group_whose_rewards_differ(models, monkeypatch):
    policy, _, tok = models
    train = common.arith_dataset("train")[:16]
    assert (
        credit_map.sample_group(policy, tok, train, "arith", 4, 8, seed=0, tries=2) is None
    )  # all 0
    # rows 0..3 (group 0) all right, rows 4..7 (group 1) half right: group 1 is picked
    fake = lambda texts, answers, ids, eos: torch.tensor(  # noqa: E731
        [1.0] * 4 + [1.0, 0.0, 1.0, 0.0] + [0.0] * (len(texts) - 8)
    )
    monkeypatch.setattr(common, "finished_rewards", fake)
    g = credit_map.sample_group(policy, tok, train, "arith", 4, 8, seed=0)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()
    assert g["example"] == train[order[1]] and g["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert (
        g["completion_ids"].shape == g["completion_mask"].shape and g["completion_ids"].size(0) == 4
    )
    prompt = tok(
        common.format_prompt(tok, g["example"]["question"], "arith"), add_special_tokens=False
    )["input_ids"]
    assert g["prompt_row"] == prompt and g["prompt_mask"].sum(1).tolist() == [len(prompt)] * 4


def alternating_rewards(monkeypatch):
    """Rewards 1, 0, 1, 0, ... by position replace the verifier: every group is half right."""
    monkeypatch.setattr(common, "finished_rewards", lambda texts, answers, ids, eos: torch.tensor(
        [float((i + 1) % 2) for i in range(len(texts))]))


def test_fitted_cdpo_models_are_token_dpos_round_1(models, monkeypatch):
    """Without --cdpo-models, cDPO's two models are token_dpo.py's round 1 on the sampled batch:
    the rows of token_dpo.cdpo_sets, each model token_dpo.train_ce_model with its seeds."""
    policy, _, tok = models
    alternating_rewards(monkeypatch)
    train = common.arith_dataset("train")[:16]
    g = credit_map.sample_group(policy, tok, train, "arith", 4, 8, seed=0)
    b = g["batch"]
    assert b["completion_ids"].size(0) == 4 * len(b["examples"]) == 4 * len(b["prompt_rows"])
    (pos, neg), note = credit_map.fit_cdpo_models(g, policy, tok, steps=2, seed=0)
    args = type("A", (), {"seed": 0, "task": "arith"})
    (pos_rows, neg_rows), _, _ = token_dpo.cdpo_sets(
        b["texts"], b["rewards"], b["completion_ids"], tok, list(range(len(b["examples"]))),
        b["examples"], b["prompt_rows"], 4, [], args, 1)
    for k, rows, fitted in ((1, pos_rows, pos), (2, neg_rows, neg)):
        gen = torch.Generator().manual_seed(0 * 100003 + 1 + k * 1_000_000_007)  # seed 0, round 1
        want, _ = token_dpo.train_ce_model(policy, tok, rows, 2, 32, 3e-4, gen)
        assert all(torch.equal(a, w) for a, w in zip(fitted.parameters(), want.parameters()))
    assert any(not torch.equal(a, r) for a, r in zip(pos.parameters(), policy.parameters()))
    assert note.startswith("cDPO: its positive and negative models fitted here") and \
        f"on {len(pos_rows)} right and {len(neg_rows)}" in note


def test_bare_command_fills_the_cdpo_panel_and_writes_under_runs(models, monkeypatch, tmp_path,
                                                                 capsys):
    """The bare command (here with a random policy as the warm start): outputs under
    runs/credit_map/; the cDPO panel drawn from models fitted here; the notes of the two panels a
    warm start cannot fill name what to pass."""
    policy, _, tok = models
    setting = {"model": policy, "ref": policy, "tokenizer": tok, "guidance": None,
               "cdpo_models": None, "ops": "2-4", "max_len": 8, "config": {}}
    monkeypatch.setattr(credit_map, "load_setting", lambda *a: setting)
    alternating_rewards(monkeypatch)
    monkeypatch.chdir(tmp_path)
    credit_map.main(["--truth-k", "0", "--num-generations", "4", "--cdpo-sft-steps", "2"])
    data = json.loads((tmp_path / "runs" / "credit_map" / "credit_map.json").read_text())
    assert "cDPO: w_t" in data["matrices"] and "TDPO: per-token KL" not in data["matrices"]
    w = torch.tensor([v for row in data["matrices"]["cDPO: w_t"] for v in row])
    assert ((w >= 0) & (w <= 1)).all() and (w > 0).any()
    notes = data["notes"]
    assert notes[0].startswith("cDPO: its positive and negative models fitted here")
    assert any(n.startswith("TDPO:") and "--run RUN_DIR" in n for n in notes)
    assert any(n.startswith("TGDPO:") and "--loss tgdpo" in n and "--guidance-model DIR" in n
               for n in notes)
    credit_map.main(["--truth-k", "0", "--num-generations", "4", "--cdpo-sft-steps", "0",
                     "--out", str(tmp_path / "no_cdpo.png")])
    data = json.loads((tmp_path / "no_cdpo.json").read_text())
    assert "cDPO: w_t" not in data["matrices"]
    assert any(n.startswith("cDPO:") and "--cdpo-models" in n for n in data["notes"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        credit_map.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pip install -r benchmarks/requirements-plots.txt" in text and "matplotlib" in text
    assert "runs/credit_map/credit_map.png" in text
