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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _lib

_lib.bind_llama_cpp()  # before llama_cpp is imported

import llama_cpp  # noqa: E402

from .config import AdaKVConfig, ConfigError  # noqa: E402
from .errors import NativeInvalidArgument  # noqa: E402
from .gguf_check import check_gguf  # noqa: E402
from .kvcache import KVCache  # noqa: E402
from .policies import AllocationConfig, keep_sets  # noqa: E402


@dataclass(frozen=True)
class AdaKVStats:
    """What the last compression did.

    kept: int ``[n_layer, n_head_kv]`` cells each head holds after it (every model layer; layers
    that are not evicted, such as sliding-window layers, show the full length). footprint: R,
    the cells of the compacted block. freed: cells released for new tokens. seconds: ``score``
    is the decode of the window's tokens, which computes the scores in the same graph (so an
    upper bound of what scoring costs; ``adakv-local bench`` measures the real overhead against
    the full cache), ``allocate`` the policy, ``compact`` the compaction.
    """

    prompt_tokens: int
    budget: int
    method: str
    window: int
    kept: np.ndarray
    footprint: int
    freed: int
    cells_before: int
    cells_after: int
    seconds: dict[str, float] = field(default_factory=dict)


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
        adakv_window, adakv_kernel, adakv_pooling, adakv_gqa, adakv_alpha, adakv_max_ratio,
            adakv_sinks: see AdaKVConfig.

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
        adakv_gqa: str | None = None,
        adakv_alpha: float | None = None,
        adakv_max_ratio: float | None = None,
        adakv_sinks: int | None = None,
        **kwargs: Any,
    ) -> None:
        config = AdaKVConfig.from_llama_kwargs(
            {
                "adakv_budget": adakv_budget, "adakv_method": adakv_method, "adakv_window": adakv_window,
                "adakv_kernel": adakv_kernel, "adakv_pooling": adakv_pooling, "adakv_gqa": adakv_gqa,
                "adakv_alpha": adakv_alpha, "adakv_max_ratio": adakv_max_ratio, "adakv_sinks": adakv_sinks,
            }
        )  # fmt: skip
        if config is not None:
            if kwargs.get("flash_attn") is False:
                raise ValueError("adakv_budget needs flash attention; remove flash_attn=False")
            kwargs["flash_attn"] = True
            # llama-cpp-python runs ubatches of min(n_batch, n_ubatch) tokens, and n_batch <= n_ctx
            n_batch, n_ubatch = kwargs.get("n_batch", 512), kwargs.get("n_ubatch", 512)
            n_ctx = kwargs.get("n_ctx", 512) or n_batch  # 0: the model's trained context
            if min(n_batch, n_ubatch, n_ctx) < config.window:
                raise ConfigError("window", f"({config.window}) must fit in one ubatch of min(n_batch, n_ubatch, "
                                  f"n_ctx) tokens: raise n_batch (now {n_batch}), n_ubatch (now {n_ubatch}) and "
                                  f"n_ctx (now {n_ctx}) or lower the window").named("adakv_window")
        self.adakv_config: AdaKVConfig | None = config
        #: called as progress_callback(tokens_done, tokens_total) while a prompt is evaluated
        self.progress_callback: Callable[[int, int], None] | None = None
        self._adakv_suspended = False
        self.adakv_stats: AdaKVStats | None = None
        self._adakv: KVCache | None = None
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

    def close(self) -> None:
        # __init__ may have refused the options before llama_cpp.Llama set anything up
        if hasattr(self, "_stack"):
            super().close()

    # -- the hook ----------------------------------------------------------------------------------

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens; a prompt that takes the cache above the budget is compressed after it.

        Everything that describes the compressed cache (start cells, kept positions) is kept by the
        native library, so it travels with ``save_state()`` / ``load_state()``.
        """
        kv, cfg = self._adakv, self.adakv_config
        if kv is None or cfg is None or cfg.method == "full":
            return self._eval_batches(tokens)  # "full" keeps every cell: no scoring, no compaction
        self._rewind()
        if self._adakv_suspended or len(tokens) < cfg.window:
            return self._eval_batches(tokens)
        n_before = kv.n_cells()
        starts = kv.starts()
        n_after = n_before + len(tokens)
        budget = cfg.cells_for(n_after)
        if n_after - float(starts.mean()) <= budget:
            return self._eval_batches(tokens)

        w = cfg.window
        if len(tokens) > w:
            self._eval_batches(tokens[:-w], total=len(tokens))
        t1 = time.perf_counter()
        kv.arm_scores(w)
        super().eval(tokens[-w:])
        if self.progress_callback is not None:
            self.progress_callback(len(tokens), len(tokens))
        t2 = time.perf_counter()
        scores = kv.read_scores(n_after)

        alloc = AllocationConfig(budget=budget, window=w, alpha=cfg.alpha, max_ratio=cfg.max_ratio, sinks=cfg.sinks)
        kept = keep_sets(list(scores), n_after, cfg.method, alloc, kernel=cfg.kernel, pooling=cfg.pooling,
                         valid_from=list(starts))
        t3 = time.perf_counter()
        footprint = kv.compact(kept)
        t4 = time.perf_counter()

        self.adakv_stats = AdaKVStats(
            prompt_tokens=self.n_tokens,
            budget=budget,
            method=cfg.method,
            window=w,
            kept=self._kept_matrix(),
            footprint=footprint,
            freed=n_after - footprint,
            cells_before=n_after,
            cells_after=footprint,
            seconds={"score": t2 - t1, "allocate": t3 - t2, "compact": t4 - t3},
        )
        return None

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        """llama-cpp-python's ``load_state``, with the compressed cache's layout restored with it.

        Raises:
            RuntimeError: the state cannot be restored into this context. When its eviction layout
                does not fit (saved by a context without eviction, from another model's layout, ...)
                the message says why, and the KV cache and the token history are left as they were
                (the next prompt re-evaluates its last token, since the logits may have been
                overwritten). Any other failure leaves the cache half restored: the context is
                reset, so the next prompt is evaluated from scratch.
        """
        kv = self._adakv
        if kv is None:
            return super().load_state(state)
        before = (self.input_ids.copy(), self.n_tokens, self.scores[: self.n_tokens].copy(), self._seed)
        kv.clear_last_error()
        try:
            super().load_state(state)
        except RuntimeError:
            reason = kv.last_error()  # set only by a refusal before anything of the cache changed
            if not reason:
                self.reset()
                raise
            self.input_ids, self.n_tokens, self._seed = before[0], before[1], before[3]
            self.scores[: self.n_tokens] = before[2]
            self._requires_eval = True
            raise RuntimeError(f"cannot load this state: {reason}; the KV cache was left as it was") from None
        return None

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
        """Evaluate without compressing (e.g. to teacher-force a continuation after a compressed prompt)."""
        self._adakv_suspended = True
        try:
            yield
        finally:
            self._adakv_suspended = False

    def _eval_batches(self, tokens: Sequence[int], total: int | None = None) -> None:
        """super().eval, one n_batch at a time when a progress callback wants to hear about it."""
        cb = self.progress_callback
        if cb is None or len(tokens) <= 1:
            return super().eval(tokens)
        total = len(tokens) if total is None else total
        for i in range(0, len(tokens), self.n_batch):
            super().eval(tokens[i : i + self.n_batch])
            cb(min(i + self.n_batch, len(tokens)), total)
        return None

    # -- inspection --------------------------------------------------------------------------------

    @property
    def adakv_kvcache(self) -> KVCache | None:
        """The low-level handle on this context's eviction (scores, compaction, capture), or None."""
        return self._adakv

    def adakv_kept_positions(self) -> list[list[np.ndarray]]:
        """Per model layer, per KV head: the sorted original token positions the cache holds now.

        Only the history llama-cpp-python tracks counts (positions below ``n_tokens``): after
        ``reset()``, which leaves the cells to be removed by the next evaluation, nothing is held.
        Layers that are not evicted (sliding-window layers) list every position of the sequence.
        """
        kv = self._adakv
        if kv is None:
            raise RuntimeError("eviction is off (adakv_budget is None)")
        per_layer = [[p[p < self.n_tokens] for p in layer] for layer in self._cell_positions(kv.n_cells())]
        everything = np.arange(self.n_tokens, dtype=np.int64)
        out: list[list[np.ndarray]] = [[everything] * kv.n_head_kv for _ in range(self._n_layer())]
        for i, il in enumerate(kv.layout.layer_ids):
            out[il] = per_layer[i]
        return out

    def _n_layer(self) -> int:
        return int(llama_cpp.llama_model_n_layer(self.model))

    def _cell_positions(self, n_cells: int) -> list[list[np.ndarray]]:
        """Original position of every valid cell [start, n_cells) of each evicted layer and head,
        as the native library records them (the compacted block, then the tokens after it)."""
        kv = self._adakv
        assert kv is not None
        positions, starts = kv.positions(n_cells).astype(np.int64), kv.starts()
        return [[positions[i, h, starts[i, h] :] for h in range(kv.n_head_kv)] for i in range(kv.n_layer)]

    def _kept_matrix(self) -> np.ndarray:
        kv = self._adakv
        assert kv is not None
        kept = np.full((self._n_layer(), kv.n_head_kv), self.n_tokens, dtype=np.int64)
        n, starts = kv.n_cells(), kv.starts()
        for i, il in enumerate(kv.layout.layer_ids):
            kept[il] = n - starts[i]
        return kept
