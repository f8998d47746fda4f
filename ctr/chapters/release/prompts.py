"""Few-shot label prompts in aligned pairs, for the release chapter's swap (``release.swap``).

Each answer starts with one token (``answer_ids``); two prompts of a pair have opposite labels
and the same number of tokens, so every position of one has a counterpart at the same index in
the other:

- sentiment: the paper's two-shot template (``data.sentiment_prompt``) around two Rotten
  Tomatoes sentences of opposite labels whose prompts tokenise to the same length; answers
  " POSITIVE" / " NEGATIVE";
- cities: two demonstrations, then one city with its true country or with another country of
  the same token length (a minimal pair: only the country differs); answers " TRUE" / " FALSE".
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ... import data
from ...models import Model

TASKS = {"sentiment": (" POSITIVE", " NEGATIVE"), "cities": (" TRUE", " FALSE")}
CITY_TEMPLATE = ("{0} This statement is: TRUE.\n{1} This statement is: FALSE.\n"
                 "{statement} This statement is:")


@dataclass
class Pairs:
    task: str
    texts: list[str]                 # 2N prompts; pair i = (2i, 2i + 1), labels 1 then 0
    labels: list[int]
    answers: tuple[str, str]         # (label 1, label 0)
    answer_ids: tuple[int, int]      # first token of each answer
    differ_from: list[int]           # per pair: first position where the prompts differ
    lengths: list[int]               # per pair: tokens (BOS included)

    def __len__(self) -> int:
        return len(self.differ_from)


def answer_ids(model: Model, answers: tuple[str, str]) -> tuple[int, int]:
    """The first token of each answer (after the prompt's final ':'); they must differ. A
    tokenizer whose spaced answers share their first token (a byte-level one: the space) is
    scored on the answers without the space."""
    for a in (answers, tuple(x.strip() for x in answers)):
        ids = [model.tokenizer(x, add_special_tokens=False).input_ids[0] for x in a]
        if ids[0] != ids[1]:
            return ids[0], ids[1]
    raise ValueError(f"{model.name}: the answers {answers} start with the same token; a "
                     "one-token logit difference cannot tell them apart")


def _aligned(model: Model, a: str, b: str) -> tuple[int, int] | None:
    """(length, first differing position) when a and b tokenise to the same length and
    differ somewhere; else None."""
    x, y = model.ids(a), model.ids(b)
    if len(x) != len(y) or x == y or x[-1] != y[-1]:
        return None
    return len(x), next(i for i, (p, q) in enumerate(zip(x, y)) if p != q)


def _pairs(model, task, candidates, n_pairs) -> Pairs:
    """Pairs from (text of label 1, text of label 0) candidates, in order, aligned only."""
    texts, diff, lens = [], [], []
    for a, b in candidates:
        al = _aligned(model, a, b)
        if al is None:
            continue
        texts += [a, b]
        lens.append(al[0])
        diff.append(al[1])
        if len(diff) == n_pairs:
            break
    if len(diff) < n_pairs:
        raise data.DataError(f"{task}: only {len(diff)} aligned pairs for {model.name}; ask for "
                             f"fewer (n_pairs={len(diff)})")
    return Pairs(task, texts, [1, 0] * n_pairs, TASKS[task], answer_ids(model, TASKS[task]),
                 diff, lens)


def sentiment_pairs(model: Model, n_pairs: int = 200, seed: int = 0, max_words: int = 40) -> Pairs:
    """Positive and negative Rotten Tomatoes sentences in the paper's two-shot template, paired
    greedily (in seeded order) when their prompts have the same number of tokens."""
    demos = ("it's a charming and often affecting journey .", "unflinchingly bleak and desperate")

    def candidates():
        waiting: dict[tuple[int, int], list[str]] = {}
        for s, y in data.rotten_tomatoes(seed):
            if len(s.split()) > max_words or s in demos:
                continue
            p = data.sentiment_prompt(s)
            n = len(model.ids(p))
            other = waiting.get((n, 1 - y))
            if other:
                q = other.pop(0)
                yield (p, q) if y == 1 else (q, p)
            else:
                waiting.setdefault((n, y), []).append(p)
    return _pairs(model, "sentiment", candidates(), n_pairs)


def city_pairs(model: Model, n_pairs: int = 200, seed: int = 0) -> Pairs:
    """Minimal pairs "The city of X is in Y." (true) / "... is in Z." (false), Z the first
    country of the cities set, in a seeded order, whose prompt has as many tokens, after two
    demonstrations (one true, one false) drawn from the same set and never used in a pair."""
    c = data.cities(600, 400, seed=seed)
    cities = [(m["city"], m["country"]) for m in c.meta]
    countries = sorted({k for _, k in cities})
    rng = random.Random(seed)
    (c1, k1), (c2, k2) = cities[0], cities[1]
    wrong = next(k for k in countries if k not in (k1, k2))
    demo = [f"The city of {c1} is in {data.country_phrase(k1)}.",
            f"The city of {c2} is in {data.country_phrase(wrong)}."]

    def prompt(city, country):
        return CITY_TEMPLATE.format(*demo, statement=f"The city of {city} is in {data.country_phrase(country)}.")

    def candidates():
        for city, true in cities[2:]:
            n = len(model.ids(prompt(city, true)))
            for k in rng.sample(countries, len(countries)):
                if k != true and len(model.ids(prompt(city, k))) == n:
                    yield prompt(city, true), prompt(city, k)
                    break
    return _pairs(model, "cities", candidates(), n_pairs)


def pairs_for(model: Model, task: str, n_pairs: int = 200, seed: int = 0) -> Pairs:
    """``n_pairs`` aligned pairs of ``task`` ("sentiment" or "cities")."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {', '.join(TASKS)}")
    return (sentiment_pairs if task == "sentiment" else city_pairs)(model, n_pairs, seed)
