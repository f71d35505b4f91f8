"""benchmarks/credit_truth.py: the Monte Carlo truth against values known exactly, each method's
credit against its own function, the first error on a hand-worked example, the table on fixtures.

Everything runs on random or hand-built models: nothing here warm-starts the tiny model."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import common
import dcpo
import grpo
import spo
import tempo
import token_dpo
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import credit_truth as ct  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------
# A stand-in policy whose values are known exactly: a bigram chain inside a real Llama
# ----------------------------------------------------------------------------------------

MAX_LEN = 4
# next-token probabilities given the last token (":" ends the prompt); everything else ~e^-30
CHAIN = {":": {"0": 0.45, "1": 0.45, "<eos>": 0.10},
         "0": {"0": 0.30, "1": 0.30, "<eos>": 0.40},
         "1": {"0": 0.20, "1": 0.50, "<eos>": 0.30}}


def bigram_policy(tok):
    """A 1-layer Llama whose next-token distribution depends on the last token only.

    The attention and MLP outputs are zeroed (o_proj, down_proj = 0), so the last hidden state
    is norm(embed(last token)); one-hot embeddings make lm_head a table of logits per last token.
    """
    V = len(tok)
    H = V + V % 2  # an even head size for the rotary embedding
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                      max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)
        model.model.norm.weight.fill_(1.0)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        scale = 1.0 / math.sqrt(1.0 / H + cfg.rms_norm_eps)  # RMSNorm of a one-hot vector
        model.lm_head.weight.fill_(-30.0 / scale)
        for last, row in CHAIN.items():
            for nxt, prob in row.items():
                model.lm_head.weight[tok.convert_tokens_to_ids(nxt),
                                     tok.convert_tokens_to_ids(last)] = math.log(prob) / scale
    return model


@pytest.fixture(scope="module")
def chain():
    tok = common.build_char_tokenizer()
    model = bigram_policy(tok)
    prompt = tok("Q:1\nA:", add_special_tokens=False)["input_ids"]
    ids = {c: tok.convert_tokens_to_ids(c) for c in ("0", "1", "<eos>", ":")}
    # the model's own next-token probabilities (what the sampler draws from), in fp64
    probs = {}
    with torch.no_grad():
        for c in ("0", "1", ":"):
            logits = model(torch.tensor([prompt[:-1] + [ids[c]]])).logits[0, -1].double()
            probs[ids[c]] = logits.softmax(-1)
    return tok, model, prompt, ids, probs


def exact_value(prefix, tok, prompt, ids, probs):
    """V(prefix) by enumerating every continuation (3 tokens, depth <= MAX_LEN): exact."""
    eos = tok.eos_token_id
    if prefix and prefix[-1] == eos:
        return common.reward_fn([tok.decode(prefix, skip_special_tokens=True)], ["1"])[0]
    if len(prefix) == MAX_LEN:
        return 0.0  # unfinished: scored 0
    p = probs[prefix[-1] if prefix else prompt[-1]]
    return sum(float(p[u]) * exact_value(prefix + [u], tok, prompt, ids, probs)
               for u in (ids["0"], ids["1"], eos))


def chain_group(tok, prompt, ids):
    eos = tok.eos_token_id
    rows = [[ids["0"], ids["1"], eos, eos], [ids["1"], eos, eos, eos],
            [ids["0"], ids["0"], ids["1"], ids["0"]], [ids["1"], ids["1"], eos, eos]]
    c_ids = torch.tensor(rows)
    mask = common.completion_mask_from_ids(c_ids, eos)
    texts = common.decode_completions(tok, c_ids)
    r = common.finished_rewards(texts, ["1"] * 4, c_ids, eos)
    return {"prompt_row": prompt, "example": {"answer": "1"}, "completion_ids": c_ids,
            "completion_mask": mask, "rewards": r}


def test_the_stand_in_policy_is_the_chain(chain):
    tok, _, _, ids, probs = chain
    for last, row in CHAIN.items():
        for nxt, prob in row.items():
            assert float(probs[ids[last]][tok.convert_tokens_to_ids(nxt)]) == \
                pytest.approx(prob, rel=1e-5)


def test_mc_truth_is_within_its_standard_errors_of_the_exact_values(chain):
    tok, model, prompt, ids, probs = chain
    group = chain_group(tok, prompt, ids)
    assert group["rewards"].tolist() == [1.0, 1.0, 0.0, 0.0]  # '01', '1' right; '0010' unfinished
    K = 400
    mc, index, _ = ct.mc_truth(model, tok, group, K, MAX_LEN, seed=0)
    prefixes, _ = ct.truth_prefixes(group["completion_ids"], group["completion_mask"])
    assert len(prefixes) == mc.size(0) == 7  # (), 0, 01, 1, 00, 001, 11: shared ones once
    exact = torch.tensor([exact_value(list(p[1]), tok, prompt, ids, probs) for p in prefixes],
                         dtype=torch.float64)
    v_hat = mc.double().mean(1)
    se_exact = (exact * (1 - exact) / K).sqrt()
    se_hat = mc.double().std(1) / math.sqrt(K)
    assert (exact > 0.05).sum() == 6 and exact[-1] == 0  # '11' can never end as 1
    assert v_hat[-1] == 0 and (exact < 0.95).all()
    assert ((v_hat - exact).abs() <= 4 * se_exact).all(), (v_hat, exact)
    assert ((v_hat - exact).abs() <= 4 * se_hat).all()
    # A*: the same numbers through true_advantages, and the telescoping sum r - V_hat(prompt)
    truth = ct.true_advantages(mc, index, group["rewards"], group["completion_mask"])
    m = group["completion_mask"] > 0
    sums = torch.where(m, truth["adv"], 0.0).sum(1)
    assert torch.allclose(sums, group["rewards"].double() - v_hat[0], atol=1e-12)
    # A* against the exact advantage, token by token, within 4 of its standard errors
    exact_adv = ct.true_advantages(exact[:, None], index, group["rewards"],
                                   group["completion_mask"])["adv"]
    assert ((truth["adv"] - exact_adv).abs()[m] <= 4 * truth["se"][m] + 1e-12).all()
    # the stream is keyed: the same seed gives the same draws, another seed others
    again, _, _ = ct.mc_truth(model, tok, group, K, MAX_LEN, seed=0)
    other, _, _ = ct.mc_truth(model, tok, group, K, MAX_LEN, seed=1)
    assert torch.equal(mc, again) and not torch.equal(mc, other)


def test_the_truth_never_reuses_spo_chains_streams(chain):
    tok, model, prompt, ids, _ = chain
    group = chain_group(tok, prompt, ids)
    prefixes, _ = ct.truth_prefixes(group["completion_ids"], group["completion_mask"])
    mc, _, _ = ct.mc_truth(model, tok, group, 16, MAX_LEN, seed=3)
    spo_mc, _ = spo.mc_rollout_rewards(model, tok, prefixes, [prompt], ["1"], 16, MAX_LEN,
                                       seed=3)
    assert not torch.equal(mc, spo_mc)


def test_true_advantages_hand_example():
    # completion [a, b, EOS] (r = 1) and [a, EOS, pad] (r = 0); prefixes (), (a,), (a, b)
    ids = torch.tensor([[5, 6, 1], [5, 1, 1]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    prefixes, index = ct.truth_prefixes(ids, mask)
    assert prefixes == [(0, ()), (0, (5,)), (0, (5, 6))]
    assert index.tolist() == [[0, 1, 2], [0, 1, -1]]
    mc = torch.tensor([[1.0, 0.0], [1.0, 0.5], [1.0, 1.0]])  # V_hat = 0.5, 0.75, 1.0
    t = ct.true_advantages(mc, index, torch.tensor([1.0, 0.0]), mask)
    assert t["adv"].tolist() == [[0.25, 0.25, 0.0], [0.25, -0.75, 0.0]]
    assert t["before"].tolist() == [[0.5, 0.75, 1.0], [0.5, 0.75, 0.0]]
    # se: std (K - 1) / sqrt(K); the last token's "after" is its reward, exact
    se = torch.tensor([0.5, 0.25, 0.0])  # [1, 0]: 0.7071 / 1.4142; [1, 0.5]: 0.3536 / 1.4142
    assert t["se"][0].tolist() == pytest.approx([math.hypot(se[0], se[1]),
                                                 math.hypot(se[1], se[2]), float(se[2])])
    assert t["se"][1].tolist() == pytest.approx([math.hypot(se[0], se[1]), float(se[1]), 0.0])
    h1, h2 = ct.split_half(mc, index, torch.tensor([1.0, 0.0]), mask)
    assert h1.tolist() == [[0.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
    assert h2.tolist() == [[0.5, 0.5, 0.0], [0.5, -0.5, 0.0]]


# ----------------------------------------------------------------------------------------
# The first error, hand-worked on the arithmetic task
# ----------------------------------------------------------------------------------------


def test_first_error_on_a_hand_worked_example():
    tok = common.build_char_tokenizer()
    ex = {"question": "25+2-13+28", "solution": "25+2=27 27-13=14 14+28=42 #### 42",
          "answer": "42"}
    gold = ct.gold_ids(tok, ex)
    assert len(gold) == 34 and gold[-1] == tok.eos_token_id
    texts = ["25+2=27 27-13=14 14+28=42 #### 42",    # right: no error
             "25+2=27 27-13=15 15+28=43 #### 43",    # '25+2=27 27-13=1' is 15 characters
             "25+2=28 28-13=15 15+28=43 #### 43",    # the '8' of '28', index 6
             "25+2=27 27-13=14 14+28=42 #### 420",   # one digit too many: index 33
             "25+2=27 27-13=14"]                      # cut short, no EOS: never left the path
    eos = tok.eos_token_id
    rows = [tok(t, add_special_tokens=False)["input_ids"] + ([eos] if i < 4 else [])
            for i, t in enumerate(texts)]
    L = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (L - len(r)) for r in rows])
    mask = common.completion_mask_from_ids(ids, eos)
    mask[4, len(rows[4]):] = 0  # the cut-short one ends where its tokens end
    assert ct.first_error(ids, mask, gold).tolist() == [-1, 15, 6, 33, -1]
    assert texts[1][15] == "5" and texts[2][6] == "8"
    # the task's own solution is the gold one
    first = common.arith_dataset("train")[0]
    assert first["solution"].endswith(f"#### {first['answer']}")


# ----------------------------------------------------------------------------------------
# Each method's matrix is its own function on the same group
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(random_tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir).eval()
    tok = common.build_char_tokenizer()
    others = []
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        others.append(common.build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id).eval())
    return policy, others, tok


@pytest.fixture(scope="module")
def group(models):
    _, _, tok = models
    eos = tok.eos_token_id
    texts = ["3+4=7 #### 7", "3+4=8 #### 8", "3+4=7 #### 7", "3+5=8"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    L = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (L - len(r)) for r in rows])
    ex = {"id": 5, "question": "3+4", "solution": "3+4=7 #### 7", "answer": "7"}
    prompt = tok(common.format_prompt(tok, ex["question"], "arith"),
                 add_special_tokens=False)["input_ids"]
    p_ids, p_mask = common.left_pad([prompt] * 4, tok.pad_token_id, "cpu")
    return {"example": ex, "prompt_row": prompt, "prompt_ids": p_ids, "prompt_mask": p_mask,
            "completion_ids": ids, "completion_mask": common.completion_mask_from_ids(ids, eos),
            "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]), "texts": texts}


def test_each_methods_credit_is_its_own_function(models, group):
    policy, (ref, guide, pos, neg), tok = models
    cr, notes = ct.method_credits(group, policy, tok, ref, guide, max_len=16, mc_seed=3,
                                  cdpo_models=(pos, neg))
    ids, mask, r = group["completion_ids"], group["completion_mask"], group["rewards"]
    p_ids, p_mask = group["prompt_ids"], group["prompt_mask"]
    m = mask > 0
    assert list(cr) == ["GRPO", "Dr. GRPO", "GRPO 80/20", "TEMPO", "DCPO", "SPO-chain",
                        "TW-GRPO", "D3S", "TDPO", "TGDPO", "cDPO"] and not notes
    for name, mat in cr.items():
        assert mat.shape == ids.shape and mat.dtype == torch.float64 and (mat[~m] == 0).all()
    A = grpo.compute_advantages(r, 4)
    assert torch.allclose(cr["GRPO"], (A[:, None] * mask).double())
    assert torch.allclose(cr["Dr. GRPO"],
                          (grpo.compute_advantages(r, 4, "none")[:, None] * mask).double())
    assert cr["Dr. GRPO"][0, 0] == 0.5 and cr["Dr. GRPO"][1, 0] == -0.5
    _, ent = common.per_token_logps(policy, p_ids, p_mask, ids, mask, 1.0, with_entropy=True)
    keep, _ = grpo.entropy_token_mask(ent, mask, 0.2)
    assert torch.allclose(cr["GRPO 80/20"], (A[:, None] * keep).double())
    assert 0 < int((cr["GRPO 80/20"] != 0).sum()) < int(m.sum()) // 2
    assert torch.allclose(cr["TEMPO"], tempo.compute_tempo_advantages(r, 4, ids, mask)[0].double())
    sas, _, _ = dcpo.sas_advantages(r, 4, [5], dcpo.PromptStats(4))
    assert torch.allclose(cr["DCPO"], (sas[:, None] * mask).double())
    old, _ = common.per_token_logps(policy, p_ids, p_mask, ids, mask, 1.0)
    pm = spo.probability_mask(old, mask, 0.9)
    starts = spo.segment_starts(pm > 0, 5, "even")
    prefixes, index = spo.plan_mc_prefixes(ids, starts, torch.zeros(4, dtype=torch.long))
    mc, _ = spo.mc_rollout_rewards(policy, tok, prefixes, [group["prompt_row"]], ["7"],
                                   spo.TINY_NUM_ROLLOUTS, 16, seed=3)
    _, adv = spo.chain_advantages(spo.mc_values(mc, index), r, starts, mask)
    assert torch.equal(cr["SPO-chain"], (adv * pm).double())
    h = common.response_hidden_states(policy, p_ids, p_mask, ids, mask)
    tw, _ = grpo.tw_token_weights(h, mask, 4, 1.7, head=policy.get_output_embeddings())
    assert torch.allclose(cr["TW-GRPO"], (A[:, None] * tw).double())
    kept = grpo.d3s_select(A, 4, 2, "cross")
    e, _ = grpo.d3s_token_mask(A, ent, mask.float(), kept, 0.2)
    assert torch.equal(cr["D3S"], (A[:, None] * e).double())
    h_ref = common.response_hidden_states(ref, p_ids, p_mask, ids, mask)
    _, ref_logps, kl = token_dpo.token_logps_and_kl(
        h, h_ref, ids, mask, policy.get_output_embeddings(), ref.get_output_embeddings())
    assert torch.allclose(cr["TDPO"], -kl.double()) and (cr["TDPO"][m] < 0).all()
    g_logps, _ = common.per_token_logps(guide, p_ids, p_mask, ids, mask, 1.0)
    assert torch.allclose(cr["TGDPO"], (0.1 * (g_logps - ref_logps) * mask).double())
    hp = common.response_hidden_states(pos, p_ids, p_mask, ids, mask)
    hn = common.response_hidden_states(neg, p_ids, p_mask, ids, mask)
    w = token_dpo.cdpo_weights(hp, hn, ids, mask, 1.0, pos.get_output_embeddings(),
                               neg.get_output_embeddings())
    assert torch.allclose(cr["cDPO"][r > 0], mask[r > 0].double())  # chosen: unweighted, +1
    assert torch.allclose(cr["cDPO"][r == 0], -w[r == 0].double())  # rejected: -w_t


def test_at_the_warm_start_the_preference_methods_are_left_out(models, group):
    policy, _, tok = models
    cr, notes = ct.method_credits(group, policy, tok, policy, max_len=16)
    assert "TDPO" not in cr and "TGDPO" not in cr and "cDPO" not in cr
    assert [n.split(":")[0] for n in notes] == ["TDPO", "TGDPO", "cDPO"]


# ----------------------------------------------------------------------------------------
# The measures and the table, on fixtures
# ----------------------------------------------------------------------------------------


def test_ranks_pearson_spearman_and_blame():
    assert ct.ranks(np.array([10, 20, 20, 5])).tolist() == [2, 3.5, 3.5, 1]
    x, y = np.array([1.0, 2, 3, 4]), np.array([1.0, 4, 9, 16])
    assert ct.spearman(x, y) == pytest.approx(1.0) and ct.pearson(x, y) < 1
    assert math.isnan(ct.pearson(np.ones(4), y)) and math.isnan(ct.spearman(x[:1], y[:1]))
    assert ct.blamed_most(torch.tensor([0.2, -0.5, -0.5, 0.1]), 4, 1) == 0.5
    assert ct.blamed_most(torch.tensor([0.2, -0.5, -0.5, 0.1]), 4, 0) == 0.0
    assert ct.blamed_most(torch.tensor([-1.0, -1.0, -1.0, 9.0]), 3, 2) == pytest.approx(1 / 3)
    assert ct.spearman_brown(0.6, 2.0) == pytest.approx(0.75)
    assert ct.rollouts_for(0.6, 32, 0.9) == pytest.approx(192.0)
    assert ct.spearman_brown(ct.spearman_brown(0.6, 192 / 32), 1.0) == pytest.approx(0.9)
    assert math.isnan(ct.rollouts_for(float("nan"), 32, 0.9))


def fixture_record():
    """Two completions, hand-checked: o1 right (4 tokens), o2 wrong (4 tokens, first error 2)."""
    mask = torch.ones(2, 4)
    truth = torch.tensor([[0.1, 0.2, 0.0, 0.2], [0.1, 0.0, -0.6, 0.0]], dtype=torch.float64)
    good = truth.clone()                                             # a perfect method
    flat = torch.tensor([[0.5] * 4, [-0.5] * 4], dtype=torch.float64)  # GRPO-like
    early = torch.tensor([[0.5] * 4, [-0.4, -0.1, 0.0, 0.0]], dtype=torch.float64)  # blames 0
    return {"credits": {"good": good, "flat": flat, "early": early}, "truth": truth,
            "truth_se": torch.full((2, 4), 0.05, dtype=torch.float64),
            "half1": truth + 0.01 * torch.arange(8.0).view(2, 4).double(), "half2": truth,
            "mask": mask, "rewards": torch.tensor([1.0, 0.0]), "errors": torch.tensor([-1, 2]),
            "K": 8}


def test_pooled_measures_by_hand():
    rec = fixture_record()
    s = {k: ct.group_stats(v, rec["truth"], rec["mask"], rec["rewards"], rec["errors"])
         for k, v in rec["credits"].items()}
    good, flat, early = (ct.pooled_measures([s[k]]) for k in ("good", "flat", "early"))
    assert good["pearson_all"] == pytest.approx(1.0) and good["first_error_hit"] == 1.0
    assert good["innocent_blame"] == 0.0
    assert flat["first_error_hit"] == 0.25 and flat["innocent_blame"] == pytest.approx(0.5)
    assert math.isnan(flat["pearson_wrong"])  # constant within the wrong answer
    assert early["first_error_hit"] == 0.0 and early["innocent_blame"] == pytest.approx(1.0)
    # a group counted twice (a bootstrap draw) changes no ratio
    assert ct.pooled_measures([s["flat"], s["flat"]])["innocent_blame"] == pytest.approx(0.5)


def test_the_table_on_fixtures(tmp_path):
    torch.manual_seed(0)
    records = []
    for _ in range(5):
        rec = fixture_record()
        noise = 0.05 * torch.randn(2, 4, dtype=torch.float64)
        rec["truth"] = rec["truth"] + noise
        rec["half2"] = rec["truth"]
        records.append(rec)
    scores = ct.score_groups(records, n_boot=200, seed=0)
    rows = scores["rows"]
    assert list(rows) == ["good", "flat", "early", ct.TRUTH_ROW, ct.CHANCE_ROW]
    v, lo, hi = rows["good"]["pearson_all"]
    assert lo <= v <= hi and v > 0.9
    assert rows[ct.CHANCE_ROW]["first_error_hit"][0] == 0.25
    assert math.isnan(rows[ct.CHANCE_ROW]["first_error_hit"][1])  # chance has no interval
    assert rows["flat"]["first_error_hit"][:1] == (0.25,)
    assert scores["counts"] == {"groups": 5, "tokens": 40, "completions": 10, "wrong": 5,
                                "wrong_with_first_error": 5}
    rel = scores["reliability"]
    assert rel["mean_se_of_A*"] == pytest.approx(0.05) and 0 < rel["split_half_r"] < 1
    assert rel["K_for_0.9"] == pytest.approx(ct.rollouts_for(rel["split_half_r"], 4, 0.9))
    assert "cutpoint_tokens" not in rel  # no cutpoints in the fixture: no such line
    for rec in records:  # SPO's cutpoints: o1's token 1 and o2's token 2
        rec["cutpoints"] = torch.zeros(2, 4, dtype=torch.bool)
        rec["cutpoints"][0, 1] = rec["cutpoints"][1, 2] = True
    rel = ct.score_groups(records, n_boot=10, seed=0)["reliability"]
    h1, h2 = (np.array([float(r[k][i, j]) for r in records for i, j in ((0, 1), (1, 2))])
              for k in ("half1", "half2"))
    assert rel["cutpoint_tokens"] == 10
    assert rel["split_half_r_cutpoints"] == pytest.approx(ct.pearson(h1, h2))
    out = tmp_path / "t" / "credit_truth"
    ct.write_outputs(out, scores, ["TDPO: its per-token KL is 0"], {"K": 4})
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") == 5 and "| flat | 0." in md and "left out: TDPO" in md
    assert "n/a" in md  # flat's correlation within wrong answers is undefined
    assert "| 0.25 |" in md and "0.25 [0.25, 0.25]" in md  # chance; flat's hit in every draw
    with out.with_suffix(".csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == list(rows)
    assert float(table[0]["pearson_all"]) == pytest.approx(v, abs=1e-5)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"] == {"K": 4} and data["rows"]["good"]["pearson_all"][0] == \
        pytest.approx(v)


# ----------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------


def stand_in_setting(models, monkeypatch):
    """credit_map.load_setting gives the random policy (also as the reference), and a reward
    that alternates 0, 1 replaces the verifier."""
    policy, _, tok = models
    setting = {"model": policy, "ref": policy, "tokenizer": tok, "guidance": None,
               "cdpo_models": None, "ops": "2-4", "max_len": 12, "config": {}}
    monkeypatch.setattr(ct.credit_map, "load_setting", lambda *a: setting)
    monkeypatch.setattr(common, "finished_rewards", lambda texts, answers, ids, eos: torch.tensor(
        [float(i % 2) for i in range(len(texts))]))


def test_quick_end_to_end_on_a_random_model(models, monkeypatch, tmp_path, capsys):
    """The whole pipeline, in-process, on a random model with an alternating reward."""
    stand_in_setting(models, monkeypatch)
    ct.main(["--quick", "--out", str(tmp_path / "q")])
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["meta"]["K"] == 4 and data["counts"]["groups"] == 2
    assert {"GRPO", "TEMPO", "SPO-chain", ct.TRUTH_ROW} <= set(data["rows"])
    assert any(n.startswith("TDPO") for n in data["notes"])
    assert "wrote" in capsys.readouterr().out


def test_quick_fits_cdpo_on_the_round_and_scores_it(models, monkeypatch, tmp_path):
    """Without --cdpo-models the two models are fitted once, from the reference, on every prompt
    sampled, through credit_map.fit_cdpo_models; --cdpo-sft-steps 0 leaves the row out."""
    stand_in_setting(models, monkeypatch)
    calls = []
    real = ct.credit_map.fit_cdpo_models

    def spy(round_, ref, tok, steps, seed):
        calls.append((round_["batch"]["completion_ids"].size(0), steps))
        return real(round_, ref, tok, steps, seed)

    monkeypatch.setattr(ct.credit_map, "fit_cdpo_models", spy)
    ct.main(["--quick", "--cdpo-sft-steps", "2", "--out", str(tmp_path / "q")])
    data = json.loads((tmp_path / "q.json").read_text())
    assert "cDPO" in data["rows"] and not any(n.startswith("cDPO") for n in data["notes"])
    assert data["meta"]["fitted"][0].startswith("cDPO: its positive")
    md = (tmp_path / "q.md").read_text()
    assert "\n- cDPO: its positive" in md and "left out: cDPO" not in md
    G = 8
    assert calls == [(data["meta"]["prompts_drawn"] * G, 2)]
    ct.main(["--quick", "--cdpo-sft-steps", "0", "--out", str(tmp_path / "n")])
    data = json.loads((tmp_path / "n.json").read_text())
    assert "cDPO" not in data["rows"] and any(n.startswith("cDPO") for n in data["notes"])
    assert data["meta"]["fitted"] == [] and "left out: cDPO" in (tmp_path / "n.md").read_text()
    assert len(calls) == 1


def test_merge_batches_keeps_every_completion():
    eos = 9
    a = torch.tensor([[1, 2, eos, 0], [3, 4, 5, 6]])           # width 4: row 1 ran out
    b = torch.tensor([[7, eos]])                              # width 2
    batches = [{"examples": ["x"], "prompt_rows": [[1]], "completion_ids": a, "texts": ["p", "q"],
                "rewards": torch.tensor([1.0, 0.0])},
               {"examples": ["y"], "prompt_rows": [[2]], "completion_ids": b, "texts": ["r"],
                "rewards": torch.tensor([1.0])}]
    m = ct.merge_batches(batches, eos)
    assert m["completion_ids"].tolist() == [[1, 2, eos, 0], [3, 4, 5, 6], [7, eos, eos, eos]]
    assert m["examples"] == ["x", "y"] and m["texts"] == ["p", "q", "r"]
    assert m["rewards"].tolist() == [1.0, 0.0, 1.0]
    masks = common.completion_mask_from_ids(m["completion_ids"], eos)
    assert masks.sum(1).tolist() == [3, 4, 2]


def test_quick_on_the_shipped_model(tmp_path):
    if common.shipped_tiny_problem(common.shipped_tiny_dir((2, 4))) is not None:
        pytest.skip("the shipped tiny model is not in this checkout")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "credit_truth.py"),
                          "--quick", "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "q.json").read_text())["counts"]["groups"] == 2


def test_bad_settings_are_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "credit_truth.py"),
                          "--k", "1", "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--k" in out.stderr


def test_credit_map_draws_the_truth_beside_the_methods(models, monkeypatch, tmp_path):
    policy, _, tok = models
    stand_in_setting(models, monkeypatch)
    ct.credit_map.main(["--truth-k", "4", "--num-generations", "4", "--cdpo-sft-steps", "0",
                        "--out", str(tmp_path / "m.png")])
    data = json.loads((tmp_path / "m.json").read_text())
    assert list(data["matrices"])[:2] == ["MC truth: A* (K=4)", "GRPO"]
    # the panel is credit_truth's A* on the same group (sampled again with the same seed)
    train = common.load_task("arith", "train", None, "2-4")
    group = ct.credit_map.sample_group(policy, tok, train, "arith", 4, 12, 0)
    truth = ct.credit_map.truth_panel(group, policy, tok, 4, 12, 0)
    mc, index, _ = ct.mc_truth(policy, tok, group, 4, 12, 0)
    assert torch.equal(truth, ct.true_advantages(mc, index, group["rewards"],
                                                 group["completion_mask"])["adv"].float())
    n = [len(t) for t in data["tokens"]]
    assert [row[:k] for row, k in zip(data["matrices"]["MC truth: A* (K=4)"], n)] == \
        [[round(float(v), 6) for v in row[:k]] for row, k in zip(truth, n)]
    ct.credit_map.main(["--truth-k", "0", "--num-generations", "4", "--cdpo-sft-steps", "0",
                        "--out", str(tmp_path / "n.png")])
    assert list(json.loads((tmp_path / "n.json").read_text())["matrices"])[0] == "GRPO"


def test_a_folder_that_is_no_run_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "credit_truth.py"),
                          "--run", str(tmp_path), "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "not a run folder" in out.stderr
