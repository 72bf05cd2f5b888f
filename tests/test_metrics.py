import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quadflow.metrics import OTHER, cluster_coverage, entropy, kl_divergence, kl_reduction, source_mix

counts = st.lists(st.integers(0, 50), min_size=2, max_size=12)


def test_kl_by_hand_with_add_one_smoothing():
    # p = (1+1, 0+1)/3 = (2/3, 1/3), q = (1/3, 2/3): KL = 2/3 ln 2 + 1/3 ln 1/2 = ln(2)/3
    assert kl_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2) / 3)


def test_kl_without_smoothing_and_infinite_when_q_misses_a_bucket():
    # p = (.75, .25), q = (.25, .75): KL = .75 ln 3 + .25 ln(1/3) = ln(3)/2
    assert kl_divergence([3, 1], [1, 3], smoothing=0) == pytest.approx(math.log(3) / 2)
    assert kl_divergence([1, 1], [2, 0], smoothing=0) == math.inf


def test_kl_reduction_is_dsir_metric():
    # KL(t||raw) = ln(3)/2, KL(t||selected) = 0 because selected has the target's shape
    assert kl_reduction([3, 1], [1, 3], [30, 10], smoothing=0) == pytest.approx(math.log(3) / 2)
    # a selection further from the target than the raw pool gives a negative reduction
    assert kl_reduction([3, 1], [1, 1], [1, 3], smoothing=0) < 0


def test_kl_errors_quote_the_bad_value():
    with pytest.raises(ValueError, match="2 buckets but q_counts has 3"):
        kl_divergence([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="-1"):
        kl_divergence([1, -1], [1, 1])


@settings(max_examples=60, deadline=None)
@given(counts, st.data())
def test_kl_properties(p, data):
    q = data.draw(st.lists(st.integers(0, 50), min_size=len(p), max_size=len(p)))
    assert kl_divergence(p, q) >= -1e-12
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert kl_reduction(p, q, q) == pytest.approx(0.0, abs=1e-12)


def test_cluster_coverage():
    assert cluster_coverage([0, 0, 2], 4) == 0.5
    assert cluster_coverage([], 3) == 0.0
    with pytest.raises(ValueError, match="cluster id 5"):
        cluster_coverage([5], 4)


def test_entropy_by_hand():
    assert entropy([1, 1, 1, 1]) == pytest.approx(math.log(4))
    assert entropy([5, 0]) == 0.0
    assert entropy([0, 0]) == 0.0
    # p = (.5, .25, .25): H = .5 ln 2 + 2 * .25 ln 4 = 1.5 ln 2
    assert entropy([2, 1, 1]) == pytest.approx(1.5 * math.log(2))


@settings(max_examples=60, deadline=None)
@given(counts)
def test_entropy_bounded_by_uniform(c):
    assert 0.0 <= entropy(c) <= math.log(len(c)) + 1e-12


def test_source_mix_top_and_other():
    mix = source_mix(["a", "b", "a", "c"], [2, 3, 3, 2], top=2)
    assert list(mix) == ["a", "b", OTHER]
    assert mix == pytest.approx({"a": 0.5, "b": 0.3, OTHER: 0.2})
    assert source_mix([], []) == {}
    assert sum(source_mix(["x", "y", None], np.array([1, 1, 2])).values()) == pytest.approx(1.0)
