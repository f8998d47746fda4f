"""What a chapter's models are, by content: the resolved model list and a digest of every file
each model is loaded from.

A file's digest is its SHA-256, computed once and remembered by path, size, mtime and inode
(``Hashes``, a JSON memo beside the executed notebooks): ``touch`` makes it hash the file again
and find the same digest (nothing re-runs), a reconverted model or another ``CTR_CACHE`` with
other weights gives another digest (its chapters re-run). Hashing the 1.6 GB of the embedded
models takes a few seconds, once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 22


class Hashes:
    """File digests remembered by (size, mtime, inode); ``path`` None keeps them in memory."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else None
        self.memo: dict = {}
        if self.path and self.path.exists():
            try:
                self.memo = json.loads(self.path.read_text())
            except ValueError:
                self.memo = {}
        self.dirty = False

    def file(self, f: Path) -> str:
        f = Path(f).resolve()
        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        got = self.memo.get(str(f))
        if got and got[0] == stamp:
            return got[1]
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                h.update(block)
        self.memo[str(f)] = [stamp, h.hexdigest()[:16]]
        self.dirty = True
        return self.memo[str(f)][1]

    def tree(self, d: Path) -> dict:
        """Every file under ``d`` (symlinks followed, as a loader reads them) by relative path."""
        d = Path(d)
        return {p.relative_to(d).as_posix(): self.file(p) for p in sorted(d.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}

    def save(self) -> None:
        if self.path and self.dirty:
            from ..results import write_atomic

            live = {k: v for k, v in self.memo.items() if os.path.exists(k)}
            write_atomic(self.path, json.dumps(live, sort_keys=True))
            self.dirty = False


def resolve_models(params: dict, defaults: dict) -> list[str]:
    """The models a run loads: its ``models``/``model`` parameter, "default" and "installed"
    resolved to the names they mean here (``ctr.models.names``), the text of a list parsed."""
    given = {**defaults, **params}
    v = given.get("models", given.get("model"))
    if v is None or v == "":
        return []
    if isinstance(v, str) and v.strip().startswith("["):
        import yaml
        v = yaml.safe_load(v)
    from .. import models as M

    return M.names(v)


def _hub_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:      # not cached (or no such id): nothing local to key on
        return None


def models(names: list[str], hashes: Hashes | None = None) -> dict:
    """Each model's files by content. Tiny models are built by ``ctr/tiny.py`` (a module the
    chapter's key already holds); a model with nothing local yet is keyed as such."""
    from .. import models as M

    hashes = hashes or Hashes()
    out = {}
    for n in names:
        if n in M.TINY:
            out[n] = "tiny (built by ctr/tiny.py)"
            continue
        d = M.cache_dir() / "models" / n if n in M.EMBEDDED else Path(n).expanduser()
        if not (n in M.EMBEDDED or d.is_dir()):
            d = _hub_snapshot(n)
        out[n] = hashes.tree(d) if d is not None and d.is_dir() and any(d.iterdir()) \
            else "no local files (not converted or not cached yet)"
    return out
