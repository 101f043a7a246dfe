"""The pooled block (the default layout): the same kept sets give the logits of the rect layout.

The rect layout (each head from its own start cell of a rectangle as wide as the largest head) is
the reference: its attention routes are checked against per-head references in test_eviction.py
and test_fattn_op.py. The pooled layout stores each head's kept rows one after the other; its
routes are the pooled rows read in the CPU kernel (patch 0004) and the per-ubatch gather of the
block's view with stock ops (``ADAKV_ATTN_PATH=mask|heads``, the route of Metal and the rest).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from test_eviction import CONT, PROMPT, WINDOW, block_cells, continuation_logits, make, prefill, random_kept

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local.errors import NativeInvalidArgument

MORE = b" Another paragraph follows here, with new words in it, and numbers: 31337 and 2048."

# attention route of the pooled context -> what attn_used() reports once the block exists
ROUTES = {"auto": "kernel", "mask": "pool-mask", "heads": "gather-heads"}


def run(path, layout, route, type_kv, seed):
    """Prefill, compress, a multi-token continuation, two one-token decodes, a second prompt
    compressed again, another continuation: every logit, the footprints and the routes used."""
    llm, kv = make(path, type_kv=type_kv, layout=layout, attn_path=route)
    prefill(llm, kv, llm.tokenize(PROMPT))
    r1 = kv.compact(random_kept(kv, kv.view_cells(), WINDOW, seed=seed))
    out = [continuation_logits(llm, CONT)]
    used = kv.attn_used()  # a batch of more than 32 tokens
    out += [continuation_logits(llm, t) for t in (b" and", b" then")]
    used = (used, kv.attn_used())  # and one-token decodes
    prefill(llm, kv, llm.tokenize(MORE, add_bos=False))
    r2 = kv.compact(random_kept(kv, kv.view_cells(), WINDOW, seed=seed + 1))
    out.append(continuation_logits(llm, CONT))
    return np.concatenate(out), (r1, r2), used, kv


@pytest.mark.exactness
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("type_kv", ["f16", "q8_0", "q4_0"])
def test_pooled_equals_rect(tiny64, type_kv, route):
    seed = zlib.crc32(f"{type_kv}{route}".encode())
    ref, ref_r, ref_used, _ = run(tiny64, "rect", "auto", type_kv, seed)
    got, got_r, used, kv = run(tiny64, "pooled", route, type_kv, seed)
    assert ref_used == (["kernel"] * kv.n_layer,) * 2
    # the pool mask serves ubatches of up to 32 tokens; a larger one gathers the block once
    batch = "gather-mask" if route == "mask" else ROUTES[route]
    assert used == ([batch] * kv.n_layer, [ROUTES[route]] * kv.n_layer), used
    if route == "auto":
        # the kernel walks the same rows in the same order (pooled rows, then the cells after them)
        np.testing.assert_array_equal(got, ref, err_msg=type_kv)
    else:
        same, _, same_used, _ = run(tiny64, "rect", route, type_kv, seed)
        assert same_used == ([route] * kv.n_layer,) * 2, same_used
        if route == "heads":
            # the gathered view holds the cache's own bytes in the rect layout's order, read by the
            # same stock calls as the rect layout's route
            np.testing.assert_array_equal(got, same, err_msg=f"{type_kv} {route}")
        else:
            # the pool mask: the same rows in the same order, among the other heads' rows (masked);
            # the kernel's tiles and threads split a longer row of columns otherwise, so the sums
            # group differently (measured up to 3e-5 of the largest logit)
            scale = float(np.abs(same).max())
            err = float(np.abs(got - same).max())
            assert err <= 2e-4 * scale, (type_kv, route, err, scale)
    # the pooled block is smaller: the mean kept count per head, rounded up, not the largest
    assert got_r[0] < ref_r[0] and got_r[1] < ref_r[1], (got_r, ref_r)


@pytest.mark.exactness
@pytest.mark.parametrize("type_kv", ["f16", "q8_0"])
def test_pooled_block_bytes_are_the_sum_of_the_kept_rows(tiny64, type_kv):
    llm, kv = make(tiny64, type_kv=type_kv)
    prefill(llm, kv, llm.tokenize(PROMPT))
    kept = random_kept(kv, kv.view_cells(), WINDOW, seed=11)
    r = kv.compact(kept)
    assert r == block_cells(kept, "pooled")
    mem = kv.memory()
    rows = max(sum(len(c) for c in layer) for layer in kept)
    # the cells the sequence uses cost the rows kept by the fullest layer, rounded up to a cell
    assert mem.used_bytes(kv.n_cells()) == r * mem.cell_bytes
    assert r * kv.n_head_kv - rows < kv.n_head_kv


def test_pooled_positions_and_starts_are_those_of_the_view(tiny64):
    out = {}
    for layout in ("pooled", "rect"):
        llm, kv = make(tiny64, layout=layout)
        prefill(llm, kv, llm.tokenize(PROMPT))
        kv.compact(random_kept(kv, kv.view_cells(), WINDOW, seed=21))
        llm.eval(llm.tokenize(b" more words", add_bos=False))
        out[layout] = (kv.positions(), kv.starts(), kv.view_cells())
    for a, b in zip(out["pooled"], out["rect"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_state_of_another_layout_is_refused(tiny64):
    llm, kv = make(tiny64, layout="rect")
    prefill(llm, kv, llm.tokenize(PROMPT))
    kv.compact(random_kept(kv, kv.view_cells(), WINDOW, seed=3))
    state = llm.save_state()
    other, kv2 = make(tiny64, layout="pooled")
    kv2.clear_last_error()
    with pytest.raises(RuntimeError):
        other.load_state(state)
    assert "rect layout and this context uses the pooled one" in kv2.last_error()


def test_state_of_the_previous_version_is_refused(tiny64):
    """A state saved before the pooled block (adakv state version 2) is refused with a message that
    says so; its header is written here as that version wrote it."""
    import struct

    llm, kv = make(tiny64)
    prefill(llm, kv, llm.tokenize(PROMPT))
    kv.compact(random_kept(kv, kv.view_cells(), WINDOW, seed=3))
    state = llm.save_state()
    blob = bytes(state.llama_state)
    at = blob.find(struct.pack("<II", 0x564B4441, 3))
    assert at >= 0
    old = blob[:at] + struct.pack("<II", 0x564B4441, 2) + blob[at + 8 :]
    state.llama_state = old
    other, kv2 = make(tiny64)
    kv2.clear_last_error()
    with pytest.raises(RuntimeError):
        other.load_state(state)
    assert "before the pooled block (state version 2)" in kv2.last_error()


@pytest.mark.parametrize("mutation", ["count above the width", "count zero", "rows past the block"])
def test_state_with_a_corrupt_block_is_refused(tiny64, mutation):
    """The saved per-head counts must describe the saved block (a head's rows inside its cells)."""
    import struct

    llm, kv = make(tiny64)
    prefill(llm, kv, llm.tokenize(PROMPT))
    kv.compact(random_kept(kv, kv.view_cells(), WINDOW, seed=3))
    state = llm.save_state()
    blob = bytearray(bytes(state.llama_state))
    at = bytes(blob).find(struct.pack("<II", 0x564B4441, 3))
    layout, fp, width = struct.unpack_from("<iii", blob, at + 16)
    counts = at + 16 + 24  # after the header (4 x 4 bytes) and the block (6 x 4 bytes)
    if mutation == "count above the width":
        struct.pack_into("<i", blob, counts, width + 1)
    elif mutation == "count zero":
        struct.pack_into("<i", blob, counts, 0)
    else:  # every head of layer 0 keeps the width: more rows than the block's cells hold
        for h in range(kv.n_head_kv):
            struct.pack_into("<i", blob, counts + 4 * h, width)
        assert width * kv.n_head_kv > fp * kv.n_head_kv
    state.llama_state = bytes(blob)
    other, kv2 = make(tiny64)
    kv2.clear_last_error()
    with pytest.raises(RuntimeError):
        other.load_state(state)
    assert "start table is corrupt" in kv2.last_error()
    assert kv2.footprint() == 0


def test_layout_is_checked(tiny64):
    with pytest.raises(ValueError, match="layout must be one of"):
        make(tiny64, layout="square")


def test_a_head_cannot_keep_more_than_the_cache(tiny64):
    llm, kv = make(tiny64, n_ctx=256)
    toks = llm.tokenize(PROMPT)
    prefill(llm, kv, toks)
    n = kv.view_cells()
    kept = [[np.arange(n, dtype=np.int32)] * kv.n_head_kv for _ in range(kv.n_layer)]
    kept[0][0] = np.arange(n + 1, dtype=np.int32)
    with pytest.raises(NativeInvalidArgument, match="keeps"):
        kv.compact(kept)
    assert kv.footprint() == 0
