"""Train with TRL on our tasks and verifier: GRPO, TEMPO or DCPO (integrations/trl_trainers.py).

    pip install -r integrations/requirements.txt                   # TRL 1.16 and accelerate
    python integrations/train_trl.py --method tempo --model tiny --task arith      # CPU
    accelerate launch --multi_gpu --num_processes 2 integrations/train_trl.py --method tempo
                                 # 2 processes; with no GPU, TRL runs them on the CPU over gloo
    accelerate launch --num_processes 8 --multi_gpu integrations/train_trl.py --method dcpo \\
        --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k                # 8 GPUs, DDP
    python integrations/train_trl.py --method tempo --model Qwen/Qwen2.5-0.5B-Instruct \\
        --task gsm8k --use-vllm --vllm-mode colocate                   # 1 GPU, vLLM generates

The dataset is built in memory from common.load_task (never from the hub); the reward is
common.reward_fn, the verifier of every script. Batch sizes are TRL's: an optimizer step sees
per_device_batch_size x gradient_accumulation_steps x processes completions, num_generations
per prompt. --use-vllm only passes TRL's vLLM options on: it needs a GPU and vllm, and this
repo's tests do not run it (docs/integrations.md says what to check).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integrations"))
import common  # noqa: E402
from common import UserError  # noqa: E402


def opt(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass
class Args:
    """GRPO, TEMPO or DCPO on TRL's GRPOTrainer, with this repo's tasks and verifier."""
    method: Literal["grpo", "tempo", "dcpo"] = opt(
        "tempo", "grpo: TRL's GRPOTrainer as it is; tempo: TempoGRPOTrainer; dcpo: DCPOGRPOTrainer")
    model: str = opt("tiny", "'tiny' (embedded), a hub id or a save_pretrained folder")
    task: Literal["arith", "gsm8k"] = opt(
        "arith", "arith: embedded arithmetic; gsm8k: grade-school math (needs its JSONL files)")
    data_dir: Optional[str] = opt(None, "folder with GSM8K train.jsonl/test.jsonl")
    output_dir: str = opt("runs/trl", "TRL's output folder (checkpoints)")
    seed: int = opt(0, "random seed")
    train_size: Optional[int] = opt(None, "train on the first N problems only (small runs)")
    max_steps: int = opt(40, "optimizer steps")
    per_device_batch_size: int = opt(
        16, "completions per process per micro-step (TRL's per_device_train_batch_size)")
    gradient_accumulation_steps: int = opt(1, "micro-steps per optimizer step")
    num_generations: int = opt(8, "G, completions per prompt")
    num_iterations: int = opt(1, "mu, optimisation passes over each generation batch")
    max_completion_length: Optional[int] = opt(None, "max new tokens; default 48 arith, 512 gsm8k")
    learning_rate: Optional[float] = opt(None, "AdamW lr; default 5e-5 tiny model, 1e-6 others")
    temperature: float = opt(1.0, "sampling temperature (TRL's log-probs divide by it too)")
    beta: float = opt(0.0, "KL coefficient to the reference (0: no reference model)")
    logging_steps: int = opt(1, "log every N optimizer steps")
    save_steps: int = opt(0, "checkpoint every N steps (0: no checkpoints)")
    resume_from_checkpoint: Optional[str] = opt(None, "a checkpoint-N folder to continue from")
    td_coef: float = opt(1.0, "tempo: weight of the tree TD term (0 = GRPO)")
    eps_low: float = opt(0.16, "dcpo: dynamic clip bound, lower")
    eps_high: float = opt(0.20, "dcpo: dynamic clip bound, upper")
    dcpo_loss_type: Literal["otm", "grpo", "dapo", "otm_token_sum"] = opt(
        "otm", "dcpo: loss aggregation (otm: the paper's only-token-mean)")
    sas: bool = opt(True, "dcpo: smooth advantage standardisation over each prompt's history")
    use_vllm: bool = opt(False, "generate with vLLM (GPU and vllm needed; untested here)")
    vllm_mode: Literal["colocate", "server"] = opt(
        "colocate", "TRL's vllm_mode: colocate (same GPUs) or server (trl vllm-serve)")
    vllm_gpu_memory_utilization: float = opt(0.3, "colocate: share of GPU memory vLLM may take")


def load_trl():
    try:
        import trl_trainers
    except ImportError as e:
        common.fail(str(e))
    return trl_trainers


def build_trainer(args: Args, callbacks=(), reward_funcs=None):
    """The TRL trainer for `args`: config, in-memory dataset, model, verifier reward."""
    common.check_positive(max_steps=args.max_steps,
                          per_device_batch_size=args.per_device_batch_size,
                          gradient_accumulation_steps=args.gradient_accumulation_steps,
                          num_iterations=args.num_iterations, logging_steps=args.logging_steps,
                          train_size=args.train_size or 1)
    if args.num_generations < 2:
        raise UserError(f"--num-generations must be at least 2 (got {args.num_generations})")
    if args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).is_dir():
        raise UserError(f"--resume-from-checkpoint {args.resume_from_checkpoint} is not a folder; "
                        "pass a checkpoint-N folder of an earlier run")
    trl_trainers = load_trl()  # after the cheap checks: importing TRL takes seconds
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    use_cpu = not torch.cuda.is_available()
    max_len = args.max_completion_length or {"arith": 48, "gsm8k": 512}[args.task]
    lr = args.learning_rate or (5e-5 if args.model == common.TINY else 1e-6)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if use_cpu else torch.device("cuda", rank)
    dtype = common.resolve_dtype("auto", device)
    model, tokenizer = common.load_model_and_tokenizer(args.model, device, dtype)
    train = common.load_task(args.task, "train", args.data_dir)[: args.train_size]
    rows = [{"prompt": common.format_prompt(tokenizer, ex["question"], args.task),
             "answer": ex["answer"], "id": ex["id"]} for ex in train]

    def verifier(completions, answer, **kwargs):  # TRL passes the dataset's columns by name
        return common.reward_fn(completions, answer)

    try:
        config = GRPOConfig(
            output_dir=args.output_dir, seed=args.seed, max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_generations=args.num_generations, num_iterations=args.num_iterations,
            max_completion_length=max_len, temperature=args.temperature, top_p=1.0, top_k=0,
            beta=args.beta, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.logging_steps,
            report_to="none", save_strategy="steps" if args.save_steps else "no",
            save_steps=args.save_steps or 500, bf16=dtype == torch.bfloat16, fp16=False,
            use_cpu=use_cpu, dataloader_pin_memory=False, disable_tqdm=True,
            log_completions=False, use_vllm=args.use_vllm, vllm_mode=args.vllm_mode,
            vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
        kwargs = dict(model=model, reward_funcs=reward_funcs or [verifier], args=config,
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=list(callbacks))
        if args.method == "tempo":
            return trl_trainers.TempoGRPOTrainer(**kwargs, td_coef=args.td_coef)
        if args.method == "dcpo":
            return trl_trainers.DCPOGRPOTrainer(**kwargs, eps_low=args.eps_low,
                                                eps_high=args.eps_high, sas=args.sas,
                                                dcpo_loss_type=args.dcpo_loss_type)
        return GRPOTrainer(**kwargs)
    except (ValueError, ImportError) as e:  # TRL's and the plug-ins' checks of the settings
        raise UserError(str(e).strip().splitlines()[0]) from None


def main(args: Args):
    trainer = build_trainer(args)
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except ValueError as e:  # a checkpoint that is not DCPO's: one line, not a traceback
        if load_trl().SAS_STATE_FILE not in str(e):
            raise
        raise UserError(str(e)) from None
    if trainer.accelerator.is_main_process:
        logged = [h for h in trainer.state.log_history if "reward" in h]
        if logged:
            print(f"done: {trainer.state.global_step} steps, last logged reward "
                  f"{logged[-1]['reward']:.3f}")
    return trainer


if __name__ == "__main__":
    common.run_main(main, Args)
