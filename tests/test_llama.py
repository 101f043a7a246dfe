"""adakv_local.Llama: the drop-in for llama_cpp.Llama, its options, hook, statistics and chat."""

from __future__ import annotations

import numpy as np
import pytest

import adakv_local
from adakv_local.eval.fidelity import attention_l1, compare, teacher_forced_logits
from adakv_local.llama import Llama

PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 6
CONT = " Then the story went on for a long time"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=3, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, seed=21))


def test_package_exports_llama():
    assert adakv_local.Llama is Llama
    import llama_cpp

    assert issubclass(Llama, llama_cpp.Llama)


def test_budget_none_is_exactly_llama_cpp(tiny):
    import llama_cpp

    kw = dict(model_path=tiny, n_ctx=512, logits_all=True, seed=0, verbose=False)
    ours, ref = Llama(**kw), llama_cpp.Llama(**kw)
    assert ours.adakv_stats is None
    for llm in (ours, ref):
        llm.eval(llm.tokenize(PROMPT.encode()))
        llm.eval(llm.tokenize(CONT.encode(), add_bos=False))
    np.testing.assert_array_equal(np.array(ours.scores[: ours.n_tokens]), np.array(ref.scores[: ref.n_tokens]))
    a = ours.create_completion(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    b = ref.create_completion(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert a == b


def test_attention_l1_by_hand():
    full = np.array([[[1.0, -1.0], [2.0, 2.0]]])  # 1 layer, 2 tokens, width 2
    comp = np.array([[[1.5, -1.0], [2.0, 1.0]]])
    # token 0: 0.5 / 2, token 1: 1 / 4
    assert attention_l1(full, comp) == pytest.approx(0.25)
    assert attention_l1(full, full) == 0
    with pytest.raises(ValueError, match="equal"):
        attention_l1(full, comp[:, :1])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"adakv_budget": -5}, "adakv_budget"),
        ({"adakv_budget": 0}, "adakv_budget"),
        ({"adakv_budget": 1.5}, "adakv_budget"),
        ({"adakv_budget": "64"}, "adakv_budget"),
        ({"adakv_budget": True}, "adakv_budget"),
        ({"adakv_budget": 16}, "adakv_budget"),  # below the window (32)
        ({"adakv_budget": 64, "adakv_method": "h2o"}, "adakv_method"),
        ({"adakv_budget": 64, "adakv_alpha": 1.5}, "adakv_alpha"),
        ({"adakv_budget": 64, "adakv_window": 0}, "adakv_window"),
        ({"adakv_budget": 64, "adakv_kernel": 4}, "adakv_kernel"),
        ({"adakv_budget": 64, "adakv_pooling": "min"}, "adakv_pooling"),
        ({"adakv_budget": 64, "adakv_gqa": "sum"}, "adakv_gqa"),
        ({"adakv_budget": 64, "adakv_max_ratio": 0.5}, "adakv_max_ratio"),
        ({"adakv_budget": 64, "adakv_sinks": -1}, "adakv_sinks"),
        ({"adakv_budget": 64, "adakv_span_share": -0.25}, "adakv_span_share"),
        ({"adakv_method": "snapkv"}, "adakv_budget"),  # options without a budget
        ({"adakv_budget": 64, "n_ubatch": 16}, "adakv_window"),
    ],
)
def test_bad_options_are_refused_before_loading(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Llama(model_path="/nonexistent.gguf", verbose=False, **kwargs)


def test_flash_attention_off_is_refused(tiny):
    with pytest.raises(ValueError, match="flash attention"):
        Llama(model_path=tiny, adakv_budget=64, flash_attn=False, verbose=False)


def make(path, budget, method="ada-snapkv", **kw):
    return Llama(model_path=path, n_ctx=1024, adakv_budget=budget, adakv_method=method, adakv_window=8,
                 seed=0, verbose=False, **kw)


def test_short_prompts_are_left_alone(tiny):
    llm = make(tiny, 512)
    llm.eval(llm.tokenize(PROMPT.encode()))
    st = llm.adakv_stats  # a record that says so
    assert not st.compressed and "exceeds" in st.reason and st.cells_after == st.prompt_tokens == llm.n_tokens
    assert llm._adakv.footprint() == 0


def test_a_new_config_is_checked_as_the_constructor_checks_it(tiny):
    import dataclasses

    from adakv_local.config import AdaKVConfig, ConfigError

    llm = make(tiny, 40, adakv_gqa="max", n_batch=64)
    made = llm.adakv_config
    assert made.gqa == "max" and llm.adakv_kvcache.gqa_reduce == "max"
    bad = [
        (dataclasses.replace(made, gqa="mean"), ConfigError, "adakv_config.gqa .*made with 'max'.*adakv_gqa='mean'"),
        (dataclasses.replace(made, window=65, budget=80), ConfigError,
         r"adakv_config.window \(65\) must fit .*n_batch \(now 64\)"),
        (dataclasses.replace(made, chunk=1020), ConfigError, "adakv_config.chunk .*at most n_ctx - window = 1016"),
        ({"budget": 40}, TypeError, "AdaKVConfig or None, got dict"),
    ]
    for value, err, msg in bad:
        with pytest.raises(err, match=msg):
            llm.adakv_config = value
        assert llm.adakv_config is made  # the setting in force is left as it was
    other = dataclasses.replace(made, budget=48, method="snapkv", window=16, kernel=3)
    llm.adakv_config = other
    toks = llm.tokenize(PROMPT.encode())
    llm.eval(toks)
    st = llm.adakv_stats
    assert st is not None and st.method == "snapkv" and st.budget == 48
    assert np.all(st.kept[list(llm.adakv_kvcache.layout.layer_ids)] == 48)
    llm.adakv_config = None  # off: no eviction
    llm.reset()
    llm.eval(toks)
    assert llm.adakv_kvcache.footprint() == 0 and llm.adakv_kvcache.n_cells() == len(toks)

    plain = Llama(model_path=tiny, n_ctx=512, verbose=False)
    with pytest.raises(ValueError, match="made without eviction .*adakv_budget"):
        plain.adakv_config = AdaKVConfig(budget=40)
    assert plain.adakv_config is None
    plain.adakv_config = None


def test_gqa_reduction_reaches_the_scores(tiny):
    """A run's gqa option reaches the graph: max and mean give other scores on a GQA model."""
    from adakv_local.eval.evaluate import run_fidelity

    llm = make(tiny, 40)
    toks = llm.tokenize(PROMPT.encode())
    llm.close()
    runs = {g: run_fidelity(tiny, [("p", toks)], ["ada-snapkv"], [24], window=8, n_continuation=4, n_threads=1,
                            options={"gqa": g}) for g in ("mean", "max")}
    assert runs["mean"][0]["kl_mean"] != runs["max"][0]["kl_mean"]
    with pytest.raises(ValueError, match=r"window must be in \[1, 8\]"):
        run_fidelity(tiny, [("p", toks)], ["ada-snapkv"], [24], window=8, options={"window": 16})


METHODS = ["ada-snapkv", "snapkv", "ada-pyramid", "pyramidkv", "streamingllm"]


@pytest.mark.parametrize("method", METHODS)
def test_budgets_windows_and_stats(tiny, method):
    budget = 40
    llm = make(tiny, budget, method)
    toks = llm.tokenize(PROMPT.encode())
    llm.eval(toks)
    st = llm.adakv_stats
    kv = llm._adakv
    assert st is not None and st.method == method and st.budget == budget
    assert st.prompt_tokens == len(toks) == st.cells_before
    kept = st.kept[list(kv.layout.layer_ids)]
    # the pooled block: each layer's kept tokens packed into ceil(their number / n_head_kv) cells
    assert st.footprint == kv.footprint() == max(-(-kept.sum(axis=1) // kv.n_head_kv))
    assert st.freed == len(toks) - st.footprint and kv.block().width == kept.max()
    assert set(st.seconds) == {"scored_ubatch", "allocate", "compact"} and st.compressed and not st.reason
    if method in ("ada-snapkv", "snapkv"):
        assert np.all(kept.sum(axis=1) == kv.n_head_kv * budget)
        assert st.footprint == budget  # Ada's memory is SnapKV's
    if method in ("snapkv", "streamingllm"):
        assert np.all(kept == budget)
    if method in ("ada-pyramid", "pyramidkv"):
        assert kept.sum() == kv.n_layer * kv.n_head_kv * budget
    window = set(range(len(toks) - 8, len(toks)))
    positions = llm.adakv_kept_positions()
    for layer in positions:
        for p in layer:
            assert window <= set(p.tolist())
            assert np.all(np.diff(p) > 0) and p[0] >= 0 and p[-1] == len(toks) - 1
    for i, il in enumerate(kv.layout.layer_ids):
        assert [len(p) for p in positions[il]] == kept[i].tolist()


def test_streaming_completion_and_two_turn_chat(tiny):
    llm = make(tiny, 40)
    chunks = list(llm.create_completion(PROMPT, max_tokens=6, stream=True, temperature=0))
    assert len(chunks) >= 1 and llm.adakv_stats is not None
    first = [{"role": "user", "content": PROMPT}]
    r1 = llm.create_chat_completion(messages=first, max_tokens=6, temperature=0)
    n1, fp1 = llm.n_tokens, llm.adakv_stats.footprint
    second = first + [r1["choices"][0]["message"], {"role": "user", "content": "And now tell it again. " * 5}]
    llm.create_chat_completion(messages=second, max_tokens=6, temperature=0)
    st = llm.adakv_stats
    # the follow-up reused the compressed cache: it started from the first turn's cells, not from scratch
    assert st.cells_before < llm.n_tokens
    assert st.cells_before > fp1 and llm.n_tokens > n1


def test_a_diverging_prompt_is_evaluated_from_scratch(tiny):
    llm = make(tiny, 40)
    llm.create_completion(PROMPT, max_tokens=2, temperature=0)
    other = "A completely different prompt about the weather in the mountains and the sea. " * 5
    out = llm.create_completion(other, max_tokens=4, temperature=0)["choices"][0]["text"]
    ref = make(tiny, 40).create_completion(other, max_tokens=4, temperature=0)["choices"][0]["text"]
    assert out == ref


def test_save_and_load_state_after_compression(tiny):
    llm = make(tiny, 40, logits_all=True)
    llm.eval(llm.tokenize(PROMPT.encode()))
    state = llm.save_state()
    cont = llm.tokenize(CONT.encode(), add_bos=False)[:6]
    n0 = llm.n_tokens
    llm.eval(cont)
    a = np.array(llm.scores[n0 : llm.n_tokens])
    llm.load_state(state)
    llm.eval(cont)
    b = np.array(llm.scores[n0 : llm.n_tokens])
    np.testing.assert_array_equal(a, b)


# --- SmolLM2 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from adakv_local.models import model_path

    return str(model_path("smollm2-135m", quiet=True))


@pytest.fixture(scope="module")
def long_prompt(smollm2):
    from adakv_local.eval.texts import documents

    name, text = next(documents(min_chars=8000))
    llm = Llama(model_path=smollm2, n_ctx=64, verbose=False, vocab_only=True)
    toks = llm.tokenize(text.encode())[:1500]
    cont = llm.tokenize(b" In short, this module", add_bos=False)
    return toks, cont


@pytest.mark.slow
def test_smollm2_allocation_shapes(smollm2, long_prompt):
    toks, _ = long_prompt
    kept = {}
    for method in ("ada-snapkv", "snapkv"):
        llm = Llama(model_path=smollm2, n_ctx=2048, adakv_budget=128, adakv_method=method, n_threads=2,
                    verbose=False)
        llm.eval(toks)
        kv = llm._adakv
        k = llm.adakv_stats.kept[list(kv.layout.layer_ids)]
        assert np.all(k.sum(axis=1) == kv.n_head_kv * 128), method
        window = set(range(len(toks) - 32, len(toks)))
        assert all(window <= set(p.tolist()) for layer in llm.adakv_kept_positions() for p in layer)
        kept[method] = k
    assert np.all(kept["snapkv"] == 128)
    assert not np.all(kept["ada-snapkv"] == 128)  # Ada moves budget between heads


@pytest.mark.slow
def test_smollm2_kl_falls_as_the_budget_grows(smollm2, long_prompt):
    toks, _ = long_prompt
    full = Llama(model_path=smollm2, n_ctx=2048, logits_all=True, flash_attn=True, n_threads=2, verbose=False)
    greedy = full.create_completion(toks, max_tokens=24, temperature=0)["choices"][0]["text"]
    cont = full.tokenize(greedy.encode(), add_bos=False)
    ref = teacher_forced_logits(full, toks, cont)
    kls = []
    for budget in (64, 256, 1024):
        llm = Llama(model_path=smollm2, n_ctx=2048, logits_all=True, adakv_budget=budget, n_threads=2, verbose=False)
        kls.append(compare(ref, teacher_forced_logits(llm, toks, cont)).kl_mean)
    assert kls[0] > kls[1] > kls[2] >= 0, kls


@pytest.mark.slow
def test_smollm2_state_roundtrip_and_two_turn_chat(smollm2, long_prompt):
    toks, cont = long_prompt
    llm = Llama(model_path=smollm2, n_ctx=2048, logits_all=True, adakv_budget=128, n_threads=2, verbose=False)
    llm.eval(toks)
    state = llm.save_state()
    n0 = llm.n_tokens
    llm.eval(cont)
    a = np.array(llm.scores[n0 : llm.n_tokens])
    llm.load_state(state)
    llm.eval(cont)
    np.testing.assert_array_equal(a, np.array(llm.scores[n0 : llm.n_tokens]))

    chat = Llama(model_path=smollm2, n_ctx=4096, adakv_budget=128, n_threads=2, verbose=False)
    text = chat.detokenize(toks[:700]).decode(errors="ignore")
    msgs = [{"role": "user", "content": "Read this and say what it is about.\n\n" + text}]
    r1 = chat.create_chat_completion(messages=msgs, max_tokens=16, temperature=0)
    assert chat.adakv_stats is not None
    msgs += [r1["choices"][0]["message"], {"role": "user", "content": "Name one function it mentions. " * 3}]
    r2 = chat.create_chat_completion(messages=msgs, max_tokens=16, temperature=0)
    assert r2["choices"][0]["message"]["content"].strip()
