"""The QK-norm chapter's rules, on fabricated results: every outcome each can return."""
import pytest

from ctr import verdicts as V
from ctr.chapters import qknorm


def test_sinks_ratio_by_hand():
    r, lo, hi = qknorm.sinks_ratio([1.0, 1.0, 1.0], [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]], n_boot=50)
    assert r == pytest.approx(1 / 1.5) and lo == pytest.approx(r) and hi == pytest.approx(r)


def test_rule_not_reduced():
    assert qknorm.rule_not_reduced(0.9, 1.1) == V.REPRODUCED
    assert qknorm.rule_not_reduced(0.7, 0.9) == V.COMPATIBLE
    assert qknorm.rule_not_reduced(0.4, 0.6) == V.NOT           # QK-norm model has far fewer sinks


def test_rule_mechanism():
    assert qknorm.rule_mechanism((0.1, 0.2), V.REPRODUCED) == V.REPRODUCED
    assert qknorm.rule_mechanism((0.1, 0.2), V.NOT) == V.PARTLY
    assert qknorm.rule_mechanism((0.1, 0.2), V.COMPATIBLE) == V.COMPATIBLE
    assert qknorm.rule_mechanism((-0.2, -0.1), V.NOT) == V.NOT
    assert qknorm.rule_mechanism((0.1, 0.2), V.UNTESTABLE) == V.REPRODUCED   # the tag part alone
