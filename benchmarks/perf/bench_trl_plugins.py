"""What the TRL plug-ins add to one TRL step: TempoGRPOTrainer and DCPOGRPOTrainer vs GRPOTrainer.

    pip install -r integrations/requirements.txt          # into its own venv (see that file)
    OMP_NUM_THREADS=2 python benchmarks/perf/bench_trl_plugins.py     # CPU, embedded tiny model
    python benchmarks/perf/bench_trl_plugins.py --model /path/to/folder --prompts 16 \\
        --completion-length 256                                       # a real model, on a GPU

Each trainer runs `trainer.train()` for one optimizer step, round-robin with the others,
--repeats times after --warmup; every call starts from the same first batch of prompts (no
shuffling), and every completion is exactly --completion-length tokens (min_new_tokens), so
the three trainers see the same shapes. Measured per step:
  step      TRL's step, from a TrainerCallback: first on_step_begin to on_step_end (generation,
            reward, advantages, loss, backward, optimizer)
  extra     the plug-in's own work inside the step, timed around it: for TEMPO, the gather of
            the token ids and the prefix trees (its _generate_and_score_completions minus TRL's);
            for DCPO, SAS (the same difference) plus all of dcpo.dcpo_loss (the loss arithmetic
            and its metrics; an upper bound, since it replaces TRL's own loss arithmetic)
  share     median(extra) / median(step of GRPOTrainer), and / its fastest step
The end-to-end ratio step(method) / step(GRPO) is printed too, but on a shared machine its
noise is far larger than the effect; `extra` is the number to read. Medians of --repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/perf/ -> the repository root
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integrations"))
import common  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' or a save_pretrained folder")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (default: 4)")
    p.add_argument("--num-generations", type=int, default=8, help="G (default: 8)")
    p.add_argument("--completion-length", type=int, default=48, help="tokens a completion (48)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per trainer (default: 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer (default: 1)")
    p.add_argument("--out", default=None, help="also write the raw timings to this JSON file")
    a = p.parse_args(argv)
    for name in ("prompts", "completion_length", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.num_generations < 2:
        p.error("--num-generations must be at least 2")
    return a


def main(argv=None):
    a = parse(argv)
    try:
        import trl_trainers
    except ImportError as e:
        common.fail(str(e))
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    folder = str(common.ensure_tiny_model(seed=0)) if a.model == common.TINY else a.model
    B, L = a.prompts * a.num_generations, a.completion_length
    clock = {"gen_parent": 0.0, "gen_total": 0.0, "loss": 0.0, "dcpo_loss": 0.0, "step": 0.0}

    def timed(fn, key):  # fn, adding its time to clock[key]
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            clock[key] += time.perf_counter() - t0
            return out
        return wrapper

    # TRL's own generate-and-score (the plug-ins reach it through super()), and DCPO's loss
    GRPOTrainer._generate_and_score_completions = timed(
        GRPOTrainer._generate_and_score_completions, "gen_parent")
    trl_trainers.dcpo.dcpo_loss = timed(trl_trainers.dcpo.dcpo_loss, "dcpo_loss")

    def outer(cls):  # the trainer's own overrides, timed from outside
        class Timed(cls):
            def _generate_and_score_completions(self, inputs):
                return timed(super()._generate_and_score_completions, "gen_total")(inputs)

            def _compute_loss(self, model, inputs):
                return timed(super()._compute_loss, "loss")(model, inputs)
        return Timed

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            for k in clock:
                clock[k] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock["step"] = time.perf_counter() - self.t0

    tok = common.load_model_and_tokenizer(folder, torch.device("cpu"), torch.float32)[1]
    train = common.load_task("arith", "train")[:a.prompts]
    rows = [{"prompt": common.format_prompt(tok, ex["question"], "arith"), "id": ex["id"]}
            for ex in train]

    def parity(completions, **kw):  # cheap, deterministic, a spread in most groups
        return [float(sum(map(ord, c)) % 2) for c in completions]

    def build(cls):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="bench_trl_plugins_"), max_steps=1, seed=0,
            per_device_train_batch_size=B, gradient_accumulation_steps=1,
            num_generations=a.num_generations, max_completion_length=L,
            generation_kwargs={"min_new_tokens": L}, temperature=1.0, top_p=1.0, top_k=0,
            num_iterations=1, beta=0.0, loss_type="grpo", learning_rate=5e-5,
            lr_scheduler_type="constant", logging_steps=10**9, save_strategy="no",
            report_to="none", disable_tqdm=True, log_completions=False, shuffle_dataset=False,
            use_cpu=device.type == "cpu", bf16=False, dataloader_pin_memory=False)
        model, _ = common.load_model_and_tokenizer(folder, device, torch.float32)
        return cls(model=model, reward_funcs=[parity], args=config, processing_class=tok,
                   train_dataset=Dataset.from_list(rows), callbacks=[StepClock()])

    trainers = {"grpo": build(outer(GRPOTrainer)),
                "tempo": build(outer(trl_trainers.TempoGRPOTrainer)),
                "dcpo": build(outer(trl_trainers.DCPOGRPOTrainer))}
    raw = {name: {k: [] for k in ("step", "gen_extra", "loss", "dcpo_loss")} for name in trainers}
    for k in range(a.warmup + a.repeats):
        for name, trainer in trainers.items():
            trainer.train()
            if k >= a.warmup:
                raw[name]["step"].append(clock["step"])
                raw[name]["gen_extra"].append(clock["gen_total"] - clock["gen_parent"])
                raw[name]["loss"].append(clock["loss"])
                raw[name]["dcpo_loss"].append(clock["dcpo_loss"])

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in raw.items()}
    base, fastest = med["grpo"]["step"], min(raw["grpo"]["step"])
    print(f"trl {__import__('trl').__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {a.model}, P = {a.prompts} x "
          f"G = {a.num_generations} = {B} completions of L = {L} tokens; medians of "
          f"{a.repeats} steps after {a.warmup} warm-up\n")
    print("| trainer | step (s) | x GRPO | plug-in's own work (ms) | share of GRPO's step "
          "(median; fastest) |")
    print("|---|---|---|---|---|")
    for name in trainers:
        m = med[name]
        extra = {"grpo": 0.0, "tempo": m["gen_extra"],
                 "dcpo": m["gen_extra"] + m["dcpo_loss"]}[name]  # DCPO: SAS + its whole loss
        print(f"| {name} | {m['step']:.3f} | {m['step'] / base:.3f} | {1e3 * extra:.2f} | "
              f"{100 * extra / base:.3f}%; {100 * extra / fastest:.3f}% |")
    print(f"\nfastest GRPO step {fastest:.3f} s; DCPO: SAS {1e3 * med['dcpo']['gen_extra']:.2f} "
          f"ms, dcpo_loss {1e3 * med['dcpo']['dcpo_loss']:.2f} ms; _compute_loss with its "
          f"forward: GRPO {1e3 * med['grpo']['loss']:.1f} ms, "
          f"DCPO {1e3 * med['dcpo']['loss']:.1f} ms")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "raw": raw}, indent=1))


if __name__ == "__main__":
    main()
