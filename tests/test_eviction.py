"""Per-head KV eviction inside llama.cpp (CPU): scores, compaction, attention with start cells, guards.

Exactness tests compare each fast path with a plain reference: window scores with a float64
numpy computation from the same Q and K, compaction with the rows read back before it, the
attention fast path with the per-head fallback (itself checked against numpy in
test_fattn_op.py), and "keep every cell" with no eviction at all.
"""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import pytest

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local.errors import NativeInvalidArgument
from adakv_local.fattn import GGML_TYPES, window_scores_cpu
from adakv_local.kvcache import KVCache

WINDOW = 8
PROMPT = b"The quick brown fox jumps over the lazy dog while the cat sleeps. " * 3
CONT = b" Then a long time passed, and the story went on and on"


def _has_gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


needs_gpu = pytest.mark.skipif(not _has_gpu(), reason="this libllama has no GPU backend (build with -DADAKV_CUDA=ON)")
ALL_LAYERS = 999  # n_gpu_layers: every layer (and its KV cache) on the GPU
# n_gpu_layers of the tests that run on the CPU and, where this build has one, on a GPU
DEVICES = [pytest.param(0, id="cpu"), pytest.param(ALL_LAYERS, id="gpu", marks=needs_gpu)]


def make(
    path, *, type_kv: str = "f16", force_fallback: bool | None = None, n_ctx: int = 512, enable: bool = True,
    n_gpu_layers: int = 0, gqa_reduce: str = "mean", layout: str = "pooled", attn_path: str | None = None,
):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=True, logits_all=True,
        type_k=GGML_TYPES[type_kv], type_v=GGML_TYPES[type_kv], n_threads=2, seed=0, verbose=False,
        n_gpu_layers=n_gpu_layers,
    )  # fmt: skip
    if attn_path is None and force_fallback is not None:
        attn_path = "heads" if force_fallback else "auto"
    if not enable:
        return llm, None
    return llm, KVCache.from_llama(llm, attn_path=attn_path or "auto", gqa_reduce=gqa_reduce, layout=layout)


def prefill(llm, kv, tokens, window=WINDOW):
    """Evaluate a prompt with its last `window` tokens scored; returns the scores."""
    llm.eval(tokens[:-window])
    kv.arm_scores(window)
    llm.eval(tokens[-window:])
    return kv.read_scores()


def continuation_logits(llm, text=CONT):
    toks = llm.tokenize(text, add_bos=False)
    n0 = llm.n_tokens
    llm.eval(toks)
    return np.array(llm.scores[n0 : llm.n_tokens])


def random_kept(kv, n_cells, window, seed, min_keep=2):
    """Random per-head kept sets that always include the window."""
    rng = np.random.default_rng(seed)
    starts = kv.starts()
    kept = []
    for layer in range(kv.n_layer):
        heads = []
        for h in range(kv.n_head_kv):
            lo = int(starts[layer, h])
            pool = np.arange(lo, n_cells - window)
            n = int(rng.integers(min_keep, max(min_keep + 1, len(pool))))
            pick = rng.choice(pool, size=min(n, len(pool)), replace=False)
            heads.append(np.sort(np.concatenate([pick, np.arange(n_cells - window, n_cells)])).astype(np.int32))
        kept.append(heads)
    return kept


# --- window scores -------------------------------------------------------------------------------


def scores_reference(q, k, mask, starts, scale, reduce):
    """float64: sum over queries of softmax attention, cells below start[h] excluded, GQA-reduced."""
    n_head, n_q, _ = q.shape
    n_head_kv, n_kv, _ = k.shape
    g = n_head // n_head_kv
    per_q_head = np.zeros((n_head, n_kv))
    for i in range(n_head):
        h = i // g
        s = scale * (q[i].astype(np.float64) @ k[h].astype(np.float64).T) + mask
        s[:, : starts[h]] = -np.inf
        p = np.exp(s - s.max(axis=1, keepdims=True))
        per_q_head[i] = (p / p.sum(axis=1, keepdims=True)).sum(axis=0)
    grouped = per_q_head.reshape(n_head_kv, g, n_kv)
    return grouped.mean(axis=1) if reduce == "mean" else grouped.max(axis=1)


@pytest.mark.exactness
@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=lambda h: f"h{h[0]}_kv{h[1]}")
@pytest.mark.parametrize("with_starts", [False, True])
def test_window_scores_match_numpy(heads, reduce, with_starts):
    n_head, n_head_kv = heads
    d, n_q, n_kv = 64, 16, 200
    rng = np.random.default_rng(zlib.crc32(repr((heads, reduce, with_starts)).encode()))
    q = rng.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    mask = np.zeros((n_q, n_kv), dtype=np.float32)
    for i in range(n_q):  # causal: the window is the last n_q cells
        mask[i, n_kv - n_q + i + 1 :] = -np.inf
    starts = np.zeros(n_head_kv, np.int32)
    if with_starts:
        starts = rng.integers(1, n_kv - n_q, size=n_head_kv).astype(np.int32)
    out, k_used = window_scores_cpu(q, k, mask, starts, 0.125, gqa_reduce=reduce)
    # the CPU matmul against an f16 K rounds Q to f16 first (as it does in the model): so does the
    # reference; what is left is float32 dot products and softmax (~1e-6 relative), summed over
    # 16 queries: 1e-5 absolute
    q16 = q.astype(np.float16).astype(np.float32)
    ref = scores_reference(q16, k_used, mask, starts, 0.125, reduce)
    err = np.abs(out - ref).max()
    assert err <= 1e-5, f"heads={heads} reduce={reduce} starts={starts.tolist()} err={err:.3g}"
    for h, s in enumerate(starts):
        assert np.all(out[h, :s] == 0.0)


@pytest.mark.exactness
def test_model_scores_are_attention_mass(tiny64):
    """Each head's scores are softmax rows summed over the window: they add up to the window size."""
    llm, kv = make(tiny64)
    toks = llm.tokenize(PROMPT)
    mean = prefill(llm, kv, toks)
    n = len(toks)
    assert mean.shape == (kv.n_layer, kv.n_head_kv, n)
    np.testing.assert_allclose(mean.sum(axis=-1), WINDOW, rtol=1e-5)
    # causal: the last cell is seen by the last query only, the cell before by two
    assert np.all(mean[..., -1] <= 1.0 + 1e-6) and np.all(mean[..., -2] <= 2.0 + 1e-6)
    assert np.all(mean >= 0)


def test_scores_need_a_last_ubatch_that_ends_with_the_window(tiny64):
    llm, kv = make(tiny64)
    toks = llm.tokenize(PROMPT)
    llm.eval(toks[:-WINDOW])
    kv.arm_scores(WINDOW)
    llm.eval(toks[-WINDOW + 2 :])  # 6 tokens, not 8
    with pytest.raises(NativeInvalidArgument, match="scored 6 tokens of its last ubatch; that ubatch must end with "
                       "the 8 window tokens"):
        kv.read_scores()
    with pytest.raises(NativeInvalidArgument, match="not armed"):
        kv.read_scores()
    with pytest.raises(NativeInvalidArgument, match="n_window must be in"):
        kv.arm_scores(0)


# --- compaction ----------------------------------------------------------------------------------


def block_cells(kept, layout):
    """R of a compaction that keeps these sets: the pooled block packs each layer's kept rows into
    ceil(their number / n_head_kv) cells, the rect block is as wide as the largest head."""
    if layout == "rect":
        return max(len(c) for layer in kept for c in layer)
    return max(-(-sum(len(c) for c in layer) // len(layer)) for layer in kept)


@pytest.mark.exactness
@pytest.mark.parametrize("layout", ["pooled", "rect"])
@pytest.mark.parametrize("n_gpu_layers", DEVICES)
@pytest.mark.parametrize("type_kv", ["f16", "q8_0", "q4_0"])
def test_compaction_is_bitwise_exact(tiny64, type_kv, n_gpu_layers, layout):
    llm, kv = make(tiny64, type_kv=type_kv, n_gpu_layers=n_gpu_layers, layout=layout)
    toks = llm.tokenize(PROMPT)
    prefill(llm, kv, toks)
    n = kv.n_cells()
    before = {(layer, w): kv.read_rows(layer, w, 0, n) for layer in range(kv.n_layer) for w in "kv"}
    kept = random_kept(kv, n, WINDOW, seed=zlib.crc32(type_kv.encode()))
    r = kv.compact(kept)
    width = max(len(c) for layer in kept for c in layer)
    assert r == block_cells(kept, layout)
    assert kv.block() == kv.block().__class__(layout, r, width, r, width)
    assert kv.n_cells() == r and kv.view_cells() == width
    starts = kv.starts()
    for layer in range(kv.n_layer):
        for w in "kv":
            after = kv.read_rows(layer, w, 0, width)  # the per-head view of the block
            for h in range(kv.n_head_kv):
                cells = kept[layer][h]
                assert starts[layer, h] == width - len(cells)
                np.testing.assert_array_equal(
                    after[width - len(cells) :, h], before[(layer, w)][cells, h],
                    err_msg=f"{type_kv} layer {layer} {w} head {h}",
                )  # fmt: skip
                assert not after[: width - len(cells), h].any()  # nothing there for this head
    # positions: the block ends at the last prompt position, decoding continues after it
    import llama_cpp

    mem = llama_cpp.llama_get_memory(llm.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == n - 1
    assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == n - r


def test_compaction_rejects_bad_kept_sets(tiny64):
    llm, kv = make(tiny64)
    toks = llm.tokenize(PROMPT)
    prefill(llm, kv, toks)
    n = kv.n_cells()
    good = random_kept(kv, n, WINDOW, seed=1)
    bad_order = [[c[::-1].copy() for c in layer] for layer in good]
    with pytest.raises(NativeInvalidArgument, match="not increasing"):
        kv.compact(bad_order)
    out_of_range = [[np.append(c, n) for c in layer] for layer in good]
    with pytest.raises(NativeInvalidArgument, match="not increasing inside"):
        kv.compact(out_of_range)
    empty = [[np.zeros(0, np.int32) for _ in layer] for layer in good]
    with pytest.raises(NativeInvalidArgument, match="keeps 0 cells"):
        kv.compact(empty)
    assert kv.footprint() == 0 and kv.n_cells() == n  # nothing changed


# --- whole model ---------------------------------------------------------------------------------


@pytest.fixture(params=["tiny64", pytest.param("smollm2", marks=pytest.mark.slow)])
def model_path(request):
    if request.param == "smollm2":
        from adakv_local.models import model_path as registry_path

        return registry_path("smollm2-135m", quiet=True)
    return request.getfixturevalue(request.param)


@pytest.mark.exactness
@pytest.mark.parametrize("n_gpu_layers", DEVICES)
def test_keeping_every_cell_equals_no_eviction(model_path, n_gpu_layers):
    ref_llm, _ = make(model_path, enable=False, n_gpu_layers=n_gpu_layers)
    toks = ref_llm.tokenize(PROMPT)
    ref_llm.eval(toks[:-WINDOW])  # the same batches as prefill(): the same kernels, bit for bit
    ref_llm.eval(toks[-WINDOW:])
    ref = continuation_logits(ref_llm)

    llm, kv = make(model_path, n_gpu_layers=n_gpu_layers)
    prefill(llm, kv, toks)
    n = kv.n_cells()
    everything = [[np.arange(n, dtype=np.int32)] * kv.n_head_kv for _ in range(kv.n_layer)]
    assert kv.compact(everything) == n
    out = continuation_logits(llm)
    if n_gpu_layers == 0:
        np.testing.assert_array_equal(out, ref)  # the same kernel with start 0
    else:
        # a GPU honours the starts in its kernel (CUDA, patch 0003) or takes another route (mask,
        # heads): the same math, possibly another kernel than the stock node without starts
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3 * max(1.0, np.abs(ref).max()))


@pytest.mark.exactness
def test_fast_path_equals_fallback_on_arbitrary_kept_sets(model_path):
    results = []
    for fallback in (False, True):
        llm, kv = make(model_path, force_fallback=fallback)
        toks = llm.tokenize(PROMPT)
        prefill(llm, kv, toks)
        kv.compact(random_kept(kv, kv.n_cells(), WINDOW, seed=5))
        # a long continuation exercises the batched (tiled) kernel, then one-token decodes
        batch = continuation_logits(llm, CONT * 2)
        single = [continuation_logits(llm, t) for t in (b" and", b" then")]
        results.append(np.concatenate([batch, *single]))
    fast, fallback = results
    # the same kernels per head: equal up to float32 rounding of the tiled path (1e-3 of logits ~1e2)
    err = np.abs(fast - fallback).max()
    assert err <= 1e-3 * max(1.0, np.abs(fallback).max()), err

    # and eviction did change the result (the test can fail)
    ref_llm, _ = make(model_path, enable=False)
    ref_llm.eval(ref_llm.tokenize(PROMPT))
    full = continuation_logits(ref_llm, CONT * 2)
    assert np.abs(full - fast[: len(full)]).max() > 1e-2


# --- attention-output capture (evaluation) -------------------------------------------------------


def captured_continuation(llm, kv, text=CONT):
    toks = llm.tokenize(text, add_bos=False)
    kv.arm_capture(len(toks))
    llm.eval(toks)
    out = kv.read_capture(len(toks))
    kv.arm_capture(0)
    return out


@pytest.mark.exactness
def test_capture_after_keeping_every_cell_equals_no_eviction(tiny64):
    ref_llm, ref_kv = make(tiny64)  # enabled, never compacted: stock attention
    toks = ref_llm.tokenize(PROMPT)
    prefill(ref_llm, ref_kv, toks)
    ref = captured_continuation(ref_llm, ref_kv)
    n_cont = len(ref_llm.tokenize(CONT, add_bos=False))
    assert ref.shape == (ref_kv.n_layer, n_cont, 4 * 64)  # n_head * d_v of every token
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0

    llm, kv = make(tiny64)
    prefill(llm, kv, toks)
    n = kv.n_cells()
    kv.compact([[np.arange(n, dtype=np.int32)] * kv.n_head_kv for _ in range(kv.n_layer)])
    np.testing.assert_array_equal(captured_continuation(llm, kv), ref)


@pytest.mark.exactness
def test_capture_fast_path_equals_fallback_and_sees_the_eviction(tiny64):
    out = []
    for fallback in (False, True):
        llm, kv = make(tiny64, force_fallback=fallback)
        prefill(llm, kv, llm.tokenize(PROMPT))
        kv.compact(random_kept(kv, kv.n_cells(), WINDOW, seed=5))
        out.append(captured_continuation(llm, kv))
    fast, fallback = out
    scale = np.abs(fallback).max()
    assert np.abs(fast - fallback).max() <= 1e-3 * scale
    full_llm, full_kv = make(tiny64)
    prefill(full_llm, full_kv, full_llm.tokenize(PROMPT))
    full = captured_continuation(full_llm, full_kv)
    assert np.abs(full - fast).max() > 1e-2 * scale


def test_capture_errors_and_ubatch_rule(tiny64):
    llm, kv = make(tiny64)
    with pytest.raises(NativeInvalidArgument, match="not armed"):
        kv.read_capture(3)
    with pytest.raises(NativeInvalidArgument, match="n_tokens must be in"):
        kv.arm_capture(513)
    kv.arm_capture(4)
    llm.eval(llm.tokenize(PROMPT))  # one ubatch of more than 4 tokens: not captured
    with pytest.raises(NativeInvalidArgument, match="captured 0"):
        kv.read_capture(4)
    llm.eval(llm.tokenize(b" a b", add_bos=False)[:3])  # 3 tokens: captured
    with pytest.raises(NativeInvalidArgument, match="asked for 4 tokens, but the last ubatch captured 3"):
        kv.read_capture(4)
    assert kv.read_capture(3).shape == (kv.n_layer, 3, 4 * 64)


# --- guards, state -------------------------------------------------------------------------------


@pytest.fixture
def compacted(tiny64):
    llm, kv = make(tiny64)
    toks = llm.tokenize(PROMPT)
    prefill(llm, kv, toks)
    kv.compact(random_kept(kv, kv.n_cells(), WINDOW, seed=3))
    return llm, kv, len(toks)


@pytest.mark.exactness
def test_state_save_load_reproduces_the_continuation(compacted, tiny64):
    llm, kv, _ = compacted
    state = llm.save_state()
    a = continuation_logits(llm)
    llm.load_state(state)
    assert kv.footprint() > 0
    b = continuation_logits(llm)
    np.testing.assert_array_equal(a, b)

    other, kv2 = make(tiny64)
    other.load_state(state)
    np.testing.assert_array_equal(kv2.starts(), kv.starts())
    np.testing.assert_array_equal(continuation_logits(other), a)


def test_seq_rm_cannot_cut_into_the_block(compacted):
    import llama_cpp

    llm, kv, n = compacted
    mem = llama_cpp.llama_get_memory(llm.ctx)
    r = kv.footprint()
    assert not llama_cpp.llama_memory_seq_rm(mem, 0, n - 2, -1)
    assert kv.footprint() == r and kv.n_cells() == r
    # tokens appended after the block can be removed
    llm.eval(llm.tokenize(b" more", add_bos=False))
    assert llama_cpp.llama_memory_seq_rm(mem, 0, n, -1)
    assert kv.n_cells() == r
    # the whole sequence can go, and the start table goes with it
    assert llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
    assert kv.footprint() == 0 and not kv.starts().any()


def test_no_shift_while_compacted(compacted):
    import llama_cpp

    llm, kv, n = compacted
    mem = llama_cpp.llama_get_memory(llm.ctx)
    assert not llama_cpp.llama_memory_can_shift(mem)
    llama_cpp.llama_memory_seq_add(mem, 0, 0, -1, -4)  # refused (logged), nothing moves
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == n - 1
    llama_cpp.llama_memory_clear(mem, True)
    assert kv.footprint() == 0 and llama_cpp.llama_memory_can_shift(mem)


def test_sequence_state_of_a_compacted_sequence_is_not_restored(compacted):
    import llama_cpp

    llm, kv, _ = compacted
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0) == size
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    assert llama_cpp.llama_state_seq_set_data(llm.ctx, buf, size, 0) == 0
    assert kv.n_cells() == 0


def test_second_prompt_is_compressed_again(compacted):
    llm, kv, n = compacted
    r1 = kv.footprint()
    starts1 = kv.starts()
    more = llm.tokenize(b" Another paragraph follows here, with new words in it.", add_bos=False)
    width1 = kv.block().width
    scores = prefill(llm, kv, more)
    n2 = kv.view_cells()
    assert kv.n_cells() == r1 + len(more) and n2 == width1 + len(more)
    for layer in range(kv.n_layer):  # cells below a head's start were invalid: they score nothing
        for h in range(kv.n_head_kv):
            assert np.all(scores[layer, h, : starts1[layer, h]] == 0)
    # a head that tries to keep the cell just below its start is refused
    below = [
        [np.concatenate([[s - 1], np.arange(s + 1, n2)]).astype(np.int32) if s > 0 else np.arange(n2, dtype=np.int32)
         for s in row]
        for row in starts1
    ]  # fmt: skip
    if starts1.max() > 0:
        with pytest.raises(NativeInvalidArgument, match="not increasing inside"):
            kv.compact(below)
    kv.compact(random_kept(kv, n2, WINDOW, seed=9))
    assert 0 < kv.footprint() <= n2
    assert np.isfinite(continuation_logits(llm)).all()


def test_enable_refuses_without_flash_attention(tiny64):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny64), n_ctx=256, flash_attn=False, verbose=False)
    with pytest.raises(NativeInvalidArgument, match="flash attention is off"):
        KVCache.from_llama(llm)


def test_enable_refuses_an_f32_cache(tiny64):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny64), n_ctx=256, flash_attn=True, type_k=0, type_v=0, verbose=False)
    with pytest.raises(NativeInvalidArgument, match="f32 KV cache is not supported"):
        KVCache.from_llama(llm)


@pytest.mark.exactness
def test_iswa_model_evicts_its_global_layers_only(tmp_path):
    from adakv_local.testing import write_gemma3_gguf

    path = write_gemma3_gguf(tmp_path / "g3.gguf", n_layer=6, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
                             sliding_window=8, sliding_window_pattern=3, seed=4)
    results = []
    for fallback in (False, True):
        llm, kv = make(path, force_fallback=fallback)
        assert kv.layout.layer_ids == (2, 5)  # the non-SWA layers of the pattern
        toks = llm.tokenize(PROMPT)
        prefill(llm, kv, toks)
        kv.compact(random_kept(kv, kv.n_cells(), WINDOW, seed=2))
        results.append(continuation_logits(llm))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-3 * np.abs(results[1]).max())


@pytest.mark.slow
def test_smollm2_retrieves_a_passkey_from_hand_picked_cells():
    """The machinery, separate from the selection: 151 hand-picked cells per head keep the pass key."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from adakv_local.eval.tasks import passkey, score
    from adakv_local.llama import Llama
    from adakv_local.models import model_path

    path = str(model_path("smollm2-135m", quiet=True))
    llm = Llama(model_path=path, n_ctx=3584, n_threads=2, adakv_budget=8000, verbose=False)  # no compression
    sample = passkey(llm, 3000, 0.5, 0, mode="chat")
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                              bos_token="<|im_start|>", add_generation_prompt=True)
    toks = llm.tokenize(fmt(messages=sample.messages()).prompt.encode(), add_bos=False, special=True)
    pieces = [llm.detokenize([t]).decode(errors="ignore") for t in toks]
    where = "".join(pieces).index(sample.answer)
    first = next(i for i in range(len(pieces)) if len("".join(pieces[: i + 1])) > where)
    llm.eval(toks)
    kv = llm._adakv
    n = kv.n_cells()
    rng = np.random.default_rng(0)
    kept = [[np.unique(np.concatenate([
        np.arange(4), np.arange(first - 10, first + 15), rng.choice(np.arange(4, n - 32), 90, replace=False),
        np.arange(n - 32, n)])).astype(np.int32) for _ in range(kv.n_head_kv)] for _ in range(kv.n_layer)]
    assert kv.compact(kept) <= 151
    import llama_cpp

    out = []
    for _ in range(10):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        out.append(int(logits.argmax()))
        llm.eval([out[-1]])
    text = llm.detokenize(out).decode(errors="ignore")
    assert score(sample, text), text
