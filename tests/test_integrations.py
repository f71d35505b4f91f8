"""integrations/: the TRL plug-ins give the scripts' numbers, train, keep checkpoints, scale out.

Skipped without TRL (pip install -r integrations/requirements.txt). Everything runs on the CPU
with the embedded tiny model or a random one, 1-4 optimizer steps each.
"""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytest.importorskip("trl", reason="needs: pip install -r integrations/requirements.txt")
sys.path.insert(0, str(ROOT / "integrations"))
import common  # noqa: E402
import dcpo  # noqa: E402
import tempo  # noqa: E402
import token_dpo  # noqa: E402
import train_trl  # noqa: E402
import trl_trainers  # noqa: E402

G = 4
CPU = torch.device("cpu")


def coin(completions, **kwargs):
    """A reward from the text alone (different texts, independent coins): groups get a spread."""
    return [float(hashlib.sha1(c.encode()).digest()[0] % 2) for c in completions]


def right_padded(rows, pad_id):
    ids = torch.full((len(rows), max(map(len, rows))), pad_id)
    mask = torch.zeros(ids.shape)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1.0
    return ids, mask


def grpo_args(tmp_path, method, **kw):
    base = dict(method=method, model="tiny", output_dir=str(tmp_path / method), max_steps=2,
                seed=1, per_device_batch_size=8, num_generations=G, max_completion_length=16,
                train_size=8)
    return train_trl.Args(**{**base, **kw})


def weights(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def changed(before, trainer):
    return any(not torch.equal(a, b) for a, b in zip(before, weights(trainer)))


def recorder(trainer, store):
    """Record each _generate_and_score_completions output, and the advantages TRL's loss gets."""
    gen, loss = trainer._generate_and_score_completions, trainer._compute_loss

    def gen_wrap(inputs):
        out = gen(inputs)
        store.setdefault("gen", []).append(
            {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()})
        return out

    def loss_wrap(model, inputs):
        store.setdefault("loss_inputs", []).append(inputs["advantages"].clone())
        return loss(model, inputs)

    trainer._generate_and_score_completions, trainer._compute_loss = gen_wrap, loss_wrap


# ----------------------------------------------------------------------------------------
# TEMPO
# ----------------------------------------------------------------------------------------


def test_tempo_trainer_hands_tempo_py_advantages_to_trls_loss_and_trains(tmp_path, monkeypatch):
    import trl

    seen, flat, scored = {}, [], []

    def reward(completions, completion_ids, **kw):  # what TRL scored, apart from the tap
        scored.append((list(map(list, completion_ids)), coin(completions)))
        return scored[-1][1]

    trl_generate = trl.GRPOTrainer._generate_and_score_completions

    def trl_flat(self, inputs):  # TRL's own flat advantages, before TEMPO replaces them
        out = trl_generate(self, inputs)
        flat.append(out["advantages"].clone())
        return out

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", trl_flat)
    trainer = train_trl.build_trainer(grpo_args(tmp_path, "tempo"), reward_funcs=[reward])
    recorder(trainer, seen)
    before = weights(trainer)
    trainer.train()

    assert len(seen["gen"]) == len(scored) == 2
    pad = trainer.processing_class.pad_token_id
    for out, (ids, rewards), trl_adv in zip(seen["gen"], scored, flat):
        ids_t, mask = right_padded(ids, pad)
        r = torch.tensor(rewards)
        ref, _ = tempo.compute_tempo_advantages(r, G, ids_t, mask)
        assert torch.equal(out["completion_ids"], ids_t)
        assert torch.equal(out["advantages"], ref)               # tempo.py's numbers, bit for bit
        # td_coef = 0 is GRPO: tempo.py's baseline is TRL's flat advantage on every real token
        grpo_like, _ = tempo.compute_tempo_advantages(r, G, ids_t, mask, td_coef=0.0)
        assert torch.allclose(grpo_like, trl_adv[:, None] * mask, atol=1e-6)
    # the TD term acted somewhere, so more than GRPO was compared
    assert any((o["advantages"] != f[:, None] * (o["advantages"] != 0)).any()
               for o, f in zip(seen["gen"], flat))
    # TRL's loss received these [B, T] rows (after its shuffle)
    for given, out in zip(seen["loss_inputs"], seen["gen"]):
        assert given.shape == out["advantages"].shape
        assert sorted(map(tuple, given.tolist())) == sorted(map(tuple, out["advantages"].tolist()))
    assert changed(before, trainer)
    logged = trainer.state.log_history[0]
    for key in ("reward", "entropy", "clip_ratio/region_mean", "tempo/frac_tokens_td_nonzero",
                "tempo/branch_nodes_per_group_mean"):
        assert key in logged, key


def test_tempo_two_processes_equal_one_process(tmp_path):
    """accelerate launch, 2 CPU processes (gloo), 6 completions each, G = 4: group 2 spans both.
    Also DCPO's statistics on both processes, and TokenDPOTrainer's gradients synchronised."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", str(ROOT / "tests" / "trl_two_process.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["tempo"]["rank"] for r in ranks] == [0, 1] and ranks[0]["tempo"]["world"] == 2

    t0, t1 = ranks[0]["tempo"], ranks[1]["tempo"]
    assert t0["rewards"] == t1["rewards"] and len(t0["rewards"]) == 12   # gathered: all 12
    rows = [row[:n] for t in (t0, t1) for row, n in zip(t["ids"], t["lengths"])]
    ids, mask = right_padded(rows, 0)
    ref, metrics = tempo.compute_tempo_advantages(torch.tensor(t0["rewards"]), G, ids, mask)
    # the split group (rows 4..7: two on each process) has a spread and a nonzero TD term
    assert torch.tensor(t0["rewards"][4:8]).std() > 0 and (ref[4:8] != ref[4:8, :1]).any()
    for rank, t in enumerate((t0, t1)):
        got = torch.tensor(t["advantages"])
        assert torch.equal(got, ref[6 * rank:6 * rank + 6, :got.size(1)]), f"rank {rank}"
        assert t["metrics"] == metrics
    # DCPO: the same SAS statistics on both processes, equal to one process's on the whole batch
    d0, d1 = ranks[0]["dcpo"], ranks[1]["dcpo"]
    assert d0["sas_state"] == d1["sas_state"] and d0["rewards"] == d1["rewards"]
    stats = dcpo.PromptStats(G)
    prompts = d0["sas_state"]["prompts"]
    adv, new, _ = dcpo.sas_advantages(torch.tensor(d0["rewards"]), G, [p[0] for p in prompts],
                                      stats, text_hashes=[p[4] for p in prompts])
    stats.by_id.update(new)
    assert stats.state_dict() == d0["sas_state"]
    assert torch.equal(torch.tensor(d0["advantages"] + d1["advantages"]), adv)
    # TokenDPOTrainer under DDP: different pairs on each process, the same weights after 2 steps
    k0, k1 = ranks[0]["tdpo2"], ranks[1]["tdpo2"]
    assert k0["batches"] != k1["batches"] and len(k0["batches"]) == 2
    assert k0["before"] == k1["before"] and k0["after"] == k1["after"]
    assert k0["after"] != k0["before"] and len(k0["kl_chosen"]) == 2


# ----------------------------------------------------------------------------------------
# DCPO
# ----------------------------------------------------------------------------------------


def test_dcpo_trainer_loss_equals_dcpo_py_on_identical_logps(tmp_path):
    trainer = train_trl.build_trainer(grpo_args(tmp_path, "dcpo"), reward_funcs=[coin])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    gen = torch.Generator().manual_seed(0)
    b, T = 8, 6
    mask = (torch.arange(T)[None] < torch.tensor([6, 5, 6, 2, 4, 6, 3, 1])[:, None]).long()
    logps = (-torch.rand(b, T, generator=gen) * 3).requires_grad_(True)
    old = logps.detach() + 0.6 * torch.randn(b, T, generator=gen)   # ratios far from 1: DAC acts
    adv = torch.randn(b, generator=gen)
    ones = torch.ones(b, 3, dtype=torch.long)
    inputs = {"prompt_ids": ones, "prompt_mask": ones, "completion_mask": mask,
              "completion_ids": torch.ones(b, T, dtype=torch.long), "advantages": adv,
              "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.ones(b, T), None)
    trainer._metrics["train"].clear()

    def ours(loss_type):
        return dcpo.dcpo_loss(logps, old, adv, mask, eps_low=0.16, eps_high=0.20, ratio_max=10.0,
                              loss_type=loss_type, num_sequences=b, num_tokens=float(mask.sum()),
                              num_generations=G)

    for loss_type in ("otm", "dapo"):
        trainer.dcpo_loss_type = loss_type
        got = trainer._compute_loss(trainer.model, inputs)
        want, metrics = ours(loss_type)
        assert torch.equal(got, want), loss_type
        assert metrics["clip_ratio/dcpo"] > 0
        logged = trainer._metrics["train"]["clip_ratio/dcpo"][-1]
        assert logged == pytest.approx(metrics["clip_ratio/dcpo"])
    (g1,) = torch.autograd.grad(trainer._compute_loss(trainer.model, inputs), logps)
    (g2,) = torch.autograd.grad(ours("dapo")[0], logps)
    assert torch.equal(g1, g2)


def test_dcpo_trainer_trains_and_its_sas_statistics_survive_checkpoint_and_resume(tmp_path):
    from transformers import TrainerCallback

    snapshots = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snapshots[state.global_step] = json.loads(json.dumps(trainer.prompt_stats.state_dict()))

    # 2 prompts, so every generation visits both; num_iterations = 2: one generation per 2 steps
    args = grpo_args(tmp_path, "dcpo", train_size=2, save_steps=2, num_iterations=2, max_steps=4)
    trainer = train_trl.build_trainer(args, callbacks=[Snap()], reward_funcs=[coin])
    before = weights(trainer)
    trainer.train()
    assert changed(before, trainer)
    logged = [h for h in trainer.state.log_history if "reward" in h]
    for key in ("reward", "entropy", "clip_ratio/dcpo", "clip_ratio/fixed_0.2", "sas/mean_visits",
                "rur"):
        assert key in logged[0], key
    for step in (2, 4):
        folder = tmp_path / "dcpo" / f"checkpoint-{step}"
        saved = json.loads((folder / trl_trainers.SAS_STATE_FILE).read_text())
        assert saved == snapshots[step]
        assert [p[1] for p in saved["prompts"]] == [step // 2] * 2   # visits: 1 at step 2, 2 at 4

    # resume at step 2: the statistics come back, and steps 3-4 end where the first run did
    ckpt = tmp_path / "dcpo" / "checkpoint-2"
    resumed = train_trl.build_trainer(args, reward_funcs=[coin])
    assert resumed.prompt_stats.by_id == {}
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.prompt_stats.state_dict() == snapshots[4]      # floats compared exactly

    # a checkpoint without the file is refused, not silently restarted from empty statistics
    (ckpt / trl_trainers.SAS_STATE_FILE).unlink()
    with pytest.raises(ValueError, match="dcpo_sas_state.json"):
        train_trl.build_trainer(args, reward_funcs=[coin]).train(resume_from_checkpoint=str(ckpt))


# ----------------------------------------------------------------------------------------
# Token-level DPO
# ----------------------------------------------------------------------------------------


def pair_rows(tokenizer, n=4):
    """Preference rows from the arithmetic task: the worked solution against a wrong answer."""
    rows = []
    for ex in common.load_task("arith", "train")[:n]:
        wrong = ex["solution"].rsplit(" ", 1)[0] + " 0"
        rows.append({"prompt": common.format_prompt(tokenizer, ex["question"], "arith"),
                     "chosen": ex["solution"], "rejected": wrong})
    return rows


def tiny_tokenizer():
    return common.load_model_and_tokenizer("tiny", CPU, torch.float32)[1]


def dpo_trainer(tmp_path, loss, rows, **kw):
    from datasets import Dataset
    from trl import DPOConfig

    model, tok = common.load_model_and_tokenizer("tiny", CPU, torch.float32)
    config = DPOConfig(output_dir=str(tmp_path / loss), max_steps=2, per_device_train_batch_size=2,
                       learning_rate=5e-5, report_to="none", use_cpu=True, save_strategy="no",
                       logging_steps=1, disable_tqdm=True, beta=0.1, bf16=False, **kw)
    extra = {}
    if loss == "tgdpo":
        guidance, _ = common.load_model_and_tokenizer("tiny", CPU, torch.float32)
        with torch.no_grad():
            for p in guidance.parameters():
                p.add_(0.05 * torch.randn_like(p))
        extra["guidance_model"] = guidance
    return trl_trainers.TokenDPOTrainer(model=model, args=config, processing_class=tok,
                                        train_dataset=Dataset.from_list(rows), loss=loss, **extra)


@pytest.mark.parametrize("loss", ["tdpo1", "tdpo2", "tgdpo"])
def test_token_dpo_trainer_loss_equals_token_dpo_py(tmp_path, loss):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = tiny_tokenizer()
    rows = pair_rows(tok)
    trainer = dpo_trainer(tmp_path, loss, rows)
    torch.manual_seed(0)
    with torch.no_grad():                  # move the policy away from the reference: loss != ln 2
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def ids(text, eos=True):
        out = tok(text, add_special_tokens=False)["input_ids"]
        return out + [tok.eos_token_id] if eos else out

    pairs = [{"prompt": ids(r["prompt"], eos=False), "chosen": ids(r["chosen"]),
              "rejected": ids(r["rejected"])} for r in rows]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]}
         for p in pairs])
    trainer.model.train()
    got = trainer.compute_loss(trainer.model, batch)

    # token_dpo.py's own path: left-padded prompts, its hidden states, its losses
    model, ref = trainer.model, trainer.ref_model
    p_ids, p_mask, c_ids, c_mask = common.collate_pairs(pairs, tok.pad_token_id, "cpu")
    hidden = common.response_hidden_states(model, p_ids, p_mask, c_ids, c_mask)
    with torch.no_grad():
        ref_hidden = common.response_hidden_states(ref, p_ids, p_mask, c_ids, c_mask)
    lp, rlp, kl = token_dpo.token_logps_and_kl(hidden, ref_hidden, c_ids, c_mask,
                                               model.get_output_embeddings(),
                                               ref.get_output_embeddings())
    (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (t.chunk(2) for t in (lp, rlp, c_mask, kl))
    if loss == "tgdpo":
        g_lp = common.per_token_logps(trainer.guidance_model, p_ids, p_mask, c_ids, c_mask, 1.0)[0]
        gw, gl = g_lp.chunk(2)
        want, _ = token_dpo.tgdpo_loss(pw, pl, rw, rl, gw, gl, mw, ml, 0.1, 0.5)
    else:
        want, _ = token_dpo.tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, 0.1, 0.5,
                                      version=int(loss[-1]))
    assert abs(want.item() - math.log(2)) > 1e-3          # not the trivial start
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert trainer._metrics["train"]["kl/chosen"] and trainer._metrics["train"]["rewards/margins"]


def test_token_dpo_trainer_trains_two_steps_and_logs_kl(tmp_path):
    trainer = dpo_trainer(tmp_path, "tdpo2", pair_rows(tiny_tokenizer()))
    before = weights(trainer)
    trainer.train()
    assert changed(before, trainer)
    logged = trainer.state.log_history[0]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "kl/chosen", "kl/rejected",
                "logps/chosen"):
        assert key in logged, key


def test_token_dpo_trainer_refuses_precomputed_reference_log_probs(tmp_path):
    with pytest.raises(ValueError, match="precompute_ref_log_probs=False") as e:
        dpo_trainer(tmp_path, "tdpo2", pair_rows(tiny_tokenizer()), precompute_ref_log_probs=True)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# Without TRL (or verl): one line; the core scripts never import them
# ----------------------------------------------------------------------------------------

BLOCK = ("import sys\n"
         "class Block:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('trl', 'verl'):\n"
         "            raise ImportError('No module named ' + repr(name))\n"
         "sys.meta_path.insert(0, Block())\n")
NEED_TRL = ("integrations/trl_trainers.py needs TRL 1.16: "
            "pip install -r integrations/requirements.txt")


def run_blocked(code):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "integrations"))
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def test_without_trl_or_verl_the_plugins_fail_with_one_line_and_the_scripts_still_import():
    proc = run_blocked("import trl_trainers")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "ImportError: " + NEED_TRL
    assert "During handling" not in proc.stderr                  # raised from None: no chain
    proc = run_blocked("import runpy; sys.argv = ['train_trl.py', '--method', 'tempo']\n"
                       "runpy.run_path('integrations/train_trl.py', run_name='__main__')")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: " + NEED_TRL]
    proc = run_blocked("import verl_plugins")
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: integrations/verl_plugins.py needs verl")
    proc = run_blocked("import common, grpo, tempo, dcpo, spo, token_dpo\n"
                       "assert 'trl' not in sys.modules")
    assert proc.returncode == 0, proc.stderr


def test_train_trl_refuses_bad_input_with_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv, needle in ((["--method", "ppo"], "invalid choice"),
                         (["--num-generations", "1"], "--num-generations must be at least 2"),
                         (["--resume-from-checkpoint", str(tmp_path / "nope")], "is not a folder")):
        proc = subprocess.run([sys.executable, str(ROOT / "integrations" / "train_trl.py"), *argv],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------
# train_trl.py: fp32 master weights, TRL's config before the model
# ----------------------------------------------------------------------------------------


def fixed_batch(b=8, P=5, T=6, vocab=90):
    """One generation batch, the same whatever the model computes in: ids, masks, advantages."""
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (b, P), generator=gen)
    completion_ids = torch.randint(3, vocab, (b, T), generator=gen)
    mask = torch.ones(b, T, dtype=torch.long)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones(b, P, dtype=torch.long),
            "completion_ids": completion_ids, "completion_mask": mask,
            "advantages": torch.tensor([1.0, -1.0] * (b // 2)), "num_items_in_batch": mask.sum()}


def test_train_trl_bf16_step_keeps_fp32_weights_and_moves_them_as_an_fp32_step(
        tmp_path, random_tiny_model_dir):
    """Issue 22: TRL loads the weights in fp32 and autocasts to bf16 (bf16=True). At lr 1e-6, a
    bf16 weight of size 0.02 would not move (its spacing is ~1e-4); fp32 master weights do."""
    def one_step(dtype):
        args = grpo_args(tmp_path, "grpo", model=str(random_tiny_model_dir), dtype=dtype,
                         learning_rate=1e-6, max_steps=1, output_dir=str(tmp_path / dtype))
        trainer = train_trl.build_trainer(args, reward_funcs=[coin])
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
        trainer._generate_and_score_completions = lambda inputs: fixed_batch()
        seen = []
        layer = trainer.model.model.layers[0].mlp.down_proj
        layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        before = weights(trainer)
        trainer.train()
        return before, weights(trainer), seen

    b16, a16, seen16 = one_step("bfloat16")
    b32, a32, seen32 = one_step("float32")
    assert seen16[0] == torch.bfloat16 and seen32[0] == torch.float32   # the compute dtype
    assert all(torch.equal(x, y) for x, y in zip(b16, b32))              # the same start
    numel = sum(p.numel() for p in b16)
    moved = sum((x != y).sum().item() for x, y in zip(b16, a16)) / numel
    assert moved >= 0.99, moved
    step16 = sum((x - y).abs().sum().item() for x, y in zip(b16, a16)) / numel
    step32 = sum((x - y).abs().sum().item() for x, y in zip(b32, a32)) / numel
    assert 1 / 1.5 <= step16 / step32 <= 1.5, (step16, step32)


def test_train_trl_checks_trls_config_before_any_model_loads(tmp_path, random_tiny_model_dir,
                                                            monkeypatch):
    """Issue 23, item 12: the config (and so ZeRO-3's zero.Init) exists before the model."""
    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before TRL's config was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    args = grpo_args(tmp_path, "tempo", model=str(random_tiny_model_dir),
                     per_device_batch_size=3, num_generations=2)   # 3 is not a multiple of 2
    with pytest.raises(common.UserError, match="divisible"):
        train_trl.build_trainer(args, reward_funcs=[coin])



# ----------------------------------------------------------------------------------------
# Issue 23: what a TRL user meets on day one (each test failed before its fix)
# ----------------------------------------------------------------------------------------


def plugin_trainer(cls, tmp_path, model_dir=None, name="run", rows=None, model=None, tok=None,
                   plugin=None, **config):
    """A plug-in trainer built as a TRL user builds one: a GRPOConfig, a model, a dataset."""
    from datasets import Dataset
    from trl import GRPOConfig

    if model is None:
        model, tok = common.load_model_and_tokenizer(str(model_dir), CPU, torch.float32)
    rows = rows or [{"prompt": f"Q: {i}+{i}\nA:", "id": i} for i in range(2)]
    base = dict(output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=8,
                num_generations=G, max_completion_length=8, report_to="none", use_cpu=True,
                save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False, seed=1,
                learning_rate=5e-5, top_k=0, top_p=1.0, dataloader_pin_memory=False)
    return cls(model=model, reward_funcs=[coin], args=GRPOConfig(**{**base, **config}),
               train_dataset=Dataset.from_list(rows), processing_class=tok, **(plugin or {}))


def test_dcpo_keys_string_ids_by_their_hash(tmp_path, random_tiny_model_dir):
    """Item 3: sas_key_column="id" with string ids died at step 1 in int()."""
    rows = [{"prompt": f"Q: {i}+1\nA:", "id": f"gsm8k-{i}"} for i in range(2)]
    trainer = plugin_trainer(trl_trainers.DCPOGRPOTrainer, tmp_path, random_tiny_model_dir,
                             rows=rows)
    trainer.train()
    want = {int(dcpo.prompt_hash(r["id"]), 16) for r in rows}
    assert set(trainer.prompt_stats.by_id) == want
    assert trainer._prompt_key({"id": 17, "prompt": "x"}) == 17       # integer ids as they are


def test_dcpo_refuses_checkpoints_between_two_generations(tmp_path, random_tiny_model_dir):
    """Item 5: TRL does not save its generation buffer, so a resume between two generations
    regenerates and the SAS visits diverge ([3, 3] instead of [2, 2]): refused, at setup and
    at resume."""
    dcpo_cls = trl_trainers.DCPOGRPOTrainer
    with pytest.raises(ValueError, match="generation boundaries") as e:
        plugin_trainer(dcpo_cls, tmp_path, random_tiny_model_dir, save_strategy="steps",
                       save_steps=1, num_iterations=2)
    assert "\n" not in str(e.value)
    # checkpoint-1 of a run that generates every step ...
    first = plugin_trainer(dcpo_cls, tmp_path, random_tiny_model_dir, name="every_step",
                           save_strategy="steps", save_steps=1)
    first.train()
    ckpt = tmp_path / "every_step" / "checkpoint-1"
    # ... is between two generations for a run that generates every 2 steps
    second = plugin_trainer(dcpo_cls, tmp_path, random_tiny_model_dir, name="every_2",
                            num_iterations=2, max_steps=2)
    with pytest.raises(trl_trainers.ResumeError, match="between two generations"):
        second.train(resume_from_checkpoint=str(ckpt))


def test_evaluate_with_eval_groups_smaller_than_training_groups(tmp_path, random_tiny_model_dir):
    """Item 6: TEMPO with num_generations_eval=1 crashed in build_prefix_tree; DCPO's OTM eval
    loss was NaN when an eval batch held fewer rows than the training G."""
    from datasets import Dataset

    eval_rows = Dataset.from_list([{"prompt": f"Q: {i}*2\nA:", "id": i} for i in range(4)])
    tempo_t = plugin_trainer(trl_trainers.TempoGRPOTrainer, tmp_path, random_tiny_model_dir,
                             name="tempo", num_generations_eval=1, per_device_eval_batch_size=2)
    assert math.isfinite(tempo_t.evaluate(eval_dataset=eval_rows)["eval_loss"])
    dcpo_t = plugin_trainer(trl_trainers.DCPOGRPOTrainer, tmp_path, random_tiny_model_dir,
                            name="dcpo", num_generations_eval=2, per_device_eval_batch_size=2)
    assert math.isfinite(dcpo_t.evaluate(eval_dataset=eval_rows)["eval_loss"])


def tiny_moe(coef=0.5):
    """A 1-layer Mixtral (4 experts, 2 a token) with the char tokenizer: TRL's MoE path."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = common.build_char_tokenizer()
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=coef,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=None, max_position_embeddings=64)
    return MixtralForCausalLM(config), tok


def moe_aux(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     output_router_logits=True).aux_loss


def test_dcpo_and_token_dpo_add_the_moe_load_balancing_loss_as_trl_does(tmp_path):
    """Item 7: TRL turns the router's aux loss on for MoE models; the plug-ins dropped it."""
    model, tok = tiny_moe()
    trainer = plugin_trainer(trl_trainers.DCPOGRPOTrainer, tmp_path, model=model, tok=tok)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = fixed_batch(vocab=len(tok))
    with_aux = trainer._compute_loss(trainer.model, inputs)
    trainer.aux_loss_enabled = False
    without = trainer._compute_loss(trainer.model, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    aux = moe_aux(trainer.model, ids, torch.ones_like(ids))
    assert aux > 0
    assert (with_aux - without).item() == pytest.approx(0.5 * aux.item() / 2, rel=1e-4)
    assert trainer._metrics["train"]["aux_loss"]

    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "moe")  # TRL's DPO loads its reference from the model's id
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, report_to="none",
                       use_cpu=True, per_device_train_batch_size=2, bf16=False, beta=0.1)
    rows = [{"prompt": "Q: 1+1\nA:", "chosen": "2", "rejected": "3"}] * 2
    dpo_t = trl_trainers.TokenDPOTrainer(model=model, args=config, processing_class=tok,
                                         train_dataset=Dataset.from_list(rows), loss="tdpo2")
    assert dpo_t.aux_loss_enabled
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 1], "rejected_ids": [9, 9, 1]}] * 2)
    dpo_t.model.train()
    with_aux = dpo_t.compute_loss(dpo_t.model, batch)
    dpo_t.aux_loss_enabled = False
    without = dpo_t.compute_loss(dpo_t.model, batch)
    aux = moe_aux(dpo_t.model, batch["input_ids"], batch["attention_mask"])
    assert (with_aux - without).item() == pytest.approx(0.5 * aux.item(), rel=1e-4)


@pytest.mark.parametrize("option", [dict(loss_type=["sigmoid", "sft"]), dict(loss_weights=[1.0]),
                                    dict(label_smoothing=0.1), dict(use_weighting=True),
                                    "compute_metrics", "images"])
def test_token_dpo_refuses_the_dpo_options_it_would_ignore(tmp_path, option):
    """Item 8: each was silently ignored (or, compute_metrics, raised inside evaluate())."""
    from datasets import Dataset
    from trl import DPOConfig

    model, tok = common.load_model_and_tokenizer(str(tiny_dir(tmp_path)), CPU, torch.float32)
    rows = [{"prompt": "Q: 1+1\nA:", "chosen": "2", "rejected": "3"}] * 2
    config_kw = option if isinstance(option, dict) else {}
    extra = {"compute_metrics": lambda p: {}} if option == "compute_metrics" else {}
    if option == "images":
        rows = [{**r, "images": None} for r in rows]
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, report_to="none",
                       use_cpu=True, per_device_train_batch_size=2, bf16=False, **config_kw)
    with pytest.raises(ValueError) as e:
        trl_trainers.TokenDPOTrainer(model=model, args=config, processing_class=tok,
                                     train_dataset=Dataset.from_list(rows), loss="tdpo2", **extra)
    name = next(iter(config_kw)) if config_kw else option
    assert str(e.value).startswith("TokenDPOTrainer") and "\n" not in str(e.value)
    assert name.rstrip("s") in str(e.value)    # (TRL's own refusal of images names no trainer)


def tiny_dir(tmp_path):
    """A random tiny model saved like any HF model (cheap; no warm start)."""
    path = tmp_path / "tiny"
    if not path.exists():
        tok = common.build_char_tokenizer()
        torch.manual_seed(0)
        common.build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def test_token_dpo_refuses_zero3_and_fsdp_with_one_line(tmp_path):
    """Item 12: under ZeRO-3 or FSDP the LM heads outside the forward are empty shards."""
    trainer = dpo_trainer_on(tmp_path, tiny_dir(tmp_path))
    trainer._refuse_sharded_weights()                       # DDP or one process: fine
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="ZeRO-3 or FSDP") as e:
        trainer._refuse_sharded_weights()
    assert "\n" not in str(e.value)


def dpo_trainer_on(tmp_path, model_dir):
    from datasets import Dataset
    from trl import DPOConfig

    model, tok = common.load_model_and_tokenizer(str(model_dir), CPU, torch.float32)
    rows = [{"prompt": "Q: 1+1\nA:", "chosen": "2", "rejected": "3"}] * 2
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, report_to="none",
                       use_cpu=True, per_device_train_batch_size=2, bf16=False)
    return trl_trainers.TokenDPOTrainer(model=model, args=config, processing_class=tok,
                                        train_dataset=Dataset.from_list(rows), loss="tdpo2")


def test_completions_table_shows_the_methods_own_advantages(tmp_path, random_tiny_model_dir):
    """Item 10: with log_completions=True the table showed TRL's GRPO advantages."""
    import pandas

    for cls in (trl_trainers.TempoGRPOTrainer, trl_trainers.DCPOGRPOTrainer):
        name = cls.__name__
        trainer = plugin_trainer(cls, tmp_path, random_tiny_model_dir, name=name,
                                 log_completions=True)
        seen = {}
        recorder(trainer, seen)
        trainer.train()
        out = seen["gen"][0]
        adv, mask = out["advantages"], out["completion_mask"].float()
        want = adv if adv.dim() == 1 else (adv * mask).sum(1) / mask.sum(1)
        assert list(trainer._logs["advantages"]) == pytest.approx(want.tolist()), name
        table = pandas.read_parquet(tmp_path / name / "completions" / "completions_00001.parquet")
        assert table["advantage"].tolist() == pytest.approx(want.tolist()), name
        assert (want != 0).any()


def test_dcpo_checkpoint_holds_its_sas_file_before_the_hub_upload(tmp_path, random_tiny_model_dir):
    """Item 11: the upload began before dcpo_sas_state.json was written."""
    trainer = plugin_trainer(trl_trainers.DCPOGRPOTrainer, tmp_path, random_tiny_model_dir,
                             save_strategy="steps", save_steps=1)
    uploaded = []
    trainer.args.push_to_hub = True       # after __init__: no hub repository is created
    trainer._push_from_checkpoint = lambda folder: uploaded.append(sorted(os.listdir(folder)))
    trainer._finish_current_push = lambda: None
    trainer.train()
    assert uploaded and trl_trainers.SAS_STATE_FILE in uploaded[0]
