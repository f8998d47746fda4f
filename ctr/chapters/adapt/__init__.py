"""The "Run a chapter on your model" page: which architectures ctr reads, and each model's BOS.

Two measurements, both generated when the page runs:

- ``architectures()``: every tiny architecture of ``ctr.tiny`` wrapped by ``ctr.models.wrap``,
  so its layers, attention, W_O and eager attention call are discovered (``ctr.arch``), and
  every architecture ctr refuses, with the reason it gives.
- ``bos_table(models, texts)``: per model, where the sinks are with and without a prepended BOS
  on natural text (IMDB reviews): the share of heads whose position 0 is a sink (alpha_0 > eps,
  paper eq. for alpha with the tail guard ``min_queries``), sinks per head, the most frequent
  sink position, and the share of heads where position 1 is a sink (the first text token after
  a prepended BOS). The policy ctr uses (``Model.bos_policy``) follows the tokenizer; the
  table says whether the measurement agrees: position 0 should be the most frequent sink
  position under the policy.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ... import arch, extract, models, stats, tiny
from ... import definitions as D


# --- architectures --------------------------------------------------------------------------------

def architectures(names=None) -> pd.DataFrame:
    """One row per tiny architecture: discovered paths, or the error if discovery fails."""
    rows = []
    for name in names or tiny.ARCHS:
        hf = tiny.model(name)
        row = {"architecture": name, "model_type": hf.config.model_type, "class": type(hf).__name__}
        try:
            m = models.wrap(f"tiny-{name}", hf, tiny.tokenizer())
            a = arch.arch_of(m.config)
            row.update({"layers": a.layers, "attention": a.attn, "W_O": a.out_proj,
                        "attention call": a.call, "QK-norm": m.qk_norm,
                        "sliding layers": bool(m.sliding_layers), "read by ctr": True})
        except arch.UnsupportedArchitecture as e:
            row.update({"read by ctr": False, "why not": str(e)})
        rows.append(row)
    return pd.DataFrame(rows)


def refused(names=None) -> pd.DataFrame:
    """The architectures ctr refuses (``tiny.UNSUPPORTED``) and the reason it gives."""
    rows = []
    for name in names or tiny.UNSUPPORTED:
        hf = tiny.unsupported(name)
        try:
            models.wrap(f"tiny-{name}", hf, tiny.tokenizer())
            why = "(accepted: no longer refused)"
        except (arch.UnsupportedArchitecture, models.ModelError) as e:
            why = str(e)
        rows.append({"architecture": name, "model_type": hf.config.model_type,
                     "kind": tiny.UNSUPPORTED[name][0], "ctr says": why})
    return pd.DataFrame(rows)


# --- where the sinks are, with and without a prepended BOS ----------------------------------------

def sink_positions(model: models.Model, texts: list[str], max_tokens: int = 150, eps: float = D.EPS,
                   min_queries: int = 16, batch_size: int = 8) -> dict:
    """Sinks of every (prompt, layer, head) on ``texts`` as ``model`` tokenises them.

    Returns S (P, L, H, T) boolean sink masks (T = the shortest prompt: every prompt is cut to
    it, so positions are comparable) and the first token of each prompt.
    """
    batch = model.encode(texts, max_tokens=max_tokens)
    T = min(batch.lengths)
    P, L, H = len(texts), model.n_layers, model.n_heads
    S = np.zeros((P, L, H, T), bool)
    with extract.one_thread():
        for start in range(0, P, batch_size):
            idx = list(range(start, min(start + batch_size, P)))
            for rec in extract.layers(model, batch.select(idx)):
                for b, p in enumerate(idx):
                    A = rec.prompt(b).A[0, :, :T, :T]                    # (H, T, T)
                    a = D.alpha(A, rec.window, min_queries)                # (H, T) float32
                    S[p, rec.layer] = D.sinks(a, eps).cpu().numpy()
    return {"S": S, "first_token": [t[0] for t in batch.tokens], "T": T}


def position_stats(S: np.ndarray, seed: int = 0) -> dict:
    """Summaries of sink masks S (P, L, H, T); intervals bootstrap over prompts (the
    independent units: heads of one prompt are not independent)."""
    P = S.shape[0]
    per_prompt0 = S[..., 0].reshape(P, -1).mean(1)                       # (P,)
    counts = S.sum((0, 1, 2))                                            # (T,) sinks per position
    top = np.argsort(-counts, kind="stable")[:3]
    lo, hi = stats.bootstrap(per_prompt0, np.mean, seed=seed)
    return {"pos0_share": float(S[..., 0].mean()), "pos0_interval": [lo, hi],
            "pos1_share": float(S[..., 1].mean()) if S.shape[-1] > 1 else None,
            "sinks_per_head": float(S.sum(-1).mean()),
            "share_heads_no_sink": float((S.sum(-1) == 0).mean()),
            "top_position": int(top[0]), "top_positions": [int(t) for t in top],
            "share_sinks_at_0": float(counts[0] / counts.sum()) if counts.sum() else None}


def bos_compare(model: models.Model, texts: list[str], max_tokens: int = 150, eps: float = D.EPS,
                min_queries: int = 16, batch_size: int = 8) -> list[dict]:
    """``position_stats`` without and with the tokenizer's BOS prepended (same total length T),
    each row saying whether it is the model's policy."""
    bos = model.tokenizer.bos_token_id
    rows = []
    for prepend in ((False, True) if bos is not None else (False,)):
        t0 = time.time()
        m = model.with_bos(prepend)
        r = sink_positions(m, texts, max_tokens, eps, min_queries, batch_size)
        rows.append({"model": model.name, "prepended": m.tokenizer.convert_ids_to_tokens(bos) if prepend else "nothing",
                     "policy": prepend == model.prepend_bos, "prompts": len(texts), "T": r["T"],
                     **position_stats(r["S"]), "seconds": time.time() - t0})
    return rows


def bos_rows(bos: pd.DataFrame) -> pd.DataFrame:
    """The BOS table as shown: one row per (model, what is prepended), shares with intervals."""
    def fmt(r):
        lo, hi = r["pos0_interval"]
        at0 = r["share_sinks_at_0"]
        return {"model": r["model"], "prepended": r["prepended"],
                "ctr's policy": "yes" if r["policy"] else "",
                "position 0 a sink (share of heads)": f"{r['pos0_share']:.3f} [{lo:.3f}, {hi:.3f}]",
                "position 1 a sink": f"{r['pos1_share']:.3f}",
                "sinks per head": f"{r['sinks_per_head']:.2f}",
                "heads without a sink": f"{r['share_heads_no_sink']:.3f}",
                "most frequent sink positions": ", ".join(map(str, r["top_positions"])),
                "sinks at position 0": f"{at0:.3f}" if at0 is not None else "-"}
    return pd.DataFrame([fmt(r) for r in bos.to_dict("records")]).set_index(["model", "prepended"])


def agrees(row: dict) -> bool:
    """The measurement supports a policy when position 0 is the most frequent sink position."""
    return row["top_position"] == 0


def bos_table(names, texts: list[str], max_tokens: int = 150, eps: float = D.EPS,
              min_queries: int = 16, device: str = "cpu",
              dtype: str = "float32") -> tuple[pd.DataFrame, pd.DataFrame]:
    """For every model: its policy (``info``) and ``bos_compare`` rows, loading one at a time
    (on ``device`` in ``dtype``, after the memory plan for 8 prompts of ``max_tokens``)."""
    policy, rows = [], []
    for name in names:
        m = models.load(name, device=device, dtype=dtype, T=max_tokens, batch=8)
        policy.append({"model": name, "architecture": m.architecture,
                       "tokenizer adds BOS": models.tokenizer_adds_bos(m.tokenizer),
                       "BOS policy": m.bos_policy})
        rows += bos_compare(m, texts, max_tokens, eps, min_queries)
        del m
    return pd.DataFrame(policy), pd.DataFrame(rows)


def policy_holds(model: models.Model, texts_: list[str], **kw) -> dict:
    """Sinks under the model's own policy; ``agrees`` says whether position 0 leads."""
    r = sink_positions(model, texts_, **kw)
    return position_stats(r["S"])

