"""RULES.md: the copy is the project's pre-registered file, every row parses, ids resolve."""
from pathlib import Path

import pytest

from ctr import rules

SHARED = Path(__file__).resolve().parents[2] / "shared" / "paper" / "RULES.md"


@pytest.mark.skipif(not SHARED.exists(), reason="the shared rules file is not on this machine")
def test_the_copy_is_the_preregistered_file_byte_for_byte():
    assert rules.PATH.read_bytes() == SHARED.read_bytes()


def test_every_rule_row_parses_with_its_section():
    rows = rules.table()
    ids = [r["id"] for r in rows]
    for expected in ("two_sinks", "clusters", "persist", "own_sinks", "sinks_1_2", "ve_20_40",
                     "up_to_70", "sweep", "tag_orth_cross", "tag_orth_within", "tag_token",
                     "*_tag_*", "tag_vs_activation", "base_sinks", "reasoning", "not_reduced",
                     "mechanism", "success_init_k", "success_trend", "emergence", "unstated",
                     "one_head_fails", "two_heads_needed", "roles", "control", "tags_lm_bos",
                     "tags_lm_mid", "tags_lm_specific", "swap_*"):
        assert expected in ids
    assert len(ids) == len(set(ids))
    assert all(r["rule"] and r["section"] for r in rows)


def test_patterns_placeholders_and_references_resolve():
    assert rules.get("success_init_6")["id"] == "success_init_k"
    assert rules.get("swap_bos_cities")["id"] == "swap_*"
    assert rules.get("cities_tag_paper")["id"] == "*_tag_*"
    assert rules.get("tag_vs_activation")["id"] == "tag_vs_activation"   # exact before pattern
    assert rules.get("tag_vs_activation_cities")["id"] == "tag_vs_activation"   # per task
    assert rules.text("tag_orth_within").startswith("same rule as tag_orth_cross: two parts")
    assert "ordered rule as tags_lm_bos: primary reading" in rules.text("tags_lm_mid")
    assert "|s_tag|" in rules.text("emergence")          # a pipe inside a cell is kept
    with pytest.raises(rules.UnknownRule):
        rules.get("sweep_alt")


def test_a_malformed_row_is_an_error(tmp_path):
    f = tmp_path / "RULES.md"
    f.write_text("## S\n\n| id | rule |\n|---|---|\n| a | one | two |\n")
    with pytest.raises(ValueError, match="3 cells"):
        rules.table(f)


def test_commit_names_a_version_even_without_git(tmp_path):
    f = tmp_path / "RULES.md"
    f.write_text("## S\n")
    assert rules.commit(f).startswith("no git (sha256 ")
    assert "sha256" in rules.commit()
