"""The multi-head toy chapter's verdicts: RULES.md, "Multi-head toy (rebuttal)", applied to the
runs of ``toy_multihead.train_heads``, and the tables and sentences around them.

Rows (each carries ``rules.text(id)``), one per initial s_tag (the "model" column), combined
across the inits by the across-models rule (``verdicts.combine``, as the scorecard does):
one_head_fails, two_heads_needed, roles (by ablation, on two-head runs at low loss; the
attention-pattern reading beside it, no verdict).
"""
from __future__ import annotations

import torch

from ... import rules, stats
from ... import verdicts as V
from .. import toy_multihead as mh
from ..toy_model import r2
from ..toy_theory import sweep_construction

ALPHA = 0.05
IDS = ("one_head_fails", "two_heads_needed", "roles", "roles_alt")
ALT_RULE = ("alternative reading, not pre-registered: layer-1 roles by attention pattern (the "
            "paper states them as sinks: one head with a sink at [SEP], one with sinks at [SEP] "
            "and [SEP2]), layer-2 roles by ablation as in the rule; the same Wilson thresholds "
            "on the low-loss two-head runs. Ablating a layer-1 tag moves every layer-2 head that "
            "reads it, so by ablation a correct layer-1 head can fail the 0.8 share")


def paper_roles_alt(run: dict) -> bool:
    """The alternative reading's four roles: layer 1 by attention pattern, layer 2 by
    ablation."""
    return (sorted(h["role"] for h in run["roles"]["layer1"]) == sorted(mh.ROLES_L1)
            and sorted(h["carries"] for h in run["function"]["layer2"]) == sorted(mh.CARRIES))


def label(s_tag_init: float) -> str:
    """The "model" column of a row: the initial s_tag it was judged at."""
    return f"s_tag init {s_tag_init:g}"


def low_counts(runs: list[dict], heads: int) -> tuple[int, int]:
    """(runs at low loss, runs) with `heads` heads per layer."""
    g = [r for r in runs if r["heads"] == heads]
    return sum(bool(r["low_loss"]) for r in g), len(g)


def rule_one_head(k1: int, n1: int, k2: int) -> str:
    """one_head_fails: not testable here if no two-head run reaches low loss (k2 = 0);
    otherwise reproduced if 0 one-head runs reach it; not reproduced if the one-head share's
    Wilson CI lower end > 0.1; compatible otherwise."""
    if not k2 or not n1:
        return V.UNTESTABLE
    if k1 == 0:
        return V.REPRODUCED
    return V.NOT if stats.wilson(k1, n1)[0] > 0.1 else V.COMPATIBLE


def rule_two_heads(k2: int, n2: int, k1: int, n1: int) -> str:
    """two_heads_needed: Fisher exact, one-sided (two heads reach low loss more often):
    reproduced if p < 0.05; not reproduced if the opposite one-sided test gives p < 0.05;
    compatible otherwise; not testable if no run of either reaches low loss."""
    if not (k1 + k2) or not n1 or not n2:
        return V.UNTESTABLE
    if stats.fisher(k2, n2, k1, n1, "greater") < ALPHA:
        return V.REPRODUCED
    if stats.fisher(k2, n2, k1, n1, "less") < ALPHA:
        return V.NOT
    return V.COMPATIBLE


def rule_roles(k: int, n: int) -> str:
    """roles: among n two-head runs at low loss, k with the paper's four roles by ablation:
    reproduced if the Wilson CI's lower end > 0.5 (needs at least 4 such runs); not reproduced
    if its upper end < 0.5; compatible otherwise; not testable without such runs."""
    return V.by_interval(*stats.wilson(k, n), low=0.5, strict=True) if n else V.UNTESTABLE


def claim_rows(runs: list[dict], paper: dict, threshold: float, settings: str,
               choice: str) -> list[dict]:
    """The rows of every initial s_tag in `runs`. paper: results.paper()["multihead_toy"];
    threshold: the low-loss R^2."""
    rows = []
    pk, pn = paper["one_head"]["successes"], paper["one_head"]["runs"]
    for s in sorted({r["s_tag_init"] for r in runs}, reverse=True):
        g = [r for r in runs if r["s_tag_init"] == s]
        (k1, n1), (k2, n2) = low_counts(g, 1), low_counts(g, 2)
        rows.append(V.row(
            "one_head_fails", label(s), "with one head per layer no run reaches low loss",
            f"{pk}/{pn}", f"{k1}/{n1} one-head runs at low loss ({k2}/{n2} with two heads)",
            V.interval(*stats.wilson(k1, n1), what="95% Wilson CI") if n1 else "-",
            rules.text("one_head_fails"), rule_one_head(k1, n1, k2), settings=settings,
            choice=choice, note=f"low loss: held-out R² > {threshold:.4f}"))
        p = stats.fisher(k2, n2, k1, n1, "greater") if n1 and n2 else None
        rows.append(V.row(
            "two_heads_needed", label(s), "two heads per layer reach low loss more often than "
            "one", f"low loss with two heads; {pk}/{pn} with one",
            f"{k2}/{n2} vs {k1}/{n1}", f"one-sided Fisher p = {p:.3g}" if p is not None else "-",
            rules.text("two_heads_needed"), rule_two_heads(k2, n2, k1, n1), settings=settings,
            choice=choice, note=f"low loss: held-out R² > {threshold:.4f}"))
        low = [r for r in g if r["heads"] == 2 and r["low_loss"]]
        k = sum(bool(r["function"]["paper_roles"]) for r in low)
        kp = sum(bool(r["roles"]["paper_roles"]) for r in low)
        rows.append(V.row(
            "roles", label(s), "at low loss the two heads of each layer take the paper's four "
            "roles (by ablation)", paper["two_heads"],
            f"{k} of {len(low)} low-loss two-head runs",
            V.interval(*stats.wilson(k, len(low)), what="95% Wilson CI") if low else "-",
            rules.text("roles"), rule_roles(k, len(low)), settings=settings, choice=choice,
            note=f"beside it, no verdict: {kp} of {len(low)} by attention pattern"))
        ka = sum(paper_roles_alt(r) for r in low)
        rows.append(V.row(
            "roles_alt", label(s), "at low loss the heads take the paper's four roles (layer 1 "
            "by attention pattern, layer 2 by ablation)", paper["two_heads"],
            f"{ka} of {len(low)} low-loss two-head runs",
            V.interval(*stats.wilson(ka, len(low)), what="95% Wilson CI") if low else "-",
            ALT_RULE, rule_roles(ka, len(low)), settings=settings, choice=choice,
            reading=V.ALTERNATIVE))
    return rows


def combined(rows: list[dict]) -> list[dict]:
    """Each claim's verdict over the inits (RULES.md, across models), the per-init verdicts
    beside it."""
    out = []
    for cid in IDS:
        g = [r for r in rows if r["id"] == cid]
        if g:
            out.append({"claim": cid.replace("_alt", " (alternative reading)").replace("_", " "),
                        "per init": "; ".join(f"{r['model']}: {r['verdict']}" for r in g),
                        "verdict": V.combine([r["verdict"] for r in g])})
    return out


# --- tables and sentences ------------------------------------------------------------------------

def count_table(runs: list[dict], threshold: float) -> list[dict]:
    """Per initial s_tag and head count: runs at low loss, the best final and best-reached R^2,
    and what the runs' predictions carry."""
    out = []
    for s in sorted({r["s_tag_init"] for r in runs}, reverse=True):
        for h in sorted({r["heads"] for r in runs}, reverse=True):
            g = [r for r in runs if r["s_tag_init"] == s and r["heads"] == h]
            if not g:
                continue
            k = sum(bool(r["low_loss"]) for r in g)
            lo, hi = stats.wilson(k, len(g))
            fin = [r["r2"] for r in g if r["r2"] == r["r2"]]
            best = [r["best_val_r2"] for r in g if r["best_val_r2"] == r["best_val_r2"]]
            kinds = {}
            for r in g:
                kinds[r["learned"]["carries"]] = kinds.get(r["learned"]["carries"], 0) + 1
            out.append({"s_tag initial value": f"{s:g}", "heads per layer": h,
                        f"low loss (R² > {threshold:.4f})": f"{k}/{len(g)}",
                        "95% Wilson": f"[{lo:.2f}, {hi:.2f}]",
                        "best final R²": f"{max(fin):.4f}" if fin else "-",
                        "best R² reached": f"{max(best):.4f}" if best else "-",
                        "prediction carries": ", ".join(f"{c} ({n})" for c, n in
                                                        sorted(kinds.items()))})
    return out


def closing(rows: list[dict], runs: list[dict], short: dict, threshold: float,
            timing: str) -> str:
    """The closing note (Markdown): R^2_short and the threshold, the low-loss counts, each
    verdict and the combined one, and what the runs learned where none reached low loss."""
    text = (f"**Measured in this build.** The best one-component shortcut (y fitted on "
            f"{short['component']} alone) reaches held-out R² = {short['r2_short']:.4f}, so low "
            f"loss is R² > {threshold:.4f}. ")
    for s in sorted({r["s_tag_init"] for r in runs}, reverse=True):
        g = [r for r in runs if r["s_tag_init"] == s]
        parts = []
        for h in (2, 1):
            k, n = low_counts(g, h)
            if n:
                best = max((r["r2"] for r in g if r["heads"] == h and r["r2"] == r["r2"]),
                           default=float("nan"))
                parts.append(f"{k}/{n} runs with {h} head{'s' if h > 1 else ''} reach low loss "
                             f"(best final R² {best:.4f})")
        text += f"From s_tag = {s:g}: " + "; ".join(parts) + ". "
    for c in combined(rows):
        text += f"*{c['claim']}*: **{c['verdict']}** ({c['per init']}). "
    if not any(r["low_loss"] for r in runs if r["heads"] == 2):
        kinds = {}
        for r in runs:
            if r["heads"] == 2:
                kinds[r["learned"]["carries"]] = kinds.get(r["learned"]["carries"], 0) + 1
        text += ("No two-head run reached low loss, so by the rule the multi-head claims are "
                 "*not testable here*: the task was not learned. What the two-head runs' "
                 "predictions carry instead: " + ", ".join(f"{c} ({n} runs)" for c, n in
                                                          sorted(kinds.items())) + ". ")
    return text + timing


def threshold_text(short: dict, threshold: float) -> str:
    """R^2_short and the low-loss threshold, in one sentence (Markdown)."""
    name = {"m_after": "$m_\\text{after}$", "m_between": "$m_\\text{between}$"}
    other = min(short["fits"].values())
    return (f"$R^2_\\text{{short}}$ = {short['r2_short']:.4f} ($y$ fitted on "
            f"{name[short['component']]} alone; on the other component alone: {other:.4f}), so "
            f"**low loss is held-out $R^2$ > {threshold:.4f}**.")


@torch.no_grad()
def construction_table(test, s_grid, threshold: float, eps: float, tv_max: float) -> list:
    """The two-head construction at each s_tag: largest error (float64), R^2, low loss, and the
    roles both detectors read."""
    err = {r["s_tag"]: r["max_abs_error"] for r in sweep_construction(
        mh.construction, s_grid, test, target=mh.target)}
    out = []
    for s in s_grid:
        m = mh.construction(s)
        pat, fun = mh.roles(m, test, eps, tv_max)[0], mh.functional_roles(m, test)[0]
        score = float(r2(m(test.x, test.kind), test.y)[0])
        out.append({"s_tag": s, "largest |error|": err[s], "R²": score,
                    "low loss": score > threshold,
                    "layer 1 (pattern)": " / ".join(h["role"] for h in pat["layer1"]),
                    "layer 2 (pattern)": " / ".join(h["role"] for h in pat["layer2"]),
                    "layer 1 carries": " / ".join(h["carries"] for h in fun["layer1"]),
                    "layer 2 carries": " / ".join(h["carries"] for h in fun["layer2"]),
                    "paper's roles (ablation)": fun["paper_roles"],
                    "paper's roles (pattern)": pat["paper_roles"]})
    return out


def run_table(runs: list[dict]) -> list[dict]:
    """Every run, with what it reached and the roles both detectors read (JSON-ready)."""
    def nan(v):
        return None if v != v else round(v, 6)

    return [{"s_tag initial value": r["s_tag_init"], "heads per layer": r["heads"],
             "run": r["run"], "R²": nan(r["r2"]), "best R² reached": nan(r["best_val_r2"]),
             "epochs": r["epochs"], "low loss": r["low_loss"],
             "prediction carries": r["learned"]["carries"],
             "layer 1 (pattern)": " / ".join(h["role"] for h in r["roles"]["layer1"]),
             "layer 2 (pattern)": " / ".join(h["role"] for h in r["roles"]["layer2"]),
             "layer 1 carries": " / ".join(h["carries"] for h in r["function"]["layer1"]),
             "layer 2 carries": " / ".join(h["carries"] for h in r["function"]["layer2"]),
             "paper's roles (ablation)": r["function"]["paper_roles"],
             "paper's roles (pattern)": r["roles"]["paper_roles"],
             "paper's roles (layer 1 pattern, layer 2 ablation)": paper_roles_alt(r)}
            for r in runs]


def shown_text(run: dict, how: str) -> str:
    """What the shown run is and what its heads' ablations give (Markdown)."""
    f = run["function"]
    return (f"Two-head run {run['run']} from $s_\\text{{tag}}$ = {run['s_tag_init']:g} "
            f"(held-out $R^2$ = {run['r2']:.4f}; {how}). Ablation coefficients "
            "$(b_\\text{after}, b_\\text{between})$ and the share of the explained change on "
            "$m_\\text{between}$: " + "; ".join(
                f"layer {l[-1]} head {h['head']}: ({h['b_after']:.2f}, {h['b_between']:.2f}), "
                f"{h['share_between']:.2f}, carries {h['carries']}"
                for l in ("layer1", "layer2") for h in f[l]) + ".")


def role_text(runs: list[dict]) -> str:
    """Per initial s_tag: the low-loss two-head runs with the paper's roles (by ablation and by
    pattern), and what the heads of every two-head run carry (Markdown)."""
    out = []
    for s in sorted({r["s_tag_init"] for r in runs}, reverse=True):
        two = [r for r in runs if r["s_tag_init"] == s and r["heads"] == 2]
        if not two:
            continue
        low = [r for r in two if r["low_loss"]]
        kinds = {}
        for r in two:
            key = " / ".join(h["carries"] for h in r["function"]["layer1"]) + " | " + \
                " / ".join(h["carries"] for h in r["function"]["layer2"])
            kinds[key] = kinds.get(key, 0) + 1
        top = sorted(kinds.items(), key=lambda x: -x[1])
        rest = sum(n for _, n in top[4:])
        out.append(
            f"**From $s_\\text{{tag}}$ = {s:g}:** {len(low)} of {len(two)} two-head runs at low "
            f"loss; with the paper's roles among them: "
            f"{sum(r['function']['paper_roles'] for r in low)} by ablation, "
            f"{sum(r['roles']['paper_roles'] for r in low)} by attention pattern, "
            f"{sum(paper_roles_alt(r) for r in low)} with layer 1 read by pattern and layer 2 "
            "by ablation. What the heads of the two-head runs carry (layer 1 | layer 2), most "
            "frequent first: " + "; ".join(f"{k} ({n})" for k, n in top[:4])
            + (f"; {rest} run{'s' if rest > 1 else ''} in other combinations" if rest else "")
            + ".")
    return "\n\n".join(out)
