"""Model output is untrusted: the verifiers never raise, never hang, never execute anything.

Property-based (hypothesis) over arbitrary Unicode, plus hand-picked hostile strings. The bound
on time per call is asserted loosely here (CI machines are noisy); benchmarks report the worst case.
"""
import time

import pytest

import common

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HOSTILE = [
    "__import__('os').system('touch /tmp/pwned')", "eval('1+1')", "exec('x=1')", "9**9**9**9", "1e999999",
    "-1e-999999", "#### 1e999999", "\\boxed{" * 10_000, "\\boxed{12", "\\boxed{\\boxed{\\boxed{3}}}",
    "(" * 200_000 + "7" + ")" * 200_000, "[" * 100_000, "#" * 1_000_000, "9" * 2_000_000,
    "#### " + "1," * 500_000 + "1", "The answer is " + "0" * 1_000_000 + "1", "\x00\x01\x02 #### 5",
    "٣٤٥ ⁴² 𝟘 ½ ⅞", "#### ５", "NaN", "inf", "-inf", "#### nan", "\\boxed{}", "####", "$" * 100_000,
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings(text, tmp_path):
    t0 = time.perf_counter()
    out = common.is_correct(text, "5")
    assert isinstance(out, bool)
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(common.reward_fn([text], ["5"])[0], float)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000), st.text(alphabet="0123456789.,$- ", max_size=30))
def test_never_raises_on_arbitrary_unicode(text, gold):
    assert isinstance(common.is_correct(text, gold), bool)
    ans = common.extract_answer(text)
    assert ans is None or (isinstance(ans, str) and len(ans) <= common.MAX_VERIFY_CHARS)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-10**30, max_value=10**30), st.sampled_from(["#### {}", "\\boxed{{{}}}", "The answer is {}.", "so {}"]))
def test_roundtrip_numbers(n, template):
    assert common.is_correct("some work 1 2 3 " + template.format(n), str(n))
    assert not common.is_correct("some work " + template.format(n), str(n + 1))


def test_megabyte_strings_are_fast():
    worst = 0.0
    for text in ["a" * (1 << 20), "1" * (1 << 20), "#### " * (1 << 18), "\\boxed{" * (1 << 17)]:
        t0 = time.perf_counter()
        common.is_correct(text, "1")
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.5
