"""The embedded task's length knob (--arith-ops): problems, defaults, warm-start keys, the CLI."""
import hashlib
import json
import random
import re

import pytest

import common
from common import UserError
from conftest import run_script

# sha256 of json.dumps(arith_dataset(s), sort_keys=True) for s = test, train, sft (in that order,
# one hash object), computed with the code BEFORE the knob existed (commit 8020dd5, where
# arith_problem drew rng.randint(2, 4) itself):
#   h = hashlib.sha256(); [h.update(json.dumps(common.arith_dataset(s), sort_keys=True).encode())
#                          for s in ("test", "train", "sft")]; h.hexdigest()
SPLITS_SHA256_AT_8020DD5 = "8997906049479228cb97e0dc5926b0fc3d5ebe1fcae7ea1d01923cb91fdd4c25"


def test_default_reproduces_todays_datasets_exactly():
    h = hashlib.sha256()
    for split in ("test", "train", "sft"):
        h.update(json.dumps(common.arith_dataset(split), sort_keys=True).encode())
    assert h.hexdigest() == SPLITS_SHA256_AT_8020DD5
    # and a frozen copy of a few problems, printed by the same old code, readable on failure
    assert common.arith_dataset("test")[:2] == [
        {"id": 0, "question": "4+1+30+22", "solution": "4+1=5 5+30=35 35+22=57 #### 57",
         "answer": "57"},
        {"id": 1, "question": "25+12+1", "solution": "25+12=37 37+1=38 #### 38",
         "answer": "38"}]
    assert common.arith_dataset("train")[0]["question"] == "11+5-11+10"
    assert common.arith_dataset("sft")[-1]["solution"] == "30-26=4 4+25=29 29+5=34 34+6=40 #### 40"
    r = random.Random(7)
    assert [common.arith_problem(r)[0] for _ in range(3)] == ["5+13+3+12", "7+2+14+3-3", "27+19+8"]
    # the docstring's example (it read '25+2-13+28' before, which the old code never gave)
    assert common.arith_problem(random.Random(0)) == (
        "25+29-2-17", "25+29=54 54-2=52 52-17=35 #### 35", "35")
    assert common.arith_dataset("test", ops=(2, 4)) == common.arith_dataset("test")
    assert common.load_task("arith", "test", None, "2-4") == common.arith_dataset("test")


def _check_problem(question, solution, answer, ops):
    """Re-derive every step from the question alone: numbers, operators, range, answer."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    signs = re.findall(r"[+-]", question)
    assert ops[0] <= len(signs) <= ops[1] and len(nums) == len(signs) + 1
    assert all(1 <= n <= 30 for n in nums)
    steps, final = solution.split(" #### ")
    cur = nums[0]
    for step, op, b in zip(steps.split(" "), signs, nums[1:]):
        new = cur + b if op == "+" else cur - b
        assert 0 <= new <= 99, (question, step)
        assert step == f"{cur}{op}{b}={new}"
        cur = new
    assert len(steps.split(" ")) == len(signs)
    assert final == answer == str(cur)
    assert common.is_correct(solution, answer)
    wrong = solution.replace(f"#### {answer}", f"#### {int(answer) + 1}")
    assert not common.is_correct(wrong, answer)
    # the default max completion length holds the solution and EOS
    assert len(solution) + 1 <= common.arith_completion_length(ops)


@pytest.mark.parametrize("ops", [(2, 4), (6, 8)])
def test_problems_verify_and_stay_in_range(ops):
    for split in ("test", "train"):
        data = common.arith_dataset(split, ops=ops)
        assert len({ex["question"] for ex in data}) == len(data)
        for ex in data:
            _check_problem(ex["question"], ex["solution"], ex["answer"], ops)
    test = common.arith_dataset("test", ops=ops)
    lengths = {len(re.findall(r"[+-]", ex["question"])) for ex in test}
    assert lengths == set(range(ops[0], ops[1] + 1))


def test_settings_do_not_overlap_across_splits():
    test, train, sft = [{ex["question"] for ex in common.arith_dataset(s, ops=(6, 8))}
                        for s in ("test", "train", "sft")]
    assert not (test & train) and not (test & sft) and not (train & sft)


def test_parse_and_defaults():
    assert common.parse_arith_ops("2-4") == (2, 4)
    assert common.parse_arith_ops(" 6 - 8 ") == (6, 8)
    assert common.parse_arith_ops("5") == (5, 5)
    for bad in ["", "4-2", "1-3", "0", "x", "2-4-6", "2-99", "-3", "2..4"]:
        with pytest.raises(UserError, match="--arith-ops"):
            common.parse_arith_ops(bad)
    # 9 * HI + 12: the longest solution (9 * HI + 7 characters) + EOS + 4 of slack
    assert common.default_max_len("arith") == 48  # today's default, unchanged
    assert common.default_max_len("arith", "6-8") == 84
    assert common.default_max_len("gsm8k", "6-8") == 512
    longest = " ".join(["99-30=69"] * 8) + " #### 69"
    assert len(longest) + 1 + 4 == common.arith_completion_length((6, 8))
    assert common.tiny_context((2, 4)) == 256 and common.tiny_context((6, 8)) == 256
    assert common.tiny_context((19, 19)) == 256 and common.tiny_context((20, 32)) == 512


def test_each_setting_has_its_own_warm_start_folder(tmp_path, monkeypatch):
    """Each shipped setting has its folder in tiny/; another is cached under its own name."""
    assert common.ensure_tiny_model(seed=0, ops=(2, 4)) == common.TINY_DIR / "arith-2-4"
    assert common.ensure_tiny_model(seed=0, ops=(6, 8)) == common.TINY_DIR / "arith-6-8"
    assert common.ensure_tiny_model(seed=0) == common.TINY_DIR / "arith-2-4"
    monkeypatch.setenv("TOKENCREDIT_CACHE", str(tmp_path))
    (tmp_path / "tiny-arith-3-5-v4-seed0").mkdir()
    (tmp_path / "tiny-arith-3-5-v4-seed0" / "warm_start.json").write_text("{}")  # cached
    assert common.ensure_tiny_model(seed=0, ops=(3, 5)) == tmp_path / "tiny-arith-3-5-v4-seed0"


@pytest.mark.parametrize("script", ["grpo", "tempo", "dcpo", "spo", "token_dpo"])
def test_bad_arith_ops_is_one_line_exit_2(script):
    r = run_script(script, "--arith-ops", "8-6", "--total-steps", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--arith-ops" in lines[0] and "Traceback" not in r.stderr


def test_a_script_trains_on_the_setting_it_is_given(random_tiny_model_dir, tmp_path):
    """--arith-ops 6-8 reaches the prompts and the default max completion length (84)."""
    r = run_script("grpo", "--model", str(random_tiny_model_dir), "--output-dir", str(tmp_path),
                   "--arith-ops", "6-8", "--total-steps", "1", "--prompts-per-step", "2",
                   "--num-generations", "2", "--eval-size", "2", "--log-completions-every", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = list(tmp_path.iterdir())
    assert json.loads((run_dir / "config.json").read_text())["arith_ops"] == "6-8"
    prompts = [json.loads(line)["prompt"] for line in open(run_dir / "completions.jsonl")]
    assert prompts and all(6 <= len(re.findall(r"[+-]", p)) <= 8 for p in prompts)
    step1 = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][1]
    assert step1["completions/max_length"] <= 84
    # a random model rarely stops: some completion runs to the setting's limit, past 2-4's 48
    assert step1["completions/max_length"] > 48
