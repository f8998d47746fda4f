"""The sinks chapter: caught tokens, the persistence measure on constructed residuals, and every
outcome of every verdict rule on fabricated results."""
import numpy as np
import pytest
import torch

from ctr import verdicts as V
from ctr.chapters import sinks
from ctr.chapters import sinks_verdicts as SV

R, C, N, U = V.REPRODUCED, V.COMPATIBLE, V.NOT, V.UNTESTABLE


def test_caught_tokens_and_jaccard_by_hand():
    T = 8
    A = torch.zeros(T, T)
    A[:, 0] = 0.6                   # everybody looks at BOS ...
    A[4:, 3] = 0.3                  # ... tokens 4-7 also at token 3
    A[6:, 3] = 0.9                  # ... and 6-7 more at 3 than at BOS
    assert sinks.caught(A, [0, 3]) == [6, 7]
    assert sinks.caught(A, [0]) == []
    assert sinks.jaccard([6, 7], [7, 8]) == pytest.approx(1 / 3)
    assert sinks.jaccard([], []) == 1.0


class Cap:
    """A stand-in for sinks.Capture with a planted separation along the tag difference."""

    def __init__(self, shift_deeper: float, shift_input: float = 0.0, n=60, d=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.V = torch.zeros(n, 4)
        self.V[0], self.V[5] = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
        self.W_O = torch.randn(d, 4, generator=g)
        u = self.W_O @ (self.V[5] - self.V[0])
        u = u / u.norm()
        self.labels = np.where(np.arange(n) % 2 == 0, 5, 0)
        noise = lambda: torch.randn(n, d, generator=g)  # noqa: E731
        side = torch.tensor((self.labels == 5).astype(np.float32)).unsqueeze(1)
        self.resid_in = noise() + shift_input * side * u
        self.resid_after = noise() + 0.5 * shift_deeper * side * u
        self.deeper = noise() + shift_deeper * side * u


def test_persistence_finds_a_planted_separation_and_a_lost_one():
    keep = torch.arange(60)
    c = Cap(shift_deeper=3.0)
    p = SV.persistence(c, keep, c.labels, 5, n_boot=300, n_perm=300)
    assert p["d_deeper"] > 2 and abs(p["d_input"]) < 1
    assert p["lo"] > 0 and p["p"] < 0.01
    assert SV.rule_persist(True, p["lo"], p["hi"]) == R
    # separated before the head wrote anything, and no longer deeper: against the claim
    c0 = Cap(shift_deeper=0.0, shift_input=3.0, seed=1)
    p0 = SV.persistence(c0, keep, c0.labels, 5, n_boot=300, n_perm=300)
    assert p0["hi"] < 0 and p0["p"] > 0.5
    assert SV.rule_persist(True, p0["lo"], p0["hi"]) == N


def test_cluster_gain_on_separated_outputs():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 7], 30)
    X_in = rng.normal(size=(60, 8))
    X_out = rng.normal(size=(60, 8)) + 4 * (labels == 7)[:, None]
    g = SV.cluster_gain(X_in, X_out, labels, n_boot=100)
    assert g["gain"] > 0.3 and g["lo"] > 0


def test_rules_every_outcome():
    assert SV.rule_two_sinks(3) == R and SV.rule_two_sinks(0) == N
    assert SV.rule_clusters(True, 0.1, 0.3) == R
    assert SV.rule_clusters(True, -0.1, 0.3) == C
    assert SV.rule_clusters(True, -0.3, -0.1) == N
    assert SV.rule_clusters(False, 0.1, 0.3) == U          # a head without a second sink
    assert SV.rule_persist(True, -0.5, -0.2) == N
    assert SV.rule_persist(False, 0.2, 0.5) == U
    assert SV.rule_own_sinks(5, True, 0.9) == R              # different non-BOS sinks
    assert SV.rule_own_sinks(5, False, 0.3) == R             # shared sink, different tokens
    assert SV.rule_own_sinks(5, False, 0.8) == N             # [0, 67] vs [0, 67, 70]
    assert SV.rule_own_sinks(1, True, None) == U


def test_chapter_rows_on_the_planted_model():
    from ctr import data
    f = sinks.run("tiny-planted-llama", data.imdb_reviews(2, min_words=64), max_tokens=64,
                  min_queries=8)
    rows = SV.claims("tiny", sinks.summary(f))
    assert [r["id"] for r in rows] == ["two_sinks", "clusters", "persist", "own_sinks"]
    assert all(set(r) == set(V.COLUMNS) for r in rows)
    if not f.search.main.qualifies:
        assert rows[1]["verdict"] == rows[2]["verdict"] == U
