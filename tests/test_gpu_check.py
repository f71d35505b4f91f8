"""benchmarks/perf/gpu_check.sh runs only where a GPU is lent, so a flag it passes must be checked
here.

Every `item NAME SECONDS python SCRIPT.py ...` line of the method scripts, with the COMMON flags
it shares, must parse with that script's Args: a renamed flag would otherwise be found only on
the GPU machine, in its few minutes.
"""
import re
import shlex

import pytest

import common
from conftest import ROOT

TEXT = (ROOT / "benchmarks" / "perf" / "gpu_check.sh").read_text()
ITEMS = re.findall(r'^item \S+ \d+ python (grpo|tempo|dcpo|spo|token_dpo)\.py (.*)$', TEXT, re.M)


def common_flags() -> list[str]:
    """COMMON=(...) with its shell variables replaced by values of the right kind."""
    body = re.search(r"^COMMON=\((.*?)\)$", TEXT, re.M | re.S)[1]
    values = {"$MODEL": "tiny", "$TASK": "arith", "$DEVICE": "cpu", "$DTYPE": "float32",
              "$STEPS": "2", "$LEN": "8", "$OUT/runs": "/tmp/runs"}
    words = [w for w in shlex.split(body.replace("\n", " ")) if w != "${DATA[@]}"]
    return [values.get(w, w) for w in words]


def test_the_script_runs_every_method():
    assert sorted({s for s, _ in ITEMS}) == ["dcpo", "grpo", "spo", "tempo", "token_dpo"]


@pytest.mark.parametrize("script,rest", ITEMS, ids=[s for s, _ in ITEMS])
def test_every_flag_of_an_item_parses(script, rest):
    argv = [w for w in shlex.split(rest) if w != "${COMMON[@]}"] + common_flags()
    args = common.parse_args(__import__(script).Args, argv)  # SystemExit on an unknown flag
    assert args.total_steps == 2 and args.device == "cpu"
