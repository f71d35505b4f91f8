"""common.py: verifiers, tasks, data loading, prompts, CLI, checkpoints."""
import json
import random
import time

import pytest
import torch

import common
from conftest import SHARED


@pytest.mark.parametrize("text,expected", [
    ("so the total is \\boxed{42}.", "42"),
    ("#### 1,234", "1,234"),
    ("The answer is $18.", "$18"),
    ("the answer is: 7", "7"),
    ("5 apples and 6 pears, 11 fruits", "11"),
    ("12+7=19 19-5=14 #### 14", "14"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert common.extract_answer(text) == expected


@pytest.mark.parametrize("pred,gold,ok", [
    ("#### 18", "18", True), ("#### 18.0", "18", True), ("#### $1,000", "1000", True),
    ("The answer is 18.", "18", True), ("\\boxed{-3}", "-3", True), ("#### 17", "18", False),
    ("#### 0.50", "0.5", True), ("x" * 10 + "#### 18", "18", True), ("nothing", "18", False),
    ("#### 1" + "0" * 100, "1" + "0" * 100, False),  # absurdly long numbers are not compared
])
def test_is_correct(pred, gold, ok):
    assert common.is_correct(pred, gold) is ok


def test_verifier_hostile_inputs_are_fast_and_safe():
    hostile = ["__import__('os').system('echo pwned')", "9**9**9**9", "1e999999", "(" * 100000 + "1",
               "\\boxed{" * 1000, "\\boxed{12", "٣٤٥ ⁴² 𝟘", "#### " + "9" * 1_000_000, "a" * 5_000_000 + " 7"]
    for text in hostile:
        t0 = time.time()
        out = common.is_correct(text, "7")
        assert isinstance(out, bool) and time.time() - t0 < 0.5
    assert common.is_correct("a" * 5_000_000 + " 7", "7")


@pytest.mark.skipif(not (SHARED / "data/gsm8k/test.jsonl").exists(), reason="../shared/data/gsm8k is absent")
def test_verifier_accepts_every_gsm8k_gold():
    rows = [json.loads(l) for l in open(SHARED / "data/gsm8k/test.jsonl")]
    assert len(rows) > 1000
    bad = [r["answer"] for r in rows if not common.is_correct(r["answer"], common.gold_from_gsm8k(r["answer"]))]
    assert bad == []


def test_arith_task_fixed_and_disjoint():
    train, test, sft = common.arith_dataset("train"), common.arith_dataset("test"), common.arith_dataset("sft")
    assert (len(train), len(test), len(sft)) == (common.ARITH_TRAIN_SIZE, common.ARITH_TEST_SIZE, common.ARITH_SFT_SIZE)
    q = [{e["question"] for e in s} for s in (train, test, sft)]
    assert not (q[0] & q[1]) and not (q[0] & q[2]) and not (q[1] & q[2])
    assert common.arith_dataset("train") == train  # the same on every call and machine
    for ex in train[:200]:  # the solution is correct and verifies
        assert common.is_correct(ex["solution"], ex["answer"])
        assert int(ex["answer"]) == eval(ex["question"], {"__builtins__": {}})  # our own generated text
    q, sol, ans = common.arith_problem(random.Random(0))
    assert sol.endswith(f"#### {ans}") and sol.count("=") >= 2


def test_warm_start_is_in_its_band_and_loads_like_a_hub_model(warm_tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((warm_tiny_model_dir / "warm_start.json").read_text())
    lo, hi = common.TINY_TARGET_ACC
    assert lo <= info["heldout_accuracy"] <= hi and info["sft_steps"] % 50 == 0
    assert info["sft_matmuls"] == "fp32"
    model = AutoModelForCausalLM.from_pretrained(warm_tiny_model_dir)
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(warm_tiny_model_dir)
    assert tok.padding_side == "left" and len(tok) == model.config.vocab_size


def test_gsm8k_bad_files(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(common.UserError, match="holds no examples"):
        common.load_gsm8k("train", str(tmp_path))
    (tmp_path / "train.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(common.UserError, match=r"train.jsonl:1 is not a GSM8K record"):
        common.load_gsm8k("train", str(tmp_path))


def test_char_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer
    tok = common.build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    s = "Q:12+7-5\nA:12+7=19 19-5=14 #### 14"
    ids = tok2(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(s) and tok2.decode(ids) == s
    assert tok2.padding_side == "left" and tok2.pad_token_id != tok2.eos_token_id


def test_plural():
    assert [common.plural(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]


def test_prompt_sampler_resumes_exactly():
    a = common.PromptSampler(10, seed=3)
    first = [a.next(4) for _ in range(3)]
    b = common.PromptSampler(10, seed=3)
    b.next(4)
    state = b.state_dict()
    c = common.PromptSampler(10, seed=3)
    c.load_state_dict(state)
    assert [c.next(4), c.next(4)] == first[1:]
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))  # one epoch covers all


def test_checkpoint_is_atomic_and_loadable(random_tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok = common.load_model_and_tokenizer(str(random_tiny_model_dir), torch.device("cpu"), torch.float32)
    (tmp_path / "config.json").write_text("{}")
    ckpt = common.save_checkpoint(tmp_path, 3, model, tok, {"x": 1})
    assert common.latest_checkpoint(tmp_path) == ckpt
    # a partial later checkpoint (no COMPLETE marker) is skipped
    (tmp_path / "checkpoints/step-0000009").mkdir()
    assert common.latest_checkpoint(tmp_path) == ckpt
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        common.save_checkpoint(tmp_path, 4, model, tok, {})
    assert common.latest_checkpoint(tmp_path) == ckpt


def test_a_run_shows_no_transformers_progress_bars(random_tiny_model_dir, tmp_path, capsys):
    """Loading, saving a checkpoint and loading it back draw none of transformers' own bars
    ("Loading weights", "Writing model shards"): a run shows one bar, its own (issue 26, 2b)."""
    from transformers.utils import logging as hf_logging
    previous = hf_logging.set_tqdm_hook(None)  # as in a fresh process: the loader must set it
    try:
        model, tok = common.load_model_and_tokenizer(str(random_tiny_model_dir), torch.device("cpu"),
                                                     torch.float32)
        (tmp_path / "config.json").write_text("{}")
        ckpt = common.save_checkpoint(tmp_path, 1, model, tok, {})
        common.load_frozen(str(ckpt), torch.device("cpu"), torch.float32)
    finally:
        hf_logging.set_tqdm_hook(previous)
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s" not in err, err


def test_generation_ignores_model_generation_config(random_tiny_model_dir):
    """A hub model's generation_config.json (top_k, repetition_penalty, ...) must not change our sampler."""
    model, tok = common.load_model_and_tokenizer(str(random_tiny_model_dir), torch.device("cpu"), torch.float32)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 1e9
    model.generation_config.temperature = 0.01
    ids, mask = common.left_pad([[5, 6, 7]], tok.pad_token_id, "cpu")
    greedy = common.generate(model, tok, ids, mask, 6, greedy=True)
    seq = ids
    with torch.no_grad():  # a plain greedy loop
        for _ in range(6):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert greedy.tolist() == seq[:, 3:3 + greedy.size(1)].tolist()
    torch.manual_seed(0)
    samples = common.generate(model, tok, ids, mask, 6, num_generations=16)
    assert len({tuple(r) for r in samples.tolist()}) > 1  # top_k=1 from the model config would make them equal


def test_finished_rewards_zero_a_truncated_completion():
    eos = 1
    ids = torch.tensor([[5, 6, eos, 0], [5, 6, 7, 8], [5, eos, 0, 0]])
    texts = ["#### 4", "#### 4", "#### 5"]
    assert common.finished_rewards(texts, ["4", "4", "4"], ids, eos).tolist() == [1.0, 0.0, 0.0]


def test_keyed_sampler_draws_from_softmax_of_the_warped_logits():
    n = 40000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(n, 1)
    ids = torch.zeros(n, 3, dtype=torch.long)
    picks = common.KeyedSampler(list(range(n)), 1.0, 1.0, 0)(ids, logits.clone())
    assert ((picks == 0.0).sum(1) == 1).all() and torch.isinf(picks).sum() == 3 * n   # one token per row
    freq = torch.bincount(picks.argmax(1), minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)     # 4 std is about 0.01
    # temperature 0.5 squares and renormalises p; top_k 2 keeps the two largest
    freq_t = torch.bincount(common.KeyedSampler(list(range(n)), 0.5, 1.0, 0)(ids, logits.clone()).argmax(1),
                            minlength=4).float() / n
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(freq_t, p2 / p2.sum(), atol=0.01)
    freq_k = torch.bincount(common.KeyedSampler(list(range(n)), 1.0, 1.0, 2)(ids, logits.clone()).argmax(1),
                            minlength=4).float() / n
    assert torch.allclose(freq_k, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)


def test_keyed_generation_does_not_depend_on_batch_mates(random_tiny_model_dir):
    model, tok = common.load_model_and_tokenizer(str(random_tiny_model_dir), torch.device("cpu"), torch.float32)
    rows = [tok("Q:1+2\nA:", add_special_tokens=False)["input_ids"],
            tok("Q:11+22-3\nA:", add_special_tokens=False)["input_ids"]]
    ids, mask = common.left_pad(rows, tok.pad_token_id, "cpu")
    together = common.generate(model, tok, ids, mask, 12, row_keys=[101, 202])
    for r, key in enumerate([101, 202]):
        alone_ids, alone_mask = common.left_pad([rows[r]], tok.pad_token_id, "cpu")
        alone = common.generate(model, tok, alone_ids, alone_mask, 12, row_keys=[key])
        assert torch.equal(alone[0], together[r, :alone.size(1)])
    other = common.generate(model, tok, ids, mask, 12, row_keys=[102, 203])
    assert not torch.equal(other, together)
    with pytest.raises(ValueError, match="one key per prompt row"):
        common.generate(model, tok, ids, mask, 4, num_generations=2, row_keys=[1, 2])


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (1.5, 5)])
def test_generate_continuations_equals_generate_on_repeated_rows(temperature, top_k):
    """One prefill per row, and a continuation leaves the batch when it ends: the same samples as
    generate() on the rows repeated n times with the same keys, cut at EOS or at each row's budget."""
    model, tok = common.load_model_and_tokenizer(common.TINY, torch.device("cpu"), torch.float32, "2-4")
    rows = [tok(common.format_prompt(tok, q, "arith"), add_special_tokens=False)["input_ids"]
            for q in ["12+7*3", "5-9+44", "8*8-1"]]
    rows[2] = rows[2] + tok("8*8=64", add_special_tokens=False)["input_ids"]  # a prompt plus a prefix
    n, budgets = 6, [30, 4, 25]                                   # row 1's budget ends before its EOS
    keys = [1000 * p + j for p in range(3) for j in range(n)]
    got = common.generate_continuations(model, tok, rows, n, budgets, keys, temperature, 1.0, top_k)
    ids, mask = common.left_pad([r for r in rows for _ in range(n)], tok.pad_token_id, "cpu")
    ref = common.generate(model, tok, ids, mask, max(budgets), temperature=temperature, top_k=top_k,
                          row_keys=keys).tolist()
    eos = tok.eos_token_id
    for r, (row, want) in enumerate(zip(got, ref)):
        want = want[:budgets[r // n]]
        want = want[:want.index(eos) + 1] if eos in want else want
        assert row == want, r
    ended = [row for row in got if row and row[-1] == eos]
    assert len(ended) >= 2 * n and len({len(row) for row in ended}) > 1     # rows left at different steps
    assert all(len(row) == 4 and eos not in row for row in got[n:2 * n])   # cut by the budget
    assert common.generate_continuations(model, tok, rows[:1], 2, [0], [1, 2]) == [[], []]


def test_a_cache_layer_grows_in_place_and_holds_what_concatenation_would():
    from transformers.cache_utils import DynamicLayer

    layer, plain = DynamicLayer(), DynamicLayer()
    states = [(torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 7))]          # prefill: 4 positions
    states += [(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 7)) for _ in range(6)]  # 6 tokens
    for lay in (layer, plain):
        lay.update(*states[0])
    common._grow_in_place(layer, room=4)
    ptrs = []
    for i in range(6):
        if i == 3:                                        # a batch selection, as when rows end
            for lay in (layer, plain):
                lay.batch_select_indices(torch.tensor([0, 2]))
            states = [(k[[0, 2]], v[[0, 2]]) for k, v in states]
        k, v = states[1 + i]
        got, want = layer.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert layer.get_seq_length() == plain.get_seq_length() == 5 + i
        ptrs.append(got[0].data_ptr())
    # no copy per token: the same buffer until the room (4) runs out or rows are selected
    assert ptrs[0] == ptrs[1] == ptrs[2] != ptrs[3] and ptrs[3] == ptrs[4] == ptrs[5]


def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(random_tiny_model_dir):
    def grads_and_layer_calls(checkpointing):
        model, tok = common.load_model_and_tokenizer(str(random_tiny_model_dir), torch.device("cpu"), torch.float32)
        if checkpointing:
            common.enable_gradient_checkpointing(model)
        calls = []
        mlp = model.model.layers[0].mlp  # inside the checkpoint; count its forward calls (hooks skip the recompute)
        mlp_forward = mlp.forward
        mlp.forward = lambda *a, **k: calls.append(1) or mlp_forward(*a, **k)
        prompt, pmask = common.left_pad([[3, 4, 5], [6, 7]], tok.pad_token_id, "cpu")
        completion = torch.tensor([[8, 9, 1], [10, 1, 1]])
        cmask = common.completion_mask_from_ids(completion, 1)
        logps, _ = common.per_token_logps(model, prompt, pmask, completion, cmask, 1.0)
        (logps * cmask).sum().backward()
        n_forward = len(calls)
        out = common.generate(model, tok, prompt, pmask, 4, greedy=True)  # eval mode inside, mode restored after
        assert model.training == checkpointing and out.shape[0] == 2
        return [p.grad.clone() for p in model.parameters()], n_forward

    plain, calls_plain = grads_and_layer_calls(False)
    ckpt, calls_ckpt = grads_and_layer_calls(True)
    assert calls_plain == 1 and calls_ckpt == 2          # the layer ran again during backward
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
