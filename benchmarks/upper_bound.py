"""The upper bound: would (nearly) true per-token credit learn faster than GRPO here?

    python benchmarks/upper_bound.py --lengths 2-4 --seeds 0 --budget-min 150   # one part
    python benchmarks/upper_bound.py --tables-only                              # the tables
    python benchmarks/upper_bound.py --quick                                    # a smoke run

The oracle is spo.py's chain at its dense limit, with flags that already exist:

    python spo.py --variant chain --cutpoint-interval 1 --num-rollouts 48

a cutpoint at every token below rho (0.9), so each such token is its own segment, valued by 48
Monte Carlo continuations: enough for a split-half reliability of 0.9 on exactly those tokens
(benchmarks/credit_truth.py measures the count on the 2-4 warm start: 47). It is compared with
grpo, tempo and spo-chain at their defaults (compare.py's flags), at --arith-ops 2-4 and 6-8,
seeds 0 to 4, every run `--total-steps 60 --eval-every 20`, evaluated on all 500 held-out
problems (the scripts' default --eval-size). Those are the study's settings (study.py), so the
study's runs ARE this benchmark's runs for grpo, tempo and spo-chain: both write to
OUT/ops{LO}-{HI}/runs/{method}/seed{S}/, and the default OUT is the study's, runs/study.

Parts. On one core of a 2-core Xeon, an oracle run at 2-4 took 51 minutes (60 steps with
evaluations) with the Monte Carlo of commit a15dce2, and 33 minutes with 7043bfd's (KV cache
grown in place); a 6-8 run took 57 to 59 minutes with 7043bfd's (docs/study.md). A part is
whatever fits: --budget-min M starts runs (--jobs at a time) until M minutes have passed, then
sends SIGINT to those still running.
A script that gets SIGINT finishes its step, checkpoints and exits (common.Run), and the next
part continues it with `--resume RUN_DIR`; the oracle also checkpoints every 5 steps, so even a
killed part loses at most 5 steps. A finished run is never run again. Each part appends one
line to OUT/upper_bound_parts.jsonl: its command, commit (at its start), CPU, start, minutes,
and each run's outcome with the commit it started at.

Outputs (from finished runs only), in OUT:
    upper_bound.md    per (setting, method): seeds, final accuracy, gain, gain minus GRPO's
                      (paired by seed), seconds per step, and the runs still unfinished; the
                      accuracy at every evaluation (the curves in numbers); what the steps
                      looked like (STEP_DIAGNOSTICS)
    upper_bound.csv   one row per finished run
    upper_bound.png   accuracy against step and against training seconds (the sum of the logged
                      step times: a run resumed in another session has a gap in wall time, not
                      in step time), mean over seeds; needs matplotlib
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402
import study  # noqa: E402

ORACLE_FLAGS = ["--variant", "chain", "--cutpoint-interval", "1", "--num-rollouts", "48"]
METHODS = {"grpo": compare.METHODS["grpo"], "tempo": compare.METHODS["tempo"],
           "spo-chain": compare.METHODS["spo-chain"], "oracle": ("spo", ORACLE_FLAGS)}
RUN_FLAGS = {"oracle": ["--save-every", "5"]}  # run management only: training is unchanged
LENGTHS = ["2-4", "6-8"]
SEEDS = [0, 1, 2, 3, 4]
QUICK_FLAGS = ["--total-steps", "2", "--eval-every", "2", "--eval-size", "20"]
# What the steps looked like, each averaged over a run's training steps, then over seeds: the
# sampled reward, the share of groups whose G rewards are all equal (no signal for GRPO), the
# gradient norm before clipping, how far a step moved the policy, its entropy, and the share of
# tokens in SPO's loss (tokens with p < rho; the others get no gradient)
STEP_DIAGNOSTICS = ["reward", "frac_reward_zero_std", "grad_norm", "approx_kl_old", "entropy",
                    "spo/mask_keep_frac"]


# ----------------------------------------------------------------------------------------
# Planning and running parts (tested with stand-in commands)
# ----------------------------------------------------------------------------------------


def resumable(seed_dir: Path) -> Path | None:
    """The newest run folder under seed_dir that has a checkpoint and has not finished."""
    import common

    runs = sorted(d for d in seed_dir.glob("*") if d.is_dir()) if seed_dir.exists() else []
    for d in reversed(runs):
        if not compare.finished(d) and common.latest_checkpoint(d) is not None:
            return d
    return None


def plan(out: Path, lengths: list[str], methods: list[str], seeds: list[int],
         steps_flags: list[str]) -> list[dict]:
    """The runs still to do, seed by seed (a part's finished seeds are whole): each a dict with
    setting, method, seed, seed_dir, cmd, and resume (the run folder it continues, or None)."""
    todo = []
    for seed in seeds:
        for setting in lengths:
            for method in methods:
                seed_dir = out / f"ops{setting}" / "runs" / method / f"seed{seed}"
                if seed_dir.exists() and any(compare.finished(d) for d in seed_dir.iterdir()):
                    continue
                script, flags = METHODS[method]
                run = resumable(seed_dir)
                if run is not None:
                    cmd = [sys.executable, str(ROOT / f"{script}.py"), "--resume", str(run)]
                else:
                    cmd = [sys.executable, str(ROOT / f"{script}.py"), "--seed", str(seed),
                           "--output-dir", str(seed_dir), *flags, "--arith-ops", setting,
                           *steps_flags, *RUN_FLAGS.get(method, [])]
                todo.append(dict(setting=setting, method=method, seed=seed, seed_dir=seed_dir,
                                 cmd=cmd, resume=run))
    return todo


def run_part(todo: list[dict], jobs: int, logs: Path, budget_s: float | None) -> list[dict]:
    """Run `todo`, `jobs` at a time, until the budget: then SIGINT to the running ones (they
    checkpoint and exit) and no new starts. Returns one outcome per run started."""
    jobs = max(1, min(jobs, len(todo)))   # one run left: it gets every core, not 1/jobs of them
    threads = max(1, (os.cpu_count() or 2) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    logs.mkdir(parents=True, exist_ok=True)
    todo, running, outcomes, t_start, stopping = list(todo), [], [], time.time(), False
    print(f"{len(todo)} runs to do, {jobs} at a time, {threads} thread(s) each"
          + (f", for at most {budget_s / 60:.0f} min" if budget_s else "") + f"; logs in {logs}",
          flush=True)
    while (todo and not stopping) or running:
        while todo and not stopping and len(running) < jobs:
            job = todo.pop(0)
            if job["resume"] is None and job["seed_dir"].exists():
                for d in job["seed_dir"].iterdir():  # a run that never checkpointed: start again
                    if d.is_dir():
                        shutil.rmtree(d)
            log = open(logs / f"ops{job['setting']}-{job['method']}-seed{job['seed']}.log", "a")
            job["commit"] = compare._git_commit()   # the code this run starts with
            proc = subprocess.Popen(job["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=ROOT)
            running.append((job, proc, time.time(), log))
        time.sleep(0.2)
        if budget_s is not None and not stopping and time.time() - t_start > budget_s:
            stopping = True
            for _, proc, _, _ in running:
                proc.send_signal(signal.SIGINT)
            print(f"[{time.time() - t_start:6.0f}s] budget reached: SIGINT to {len(running)} "
                  f"running; {len(todo)} not started", flush=True)
        for item in list(running):
            job, proc, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            code = proc.returncode
            status = ("finished" if code == 0 else "interrupted" if code == 128 + signal.SIGINT
                      else f"failed (exit {code})")
            outcomes.append(dict(setting=job["setting"], method=job["method"], seed=job["seed"],
                                 commit=job["commit"], resumed=job["resume"] is not None,
                                 status=status, threads=threads,
                                 seconds=round(time.time() - t0)))
            print(f"[{time.time() - t_start:6.0f}s] ops {job['setting']}: {job['method']} seed "
                  f"{job['seed']}: {status} in {time.time() - t0:.0f}s", flush=True)
    return outcomes


# ----------------------------------------------------------------------------------------
# Reading runs back (tested on fixtures)
# ----------------------------------------------------------------------------------------


def training_seconds(run_dir: Path) -> dict[int, float]:
    """{step: the sum of step_time up to it}: time spent training, gaps between parts excluded."""
    total, out = 0.0, {0: 0.0}
    for line in open(run_dir / "metrics.jsonl"):
        if line.strip():
            row = json.loads(line)
            total += row.get("step_time", 0.0)
            out[row["step"]] = total
    return out


def collect(out: Path, lengths: list[str], methods: list[str]) -> tuple[list[dict], list[str]]:
    """compare.read_run records of every finished run (curve times = training seconds), and the
    runs started but not finished (setting method seed: step reached)."""
    import common

    records, unfinished = [], []
    for setting in lengths:
        for method in methods:
            for seed_dir in sorted((out / f"ops{setting}" / "runs" / method).glob("seed*")):
                seed = int(seed_dir.name[4:])
                done = [d for d in seed_dir.iterdir() if compare.finished(d)]
                if not done:
                    ckpts = [common.latest_checkpoint(d) for d in seed_dir.iterdir() if d.is_dir()]
                    ckpt = max((c for c in ckpts if c is not None), default=None)
                    unfinished.append(f"{setting} {method} seed {seed}: "
                                      f"{'step ' + ckpt.name[5:].lstrip('0') if ckpt else 'no checkpoint'}")
                    continue
                rec = compare.read_run(max(done), method, seed, target=1.0,
                                       diagnostics=study.STUDY_DIAGNOSTICS.get(method, [])
                                       + STEP_DIAGNOSTICS)
                secs = training_seconds(max(done))
                rec["curve"] = [(s, secs.get(s, float("nan")), a) for s, _, a in rec["curve"]]
                rec["train_s"] = secs[max(secs)]
                rec["setting"], rec["gain"] = setting, rec["final_acc"] - rec["start_acc"]
                records.append(rec)
    return records, unfinished


def summarize(records: list[dict], methods: list[str]) -> list[dict]:
    """One row per (setting, method): study.summarize's gains, plus seconds per step."""
    rows = [dict(r, sec_per_step=compare._mean_std(
        [x["sec_per_step"] for x in records
         if x["setting"] == r["setting"] and x["method"] == r["method"]]))
        for r in study.summarize(records)]
    order = {m: i for i, m in enumerate(methods)}
    return sorted(rows, key=lambda r: (r["setting"], order.get(r["method"], len(order))))


def markdown_table(rows: list[dict], unfinished: list[str]) -> str:
    head = ("| ops | method | seeds | final | gain | gain vs GRPO (paired) | s/step |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['setting']} | {r['method']} | {r['seeds']} | "
             f"{study._pm(r['final_acc'], fmt='{:.1f}')} | {study._pm(r['gain'])} | "
             + ("—" if r["method"] == "grpo" else f"{study._pm(r['gain_vs_grpo'])} ({r['paired']})")
             + f" | {r['sec_per_step'][0]:.1f} |" for r in rows]
    tail = ("\nPoints (%), mean ± std over seeds; s/step: seconds per training step, mean over "
            "seeds.\n")
    if unfinished:
        tail += "Not finished yet: " + "; ".join(unfinished) + ".\n"
    return head + "\n".join(lines) + "\n" + tail


def _groups(records: list[dict], methods: list[str]) -> list[tuple[str, str]]:
    """The (setting, method) pairs present, by setting, then in `methods` order."""
    order = {m: i for i, m in enumerate(methods)}
    return sorted({(r["setting"], r["method"]) for r in records},
                  key=lambda k: (k[0], order.get(k[1], len(order))))


def diagnostics_table(records: list[dict], methods: list[str]) -> str:
    """Per (setting, method): STEP_DIAGNOSTICS, mean over training steps, then over seeds."""
    head = ("| ops | method | train reward | groups all equal | grad norm | approx KL | entropy "
            "| tokens in loss |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for setting, method in _groups(records, methods):
        runs = [r for r in records if r["setting"] == setting and r["method"] == method]
        cells = []
        for k in STEP_DIAGNOSTICS:
            mean = compare._mean_std([r.get(k, float("nan")) for r in runs])[0]
            cells.append("—" if mean != mean else f"{mean:.3g}")
        lines.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    return (head + "\n".join(lines) + "\n\nEach a mean over a run's training steps, then over "
            "seeds. Groups all equal: the share of groups whose G rewards are equal (GRPO's "
            "advantage is 0 there). Tokens in loss: SPO's probability mask (p < 0.9).\n")


def curve_table(records: list[dict], methods: list[str]) -> str:
    """The curves per step in numbers: per (setting, method), the accuracy at every evaluated
    step, mean over seeds, and its difference from GRPO's at that step, paired by seed."""
    steps = sorted(set.intersection(*[{s for s, _, _ in r["curve"]} for r in records]))
    head = ("| ops | method | seeds | " + " | ".join(f"step {s}" for s in steps) + " |\n|"
            + "---|" * (3 + len(steps)) + "\n")
    lines = []
    for setting, method in _groups(records, methods):
        runs = {r["seed"]: {s: a for s, _, a in r["curve"]} for r in records
                if r["setting"] == setting and r["method"] == method}
        grpo = {r["seed"]: {s: a for s, _, a in r["curve"]} for r in records
                if r["setting"] == setting and r["method"] == "grpo"}
        cells = []
        for s in steps:
            cell = f"{100 * statistics.mean(c[s] for c in runs.values()):.1f}"
            paired = [100 * (runs[k][s] - grpo[k][s]) for k in runs if k in grpo]
            if method != "grpo" and paired and s > 0:
                cell += f" ({statistics.mean(paired):+.1f})"
            cells.append(cell)
        lines.append(f"| {setting} | {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return (head + "\n".join(lines) + "\n\nHeld-out accuracy (%) at each evaluation, mean "
            "over seeds; in brackets, the mean difference from GRPO at that step over the seeds "
            "both have.\n")


def write_csv(records: list[dict], path: Path) -> None:
    keys = ["setting", "method", "seed", "steps", "start_acc", "final_acc", "gain",
            "sec_per_step", "train_s", *STEP_DIAGNOSTICS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in records:
            w.writerow([r.get(k, "") for k in keys])


def plot(records: list[dict], lengths: list[str], path: Path) -> bool:
    """Per setting: accuracy against step and against training seconds, mean over seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no upper_bound.png "
              "(pip install -r benchmarks/requirements-plots.txt)", file=sys.stderr)
        return False
    settings = [s for s in lengths if any(r["setting"] == s for r in records)]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
    for (ax_step, ax_time), setting in zip(axes, settings):
        here = [r for r in records if r["setting"] == setting]
        for method in dict.fromkeys(r["method"] for r in here):
            runs = [r for r in here if r["method"] == method]
            steps = sorted(set.intersection(*[{s for s, _, _ in r["curve"]} for r in runs]))
            by = [{s: (t, a) for s, t, a in r["curve"]} for r in runs]
            acc = [statistics.mean(b[s][1] for b in by) for s in steps]
            sec = [statistics.mean(b[s][0] for b in by) for s in steps]
            label = f"{method} ({len(runs)} seeds)"
            ax_step.plot(steps, acc, marker="o", ms=3, label=label)
            ax_time.plot(sec, acc, marker="o", ms=3, label=label)
        ax_step.set(xlabel="training step", ylabel="held-out greedy accuracy",
                    title=f"--arith-ops {setting}: accuracy vs step")
        ax_time.set(xlabel="training seconds (sum of step times)",
                    title=f"--arith-ops {setting}: accuracy vs training time")
        for ax in (ax_step, ax_time):
            ax.grid(alpha=0.3)
        ax_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_outputs(out: Path, lengths: list[str], methods: list[str]) -> str:
    records, unfinished = collect(out, lengths, methods)
    if not records:
        table = "No finished runs yet.\n" + (
            "Not finished yet: " + "; ".join(unfinished) + ".\n" if unfinished else "")
    else:
        table = markdown_table(summarize(records, methods), unfinished)
        table += "\n" + curve_table(records, methods)
        table += "\n" + diagnostics_table(records, methods)
        write_csv(records, out / "upper_bound.csv")
        plot(records, lengths, out / "upper_bound.png")
    (out / "upper_bound.md").write_text(table)
    return table


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", nargs="+", default=LENGTHS, help="--arith-ops settings")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (default 0 1 2 3 4; --quick: 0)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time; threads = cores / jobs (fewer runs than jobs: cores / runs)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="minutes this part may run: then SIGINT to the running runs (they "
                   "checkpoint; the next part resumes them), and no new starts")
    p.add_argument("--out", default=None,
                   help="output folder, shared with study.py (default runs/study; --quick: "
                   "runs/upper-bound-quick)")
    p.add_argument("--quick", action="store_true",
                   help="seed 0, 2-4, 2 steps, 20 held-out problems: a smoke run (the oracle's "
                   "step still costs about 2 minutes)")
    p.add_argument("--tables-only", action="store_true", help="only rebuild the outputs")
    a = p.parse_args(argv)
    import common

    try:
        ops = [common.parse_arith_ops(s) for s in (["2-4"] if a.quick else a.lengths)]
    except common.UserError as e:
        common.fail(f"--lengths: {e}")
    if a.jobs < 1:
        common.fail(f"--jobs must be at least 1, got {a.jobs}; pass e.g. --jobs 2")
    if a.budget_min is not None and a.budget_min <= 0:
        common.fail(f"--budget-min must be above 0, got {a.budget_min}; pass e.g. --budget-min 150")
    lengths = [f"{lo}-{hi}" for lo, hi in ops]
    seeds = a.seeds or ([0] if a.quick else SEEDS)
    out = Path(a.out or ("runs/upper-bound-quick" if a.quick else "runs/study"))
    out.mkdir(parents=True, exist_ok=True)
    if not a.tables_only:
        for o in ops:  # before any job: jobs must not build a warm start side by side
            common.ensure_tiny_model(seed=0, ops=o)
        steps_flags = QUICK_FLAGS if a.quick else study.STEPS_FLAGS
        todo = plan(out, lengths, a.methods, seeds, steps_flags)
        t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        commit = compare._git_commit()  # at the start: the tree may change during a long part
        outcomes = run_part(todo, a.jobs, out / "logs",
                            a.budget_min * 60 if a.budget_min else None)
        with open(out / "upper_bound_parts.jsonl", "a") as f:
            f.write(json.dumps(dict(
                command=" ".join(["python", "benchmarks/upper_bound.py",
                                  *(argv if argv is not None else sys.argv[1:])]),
                commit=commit, cpu=common.cpu_description(), started=started,
                minutes=round((time.time() - t0) / 60, 1), runs=outcomes)) + "\n")
    print(build_outputs(out, lengths, a.methods))
    print(f"wrote {out}/upper_bound.md" + (", .csv and .png" if (out / "upper_bound.csv").exists()
                                           else ""))


if __name__ == "__main__":
    main()
