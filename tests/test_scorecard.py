"""The verdict vocabulary, the shared rules, and the scorecard on fabricated results files."""
import json
import math

import pytest

from ctr import results
from ctr import verdicts as V
from ctr.book import scorecard


# --- shared rules ------------------------------------------------------------------------------

def test_by_interval_returns_every_outcome():
    assert V.by_interval(0.25, 0.35, 0.2, 0.4) == V.REPRODUCED
    assert V.by_interval(0.41, 0.6, 0.2, 0.4) == V.NOT
    assert V.by_interval(0.0, 0.1, 0.2, 0.4) == V.NOT
    assert V.by_interval(0.3, 0.5, 0.2, 0.4) == V.COMPATIBLE
    assert V.by_interval(float("nan"), 0.5, 0.2) == V.UNTESTABLE
    assert V.by_interval(None, None) == V.UNTESTABLE
    # one-sided claims
    assert V.by_interval(-0.3, -0.1, high=0.0) == V.REPRODUCED
    assert V.by_interval(0.1, 0.3, high=0.0) == V.NOT
    with pytest.raises(ValueError, match="reversed"):
        V.by_interval(0.5, 0.1, 0, 1)


def test_all_of_and_combine():
    R, C, P, N, U = V.REPRODUCED, V.COMPATIBLE, V.PARTLY, V.NOT, V.UNTESTABLE
    # Two-part claims (RULES.md, General): a part not testable makes the claim not testable.
    assert V.all_of(R, R) == R and V.all_of(N, N) == N and V.all_of(R, N) == P
    assert V.all_of(R, C) == C and V.all_of(C, N) == N and V.all_of(U, U) == U
    assert V.all_of(R, U) == U and V.all_of(C, C) == C and V.all_of(P, R) == P
    # Across models: the models that could test it decide; R beside N is a disagreement.
    assert V.combine([R, R, U]) == R and V.combine([N, N]) == N and V.combine([R, N]) == P
    assert V.combine([C, R]) == C and V.combine([U]) == U and V.combine([P, R]) == P
    assert V.combine([C, N]) == C and V.combine([C, C, U]) == C
    assert V.agree([R, C, U], V.combine([R, C, U])) == 1
    assert V.by_bootstrap(0.1, 0.2, 19, low=0.0) == U and V.by_bootstrap(0.1, 0.2, 20, low=0.0) == R
    with pytest.raises(ValueError, match="unknown verdict"):
        V.combine(["sort of"])


def test_interval_text():
    assert V.interval(0.123, 0.456) == "95% CI [0.12, 0.46]"
    assert V.interval(math.nan, 1) == "-"


# --- the scorecard -----------------------------------------------------------------------------

def write(d, chapter, claims):
    (d / f"{chapter}.json").write_text(json.dumps({"claims": claims}))


def row(cid, model, verdict, ours="x"):
    return V.row(cid, model, f"claim {cid}", "p", ours, "95% CI [0, 1]", "rule", verdict)


@pytest.fixture
def fabricated(tmp_path):
    R, C, P, N, U = V.REPRODUCED, V.COMPATIBLE, V.PARTLY, V.NOT, V.UNTESTABLE
    write(tmp_path, "a", [row("all", "m1", R), row("all", "m2", R),
                          row("mixed", "m1", R), row("mixed", "m2", N),
                          row("none", "m1", N), row("none", "m2", N),
                          row("weak", "m1", C), row("weak", "m2", R)])
    write(tmp_path, "b", [row("half", "m1", P), row("offline", "-", U),
                          row("some", "m1", U), row("some", "m2", R)])
    return tmp_path


def test_expected_verdicts(fabricated):
    t = scorecard.table(fabricated, chapters=("a", "b")).set_index("id")
    assert t.verdict.to_dict() == {"all": V.REPRODUCED, "mixed": V.PARTLY, "none": V.NOT,
                                   "weak": V.COMPATIBLE, "half": V.PARTLY,
                                   "offline": V.UNTESTABLE, "some": V.REPRODUCED}
    assert t.loc["mixed", "ours"] == "m1: x; m2: x"
    assert t.loc["offline", "ours"] == "x"
    assert t.loc["all", "rule"] == "rule" and "95% CI" in t.loc["all", "interval"]


def test_missing_results_file_fails_loudly(fabricated):
    with pytest.raises(results.MissingResults, match="run the 'c' chapter"):
        scorecard.table(fabricated, chapters=("a", "c"))


def test_results_without_claims_columns_or_with_unknown_verdicts_fail(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(ValueError, match="no 'claims'"):
        scorecard.table(tmp_path, chapters=("a",))
    bad = row("x", "m", V.REPRODUCED)
    bad["verdict"] = "sort of"
    write(tmp_path, "b", [bad])
    with pytest.raises(ValueError, match="unknown verdict"):
        scorecard.table(tmp_path, chapters=("b",))
    old = {k: v for k, v in row("x", "m", V.REPRODUCED).items() if k != "rule"}
    write(tmp_path, "c", [old])
    with pytest.raises(ValueError, match="lacks \\['rule'\\]"):
        scorecard.table(tmp_path, chapters=("c",))


def test_html_links_each_chapter_and_shows_rules(fabricated):
    h = scorecard.to_html(scorecard.table(fabricated, chapters=("a", "b")))
    assert h.count("<tr>") == 8 and "href='a.html'" in h and "href='b.html'" in h
    assert "<th>rule</th>" in h and "95% CI [0, 1]" in h


def test_claims_beyond_the_paper_read_supported(fabricated):
    h = scorecard.to_html(scorecard.table(fabricated, chapters=("a",)), words=scorecard.BEYOND_WORDS)
    assert "<b>supported</b>" in h and "<b>not supported</b>" in h and "<b>reproduced</b>" not in h
    assert "m2: not supported" in h and "m1: supported" in h
