"""Speed and memory: prefill and decode tokens/s with the full cache and with eviction, same run.

Every prompt length is run twice in a row, full cache then eviction (same model, threads and
prompt), and the ratios are printed: the machines are noisy, so only same-run ratios mean
anything.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .. import kvcache
from ..llama import Llama, decoding_context
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
    seconds: dict[str, float]  # the eviction's own steps (AdaKVStats.seconds): score, allocate, compact
    # (eviction prefill time) / (full-cache prefill time of the same prompt, same run) - 1; set by run()
    overhead_share: float | None
    prefill_seconds: float = 0.0
    prefill_cpu_seconds: float = 0.0  # process CPU time: the work, whatever else runs (with one thread)
    n_ctx: int = 0
    chunks: int = 1
    compressions: int = 0
    peak_cells: int = 0
    kv_bytes_peak: int = 0
    kv_bytes_allocated: int = 0
    chunk_tokens: tuple[int, ...] = ()
    chunk_seconds: tuple[float, ...] = ()
    chunk_cpu_seconds: tuple[float, ...] = ()
    # (prompt tokens done, wall seconds, CPU seconds since the prefill began) after every batch
    timeline: tuple[tuple[int, float, float], ...] = ()
    # eviction: per chunk, its time over the full cache's time for the same tokens (same run) - 1
    chunk_overhead: tuple[float, ...] = ()
    chunk_cpu_overhead: tuple[float, ...] = ()
    overhead_cpu_share: float | None = None  # as overhead_share, in process CPU time


def prompt_tokens(llm: Any, n: int) -> list[int]:
    """n tokens of standard-library prose (concatenated module documentation)."""
    toks: list[int] = []
    for _, text in documents():
        toks += llm.tokenize(text.encode(), add_bos=not toks)
        if len(toks) >= n:
            return toks[:n]
    raise ValueError(f"the standard library's documentation gives only {len(toks)} tokens, asked for {n}")


def kv_bytes_without_eviction(llm: Any, n_tokens: int) -> int:
    """K and V bytes of n_tokens cells in every layer of a context without eviction (the full-cache
    runs): the native memory figures (:func:`adakv_local.kvcache.context_memory`), as the runs with
    eviction take theirs from AdaKVStats."""
    mem = kvcache.context_memory(llm)
    return n_tokens * (mem.cell_bytes + mem.swa_cell_bytes)


def greedy_token(llm: Any) -> int:
    """The most likely token after the last one llm evaluated."""
    import llama_cpp

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def greedy_decode(llm: Any, n: int) -> float:
    """Decode n tokens greedily after what was evaluated; returns the seconds it took."""
    t0 = time.perf_counter()
    with decoding_context(llm):  # as generate decodes: no budget check per token
        for _ in range(n):
            llm.eval([greedy_token(llm)])
    return time.perf_counter() - t0


# how attention honours the start cells: kvcache's names (None, "from the environment", is what
# run_one sets itself)
ATTN_PATHS = tuple(p for p in kvcache.ATTN_PATHS if p is not None)
# how the compacted block lies in memory: kvcache's names
LAYOUTS = tuple(p for p in kvcache.LAYOUTS if p is not None)


@contextlib.contextmanager
def attn_path_env(path: str, layout: str = "pooled") -> Iterator[None]:
    """ADAKV_ATTN_PATH and ADAKV_LAYOUT while a context is created (the library reads them when
    eviction is enabled)."""
    old = {k: os.environ.get(k) for k in ("ADAKV_ATTN_PATH", "ADAKV_LAYOUT")}
    os.environ.update({"ADAKV_ATTN_PATH": path, "ADAKV_LAYOUT": layout})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def mode_name(method: str, attn_path: str = "auto", layout: str = "pooled") -> str:
    """A bench row's mode: the method, then in brackets what differs from the default (the attention
    path, the rect layout), e.g. "ada-snapkv[mask,rect]"."""
    tags = [t for t, default in ((attn_path, "auto"), (layout, "pooled")) if t != default]
    return f"{method}[{','.join(tags)}]" if tags else method


def run_one(model_path: str, tokens: Sequence[int], n_decode: int, *, budget: int | None, method: str,
            n_threads: int, n_gpu_layers: int = 0, window: int = 32, flash_attn: bool = True,
            attn_path: str = "auto", n_ctx: int | None = None, chunk: int | None = None,
            layout: str = "pooled") -> BenchRecord:
    """One prompt: prefill (timed end to end, compression included), decode. ``n_ctx`` (eviction
    only): a cache smaller than the prompt, read in chunks of at most ``chunk`` tokens; by default
    the cache holds the prompt. ``flash_attn=False`` (full cache only) measures llama.cpp's other
    attention path; ``attn_path`` (eviction only) how attention honours the start cells ("auto":
    the best the backend has), ``layout`` how the block lies in memory (``LAYOUTS``). ``overhead_share``
    is left None: run() sets it against the full cache."""
    if budget is not None and not flash_attn:
        raise ValueError("eviction needs flash attention")
    if attn_path not in ATTN_PATHS:
        raise ValueError(f"attn_path must be one of {', '.join(ATTN_PATHS)}, got {attn_path!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if n_ctx is not None and budget is None:
        raise ValueError("a cache smaller than the prompt (n_ctx) needs eviction (a budget)")
    n_ctx = n_ctx or ((len(tokens) + n_decode + 64) // 256 + 1) * 256
    kw: dict[str, Any] = ({"adakv_budget": budget, "adakv_method": method, "adakv_window": window,
                           "adakv_chunk": chunk} if budget else {})
    with attn_path_env(attn_path, layout):
        llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                    n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, verbose=False,
                    **kw)
    try:
        timeline: list[tuple[int, float, float]] = []
        t0, c0 = time.perf_counter(), time.process_time()
        llm.progress_callback = lambda done, total: timeline.append(
            (done, time.perf_counter() - t0, time.process_time() - c0))
        llm.eval(list(tokens))
        prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
        llm.progress_callback = None
        st = llm.adakv_stats if budget is not None else None
        bytes_after = st.kv_bytes if st is not None else kv_bytes_without_eviction(llm, len(tokens))
        dec = greedy_decode(llm, n_decode)
        mode = "full" if flash_attn else "full-nofa"
        if budget is not None:
            mode = mode_name(method, attn_path, layout)
        extra: dict[str, Any] = {}
        if st is not None:
            extra = dict(chunks=st.chunks, compressions=st.compressions, peak_cells=st.peak_cells,
                         kv_bytes_peak=st.kv_bytes_peak, kv_bytes_allocated=st.kv_bytes_allocated,
                         chunk_tokens=st.chunk_tokens, chunk_seconds=st.chunk_seconds,
                         chunk_cpu_seconds=st.chunk_cpu_seconds)
        return BenchRecord(
            mode=mode,
            prompt_tokens=len(tokens),
            budget=budget,
            prefill_tps=len(tokens) / prefill,
            decode_tps=n_decode / dec,
            decode_tokens=n_decode,
            kv_cells_before=len(tokens),
            kv_cells_after=st.cells_after if st is not None else len(tokens),
            kv_bytes_before=st.kv_bytes_before if st is not None else kv_bytes_without_eviction(llm, len(tokens)),
            kv_bytes_after=bytes_after,
            seconds=dict(st.seconds) if st is not None else {},
            overhead_share=None,
            prefill_seconds=prefill,
            prefill_cpu_seconds=prefill_cpu,
            n_ctx=n_ctx,
            timeline=tuple(timeline),
            **extra,
        )
    finally:
        llm.close()


def last_ubatch_extra(model_path: str, tokens: Sequence[int], *, budget: int, method: str, n_threads: int,
                      n_gpu_layers: int = 0, window: int = 32, repeats: int = 3) -> dict[str, float]:
    """What eviction adds to a prefill, measured where it happens: the prompt's last ubatch (which also
    scores the window) plus allocation and compaction, against the same ubatch without them.

    Everything before the last ubatch is the same work with and without eviction, so it is
    evaluated once and saved; then, ``repeats`` times each, alternating, the last ubatch is evaluated
    from that state plainly and with eviction. Returns the medians of the extra wall and CPU seconds.
    """
    n_ctx = ((len(tokens) + 64) // 256 + 1) * 256
    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=512, n_threads=n_threads, n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers, verbose=False, adakv_budget=budget, adakv_method=method,
                adakv_window=window)
    try:
        k = min(len(tokens), llm.n_batch, int(llm.context_params.n_ubatch))  # the last ubatch, as eval takes it
        with llm.adakv_suspended():
            llm.eval(list(tokens[:-k]))
        state, cfg = llm.save_state(), llm.adakv_config
        wall: dict[str, list[float]] = {"plain": [], "evict": []}
        cpu: dict[str, list[float]] = {"plain": [], "evict": []}
        for _ in range(repeats):
            for mode in ("plain", "evict"):
                llm.load_state(state)
                llm.adakv_config = None if mode == "plain" else cfg
                t0, c0 = time.perf_counter(), time.process_time()
                llm.eval(list(tokens[-k:]))
                wall[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
        llm.adakv_config = cfg
        return {"extra_seconds": float(np.median(wall["evict"]) - np.median(wall["plain"])),
                "extra_cpu_seconds": float(np.median(cpu["evict"]) - np.median(cpu["plain"])),
                "last_ubatch_tokens": k, "last_ubatch_seconds": float(np.median(wall["plain"]))}
    finally:
        llm.close()


def chunk_overhead(chunk_tokens: Sequence[int], chunk_seconds: Sequence[float],
                   full_timeline: Sequence[Sequence[float]], n_tokens: int, column: int = 1) -> tuple[float, ...]:
    """Per chunk of an eviction run: its time (compression included) over the time the full cache took
    for the same prompt tokens in its one-batch-sequence prefill (``full_timeline``: tokens done, then
    the times after each batch, ``column`` picks one; interpolated between batches), minus 1."""
    done = np.array([0] + [row[0] for row in full_timeline], dtype=float)
    secs = np.array([0.0] + [row[column] for row in full_timeline])
    ends = np.cumsum(chunk_tokens, dtype=float)
    ends[-1] = n_tokens  # the last chunk holds the window too
    starts = np.concatenate([[0.0], ends[:-1]])
    base = np.interp(ends, done, secs) - np.interp(starts, done, secs)
    return tuple(float(c / b - 1.0) for c, b in zip(chunk_seconds, base))


def run(model_path: str, lengths: Sequence[int], *, budget: int, method: str = "ada-snapkv", n_decode: int = 64,
        n_threads: int = 2, n_gpu_layers: int = 0, nofa_baseline: bool = False,
        attn_paths: Sequence[str] = ("auto",), repeats: int = 1, n_ctx: int | None = None,
        chunk: int | None = None, direct: int = 0, layouts: Sequence[str] = ("pooled",),
        log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Full cache and eviction at every prompt length; records as dicts, with ratios on the eviction rows.

    ``repeats``: the full cache and each eviction run alternate this many times per length; the
    eviction rows' ``overhead_share`` is the median over the repeats of (eviction prefill time) /
    (the full-cache prefill just before it) - 1, the compression overhead against what a user would
    otherwise run. ``n_ctx``/``chunk``: eviction with a cache smaller than the prompt (chunked
    prefill; the full cache always holds the whole prompt); the rows get ``chunk_overhead``.
    ``direct``: also measure the overhead where it arises (:func:`last_ubatch_extra`, that many
    alternations; prompts that fit the cache only): ``overhead_direct_share`` and
    ``overhead_direct_cpu_share`` are its extra seconds over the full cache's prefill.
    ``nofa_baseline``: also run the full cache without flash attention ("full-nofa", first), and
    give the eviction rows ``decode_speedup_nofa``, their decode speed over that baseline's.
    ``attn_paths``, ``layouts``: one eviction run per attention path (see ``ATTN_PATHS``) and block
    layout (``LAYOUTS``), each against the same full-cache run.
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
        for rep in range(repeats):
            full = run_one(model_path, toks, n_decode, budget=None, method=method, n_threads=n_threads,
                           n_gpu_layers=n_gpu_layers)
            out.append(dict(asdict(full), repeat=rep))
            for path, layout in itertools.product(attn_paths, layouts):
                ev = run_one(model_path, toks, n_decode, budget=budget, method=method, n_threads=n_threads,
                             n_gpu_layers=n_gpu_layers, attn_path=path, n_ctx=n_ctx, chunk=chunk, layout=layout)
                chunked = ev.chunks > 1
                ev = replace(ev, overhead_share=ev.prefill_seconds / full.prefill_seconds - 1.0,
                             overhead_cpu_share=ev.prefill_cpu_seconds / full.prefill_cpu_seconds - 1.0,
                             chunk_overhead=(chunk_overhead(ev.chunk_tokens, ev.chunk_seconds, full.timeline, n)
                                             if chunked else ()),
                             chunk_cpu_overhead=(chunk_overhead(ev.chunk_tokens, ev.chunk_cpu_seconds, full.timeline,
                                                                n, column=2) if chunked else ()))
                re_ = dict(asdict(ev), repeat=rep)
                if direct and not chunked and rep == 0:
                    d = last_ubatch_extra(model_path, toks, budget=budget, method=method, n_threads=n_threads,
                                          n_gpu_layers=n_gpu_layers, repeats=direct)
                    re_.update(d, overhead_direct_share=d["extra_seconds"] / full.prefill_seconds,
                               overhead_direct_cpu_share=d["extra_cpu_seconds"] / full.prefill_cpu_seconds)
                    log(f"{n:>6} tokens: eviction's extra work, measured on the last ubatch ({d['last_ubatch_tokens']} "
                        f"tokens, {d['last_ubatch_seconds']:.2f} s plain): {d['extra_seconds']:+.3f} s = "
                        f"{100 * re_['overhead_direct_share']:+.2f}% of the full prefill "
                        f"({d['extra_cpu_seconds']:+.3f} s CPU = {100 * re_['overhead_direct_cpu_share']:+.2f}%)")
                re_["decode_speedup"] = ev.decode_tps / full.decode_tps
                re_["prefill_ratio"] = ev.prefill_tps / full.prefill_tps
                if nofa is not None:
                    re_["decode_speedup_nofa"] = ev.decode_tps / nofa.decode_tps
                out.append(re_)
                pct = lambda xs: ", ".join(f"{100 * c:+.1f}%" for c in xs)  # noqa: E731
                chunks = (f", {ev.chunks} chunks in {ev.n_ctx} cells (peak {ev.peak_cells}), per-chunk overhead "
                          f"{pct(ev.chunk_overhead)} (CPU time {pct(ev.chunk_cpu_overhead)})" if chunked else "")
                log(f"{n:>6} tokens {ev.mode}: decode {full.decode_tps:7.1f} -> "
                    f"{ev.decode_tps:7.1f} t/s (x{re_['decode_speedup']:.2f}), prefill {full.prefill_seconds:.2f} -> "
                    f"{ev.prefill_seconds:.2f} s (overhead {100 * ev.overhead_share:+.1f}%, CPU time "
                    f"{100 * ev.overhead_cpu_share:+.1f}%), KV {full.kv_cells_before} -> {ev.kv_cells_after} cells"
                    f"{chunks}"
                    + (f"; without flash attention the full cache decodes {nofa.decode_tps:.1f} t/s "
                       f"(x{re_['decode_speedup_nofa']:.2f})" if nofa is not None else ""))
    return out


def decode_and_forget(llm: Any, tokens: Sequence[int]) -> float:
    """Evaluate tokens one at a time after what the cache holds (llama-cpp-python's own ``eval``: no
    budget check, the decode alone), then forget them (the next evaluation removes their cells, which
    lie after any compacted block); returns the seconds."""
    import llama_cpp

    n_past = llm.n_tokens
    t0 = time.perf_counter()
    for t in tokens:
        llama_cpp.Llama.eval(llm, [t])
    seconds = time.perf_counter() - t0
    llm.n_tokens = n_past
    return seconds


def interleave(model_path: str, lengths: Sequence[int], *, budget: int, rounds: int, method: str = "ada-snapkv",
               n_decode: int = 64, n_threads: int = 2, n_gpu_layers: int = 0, attn_paths: Sequence[str] = ("auto",),
               layouts: Sequence[str] = ("pooled",), log: Callable[[str], None] = lambda s: None
               ) -> list[dict[str, Any]]:
    """Decode speed of the full cache and of every eviction mode (attention path x block layout),
    interleaved: a few percent apart can be told on a shared machine.

    Per prompt length, every mode gets its own context, all held at once, which reads the same
    prompt (the eviction modes compress it at the same budget). Then, ``rounds`` times, each mode in
    turn (rotating which goes first) decodes the same ``n_decode`` tokens (the full cache's greedy
    continuation) one at a time and forgets them, so that the load of the machine falls on all modes
    alike, seconds apart. Ratios are taken within each round and their median reported.

    Returns one record per (length, mode): ``decode_tps`` (median over rounds) and
    ``decode_tps_rounds``, ``decode_speedup`` (median of the per-round ratios to the full cache),
    ``route`` (the attention route the first evicted layer's decoding took; "stock" for the full
    cache), ``kv_cells_after``; a pooled row whose rect row ran with the same attention path also
    gets ``pooled_over_rect`` (the median of the per-round ratios) and ``pooled_over_rect_rounds``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    vocab = Llama(model_path=model_path, vocab_only=True, verbose=False)
    try:
        all_tokens = prompt_tokens(vocab, max(lengths))
    finally:
        vocab.close()
    modes = [("full", None, None)] + [(mode_name(method, p, lay), p, lay)
                                      for p, lay in itertools.product(attn_paths, layouts)]
    out: list[dict[str, Any]] = []
    for n in lengths:
        toks = all_tokens[:n]
        n_ctx = ((n + n_decode + 64) // 256 + 1) * 256
        llms: list[Any] = []
        try:
            recs = []
            for name, path, layout in modes:
                kw: dict[str, Any] = {} if path is None else {"adakv_budget": budget, "adakv_method": method}
                with attn_path_env(path or "auto", layout or "pooled"):
                    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                                n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, verbose=False, **kw)
                llms.append(llm)
                log(f"{n:>6} tokens {name}: reading the prompt ...")
                llm.eval(toks)
                recs.append(dict(mode=name, prompt_tokens=n, budget=None if path is None else budget,
                                 attn_path=path, layout=layout, kv_cells_after=n if path is None else
                                 llm.adakv_stats.cells_after, decode_tokens=n_decode))
            cont = _greedy_tokens(llms[0], n_decode)
            per_round: list[list[float]] = []
            for r in range(rounds):
                order = list(range(len(llms)))
                order = order[r % len(order):] + order[: r % len(order)]  # each mode goes first in turn
                tps = [0.0] * len(llms)
                for i in order:
                    tps[i] = n_decode / decode_and_forget(llms[i], cont)
                per_round.append(tps)
                log(f"{n:>6} tokens, round {r + 1}/{rounds}: "
                    + "  ".join(f"{m[0]} {t:.1f}" for m, t in zip(modes, tps)) + " t/s")
            for rec, llm in zip(recs, llms):  # the route the last decoded token took
                kv = llm.adakv_kvcache
                rec["route"] = kv.attn_used()[0] if kv is not None else "stock"
        finally:
            for llm in llms:
                llm.close()
        for i, rec in enumerate(recs):
            rec["decode_tps_rounds"] = [row[i] for row in per_round]
            rec["decode_tps"] = float(np.median(rec["decode_tps_rounds"]))
            rec["decode_speedup"] = float(np.median([row[i] / row[0] for row in per_round]))
        for rec in recs:
            rect = next((q for q in recs if q["layout"] == "rect" and q["attn_path"] == rec["attn_path"]), None)
            if rec["layout"] == "pooled" and rect is not None:
                ratios = [a / b for a, b in zip(rec["decode_tps_rounds"], rect["decode_tps_rounds"])]
                rec["pooled_over_rect_rounds"] = ratios
                rec["pooled_over_rect"] = float(np.median(ratios))
        out += recs
    return out


def _greedy_tokens(llm: Any, n: int) -> list[int]:
    """The n greedy tokens after what llm evaluated, decoded and forgotten again."""
    import llama_cpp

    out: list[int] = []
    n_past = llm.n_tokens
    for _ in range(n):
        out.append(greedy_token(llm))
        llama_cpp.Llama.eval(llm, [out[-1]])
    llm.n_tokens = n_past
    return out


def overhead_summary(records: Sequence[dict[str, Any]], key: str = "overhead_share") -> dict[tuple[str, int], float]:
    """(eviction mode, prompt tokens) -> the median compression overhead over the repeats (``key``:
    "overhead_share" in wall time, "overhead_cpu_share" in CPU time)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if r.get(key) is not None:
            groups.setdefault((r["mode"], r["prompt_tokens"]), []).append(r[key])
    return {k: float(np.median(v)) for k, v in groups.items()}


def plot_bench(records: Sequence[dict[str, Any]], out: Any, title: str) -> None:
    """Decode tokens/s against prompt length, full cache vs eviction."""
    from .evaluate import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    labels = {"full": "full cache", "full-nofa": "full cache, no flash attention"}
    for mode in sorted({r["mode"] for r in records}, key=lambda m: (m not in labels, m)):
        rs = sorted((r for r in records if r["mode"] == mode and r.get("repeat", 0) == 0),
                    key=lambda r: r["prompt_tokens"])
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
