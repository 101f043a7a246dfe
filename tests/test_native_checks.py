"""Native reliability, second pass (issue #24, items 4, 6, 7, 10): what the C API checks.

A state blob that cannot describe a compacted block is refused with a message and the context
left as it was; outputs passed as NULL are refused; scoring does not stay armed after a failed
decode; seq_pos_min after a compaction is what the header says it is.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from words import text

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local.llama import Llama

MAGIC_V3 = struct.pack("<II", 0x564B4441, 3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=3, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, seed=21))


def llama(path: str, **kw) -> Llama:
    opts = dict(model_path=path, n_ctx=512, n_threads=1, logits_all=True, seed=0, verbose=False,
                adakv_budget=24, adakv_window=8)
    opts.update(kw)
    return Llama(**opts)


def greedy(llm: Llama, prompt: list[int], n: int = 6) -> str:
    return llm.create_completion(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]


# --- item 7: state load -----------------------------------------------------------------------------


class Section:
    """The adakv part of a whole-context state (llama-adakv-kv.cpp, llama_adakv_state_write):
    header (magic, version, n_layer, n_head_kv), block (layout, footprint, width, pos_lo, pos_hi,
    pos_first), counts [n_layer][n_head_kv], kept positions [n_layer][n_head_kv][width]; then
    llama.cpp's own n_stream, cell_count and per cell (pos, n_seq_id, seq ids)."""

    def __init__(self, blob: bytes) -> None:
        self.at = blob.find(MAGIC_V3)
        assert self.at >= 0 and blob.find(MAGIC_V3, self.at + 1) < 0
        self.n_layer, self.n_head_kv = struct.unpack_from("<II", blob, self.at + 8)
        self.block = self.at + 16
        (self.layout, self.fp, self.width, self.lo, self.hi, self.first) = struct.unpack_from("<6i", blob, self.block)
        self.counts_at = self.block + 24
        n = self.n_layer * self.n_head_kv
        self.counts = np.frombuffer(blob, dtype="<i4", count=n, offset=self.counts_at).reshape(
            self.n_layer, self.n_head_kv)
        self.kept_at = self.counts_at + 4 * n
        self.end = self.kept_at + 4 * n * self.width
        self.cells_at = self.end + 8  # after n_stream and cell_count

    def kept(self, layer: int, head: int, c: int) -> int:
        return self.kept_at + 4 * ((layer * self.n_head_kv + head) * self.width + c)

    def field(self, name: str) -> int:
        return self.block + 4 * ("layout", "fp", "width", "lo", "hi", "first").index(name)


def _state_of_a_compressed_prompt(tiny):
    src = llama(tiny)
    src.eval(src.tokenize(text(60, 1).encode()))
    assert src.adakv_stats.footprint > 0
    state = src.save_state()
    return state, Section(bytes(state.llama_state))


def _target(tiny):
    """A context holding its own compressed prompt, and what describes it."""
    llm = llama(tiny)
    llm.eval(llm.tokenize(text(40, 9).encode()))
    return llm


def _snapshot(llm: Llama):
    kv = llm.adakv_kvcache
    return (llm.n_tokens, llm.input_ids[: llm.n_tokens].copy(), kv.footprint(), kv.starts(), kv.positions(),
            kv.view_cells())


def _assert_same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _continuation(llm: Llama) -> np.ndarray:
    n0 = llm.n_tokens
    llm.eval(llm.tokenize(b" kilo lima mike", add_bos=False))
    return np.array(llm.scores[n0 : llm.n_tokens])


def _mutate(sec: Section, blob: bytearray, mutation: str) -> bytearray:
    """One hand edit of a saved state; the message expected for it is in MUTATIONS."""
    pack = lambda off, v: struct.pack_into("<i", blob, off, v)  # noqa: E731
    assert sec.first < sec.lo <= sec.hi and sec.fp > 0
    if mutation == "first after the labels":
        pack(sec.field("first"), sec.lo + 1)
    elif mutation == "first and last swapped":
        pack(sec.field("first"), sec.hi)
        pack(sec.field("hi"), sec.first)
    elif mutation == "labels reversed":
        pack(sec.field("lo"), sec.hi)
        pack(sec.field("hi"), sec.lo)
    elif mutation == "labels longer than the block":
        pack(sec.field("lo"), sec.lo - 1)
    elif mutation == "negative first":
        pack(sec.field("first"), -5)
    elif mutation == "kept after the block":
        pack(sec.kept(0, 0, sec.width - 1), sec.hi + 1)
    elif mutation == "kept before the first":
        h = int(np.argmax(sec.counts[1]))
        pack(sec.kept(1, h, sec.width - int(sec.counts[1, h])), sec.first - 3)
    elif mutation == "kept not increasing":
        w = sec.width
        a, b = struct.unpack_from("<ii", blob, sec.kept(2, 1, w - 2))
        struct.pack_into("<ii", blob, sec.kept(2, 1, w - 2), b, a)
    elif mutation == "kept repeated":
        w = sec.width
        (b,) = struct.unpack_from("<i", blob, sec.kept(0, 1, w - 1))
        pack(sec.kept(0, 1, w - 2), b)
    elif mutation == "kept below the start":
        layer, h = np.unravel_index(int(np.argmin(sec.counts)), sec.counts.shape)
        assert sec.counts[layer, h] < sec.width
        pack(sec.kept(int(layer), int(h), 0), sec.first)
    elif mutation == "footprint and width swapped":
        pack(sec.field("fp"), sec.width)
        pack(sec.field("width"), sec.fp)
    elif mutation == "truncated in the header":
        del blob[sec.kept_at + 6 :]
    elif mutation == "truncated in the kept positions":
        del blob[sec.end - 2 :]
    else:
        raise AssertionError(mutation)
    return blob


MUTATIONS = {
    "first after the labels": "positions",
    "first and last swapped": "positions",
    "labels reversed": "positions",
    "labels longer than the block": "positions",
    "negative first": "positions",
    "kept after the block": "kept positions",
    "kept before the first": "kept positions",
    "kept not increasing": "kept positions",
    "kept repeated": "kept positions",
    "kept below the start": "kept positions",
    "footprint and width swapped": "corrupt",
    "truncated in the header": "ends inside",
    "truncated in the kept positions": "ends inside",
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_hand_edited_state_is_refused_and_the_context_left_as_it_was(tiny, mutation):
    state, sec = _state_of_a_compressed_prompt(tiny)
    state.llama_state = bytes(_mutate(sec, bytearray(state.llama_state), mutation))
    state.llama_state_size = len(state.llama_state)
    llm, twin = _target(tiny), _target(tiny)
    before = _snapshot(llm)
    with pytest.raises(RuntimeError, match="cannot load this state") as e:
        llm.load_state(state)
    assert MUTATIONS[mutation] in str(e.value), str(e.value)
    assert "save it again" in str(e.value) or "truncated" in str(e.value), str(e.value)
    _assert_same(_snapshot(llm), before)
    np.testing.assert_array_equal(_continuation(llm), _continuation(twin))


def test_cells_that_disagree_with_the_block_are_refused_and_the_context_reset(tiny):
    """A cell of the block whose position is not its label: found once the cells are read (the
    cache is no longer what it was), so the cache is cleared and the context reset."""
    state, sec = _state_of_a_compressed_prompt(tiny)
    blob = bytearray(state.llama_state)
    pos0, n_seq = struct.unpack_from("<iI", blob, sec.cells_at)
    assert (pos0, n_seq) == (sec.lo, 1)
    struct.pack_into("<i", blob, sec.cells_at, sec.lo - 1)
    state.llama_state = bytes(blob)
    llm = _target(tiny)
    with pytest.raises(RuntimeError, match="cannot load this state") as e:
        llm.load_state(state)
    assert "cell 0" in str(e.value) and "reset" in str(e.value), str(e.value)
    kv = llm.adakv_kvcache
    assert llm.n_tokens == 0 and kv.footprint() == 0 and kv.n_cells() == 0
    prompt = llm.tokenize(text(30, 4).encode())
    got = llm.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]["text"]
    fresh = llama(tiny)
    assert got == fresh.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]["text"]


def test_random_byte_flips_never_crash_and_a_refusal_changes_nothing(tiny):
    """Seeded single-byte flips anywhere in the adakv section and the cells' metadata: every load
    either succeeds or raises RuntimeError; one refused before the cells were read leaves the
    context as it was."""
    state, sec = _state_of_a_compressed_prompt(tiny)
    good = bytes(state.llama_state)
    rng = np.random.default_rng(5)
    offsets = list(rng.integers(sec.at, sec.end, size=40)) + list(rng.integers(sec.end, sec.cells_at + 64, size=12))
    llm = _target(tiny)
    for off in offsets:
        blob = bytearray(good)
        blob[off] ^= 1 << int(rng.integers(0, 8))
        state.llama_state = bytes(blob)
        before = _snapshot(llm) if llm.n_tokens else None
        try:
            llm.load_state(state)
        except RuntimeError as e:
            if "was left as it was" in str(e) and before is not None:
                _assert_same(_snapshot(llm), before)
            else:
                assert llm.n_tokens == 0, (off, str(e))
        kv = llm.adakv_kvcache
        kv.starts(), kv.footprint(), kv.positions(max(1, kv.view_cells()))
        if llm.n_tokens == 0:
            llm.eval(llm.tokenize(text(40, 9).encode()))
    state.llama_state = good
    llm.load_state(state)
    assert llm.adakv_kvcache.footprint() == sec.fp


# --- item 6: outputs passed as NULL ---------------------------------------------------------------


def _null_calls(kv):
    """Every C API call with an output pointer, called with NULL for it."""
    lib, null = kv._n.lib, kv._n.ffi.NULL
    ctx = kv._ctx
    return {
        "llama_adakv_layer_ids": lambda: lib.llama_adakv_layer_ids(ctx, null),
        "llama_adakv_get_starts": lambda: lib.llama_adakv_get_starts(ctx, null),
        "llama_adakv_get_attn_used": lambda: lib.llama_adakv_get_attn_used(ctx, null),
        "llama_adakv_get_block": lambda: lib.llama_adakv_get_block(ctx, null),
        "llama_adakv_get_memory": lambda: lib.llama_adakv_get_memory(ctx, null),
        "llama_adakv_get_compute_memory": lambda: lib.llama_adakv_get_compute_memory(ctx, null),
        "llama_adakv_get_positions": lambda: lib.llama_adakv_get_positions(ctx, null, 4),
        "llama_adakv_read_scores": lambda: lib.llama_adakv_read_scores(ctx, null, 4),
        "llama_adakv_read_rows": lambda: lib.llama_adakv_read_rows(ctx, 0, 0, 0, 1, null, 0),
        "llama_adakv_read_capture": lambda: lib.llama_adakv_read_capture(ctx, null, 3),
        "llama_adakv_compact": lambda: lib.llama_adakv_compact(ctx, null, null),
    }


def test_null_outputs_are_refused_with_a_message(tiny64):
    """A NULL output is INVALID with a message naming it, in a state where the call would otherwise
    write (scores armed and computed, a capture armed and filled), and nothing changes."""
    from test_eviction import make

    llm, kv = make(tiny64)
    toks = llm.tokenize(text(30, 2).encode())
    llm.eval(toks[:-8])
    kv.arm_scores(8)
    kv.arm_capture(8)
    llm.eval(toks[-8:])
    for fn, call in _null_calls(kv).items():
        kv.clear_last_error()
        assert call() == -1, fn
        msg = kv.last_error()
        assert msg.startswith(fn + ":") and "NULL" in msg, (fn, msg)
    assert kv.read_scores(kv.view_cells()).shape[-1] == kv.view_cells()  # still armed, still readable
    assert kv.read_capture(8).shape[1] == 8


@pytest.fixture
def fail_alloc():
    """llama_adakv_test_fail_alloc, reset to none after the test."""
    from adakv_local._native import native

    lib = native().lib
    yield lib.llama_adakv_test_fail_alloc
    lib.llama_adakv_test_fail_alloc(0)


@pytest.mark.parametrize("point", [1, 2, 3, 4], ids=["ggml_init", "ggml_new_graph_custom", "ggml_gallocr_new",
                                                    "ggml_gallocr_alloc_graph"])
def test_compaction_out_of_memory_changes_nothing(tiny64, fail_alloc, point):
    """Each allocation of the compaction graph failing: ALLOC with a message naming it, the cache
    as it was (cells, rows, no block); the same compaction then succeeds."""
    from test_eviction import WINDOW, make, prefill, random_kept

    from adakv_local.errors import NativeAllocError

    llm, kv = make(tiny64)
    prefill(llm, kv, llm.tokenize(text(40, 3).encode()))
    n, rows = kv.view_cells(), kv.read_rows(0, "k", 0, kv.view_cells())
    kept = random_kept(kv, n, WINDOW, seed=1)
    fail_alloc(point)
    names = ("ggml_init", "ggml_new_graph_custom", "ggml_gallocr_new", "ggml_gallocr_alloc_graph")
    with pytest.raises(NativeAllocError, match=rf"out of memory .*\({names[point - 1]} failed\); nothing was changed"):
        kv.compact(kept)
    assert kv.footprint() == 0 and kv.view_cells() == n
    np.testing.assert_array_equal(kv.read_rows(0, "k", 0, n), rows)
    fail_alloc(0)
    assert kv.compact(kept) > 0


@pytest.mark.parametrize("point", [1, 2])
def test_enable_and_capture_out_of_memory_are_reported(tiny64, fail_alloc, point):
    from test_eviction import make

    from adakv_local.errors import NativeAllocError

    fail_alloc(point)
    with pytest.raises(NativeAllocError):
        make(tiny64)
    fail_alloc(0)
    llm, kv = make(tiny64)
    fail_alloc(point)
    with pytest.raises(NativeAllocError, match="llama_adakv_arm_capture"):
        kv.arm_capture(4)
    fail_alloc(0)
    llm.eval(llm.tokenize(b" a b c"))  # the failed arming left nothing armed
    with pytest.raises(Exception, match="not armed"):
        kv.read_capture(4)


# --- item 4: scoring after a failed decode --------------------------------------------------------


@pytest.mark.parametrize("failure", ["invalid token", "batch past the cache"])
def test_a_failed_decode_disarms_the_scoring(tiny64, failure):
    """The decode after arm_scores fails: the scoring is disarmed (read_scores says why), the next
    decode builds no score nodes (its graph is the unarmed one: reused from the decode before),
    and arming again scores as usual."""
    from test_eviction import make

    from adakv_local.errors import NativeInvalidArgument

    llm, kv = make(tiny64, n_ctx=256)
    toks = llm.tokenize(text(40, 3).encode())
    llm.eval(toks[:-8])
    kv.arm_scores(8)
    n0 = llm.n_tokens
    bad = [llm.n_vocab() + 7] * 8 if failure == "invalid token" else toks[:8] * 40  # 320 tokens > n_ctx
    with pytest.raises(RuntimeError):
        llm.eval(bad)
    llm.n_tokens = n0
    llm._ctx.kv_cache_seq_rm(-1, n0, -1)
    with pytest.raises(NativeInvalidArgument, match=r"llama_decode call after arming failed \(it returned -?\d+\)"):
        kv.read_scores()
    llm.eval(toks[-8:])  # not armed: not scored
    with pytest.raises(NativeInvalidArgument, match="scoring was not armed"):
        kv.read_scores()
    llm._ctx.kv_cache_seq_rm(-1, n0, -1)
    llm.n_tokens = n0
    kv.arm_scores(8)
    llm.eval(toks[-8:])
    assert kv.read_scores().any()


# --- item 10: seq_pos_min after a compaction -------------------------------------------------------


def test_seq_pos_min_is_the_first_label_and_prefix_reuse_is_not_misled(tiny):
    """After a compaction the R cells of the block carry the labels P - R + 1 .. P, and
    llama_memory_seq_pos_min reports the first label (documented in llama-adakv.h): every position
    of [pos_min, pos_max] has a cell, as llama.h promises, and a caller that reads pos_min > 0 as
    "the earlier positions are gone" (llama.cpp's server does so for SWA caches) is right.
    llama-cpp-python's prefix reuse asks seq_rm instead, which refuses any cut inside the block:
    a prompt that leaves the history anywhere inside it is evaluated from scratch, one that leaves
    it after the block reuses the block."""
    import llama_cpp

    llm = llama(tiny)
    hist = llm.tokenize(text(60, 1).encode())
    llm.eval(hist)
    kv, mem = llm.adakv_kvcache, llama_cpp.llama_get_memory(llm.ctx)
    r, p = kv.footprint(), len(hist) - 1
    assert 0 < r < len(hist)
    assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == p - r + 1
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == p
    tail = llm.tokenize(b" zulu yankee xray", add_bos=False)
    for keep in (1, p - r, p - r + 1, p, len(hist)):  # the new prompt shares hist[:keep]
        prompt = hist[:keep] + tail
        want = greedy(llama(tiny), prompt) if keep <= p else None
        twin = llama(tiny)
        twin.eval(hist)
        got = greedy(twin, prompt)
        if want is not None:
            assert got == want, keep
        else:  # the block is reused: the same as evaluating the tail after it
            ref = llama(tiny)
            ref.eval(hist)
            ref.eval(tail)
            assert twin.n_tokens >= len(prompt) and list(twin.input_ids[: len(prompt)]) == prompt
            np.testing.assert_array_equal(np.array(twin.scores[len(hist) : len(prompt)]),
                                          np.array(ref.scores[len(hist) : len(prompt)]))
            assert got == greedy(ref, prompt)


# --- item 9: compute buffers reserved for the worst graph -----------------------------------------

_GROW = """
import sys
from adakv_local.llama import Llama
from adakv_local.testing import write_llama_gguf
import numpy as np

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
def text(n, seed):
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n))

path = write_llama_gguf(sys.argv[1], n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, seed=21)
llm = Llama(model_path=str(path), n_ctx=1024, n_threads=1, seed=0, verbose=True, adakv_budget=64, adakv_window=8)
llm.eval(llm.tokenize(text(350, 1).encode()))           # longer than the cache: chunks, probes, compactions
llm.eval(llm.tokenize(b" more words here", add_bos=False))  # decoding after the block
llm.eval(llm.tokenize((" " + text(120, 2)).encode(), add_bos=False))  # a second prompt, compressed again
assert llm.adakv_stats.footprint > 0
llm.close()
"""


@pytest.mark.parametrize("route", ["auto", "mask", "heads", "rect"])
def test_no_compute_buffer_grows_after_the_reserve(tmp_path, route):
    """llama.cpp reserves its compute buffers for the worst graph when the context is made (and
    again when eviction is enabled), and checks when the context is freed that none grew since:
    the window scores, the gathered view of the block and the per-head mask must be part of that
    worst graph, or a GPU can run out of memory in the middle of a prompt."""
    from test_reliability import _run_isolated

    env = {"ADAKV_LAYOUT": "rect"} if route == "rect" else {"ADAKV_ATTN_PATH": route}
    proc = _run_isolated(_GROW, str(tmp_path / "t.gguf"), timeout=600, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "compute buffer size" in ln and "~llama_context" in ln]
    assert lines and all("matches expectation" in ln for ln in lines), "\n".join(lines)
    assert "no reserved adakv graph" not in proc.stderr  # every graph had its variant's reserved plan


_GROW_LOGITS = """
import sys
from adakv_local.llama import Llama
from adakv_local.testing import write_llama_gguf
import numpy as np

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
def text(n, seed):
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n))

# SmolLM2-135M's attention and vocabulary (9 query heads, 3 KV heads of 64, 49,152 tokens), one layer
path = write_llama_gguf(sys.argv[1], n_layer=1, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152,
                        seed=21, dtype="f16")
llm = Llama(model_path=str(path), n_ctx=8192, n_threads=2, logits_all=True, seed=0, verbose=True, adakv_budget=512)
prompt = llm.tokenize(text(770, 1).encode())
assert 4096 < len(prompt) < 8192, len(prompt)
llm.create_completion(prompt, max_tokens=4, temperature=0.0)  # the prompt, compressed, then decoding
llm.eval(llm.tokenize((" " + text(100, 2)).encode(), add_bos=False))  # a second prompt after the block
assert llm.adakv_stats.footprint > 0
cm = llm.adakv_kvcache.compute_memory()
assert cm.allocated == cm.reserved > 96 << 20, cm  # the logits of 512 tokens: 96 MiB
print("COMPUTE", cm.reserved, cm.allocated, file=sys.stderr)
llm.close()
"""


def test_no_compute_buffer_grows_with_every_token_an_output(tmp_path):
    """The issue's own case on a one-layer model with SmolLM2-135M's shapes: with logits_all every
    ubatch ends with a [49,152, n_tokens] F32 output (96 MiB at 512 tokens), and ggml's allocator,
    planning a graph whose topology differs from the reserved one from that graph's own (smaller)
    shapes, placed it after a few more MiB than the reserve's plan did: 98.25 MiB reserved, 102.51
    MiB used. Every adakv variant's graph is planned at its reserved shapes instead."""
    from test_reliability import _run_isolated

    proc = _run_isolated(_GROW_LOGITS, str(tmp_path / "t.gguf"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "compute buffer size" in ln and "~llama_context" in ln]
    assert lines and all("matches expectation" in ln for ln in lines), "\n".join(lines)
    assert "no reserved adakv graph" not in proc.stderr  # every graph had its variant's reserved plan
