"""The verifiers on arbitrary input, property-based (hypothesis): they never raise, read any
integer back, and stay linear on every pattern's adversarial shapes. The hand-picked hostile
strings and the ratio measure are in test_verifier_hostile.py, which runs without hypothesis."""
import pytest

import common
from test_verifier_hostile import SHAPES, ratio

pytest.importorskip("hypothesis", reason="needs `pip install -r tests/requirements.txt` (hypothesis)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


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


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(SHAPES)), st.data())
def test_every_pattern_is_linear_on_adversarial_shapes(name, data):
    prefix, accepted, endings = SHAPES[name]
    unit = data.draw(st.text(alphabet=accepted, min_size=1, max_size=4), label="repeated unit")
    end = data.draw(st.sampled_from(endings), label="near-miss ending")
    repeat_prefix = data.draw(st.booleans(), label="prefix before every unit")

    def make(n):
        if repeat_prefix:
            return (prefix + unit) * (n // len(prefix + unit)) + end
        return prefix + unit * (n // len(unit)) + end

    assert ratio(make, 900) < 8.0
