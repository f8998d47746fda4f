"""The QK-norm chapter's rules (RULES.md, QK-norm): every outcome from fabricated inputs, and
every outcome the chapter can return on real data from the probes' and the variance chapter's
measurement code run on planted cases (the rows the QK-norm chapter reuses)."""
import pytest
from test_probes import measured, planted
from test_variance import judge, ve_case

from ctr import results, rules
from ctr import verdicts as V
from ctr.chapters.probes import verdicts as PV
from ctr.chapters import qknorm

R, P, C, N, U = V.REPRODUCED, V.PARTLY, V.COMPATIBLE, V.NOT, V.UNTESTABLE
PAPER = results.paper()


# --- fabricated inputs -------------------------------------------------------------------------

def test_not_reduced_is_not_testable_whatever_the_numbers():
    # one model per arm, of different families: the rule has no outcome but "not testable here"
    assert qknorm.rule_not_reduced() == U
    s = {"sinks_per_head": 0.1}
    row = qknorm.not_reduced_row("qk", s, {"other": {"sinks_per_head": 9.0}}, PAPER, "eps 0.2")
    assert row["verdict"] == U and "0.10 sinks per head" in row["ours"] and "other 9.00" in row["ours"]
    assert row["rule"] == rules.text("not_reduced")


@pytest.mark.parametrize("parts, want", [
    ((R, R, R), R),     # reproduced: every part
    ((R, R, N), P),     # partly: probes hold, VE does not beat random
    ((R, C, R), C),     # compatible: one part underpowered
    ((N, N, N), N),     # not reproduced: every part fails
    ((N, C, R), N),     # not reproduced: a failing part beside an underpowered one
    ((U, R, R), U),     # not testable: the QK-norm model has no probe row
])
def test_rule_mechanism_every_outcome_from_fabricated_parts(parts, want):
    assert qknorm.rule_mechanism(*parts) == want


@pytest.mark.parametrize("iv, want", [((0.1, 0.05, 0.2), R), ((0.0, -0.1, 0.2), C),
                                      ((-0.2, -0.3, -0.1), N)])
def test_beats_random_reads_the_variance_chapters_interval(iv, want):
    assert qknorm.beats_random({"beats_random_median": iv, "n": {"beats_random_median": 30}}) == want
    # fewer than 20 prompts: not testable (the General floor)
    assert qknorm.beats_random({"beats_random_median": iv, "n": {"beats_random_median": 12}}) == U


def test_without_a_qk_norm_model_both_rows_say_not_testable_and_why():
    det = {"smol": {"qk_norm": False}}
    rows = qknorm.claims(det, {"smol": {"sinks_per_head": 2.0}}, {"smol": ({}, [], "x")}, PAPER)
    assert [r["id"] for r in rows] == ["not_reduced", "mechanism"]
    assert all(r["verdict"] == U and "no model with QK-norm ran (smol)" in r["ours"] for r in rows)


# --- the real measurement code on planted cases ------------------------------------------------

def probe_rows(tag_sep: float, seed: int = 0) -> list[dict]:
    """The probes chapter's claim rows of one planted model: every row of its Holm family
    measured on planted features (the cities rows carry a tag of separation ``tag_sep``)."""
    tasks = {}
    for i, (task, prot) in enumerate(PV.FAMILY):
        # the cities rows (both protocols) on one planted draw; the rest strong, own draws
        sep, s = (tag_sep, seed) if task == "cities" else (3.0, seed + i)
        tasks.setdefault(task, {})[prot] = measured(*planted(tag_sep=sep, seed=s))
    return [r for r in PV.claim_rows({"qk": tasks}, PAPER, guard=1) if r["model"] == "qk"]


def mechanism(tag_sep: float, ve_targets, Dh=32, seed=0):
    rows_p = probe_rows(tag_sep, seed)
    _, s, iv = judge(ve_case(ve_targets, Dh=Dh))
    return qknorm.mechanism_row("qk", rows_p, iv, PAPER, "planted")


def test_mechanism_reproduced_on_planted_tags_and_values():
    row = mechanism(3.0, [0.3])
    assert row["parts"] == {"probe, paper's protocol": R, "probe, guard": R, "VE beats random": R}
    assert row["verdict"] == R


def test_mechanism_partly_when_the_values_explain_no_more_than_random_on_a_planted_case():
    # VE 0.12 with 8 dimensions: a random 1-d subspace explains about 0.3 (test_variance)
    row = mechanism(3.0, [0.12], Dh=8)
    assert row["parts"]["VE beats random"] == N and row["verdict"] == P


def test_mechanism_compatible_on_a_weak_planted_tag():
    row = mechanism(0.4, [0.3], seed=1)
    assert C in row["parts"].values() and N not in row["parts"].values()
    assert row["verdict"] == C


def test_mechanism_not_reproduced_when_tags_carry_nothing_and_values_lose_to_random():
    row = mechanism(0.0, [0.12], Dh=8, seed=4)
    assert row["parts"]["VE beats random"] == N
    assert N in (row["parts"]["probe, paper's protocol"], row["parts"]["probe, guard"])
    assert row["verdict"] == N


def test_mechanism_not_testable_with_fewer_than_20_prompts_on_a_planted_case():
    rows_p = probe_rows(3.0)
    _, _, iv = judge(ve_case([0.3], P=12))
    assert qknorm.mechanism_row("qk", rows_p, iv, PAPER, "planted")["verdict"] == U


def test_detect_reads_qk_norm_from_the_modules():
    d = qknorm.detect("tiny-planted-llama")
    assert d["qk_norm"] is False and "no q_norm" in d["evidence"]
