"""Run by tests/test_integrations.py under `accelerate launch --multi_gpu --num_processes 2`
on a machine without GPUs (TRL then runs both processes on the CPU, over gloo). Not a test.

One TRL step of TempoGRPOTrainer, then one of DCPOGRPOTrainer, with 6 completions per process
and G = 4: the second group's completions are split over the two processes. Every rank writes
what it saw (its completion ids and lengths, the rewards, its advantages, the trainers' metrics
and the SAS statistics) to OUT/rank{r}.json; the test rebuilds the one-process answer from them.
"""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integrations"))
import train_trl  # noqa: E402


def coin(completions, **kwargs):  # a reward from the text alone: independent coins
    return [float(hashlib.sha1(c.encode()).digest()[0] % 2) for c in completions]


def one_step(method: str, out_dir: Path) -> dict:
    args = train_trl.Args(method=method, model="tiny", output_dir=str(out_dir / method),
                          max_steps=1, seed=1, per_device_batch_size=6, num_generations=4,
                          max_completion_length=16, train_size=8)
    trainer = train_trl.build_trainer(args, reward_funcs=[coin])
    seen = {}
    inner = trainer._generate_and_score_completions

    def capture(inputs):
        out = inner(inputs)
        seen.update(ids=out["completion_ids"].tolist(), lengths=trainer._tap_lengths,
                    rewards=trainer._tap_rewards.tolist(), advantages=out["advantages"].tolist())
        return out

    trainer._generate_and_score_completions = capture
    trainer.train()
    seen["metrics"] = {k: v for k, v in trainer.state.log_history[0].items()
                       if k.startswith(("tempo/", "sas/", "rur"))}
    if method == "dcpo":
        seen["sas_state"] = trainer.prompt_stats.state_dict()
    acc = trainer.accelerator
    seen["rank"], seen["world"] = acc.process_index, acc.num_processes
    return seen


def token_dpo_steps(out_dir: Path) -> dict:
    """TDPO2, 2 steps, one different pair per process: DDP must leave the same weights on both."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig

    import common
    import trl_trainers

    model, tok = common.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32)
    rows = [{"prompt": common.format_prompt(tok, ex["question"], "arith"), "chosen": ex["solution"],
             "rejected": ex["solution"].rsplit(" ", 1)[0] + " 0"}
            for ex in common.load_task("arith", "train")[:4]]
    config = DPOConfig(output_dir=str(out_dir / "tdpo2"), max_steps=2,
                       per_device_train_batch_size=1, learning_rate=5e-5, report_to="none",
                       use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                       beta=0.1, bf16=False)

    def fingerprint(m):
        return [float(p.detach().double().sum()) for p in m.parameters()]

    before = fingerprint(model)
    trainer = trl_trainers.TokenDPOTrainer(model=model, args=config, processing_class=tok,
                                           train_dataset=Dataset.from_list(rows), loss="tdpo2")
    batches, loss = [], trainer._compute_loss

    def record(model, inputs, return_outputs=False):  # which pairs this process trained on
        batches.append(inputs["input_ids"].tolist())
        return loss(model, inputs, return_outputs)

    trainer._compute_loss = record
    trainer.train()
    return {"before": before, "after": fingerprint(trainer.accelerator.unwrap_model(trainer.model)),
            "kl_chosen": [h["kl/chosen"] for h in trainer.state.log_history if "kl/chosen" in h],
            "batches": batches}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = {m: one_step(m, out) for m in ("tempo", "dcpo")}
    result["tdpo2"] = token_dpo_steps(out)
    (out / f"rank{result['tempo']['rank']}.json").write_text(json.dumps(result))
    # Leave together, and close gloo before the interpreter does: a process group left to
    # interpreter shutdown can abort one rank ("terminate called without an active exception",
    # seen once in CI) after its work is done.
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
