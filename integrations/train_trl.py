"""Train with TRL on this repo's tasks and verifier: GRPO, TEMPO or DCPO (integrations/trl_trainers.py).

    pip install -r integrations/requirements.txt                  # TRL 1.16 and accelerate
    python integrations/train_trl.py --method tempo --model tiny --task arith        # CPU, a few minutes
    accelerate launch --num_processes 2 --cpu integrations/train_trl.py --method tempo  # 2 CPU processes (gloo)
    accelerate launch --num_processes 8 integrations/train_trl.py --method dcpo \\
        --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --max-completion-length 512   # 8 GPUs (DDP)
    python integrations/train_trl.py --method tempo --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k \\
        --use-vllm --vllm-mode colocate                                 # one GPU, vLLM generates

The dataset is built in memory from common.load_task (never from the hub); the reward is
common.reward_fn, the verifier every script uses. Batch sizes are TRL's: each optimizer step sees
per_device_batch_size x gradient_accumulation_steps x processes completions, num_generations per
prompt. --use-vllm only passes TRL's vLLM options through: it needs a GPU and vllm, and is not
tested in this repo's CI (docs/integrations.md lists what to check).
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


@dataclass
class Args:
    """GRPO, TEMPO or DCPO on TRL's GRPOTrainer, with this repo's tasks and verifier."""
    method: Literal["grpo", "tempo", "dcpo"] = field(default="tempo", metadata={"help": "grpo: TRL's GRPOTrainer as it is; tempo: TempoGRPOTrainer; dcpo: DCPOGRPOTrainer"})
    model: str = field(default="tiny", metadata={"help": "'tiny' (embedded, warm-started on first use), a hub id or a save_pretrained folder"})
    task: Literal["arith", "gsm8k"] = field(default="arith", metadata={"help": "arith: embedded arithmetic; gsm8k: grade-school math (needs --data-dir or ../shared/data/gsm8k)"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "folder with GSM8K train.jsonl/test.jsonl"})
    output_dir: str = field(default="runs/trl", metadata={"help": "TRL's output folder (checkpoints, logs)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    train_size: Optional[int] = field(default=None, metadata={"help": "train on the first N problems only (small runs that revisit prompts)"})
    max_steps: int = field(default=40, metadata={"help": "optimizer steps"})
    per_device_batch_size: int = field(default=16, metadata={"help": "completions per process per micro-step (TRL's per_device_train_batch_size)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    num_generations: int = field(default=8, metadata={"help": "G, completions per prompt"})
    num_iterations: int = field(default=1, metadata={"help": "mu, optimisation passes over each generation batch"})
    max_completion_length: Optional[int] = field(default=None, metadata={"help": "max new tokens; default 48 for arith, 512 for gsm8k"})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "AdamW lr; default 5e-5 for the tiny model, 1e-6 otherwise"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (TRL divides the logits by it for the log-probs too)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the reference (0: no reference model)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N optimizer steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: no checkpoints)"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "a checkpoint-N folder of an earlier run to continue"})
    td_coef: float = field(default=1.0, metadata={"help": "tempo: weight of the tree TD term (0 = GRPO)"})
    eps_low: float = field(default=0.16, metadata={"help": "dcpo: dynamic clip bound, lower"})
    eps_high: float = field(default=0.20, metadata={"help": "dcpo: dynamic clip bound, upper"})
    dcpo_loss_type: Literal["otm", "grpo", "dapo", "otm_token_sum"] = field(default="otm", metadata={"help": "dcpo: loss aggregation (otm: the paper's only-token-mean)"})
    sas: bool = field(default=True, metadata={"help": "dcpo: smooth advantage standardisation over each prompt's history"})
    use_vllm: bool = field(default=False, metadata={"help": "generate with vLLM (GPU only, untested here); see --vllm-mode"})
    vllm_mode: Literal["colocate", "server"] = field(default="colocate", metadata={"help": "TRL's vllm_mode: colocate (same GPUs) or server (trl vllm-serve)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "colocate: share of GPU memory vLLM may take"})


def load_trl():
    try:
        import trl_trainers
    except ImportError as e:
        common.fail(str(e))
    return trl_trainers


def build_trainer(args: Args, callbacks=(), reward_funcs=None):
    """The TRL trainer for `args`: config, in-memory dataset, model, verifier reward."""
    common.check_positive(max_steps=args.max_steps, per_device_batch_size=args.per_device_batch_size,
                          gradient_accumulation_steps=args.gradient_accumulation_steps,
                          num_iterations=args.num_iterations, logging_steps=args.logging_steps,
                          train_size=args.train_size or 1)
    if args.num_generations < 2:
        raise UserError(f"--num-generations must be at least 2 (got {args.num_generations})")
    if args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).is_dir():
        raise UserError(f"--resume-from-checkpoint {args.resume_from_checkpoint} is not a folder; pass a "
                        "checkpoint-N folder of an earlier run")
    trl_trainers = load_trl()  # after the cheap checks: importing TRL takes seconds
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    use_cpu = not torch.cuda.is_available()
    max_len = args.max_completion_length or {"arith": 48, "gsm8k": 512}[args.task]
    lr = args.learning_rate or (5e-5 if args.model == common.TINY else 1e-6)
    device = torch.device("cpu") if use_cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = common.resolve_dtype("auto", device)
    model, tokenizer = common.load_model_and_tokenizer(args.model, device, dtype)
    train = common.load_task(args.task, "train", args.data_dir)[: args.train_size]
    rows = [{"prompt": common.format_prompt(tokenizer, ex["question"], args.task), "answer": ex["answer"],
             "id": ex["id"]} for ex in train]

    def verifier(completions, answer, **kwargs):  # TRL passes the dataset's columns by name
        return common.reward_fn(completions, answer)

    try:
        config = GRPOConfig(
            output_dir=args.output_dir, seed=args.seed, max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, num_generations=args.num_generations,
            num_iterations=args.num_iterations, max_completion_length=max_len, temperature=args.temperature,
            top_p=1.0, top_k=0, beta=args.beta, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.logging_steps, report_to="none",
            save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
            bf16=dtype == torch.bfloat16, fp16=False, use_cpu=use_cpu, dataloader_pin_memory=False,
            disable_tqdm=True, log_completions=False, use_vllm=args.use_vllm, vllm_mode=args.vllm_mode,
            vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
        common_kwargs = dict(model=model, reward_funcs=reward_funcs or [verifier], args=config,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=list(callbacks))
        if args.method == "tempo":
            return trl_trainers.TempoGRPOTrainer(**common_kwargs, td_coef=args.td_coef)
        if args.method == "dcpo":
            return trl_trainers.DCPOGRPOTrainer(**common_kwargs, eps_low=args.eps_low, eps_high=args.eps_high,
                                                dcpo_loss_type=args.dcpo_loss_type, sas=args.sas)
        return GRPOTrainer(**common_kwargs)
    except (ValueError, ImportError) as e:  # TRL's and the plug-ins' checks of the settings
        raise UserError(str(e).strip().splitlines()[0]) from None


def main(args: Args):
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        last = [h for h in trainer.state.log_history if "reward" in h]
        if last:
            print(f"done: {trainer.state.global_step} steps, last logged reward {last[-1]['reward']:.3f}")
    return trainer


if __name__ == "__main__":
    common.run_main(main, Args)
