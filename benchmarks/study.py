"""When does token-level credit pay off? GRPO and four token-level methods along reasoning length.

    python benchmarks/study.py --jobs 2          # full: 2 lengths x 5 methods x 3 seeds, 60 steps
    python benchmarks/study.py --quick           # 2 lengths x 5 methods x 1 seed x 3 steps
    python benchmarks/study.py --tables-only     # rebuild the outputs from finished runs

The axis is the embedded task's --arith-ops: operations per problem. Settings, fixed before any
run and not tuned for any method: 2-4 (today's task; answers of ~35 characters) and 6-8 (the
same operations, twice as many steps on average, 7 instead of 3: answers of ~70 characters).
The rule for the second setting: shares no length with 2-4, more than doubles the mean chain
(3 -> 7 steps), and keeps the tiny model's context at 256 (common.tiny_context); nothing was
run before the choice. Each setting trains from its own warm start (common.ensure_tiny_model,
same rule: stop at the first evaluation at >= 30% held-out; built once, cached, before any
job), with the setting's default max completion length (9 * HI + 12: 48 and 84 tokens).

Methods: grpo, tempo, dcpo, spo-chain and tdpo1 (the preference method with per-token KL),
with compare.py's flags for each; seeds 0, 1, 2; every run `--total-steps 60 --eval-every 20`
(held-out greedy accuracy on all 500 test problems of the setting, the default --eval-size).
Runs are launched by compare.plan_runs / compare.launch and read back by compare.read_run, one
folder per setting: OUT/ops{LO}-{HI}/runs/{method}/seed{S}/. A finished run is never run again.
benchmarks/upper_bound.py shares this layout and these runs.

Budget (the 100 minutes of 2 CPU cores; measured 2026-12-07 on 2 cores without bf16
instructions: 33 minutes a seed on idle cores, docs/study.md). The estimate made before any
run: compare.py's full run (80 steps, --jobs 2, 1 thread a run) took 3.6 s a step for grpo, tempo and dcpo, 3.2 for
spo-chain and 2.2 for tdpo1 at 2-4, so one seed of the 5 methods costs 60 x 16.2 s = 16 min of
one core, plus about 1 min of evaluations; 3 seeds on 2 cores: about 27 min. At 6-8 a step
costs about twice as much (completions twice as long; generation and training scale with the
length), so about 54 min: 81 minutes for the 30 runs, plus building the 6-8 warm start once
(see docs/study.md for its measured time). --quick: 10 runs of 3 steps and 50 held-out
problems. Measured with --lengths 2-4 only (5 runs) while four other jobs shared the 2 cores:
8 minutes of wall time, 1.6 minutes of CPU time; on idle cores, a few minutes for all 10.

Writes to OUT (default runs/study, --quick: runs/study-quick):
    study.csv   one row per run: setting, method, seed, start/final accuracy, gain, the diagnostics
    study.md    one row per (setting, method): gain, gain over GRPO (paired by seed), diagnostics
    study.png   gain over GRPO against the setting's mean number of operations, mean +- std over
                seeds; needs matplotlib (optional; without it one line says so)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402

LENGTHS = ["2-4", "6-8"]
STUDY_METHODS = ["grpo", "tempo", "dcpo", "spo-chain", "tdpo1"]
STEPS_FLAGS = ["--total-steps", "60", "--eval-every", "20"]
QUICK_FLAGS = ["--total-steps", "3", "--eval-every", "3", "--eval-size", "50"]

# The diagnostics that explain a result, per method (means over each run's training steps).
# completions/mean_length is logged by every method (token_dpo: on the steps that sample).
STUDY_DIAGNOSTICS = {
    "grpo": ["completions/mean_length"],
    "tempo": [
        "completions/mean_length",
        "tempo/frac_tokens_td_nonzero",
        "tempo/branch_nodes_per_group_mean",
    ],
    "dcpo": [
        "completions/mean_length",
        "clip_ratio/dcpo",
        "clip_ratio/dcpo_low",
        "clip_ratio/dcpo_high",
    ],
    "spo-chain": ["completions/mean_length", "spo/segments_per_response", "spo/mask_keep_frac"],
    "tdpo1": ["completions/mean_length", "kl/chosen"],
}
SHORT = {
    "completions/mean_length": "length",
    "tempo/frac_tokens_td_nonzero": "TD-active",
    "tempo/branch_nodes_per_group_mean": "branch nodes/group",
    "clip_ratio/dcpo": "clip",
    "clip_ratio/dcpo_low": "clip low",
    "clip_ratio/dcpo_high": "clip high",
    "spo/segments_per_response": "segments/response",
    "spo/mask_keep_frac": "mask keep",
    "kl/chosen": "KL chosen",
}


def mean_ops(setting: str) -> float:
    lo, hi = (int(x) for x in setting.split("-"))
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------
# Reading runs back (tested on a fixture)
# ----------------------------------------------------------------------------------------


def collect(out: Path, lengths: list[str]) -> list[dict]:
    """Every finished run under OUT/ops*/runs, as compare.read_run records plus `setting`."""
    records = []
    for setting in lengths:
        root = out / f"ops{setting}" / "runs"
        for method_dir in sorted(root.glob("*")):
            for seed_dir in sorted(method_dir.glob("seed*")):
                done = [d for d in seed_dir.iterdir() if compare.finished(d)]
                if not done:
                    continue
                rec = compare.read_run(
                    max(done),
                    method_dir.name,
                    int(seed_dir.name[4:]),
                    target=1.0,
                    diagnostics=STUDY_DIAGNOSTICS.get(method_dir.name, []),
                )
                rec["setting"], rec["gain"] = setting, rec["final_acc"] - rec["start_acc"]
                records.append(rec)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """One row per (setting, method): gain, and gain over GRPO paired by seed, mean and std.

    gain_vs_grpo for seed s = gain(method, s) - gain(grpo, s), over the seeds both have (both
    runs start from the same warm start and see the same prompt order for a seed).
    """
    rows = []
    settings = list(dict.fromkeys(r["setting"] for r in records))
    for setting in settings:
        here = [r for r in records if r["setting"] == setting]
        grpo = {r["seed"]: r["gain"] for r in here if r["method"] == "grpo"}
        methods = [m for m in STUDY_METHODS if any(r["method"] == m for r in here)]
        methods += sorted({r["method"] for r in here} - set(methods))
        for method in methods:
            runs = [r for r in here if r["method"] == method]
            paired = [r["gain"] - grpo[r["seed"]] for r in runs if r["seed"] in grpo]
            rows.append(
                {
                    "setting": setting,
                    "method": method,
                    "seeds": len(runs),
                    "start_acc": compare._mean_std([r["start_acc"] for r in runs]),
                    "final_acc": compare._mean_std([r["final_acc"] for r in runs]),
                    "gain": compare._mean_std([r["gain"] for r in runs]),
                    "gain_vs_grpo": compare._mean_std(paired),
                    "paired": len(paired),
                    "diagnostics": {
                        k: compare._mean_std([r[k] for r in runs])[0]
                        for k in STUDY_DIAGNOSTICS.get(method, [])
                    },
                }
            )
    return rows


def _pm(ms: tuple, scale: float = 100.0, fmt: str = "{:+.1f}") -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{fmt.format(m * scale)} ± {abs(s * scale):.1f}"


def markdown_table(rows: list[dict]) -> str:
    """Points (%), mean ± std over seeds; 'vs GRPO' is the paired difference of the gains."""
    head = (
        "| ops | method | seeds | start | final | gain | gain vs GRPO | diagnostics (run means) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        diag = ", ".join(
            f"{SHORT.get(k, k)} {v:.3g}" for k, v in r["diagnostics"].items() if not math.isnan(v)
        )
        vs = "—" if r["method"] == "grpo" else f"{_pm(r['gain_vs_grpo'])} ({r['paired']})"
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['seeds']} | "
            f"{_pm(r['start_acc'], fmt='{:.1f}')} | "
            f"{_pm(r['final_acc'], fmt='{:.1f}')} | {_pm(r['gain'])} | {vs} | {diag} |"
        )
    return head + "\n".join(lines) + "\n"


def write_csv(records: list[dict], path: Path) -> None:
    keys = [
        "setting",
        "method",
        "seed",
        "steps",
        "start_acc",
        "final_acc",
        "gain",
        "sec_per_step",
        "wall_s",
    ]
    diag = sorted({k for keys_ in STUDY_DIAGNOSTICS.values() for k in keys_})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + diag)
        for r in records:
            w.writerow(
                [r.get(k, "") for k in keys]
                + [
                    (
                        ""
                        if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
                        else r[k]
                    )
                    for k in diag
                ]
            )


def plot_gain(rows: list[dict], path: Path) -> bool:
    """Gain over GRPO (points) against mean operations per problem, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: matplotlib is not installed, so no study.png (pip install matplotlib); "
            "study.csv and study.md are written",
            file=sys.stderr,
        )
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.axhline(0.0, color="black", lw=1, label="grpo (reference)")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "grpo"]
    for k, method in enumerate(methods):
        pts = [r for r in rows if r["method"] == method and not math.isnan(r["gain_vs_grpo"][0])]
        x = [mean_ops(r["setting"]) + 0.08 * (k - (len(methods) - 1) / 2) for r in pts]  # dodge
        ax.errorbar(
            x,
            [100 * r["gain_vs_grpo"][0] for r in pts],
            yerr=[100 * r["gain_vs_grpo"][1] for r in pts],
            marker="o",
            capsize=3,
            label=method,
        )
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    ax.set_xticks(
        [mean_ops(s) for s in settings], [f"{s}\n(mean {mean_ops(s):g})" for s in settings]
    )
    ax.set(
        xlabel="operations per problem (--arith-ops)",
        ylabel="gain minus GRPO's gain (points)",
        title="token-level credit against reasoning length (mean ± std over seeds)",
    )
    ax.grid(alpha=0.3)
    ax.margins(x=0.15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_outputs(out: Path, lengths: list[str]) -> list[dict]:
    records = collect(out, lengths)
    if not records:
        raise SystemExit(f"error: no finished runs under {out}/ops*/runs; run the study first")
    write_csv(records, out / "study.csv")
    rows = summarize(records)
    (out / "study.md").write_text(markdown_table(rows))
    plot_gain(rows, out / "study.png")
    return rows


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 3 steps, 50 held-out problems")
    p.add_argument(
        "--lengths", nargs="+", default=LENGTHS, help="--arith-ops settings, e.g. 2-4 6-8"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2; --quick: 0")
    p.add_argument("--methods", nargs="+", default=STUDY_METHODS, choices=list(compare.METHODS))
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at a time; threads per run = cores / jobs"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default runs/study or runs/study-quick)"
    )
    p.add_argument(
        "--tables-only", action="store_true", help="only rebuild the outputs from finished runs"
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import common

    try:
        ops = [common.parse_arith_ops(s) for s in args.lengths]
    except common.UserError as e:
        common.fail(f"--lengths: {e}")
    if args.jobs < 1:
        common.fail(f"--jobs must be at least 1, got {args.jobs}; pass e.g. --jobs 2")
    lengths = [f"{lo}-{hi}" for lo, hi in ops]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.tables_only:
        t_start, warm = time.time(), {}
        for setting, o in zip(lengths, ops):  # before any job: jobs must not build one side by side
            t0 = time.time()
            path = common.ensure_tiny_model(seed=0, ops=o)
            warm[setting] = dict(
                json.loads((path / "warm_start.json").read_text()),
                seconds_here=round(time.time() - t0, 1),
            )
        for setting in lengths:
            d = out / f"ops{setting}"
            extra = ["--arith-ops", setting, *(QUICK_FLAGS if args.quick else STEPS_FLAGS)]
            compare.launch(
                compare.plan_runs(d, args.methods, seeds, extra),
                args.jobs,
                d / "logs",
                label=f"ops {setting}: ",
            )
        (out / "study.json").write_text(
            json.dumps(
                dict(
                    command=" ".join(
                        [
                            "python",
                            "benchmarks/study.py",
                            *(argv if argv is not None else sys.argv[1:]),
                        ]
                    ),
                    lengths=lengths,
                    methods=args.methods,
                    seeds=seeds,
                    jobs=args.jobs,
                    quick=args.quick,
                    date=time.strftime("%Y-%m-%d"),
                    commit=compare._git_commit(),
                    warm_starts=warm,
                    wall_s=round(time.time() - t_start),
                ),
                indent=2,
            )
        )
    build_outputs(out, lengths)
    print((out / "study.md").read_text())
    print(
        f"wrote {out}/study.csv, {out}/study.md"
        + (f", {out}/study.png" if (out / "study.png").exists() else "")
    )


if __name__ == "__main__":
    main()
