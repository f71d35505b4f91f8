#!/usr/bin/env bash
# The GPU check, prepared for a lent GPU machine: one script; each item has a time limit, 8 minutes
# in all at worst (the device allows 10 a command, and 15 a task with its start-up).
#
#   bash benchmarks/perf/gpu_check.sh       # on the GPU machine (bash benchmarks/gpu_check.sh too)
#   DEVICE=cpu MODEL=tiny TASK=arith STEPS=2 LEN=16 bash benchmarks/perf/gpu_check.sh  # plumbing, CPU
#
# 1. every script for a few steps with SmolLM2-135M-Instruct (converted from ../shared/models)
#    on GSM8K, --dtype bfloat16: exit code, step time (metrics.jsonl), the GPU memory in use
#    (nvidia-smi, every 0.5 s); then benchmarks/perf/weights_move.py: the share of weights that move
#    and their mean |dw| in bf16 compute against fp32, step time and peak memory;
# 2. benchmarks/perf/bench_overhead.py with --model qwen2.5-0.5b-random
#    (throughput; peak memory), and bench_trl.py when trl is installed;
# 3. benchmarks/perf/bench_decode.py: decode tokens/s against the GPU's memory-bandwidth bound.
# Everything is written under $OUT (default runs/gpu_check); summary.txt holds the figures.
# Each item has its own time limit, so one that hangs cannot eat the others' time.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-}
TASK=${TASK:-gsm8k}
STEPS=${STEPS:-3}
LEN=${LEN:-256}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
SHARED=""
for d in ../shared shared; do [ -d "$d/data" ] && SHARED=$d && break; done
{
  echo "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__)"
  echo "shared: ${SHARED:-not found}"
} | tee "$SUMMARY"

item() {  # item NAME SECONDS COMMAND...: run with a time limit, log it, note the exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS poll=""
  if command -v nvidia-smi > /dev/null; then  # the GPU's memory in use, every 0.5 s
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
      > "$OUT/$name.mem" 2>/dev/null &
    poll=$!
  fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? mem="n/a"
  if [ -n "$poll" ]; then
    kill "$poll" 2>/dev/null
    mem="$(sort -n "$OUT/$name.mem" | tail -1) MiB"
  fi
  echo "$name: rc=$rc, $((SECONDS - t0)) s, most GPU memory in use $mem" | tee -a "$SUMMARY"
  return $rc
}

# ---- 1. the scripts on a real model -------------------------------------------------------
if [ -z "$MODEL" ]; then
  MODEL=/tmp/smollm2
  if [ ! -f "$MODEL/config.json" ]; then
    item convert 50 python "$SHARED/tools/smollm2_to_hf.py" "$MODEL" --dtype bfloat16 \
      || echo "convert failed (needs ../shared and: pip install gguf accelerate)" | tee -a "$SUMMARY"
  fi
fi
DATA=()
[ "$TASK" = gsm8k ] && DATA=(--data-dir "${SHARED:-../shared}/data/gsm8k")
DTYPE=bfloat16
[ "$DEVICE" = cpu ] && DTYPE=float32
COMMON=(--model "$MODEL" --task "$TASK" "${DATA[@]}" --device "$DEVICE" --dtype "$DTYPE"
        --total-steps "$STEPS" --eval-every "$STEPS" --eval-size 32
        --max-completion-length "$LEN" --output-dir "$OUT/runs")
item grpo 40 python grpo.py --prompts-per-step 4 "${COMMON[@]}"
item tempo 40 python tempo.py --prompts-per-step 4 "${COMMON[@]}"
item dcpo 40 python dcpo.py --prompts-per-step 4 "${COMMON[@]}"
item spo-chain 40 python spo.py --variant chain --prompts-per-step 4 "${COMMON[@]}"
item tdpo2 40 python token_dpo.py --loss tdpo2 --pairs-per-step 4 --prompts-per-round 8 "${COMMON[@]}"
python - "$OUT/runs" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*")):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if line.strip()]
    steps = [r for r in rows if "step_time" in r]
    times = sorted(r["step_time"] for r in steps)
    summary = run / "summary.json"
    status = json.loads(summary.read_text()).get("status") if summary.exists() else "no summary"
    median = times[len(times) // 2] if times else float("nan")
    print(f"{run.name}: {len(steps)} steps, median step {median:.2f} s, {status}")
EOF

# ---- 1b. the weights really move: grpo.py in bf16 compute against fp32, from one start ----
WM=(--model "$MODEL" --task "$TASK" "${DATA[@]}" --device "$DEVICE" --steps 3
    --max-completion-length "$LEN")
item weights_move 80 python benchmarks/perf/weights_move.py "${WM[@]}"
grep -h "^weights_move" "$OUT/weights_move.log" | tee -a "$SUMMARY"

# ---- 2. throughput and peak memory with a Qwen2.5-0.5B-shaped random model ----------------
Q=(--device "$DEVICE" --model qwen2.5-0.5b-random --prompts 16 --num-generations 8
   --completion-length "$LEN" --repeats 3)
[ "$DEVICE" = cpu ] && Q=(--device cpu --model tiny-random --quick)
item bench_overhead 50 python benchmarks/perf/bench_overhead.py "${Q[@]}" --betas 0 \
  --out "$OUT/bench_overhead"
if python -c "import trl" 2>/dev/null; then
  item bench_trl 50 python benchmarks/perf/bench_trl.py "${Q[@]}" --betas 0 --out "$OUT/bench_trl"
else
  echo "bench_trl: skipped, trl not installed" | tee -a "$SUMMARY"
fi

# ---- 3. decode against the memory-bandwidth bound ------------------------------------------
item bench_decode 50 python benchmarks/perf/bench_decode.py "${Q[@]}" --out "$OUT/bench_decode"
grep -h "^- decode\|^- bound\|^- weights\|^- batch" "$OUT/bench_decode/report.md" 2>/dev/null \
  | tee -a "$SUMMARY"
for r in bench_overhead bench_trl; do
  [ -f "$OUT/$r/report.md" ] && { echo "== $r"; grep "|" "$OUT/$r/report.md"; } >> "$SUMMARY"
done
echo "done $(date -u +%FT%TZ); figures in $SUMMARY"
