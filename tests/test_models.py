"""Model loading: clear errors on bad input, model facts, and the real embedded models."""
import subprocess
import sys

import pytest

from ctr import analysis, models, tiny


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
    with pytest.raises(models.ModelError, match="could not load 'nobody/nothing-here'"):
        models.load("nobody/nothing-here")


# --- model facts ------------------------------------------------------------------------------

@pytest.mark.parametrize("a,expected", [("qwen3", True), ("gemma3", True),
                                        ("llama", False), ("qwen2", False)])
def test_qk_norm_detected_from_modules(a, expected):
    assert models.wrap("x", tiny.model(a), tiny.tokenizer()).qk_norm is expected


def test_bos_policy_prepends_the_tokenizers_bos():
    m = models.load("tiny-random-llama")
    b = m.encode(["ab"])
    assert b.input_ids[0].tolist() == [m.bos_token_id, *m.tokenizer("ab", add_special_tokens=False).input_ids]
    assert b.tokens[0][0] == "<bos>"


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


@pytest.mark.slow
def test_gemma3_reports_qk_norm_and_sliding_layers(gemma3):
    assert gemma3.qk_norm is True
    assert gemma3.architecture == "gemma3_text"
    assert gemma3.sliding_layers == [i for i in range(18) if i % 6 != 5]
    assert gemma3.windows[0] == 512 and gemma3.windows[5] is None
    assert gemma3.encode(["hi"]).tokens[0][0] == "<bos>"
