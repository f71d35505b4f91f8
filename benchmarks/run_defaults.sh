#!/usr/bin/env bash
# Run every script with its defaults, one after the other, from a fresh warm start, and print
# each run's summary line and wall time. This is the command behind the README's results table.
#   bash benchmarks/run_defaults.sh [OUT_DIR]      (about 20 minutes on 2 CPU cores)
# Runs one at a time on purpose: two torch processes on 2 cores slow each other down many times.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/defaults}
export TOKENCREDIT_CACHE="$out/cache"   # a fresh cache, so the first run includes the warm start
rm -rf "$out"; mkdir -p "$out"
for s in grpo tempo dcpo spo token_dpo; do
  start=$(date +%s)
  python $s.py --output-dir "$out/$s" > "$out/$s.log" 2>&1
  echo "$s exit=$? wall=$(( $(date +%s) - start ))s" | tee -a "$out/times.txt"
  grep -h "^warm start:" "$out/$s.log" | tee -a "$out/times.txt"
  tail -n 1 "$out/$s.log" | tee -a "$out/times.txt"
done
# SPO-tree is slow on a CPU (tens of seconds a step): 5 steps, for its per-step figures only.
start=$(date +%s)
python spo.py --variant tree --total-steps 5 --eval-every 5 --output-dir "$out/spo_tree" > "$out/spo_tree.log" 2>&1
echo "spo --variant tree (5 steps) exit=$? wall=$(( $(date +%s) - start ))s" | tee -a "$out/times.txt"
tail -n 1 "$out/spo_tree.log" | tee -a "$out/times.txt"
