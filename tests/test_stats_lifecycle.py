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

import pytest
from words import text

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local.errors import ClosedError
from adakv_local.llama import Llama

N_CTX_TRAIN = 2048


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from adakv_local.models.testmodel import write_llama_gguf

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
