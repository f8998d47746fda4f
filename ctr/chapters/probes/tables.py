"""The semantic-probes chapter's tables and sentences, from the results summaries
(``summ`` = {model: {task: TaskResult.summary()}}, accuracies in percent). Headers are in the
reader's words (θ_tag, not theta_tag); every head is named by ``probes.verdicts.head_name``.
Nothing here judges: verdicts come from ``probes.verdicts``."""
from __future__ import annotations

import pandas as pd
from IPython.display import Markdown

from . import verdicts as PV
from .verdicts import head_name as H
from .verdicts import pct

TASKS = {"cities": "cities", "sentiment": "sentiment", "cities_suffix": "cities + suffix"}


def statements(tasks: dict, baseline: float) -> list:
    """A few cities statements with their labels and split, the country-only baseline, one
    position-controlled prompt and one sentiment prompt in full."""
    c, s = tasks["cities"], tasks["sentiment"]
    sample = pd.DataFrame({"statement": c.texts, "split": c.split,
                           "label": ["true" if y else "false" for y in c.labels]}).head(6)
    return [sample.style.hide(axis="index"),
            Markdown(f"A rule that sees only the stated country (the majority label of that "
                     f"country in the training split) scores {100 * baseline:.1f}% on the test "
                     f"split. Position-controlled prompt: `{tasks['cities_suffix'].texts[0]}`"),
            Markdown(f"One sentiment prompt, in full (label: "
                     f"{'positive' if s.labels[0] else 'negative'}):\n\n```text\n{s.texts[0]}"
                     f"\n```")]


def protocol_name(prot: str, guard: int) -> str:
    return "paper's protocol (min_queries 1)" if prot == "paper" else f"guard (min_queries {guard})"


def chosen(g: dict) -> str:
    return H(g["layer"], g["head"]) if g["selected"] else "no head satisfies the rule"


def table(summ: dict, paper: dict | None, task: str, key: str | None, guard: int) -> pd.DataFrame:
    """Table 1 (cities) or the sentiment table: the paper's rows (labelled, from the yaml), then
    ours under both protocols, with the best training θ_tag and θ_activation heads beside."""
    rows = []
    if key and paper:
        rows += [{"model": f"{m} (paper)", "protocol": "paper", "θ_tag": pct(a),
                  "θ_no_tag": pct(b), "θ_activation": pct(c), "chosen head": "-",
                  "best θ_tag head": "-", "best θ_activation head": "-"}
                 for m, (a, b, c) in paper[key]["models"].items()]
    for name, ss in summ.items():
        for prot in ("paper", "guard"):
            g = ss[task][prot]
            bt, ba = g["best_tag"], g["best_activation"]
            rows.append({"model": name, "protocol": protocol_name(prot, guard),
                         "θ_tag": pct(g["theta_tag"]), "θ_no_tag": pct(g["theta_no_tag"]),
                         "θ_activation": pct(g["theta_activation"]), "chosen head": chosen(g),
                         "best θ_tag head": f"{H(bt['layer'], bt['head'])}: {bt['theta_tag']:.1f}",
                         "best θ_activation head":
                             f"{H(ba['layer'], ba['head'])}: {ba['theta_activation']:.1f}"})
    return pd.DataFrame(rows)


def tok_md(label: str) -> str:
    """"' is' (mid)" -> "`' is'` (mid)": token strings as code, so "<bos>" survives HTML."""
    if " (" not in label:
        return label
    tok, pos = label.rsplit(" (", 1)
    return f"`{tok}` ({pos}"


def sources(summ: dict, task: str, guard: int) -> Markdown:
    """Where each chosen head takes its tag from, and its training accuracies."""
    out = []
    for name, ss in summ.items():
        for prot in ("paper", "guard"):
            g = ss[task][prot]
            if g["selected"]:
                top = "; ".join(f"{tok_md(k)} in {v:.0%}" for k, v in g["top_sinks"])
                out.append(f"**{name}, {protocol_name(prot, guard)}:** {chosen(g)} takes its tag "
                           f"from {top} (training θ_tag / θ_no_tag / θ_activation "
                           f"{g['train_theta_tag']:.1f} / {g['train_theta_no_tag']:.1f} / "
                           f"{g['train_theta_activation']:.1f}).")
    return Markdown(" ".join(out))


def _p(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def family_table(summ: dict, guard: int) -> pd.DataFrame:
    """The probe rule's numbers, row by row of each model's Holm family: (i) discordant prompts
    and one-sided p raw / Holm, (ii) re-splits passed, (iii) re-split mean vs the null."""
    PV.adjust(summ)
    rows = []
    for name, ss in summ.items():
        for task, prot in PV.FAMILY:
            if task not in ss:
                continue
            g = ss[task][prot]
            c = PV.tag_conditions(g)
            mc = g["mcnemar"]
            rows.append({
                "model": name, "row": f"{TASKS[task]}, {protocol_name(prot, guard)}",
                "head": chosen(g),
                "(i) θ_tag only / θ_no_tag only": "-" if mc is None else
                f"{mc['only_tag']} / {mc['only_no_tag']}",
                "(i) p raw / Holm": "-" if mc is None else f"{_p(c['p_raw'])} / {_p(c['p'])}",
                "(ii) re-splits passed": "-" if c["no_head"] else f"{c['n_pass']} of {c['n']}",
                "(iii) re-split mean θ_tag / null p95": "-" if c["no_head"] else
                f"{pct(c['mean'])} / {c['null_p95']:.1f}",
                "verdict": PV.carried_by_tag(g)})
    return pd.DataFrame(rows)


def activation_table(summ: dict) -> pd.DataFrame:
    """Table 1's θ_tag ≥ θ_activation, per model and task (paper's protocol)."""
    rows = []
    for name, ss in summ.items():
        for task in ("cities", "sentiment"):
            g = ss[task]["paper"]
            va, rs = g.get("tag_vs_activation"), g["resplits"]
            rows.append({
                "model": name, "task": task, "head": chosen(g),
                "θ_tag / θ_activation": f"{pct(g['theta_tag'])} / {pct(g['theta_activation'])}",
                "θ_tag only / θ_activation only": "-" if va is None else
                f"{va['only_tag']} / {va['only_activation']}",
                "p (θ_activation above)": "-" if va is None else _p(va["p_less"]),
                "re-splits θ_tag ≥ θ_activation": "-" if va is None else
                f"{rs['n_tag_ge_activation']} of {rs['n']}",
                "verdict": PV.tag_vs_activation(g)})
    return pd.DataFrame(rows)


def resplit_table(summ: dict, guard: int) -> pd.DataFrame:
    """Descriptive: the re-splits' mean ± sd of each accuracy, the modal head and how often it
    was chosen (no verdict), and what selection alone gives (the null's training θ_tag)."""
    rows = []
    for name, ss in summ.items():
        for task in ss:
            for prot in ("paper", "guard"):
                g = ss[task][prot]
                rs, nl = g["resplits"], g["null"]
                ok = rs.get("n_selected")
                rows.append({
                    "model": name, "row": f"{TASKS[task]}, {protocol_name(prot, guard)}",
                    **{f"re-splits {lab}":
                       f"{rs[f'theta_{k}_mean']:.1f} ± {rs[f'theta_{k}_sd']:.1f}" if ok else "-"
                       for k, lab in (("tag", "θ_tag"), ("no_tag", "θ_no_tag"),
                                      ("activation", "θ_activation"))},
                    "modal head (no verdict)": PV.stability(rs),
                    "null θ_tag mean / p95":
                        f"{nl['theta_tag_mean']:.1f} / {nl['theta_tag_p95']:.1f}",
                    "training θ_tag: ours / null": f"{pct(g['train_theta_tag'])} / "
                                                   f"{nl['train_theta_tag_mean']:.1f}"})
    return pd.DataFrame(rows)


def heads_text(runs: dict) -> Markdown:
    """Under the figure: per model and task, how many heads lie above the diagonal (guard)."""
    out = []
    for name, rr in runs.items():
        parts = []
        for task, r in rr.items():
            gap = r.main.train["tag"] - r.main.train["no_tag"]
            parts.append(f"{TASKS[task]}: {int((gap > 1e-9).sum())} of {gap.size} heads have a "
                         f"training θ_tag above θ_no_tag, {int((gap >= 0.15 - 1e-9).sum())} by "
                         f"15 points or more")
        out.append(f"**{name}**, with the guard: " + "; ".join(parts) + ".")
    return Markdown("\n\n".join(out))


def sweep_table(summ: dict, sweep: list[int]) -> pd.DataFrame:
    """From the paper's protocol to the guard: θ_tag / θ_no_tag (%) and the head, per guard."""
    def cell(b):
        if not b["selected"]:
            return "no head satisfies the rule"
        return f"{b['theta_tag']:.1f} / {b['theta_no_tag']:.1f} ({H(b['layer'], b['head'])})"
    return pd.DataFrame({(name, TASKS[task]): {f"min_queries {g}": cell(s["by_guard"][str(g)])
                                               for g in sweep}
                         for name, ss in summ.items() for task, s in ss.items()}).T


def where_table(summ: dict, guard: int) -> pd.DataFrame:
    """Where the chosen head's tag comes from, per protocol (shares in percent)."""
    rows = []
    for name, ss in summ.items():
        for task, s in ss.items():
            for prot in ("paper", "guard"):
                v = s[prot]
                ct = v.get("constant_tag") or {}
                rows.append({
                    "model": name, "task": TASKS[task], "protocol": protocol_name(prot, guard),
                    "head": chosen(v), "sinks per head": f"{v['sinks_per_head']:.2f}",
                    "final token is a sink (%)": f"{100 * v['self_sink']:.1f}",
                    "has a sink (%)": pct(None if v["sink_coverage"] is None
                                          else 100 * v["sink_coverage"]),
                    "tag from the tail (%)": pct(None if v["tail_share"] is None
                                                 else 100 * v["tail_share"]),
                    "z_tag norm from token 0 (%)": pct(None if ct.get("norm_share") is None
                                                       else 100 * ct["norm_share"]),
                    "main tag source": f"{v['top_sinks'][0][0]} ({v['top_sinks'][0][1]:.0%})"
                    if v["top_sinks"] else "-"})
    return pd.DataFrame(rows)


def token0_text(summ: dict, country_before: dict, n: int) -> Markdown:
    """With the guard: how often the chosen head's tag comes mainly from token 0."""
    lines = []
    for name, ss in summ.items():
        for task in ("cities", "sentiment"):
            v = ss[task]["guard"]
            bos = sum(x for k, x in v["top_sinks"] if k.endswith("(token 0)"))
            lines.append(f"{name}, {task}: {bos:.0%} of prompts")
    return Markdown("With the guard, the chosen head's final token takes its tag mainly from "
                    "token 0 in: " + "; ".join(lines) + ". Every key the guard leaves precedes "
                    "the country in " + "; ".join(f"{k} of {n} city statements ({name})"
                                                  for name, k in country_before.items())
                    + " (the others have countries of more than three tokens).")


def suffix_text(summ: dict) -> Markdown:
    """The position-controlled probe, one paragraph per model."""
    lines = []
    for name, ss in summ.items():
        g, p1 = ss["cities_suffix"]["guard"], ss["cities_suffix"]["paper"]
        if g["selected"]:
            src, share = g["top_sinks"][0]
            how = ("token 0, whose value vector is the same in every prompt: the truth arrives "
                   "through the attention weight alone" if src.endswith("(token 0)") else
                   "a token inside the prompt that has read the statement: its value vector can "
                   "carry the truth" if src.endswith("(mid)") else "another token")
            found = (f"θ_tag {g['theta_tag']:.1f}% at {H(g['layer'], g['head'])} "
                     f"({PV.ours_text(g)}); its main tag source is {tok_md(src)} in "
                     f"{share:.0%} of prompts, {how}")
        else:
            found = "no head satisfies the rule"
        lines.append(f"**{name}:** under the guard, {found}. Verdict: "
                     f"{PV.carried_by_tag(g)}. (Paper's protocol on the same prompts: θ_tag "
                     f"{pct(p1['theta_tag'])}%, no verdict.)")
    return Markdown("\n\n".join(lines))


def logistic_table(summ: dict):
    """Mass-mean against logistic regression on the chosen head's three features."""
    rows = []
    names = {"tag": "z_tag", "no_tag": "z_notag", "activation": "o"}
    for name, ss in summ.items():
        for task, s in ss.items():
            for prot in ("paper", "guard"):
                v = s[prot]
                if v["selected"]:
                    rows += [{"model": name, "task": TASKS[task], "protocol": prot,
                              "feature": names[k], "mass-mean": v[f"theta_{k}"],
                              "logistic regression": v[f"logistic_{k}"]} for k in names]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).pivot_table(index=["model", "task", "protocol"], columns="feature",
                                          values=["mass-mean", "logistic regression"], sort=False)


def line(g: dict) -> str:
    """One protocol of one task, in a sentence (for the closing paragraph)."""
    if not g["selected"]:
        return "no head satisfies the rule"
    rs = g["resplits"]
    return (f"{g['theta_tag']:.1f} / {g['theta_no_tag']:.1f} / {g['theta_activation']:.1f}% at "
            f"{H(g['layer'], g['head'])} (re-splits {rs['theta_tag_mean']:.1f} / "
            f"{rs['theta_no_tag_mean']:.1f} / {rs['theta_activation_mean']:.1f}; "
            f"{PV.carried_by_tag(g)})")


def paragraphs(summ: dict) -> Markdown:
    """In one paragraph per model: every task under both protocols."""
    out = []
    for name, ss in summ.items():
        parts = [f"{TASKS[task]}: paper's protocol {line(ss[task]['paper'])}; guard "
                 f"{line(ss[task]['guard'])}" for task in ss]
        out.append(f"**{name}** (θ_tag / θ_no_tag / θ_activation): " + ". ".join(parts) + ".")
    return Markdown("\n\n".join(out))


def verdict_item(r: dict) -> str:
    """One model's verdict on one claim, as a list item: the verdict, the numbers that decided
    it, the interval, raw and Holm-adjusted p where there are, and the note."""
    ps = []
    if r.get("p_raw") is not None:
        ps.append(f"p raw {_p(r['p_raw'])}")
    if r.get("p_adj") is not None:
        ps.append(f"Holm {_p(r['p_adj'])}")
    parts = [r["ours"], r["interval"] if r["interval"] != "-" else None, ", ".join(ps) or None]
    note = f" *Note:* {r['note']}." if r.get("note") else ""
    return (f"  - {r['model']}: **{r['verdict']}**. "
            + "; ".join(x for x in parts if x) + "." + note)


def verdict_blocks(claims: list[dict]) -> list:
    """Paper / ours / verdict, one block per rule: the rule's text from RULES.md and the choice
    it leaves open, then each claim (its settings and the paper's numbers) with one item per
    model (a list, not a table: the lines are long and the column is narrow)."""
    out, by_rule = [], {}
    for c in claims:
        by_rule.setdefault(c["rule"], []).append(c)
    for rule, rows in by_rule.items():
        items = []
        for cid in dict.fromkeys(r["id"] for r in rows):
            rs = [r for r in rows if r["id"] == cid]
            first = rs[0]
            items.append(f"- **{cid}** ({first['settings']}): {first['claim']}. *Paper:* "
                         f"{first['paper']}.")
            items += [verdict_item(r) for r in rs]
        choice = f"\n\n*Where the rule leaves a choice:* {rows[0]['choice']}." if rows[0].get(
            "choice") else ""
        out.append(Markdown(f"> **Rule (RULES.md):** {rule}{choice}\n\n" + "\n".join(items)))
    return out


def timing(seconds: dict, wall: float, cpu: float) -> Markdown:
    return Markdown(f"This chapter took {wall:.0f} s of wall time and {cpu:.0f} s of CPU time in "
                    f"this build ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}).")
