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
    assert V.by_interval(0.0, 0.0, low=0.0) == R and V.by_interval(0.0, 0.0, low=0.0, strict=True) == C
    assert V.by_interval(0.05, 0.1, low=0.05, strict=True) == C and V.by_interval(-1, -0.1, low=0, strict=True) == N
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
    assert [m["model"] for m in t.loc["mixed", "per_model"]] == ["m1", "m2"]
    assert t.loc["all", "rule"] == "rule" and "95% CI" in t.loc["all", "per_model"][0]["interval"]
    # how many of the models that ran agree with the claim's verdict
    assert (t.loc["all", "agree"], t.loc["all", "models"]) == (2, 2)
    assert (t.loc["weak", "agree"], t.loc["mixed", "agree"], t.loc["some", "agree"]) == (1, 0, 1)
    assert scorecard.counts(t) == {V.REPRODUCED: 2, V.COMPATIBLE: 1, V.PARTLY: 2, V.NOT: 1,
                                   V.UNTESTABLE: 1}


def test_alternative_readings_stay_apart_and_are_not_counted(tmp_path):
    alt = V.row("all_alt", "m1", "claim all, read otherwise", "p", "x", "-", "ours", V.NOT,
                reading=V.ALTERNATIVE)
    write(tmp_path, "a", [row("all", "m1", V.REPRODUCED), alt])
    t = scorecard.table(tmp_path, chapters=("a",))
    a = scorecard.alternatives(tmp_path, chapters=("a",))
    assert list(t.id) == ["all"] and list(a.id) == ["all_alt"]
    assert a.reading.iloc[0] == V.ALTERNATIVE and scorecard.counts(t)[V.NOT] == 0


def test_non_default_parameters_flag_every_row_of_that_chapter(tmp_path):
    from ctr.book import present

    (tmp_path / "a.json").write_text(json.dumps({
        "claims": [row("x", "m1", V.REPRODUCED)],
        present.RUN_KEY: {"parameters": {"n_prompts": 4}, "nondefault": {"n_prompts": 4}}}))
    write(tmp_path, "b", [row("y", "m1", V.REPRODUCED)])
    t = scorecard.table(tmp_path, ("a", "b")).set_index("id")
    assert t.loc["x", "nondefault"] == {"n_prompts": 4} and t.loc["y", "nondefault"] == {}
    h = scorecard.to_html(t.reset_index())
    assert h.count("non-default parameters") == 2 and "n_prompts=4" in h and "make book" in h


def test_export_writes_every_claim_and_model_as_csv_and_json(fabricated, tmp_path):
    import pandas as pd

    t = scorecard.table(fabricated, chapters=("a", "b"))
    out = scorecard.export(tmp_path / "out", {"paper": t}, "abc123 (sha256 x)")
    df = pd.read_csv(out["csv"])
    assert len(df) == 12 and set(df.id) == set(t.id)
    assert set(df.columns) >= {"id", "model", "ours", "interval", "rule", "model_verdict",
                               "claim_verdict", "p_raw", "p_adj"}
    js = json.loads(out["json"].read_text())
    assert js["rules_commit"] == "abc123 (sha256 x)" and len(js["rows"]) == 12
    assert "4-bit" in js["scope"]


def test_verdict_map_has_one_row_per_claim_and_a_column_per_model(fabricated):
    import matplotlib
    matplotlib.use("Agg")
    t = scorecard.table(fabricated, chapters=("a", "b"))
    fig = scorecard.verdict_map(t)
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == len(t) and [x.get_text() for x in ax.get_xticklabels()] == \
        ["m1", "m2", "(no model)", "claim"]


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


def test_html_links_each_chapter_and_folds_the_rule(fabricated):
    t = scorecard.table(fabricated, chapters=("a", "b"))
    h = scorecard.to_html(t)
    assert h.count("<tr>") == 8 and h.count("<tr class='ctr-chapter'>") == 2 and "href='a.html'" in h and "href='b.html'" in h
    assert h.count("<details>") == 7 and "<b>Rule</b>" in h and "95% CI [0, 1]" in h
    assert "2 of 2 models agree" in h
    front = scorecard.to_html(t, details=False)
    assert "<details>" not in front and "m1: x<br>" in front


def test_claims_beyond_the_paper_read_supported(fabricated):
    h = scorecard.to_html(scorecard.table(fabricated, chapters=("a",)), words=scorecard.BEYOND_WORDS)
    assert ">supported</span>" in h and ">not supported</span>" in h
    assert ">reproduced</span>" not in h and ">not reproduced</span>" not in h


def test_front_page_summary_counts_come_from_the_scorecard(fabricated):
    from ctr.book import front

    t = scorecard.table(fabricated, chapters=("a", "b"))
    (fabricated / "timings.json").write_text(json.dumps({
        "a": {"seconds": 90.0, "params": {}, "finished": "x", "smoke": False},
        "b": {"seconds": 30.0, "params": {}, "finished": "x", "smoke": False},
        "index": {"seconds": 999.0, "params": {}, "finished": "x", "smoke": False}}))
    s = front.summary(t, t.iloc[:1], fabricated)
    assert s["n_claims"] == "7" and s["n_chapters"] == "2" and s["n_beyond"] == "1"
    assert s["counts"] == ("2 reproduced, 1 compatible (underpowered), 2 partly, "
                           "1 not reproduced, 1 not testable here")
    assert s["by_chapter"].startswith("a 1 reproduced, 1 compatible (underpowered), 1 partly")
    assert s["beyond_counts"] == "1 supported" and s["models"] == "m1, m2"
    assert s["chapter_minutes"] == "2.0"            # the index page's own time is not counted
    assert "sha256" in s["rules_commit"]
