"""``adakv_local.Llama``: a ``llama_cpp.Llama`` whose KV cache is compressed after each prompt.

Everything of llama-cpp-python keeps working (``eval``/``generate``, ``create_completion``
with streaming, ``create_chat_completion``, its server). With ``adakv_budget=None`` nothing
changes at all. With a budget, every prompt evaluation that brings the cache above the
budget is followed, before the first token is sampled, by: window scores (computed in the
graph while the prompt's last ``adakv_window`` tokens are evaluated), allocation
(:mod:`adakv_local.policies`) and an in-place per-head compaction (:mod:`adakv_local.kvcache`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from . import _lib

_lib.bind_llama_cpp()  # before llama_cpp is imported

import llama_cpp  # noqa: E402

from .config import AdaKVConfig, ConfigError  # noqa: E402
from .errors import CacheFullError, ClosedError, NativeInvalidArgument  # noqa: E402
from .gguf_check import check_gguf  # noqa: E402
from .inspection import kept_positions, model_n_layer  # noqa: E402
from .kvcache import KVCache  # noqa: E402
from .planning import next_chunk  # noqa: E402
from .policies import AllocationConfig, keep_sets  # noqa: E402
from .spans import SpanFinder  # noqa: E402
from .stats import AdaKVStats, StatsRun, record  # noqa: E402


def _footprint_bound(cfg: AdaKVConfig, budget: int, n_head_kv: int, layout: str = "pooled") -> int:
    """The most cells (R) a compression at this budget can leave.

    A layer has n_head_kv * B selectable slots (twice that at most under the pyramid schedule). The
    pooled block packs a layer's kept tokens into ceil(their number / n_head_kv) cells: about B
    (2B for a pyramid's largest layer). The rect block is as wide as the largest head's budget: Ada
    gives one head its safeguard floor(alpha * B) plus every slot the other heads do not reserve;
    max_ratio caps it. (The final compression keeps B - w selectable cells plus the window: less.)
    """
    per_layer = 2 * budget if cfg.method in ("pyramidkv", "ada-pyramid") else budget
    if layout == "pooled":
        return per_layer + 1
    if cfg.method.startswith("ada-"):
        per_head = n_head_kv * per_layer - (n_head_kv - 1) * int(cfg.alpha * per_layer)
    else:
        per_head = per_layer
    if cfg.max_ratio is not None:
        per_head = min(per_head, int(cfg.max_ratio * per_layer) + cfg.window)
    return per_head


def _check_sizes(cfg: AdaKVConfig, n_batch: int, n_ubatch: int, n_ctx: int, prefix: str) -> None:
    """The window must fit in one ubatch (llama-cpp-python runs ubatches of min(n_batch, n_ubatch)
    tokens, and n_batch <= n_ctx), and a chunk must leave room for it in the cache."""
    if min(n_batch, n_ubatch, n_ctx) < cfg.window:
        raise ConfigError("window", f"({cfg.window}) must fit in one ubatch of min(n_batch, n_ubatch, n_ctx) "
                          f"tokens: raise n_batch (now {n_batch}), n_ubatch (now {n_ubatch}) and n_ctx (now "
                          f"{n_ctx}) or lower the window").named(prefix + "window")
    if cfg.chunk is not None and n_ctx and cfg.chunk > n_ctx - cfg.window:
        raise ConfigError("chunk", f"({cfg.chunk}) must leave room for the window in the cache: at most "
                          f"n_ctx - window = {n_ctx - cfg.window}").named(prefix + "chunk")


class Llama(llama_cpp.Llama):
    """llama-cpp-python's ``Llama`` with Ada-KV per-head KV-cache eviction.

    All of ``llama_cpp.Llama``'s arguments are accepted. The eviction keywords (see
    :class:`adakv_local.config.AdaKVConfig` for the ranges) are:

    Args:
        adakv_budget: None (off), cells kept per KV head on average (an integer >= the window;
            whole floats such as 1e3 count as integers), or a fraction of the prompt in (0, 1).
            The method "full" keeps every cell and does no eviction work at all.
        adakv_method: "ada-snapkv" (default), "ada-pyramid", "snapkv", "pyramidkv",
            "streamingllm" or "full".
        adakv_window, adakv_kernel, adakv_pooling, adakv_spans, adakv_span_share, adakv_gqa,
            adakv_alpha, adakv_max_ratio, adakv_sinks, adakv_chunk: see AdaKVConfig.

    With a budget, flash attention is turned on (``flash_attn=False`` is refused).

    Raises:
        ValueError: an option out of range (the message names it), flash attention off, a
            model architecture that cannot be evicted, ``n_ubatch`` smaller than the window, a
            model file that is not a valid GGUF (the message says what is wrong: truncated,
            bad magic, ...). An ``n_ctx`` above the model's trained context is accepted, as
            llama-cpp-python accepts it (llama.cpp logs a warning; the CLI refuses it unless
            ``--allow-context-overflow``).

    Examples:
        >>> llm = Llama(model_path="model.gguf", n_ctx=8192, adakv_budget=256)
        >>> out = llm.create_completion(long_prompt, max_tokens=64)
        >>> llm.adakv_stats.footprint
    """

    def __init__(
        self,
        *args: Any,
        adakv_budget: int | float | None = None,
        adakv_method: str | None = None,
        adakv_window: int | None = None,
        adakv_kernel: int | None = None,
        adakv_pooling: str | None = None,
        adakv_spans: str | None = None,
        adakv_span_share: float | None = None,
        adakv_gqa: str | None = None,
        adakv_alpha: float | None = None,
        adakv_max_ratio: float | None = None,
        adakv_sinks: int | None = None,
        adakv_chunk: int | None = None,
        **kwargs: Any,
    ) -> None:
        config = AdaKVConfig.from_llama_kwargs(
            {
                "adakv_budget": adakv_budget, "adakv_method": adakv_method, "adakv_window": adakv_window,
                "adakv_kernel": adakv_kernel, "adakv_pooling": adakv_pooling, "adakv_spans": adakv_spans,
                "adakv_span_share": adakv_span_share, "adakv_gqa": adakv_gqa, "adakv_alpha": adakv_alpha,
                "adakv_max_ratio": adakv_max_ratio, "adakv_sinks": adakv_sinks, "adakv_chunk": adakv_chunk,
            }
        )  # fmt: skip
        if config is not None:
            if kwargs.get("flash_attn") is False:
                raise ValueError("adakv_budget needs flash attention; remove flash_attn=False")
            kwargs["flash_attn"] = True
            # sliding-window layers (Gemma 3) keep a ring of the window's size, not n_ctx cells
            if kwargs.get("swa_full") is None:
                kwargs["swa_full"] = False
            n_batch, n_ubatch = kwargs.get("n_batch", 512), kwargs.get("n_ubatch", 512)
            n_ctx = kwargs.get("n_ctx", 512) or n_batch  # 0: the model's trained context
            _check_sizes(config, n_batch, n_ubatch, n_ctx, "adakv_")
        self._adakv_config: AdaKVConfig | None = config
        self._closed = False
        #: called as progress_callback(tokens_done, tokens_total) while a prompt is evaluated
        self.progress_callback: Callable[[int, int], None] | None = None
        self._adakv_suspended = False
        self._decoding = False  # generate() is past the prompt: its evals are decoded tokens
        self._progress = [0, 0]
        self._stats_run = StatsRun()
        self.adakv_stats: AdaKVStats | None = None
        self._adakv: KVCache | None = None
        self._spans: SpanFinder | None = None
        model_path = kwargs.get("model_path", args[0] if args else None)
        if isinstance(model_path, (str, os.PathLike)) and os.path.isfile(model_path):
            check_gguf(model_path)  # llama.cpp would only say "Failed to load model from file"
        super().__init__(*args, **kwargs)
        if config is not None:
            try:
                self._adakv = KVCache.from_llama(self, gqa_reduce=config.gqa)
            except NativeInvalidArgument as e:
                self.close()
                raise ValueError(f"adakv: {e}") from None
            if config.method != "full":
                self._allow_long_prompts()

    def _allow_long_prompts(self, allow: bool = True) -> None:
        """With eviction, positions run to the model's trained context while the cache holds n_ctx
        cells: llama-cpp-python's limits and token history follow the positions. Not with
        ``logits_all=True``: its logits table has a row per position, n_ctx of them.
        ``allow=False`` (eviction off, or a method that keeps every cell): the limit is n_ctx again,
        llama-cpp-python's own (the token history keeps its length: only its first n_ctx are used)."""
        if not allow:
            self._n_ctx = self.n_ctx()
            return
        n_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        if n_train > self._n_ctx and not self._logits_all:
            self._n_ctx = n_train
            ids = np.zeros(n_train, dtype=self.input_ids.dtype)
            ids[: self.input_ids.shape[0]] = self.input_ids
            self.input_ids = ids

    def close(self) -> None:
        """Free the model and the context (llama-cpp-python's ``close``). Afterwards every method that
        would reach them raises :class:`~adakv_local.errors.ClosedError`, and so does a KV-cache handle
        taken from ``adakv_kvcache`` before; ``adakv_stats`` stays readable. Closing again (or
        ``__del__``) does nothing."""
        kv = getattr(self, "_adakv", None)
        if kv is not None:
            kv.close()
        self._closed = True
        # __init__ may have refused the options before llama_cpp.Llama set anything up
        if hasattr(self, "_stack"):
            super().close()

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise ClosedError("this Llama was closed (close()): its model and llama_context are freed; make a "
                              "new Llama to evaluate, generate or inspect the cache")

    def n_ctx(self) -> int:
        self._check_open()
        return super().n_ctx()

    def tokenize(self, *args: Any, **kwargs: Any) -> list[int]:
        self._check_open()
        return super().tokenize(*args, **kwargs)

    def detokenize(self, *args: Any, **kwargs: Any) -> bytes:
        self._check_open()
        return super().detokenize(*args, **kwargs)

    def save_state(self) -> llama_cpp.LlamaState:
        """llama-cpp-python's ``save_state``. With eviction, the state is the compressed cache (its
        cells, the per-head layout, kept positions) and the token history up to ``n_tokens``; the
        logits table is saved only with ``logits_all=True`` (otherwise llama-cpp-python never reads it
        back: a loaded state evaluates again before it samples), so a saved conversation costs about
        its compressed cells, not ``n_batch x n_vocab`` floats. :func:`state_bytes` is its size."""
        self._check_open()
        if self._adakv is None:
            return super().save_state()
        with self._logits_table_unless_logits_all():
            state = super().save_state()
        state.input_ids = state.input_ids[: self.n_tokens].copy()
        return state

    @contextlib.contextmanager
    def _logits_table_unless_logits_all(self) -> Iterator[None]:
        """Without ``logits_all``, llama-cpp-python's state calls see an empty logits table (nothing to
        save, nothing to restore into: llama-cpp-python never reads it back before the next evaluation)."""
        if self._logits_all:
            yield
            return
        table, self.scores = self.scores, np.empty((0, self.scores.shape[1]), dtype=np.single)
        try:
            yield
        finally:
            self.scores = table

    # -- the hook ----------------------------------------------------------------------------------

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens; a prompt that takes the cache above the budget is compressed after it.

        A prompt that does not fit the cache's free cells is read in chunks (``adakv_chunk`` tokens at
        most, else as many as fit), compressing in between so that the cache never holds more than
        n_ctx cells. Every compression is question-aware: the prompt's last ``adakv_window`` tokens
        (the question or instruction) are evaluated as a probe right after the chunk, score the cells,
        and are removed again; the final compression is the ordinary one, with the window in place.

        Everything that describes the compressed cache (start cells, kept positions) is kept by the
        native library, so it travels with ``save_state()`` / ``load_state()``.

        Raises:
            ValueError: a prompt longer than the cache that cannot be read in chunks (it would run
                past the model's trained context, or n_ctx leaves no room for a chunk after a
                compressed block), or positions past n_ctx with ``logits_all=True``; nothing was
                evaluated.
            CacheFullError: tokens that neither fit nor can be compressed (a generated token, a
                prompt shorter than the window, or fewer free cells than the window, when the cache
                is full); nothing was evaluated.
        """
        self._check_open()
        kv, cfg = self._adakv, self.adakv_config
        self._progress = [0, len(tokens)]
        if kv is None or cfg is None or cfg.method == "full":
            run = StatsRun(peak_cells=len(tokens))
            self._eval_batches(tokens)  # "full" keeps every cell: no scoring, no compaction
            if kv is not None and cfg is not None:
                self._record_uncompressed(run, len(tokens), None, "the method full keeps every cell")
            elif not self._decoding:
                self.adakv_stats = None  # eviction off: no record (not the last one)
            return None
        rows = self.scores.shape[0]
        if self._logits_all and self.n_tokens + len(tokens) > rows:
            raise ValueError(
                f"logits_all=True keeps the logits of every position in a table of n_ctx = {rows} rows: "
                f"{self.n_tokens} + {len(tokens)} tokens would run past it; turn logits_all off to read a "
                "prompt longer than the cache, or raise n_ctx"
            )
        self._rewind()
        tokens = list(tokens)
        if self._decoding and self.n_tokens + len(tokens) > self._n_ctx:
            raise CacheFullError(
                f"position {self.n_tokens + len(tokens)} is past the {self._n_ctx} positions this model was "
                "trained for: eviction bounds the cache, not the conversation's length"
            )
        n_cells = kv.n_cells()
        if (n_cells + len(tokens) > self.n_ctx() and not self._adakv_suspended
                and (self._decoding or len(tokens) < cfg.window)):
            # a generated token or a short turn that does not fit: compress what the cache holds first
            self._make_room(len(tokens))
            n_cells = kv.n_cells()
        if n_cells + len(tokens) <= self.n_ctx():
            if self._adakv_suspended:  # a continuation of the evaluated prompt (teacher forcing): its record stays
                return self._eval_batches(tokens)
            if self._decoding:  # a generated token: compressed when the cache is full (above)
                return self._eval_batches(tokens)
            self._stats_run = StatsRun(peak_cells=n_cells + len(tokens))
            if len(tokens) < cfg.window:
                return self._eval_short(tokens)
            return self._eval_prompt(tokens)
        if self._adakv_suspended or len(tokens) < cfg.window or n_cells + cfg.window > self.n_ctx():
            raise CacheFullError(
                f"the KV cache is full: {len(tokens)} more token(s) do not fit in its {self.n_ctx()} cells "
                f"({n_cells} in use), and too few cells are free to score a window and compress; start "
                "again (reset()) or raise n_ctx"
            )
        return self._eval_chunked(tokens, self._check_chunking(tokens, n_cells))

    def _held(self, n_new: int = 0) -> float:
        """The cells each KV head holds on average (the compacted block's share and the cells after
        it), with n_new more tokens."""
        kv = self._adakv
        assert kv is not None
        return kv.view_cells() + n_new - float(kv.starts().mean())

    def _take_back(self, m: int) -> list[int]:
        """Remove the last m tokens the cache holds after its compacted block (at most those), so that
        they are evaluated again; the tokens removed (fewer, or none, where the cache refuses: a
        sliding-window cache that no longer holds what they attend to)."""
        kv = self._adakv
        assert kv is not None
        m = max(0, min(m, kv.n_cells() - kv.footprint(), self.n_tokens))
        if m == 0:
            return []
        self.n_tokens -= m
        if not self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1):
            self.n_tokens += m
            return []
        return [int(t) for t in self.input_ids[self.n_tokens : self.n_tokens + m]]

    def _eval_short(self, tokens: list[int]) -> None:
        """A turn of fewer tokens than the window (a follow-up question, a chat template's few tokens).

        When the cache then holds more than a window above the budget, it is compressed back to the
        budget with the conversation's last ``adakv_window`` tokens as the window: the new ones, and
        before them the last ones of the cache, taken back and evaluated again with them (at most a
        window of extra work, once per window of new tokens at most), so that a chat of short
        messages never fills the cache and stays within a window of the budget after each turn."""
        kv, cfg = self._adakv, self.adakv_config
        assert kv is not None and cfg is not None
        budget = cfg.cells_for(self.n_tokens + len(tokens))
        held = self._held(len(tokens))
        if held <= budget + cfg.window:
            self._eval_batches(tokens)
            self._stats_run.end_chunk(len(tokens))
            if held <= budget:
                return self._finish_stats(kv.n_cells(), budget)
            return self._record(self._stats_run, budget, kv.n_cells(), (
                f"a short turn ({len(tokens)} new tokens): the heads hold {held:.1f} cells on average, less than a "
                f"window ({cfg.window}) above the budget of {budget}; compressed once they hold more"))
        again = self._take_back(cfg.window - len(tokens))
        self._stats_run.reevaluated = len(again)
        return self._eval_prompt(again + tokens, budget, window=len(again) + len(tokens))

    def _make_room(self, n_new: int) -> None:
        """The cache is full and n_new tokens must follow (a generated token, a short turn): compress it
        now with its last ``adakv_window`` tokens, taken back and evaluated again, as the window (the
        observation window of a generation is what it generated last). Counted in ``adakv_stats``
        (``decode_compressions``, ``decode_seconds``) while generating.

        Raises:
            CacheFullError: nothing can be evicted (the cache holds no more than the budget, or too few
                cells after its block for a window) or the budget leaves no room; nothing was changed.
        """
        kv, cfg = self._adakv, self.adakv_config
        assert kv is not None and cfg is not None
        budget = cfg.cells_for(self.n_tokens + n_new)
        tail = kv.n_cells() - kv.footprint()
        if self._held() <= budget or tail < 1 or budget + n_new > self.n_ctx():
            raise CacheFullError(
                f"the KV cache is full: {n_new} more token(s) do not fit in its {self.n_ctx()} cells and "
                f"compressing cannot make room (budget {budget} cells per head, {kv.n_cells()} cells held); "
                "lower the budget, raise n_ctx, or start again (reset())"
            )
        t0 = time.perf_counter()
        outer, callback = self._stats_run, self.progress_callback
        self._stats_run, self.progress_callback = StatsRun(), None
        try:
            again = self._take_back(cfg.window)
            if not again:
                raise CacheFullError(
                    f"the KV cache is full ({kv.n_cells()} of {self.n_ctx()} cells) and its last tokens cannot be "
                    "evaluated again to score a window; start again (reset()) or raise n_ctx"
                )
            self._compress(self._eval_scored(again, len(again)), budget, len(again))
        finally:
            self._stats_run, self.progress_callback = outer, callback
        st = self.adakv_stats
        if self._decoding and st is not None:
            self.adakv_stats = replace(st, decode_compressions=st.decode_compressions + 1,
                                       decode_seconds=st.decode_seconds + time.perf_counter() - t0)

    def _eval_prompt(self, tokens: list[int], budget: int | None = None, window: int | None = None) -> None:
        """A prompt that fits: evaluate it, scoring its window (``adakv_window`` tokens unless given)
        in its last ubatch, and compress. A fractional budget is of the conversation's tokens."""
        kv, cfg = self._adakv, self.adakv_config
        assert kv is not None and cfg is not None
        n_after = kv.n_cells() + len(tokens)
        budget = cfg.cells_for(self.n_tokens + len(tokens)) if budget is None else budget
        window = cfg.window if window is None else window
        if self._held(len(tokens)) <= budget:  # what the heads hold, on average
            self._eval_batches(tokens)
        else:
            scores = self._eval_scored(tokens, window)
            self._compress(scores, budget, window)
        self._stats_run.end_chunk(len(tokens))
        self._finish_stats(n_after, budget)
        return None

    def _eval_chunked(self, tokens: list[int], budget: int) -> None:
        """A prompt longer than the free cells: chunks, each compressed with the question as a probe."""
        kv, cfg = self._adakv, self.adakv_config
        assert kv is not None and cfg is not None
        w, n_ctx = cfg.window, self.n_ctx()
        doc, probe = tokens[:-w], tokens[-w:]
        self._stats_run = StatsRun(peak_cells=kv.n_cells(), total_cells=kv.n_cells() + len(tokens))
        i = 0
        while True:
            step = next_chunk(len(doc) - i, kv.n_cells(), n_ctx, w, cfg.chunk)
            if step.kind == "last":
                return self._eval_prompt(doc[i:] + probe, budget)  # the last chunk and the window, as usual
            if step.kind == "probe":
                self._eval_probe([], probe, budget)
                continue
            if step.compress:
                self._eval_probe(doc[i : i + step.take], probe, budget)
            else:
                self._eval_batches(doc[i : i + step.take])
                self._stats_run.note_peak(kv)
            self._stats_run.end_chunk(step.take)
            i += step.take

    def _eval_probe(self, chunk: list[int], probe: list[int], budget: int) -> None:
        """Evaluate a chunk with the probe after it (scored in the same last ubatch), remove the
        probe, and compress the cells before it (no window is kept: the probe is not the prompt)."""
        kv = self._adakv
        assert kv is not None
        scores = self._eval_scored(chunk + probe, len(probe), count=len(chunk))
        self.n_tokens -= len(probe)
        if not self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1):  # after any compacted block: never refused
            raise RuntimeError(f"adakv: could not remove the probe at position {self.n_tokens}")
        footprint = self._compress(scores, budget, 0)
        if self.n_ctx() - footprint - len(probe) < len(probe):
            rect = kv.block_layout == "rect"
            cap = ", lower the budget or bound R with adakv_max_ratio" if rect else " or lower the budget"
            self.reset()
            raise ValueError(
                f"adakv: a compression left {footprint} cells (R) of the cache's {self.n_ctx()}, too few to read "
                f"the rest of the prompt; raise n_ctx{cap} (the "
                "context was reset)"
            )

    def _eval_scored(self, tokens: list[int], window: int, count: int | None = None) -> np.ndarray:
        """Evaluate tokens with the last ``window`` scored inside the last ubatch; the scores of every cell."""
        kv = self._adakv
        assert kv is not None
        k = min(len(tokens), self.n_batch, int(self.context_params.n_ubatch))  # the last piece: one ubatch
        count = len(tokens) if count is None else count
        if len(tokens) > k:
            self._eval_batches(tokens[:-k], count=min(count, len(tokens) - k))
        t0 = time.perf_counter()
        kv.arm_scores(window)
        super().eval(tokens[-k:])
        self._stats_run.note_peak(kv)
        self._advance(max(0, count - (len(tokens) - k)))
        self._stats_run.seconds["scored_ubatch"] += time.perf_counter() - t0
        return kv.read_scores()

    def _compress(self, scores: np.ndarray, budget: int, window: int) -> int:
        """Allocate the budget over the view cells [start, n) the sequence holds with these scores and
        compact; returns R."""
        kv, cfg, run = self._adakv, self.adakv_config, self._stats_run
        assert kv is not None and cfg is not None
        n_cells = kv.view_cells()
        t0 = time.perf_counter()
        alloc = AllocationConfig(budget=budget, window=window, alpha=cfg.alpha, max_ratio=cfg.max_ratio,
                                 sinks=cfg.sinks)
        kept = keep_sets(list(scores[:, :, :n_cells]), n_cells, cfg.method, alloc, kernel=cfg.kernel,
                         pooling=cfg.pooling, valid_from=list(kv.starts()), spans=self._span_ids(n_cells),
                         span_share=cfg.span_share)
        t1 = time.perf_counter()
        footprint = kv.compact(kept)
        run.seconds["allocate"] += t1 - t0
        run.seconds["compact"] += time.perf_counter() - t1
        run.compressions += 1
        return footprint

    def _span_ids(self, n_cells: int) -> np.ndarray | None:
        """The span ids (option ``spans``) of cells [0, n_cells), per layer and head: from the
        position each cell holds (the compacted block holds different positions per head)."""
        kv, cfg = self._adakv, self.adakv_config
        assert kv is not None and cfg is not None
        if cfg.spans == "none" or n_cells == 0:
            return None
        if self._spans is None:
            model = self._model
            self._spans = SpanFinder(lambda t: model.detokenize([t]))
        pos = kv.positions(n_cells)
        if pos.max() < 0:
            return None
        by_pos = self._spans.ids(self.input_ids[: int(pos.max()) + 1], cfg.spans)
        return np.where(pos >= 0, by_pos[np.maximum(pos, 0)], -1)

    def _check_chunking(self, tokens: list[int], n_cells: int) -> int:
        """Refuse, before anything is evaluated, a long prompt that cannot be read in chunks; else its
        budget in cells."""
        cfg = self.adakv_config
        assert cfg is not None
        n_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        n_pos = self.n_tokens + len(tokens)
        if n_pos > n_train:
            raise ValueError(
                f"the prompt runs to position {n_pos}, past the {n_train} tokens this model was trained for; "
                "eviction lets a prompt be longer than the cache, not than the model's context (positions "
                "beyond it would break RoPE): shorten the prompt"
            )
        budget = cfg.cells_for(self.n_tokens + len(tokens))
        kv = self._adakv
        layout = kv.block_layout if kv else "pooled"
        bound = _footprint_bound(cfg, budget, kv.n_head_kv if kv else 1, layout)
        need = bound + 2 * cfg.window
        if need > self.n_ctx():
            raise ValueError(
                f"n_ctx = {self.n_ctx()} is too small to read a {len(tokens)}-token prompt in chunks at budget "
                f"{budget}: a compression may leave up to {bound} cells (R, the compacted block), and "
                f"the next chunk and the window need room after them; use n_ctx >= {need} or a smaller budget"
                + (", or bound R with adakv_max_ratio" if layout == "rect" else "")
            )
        return budget

    def _finish_stats(self, n_after: int, budget: int) -> None:
        """The record of a prompt evaluation that went through the budget check (compressed or not)."""
        kv, run = self._adakv, self._stats_run
        assert kv is not None
        if run.compressions == 0:
            n = self.n_tokens
            if budget >= n:
                why = (f"the budget ({budget} cells per head) {'exceeds' if budget > n else 'equals'} the "
                       f"{n}-token prompt: nothing is evicted")
            else:
                held = self._held()
                why = f"the heads hold {held:.1f} cells on average, within the budget of {budget}: nothing is evicted"
            self._record(run, budget, kv.n_cells(), why)
            return
        self._record(run, budget, max(run.total_cells, n_after), "")

    def _record_uncompressed(self, run: StatsRun, n_tokens: int, budget: int | None, reason: str) -> None:
        """The record of an evaluation that did not go through the budget check (see ``reason``)."""
        assert self._adakv is not None
        run.end_chunk(n_tokens)
        self._record(run, budget, self._adakv.n_cells(), reason)

    def _record(self, run: StatsRun, budget: int | None, cells_before: int, reason: str) -> None:
        """A fresh AdaKVStats for this prompt evaluation (none for a token that ``generate`` decodes:
        the completion's record is its prompt's)."""
        kv, cfg = self._adakv, self.adakv_config
        assert kv is not None and cfg is not None
        if self._decoding:
            return
        self.adakv_stats = record(kv, run, n_layer=model_n_layer(self.model), n_tokens=self.n_tokens, budget=budget,
                                  method=cfg.method, window=cfg.window, cells_before=cells_before, reason=reason)

    def reset(self) -> None:
        """llama-cpp-python's ``reset`` (the next prompt is evaluated from the start); ``adakv_stats``
        becomes None: nothing has been evaluated since."""
        super().reset()
        self.adakv_stats = None
        self._decoding = False

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        """llama-cpp-python's ``load_state``, with the compressed cache's layout restored with it.

        Raises:
            RuntimeError: the state cannot be restored into this context; the message says why. When
                its eviction section does not fit (saved by a context without eviction, from another
                model's layout, a damaged, truncated or hand-edited block, ...) the KV cache and the
                token history are left as they were (the next prompt re-evaluates its last token,
                since the logits may have been overwritten). A failure found once the cells were
                read (cells that disagree with the saved block, a blob that ends inside the cells)
                leaves nothing of the cache before: the context is reset, so the next prompt is
                evaluated from scratch.
        """
        self._check_open()
        kv = self._adakv
        if kv is None:
            return super().load_state(state)
        if state.n_tokens > self.input_ids.shape[0]:
            raise RuntimeError(f"cannot load this state: it holds {state.n_tokens} tokens, more than the "
                               f"{self.input_ids.shape[0]} positions of this context; the KV cache was left as it was")
        rows = min(self.n_tokens, self.scores.shape[0]) if self._logits_all else 0
        before = (self.input_ids.copy(), self.n_tokens, self.scores[:rows].copy(), self._seed)
        mem = llama_cpp.llama_get_memory(self.ctx)
        held = llama_cpp.llama_memory_seq_pos_max(mem, 0) >= 0
        kv.clear_last_error()
        try:
            self._load_full_size(state)
        except RuntimeError:
            reason = kv.last_error()  # the eviction section's reason (native), if it was that
            if not reason or (held and llama_cpp.llama_memory_seq_pos_max(mem, 0) < 0):
                self.reset()
                why = reason or "llama.cpp could not restore its cells (truncated or damaged; its log says more)"
                raise RuntimeError(f"cannot load this state: {why}; the context was reset, the next prompt is "
                                   "evaluated from scratch") from None
            self.input_ids, self.n_tokens, self._seed = before[0], before[1], before[3]
            self.scores[:rows] = before[2]
            self._requires_eval = True
            raise RuntimeError(f"cannot load this state: {reason}; the KV cache was left as it was") from None
        return None

    def _load_full_size(self, state: llama_cpp.LlamaState) -> None:
        """llama-cpp-python's ``load_state`` of a state saved here: the token history it keeps (the first
        n_tokens) goes back into one as long as this context's; the logits table is not copied unless
        ``logits_all=True`` (a state without one, then: zeros, as never read before the next evaluation)."""
        n = int(state.n_tokens)
        ids = np.zeros_like(self.input_ids)
        ids[: min(n, state.input_ids.shape[0])] = state.input_ids[:n]
        n_vocab = self.scores.shape[1]
        if not self._logits_all:  # the table is not read back: none copied, whatever the state holds
            scores = np.empty((0, n_vocab), dtype=np.single)
        elif state.scores.shape[0]:
            scores = state.scores
        else:
            scores = np.zeros((1, n_vocab), dtype=np.single)
        full = llama_cpp.LlamaState(input_ids=ids, scores=scores, n_tokens=n, llama_state=state.llama_state,
                                    llama_state_size=state.llama_state_size, seed=state.seed)
        with self._logits_table_unless_logits_all():
            super().load_state(full)

    def _rewind(self) -> None:
        """Drop the cells after n_tokens, as llama-cpp-python's eval does, but check that it worked:
        a compacted block can only be removed as a whole."""
        if not self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1):
            raise RuntimeError(
                f"cannot rewind the KV cache to token {self.n_tokens}: that is inside the compressed "
                "prompt; call reset() and evaluate the prompt again"
            )

    @contextlib.contextmanager
    def adakv_suspended(self) -> Iterator[None]:
        """Evaluate without compressing (e.g. to teacher-force a continuation after a compressed prompt).
        Like the tokens ``generate`` decodes, these evaluations make no stats record: ``adakv_stats``
        stays the record of the prompt evaluated before."""
        self._adakv_suspended = True
        try:
            yield
        finally:
            self._adakv_suspended = False

    @contextlib.contextmanager
    def adakv_decoding(self) -> Iterator[None]:
        """Evaluate tokens as ``generate`` evaluates the ones it decodes (e.g. a greedy loop of one
        ``eval`` per token): no budget check after each, only a compression when the cache is full
        (counted in ``adakv_stats.decode_compressions``), and no stats record of their own."""
        outer = self._decoding
        self._decoding = True
        try:
            yield
        finally:
            self._decoding = outer

    def _eval_batches(self, tokens: Sequence[int], count: int | None = None) -> None:
        """super().eval, one n_batch at a time when a progress callback wants to hear about it.

        count: how many of the tokens count as progress through the prompt (all by default)."""
        count = len(tokens) if count is None else count
        if self.progress_callback is None or len(tokens) <= 1:
            super().eval(tokens)
            self._advance(count if len(tokens) > 1 else 0)
            return None
        for i in range(0, len(tokens), self.n_batch):
            super().eval(tokens[i : i + self.n_batch])
            self._advance(max(0, min(count - i, self.n_batch)))
        return None

    def _advance(self, n: int) -> None:
        """n more prompt tokens are done: tell the progress callback."""
        self._progress[0] += n
        if n > 0 and self.progress_callback is not None:
            self.progress_callback(min(self._progress[0], self._progress[1]), self._progress[1])

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """llama-cpp-python's ``generate``; with eviction, a generation that fills the KV cache
        compresses it (the last ``adakv_window`` tokens generated are the observation window) and goes
        on, up to ``max_tokens`` or the model's trained context. It ends early (finish reason
        "length") only where compressing cannot make room (a budget as large as the cache)."""
        self._check_open()
        self._decoding = False
        gen = super().generate(tokens, *args, **kwargs)
        sent: Any = None
        produced = False
        try:
            while True:
                token = gen.send(sent)
                produced = True
                self._decoding = True  # the evals from here on are decoded tokens: no stats record
                sent = yield token
        except StopIteration:
            return
        except CacheFullError:
            if not produced:
                raise
            if self.verbose:
                print(f"adakv: the KV cache ({self.n_ctx()} cells) is full; generation stops", file=sys.stderr)
        finally:
            self._decoding = False

    def _create_completion(self, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        gen = super()._create_completion(*args, **kwargs)
        if self._n_ctx == self.n_ctx():
            return gen
        return self._trained_context_message(gen)

    def _trained_context_message(self, gen: Iterator[Any]) -> Iterator[Any]:
        """llama-cpp-python names the cache size (n_ctx) in its too-long-prompt error; with eviction
        the limit is the model's trained context."""
        try:
            first = next(gen)
        except StopIteration:
            return
        except ValueError as e:
            m = re.match(r"Requested tokens \((\d+)\) exceed context window", str(e))
            if m is None:
                raise
            raise ValueError(
                f"Requested tokens ({m.group(1)}) exceed context window of {self._n_ctx}: the model's trained "
                f"context (with eviction a prompt may be longer than the KV cache of n_ctx = {self.n_ctx()} cells, "
                "not than the context the model was trained for)"
            ) from None
        yield first
        yield from gen

    # -- inspection --------------------------------------------------------------------------------

    @property
    def adakv_config(self) -> AdaKVConfig | None:
        """The eviction settings of the next evaluation; None evaluates without eviction.

        A new value (``dataclasses.replace`` of the current one) may change every option but the GQA
        reduction, which the graph was built with: it is checked as the constructor checks it. The
        longest prompt follows: the model's trained context with eviction, n_ctx (llama-cpp-python's
        limit and its ValueError) with None or the method "full".

        Raises:
            TypeError: neither an AdaKVConfig nor None.
            ValueError: this Llama was made without eviction (no ``adakv_budget``: it has no
                score buffers), another ``gqa`` than the one it was made with, or a window or
                chunk that does not fit its ``n_batch``, ``n_ubatch`` or ``n_ctx``. The setting
                in force is left as it was.
        """
        return self._adakv_config

    @adakv_config.setter
    def adakv_config(self, config: AdaKVConfig | None) -> None:
        self._check_open()
        if config is not None:
            if not isinstance(config, AdaKVConfig):
                raise TypeError(f"adakv_config must be an AdaKVConfig or None, got {type(config).__name__}")
            if self._adakv is None:
                raise ValueError("adakv_config: this Llama was made without eviction (no adakv_budget), so it has no "
                                 "score buffers; make it with adakv_budget=... to set an eviction config")
            made = self._adakv.gqa_reduce
            if config.gqa != made:
                raise ConfigError("gqa", f"({config.gqa!r}) is fixed when the Llama is made (the graph reduces the "
                                  f"window's scores with it): this one was made with {made!r}; make a new Llama "
                                  f"with adakv_gqa={config.gqa!r}").named("adakv_config.gqa")
            _check_sizes(config, self.n_batch, self.context_params.n_ubatch, self.n_ctx(), "adakv_config.")
        self._allow_long_prompts(config is not None and config.method != "full")
        self._adakv_config = config

    @property
    def adakv_kvcache(self) -> KVCache | None:
        """The low-level handle on this context's eviction (scores, compaction, capture), or None."""
        self._check_open()
        return self._adakv

    def adakv_kept_positions(self) -> list[list[np.ndarray]]:
        """Per model layer, per KV head: the sorted original token positions the cache holds now.

        Only the history llama-cpp-python tracks counts (positions below ``n_tokens``): after
        ``reset()``, which leaves the cells to be removed by the next evaluation, nothing is held.
        Layers that are not evicted (sliding-window layers) list every position of the sequence.
        """
        self._check_open()
        kv = self._adakv
        if kv is None:
            raise RuntimeError("eviction is off (adakv_budget is None)")
        return kept_positions(kv, model_n_layer(self.model), self.n_tokens)


def decoding_context(llm: Any) -> contextlib.AbstractContextManager[None]:
    """The context in which to evaluate tokens decoded one at a time (a greedy loop of ``eval`` calls)
    as ``generate`` evaluates them: our Llama's ``adakv_decoding()`` (no budget check per token, a
    compression only when the cache is full), nothing for a plain ``llama_cpp.Llama``."""
    return llm.adakv_decoding() if hasattr(llm, "adakv_decoding") else contextlib.nullcontext()
