"""Speed and memory: prefill and decode tokens/s with the full cache and with eviction, same run.

Every prompt length is run twice in a row, full cache then eviction (same model, threads and
prompt), and the ratios are printed: the machines are noisy, so only same-run ratios mean
anything.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import kvcache
from .llama import Llama
from .texts import documents


@dataclass(frozen=True)
class BenchRecord:
    mode: str  # "full", "full-nofa" (no flash attention) or the eviction method ("method[mask]": attention path)
    prompt_tokens: int  # kv_cells_*: cells of the evicted layers; kv_bytes_*: all layers
    budget: int | None
    prefill_tps: float
    decode_tps: float
    decode_tokens: int
    kv_cells_before: int
    kv_cells_after: int
    kv_bytes_before: int
    kv_bytes_after: int
    seconds: dict[str, float]  # score (extra time of the window's decode), allocate, compact
    overhead_share: float  # (score + allocate + compact) / prefill time without eviction


def prompt_tokens(llm: Any, n: int) -> list[int]:
    """n tokens of standard-library prose (concatenated module documentation)."""
    toks: list[int] = []
    for _, text in documents():
        toks += llm.tokenize(text.encode(), add_bos=not toks)
        if len(toks) >= n:
            return toks[:n]
    raise ValueError(f"the standard library's documentation gives only {len(toks)} tokens, asked for {n}")


def kv_bytes_per_layer_cell(llm: Any) -> int:
    """Bytes one cell takes in K and V of one layer (f16 cache)."""
    import llama_cpp

    m = llm.model
    n_head, n_head_kv = llama_cpp.llama_model_n_head(m), llama_cpp.llama_model_n_head_kv(m)
    head_dim = llama_cpp.llama_model_n_embd(m) // n_head
    return 2 * n_head_kv * head_dim * 2


def kv_bytes(llm: Any, n_tokens: int) -> int:
    """K and V bytes the sequence holds now: evicted layers hold their cells, the others (the
    sliding-window layers of an iSWA model, whose cache llama-cpp-python keeps full-size) every token."""
    import llama_cpp

    n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
    kv = llm.adakv_kvcache if llm.adakv_config is not None else None
    evicted = len(kv.layout.layer_ids) if kv is not None else 0
    cells = kv.n_cells() if kv is not None else n_tokens
    return kv_bytes_per_layer_cell(llm) * (evicted * cells + (n_layer - evicted) * n_tokens)


def greedy_decode(llm: Any, n: int) -> float:
    """Decode n tokens greedily after what was evaluated; returns the seconds it took."""
    import llama_cpp

    n_vocab = llm.n_vocab()
    t0 = time.perf_counter()
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        llm.eval([int(logits.argmax())])
    return time.perf_counter() - t0


# how attention honours the start cells: kvcache's names (None, "from the environment", is what
# run_one sets itself)
ATTN_PATHS = tuple(p for p in kvcache.ATTN_PATHS if p is not None)


@contextlib.contextmanager
def _attn_path(path: str) -> Iterator[None]:
    """ADAKV_ATTN_PATH while a context is created (the library reads it when eviction is enabled)."""
    old = os.environ.get("ADAKV_ATTN_PATH")
    os.environ["ADAKV_ATTN_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["ADAKV_ATTN_PATH"]
        else:
            os.environ["ADAKV_ATTN_PATH"] = old


def run_one(model_path: str, tokens: Sequence[int], n_decode: int, *, budget: int | None, method: str,
            n_threads: int, n_gpu_layers: int = 0, window: int = 32, flash_attn: bool = True,
            attn_path: str = "auto") -> BenchRecord:
    """One prompt: prefill, (compress,) decode. With a budget, the compression overhead is measured
    on the same state: the window is decoded once without and once with scoring + compaction.
    ``flash_attn=False`` (full cache only) measures llama.cpp's other attention path; ``attn_path``
    (eviction only) how attention honours the start cells ("auto": the best the backend has)."""
    import llama_cpp

    if budget is not None and not flash_attn:
        raise ValueError("eviction needs flash attention")
    if attn_path not in ATTN_PATHS:
        raise ValueError(f"attn_path must be one of {', '.join(ATTN_PATHS)}, got {attn_path!r}")
    n_ctx = ((len(tokens) + n_decode + 64) // 256 + 1) * 256
    kw: dict[str, Any] = {"adakv_budget": budget, "adakv_method": method, "adakv_window": window} if budget else {}
    with _attn_path(attn_path):
        llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                    n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, verbose=False,
                    **kw)
    try:
        seconds: dict[str, float] = {}
        overhead = 0.0
        if budget is None:
            t0 = time.perf_counter()
            llm.eval(list(tokens))
            prefill = time.perf_counter() - t0
        else:
            cfg = llm.adakv_config
            t0 = time.perf_counter()
            with llm.adakv_suspended():
                llm.eval(list(tokens[:-window]))
            t_prefix = time.perf_counter() - t0
            state = llm.save_state()
            llm.adakv_config = None  # the same window, without scoring or compaction
            t0 = time.perf_counter()
            llm.eval(list(tokens[-window:]))
            t_plain = time.perf_counter() - t0
            llm.load_state(state)
            llm.adakv_config = cfg
            t0 = time.perf_counter()
            llm.eval(list(tokens[-window:]))
            t_evict = time.perf_counter() - t0
            st = llm.adakv_stats
            assert st is not None
            seconds = {"score": st.seconds["score"] - t_plain, "allocate": st.seconds["allocate"],
                       "compact": st.seconds["compact"]}
            prefill = t_prefix + t_plain
            overhead = t_evict - t_plain
        per_layer_cell = kv_bytes_per_layer_cell(llm)
        n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        bytes_after = kv_bytes(llm, len(tokens))
        dec = greedy_decode(llm, n_decode)
        st = llm.adakv_stats
        cells_after = st.cells_after if st is not None else len(tokens)
        mode = "full" if flash_attn else "full-nofa"
        if budget is not None:
            mode = method if attn_path == "auto" else f"{method}[{attn_path}]"
        return BenchRecord(
            mode=mode,
            prompt_tokens=len(tokens),
            budget=budget,
            prefill_tps=len(tokens) / prefill,
            decode_tps=n_decode / dec,
            decode_tokens=n_decode,
            kv_cells_before=len(tokens),
            kv_cells_after=cells_after,
            kv_bytes_before=len(tokens) * per_layer_cell * n_layer,
            kv_bytes_after=bytes_after,
            seconds=seconds,
            overhead_share=overhead / prefill,
        )
    finally:
        llm.close()


def run(model_path: str, lengths: Sequence[int], *, budget: int, method: str = "ada-snapkv", n_decode: int = 64,
        n_threads: int = 2, n_gpu_layers: int = 0, nofa_baseline: bool = False,
        attn_paths: Sequence[str] = ("auto",),
        log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Full cache and eviction at every prompt length; records as dicts, with ratios on the eviction rows.

    ``nofa_baseline``: also run the full cache without flash attention ("full-nofa", first), and
    give the eviction rows ``decode_speedup_nofa``, their decode speed over that baseline's.
    ``attn_paths``: one eviction run per attention path (see ``ATTN_PATHS``), each against the
    same full-cache run.
    """
    vocab = Llama(model_path=model_path, vocab_only=True, verbose=False)
    all_tokens = prompt_tokens(vocab, max(lengths))
    out: list[dict[str, Any]] = []
    for n in lengths:
        toks = all_tokens[:n]
        nofa = None
        if nofa_baseline:
            nofa = run_one(model_path, toks, n_decode, budget=None, method=method, n_threads=n_threads,
                           n_gpu_layers=n_gpu_layers, flash_attn=False)
            out.append(asdict(nofa))
        full = run_one(model_path, toks, n_decode, budget=None, method=method, n_threads=n_threads,
                       n_gpu_layers=n_gpu_layers)
        out.append(asdict(full))
        for path in attn_paths:
            ev = run_one(model_path, toks, n_decode, budget=budget, method=method, n_threads=n_threads,
                         n_gpu_layers=n_gpu_layers, attn_path=path)
            re_ = asdict(ev)
            re_["decode_speedup"] = ev.decode_tps / full.decode_tps
            re_["prefill_ratio"] = ev.prefill_tps / full.prefill_tps
            if nofa is not None:
                re_["decode_speedup_nofa"] = ev.decode_tps / nofa.decode_tps
            out.append(re_)
            log(f"{n:>6} tokens{'' if path == 'auto' else f' [{path}]'}: decode {full.decode_tps:7.1f} -> "
                f"{ev.decode_tps:7.1f} t/s (x{re_['decode_speedup']:.2f}), prefill {full.prefill_tps:7.1f} -> "
                f"{ev.prefill_tps:7.1f} t/s, overhead {100 * ev.overhead_share:.1f}% of prefill, "
                f"KV {full.kv_cells_before} -> {ev.kv_cells_after} cells"
                + (f"; without flash attention the full cache decodes {nofa.decode_tps:.1f} t/s "
                   f"(x{re_['decode_speedup_nofa']:.2f})" if nofa is not None else ""))
    return out


def plot_bench(records: Sequence[dict[str, Any]], out: Any, title: str) -> None:
    """Decode tokens/s against prompt length, full cache vs eviction."""
    from .evaluate import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    labels = {"full": "full cache", "full-nofa": "full cache, no flash attention"}
    for mode in sorted({r["mode"] for r in records}, key=lambda m: (m not in labels, m)):
        rs = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["prompt_tokens"])
        label = labels.get(mode, f"{mode}, budget {rs[0]['budget']}")
        ax.plot([r["prompt_tokens"] for r in rs], [r["decode_tps"] for r in rs], marker="o", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
