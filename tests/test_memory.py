"""The memory plan: the paper's models built offline from their published hyperparameters, the
refusals and acceptances the issue names (free memory injected), each part of the refusal
message, the plan made before any weight is read, and the estimate against the measured peak of
a fresh process running an embedded model."""
import json
import subprocess
import sys
import textwrap

import pytest

from ctr import models as M
from ctr.models import memory, paper

GB = 1e9
GiB = 2 ** 30


@pytest.mark.parametrize("name", paper.names())
def test_paper_model_configs_have_their_published_size(name):
    """Counted on the meta device, each config's parameters are the model card's total (to 0.5%):
    a wrong width, depth or tying in the transcribed hyperparameters would show here."""
    n = paper.n_params(paper.config(name))
    card = paper.table()[name]["params_billions"] * 1e9
    assert abs(n / card - 1) < 0.005, f"{name}: {n:,} parameters, card says {card:,.0f}"


def test_paper_configs_are_the_architectures_the_chapters_need():
    assert paper.config("Qwen3-8B").model_type == "qwen3"           # QK-norm
    assert paper.config("Qwen2.5-7B").model_type == "qwen2"
    assert paper.config("meta-llama/Llama-3.1-8B").num_key_value_heads == 8   # by hub id
    with pytest.raises(KeyError, match="not one of the paper's models"):
        paper.config("gpt-5")


def test_llama31_8b_in_float32_is_refused_on_a_24_gb_machine():
    p = M.plan("Llama-3.1-8B", "cpu", "float32", T=1024, available={"cpu": 24 * GiB})
    assert not p.fits
    assert p.need.weights == 8_030_261_248 * 4
    with pytest.raises(M.MemoryPlanError):
        p.check()


def test_llama31_8b_in_bfloat16_is_accepted_on_an_80_gb_gpu():
    p = M.plan("Llama-3.1-8B", "cuda", "bfloat16", T=1024, batch=1,
               available={"cpu": 24 * GiB, "cuda": [80 * GiB]})
    assert p.fits and p.check() is p
    assert p.need.weights == 8_030_261_248 * 2 and p.need.transient == 0   # no host-side cast


def test_refusal_says_what_is_needed():
    msg = M.plan("Llama-3.1-8B", "cpu", "float32", T=1024,
                 available={"cpu": 24 * GiB}).message()
    # float32 weights + the bfloat16 checkpoint read while casting + process + tokenizer
    P = 8_030_261_248
    need = P * 4 + P * 2 + memory.RUNTIME_CPU + 128_256 * memory.TOKENIZER_PER_ENTRY
    assert f"{need / GB:.1f}" == "48.7"
    assert "Llama-3.1-8B in float32 on cpu needs about 48.7 GB" in msg
    assert "weights 32.1 GB" in msg and "stored in another dtype 16.1 GB" in msg


def test_refusal_says_what_is_free():
    msg = M.plan("Llama-3.1-8B", "cpu", "float32", T=1024,
                 available={"cpu": 24 * GiB}).message()
    assert f"free: {24 * GiB / GB:.1f} GB" in msg


def test_refusal_says_which_dtype_and_device_would_fit():
    msg = M.plan("Llama-3.1-8B", "cpu", "float32", T=1024,
                 available={"cpu": 24 * GiB, "cuda": [24 * GiB]}).message()
    assert 'device="cpu", dtype="bfloat16" (needs 17.' in msg       # no cast: stored in bf16
    assert 'device="cuda", dtype="bfloat16"' in msg
    assert 'device="cuda", dtype="float32"' not in msg              # 32 GB of weights


def test_refusal_when_nothing_fits_says_so():
    msg = M.plan("Qwen2.5-14B", "cpu", "float32", T=1024,
                 available={"cpu": 24 * GiB}).message()
    assert "No dtype fits on any device here" in msg and "check_memory=False" in msg


def test_auto_without_a_gpu_is_planned_on_the_cpu():
    here = {"cpu": 24 * GiB, "cuda": []}
    auto = M.plan("Qwen2.5-3B", "auto", "bfloat16", T=150, available=here)
    cpu = M.plan("Qwen2.5-3B", "cpu", "bfloat16", T=150, available=here)
    assert auto.device == "cpu" and auto.fits and auto.need == cpu.need
    two = M.plan("Qwen2.5-14B", "auto", "bfloat16", T=150,
                 available={"cpu": 24 * GiB, "cuda": [24 * GiB, 24 * GiB]})
    assert two.fits and two.free == 48 * GiB          # the map spreads the layers over both


def test_attention_grows_with_t_squared_and_batch():
    cfg = paper.config("Qwen2.5-7B")
    a = memory.need(cfg, "cuda", "bfloat16", T=512, batch=1).attention
    assert memory.need(cfg, "cuda", "bfloat16", T=1024, batch=1).attention == 4 * a
    assert memory.need(cfg, "cuda", "bfloat16", T=512, batch=8).attention == 8 * a
    # bf16: scores (2 bytes) + float32 softmax (4) per element, plus a bf16 mask per position pair
    assert a == 28 * 512 * 512 * 6 + 512 * 512 * 2


def test_load_plans_before_reading_any_weight(monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the memory plan refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setattr(memory, "machine", lambda available=None: {"cpu": 100 * 2 ** 20,
                                                                   "cuda": []})
    with pytest.raises(M.MemoryPlanError, match="smollm2-135m in float32 on cpu needs about"):
        M.load("smollm2-135m", T=150, batch=8)


_PEAK = textwrap.dedent("""
    import json, os, re, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    torch.set_grad_enabled(False)
    from ctr import analysis, data, models
    name, dtype, T, B = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    m = models.load(name, dtype=dtype, T=T, batch=B)
    analysis.heads(m, data.long_texts(B, min_words=2 * T, seed=0), max_tokens=T, batch_size=B,
                   progress=False)
    hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
    print(json.dumps(int(hwm) * 1024))
""")


@pytest.mark.slow
def test_plan_is_within_25_percent_of_the_measured_peak():
    """Two fresh processes at once (one float32, one bfloat16: a cast while loading), each loading
    an embedded model and running the per-head analysis; peak resident set from the kernel."""
    cases = [("smollm2-135m", "bfloat16", 256, 1), ("gemma3-270m", "float32", 128, 4)]
    for name, *_ in cases:
        if name not in M.available():
            pytest.fail(f"{name} is not installed; run `make setup`")
    procs = [subprocess.Popen([sys.executable, "-c", _PEAK, *map(str, c)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cases]
    for c, p in zip(cases, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        measured = json.loads(out.strip().splitlines()[-1])
        est = M.plan(c[0], "cpu", c[1], T=c[2], batch=c[3]).need.peak
        assert abs(est / measured - 1) < 0.25, f"{c}: plan {est / GiB:.2f} GiB, " \
                                               f"measured {measured / GiB:.2f} GiB"


# --- the adapt page's paper-models section -----------------------------------------------------

def test_paper_models_table_plans_each_chapter_on_one_gpu():
    from ctr.chapters.adapt import paper as AP

    df = AP.chapters({"taxonomy": {"seconds": 100.0, "smoke": False},
                      "sinks": {"seconds": 10.0, "smoke": True}}, ["tiny-random-llama"])
    row = df.set_index("chapter").loc["taxonomy"]
    # the 14B pair at T=1024: 29.5 GB of bf16 weights, more than a 24 GB GPU holds
    assert row["fits"] == "40 GB GPU" and row["memory (largest model)"].startswith("30.")
    assert "(here: 100 s on the CPU)" in row["expected time"]
    assert "run the chapter here first" in df.set_index("chapter").loc["sinks", "expected time"]
    cmd = AP.command(AP.RUNS[3])
    assert cmd == ('make chapter NAME=taxonomy ONLINE=1 PARAMS="device=cuda dtype=bfloat16 '
                   'pairs=[[meta-llama/Llama-3.1-8B,deepseek-ai/DeepSeek-R1-Distill-Llama-8B],'
                   '[Qwen/Qwen2.5-14B,deepseek-ai/DeepSeek-R1-Distill-Qwen-14B]] n_prompts=200"')
    shown = AP.commands()
    assert max(map(len, shown.splitlines())) <= 79
    # what the shell reads: backslash-newline removed (inside double quotes too)
    assert cmd in shown.replace("\\\n", "")


def test_expected_time_scales_forward_flops_and_reductions():
    from ctr.chapters.adapt import paper as AP

    small, big = paper.config("Qwen2.5-3B"), paper.config("Qwen2.5-14B")
    # T = 1024: no reduction share; the forward scales by the FLOP ratio over the speed-ups
    r = AP.flops_per_token(big, 1024) / AP.flops_per_token(small, 1024)
    fast, slow = AP.expected_seconds(100.0, [small], [big], 1024)
    assert fast == pytest.approx(100 * r / 500) and slow == pytest.approx(100 * r / 100)
    # T = 150: 22% of the time is per-head reductions, scaled by layers x heads x head dim
    hd = (48 * 40 * 128) / (36 * 16 * 128)
    fast, slow = AP.expected_seconds(100.0, [small], [small], 150)
    assert fast == pytest.approx(78 / 500 + 22) and slow == pytest.approx(78 / 100 + 22)
    assert AP.expected_seconds(100.0, [small], [big], 150)[0] > 22 * hd
    # 2 P' + 4 L T H D, P' without the (tied) embedding
    P = paper.n_params(small) - 151936 * 2048
    assert AP.flops_per_token(small, 150) == 2 * P + 4 * 36 * 150 * 16 * 128


def test_memory_table_on_a_24_gb_machine():
    from ctr.chapters.adapt import paper as AP

    t = AP.memory_table(cpu_free=24 * GiB).set_index(["model", "dtype"])
    cpu = [c for c in t.columns if c.startswith("CPU here")][0]
    assert t.loc[("Llama-3.1-8B", "float32"), cpu].endswith("refused")
    assert t.loc[("Llama-3.1-8B", "bfloat16"), cpu].endswith("fits")
    assert t.loc[("Llama-3.1-8B", "bfloat16"), "80 GB GPU"].endswith("fits")
    assert t.loc[("Qwen2.5-14B", "float32"), "40 GB GPU"].endswith("refused")
