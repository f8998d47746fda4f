"""The labelled prompt sets of the semantic-probes chapter: cities (truth) and sentiment."""
import collections
import os
import subprocess
import sys

import pytest

from ctr import data


@pytest.fixture(scope="module")
def cities():
    return data.cities()


@pytest.fixture(scope="module")
def sentiment():
    return data.sentiment()


def balanced(ds, n, n_train):
    assert len(ds) == n == len(ds.labels) == len(ds.split) == len(ds.meta)
    count = collections.Counter(zip(ds.labels, ds.split))
    assert count == {(1, "train"): n_train // 2, (0, "train"): n_train // 2,
                     (1, "test"): (n - n_train) // 2, (0, "test"): (n - n_train) // 2}


def test_cities_balanced_in_each_split(cities):
    balanced(cities, 600, 400)
    assert len(cities.part("train")) == 400 and len(cities.part("test")) == 200


def test_no_city_in_both_splits(cities):
    train = {m["city"] for m in cities.part("train").meta}
    test = {m["city"] for m in cities.part("test").meta}
    assert not train & test
    assert len(train) == 400 and len(test) == 200          # and no city twice


def test_statements_say_what_the_labels_say(cities):
    for text, y, m in zip(cities.texts, cities.labels, cities.meta):
        assert text.startswith(f"The city of {m['city']} is in ") and text.endswith(".")
        assert m["stated"] in text
        if y:
            assert m["stated"] == m["country"]
        else:
            assert m["stated"] != m["country"]          # a country other than the city's


def test_the_stated_country_alone_does_not_give_the_label_away(cities):
    # false statements name exactly the countries of the false statements' own cities
    false = [m for m, y in zip(cities.meta, cities.labels) if not y]
    assert collections.Counter(m["stated"] for m in false) == \
        collections.Counter(m["country"] for m in false)
    # so a classifier that knows only the stated country is at chance on the test split
    tr, te = cities.part("train"), cities.part("test")
    votes = collections.defaultdict(lambda: [0, 0])
    for m, y in zip(tr.meta, tr.labels):
        votes[m["stated"]][y] += 1
    pred = [int(votes[m["stated"]][1] > votes[m["stated"]][0]) for m in te.meta]
    assert sum(p == y for p, y in zip(pred, te.labels)) / len(te) < 0.6


def test_country_names_read_naturally(cities):
    assert any(" in the United States." in t for t in cities.texts)
    assert not any(" in United States." in t for t in cities.texts)


def test_cities_seeded(cities):
    again = data.cities()
    assert again.texts == cities.texts and again.labels == cities.labels and again.split == cities.split
    assert data.cities(seed=1).texts != cities.texts


CODE = ("import hashlib, json; from ctr import data; d = data.{}(); "
        "print(hashlib.sha256(json.dumps([d.texts, d.labels, d.split]).encode()).hexdigest())")


@pytest.mark.parametrize("fn", ["cities", "sentiment"])
def test_identical_across_processes(fn):
    """Seeded output does not depend on the interpreter's hash seed (set and dict order)."""
    outs = {subprocess.run([sys.executable, "-c", CODE.format(fn)], capture_output=True, text=True,
                           check=True, env=dict(os.environ, PYTHONHASHSEED=hs)).stdout
            for hs in ("1", "2")}
    assert len(outs) == 1


def test_small_sets_and_errors():
    small = data.cities(40, 20, seed=3)
    balanced(small, 40, 20)
    with pytest.raises(data.DataError, match="even"):
        data.cities(41, 20)
    with pytest.raises(data.DataError, match="even"):
        data.sentiment(40, 40)
    with pytest.raises(data.DataError, match="only"):
        data.cities(100_000)


def test_sentiment_balanced_in_each_split(sentiment):
    balanced(sentiment, 600, 400)


def test_sentiment_uses_the_papers_template(sentiment):
    head = data.SENTIMENT_TEMPLATE.split("{sentence}")[0]
    assert head.startswith("it's a charming and often affecting journey. This statement is: POSITIVE.\n")
    ends = set()
    for text, m in zip(sentiment.texts, sentiment.meta):
        assert text.startswith(head) and text.endswith(" This statement is:")
        body = text[len(head):-len(" This statement is:")]
        assert body[-1] in ".?!" and not body.endswith(("?.", "!."))   # never "?." or "!."
        ends.add(body[-1])
        squash = lambda x: "".join(x.split()).rstrip(".")  # noqa: E731  (corpus spaces punctuation)
        assert squash(body) == squash(m["sentence"])
    assert "?" in ends or "!" in ends         # the default set has such sentences: the case is live


def test_sentiment_labels_come_from_the_corpus_and_exclude_the_examples(sentiment):
    label = dict(data.rotten_tomatoes())
    for m, y in zip(sentiment.meta, sentiment.labels):
        assert label[m["sentence"]] == y
    sents = [m["sentence"] for m in sentiment.meta]
    assert "it's a charming and often affecting journey ." not in sents
    assert "unflinchingly bleak and desperate" not in sents
    train = {m["sentence"] for m in sentiment.part("train").meta}
    test = {m["sentence"] for m in sentiment.part("test").meta}
    assert not train & test and len(set(sents)) == 600


def test_sentiment_seeded(sentiment):
    assert data.sentiment().texts == sentiment.texts
    assert data.sentiment(seed=1).texts != sentiment.texts
