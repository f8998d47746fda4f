"""Sinks with and without QK-norm (paper Sec. 6), judged by RULES.md's QK-norm rows.

QK-norm is read from the modules (``Model.qk_norm``: the attention normalises queries and keys
with ``q_norm``/``k_norm``), never from a model's name. The sink and VE statistics are the
variance chapter's and the probe rows the probes chapter's, on the same prompts and with the
same rules (``reuse``: from their results files when the parameters match, computed with the
same code otherwise).

- ``not_reduced``: not testable here. One model per arm, of different families, sizes and
  tuning, cannot say what QK-norm does; more prompts would not change that. The numbers stay,
  descriptive, beside the paper's Qwen3 rows.
- ``mechanism``: three parts, combined by the General rule (``V.parts``): the QK-norm model's
  cities probe row under the paper's protocol, the same under the guard (the probes chapter's
  verdicts, Holm within its family), and VE beats random (the variance chapter's part of
  ``ve_20_40``).
"""
from __future__ import annotations

import gc

from ... import arch, rules
from ... import models as M
from ... import verdicts as V
from ..variance import verdicts as VV

PROBE_PARTS = {"probe, paper's protocol": "cities_tag_paper", "probe, guard": "cities_tag_guard"}


def detect(name: str, device: str = "cpu", dtype: str = "float32") -> dict:
    """Whether ``name`` has QK-norm, with the module evidence."""
    m = M.load(name, device=device, dtype=dtype)
    where = arch.arch_of(m.config)
    a = arch.getpath(arch.getpath(m.hf, where.layers)[0], where.attn)
    out = {"model": name, "architecture": m.architecture, "qk_norm": m.qk_norm,
           "evidence": (f"{type(a).__name__} has q_norm={type(a.q_norm).__name__}, "
                        f"k_norm={type(a.k_norm).__name__}") if m.qk_norm
           else f"{type(a).__name__} has no q_norm / k_norm"}
    del m
    gc.collect()
    return out


# --- the rules -----------------------------------------------------------------------------------

def rule_not_reduced() -> str:
    """not_reduced: not testable here (one model per arm, different families, sizes and tuning;
    the numbers are descriptive)."""
    return V.UNTESTABLE


def rule_mechanism(paper_probe: str, guard_probe: str, beats_random: str) -> str:
    """mechanism (under QK-norm): the three parts combined by the General rule."""
    return V.parts(paper_probe, guard_probe, beats_random)


def beats_random(iv: dict) -> str:
    """The variance chapter's "beats random" part of ``ve_20_40`` from its intervals."""
    _, lo, hi = iv["beats_random_median"]
    return VV.rule_beats_random(lo, hi, iv["n"]["beats_random_median"])


# --- the rows -------------------------------------------------------------------------------------

def _paper_qwen3(paper: dict, what: str) -> str:
    pq = paper["qk_norm"]["models"]
    if what == "sinks":
        return "; ".join(f"{k}: {v['sinks_per_head']} sinks per head, VE {v['ve']}"
                         for k, v in pq.items())
    return "; ".join(f"{k}: cities θ_tag / θ_no_tag / θ_activation "
                     + " / ".join(f"{x:.1f}" for x in v["truth_probes"]) + f"%, VE {v['ve']}"
                     for k, v in pq.items())


def not_reduced_row(name: str, s: dict, others: dict[str, dict], paper: dict,
                    settings: str) -> dict:
    """The descriptive not_reduced row of a QK-norm model (``s``: its variance summary;
    ``others``: the models without QK-norm)."""
    ours = f"{s['sinks_per_head']:.2f} sinks per head (QK-norm)"
    if others:
        ours += "; without QK-norm: " + ", ".join(f"{k} {v['sinks_per_head']:.2f}"
                                                   for k, v in others.items())
    else:
        ours += "; no model without QK-norm ran"
    return V.row("not_reduced", name, "sink counts are not reduced by QK-norm",
                 _paper_qwen3(paper, "sinks"), ours, "-", rules.text("not_reduced"),
                 rule_not_reduced(), settings=settings,
                 headline=f"{s['sinks_per_head']:.2f} sinks per head; descriptive",
                 choice="one model per arm, of different families: no comparison is judged")


def mechanism_row(name: str, probe_rows: list[dict], iv: dict, paper: dict,
                  settings: str) -> dict:
    """The mechanism row of a QK-norm model from the probes chapter's rows (``probe_rows``, this
    model's) and the variance chapter's intervals (``iv``)."""
    by_id = {r["id"]: r for r in probe_rows}
    parts = {}
    for label, pid in PROBE_PARTS.items():
        parts[label] = by_id[pid]["verdict"] if pid in by_id else V.UNTESTABLE
    parts["VE beats random"] = beats_random(iv)
    br = iv["beats_random_median"]
    bits = [f"{label}: {by_id[pid]['verdict']} ({by_id[pid].get('headline') or by_id[pid]['ours']})"
            for label, pid in PROBE_PARTS.items() if pid in by_id]
    bits.append(f"median per-head VE minus random {br[0]:+.2f} "
                f"[{br[1]:+.2f}, {br[2]:+.2f}] over {iv['n']['beats_random_median']} prompts")
    notes = [by_id[pid]["note"] for pid in PROBE_PARTS.values()
             if pid in by_id and by_id[pid].get("note")]
    extra = {"note": " ".join(notes)} if notes else {}
    return V.row("mechanism", name, "the mechanism is still present under QK-norm",
                 _paper_qwen3(paper, "mechanism"), "; ".join(bits),
                 f"VE minus random, 95% CI over prompts [{br[1]:+.2f}, {br[2]:+.2f}]",
                 rules.text("mechanism"), rule_mechanism(*parts.values()), parts=parts,
                 settings=settings, headline="; ".join(f"{k}: {v}" for k, v in parts.items()),
                 **extra)


def settings(s: dict, probe_rows: list[dict]) -> str:
    ps = sorted({r["settings"] for r in probe_rows if r.get("settings")
                 and r["id"] in PROBE_PARTS.values()})
    return f"VE: eps {s['eps']}, min_queries {s['min_queries']}" + (
        "; probes: " + " and ".join(ps) if ps else "")


def claims(det: dict, stats: dict, fams: dict, paper: dict) -> list[dict]:
    """The chapter's rows for every QK-norm model: ``det`` = {model: ``detect``}, ``stats`` =
    {model: variance summary with intervals}, ``fams`` = {model: (probe summary, probe rows,
    source)}."""
    qk = [n for n in det if det[n]["qk_norm"]]
    others = {n: stats[n] for n in det if not det[n]["qk_norm"]}
    rows = []
    for name in qk:
        s, rows_p = stats[name], fams[name][1]
        st = settings(s, rows_p)
        rows.append(not_reduced_row(name, s, others, paper, st))
        rows.append(mechanism_row(name, rows_p, s["intervals"], paper, st))
    if not qk:      # nothing to judge: the rows say so, and the scorecard keeps the claims
        why = "no model with QK-norm ran (" + ", ".join(det) + ")"
        rows.append(V.row("not_reduced", "-", "sink counts are not reduced by QK-norm",
                          _paper_qwen3(paper, "sinks"), why, "-", rules.text("not_reduced"),
                          V.UNTESTABLE, headline=why))
        rows.append(V.row("mechanism", "-", "the mechanism is still present under QK-norm",
                          _paper_qwen3(paper, "mechanism"), why, "-", rules.text("mechanism"),
                          V.UNTESTABLE, headline=why))
    return rows


def numbers(det: dict, stats: dict, fams: dict):
    """The measures per model, transposed (one column per model)."""
    import pandas as pd

    out = {}
    for name in det:
        s, (summ, rows_p, src) = stats[name], fams[name]
        iv = s["intervals"]
        c = summ.get("cities", {}).get("paper", {})
        by_id = {r["id"]: r["verdict"] for r in rows_p}
        out[name] = {
            "QK-norm": "yes" if det[name]["qk_norm"] else "no",
            "sinks per head": f"{s['sinks_per_head']:.2f}",
            "share of sinks not at token 0": f"{s['share_sinks_not_bos']:.2f}",
            "median per-head VE (95% CI)": "{:.2f} [{:.2f}, {:.2f}]".format(*iv["ve_median"]),
            "VE minus random, median (95% CI)":
                "{:+.2f} [{:+.2f}, {:+.2f}]".format(*iv["beats_random_median"]),
            "cities θ_tag / θ_no_tag / θ_activation, paper's protocol": (
                f"{c['theta_tag']:.1f} / {c['theta_no_tag']:.1f} / {c['theta_activation']:.1f}%"
                if c.get("layer") is not None else "no head satisfies the rule"),
            "probes chapter: paper's protocol / guard":
                f"{by_id.get('cities_tag_paper', '-')} / {by_id.get('cities_tag_guard', '-')}",
            "source": f"VE: {s.get('_source', '')}; probes: {src}",
        }
    return pd.DataFrame(out)


def paper_numbers(paper: dict):
    """The paper's Qwen3 rows (labelled as the paper's)."""
    import pandas as pd

    pq = paper["qk_norm"]["models"]
    return pd.DataFrame({f"{k} (paper)": {
        "sinks per head": v["sinks_per_head"], "mean VE": v["ve"],
        "cities θ_tag / θ_no_tag / θ_activation": " / ".join(f"{x:.1f}" for x in v["truth_probes"])}
        for k, v in pq.items()})
