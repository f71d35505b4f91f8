"""Rebuild the shipped warm starts of the embedded tiny model (tiny/arith-*).

    python tiny/build.py                 # every shipped setting (common.TINY_SHIPPED): 2-4, 6-8
    python tiny/build.py --arith-ops 6-8 # another setting, into tiny/arith-6-8 (then add it to
                                         # common.TINY_SHIPPED, so that --model tiny uses it)

Each folder is the output of common.build_tiny_model_folder (a supervised warm start on the
arithmetic task that stops at held-out accuracy 0.30), plus, in its warm_start.json, the
command, commit and CPU that built it and the sha256 of every other file. `--model tiny` loads
these folders on every machine, and checks the hashes first. A rebuild on another CPU gives a
slightly different model (the rounding of fp32 matrix products differs between instruction
sets), so commit a rebuilt folder only with the README numbers it changes.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arith-ops", action="append",
                        help="a length setting LO-HI to build (default: every shipped one)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    for text in args.arith_ops or [f"{lo}-{hi}" for lo, hi in common.TINY_SHIPPED]:
        ops = common.parse_arith_ops(text)
        record = dict(command=f"python tiny/build.py --arith-ops {text}", commit=commit,
                      cpu=common.cpu_description(), torch_threads=common.torch.get_num_threads())
        common.build_tiny_model_folder(common.shipped_tiny_dir(ops), seed=0, ops=ops,
                                       record=record)


if __name__ == "__main__":
    main()
