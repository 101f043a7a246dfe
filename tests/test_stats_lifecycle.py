"""A Llama's life cycle around eviction (issue #24, items 1, 5 and 8; issue #27, item 4).

- Stats belong to the evaluation that made them: a fresh ``AdaKVStats`` per prompt evaluation,
  "not compressed" said explicitly, never the previous run's record left in place.
- After ``close()`` every eviction entry point raises a clear error instead of reaching a freed
  ``llama_context`` (which crashed the process), and ``__del__`` after it is harmless.
- Turning eviction off at runtime (``adakv_config = None``) gives back llama-cpp-python's prompt
  limit (n_ctx); turning it on again raises the limit to the trained context again.

Scenarios that used to crash the interpreter run in a child process, so that a crash is reported
as a failure instead of ending the test run.
"""

from __future__ import annotations

import dataclasses
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
from adakv_local.errors import ClosedError
from adakv_local.llama import Llama

N_CTX_TRAIN = 2048


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=2, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, n_ctx_train=N_CTX_TRAIN, seed=31))


def llama(path: str, **kw) -> Llama:
    opts = dict(model_path=path, n_ctx=512, n_threads=1, seed=0, verbose=False, adakv_budget=24, adakv_window=8)
    opts.update(kw)
    return Llama(**opts)


def _run_isolated(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """code in a child Python that imports the adakv_local this process imported."""
    root = str(Path(adakv_local.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=path), cwd=tempfile.gettempdir())


# --- #24.5: use after close ------------------------------------------------------------------------


CALLS_AFTER_CLOSE = {
    "adakv_kvcache": lambda llm, kv: llm.adakv_kvcache,
    "adakv_kept_positions": lambda llm, kv: llm.adakv_kept_positions(),
    "adakv_config setter": lambda llm, kv: setattr(llm, "adakv_config", llm.adakv_config),
    "eval": lambda llm, kv: llm.eval([1, 2, 3]),
    "create_completion": lambda llm, kv: llm.create_completion("more text", max_tokens=2),
    "save_state": lambda llm, kv: llm.save_state(),
    "a KVCache handle taken before close: n_cells": lambda llm, kv: kv.n_cells(),
    "a KVCache handle taken before close: footprint": lambda llm, kv: kv.footprint(),
    "a KVCache handle taken before close: positions": lambda llm, kv: kv.positions(),
    "a KVCache handle taken before close: memory": lambda llm, kv: kv.memory(),
}


@pytest.mark.parametrize("what", list(CALLS_AFTER_CLOSE))
def test_every_entry_point_after_close_raises_a_clear_error(tiny, what):
    """These reached the freed llama_context: a segmentation fault, or a garbage error code."""
    proc = _run_isolated(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_stats_lifecycle import CALLS_AFTER_CLOSE, llama
        from words import text
        llm = llama({tiny!r})
        llm.eval(llm.tokenize(text(60, 1).encode()))
        kv = llm.adakv_kvcache
        llm.close()
        try:
            CALLS_AFTER_CLOSE[{what!r}](llm, kv)
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
        else:
            print("no error")
    """)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    out = proc.stdout.strip().splitlines()[-1]
    assert out.startswith("ClosedError: ") and "close()" in out and "new Llama" in out, out


def test_close_twice_and_del_after_close_are_harmless(tiny):
    llm = llama(tiny)
    llm.eval(llm.tokenize(text(60, 2).encode()))
    llm.close()
    llm.close()
    llm.__del__()
    del llm
    assert issubclass(ClosedError, RuntimeError)


# --- #24.8: eviction turned off and on at runtime ----------------------------------------------------


def test_turning_eviction_off_gives_back_the_prompt_limit_and_on_raises_it_again(tiny):
    """With eviction on, a prompt may run to the model's trained context (read in chunks); turned off
    (adakv_config = None, or a method that keeps every cell), the limit is n_ctx again, so an over-long
    prompt gets llama-cpp-python's own ValueError instead of failing inside llama_decode."""
    llm = llama(tiny, n_ctx=256)
    cfg = llm.adakv_config
    long_prompt = llm.tokenize(text(300, 3).encode())
    assert llm.n_ctx() < len(long_prompt) < N_CTX_TRAIN
    for off in (None, dataclasses.replace(cfg, method="full")):
        llm.reset()
        llm.adakv_config = off
        with pytest.raises(ValueError, match=rf"Requested tokens \({len(long_prompt)}\) exceed context window of 256"):
            llm.create_completion(long_prompt, max_tokens=2)
        assert llm.n_tokens == 0  # refused before anything was evaluated
        llm.adakv_config = cfg
        out = llm.create_completion(long_prompt, max_tokens=2)
        assert out["usage"]["prompt_tokens"] == len(long_prompt) and llm.adakv_stats.chunks > 1


# --- #24.1: stats belong to the evaluation that made them ---------------------------------------------


def test_each_prompt_gets_its_own_stats_and_not_compressed_is_said(tiny):
    """_finish_stats used to return early when nothing was compressed, leaving the previous prompt's
    record (its footprint, its bytes) in adakv_stats as if this prompt had made it."""
    llm = llama(tiny)
    long_prompt = llm.tokenize(text(60, 4).encode())
    llm.eval(long_prompt)
    first = llm.adakv_stats
    assert first.compressed and first.compressions == 1 and first.reason == ""
    assert first.prompt_tokens == len(long_prompt) and first.cells_after == first.footprint < len(long_prompt)

    llm.reset()
    short = llm.tokenize(b"kilo lima mike")  # more than the window (8), within the budget (24)
    assert 8 <= len(short) <= 24
    llm.eval(short)
    st = llm.adakv_stats
    assert st is not first and not st.compressed and st.compressions == 0
    assert st.prompt_tokens == len(short) == st.cells_before == st.cells_after
    assert st.freed == 0 and st.footprint == 0  # no compacted block
    assert st.kv_bytes == st.kv_bytes_before == llm.adakv_kvcache.memory().used_bytes(len(short))
    assert set(st.seconds) == set(first.seconds) and not any(st.seconds.values())
    assert "exceeds" in st.reason and f"{len(short)}-token prompt" in st.reason, st.reason
    np.testing.assert_array_equal(st.kept, np.full_like(st.kept, len(short)))


def test_generated_tokens_keep_the_prompts_record_and_a_short_turn_gets_a_fresh_one(tiny):
    llm = llama(tiny)
    prompt = llm.tokenize(text(60, 6).encode())
    llm.create_completion(prompt, max_tokens=12, temperature=0.0)  # a window (8) of decoded tokens
    st = llm.adakv_stats
    assert st.compressed and st.prompt_tokens == len(prompt)  # the decoded tokens made no record
    more = llm.tokenize(b" alpha", add_bos=False)
    assert len(more) < 8  # fewer than the window
    kv = llm.adakv_kvcache
    tail = kv.n_cells() - kv.footprint()  # the decoded tokens, after the block
    assert tail > 0
    llm.eval(more)
    turn = llm.adakv_stats
    # above the budget: compressed, the window completed with the last cells after the block
    assert turn is not st and turn.compressed and turn.prompt_tokens == llm.n_tokens
    assert turn.reason == "" and turn.reevaluated == min(8 - len(more), tail), turn
    assert turn.cells_after == kv.n_cells() == turn.footprint
    with llm.adakv_suspended():  # teacher forcing after the prompt: its record stays, as for decoded tokens
        llm.eval(llm.tokenize(b" charlie delta echo foxtrot golf hotel india", add_bos=False))
    assert llm.adakv_stats is turn
    llm.adakv_config = None
    llm.eval(llm.tokenize(b" kilo", add_bos=False))
    assert llm.adakv_stats is None  # eviction off: no record, not the last one


def test_a_budget_above_the_prompt_in_evaluate_records_its_own_run(tiny):
    """evaluate recorded the previous (compressed) budget's footprint and kv_bytes for a budget at least
    the prompt's length."""
    from adakv_local.eval.evaluate import run_fidelity

    llm = llama(tiny)
    toks = llm.tokenize(text(60, 7).encode())
    want_bytes = llm.adakv_kvcache.memory().used_bytes(len(toks))
    llm.close()
    recs = run_fidelity(tiny, [("p", toks)], ["ada-snapkv"], [24, 4096], window=8, n_continuation=4, n_threads=1)
    by_budget = {r["budget"]: r for r in recs}
    assert by_budget[24]["footprint"] < len(toks) and by_budget[24]["kv_bytes"] < want_bytes
    assert by_budget[4096]["footprint"] == len(toks) and by_budget[4096]["kv_bytes"] == want_bytes


# --- #24.3 and #27.4: one figure everywhere, bytes from the native memory figures ---------------------


@pytest.mark.parametrize("cache_type", [1, 8])  # f16, q8_0
def test_cli_stats_are_the_records_figures_on_a_later_turn(tiny, cache_type):
    """The CLI's (and the server's) stats used to take kv_cells_before from the prompt's length while
    /stats took the cells held (2965 -> 506 against 1322 -> 506 for the same turn), and computed bytes
    as if K and V were f16 whatever the cache type."""
    from adakv_local.cli.common import describe_adakv_stats, format_stats, metered_class, request_stats, short_stats

    llm = metered_class()(model_path=tiny, n_ctx=1024, n_threads=1, seed=0, verbose=False, adakv_budget=24,
                           adakv_window=8, type_k=cache_type, type_v=cache_type)
    try:
        cfg, kv = llm.adakv_config, llm.adakv_kvcache
        mem = kv.memory()
        llm.meter.reset()
        llm.eval(llm.tokenize(text(60, 8).encode()))
        llm.meter.reset()
        llm.eval(llm.tokenize((" " + text(10, 9)).encode(), add_bos=False))  # a second turn, compressed again
        st, s = llm.adakv_stats, request_stats(llm, cfg)
        assert st.compressed and s["compressed"] and s["reason"] is None
        assert s["prompt_tokens"] == llm.n_tokens > s["kv_cells_before"] == st.cells_before > s["kv_cells_after"]
        assert s["kv_cells_after"] == st.cells_after == kv.n_cells()
        assert s["kv_cells_kept_mean"] == round(st.kept_mean, 1)
        assert s["kv_bytes_before"] == st.kv_bytes_before == mem.used_bytes(st.cells_before)
        assert s["kv_bytes_after"] == st.kv_bytes == mem.used_bytes(st.cells_after)
        f16 = 2 * 2 * (64 + 64) * 2  # layers x KV heads x (K + V values) x 2 bytes
        assert (mem.cell_bytes == f16) == (cache_type == 1)
        assert s["seconds"] == {k: round(v, 4) for k, v in st.seconds.items()}
        figure = f"{st.cells_before} -> {st.cells_after}"
        assert figure in short_stats(s) and figure in format_stats(s)[1]
        assert figure in "\n".join(describe_adakv_stats(st, llm))
    finally:
        llm.close()


def test_a_budget_above_the_prompt_is_said_plainly(tiny):
    from adakv_local.cli.common import format_stats, metered_class, request_stats

    llm = metered_class()(model_path=tiny, n_ctx=512, n_threads=1, verbose=False, adakv_budget=1e9, adakv_window=8)
    try:
        llm.meter.reset()
        llm.eval(llm.tokenize(text(20, 10).encode()))
        s = request_stats(llm, llm.adakv_config)
        assert not s["compressed"] and s["budget"] == 10**9
        line = format_stats(s)[1]
        assert f"the budget (1000000000 cells per head) exceeds the {llm.n_tokens}-token prompt" in line, line
        assert "nothing is evicted" in line and "within the budget" not in line
    finally:
        llm.close()
