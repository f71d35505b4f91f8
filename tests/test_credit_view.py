"""The text credit view (common.py section 12): the group it shows and the tokens it marks."""
import torch

import common
import tempo


def test_pick_credit_group_skips_groups_without_spread():
    r = torch.tensor([0.0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0])
    assert common.pick_credit_group(r, 4) == 2        # means 0, 1/4, 1/2: the even split
    assert common.pick_credit_group(r[:8], 4) == 1    # group 0 has no spread, group 1 does
    assert common.pick_credit_group(torch.tensor([1.0, 1, 0, 0, 1, 0]), 2) == 2  # [1,1] [0,0] [1,0]
    assert common.pick_credit_group(torch.tensor([1.0, 0, 0, 1]), 2) == 0     # a tie: the earliest
    assert common.pick_credit_group(torch.tensor([0.0, 0, 1, 1]), 2) is None  # no group differs
    assert common.pick_credit_group(torch.tensor([0.0, 1, 1, 1, 1, 1]), 3) == 0  # 1/3 beats none


def test_credit_group_text_shows_the_picked_group():
    examples = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    seen = []
    text = common.credit_group_text(7, examples, [2, 0, 1], torch.tensor([0.0, 0, 1, 0, 1, 1]), 2,
                                    lambda g: seen.append(g) or "BODY")
    assert seen == [slice(2, 4)]
    assert text == "step 7, credit view of 'q0' (gold 0), group 2 of 3; BODY"
    none = common.credit_group_text(7, examples, [2, 0], torch.tensor([0.0, 0, 1, 1]), 2,
                                    lambda g: 1 / 0)
    assert "\n" not in none and "same reward" in none and none.startswith("step 7, credit view:")
    assert "in all 2 groups every completion" in none
    one = common.credit_group_text(7, examples, [2], torch.tensor([1.0, 1]), 2, lambda g: 1 / 0)
    assert "in its one group every completion" in one  # not "in all 1 groups"


def test_marks_only_what_differs_from_grpo():
    adv = torch.tensor([[0.7, 0.9, 0.7], [-0.7, -0.7, 5.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    flat = torch.tensor([0.7, -0.7])
    marks = common.credit_marks(adv, flat, mask)
    assert marks.tolist() == [[False, True, False], [False, False, False]]  # padding never marked
    out = common.render_credit([["A", "B", "C"], ["D", "E"]], adv, mask, flat=flat,
                               rewards=torch.tensor([1.0, 0.0]), marks=marks)
    assert out == "o1 (r=1.00, GRPO +0.70): AB[+0.90]C\no2 (r=0.00, GRPO -0.70): DE"
    colored = common.render_credit([["A", "B", "C"], ["D", "E"]], adv, mask, color=True,
                                   marks=marks)
    assert colored.split("\n")[1] == "o2: DE" and colored.count("\x1b[38;5;") == 1


def test_tempo_view_marks_exactly_the_td_tokens():
    """On a real TEMPO group, the marked tokens are those with a nonzero TD term (branch points)."""
    tok = common.build_char_tokenizer()
    eos = tok.eos_token_id
    texts = ["1+2=3 #### 3", "1+2=4 #### 4", "1+2=3 #### 3", "1+2=9 #### 9"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    ids = torch.tensor(rows)
    mask = common.completion_mask_from_ids(ids, eos)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv, _ = tempo.compute_tempo_advantages(rewards, 4, ids, mask)
    flat = tempo.compute_advantages(rewards, 4)
    marks = common.credit_marks(adv, flat, mask)
    # every completion shares "1+2=" and branches at the 5th token (index 4): '3' vs '4' vs '9'
    assert marks.any(0).nonzero().flatten().tolist() == [4]
    out = common.credit_view(tok, ids, adv, mask, flat, rewards, color=False, only_diff=True)
    key, first = out.split("\n")[:2]
    assert key == ("key: x[+0.12] = the advantage of token x, the token just before the [ ]; "
                   "a token without [ ] has GRPO's flat advantage")
    assert first.startswith("o1 (r=1.00, GRPO +0.87): 1+2=3[+") and first.count("[") == 1
    colored = common.credit_view(tok, ids, adv, mask, flat, rewards, color=True, only_diff=True)
    assert colored.split("\n")[0] == ("key: colour = the token's advantage: green > 0, red < 0, "
                                      "deeper = larger; uncoloured = 0 or GRPO's flat advantage")


def test_spo_show_credit_end_to_end(random_tiny_model_dir, tmp_path):
    """spo.py --show-credit on the random model (rewards 0, 1 by position: every group differs)."""
    from conftest import run_script
    out = run_script("spo", "--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path),
                     "--total-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
                     "--eval-size", "2", "--max-completion-length", "8", "--show-credit", "1",
                     fake_reward=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 1, credit view of " in out.stdout and ", group 1 of 2; " in out.stdout
    assert "only the tokens SPO trains (p < rho) are marked" in out.stdout
    assert "key: x[+0.12] = the advantage of token x, the token just before the [ ]" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith(("o1 (r=", "o2 (r="))]
    assert [r[:10] for r in rows] == ["o1 (r=0.00", "o2 (r=1.00"]
