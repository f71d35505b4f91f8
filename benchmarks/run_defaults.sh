#!/usr/bin/env bash
# The default runs as a new user makes them, one after the other, from an empty cache: each
# script with its defaults (the shipped tiny model, --eval-size 500), and for each run its wall
# time, the seconds until its first RL step starts (the start evaluation logged as step 0) and
# its summary line. This is the command behind the README's first-run figures.
#
#   bash benchmarks/run_defaults.sh [OUT_DIR]                 # grpo x 3 seeds, then the others
#   SCRIPTS=grpo SEEDS="0 1 2" bash benchmarks/run_defaults.sh runs/defaults_grpo
#
# Runs one at a time on purpose: two torch processes on 2 cores slow each other down. The CPU's
# bf16 flags are printed with the figures (none on most laptops and on CI's machines).
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/defaults}
scripts=${SCRIPTS:-grpo tempo dcpo spo token_dpo}
seeds=${SEEDS:-0 1 2}
export TOKENCREDIT_CACHE="$out/cache"   # empty: nothing may come from an earlier run
rm -rf "$out"; mkdir -p "$out"
{
  echo "run_defaults $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
       "bf16 flags: $(grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | xargs echo)"
  python -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
} | tee "$out/times.txt"
for s in $scripts; do
  run_seeds=$seeds
  [ "$s" != grpo ] && run_seeds=${seeds%% *}   # the other scripts: the first seed only
  for seed in $run_seeds; do
    start=$(date +%s.%N)
    python $s.py --seed "$seed" --output-dir "$out/$s-$seed" > "$out/$s-$seed.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    python - "$out/$s-$seed" "$start" "$end" "$s seed $seed exit=$rc" <<'EOF' | tee -a "$out/times.txt"
import json, sys
from pathlib import Path
folder, start, end, label = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
runs = list(folder.glob("*/metrics.jsonl"))
rows = [json.loads(line) for line in open(runs[0])] if runs else []
first = next((r["time"] for r in rows if r["step"] == 0), float("nan"))
summary = json.loads((runs[0].parent / "summary.json").read_text()) if runs else {}
print(f"{label} wall={end - start:.0f}s first_rl_step_after={first - start:.1f}s "
      f"accuracy {summary.get('start_accuracy', float('nan')):.3f} -> "
      f"{summary.get('final_accuracy', float('nan')):.3f}")
EOF
  done
done
python - "$out" <<'EOF' | tee -a "$out/times.txt"
import json, statistics, sys
from pathlib import Path
gains = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("grpo-*/*/summary.json"))]
gains = [100 * (s["final_accuracy"] - s["start_accuracy"]) for s in gains]
if len(gains) > 1:
    print(f"grpo gain over the shipped start: {statistics.mean(gains):+.1f} +- "
          f"{statistics.stdev(gains) / len(gains) ** 0.5:.1f} points (mean +- s.e., "
          f"{len(gains)} seeds: {', '.join(f'{g:+.1f}' for g in gains)})")
EOF
