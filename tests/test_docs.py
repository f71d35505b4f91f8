"""The README and docs/: every relative link resolves, the README's two commands are the ones CI
runs, and the README stays a README (at most 150 lines)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("benchmarks/**/README.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def relative_links(path):
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        yield target.split("#", 1)[0]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    missing = [f"{p.relative_to(ROOT)} -> {t}" for p in DOCS for t in relative_links(p)
               if not (p.parent / t).exists()]
    assert DOCS[1:], "docs/ has no pages"
    assert not missing, missing


def test_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [a](missing.md), [b](https://example.com) and [c](#top)\n")
    assert list(relative_links(page)) == ["missing.md"]


def readme_commands():
    block = re.search(r"## Run it, and test it\n\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no 'Run it, and test it' command block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_gives_two_one_line_commands_and_ci_runs_exactly_them():
    run, test = readme_commands()
    assert run.startswith("pip install -r requirements.txt && python grpo.py")
    assert "pytest" in test and test.startswith("pip install -r requirements.txt")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert run in ci_lines and test in ci_lines


def test_the_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
