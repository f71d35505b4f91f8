"""Model output is untrusted: the verifiers never raise, never hang, never execute anything.

Hand-picked hostile strings here; the property-based tests (hypothesis) over arbitrary Unicode
are in test_verifier_properties.py. The bound
on time per call is asserted loosely here (CI machines are noisy); benchmarks report the worst case.
"""
import time

import pytest

import common


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


def test_megabyte_strings_are_fast():
    worst = 0.0
    for text in ["a" * (1 << 20), "1" * (1 << 20), "#### " * (1 << 18), "\\boxed{" * (1 << 17)]:
        t0 = time.perf_counter()
        common.is_correct(text, "1")
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.5


# ---------------------------------------------------------- numbers are read whole or not at all

@pytest.mark.parametrize("text,gold,ok", [
    ("#### 3/4", "3", False), ("#### 3/4", "4", False), ("#### 1e999999", "1", False),
    ("#### 1e5", "100000", False), ("#### .5", "5", False), ("#### .5", "0.5", False),
    ("#### 1,2", "12", False), ("#### 1,2", "1", False), ("#### 12,34", "1234", False),
    ("#### 1,2345", "12345", False), ("#### \u22125", "5", False), ("#### \u22125", "-5", False),
    ("#### \u20135", "5", False), ("#### \uff15", "5", False), ("#### 1.2.3", "1.2", False),
    ("#### 2^10", "10", False), ("\\boxed{3/4}", "3", False), ("The answer is 3/4.", "4", False),
    ("so 7 apples, then 3/4", "7", False), ("the answer is \u22125", "5", False),
    ("#### 1,000", "1000", True), ("#### $1,000.50", "1000.5", True),
    ("#### 1,234,567", "1234567", True), ("#### -5", "-5", True), ("#### 42.", "42", True),
    ("The answer is 5, since", "5", True), ("The answer is: **42**", "42", True),
    ("\\boxed{ 7 }", "7", True), ("12+7=19 19-5=14 #### 14", "14", True),
    ("I have 5eggs", "5", True), ("#### 0.50", "0.5", True),
])
def test_numbers_are_read_whole_or_not_at_all(text, gold, ok):
    assert common.is_correct(text, gold) is ok


@pytest.mark.parametrize("number", ["123456", "1,234,567", "-98765", "3.14159", "$1,000"])
def test_the_window_never_cuts_a_number_at_its_left_edge(number):
    for cut in range(1, len(number)):  # the window starts `cut` characters into the number
        text = "x " + number + "y" * (common.MAX_VERIFY_CHARS - (len(number) - cut))
        assert len(text) - common.MAX_VERIFY_CHARS == 2 + cut
        assert common.extract_answer(text) is None, (cut, common.extract_answer(text))
    text = "x " + number + "y" * (common.MAX_VERIFY_CHARS - len(number))  # the window starts at it
    assert common.extract_answer(text) == number


def test_reward_fn_refuses_mismatched_lists_and_non_string_golds():
    with pytest.raises(ValueError, match="2 completions but 1 gold answers"):
        common.reward_fn(["#### 1", "#### 2"], ["1"])
    with pytest.raises(TypeError, match="gold answer 0 is int 1, not a str"):
        common.reward_fn(["#### 1"], [1])
    outputs = [None, b"#### 1", 1.0]  # model output can be anything: it scores 0
    assert common.reward_fn(outputs, ["1", "1", "1"]) == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- linear time, measured by a ratio
# For each pattern, the adversarial shapes are long runs of what its quantifiers accept, ending in
# a near-miss. Time per call at n and at 4n characters (both inside the window): linear gives
# about 4x, quadratic 16x. Asserting < 8x (minimum times, the sizes measured in turn) fails for
# a backtracking pattern and passes for a linear one on a noisy machine.

SHAPES = {  # pattern: (prefix, characters its quantifiers accept, near-miss endings)
    "boxed": ("\\boxed{", " \t\n", ["x}", "}", "\\boxed", ".", "-"]),
    "hashes": ("####", " \t\n\u00a0", ["x", "#", ".", "$"]),
    "answer_is": ("The answer is", " :*\t\n", ["x", "is", "*.", "-"]),
    "number run": ("", "0123456789.,/^$-+e\u2212", ["e", "x", ",", "e-"]),
    "markers": ("", "#\\boxed{answer is ", ["x", "#"]),
}


def per_call(text: str, calls: int = 10) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        common.extract_answer(text)
    return (time.perf_counter() - t0) / calls


def ratio(make, n: int, reps: int = 7) -> float:
    """min time at 4n / min time at n, the two sizes measured in turn (load hits both alike).

    Noise only ever adds time, so the minimum over repeats is the steadiest estimate of a
    call's cost; interleaving keeps a burst of load from landing on one size only.
    """
    small, big = make(n), make(4 * n)
    t_small, t_big = [], []
    for _ in range(reps):
        t_small.append(per_call(small))
        t_big.append(per_call(big))
    return min(t_big) / max(min(t_small), 1e-9)


def test_the_ratio_catches_a_backtracking_pattern():
    """The measure works: the old `answer is[:\\s]*\\**\\s*` pattern is quadratic on whitespace."""
    import re
    old = re.compile(r"answer is[:\s]*\**\s*(-?\d[\d,]*)")
    make = lambda n: "answer is" + " " * n + "x"  # noqa: E731
    times = [min(timeit(lambda: old.findall(make(n))) for _ in range(3)) for n in (400, 1600)]
    assert times[1] / times[0] > 8.0
    assert ratio(make, 400) < 8.0  # and ours is not


def timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
