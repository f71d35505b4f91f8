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
per prompt. --use-vllm only passes TRL's vLLM options on (with --vllm-mode server, also
--vllm-server-host and --vllm-server-port): it needs a GPU and vllm, and this repo's tests do
not run it (docs/integrations.md says what to check). The weights and AdamW's state are fp32;
--dtype names the compute dtype (TRL's bf16 autocast).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integrations"))
import common  # noqa: E402
from common import UserError  # noqa: E402


def opt(default, rng, help_text):
    """A field with its range (common.check_args checks it before anything loads) and help."""
    return field(default=default, metadata={"range": rng, "help": help_text})


@dataclass
class Args:
    """GRPO, TEMPO or DCPO on TRL's GRPOTrainer, with this repo's tasks and verifier."""
    method: Literal["grpo", "tempo", "dcpo"] = opt(
        "tempo", None,
        "grpo: TRL's GRPOTrainer as it is; tempo: TempoGRPOTrainer; dcpo: DCPOGRPOTrainer")
    model: str = opt("tiny", "model", "'tiny' (embedded), a hub id or a save_pretrained folder")
    task: Literal["arith", "gsm8k"] = opt(
        "arith", None,
        "arith: embedded arithmetic; gsm8k: grade-school math (needs its JSONL files)")
    data_dir: Optional[str] = opt(None, "data_dir", "folder with GSM8K train.jsonl/test.jsonl")
    output_dir: str = opt("runs/trl", "output_dir", "TRL's output folder (checkpoints)")
    seed: int = opt(0, "[0, SEED_MAX]", "random seed")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "dtype", "compute dtype (TRL's bf16 autocast); the weights and Adam stay float32. "
        "auto = bfloat16 on a GPU that has it, else float32. float16 is refused: TRL would need "
        "a loss scaler")
    train_size: Optional[int] = opt(None, ">0", "train on the first N problems only (small runs)")
    max_steps: int = opt(40, ">0", "optimizer steps")
    per_device_batch_size: int = opt(
        16, ">0", "completions per process per micro-step (TRL's per_device_train_batch_size)")
    gradient_accumulation_steps: int = opt(1, ">0", "micro-steps per optimizer step")
    num_generations: int = opt(8, ">=2", "G, completions per prompt")
    num_iterations: int = opt(1, ">0", "mu, optimisation passes over each generation batch")
    max_completion_length: Optional[int] = opt(
        None, ">0", "max new tokens; default 48 arith, 512 gsm8k")
    learning_rate: Optional[float] = opt(
        None, ">0", "AdamW lr; default 5e-5 tiny model, 1e-6 others")
    temperature: float = opt(1.0, ">0", "sampling temperature (TRL's log-probs divide by it too)")
    beta: float = opt(0.0, ">=0", "KL coefficient to the reference (0: no reference model)")
    logging_steps: int = opt(1, ">0", "log every N optimizer steps")
    save_steps: int = opt(0, ">=0", "checkpoint every N steps (0: no checkpoints)")
    resume_from_checkpoint: Optional[str] = opt(
        None, "any", "a checkpoint-N folder to continue from")
    td_coef: float = opt(1.0, ">=0", "tempo: weight of the tree TD term (0 = GRPO)")
    eps_low: float = opt(0.16, ">0", "dcpo: dynamic clip bound, lower")
    eps_high: float = opt(0.20, ">0", "dcpo: dynamic clip bound, upper")
    dcpo_loss_type: Literal["otm", "grpo", "dapo", "otm_token_sum"] = opt(
        "otm", None, "dcpo: loss aggregation (otm: the paper's only-token-mean)")
    sas: bool = opt(True, None, "dcpo: smooth advantage standardisation over each prompt's history")
    use_vllm: bool = opt(False, None, "generate with vLLM (GPU and vllm needed; untested here)")
    vllm_mode: Literal["colocate", "server"] = opt(
        "colocate", None, "TRL's vllm_mode: colocate (same GPUs) or server (trl vllm-serve)")
    vllm_server_host: str = opt("0.0.0.0", "any", "server mode: host of `trl vllm-serve`")
    vllm_server_port: int = opt(8000, "[1, 65535]", "server mode: port of `trl vllm-serve`")
    vllm_gpu_memory_utilization: float = opt(
        0.3, "(0, 1]", "colocate: share of GPU memory vLLM may take")


def load_trl():
    try:
        import trl_trainers
    except ImportError as e:
        common.fail(str(e))
    return trl_trainers


def check(args: Args) -> None:
    """Everything that can be checked without TRL or a model: ranges, folders, the data."""
    common.check_args(args, "train_trl")
    common.check_data_dir(args.data_dir, args.task)
    if args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).is_dir():
        raise UserError(f"--resume-from-checkpoint {args.resume_from_checkpoint} is not a folder; "
                        "pass a checkpoint-N folder of an earlier run")
    if args.method == "dcpo" and args.save_steps % args.num_iterations:
        # a generation every num_iterations optimizer steps (steps_per_generation = accumulation)
        raise UserError(f"--save-steps {args.save_steps} must be a multiple of --num-iterations "
                        f"{args.num_iterations}: TRL does not save its generation buffer, so a "
                        "DCPO checkpoint between two generations cannot resume exactly")


def build_trainer(args: Args, callbacks=(), reward_funcs=None):
    """The TRL trainer for `args`. Order: the cheap checks, TRL's config, the data, and only
    then the model, which TRL loads itself from its id, in float32, after its config exists
    (so DeepSpeed ZeRO-3's zero.Init and FSDP's RAM-efficient loading apply)."""
    check(args)
    trl_trainers = load_trl()  # after the cheap checks: importing TRL takes seconds
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    use_cpu = not torch.cuda.is_available()
    max_len = args.max_completion_length or {"arith": 48, "gsm8k": 512}[args.task]
    lr = args.learning_rate or (5e-5 if args.model == common.TINY else 1e-6)
    device = torch.device("cpu") if use_cpu else torch.device("cuda")
    compute = common.resolve_dtype(args.dtype, device)
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
            save_steps=args.save_steps or 500, use_cpu=use_cpu, dataloader_pin_memory=False,
            disable_tqdm=True, log_completions=False,
            # fp32 master weights (TRL's default for a model id), bf16 compute under autocast:
            # bf16 weights would round away AdamW's 1e-6 steps (issue 22)
            model_init_kwargs={"dtype": torch.float32}, bf16=compute == torch.bfloat16,
            fp16=False, disable_dropout=True,  # as the scripts: ratio == 1 on the first pass
            use_vllm=args.use_vllm, vllm_mode=args.vllm_mode,
            vllm_server_host=args.vllm_server_host, vllm_server_port=args.vllm_server_port,
            vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
    except (ValueError, ImportError) as e:  # TRL's checks of the settings, before any model
        raise UserError(str(e).strip().splitlines()[0]) from None
    model_id = str(common.ensure_tiny_model(seed=0)) if args.model == common.TINY else args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, padding_side="left")
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer of {args.model!r} "
                        f"({str(e).strip().splitlines()[0][:200]}); pass --model with a local "
                        "save_pretrained folder or a reachable hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = common.load_task(args.task, "train", args.data_dir)[: args.train_size]
    rows = [{"prompt": common.format_prompt(tokenizer, ex["question"], args.task),
             "answer": ex["answer"], "id": ex["id"]} for ex in train]

    def verifier(completions, answer, **kwargs):  # TRL passes the dataset's columns by name
        return common.reward_fn(completions, answer)

    kwargs = dict(model=model_id, reward_funcs=reward_funcs or [verifier], args=config,
                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                  callbacks=list(callbacks))
    try:
        if args.method == "tempo":
            return trl_trainers.TempoGRPOTrainer(**kwargs, td_coef=args.td_coef)
        if args.method == "dcpo":
            return trl_trainers.DCPOGRPOTrainer(**kwargs, eps_low=args.eps_low,
                                                eps_high=args.eps_high, sas=args.sas,
                                                dcpo_loss_type=args.dcpo_loss_type)
        return GRPOTrainer(**kwargs)
    except (ValueError, ImportError, OSError) as e:  # the plug-ins' checks; a model TRL can't load
        raise UserError(str(e).strip().splitlines()[0]) from None


def main(args: Args):
    trainer = build_trainer(args)
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except load_trl().ResumeError as e:  # not DCPO's, or off a generation boundary: one line
        raise UserError(str(e)) from None
    if trainer.accelerator.is_main_process:
        logged = [h for h in trainer.state.log_history if "reward" in h]
        if logged:
            print(f"done: {common.plural(trainer.state.global_step, 'step')}, last logged reward "
                  f"{logged[-1]['reward']:.3f}")
    return trainer


if __name__ == "__main__":
    common.run_main(main, Args)
