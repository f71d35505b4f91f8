"""Compare the methods on the embedded task: every script with its defaults, several seeds.

    python benchmarks/compare.py                 # full: 13 methods x 3 seeds, 80 steps each
    python benchmarks/compare.py --quick         # 13 methods x 1 seed x 6 steps: a few minutes
    python benchmarks/compare.py --tables-only   # rebuild the tables and curves from finished runs

Each run is `python {script}.py --seed S --output-dir OUT/runs/{method}/seed{S}` plus the
method's own flags below, nothing else: the shared settings are the scripts' defaults
(docs/grpo.md, implementation details, item 1). Finished runs (those with a summary.json) are
not run again, so an interrupted benchmark continues where it stopped.

Everything is read back from the runs' own metrics.jsonl, and written to OUT:
    runs.csv    one row per run: final and best accuracy, steps to --target, time per step,
                the method's diagnostics (means over the run)
    table.md    one row per method: mean +- std over seeds of the same
    paired.md   one short row per method: final accuracy, and its difference from the method it
                changes (BASELINE: GRPO for the RL methods, DPO for the preference losses), seed by
                seed; the README's table
    curves.png  held-out greedy accuracy against step and against wall time (mean over seeds,
                shaded +- std; dashed: the preference losses); needs matplotlib, an optional dependency of this benchmark only

Jobs: 2 CPU cores run one job with 2 threads, or --jobs 2 with 1 thread each (more runs per
hour: a model this small does not use two threads well). Time per step depends on this choice,
so the table says which was used.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (script, extra flags). SPO-tree uses the paper's lighter 4,4,4 tree: the default 6,6,6
# costs about 20 s a step on 2 CPU cores, a 25-minute run per seed.
METHODS = {
    "grpo": ("grpo", []),
    "tempo": ("tempo", []),
    "dcpo": ("dcpo", []),
    "spo-chain": ("spo", ["--variant", "chain"]),
    "spo-tree": ("spo", ["--variant", "tree", "--tree-branching", "4,4,4"]),
    "dpo": ("token_dpo", ["--loss", "dpo"]),
    "tdpo1": ("token_dpo", ["--loss", "tdpo1"]),
    "tdpo2": ("token_dpo", ["--loss", "tdpo2"]),
    "tgdpo": ("token_dpo", ["--loss", "tgdpo"]),
    "cdpo": ("token_dpo", ["--loss", "cdpo"]),
    "tw-grpo": ("grpo", ["--token-weighting", "tw"]),   # GRPO's loss type, so only w differs
    "d3s": ("grpo", ["--d3s", "cross"]),
    "tabpo": ("token_dpo", ["--loss", "tabpo"]),
}
QUICK_FLAGS = ["--total-steps", "6", "--eval-every", "3", "--eval-size", "50"]

# What each method changes, for the paired differences (same seed = same prompts and sampling seed).
BASELINE = {"tempo": "grpo", "dcpo": "grpo", "spo-chain": "grpo", "spo-tree": "grpo", "tw-grpo": "grpo",
            "d3s": "grpo", "dpo": "grpo", "tdpo1": "dpo", "tdpo2": "dpo", "tgdpo": "dpo", "cdpo": "dpo",
            "tabpo": "dpo"}

# The diagnostics each method logs (their means over the run's steps go in the tables).
DIAGNOSTICS = {
    "grpo": ["clip_ratio/region_mean", "approx_kl_old"],
    "tempo": ["tempo/frac_tokens_td_nonzero", "tempo/branch_nodes_per_group_mean", "clip_ratio/region_mean",
              "approx_kl_old"],
    "dcpo": ["clip_ratio/dcpo", "rur", "approx_kl_old"],
    "spo-chain": ["spo/segments_per_response", "spo/mask_keep_frac", "spo/mc_time_share", "approx_kl_old"],
    "spo-tree": ["spo/tree_nodes", "spo/mask_keep_frac", "spo/mc_time_share", "approx_kl_old"],
    "dpo": ["rewards/accuracies", "rewards/margins", "kl/chosen"],
    "tdpo1": ["rewards/accuracies", "rewards/margins", "kl/chosen"],
    "tdpo2": ["rewards/accuracies", "rewards/margins", "kl/chosen"],
    "tgdpo": ["rewards/accuracies", "rewards/margins", "kl/chosen"],
    "cdpo": ["rewards/accuracies", "kl/chosen", "cdpo/weight_mean", "cdpo/sft_seconds"],
    "tw-grpo": ["tw/weight_mean", "tw/ended_weight_share", "approx_kl_old"],
    "d3s": ["d3s/kept_frac", "d3s/tokens_used_frac", "d3s/useful_frac", "approx_kl_old"],
    "tabpo": ["rewards/accuracies", "loss/barrier", "barrier/active_pct", "kl/chosen"],
}


# ----------------------------------------------------------------------------------------
# Reading runs back: pure functions on metrics.jsonl (tested on a fixture)
# ----------------------------------------------------------------------------------------

def read_run(run_dir: Path, method: str, seed: int, target: float, diagnostics=None) -> dict:
    """One run's record from its metrics.jsonl (one JSON object per step).

    curve: [(step, seconds since step 0, eval/accuracy)] for every evaluated step.
    steps_to_target: the first evaluated step with accuracy >= target (None if never).
    sec_per_step: mean of the logged step_time over training steps.
    diagnostics: the metric names to average over training steps (default DIAGNOSTICS[method]).
    """
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty")
    t0 = rows[0]["time"]
    curve = [(r["step"], r["time"] - t0, r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    if not curve or curve[0][0] != 0:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step-0 evaluation")
    train_rows = [r for r in rows if r["step"] > 0]
    step_times = [r["step_time"] for r in train_rows if "step_time" in r]
    reached = [s for s, _, a in curve if a >= target]
    record = {
        "method": method, "seed": seed, "steps": rows[-1]["step"],
        "start_acc": curve[0][2], "final_acc": curve[-1][2], "best_acc": max(a for _, _, a in curve),
        "steps_to_target": reached[0] if reached else None,
        "sec_per_step": statistics.mean(step_times) if step_times else float("nan"),
        "wall_s": curve[-1][1], "curve": curve,
    }
    for key in DIAGNOSTICS.get(method, []) if diagnostics is None else diagnostics:
        values = [r[key] for r in train_rows if isinstance(r.get(key), (int, float))]
        record[key] = statistics.mean(values) if values else float("nan")
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict]) -> list[dict]:
    """One row per method (in METHODS order): mean and std over its seeds."""
    rows = []
    order = [m for m in METHODS if any(r["method"] == m for r in records)]
    order += sorted({r["method"] for r in records} - set(order))
    for method in order:
        runs = [r for r in records if r["method"] == method]
        row = {"method": method, "seeds": len(runs)}
        for key in ("start_acc", "final_acc", "best_acc", "sec_per_step", "wall_s"):
            row[key] = _mean_std([r[key] for r in runs])
        row["gain"] = _mean_std([r["final_acc"] - r["start_acc"] for r in runs])
        reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        row["reached"] = len(reached)
        row["steps_to_target"] = _mean_std(reached) if reached else (float("nan"), float("nan"))
        row["diagnostics"] = {k: _mean_std([r[k] for r in runs])[0] for k in DIAGNOSTICS.get(method, [])}
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], target: float) -> str:
    """The README table: accuracies in points (%), mean +- std over seeds."""
    def pm(ms, scale=100.0, fmt="{:.1f}"):
        m, s = ms
        return "n/a" if math.isnan(m) else f"{fmt.format(m * scale)} ± {fmt.format(s * scale)}"

    head = (f"| method | seeds | start | final | gain | best | steps to {100 * target:.0f}% | s/step | run s | diagnostics (run means) |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        diag = ", ".join(f"{k}={v:.3g}" for k, v in r["diagnostics"].items() if not math.isnan(v))
        steps = "never" if r["reached"] == 0 else f"{pm(r['steps_to_target'], 1.0, '{:.0f}')} ({r['reached']}/{r['seeds']})"
        lines.append(f"| {r['method']} | {r['seeds']} | {pm(r['start_acc'])} | {pm(r['final_acc'])} | {pm(r['gain'])} | "
                     f"{pm(r['best_acc'])} | {steps} | {pm(r['sec_per_step'], 1.0, '{:.2f}')} | "
                     f"{pm(r['wall_s'], 1.0, '{:.0f}')} | {diag} |")
    return head + "\n".join(lines) + "\n"


def paired_table(records: list[dict]) -> str:
    """Final accuracy per method, and its difference from its BASELINE seed by seed, in points.

    | method | final | vs | by seed | mean |: "by seed" lists final(method) - final(baseline) for each
    seed both ran, in seed order; "mean" is their mean. E.g. grpo 0.46, 0.43 and tempo 0.48, 0.40
    (seeds 0, 1) give "+2.0, -3.0" and "-0.5".
    """
    final = {(r["method"], r["seed"]): r["final_acc"] for r in records}
    lines = ["| method | final | vs | by seed | mean |", "|---|---|---|---|---|"]
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    for method in methods + sorted({r["method"] for r in records} - set(methods)):
        m, s = _mean_std([r["final_acc"] for r in records if r["method"] == method])
        base = BASELINE.get(method)
        diffs = [100 * (final[(method, seed)] - final[(base, seed)])
                 for seed in sorted(seed for meth, seed in final if meth == method) if (base, seed) in final]
        paired = ("—", "—") if not diffs else (", ".join(f"{d:+.1f}" for d in diffs), f"{statistics.mean(diffs):+.1f}")
        lines.append(f"| {method} | {100 * m:.1f} ± {100 * s:.1f} | {base if diffs else '—'} | {paired[0]} | {paired[1]} |")
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict], path: Path) -> None:
    keys = ["method", "seed", "steps", "start_acc", "final_acc", "best_acc", "steps_to_target", "sec_per_step", "wall_s"]
    diag = sorted({k for r in records for k in DIAGNOSTICS.get(r["method"], [])})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + diag)
        for r in records:
            w.writerow([r.get(k, "") if r.get(k) is not None else "" for k in keys + diag])


def plot_curves(records: list[dict], path: Path) -> bool:
    """Accuracy vs step and vs wall time, mean over seeds with +- std. False if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no curves.png (pip install matplotlib); "
              "runs.csv and table.md are written", file=sys.stderr)
        return False
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: 13 methods, no colour twice
    for i, method in enumerate(dict.fromkeys(r["method"] for r in records)):
        style = dict(color=colors[2 * i % 20 + (2 * i // 20) % 2],  # the dark shades first
                     linestyle="--" if method == "dpo" or BASELINE.get(method) == "dpo" else "-")
        runs = [r for r in records if r["method"] == method]
        steps = sorted(set.intersection(*[{s for s, _, _ in r["curve"]} for r in runs]))
        by_step = [{s: (t, a) for s, t, a in r["curve"]} for r in runs]  # per run: step -> (seconds, accuracy)
        acc = [[b[s][1] for b in by_step] for s in steps]
        sec = [[b[s][0] for b in by_step] for s in steps]
        mean = [statistics.mean(a) for a in acc]
        std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
        t = [statistics.mean(x) for x in sec]
        ax_step.plot(steps, mean, marker="o", ms=3, label=method, **style)
        ax_step.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color=style["color"], alpha=0.08)
        ax_time.plot(t, mean, marker="o", ms=3, label=method, **style)
    ax_step.set(xlabel="training step", ylabel="held-out greedy accuracy", title="accuracy vs step")
    ax_time.set(xlabel="wall time since step 0 (s)", ylabel="held-out greedy accuracy", title="accuracy vs wall time")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def finished(run_dir: Path) -> bool:
    """A run that ended: its summary.json exists and does not say "status": "interrupted"."""
    path = run_dir / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("status") != "interrupted"


def build_outputs(out: Path, target: float) -> list[dict]:
    """Read every finished run under out/runs and write runs.csv, table.md and curves.png."""
    records = []
    for method_dir in sorted((out / "runs").glob("*")):
        for seed_dir in sorted(method_dir.glob("seed*")):
            run_dirs = [d for d in seed_dir.iterdir() if finished(d)]
            if run_dirs:
                records.append(read_run(max(run_dirs), method_dir.name, int(seed_dir.name[4:]), target))
    if not records:
        raise SystemExit(f"error: no finished runs under {out / 'runs'}; run the benchmark first")
    write_csv(records, out / "runs.csv")
    rows = aggregate(records)
    (out / "table.md").write_text(markdown_table(rows, target))
    (out / "paired.md").write_text(paired_table(records))
    plot_curves(records, out / "curves.png")
    return rows


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------

def plan_runs(out: Path, methods: list[str], seeds: list[int], extra: list[str]) -> list[tuple]:
    """The runs still to do: (method, seed, seed_dir, command); finished ones are skipped.

    Each run is `python {script}.py --seed S --output-dir out/runs/{method}/seed{S}` plus the
    method's flags (METHODS) and `extra`.
    """
    todo = []
    for seed in seeds:
        for method in methods:
            seed_dir = out / "runs" / method / f"seed{seed}"
            if seed_dir.exists() and any(finished(d) for d in seed_dir.iterdir()):
                continue  # finished earlier
            script, flags = METHODS[method]
            cmd = [sys.executable, str(ROOT / f"{script}.py"), "--seed", str(seed),
                   "--output-dir", str(seed_dir), *flags, *extra]
            todo.append((method, seed, seed_dir, cmd))
    return todo


def launch(todo: list[tuple], jobs: int, logs: Path, label: str = "") -> None:
    """Run plan_runs' commands `jobs` at a time, CPU cores / jobs threads each, a log per run."""
    threads = max(1, (os.cpu_count() or 2) // jobs)
    print(f"{len(todo)} runs to do, {jobs} at a time, {threads} thread(s) each; logs in {logs}",
          flush=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    todo, running = list(todo), []
    t_start = time.time()
    while todo or running:
        while todo and len(running) < jobs:
            method, seed, seed_dir, cmd = todo.pop(0)
            shutil.rmtree(seed_dir, ignore_errors=True)  # an unfinished run is started again
            log = open(logs / f"{method}-seed{seed}.log", "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((method, seed, proc, time.time(), log))
        time.sleep(1.0)
        for job in list(running):
            method, seed, proc, t0, log = job
            if proc.poll() is not None:
                running.remove(job)
                log.close()
                code = proc.returncode
                status = "ok" if code == 0 else f"FAILED (exit {code}, see logs)"
                print(f"[{time.time() - t_start:6.0f}s] {label}{method} seed {seed}: {status} in "
                      f"{time.time() - t0:.0f}s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 6 steps, 50 held-out problems: a smoke run of the whole benchmark")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time; threads per run = CPU cores / jobs")
    p.add_argument("--target", type=float, default=0.5, help="accuracy for the 'steps to target' column")
    p.add_argument("--out", default=None, help="output folder (default runs/compare, or runs/compare-quick)")
    p.add_argument("--tables-only", action="store_true", help="do not run anything; rebuild the tables from finished runs")
    args = p.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out or ("runs/compare-quick" if args.quick else "runs/compare"))
    out.mkdir(parents=True, exist_ok=True)

    if not args.tables_only:
        sys.path.insert(0, str(ROOT))
        import common
        common.ensure_tiny_model(seed=0)  # once, before any job: jobs must not build it side by side
        threads = max(1, (os.cpu_count() or 2) // args.jobs)
        todo = plan_runs(out, args.methods, seeds, QUICK_FLAGS if args.quick else [])
        t_start = time.time()
        launch(todo, args.jobs, out / "logs")
        (out / "benchmark.json").write_text(json.dumps(dict(
            command=" ".join(["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])]),
            jobs=args.jobs, threads_per_job=threads, seeds=seeds, quick=args.quick, date=time.strftime("%Y-%m-%d"),
            commit=_git_commit(), wall_s=round(time.time() - t_start)), indent=2))
    build_outputs(out, args.target)
    print((out / "table.md").read_text())
    print((out / "paired.md").read_text())
    print(f"wrote {out}/runs.csv, {out}/table.md, {out}/paired.md" + (f", {out}/curves.png" if (out / "curves.png").exists() else ""))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
