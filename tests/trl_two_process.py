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


def coin(completions, **kwargs):  # a reward from the text alone: different texts, independent coins
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


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = {m: one_step(m, out) for m in ("tempo", "dcpo")}
    (out / f"rank{result['tempo']['rank']}.json").write_text(json.dumps(result))
