"""``adakv-local eval chunked``: fidelity of chunked prefill against one-shot eviction (issue #12).

For every prompt (one that also fits a full cache), three runs teacher-force the same continuation,
the full cache's greedy one, one token per decode so that all three read their logits the same way:

- ``full``: the whole prompt in a cache that holds it, nothing evicted (the reference);
- ``one-shot``: the same cache, the prompt compressed once after it was read (the prompt's prefix
  before the window is evaluated once and saved, then restored for this run, as in eval fidelity);
- ``chunked``: a cache of ``n_ctx`` cells, the prompt read in chunks of ``chunk`` tokens with a
  question-aware compression between them (the prompt's last window as a probe), then the final one.

Each compressed run is compared with the full one (KL(full || run) per position, top-1 agreement),
with its footprint R, peak cells and KV bytes beside it (footprint honesty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..config import AdaKVConfig
from ..llama import Llama
from .fidelity import compare, last_logits


def forced_logits(llm: Llama, continuation: Sequence[int]) -> np.ndarray:
    """Logits predicting each continuation token after what llm has evaluated, [len(continuation), n_vocab],
    one decode per token (works with logits_all off, which a prompt longer than the cache needs)."""
    rows = [last_logits(llm)]
    with llm.adakv_suspended():
        for tok in continuation[:-1]:
            llm.eval([int(tok)])
            rows.append(last_logits(llm))
    return np.stack(rows).astype(np.float32)


def stream_prompts(llm: Any, n_prompts: int, n_tokens: int) -> list[tuple[str, list[int]]]:
    """n_prompts prompts of n_tokens tokens cut from the standard library's documentation read as one
    stream (module after module, in adakv_local.eval.texts' order), each named after the modules it spans:
    few modules are long enough on their own for prompts of several thousand tokens."""
    from .texts import documents

    bos = llm.tokenize(b"")  # [BOS] or []
    step = n_tokens - len(bos)
    out: list[tuple[str, list[int]]] = []
    names: list[str] = []
    buf: list[int] = []
    for name, text in documents():
        names.append(name)
        buf += llm.tokenize(text.encode() + b"\n\n")[len(bos) :]
        while len(buf) >= step and len(out) < n_prompts:
            out.append(("stdlib:" + "+".join(names), bos + buf[:step]))
            buf, names = buf[step:], [name]
    if len(out) < n_prompts:
        raise ValueError(f"the standard library's documentation gives {len(out)} prompts of {n_tokens} tokens, "
                         f"not {n_prompts}")
    return out


def run_chunked_fidelity(
    model_path: str,
    prompts: Sequence[tuple[str, list[int]]],
    config: AdaKVConfig,
    *,
    n_ctx: int,
    chunk: int | None,
    n_continuation: int = 64,
    n_threads: int = 2,
    n_gpu_layers: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Records {prompt, mode ("one-shot" or "chunked"), method, budget, kl_mean, kl_max, top1, footprint,
    peak_cells, kv_bytes, kv_bytes_peak, kv_bytes_allocated, chunks, compressions, n_ctx}."""
    longest = max(len(t) for _, t in prompts)
    big_ctx = ((longest + n_continuation + 64) // 256 + 1) * 256
    if n_ctx >= longest:
        raise ValueError(f"n_ctx ({n_ctx}) must be below the prompts' length ({longest}) for the prompt to be chunked")
    common = dict(model_path=model_path, n_batch=512, n_threads=n_threads, n_threads_batch=n_threads,
                  n_gpu_layers=n_gpu_layers, verbose=False,
                  **{k: v for k, v in config.llama_kwargs().items() if k != "adakv_chunk"})
    # the full cache and one-shot eviction share the prompt's prefix (evaluated once, saved); chunked
    # reading has its own small cache
    big = Llama(n_ctx=big_ctx, **common)
    chunked = Llama(n_ctx=n_ctx, adakv_chunk=chunk, **common)
    evict = big.adakv_config
    assert evict is not None
    records: list[dict[str, Any]] = []
    total, done = 3 * len(prompts), 0
    w = config.window
    try:
        for name, toks in prompts:
            big.reset()
            with big.adakv_suspended():
                big.eval(toks[:-w])
            prefix = big.save_state()
            # the full cache: its greedy continuation, and its logits along it
            big.adakv_config = dataclasses.replace(evict, method="full")
            big.eval(toks[-w:])
            rows = [last_logits(big)]
            cont = [int(rows[-1].argmax())]
            for _ in range(n_continuation - 1):
                big.eval([cont[-1]])
                rows.append(last_logits(big))
                cont.append(int(rows[-1].argmax()))
            ref = np.stack(rows).astype(np.float32)
            big.adakv_config = evict
            done += 1
            if progress:
                progress(done, total, f"{name}: full cache ({len(toks)} tokens)")
            for mode, llm in (("one-shot", big), ("chunked", chunked)):
                if mode == "one-shot":
                    big.load_state(prefix)
                    big.eval(toks[-w:])  # the window, then the compression
                else:
                    llm.reset()
                    llm.eval(toks)
                st = llm.adakv_stats  # the record of this prompt's evaluation
                assert st is not None and st.compressed and st.prompt_tokens == len(toks)
                got = forced_logits(llm, cont)
                f = compare(ref, got)
                records.append({
                    "prompt": name, "mode": mode, "method": config.method, "budget": st.budget,
                    "prompt_tokens": len(toks), "kl_mean": f.kl_mean, "kl_max": f.kl_max, "top1": f.top1,
                    "footprint": st.footprint, "peak_cells": st.peak_cells, "kv_bytes": st.kv_bytes,
                    "kv_bytes_peak": st.kv_bytes_peak, "kv_bytes_allocated": st.kv_bytes_allocated,
                    "chunks": st.chunks, "compressions": st.compressions, "n_ctx": llm.n_ctx(),
                })  # fmt: skip
                done += 1
                if progress:
                    progress(done, total, f"{name}: {mode}: KL {f.kl_mean:.4f}, top-1 {100 * f.top1:.1f}%, "
                             f"{st.chunks} chunks, peak {st.peak_cells} cells")
    finally:
        big.close()
        chunked.close()
    return records


def summarize_chunked(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean KL, top-1 and memory per mode, and chunked / one-shot mean KL (the issue's 1.5x bound)."""
    out: dict[str, Any] = {}
    for mode in ("one-shot", "chunked"):
        rs = [r for r in records if r["mode"] == mode]
        out[mode] = {k: float(np.mean([r[k] for r in rs])) for k in
                     ("kl_mean", "top1", "footprint", "peak_cells", "kv_bytes_peak", "kv_bytes_allocated")}
        out[mode]["n"] = len(rs)
    out["kl_ratio"] = out["chunked"]["kl_mean"] / out["one-shot"]["kl_mean"] if out["one-shot"]["kl_mean"] else 1.0
    return out
