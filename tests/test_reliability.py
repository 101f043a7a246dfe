"""Regression tests for defects that lost cached cells silently, crashed or aborted (issue #10).

Each test failed on the code before its fix. Tests whose failure was a process abort
(GGML_ASSERT / GGML_ABORT) run their scenario in a subprocess, so that the abort is reported
as a failure instead of killing the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from words import text

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local.llama import Llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=3, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, seed=21))


def llama(path: str, **kw) -> Llama:
    opts = dict(model_path=path, n_ctx=1024, n_threads=1, logits_all=True, seed=0, verbose=False,
                adakv_budget=24, adakv_window=8)
    opts.update(kw)
    return Llama(**opts)


def greedy(llm: Llama, prompt: list[int], n: int = 6) -> str:
    return llm.create_completion(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]


def last_logits(llm: Llama) -> np.ndarray:
    return np.array(llm.scores[llm.n_tokens - 1])


# --- 1. prefix reuse after a compression ---------------------------------------------------------


def test_prompt_diverging_inside_the_block_is_evaluated_from_scratch(tiny):
    """llama-cpp-python keeps the common prefix of a new prompt and removes the rest with
    seq_rm(p0 = prefix length). That p0 lies inside the compacted block (the block stands for
    positions [0, P]) though below its relabelled positions [P - R + 1, P]: it used to be taken
    for a whole-sequence removal, every cell was dropped and llama-cpp-python went on believing
    the prefix was cached."""
    llm = llama(tiny)
    a = llm.tokenize(text(60, 1).encode())
    llm.eval(a)
    assert llm.adakv_stats is not None and llm.adakv_stats.footprint < len(a)
    b = a[:60] + llm.tokenize((" " + text(8, 2)).encode(), add_bos=False)  # diverges at 60 < P - R + 1

    got = greedy(llm, b)
    fresh = llama(tiny)
    want = greedy(fresh, b)
    assert got == want
    np.testing.assert_array_equal(llm.adakv_stats.kept, fresh.adakv_stats.kept)
    assert llm._adakv.n_cells() == fresh._adakv.n_cells()


def test_seq_rm_below_the_relabelled_positions_is_refused(tiny):
    import llama_cpp

    llm = llama(tiny)
    llm.eval(llm.tokenize(text(50, 3).encode()))
    kv = llm.adakv_kvcache
    mem = llama_cpp.llama_get_memory(llm.ctx)
    r, n = kv.footprint(), kv.n_cells()
    for p0 in (1, 5, llm.n_tokens - r - 1, llm.n_tokens - r):  # all inside [0, P]
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, p0, -1), p0
        assert not llama_cpp.llama_memory_seq_rm(mem, -1, p0, -1), p0
        assert kv.footprint() == r and kv.n_cells() == n
    assert llama_cpp.llama_memory_seq_rm(mem, 0, 0, -1)  # the whole sequence may go
    assert kv.footprint() == 0 and kv.n_cells() == 0


def test_refused_removal_leaves_the_sliding_window_cache_alone(tmp_path):
    """iSWA: the base cache refused the removal, but the SWA cache used to drop its cells anyway."""
    import llama_cpp

    from adakv_local.testing import write_gemma3_gguf

    path = str(write_gemma3_gguf(tmp_path / "g3.gguf", n_layer=6, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
                                 sliding_window=16, sliding_window_pattern=3, seed=4))
    prompt = llama(path).tokenize(text(50, 5).encode())
    cont = llama(path).tokenize((" " + text(3, 6)).encode(), add_bos=False)
    ref = llama(path)
    ref.eval(prompt)
    ref.eval(cont)
    llm = llama(path)
    llm.eval(prompt)
    assert not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, 10, -1)
    llm.eval(cont)
    np.testing.assert_array_equal(np.array(llm.scores[: llm.n_tokens]), np.array(ref.scores[: ref.n_tokens]))


def _run_isolated(code: str, *args: str, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    """Runs code in a child Python that imports the adakv_local this process imported (not the
    checkout's by accident of the working directory), with env added to the environment."""
    root = str(Path(adakv_local.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=path, **env),
                          cwd=tempfile.gettempdir())


def test_shift_after_the_block_is_refused_instead_of_aborting(tiny):
    """seq_add of the tokens after a compacted block used to be allowed; the next decode then
    aborted in llama_kv_cache::update (a K-shift on a cache that cannot shift)."""
    proc = _run_isolated(f"""
        import llama_cpp
        from adakv_local.llama import Llama
        llm = Llama(model_path={tiny!r}, n_ctx=1024, n_threads=1, verbose=False, adakv_budget=24, adakv_window=8)
        llm.eval(llm.tokenize(b"{text(50, 7)}"))
        n = llm.n_tokens
        with llm.adakv_suspended():  # cells after the block, not compressed
            llm.eval(llm.tokenize(b" one two", add_bos=False)[:4])
        assert llm.adakv_kvcache.n_cells() > llm.adakv_kvcache.footprint()
        mem = llama_cpp.llama_get_memory(llm.ctx)
        llama_cpp.llama_memory_seq_add(mem, 0, n, -1, 3)
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == llm.n_tokens - 1
        llm.eval(llm.tokenize(b" five", add_bos=False))
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# --- 2. the per-head fallback with Llama-3-8B's head layout --------------------------------------


@pytest.mark.exactness
def test_fallback_with_32_layers_and_8_kv_heads_equals_the_fast_path(tmp_path):
    """One stock attention per KV head adds ~7 graph nodes per head and layer; with 32 layers x 8
    KV heads that overflowed llama.cpp's graph budget (GGML_ASSERT in ggml_new_object). The
    budget now counts them; the fallback ("heads") and the per-head mask path must also equal
    the fast path, and fit the graph budget too."""
    from adakv_local.testing import write_llama_gguf

    path = str(write_llama_gguf(tmp_path / "l32.gguf", n_layer=32, n_embd=256, n_head=8, n_head_kv=8,
                                head_dim=32, n_ff=128, seed=8))
    code = f"""
        import os, sys
        import numpy as np
        from adakv_local.llama import Llama
        llm = Llama(model_path={path!r}, n_ctx=1024, n_threads=2, logits_all=True, verbose=False,
                    adakv_budget=40, adakv_window=8)
        toks = llm.tokenize(b"{text(100, 9)}")
        llm.eval(toks)
        assert llm.adakv_stats.footprint < len(toks)
        for t in llm.tokenize(b" alpha bravo charlie delta", add_bos=False):  # decode, one token at a time
            llm.eval([t])
        np.save(sys.argv[1], np.array(llm.scores[: llm.n_tokens]))
        print(",".join(sorted(set(llm.adakv_kvcache.attn_used()))))
    """
    out = {}
    for path in ("auto", "heads", "mask"):
        dest = str(tmp_path / f"logits-{path}.npy")
        proc = _run_isolated(code, dest, ADAKV_ATTN_PATH=path, ADAKV_FORCE_FALLBACK="0")
        assert proc.returncode == 0, f"ADAKV_ATTN_PATH={path}: {proc.stderr[-3000:]}"
        # in every layer; the pooled block (the default layout) is gathered for the stock routes
        used = {"auto": "kernel", "heads": "gather-heads", "mask": "pool-mask"}[path]
        assert proc.stdout.strip().splitlines()[-1] == used, proc.stdout
        out[path] = np.load(dest)
    fast = out["auto"]
    scale = np.abs(fast).max()
    for path in ("heads", "mask"):
        assert np.isfinite(out[path]).all(), path
        # the same kernels over the same cells (heads) or over every cell with exp(-inf) = 0 for
        # those below a start (mask): float32 rounding of the accumulation order only, measured
        # ~1e-6 of the logits' scale
        err = np.abs(fast - out[path]).max()
        assert err <= 1e-4 * scale, f"{path}: {err:.3g} > {1e-4 * scale:.3g}"


# --- 4. save_state / load_state around compressions ----------------------------------------------


@pytest.mark.exactness
def test_branching_through_save_and_load_equals_a_context_that_never_branched(tiny):
    """The kept-position table used to live only in Python, so it was stale after load_state():
    the next compression read positions of another branch (IndexError, or wrong positions)."""
    llm, ref = llama(tiny), llama(tiny)
    doc = llm.tokenize(text(60, 11).encode())
    q = [llm.tokenize((" " + text(7, 20 + i)).encode(), add_bos=False) for i in range(6)]

    llm.eval(doc)
    ref.eval(doc)
    trunk = llm.save_state()
    for branch in range(3):
        llm.eval(q[2 * branch])  # a side branch, compressed too, then abandoned
        assert llm.adakv_stats.prompt_tokens == llm.n_tokens
        side = llm.adakv_kept_positions()
        llm.load_state(trunk)
        llm.eval(q[2 * branch + 1])  # compressed on top of the restored cache
        ref.eval(q[2 * branch + 1])
        info = f"branch {branch}"
        np.testing.assert_array_equal(last_logits(llm), last_logits(ref), err_msg=info)
        for a, b in zip(llm.adakv_kept_positions(), ref.adakv_kept_positions()):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y, err_msg=info)
        assert any(not np.array_equal(x, y) for a, b in zip(side, llm.adakv_kept_positions()) for x, y in zip(a, b))
        trunk = llm.save_state()
    assert greedy(llm, list(llm.input_ids[: llm.n_tokens]) + q[0][:3]) == greedy(
        ref, list(ref.input_ids[: ref.n_tokens]) + q[0][:3])



@pytest.mark.parametrize("donor", ["no eviction", "other layout"])
def test_a_state_that_cannot_be_restored_says_why_and_loses_nothing(tiny, tmp_path, donor):
    from adakv_local.testing import write_llama_gguf

    if donor == "no eviction":
        other = llama(tiny, adakv_budget=None, adakv_window=None)
        reason = "not saved by a context with adakv-local eviction"
    else:
        other = llama(str(write_llama_gguf(tmp_path / "o.gguf", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
                                           n_ff=256, seed=21)))
        reason = "another layer layout"
    other.eval(other.tokenize(text(30, 12).encode()))
    state = other.save_state()

    llm, ref = llama(tiny), llama(tiny)
    prompt = llm.tokenize(text(60, 13).encode())
    llm.eval(prompt)
    ref.eval(prompt)
    with pytest.raises(RuntimeError, match=reason):
        llm.load_state(state)
    assert llm.n_tokens == ref.n_tokens and list(llm.input_ids[: llm.n_tokens]) == prompt
    cont = prompt + llm.tokenize((" " + text(3, 14)).encode(), add_bos=False)
    assert greedy(llm, cont) == greedy(ref, cont)


def test_a_truncated_state_resets_the_context(tiny):
    """A blob cut short fails inside llama.cpp's reader, after the cache was cleared: nothing can be
    kept, so the context is reset and the next prompt is evaluated from scratch."""
    import llama_cpp

    llm, ref = llama(tiny), llama(tiny)
    prompt = llm.tokenize(text(60, 18).encode())
    llm.eval(prompt)
    good = llm.save_state()
    half = good.llama_state_size // 2
    cut = llama_cpp.LlamaState(good.input_ids, good.scores, good.n_tokens, good.llama_state[:half], half, good.seed)
    with pytest.raises(RuntimeError):
        llm.load_state(cut)
    assert llm.n_tokens == 0
    assert greedy(llm, prompt) == greedy(ref, prompt)


# --- found by the randomized test (tests/test_random_api.py) -------------------------------------


def test_reset_leaves_no_kept_positions(tiny):
    """reset() only sets n_tokens = 0 (the next eval removes the cells); the kept positions used to
    list the cells that were still there."""
    llm = llama(tiny)
    llm.eval(llm.tokenize(text(30, 15).encode()))
    assert all(len(p) for layer in llm.adakv_kept_positions() for p in layer)
    llm.reset()
    assert all(len(p) == 0 for layer in llm.adakv_kept_positions() for p in layer)


def test_n_batch_below_the_window_is_refused(tiny):
    """llama-cpp-python's ubatch is min(n_batch, n_ubatch): n_batch=4 used to pass and the first
    compression then failed in llama_adakv_arm_scores."""
    with pytest.raises(ValueError, match=r"adakv_window \(8\) must fit in one ubatch.*n_batch \(now 4\)"):
        llama(tiny, n_batch=4)


@pytest.mark.parametrize("method", ["ada-snapkv", "pyramidkv", "ada-pyramid", "snapkv", "streamingllm"])
def test_sinks_survive_a_second_compression(tiny, method):
    """After a compaction a head's first tokens sit at its start cell; the sinks used to be looked
    for at cells [0, sinks), and a second compression dropped them from every head whose start > 0."""
    llm = llama(tiny, adakv_budget=40, adakv_method=method, adakv_sinks=4)
    llm.eval(llm.tokenize(text(40, 16).encode()))
    # a head keeps min(4, its selectable budget) sinks: PyramidKV's last layers get only a few cells
    first = [[set(p.tolist()) & {0, 1, 2, 3} for p in layer] for layer in llm.adakv_kept_positions()]
    assert any(len(s) == 4 for layer in first for s in layer)
    llm.eval(llm.tokenize((" " + text(6, 17)).encode(), add_bos=False))
    assert llm.adakv_stats.prompt_tokens == llm.n_tokens  # compressed twice
    for i, layer in enumerate(llm.adakv_kept_positions()):
        for h, pos in enumerate(layer):
            assert first[i][h] <= set(pos.tolist()), (method, i, h, sorted(first[i][h]), pos[:8].tolist())


# --- 6. bad input through the Python API ---------------------------------------------------------


def test_truncated_model_file_names_the_reason(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = open(tiny, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        Llama(model_path=str(cut), verbose=False)
    with pytest.raises(ValueError, match="truncated"):
        Llama(model_path=str(cut), verbose=False, adakv_budget=64)



# --- the per-head mask path on a real model ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.exactness
def test_mask_path_equals_the_fast_path_on_smollm2(monkeypatch):
    """SmolLM2 (30 layers, 9 query / 3 KV heads): logits of a continuation after eviction, with
    the start cells in the kernel and as a per-head mask on the stock kernel (Metal's route)."""
    from adakv_local.eval.texts import documents
    from adakv_local.models import model_path

    path = str(model_path("smollm2-135m", quiet=True))
    out, used = {}, {}
    for route in ("auto", "mask"):
        monkeypatch.setenv("ADAKV_ATTN_PATH", route)  # read when eviction is enabled
        # one thread: the pool mask reads 3 x 256 columns, over the 512 at which ggml's CPU kernel
        # splits a one-token query's columns among its threads (f16 partial sums merged in another
        # order: llama.cpp's own full cache differs as much between 1 and 2 threads at this length,
        # KL up to ~0.008 per token); with one thread both routes take the same loop
        llm = Llama(model_path=path, n_ctx=2048, n_threads=1, logits_all=True, verbose=False, adakv_budget=128)
        text = " ".join(t for _, t in documents())[:6000]
        toks = llm.tokenize(text.encode())[:1200]
        llm.eval(toks[:1100])
        assert llm.adakv_stats is not None and llm.adakv_stats.footprint < 1100
        for t in toks[1100:]:  # decode: one token at a time
            llm.eval([t])
        out[route] = np.array(llm.scores[1100 : llm.n_tokens])
        used[route] = set(llm.adakv_kvcache.attn_used())
        llm.close()
    assert used == {"auto": {"kernel"}, "mask": {"pool-mask"}}  # the pooled block where it lies, Metal's route
    # the same kernel loop meets the same f16 rows in the same order (the pool mask skips the other
    # heads' rows): the same logits, bit for bit
    np.testing.assert_array_equal(out["mask"], out["auto"])
