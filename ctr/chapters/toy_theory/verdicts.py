"""The toy-theory chapter's verdicts: RULES.md, "Toy theory (Sec. 7)", applied to the runs of
``toy_theory.train_runs``, and the tables and sentences the chapter shows around them.

Rows (each carries ``rules.text(id)``): success_init_10, success_init_6, success_init_1 (Fisher
against the paper's k/10, Holm over the three, Newcombe for "reproduced"), success_trend
(Cochran-Armitage on ours, the interaction test beside it), emergence (Wilson). The width-4
model and the sensitivity to the choices the paper leaves open ("unstated") are tables
without verdicts.
"""
from __future__ import annotations

from ... import definitions as defs
from ... import rules, stats
from ... import verdicts as V
from .. import toy_theory as toy

MARGIN = 0.35          # RULES.md: Newcombe CI of (ours - paper) within [-0.35, 0.35]
ALPHA = 0.05
SCORES = (10.0, 6.0, 1.0)


def counts(runs: list[dict], inits=SCORES) -> dict:
    """{init: (successes, runs)} over `runs`."""
    out = {}
    for s in inits:
        g = [r for r in runs if r["s_tag_init"] == s]
        out[float(s)] = (sum(bool(r["success"]) for r in g), len(g))
    return out


def best_init(c: dict, order=SCORES) -> float:
    """The initial s_tag with the highest success rate in counts `c` ({init: (k, n)}); ties go
    to the first in `order` (the paper's default, 10, first). The multi-head chapter trains at
    this init beside 10."""
    live = [s for s in order if c.get(s, (0, 0))[1]]
    if not live:
        raise ValueError("no runs to choose an initial s_tag from")
    return max(live, key=lambda s: (c[s][0] / c[s][1], -live.index(s)))


def paper_counts(paper: dict) -> dict:
    """{init: (successes, runs)} of the paper (results.paper()["toy"])."""
    return {float(p["s_tag_init"]): (p["successes"], p["runs"]) for p in paper["success"]}


# --- rules -------------------------------------------------------------------------------------

def rule_success(p_adj: float, k: int, n: int, pk: int, pn: int) -> str:
    """success_init_k: not reproduced if Fisher's exact test (two-sided, ours vs the paper's
    k/10), Holm-adjusted over the three inits, gives p < 0.05; reproduced if the Newcombe 95% CI
    of (ours - paper) lies within [-0.35, 0.35]; compatible otherwise."""
    if not n or not pn:
        return V.UNTESTABLE
    if p_adj < ALPHA:
        return V.NOT
    return V.by_interval(*stats.newcombe(k, n, pk, pn), -MARGIN, MARGIN)


def rule_trend(ks, ns, inits=SCORES) -> str:
    """success_trend: Cochran-Armitage on ours with the init values as scores: reproduced if the
    one-sided p < 0.05 for a rise; not reproduced if the one-sided p < 0.05 for a fall;
    compatible otherwise."""
    if len(inits) < 2 or not sum(ns):
        return V.UNTESTABLE
    t = stats.cochran_armitage(ks, ns, inits)
    if t["p_rise"] < ALPHA:
        return V.REPRODUCED
    if t["p_fall"] < ALPHA:
        return V.NOT
    return V.COMPATIBLE


def rule_emergence(k: int, n: int) -> str:
    """emergence: among n successful runs, k in which the mechanism detector fires and the
    solution is Theorem 7.1's. Reproduced if the Wilson CI's lower end >= 0.5; not reproduced
    if its upper end < 0.5; compatible otherwise; not testable with no success."""
    if not n:
        return V.UNTESTABLE
    return V.by_interval(*stats.wilson(k, n), low=0.5)


def emerged(run: dict) -> bool:
    """A success counted for the emergence claim: the detector fires and [SEP]'s final norm
    exceeds the numbers' constant (Theorem 7.1's solution)."""
    return bool(run["mechanism"]["mechanism"]) and run["solution"] == "Theorem 7.1"


# --- rows ----------------------------------------------------------------------------------------

def success_tests(runs: list[dict], paper: dict) -> list[dict]:
    """Per init: our count, the paper's, Fisher's two-sided p, its Holm adjustment over the
    inits, the Newcombe interval of (ours - paper) and the verdict."""
    ours, theirs = counts(runs), paper_counts(paper)
    inits = [s for s in theirs if ours.get(s, (0, 0))[1]]
    p_raw = [stats.fisher(*ours[s], *theirs[s]) for s in inits]
    out = []
    for s, p, pa in zip(inits, p_raw, stats.holm(p_raw)):
        (k, n), (pk, pn) = ours[s], theirs[s]
        out.append({"init": s, "k": k, "n": n, "pk": pk, "pn": pn, "p_raw": p, "p_adj": pa,
                    "wilson": stats.wilson(k, n), "newcombe": stats.newcombe(k, n, pk, pn),
                    "verdict": rule_success(pa, k, n, pk, pn)})
    return out


def trend(runs: list[dict], paper: dict, inits=SCORES) -> dict:
    """Cochran-Armitage on ours and on the paper's counts, and the interaction LR test."""
    ours, theirs = counts(runs, inits), paper_counts(paper)
    ks, ns = [ours[s][0] for s in inits], [ours[s][1] for s in inits]
    pks, pns = [theirs[s][0] for s in inits], [theirs[s][1] for s in inits]
    return {"ours": stats.cochran_armitage(ks, ns, inits),
            "paper": stats.cochran_armitage(pks, pns, inits),
            "interaction": stats.interaction_lr(ks, ns, pks, pns, inits),
            "verdict": rule_trend(ks, ns, inits), "ks": ks, "ns": ns}


def emergence(runs: list[dict]) -> dict:
    """The emergence count among the successful runs, with the solutions they found."""
    ok = [r for r in runs if r["success"]]
    k = sum(emerged(r) for r in ok)
    sol = {s: sum(r["solution"] == s for r in ok) for s in ("Theorem 7.1", "[SEP] near 0",
                                                           "neither")}
    return {"k": k, "n": len(ok), "solutions": sol,
            "mechanism": sum(bool(r["mechanism"]["mechanism"]) for r in ok),
            "wilson": stats.wilson(k, len(ok)) if ok else None,
            "verdict": rule_emergence(k, len(ok))}


def claim_rows(runs: list[dict], paper: dict, settings: str, choice: str) -> list[dict]:
    """The paper / ours / verdict rows of the paper's variant (width 2, default setting).
    paper: results.paper()["toy"]; settings and choice: the row fields RULES.md asks for."""
    label = toy.VARIANTS["width2"]["label"]
    rows = []
    for t in success_tests(runs, paper):
        s = t["init"]
        rows.append(V.row(
            f"success_init_{s:g}", label,
            f"success rate (held-out R² > 0.9) with s_tag initialised at {s:g}",
            f"{t['pk']}/{t['pn']}", f"{t['k']}/{t['n']} (Wilson [{t['wilson'][0]:.2f}, "
            f"{t['wilson'][1]:.2f}])",
            V.interval(*t["newcombe"], what="95% Newcombe CI ours - paper"),
            rules.text(f"success_init_{s:g}"), t["verdict"], settings=settings, choice=choice,
            p_raw=t["p_raw"], p_adj=t["p_adj"]))
    tr = trend(runs, paper)
    ia = tr["interaction"]
    rows.append(V.row(
        "success_trend", label, "success rises with the initial s_tag",
        " > ".join(f"{k}/{n}" for k, n in paper_counts(paper).values())
        + f" (z = {tr['paper']['z']:+.2f})",
        ", ".join(f"{k}/{n}" for k, n in zip(tr["ks"], tr["ns"])),
        f"Cochran-Armitage z = {tr['ours']['z']:+.2f}, one-sided p (rise) = "
        f"{tr['ours']['p_rise']:.3g}, (fall) = {tr['ours']['p_fall']:.3g}",
        rules.text("success_trend"), tr["verdict"], settings=settings, choice=choice,
        note=f"beside it, no verdict: ours x init interaction against the paper's counts, "
             f"likelihood ratio {ia['lr']:.2f}, p = {ia['p']:.3g}"))
    em = emergence(runs)
    rows.append(V.row(
        "emergence", label, "successful runs show catch, tag, release with Theorem 7.1's "
        "solution (Fig. 7)", "in all successful runs",
        f"{em['k']} of {em['n']} successful runs ({em['solutions']['[SEP] near 0']} with [SEP] "
        "near 0)", V.interval(*em["wilson"], what="95% Wilson CI") if em["n"] else "-",
        rules.text("emergence"), em["verdict"], settings=settings + f", eps {defs.EPS}"))
    return rows


def success_table(runs: list[dict], paper: dict) -> list[dict]:
    """The chapter's success table: one row per init, with the verdict of its rule."""
    tests = {t["init"]: t for t in success_tests(runs, paper)}
    out = []
    for s, (k, n) in counts(runs).items():
        g = [r for r in runs if r["s_tag_init"] == s]
        ok = [r for r in g if r["success"]]
        t = tests.get(s)
        fin = sorted(r["s_tag_final"] for r in g)
        out.append({
            "s_tag initial value": f"{s:g}", "paper": f"{t['pk']}/{t['pn']}" if t else "-",
            "ours": f"{k}/{n}", "95% Wilson": f"[{t['wilson'][0]:.2f}, {t['wilson'][1]:.2f}]"
            if t else "-",
            "Fisher p (Holm)": f"{t['p_raw']:.3f} ({t['p_adj']:.3f})" if t else "-",
            "ours − paper (Newcombe)": f"[{t['newcombe'][0]:+.2f}, {t['newcombe'][1]:+.2f}]"
            if t else "-", "verdict": t["verdict"] if t else "-",
            "mechanism, Theorem 7.1 / [SEP] near 0": (
                f"{sum(emerged(r) for r in ok)} / "
                f"{sum(r['solution'] == '[SEP] near 0' for r in ok)} of {len(ok)}"),
            "final s_tag: median [range]": f"{fin[len(fin) // 2]:.2f} [{fin[0]:.2f}, {fin[-1]:.2f}]"
            if fin else "-"})
    return out


def descriptive_table(runs: list[dict], paper: dict) -> list[dict]:
    """The width-4 model's counts beside the paper's, with Wilson intervals: no verdict."""
    theirs = paper_counts(paper)
    out = []
    for s, (k, n) in counts(runs).items():
        lo, hi = stats.wilson(k, n)
        ok = [r for r in runs if r["s_tag_init"] == s and r["success"]]
        out.append({"s_tag initial value": f"{s:g}",
                    "paper": "{}/{}".format(*theirs[s]) if s in theirs else "-",
                    "ours": f"{k}/{n}", "95% Wilson": f"[{lo:.2f}, {hi:.2f}]",
                    "mechanism | success": f"{sum(bool(r['mechanism']['mechanism']) for r in ok)}"
                                           f"/{len(ok)}"})
    return out


# --- the choices the paper leaves open (RULES.md: unstated, descriptive) ------------------------

def sensitivity(runs: list[dict], settings, inits=SCORES) -> list[dict]:
    """Per setting: the success counts at each init, the Cochran-Armitage trend and whether it
    shows the paper's rise (z > 0 with one-sided p < 0.05). No verdict."""
    out = []
    for name in settings:
        c = counts([r for r in runs if r["setting"] == name], inits)
        ks, ns = [c[s][0] for s in inits], [c[s][1] for s in inits]
        if not sum(ns):
            continue
        t = stats.cochran_armitage(ks, ns, inits)
        out.append({"setting": name, **toy.setting(name), "counts": dict(zip(inits, zip(ks, ns))),
                    "z": t["z"], "p_rise": t["p_rise"],
                    "rises": bool(t["z"] > 0 and t["p_rise"] < ALPHA)})
    return out


def sensitivity_table(rows: list[dict], paper: dict) -> list[dict]:
    """The sensitivity rows as a table (settings x inits), the paper's counts first."""
    theirs = paper_counts(paper)
    t = stats.cochran_armitage(*zip(*theirs.values()), list(theirs))
    out = [{"setting": "the paper", **{f"init {s:g}": f"{k}/{n}" for s, (k, n) in theirs.items()},
            "trend z": f"{t['z']:+.2f}", "one-sided p (rise)": f"{t['p_rise']:.3f}",
            "paper's rising trend": "yes" if t["z"] > 0 and t["p_rise"] < ALPHA else "no"}]
    for r in rows:
        out.append({"setting": r["setting"],
                    **{f"init {s:g}": f"{k}/{n}" for s, (k, n) in r["counts"].items()},
                    "trend z": f"{r['z']:+.2f}", "one-sided p (rise)": f"{r['p_rise']:.3f}",
                    "paper's rising trend": "yes" if r["rises"] else "no"})
    return out


# --- sentences -----------------------------------------------------------------------------------

def in_words(runs: list[dict], paper: dict) -> str:
    """What the success table says, in one paragraph (Markdown)."""
    tr = trend(runs, paper)
    z, p_rise, p_fall = tr["ours"]["z"], tr["ours"]["p_rise"], tr["ours"]["p_fall"]
    direction = ("rises" if p_rise < ALPHA else "falls" if p_fall < ALPHA
                 else "shows no trend at the 0.05 level")
    em = emergence(runs)
    ends = {s: sorted(r["s_tag_final"] for r in runs if r["s_tag_init"] == s)
            for s in counts(runs)}
    near = em["solutions"]["[SEP] near 0"]
    return (f"Success {direction} with the initial $s_\\text{{tag}}$ (Cochran-Armitage $z$ = "
            f"{z:+.2f}; the paper's counts give {tr['paper']['z']:+.2f}). "
            + " ".join(f"From {s:g}, $s_\\text{{tag}}$ ended between {v[0]:.2f} and {v[-1]:.2f}."
                       for s, v in ends.items() if v)
            + f" Of the {em['n']} successful runs, {em['mechanism']} pass all three mechanism "
            f"checks, {em['solutions']['Theorem 7.1']} end with [SEP] longer than the numbers' "
            f"constant (Theorem 7.1's solution) and {near} with [SEP] shorter than half of it"
            + (": [SEP] near the zero vector, set apart from the numbers by a *smaller* second "
               "coordinate, another solution." if near else "."))


def closing(rows: list[dict], sens: list[dict], timing: str) -> str:
    """The closing note: each verdict with the number that decided it, how many settings show
    the paper's rising trend, and the chapter's time (Markdown)."""
    by = {r["id"]: r for r in rows}
    parts = []
    for rid in ("success_init_10", "success_init_6", "success_init_1"):
        if rid in by:
            r = by[rid]
            parts.append(f"at {rid.rsplit('_', 1)[1]}: {r['ours'].split(' ')[0]} against the "
                         f"paper's {r['paper']} (Fisher p = {r['p_raw']:.3f}, Holm "
                         f"{r['p_adj']:.3f}; {r['interval']}): **{r['verdict']}**")
    text = "**Measured in this build.** Success rates " + "; ".join(parts) + ". "
    if "success_trend" in by:
        t = by["success_trend"]
        text += f"Trend: {t['interval']}: **{t['verdict']}** ({t['note']}). "
    if "emergence" in by:
        e = by["emergence"]
        text += f"Emergence: {e['ours']}: **{e['verdict']}**. "
    n_rise = sum(r["rises"] for r in sens)
    text += (f"The paper's rising trend (z > 0, one-sided p < 0.05) appears in {n_rise} of the "
             f"{len(sens)} training settings of the sensitivity table. ")
    return text + timing
