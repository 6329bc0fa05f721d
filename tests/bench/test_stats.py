import math

import pytest

from bench.stats import mcnemar_exact, wilson_interval


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (0, 1, 0.0, 0.7935),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # textbook example (Newcombe 1998)
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_contains_estimate_and_empty_sample():
    for k in range(0, 21):
        lo, hi = wilson_interval(k, 20)
        assert lo <= k / 20 <= hi
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(2, 7) == mcnemar_exact(7, 2)
    # the exact test of 0 vs 6 discordant pairs is significant at 5%, 0 vs 5 is not
    assert mcnemar_exact(0, 6) < 0.05 < mcnemar_exact(0, 5)
    assert math.isclose(mcnemar_exact(0, 6), 2 / 64)
