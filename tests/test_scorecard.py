"""The scorecard on fabricated results files."""
import json

import pytest

from ctr import results, scorecard


def write(d, chapter, claims):
    (d / f"{chapter}.json").write_text(json.dumps({"claims": claims}))


def row(cid, model, verdict, ours="x"):
    return {"id": cid, "model": model, "claim": f"claim {cid}", "paper": "p", "ours": ours,
            "verdict": verdict}


@pytest.fixture
def fabricated(tmp_path):
    write(tmp_path, "a", [row("all", "m1", "reproduced"), row("all", "m2", "reproduced"),
                          row("mixed", "m1", "reproduced"), row("mixed", "m2", "not reproduced"),
                          row("none", "m1", "not reproduced"), row("none", "m2", "not reproduced")])
    write(tmp_path, "b", [row("half", "m1", "partly"),
                          row("offline", "-", "not testable offline"),
                          row("some", "m1", "not testable (no pairs)"), row("some", "m2", "reproduced")])
    return tmp_path


def test_expected_verdicts(fabricated):
    t = scorecard.table(fabricated, chapters=("a", "b")).set_index("id")
    assert t.verdict.to_dict() == {"all": "reproduced", "mixed": "partly", "none": "not reproduced",
                                   "half": "partly", "offline": "not testable offline",
                                   "some": "reproduced"}
    assert t.loc["mixed", "ours"] == "m1: x; m2: x"
    assert t.loc["offline", "ours"] == "x"


def test_missing_results_file_fails_loudly(fabricated):
    with pytest.raises(results.MissingResults, match="run the 'c' chapter"):
        scorecard.table(fabricated, chapters=("a", "c"))


def test_results_without_claims_or_with_unknown_verdicts_fail(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(ValueError, match="no 'claims'"):
        scorecard.table(tmp_path, chapters=("a",))
    write(tmp_path, "b", [row("x", "m", "sort of")])
    with pytest.raises(ValueError, match="unknown verdict"):
        scorecard.table(tmp_path, chapters=("b",))


def test_html_links_each_chapter(fabricated):
    h = scorecard.to_html(scorecard.table(fabricated, chapters=("a", "b")))
    assert h.count("<tr>") == 7 and "href='a.html'" in h and "href='b.html'" in h
