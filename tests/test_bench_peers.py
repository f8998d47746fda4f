"""The peers' benchmark (``ctr.bench_peers``): the sinks/VE computation it applies to a
TransformerLens cache is ctr's own, so on a cache holding ctr's records it reproduces
``analysis.heads`` exactly, and ``compare`` notices a difference. (TransformerLens itself lives
in .venv-peers; ``make bench-peers`` checks the two agree before it times anything.)"""
import torch

from ctr import analysis, bench_peers, extract
from ctr import models as M

TEXTS = ["It rained. We stayed in. Then we slept well.", "A cat sat. A dog ran. Birds flew by."]


def _cache(m, batch):
    """A TransformerLens-style cache from ctr's records: patterns (B, H, T, T), values before the
    grouped-query expansion (B, T, KV, D)."""
    cache = {}
    for rec in extract.layers(m, batch):
        step = m.n_heads // m.n_kv_heads
        cache[f"blocks.{rec.layer}.attn.hook_pattern"] = rec.A.clone()
        cache[f"blocks.{rec.layer}.attn.hook_v"] = rec.V[:, ::step].transpose(1, 2).clone()
    return cache


def test_summary_from_a_cache_is_ctrs_analysis():
    m = M.load("tiny-planted-llama")
    batch = m.encode([t[:30] for t in TEXTS])                 # equal lengths: no padding
    assert batch.lengths[0] == batch.lengths[1]
    texts = [m.tokenizer.decode(ids[1:n]) for ids, n in zip(batch.input_ids.tolist(),
                                                            batch.lengths)]
    assert torch.equal(m.encode(texts).input_ids, batch.input_ids)
    df = analysis.heads(m, texts, progress=False)
    summ = bench_peers.summary_from_cache(_cache(m, batch), m.windows, m.n_heads)
    c = bench_peers.compare(df, summ)
    assert c["heads"] == c["same_sinks"] == len(df) == 2 * 3 * 4
    assert c["max_ve_diff"] < 1e-12 and c["max_random_diff"] < 1e-12
    summ[0, 1]["S"][0, 5] = ~summ[0, 1]["S"][0, 5]          # one key flipped in one head
    assert bench_peers.compare(df, summ)["same_sinks"] == len(df) - 1
