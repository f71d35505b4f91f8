"""grpo.py's main() is the template: an RL script changes it only inside its ALGO blocks.

main() is cut into blocks at its `# ---- label ----` comments. Every block of grpo.main whose
label does not say ALGO (the setup, 1. rollout, 2. the no-grad pass, 5. log, evaluate,
checkpoint) must appear in tempo.py, dcpo.py and spo.py under the same label, line for line.
The exceptions are listed below with their reason; a failure names the file and the block.
token_dpo.py is not an RL loop (rounds of pairs, one optimizer step a step) and is not checked.
"""
import ast
import difflib
import re

import pytest

from conftest import ROOT

RL_SCRIPTS = ("tempo.py", "dcpo.py", "spo.py")
# (script, template block) -> why the script may lack or change it
EXCEPTIONS = {
    ("spo.py", "1. rollout: G completions for each of P prompts, one batched generate call"):
        "SPO's rollout is its algorithm (chain: Monte Carlo continuations; tree: grown level "
        "by level), so steps 1-3 are one ALGO block",
    ("spo.py", "2. one no-grad pass: what the update needs before it starts"):
        "inside spo's ALGO block 1.-3.: the old log-probs come before the advantages",
}
# (script, template block) -> the only lines that may differ, as (template line, script line)
CHANGED_LINES = {
    ("spo.py", "5. log, evaluate, checkpoint (boilerplate)"): [(
        "        run.end_step(step, metrics, texts, rewards, idx, train, G)",
        "        run.end_step(step, metrics, texts, rewards, idx, train, batch.group_size)")],
}


def main_blocks(path) -> dict[str, list[str]]:
    """label -> the lines of main() after `# ---- label ----`, up to the next such comment."""
    src = path.read_text()
    main = next(n for n in ast.parse(src).body
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    blocks, label = {}, None
    for line in ast.get_source_segment(src, main).splitlines()[1:]:
        m = re.fullmatch(r"\s*# ---- (.*?) ----", line)
        if m:
            label = m[1]
            blocks[label] = []
        elif label is not None:
            blocks[label].append(line)
    return blocks


def test_the_template_has_its_five_steps():
    labels = list(main_blocks(ROOT / "grpo.py"))
    numbered = [lab.split(" ", 1)[0] for lab in labels if lab[0].isdigit()]
    assert numbered == ["1.", "2.", "3.", "4.", "5."], labels
    assert [("ALGO" in lab) for lab in labels if lab[0].isdigit()] == [False, False, True, True,
                                                                        False]


@pytest.mark.parametrize("script", RL_SCRIPTS)
def test_an_rl_script_changes_main_only_in_its_algo_blocks(script):
    template, own = main_blocks(ROOT / "grpo.py"), main_blocks(ROOT / script)
    problems = []
    for label, lines in template.items():
        if "ALGO" in label or (script, label) in EXCEPTIONS:
            continue
        if label not in own:
            problems.append(f"{script} has no block `# ---- {label} ----` (grpo.py's main has)")
            continue
        allowed = CHANGED_LINES.get((script, label), [])
        expect = [dict(allowed).get(line, line) for line in lines]
        if own[label] != expect:
            diff = "\n".join(difflib.unified_diff(expect, own[label], "grpo.py", script,
                                                  lineterm="", n=0))
            problems.append(f"{script}: block `{label}` differs from grpo.py's outside an ALGO "
                            f"block; move the change into an ALGO block or into grpo.py\n{diff}")
    assert not problems, "\n\n".join(problems)
    # an exception that is no longer needed must go
    for s, label in EXCEPTIONS:
        assert s != script or label not in own, f"{script} has `{label}` again: drop its exception"
    for s, label in CHANGED_LINES:
        assert s != script or own.get(label) != template[label], \
            f"drop {script}'s CHANGED_LINES entry"
