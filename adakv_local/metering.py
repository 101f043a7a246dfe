"""One request, measured: the ``Llama`` of the commands and the server, and the stats they report.

``metered_class()`` is :class:`adakv_local.Llama` with a :class:`Meter` (the prompt's evaluation,
each sampled token, a saved conversation state loaded or saved); :func:`request_stats` turns the
meter and ``Llama.adakv_stats`` into the one stats record that ``summarize --json``, ``chat``
and the server's ``adakv`` field print (the meaning of each key: :mod:`adakv_local.cli.summarize`).
"""

from __future__ import annotations

import time
from typing import Any

from .config import AdaKVConfig


class Meter:
    """Times of one request: the first ``eval`` is the prompt, every ``sample`` a generated token."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t_start = time.perf_counter()
        self.prefill_done = False
        self.prefill_tokens = 0  # tokens evaluated for the prompt (the rest came from the prefix cache)
        self.prefill_s = 0.0
        self.t_prefill_end = self.t_start
        self.prompt_tokens = 0  # the whole prompt, cached part included
        self.generated = 0
        self.t_last = self.t_start
        self.on_prefill_done: Any = None
        self.resumed_tokens = 0  # tokens of the saved conversation state this request loaded (0: none)
        self.saved_state_bytes = 0  # bytes of the state saved after it (0: none saved)

    @property
    def decode_s(self) -> float:
        return max(0.0, self.t_last - self.t_prefill_end) if self.generated else 0.0


_METERED: Any = None


def metered_class() -> Any:
    """:class:`adakv_local.Llama` with a :class:`Meter` in ``llm.meter`` (made on first use: defining it
    imports llama_cpp, which needs the native library)."""
    global _METERED
    if _METERED is None:
        from .llama import Llama

        class MeteredLlama(Llama):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.meter = Meter()
                super().__init__(*args, **kwargs)

            def eval(self, tokens: Any) -> None:
                m = self.meter
                if m.prefill_done:
                    return super().eval(tokens)
                t0 = time.perf_counter()
                super().eval(tokens)
                m.t_prefill_end = time.perf_counter()
                m.prefill_s = m.t_prefill_end - t0
                m.prefill_tokens = len(tokens)
                m.prompt_tokens = self.n_tokens
                m.prefill_done = True
                if m.on_prefill_done is not None:
                    m.on_prefill_done()
                return None

            def load_state(self, state: Any) -> None:
                super().load_state(state)
                self.meter.resumed_tokens = int(state.n_tokens)

            def save_state(self) -> Any:
                state = super().save_state()
                from .conversations import state_bytes

                self.meter.saved_state_bytes = state_bytes(state)
                return state

            def sample(self, *args: Any, **kwargs: Any) -> int:
                token = super().sample(*args, **kwargs)
                self.meter.generated += 1
                self.meter.t_last = time.perf_counter()
                return token

        _METERED = MeteredLlama
    return _METERED




def request_stats(llm: Any, cfg: AdaKVConfig) -> dict[str, Any]:
    """The stats of the last request (the meaning of each: the module docs of cli.summarize).

    The cache figures are those of ``llm.adakv_stats``, the record of this request's prompt
    evaluation (bytes from the native memory figures), so that the CLI, the server and
    ``AdaKVStats`` print the same numbers; the times and token counts come from ``llm.meter``.
    """
    m: Meter = llm.meter
    st = llm.adakv_stats
    if st is None:
        raise RuntimeError("no eviction stats: the request evaluated no prompt with eviction on")
    full = cfg.method == "full"  # keeps every cell: no budget, nothing evicted
    return {
        "prompt_tokens": m.prompt_tokens,
        "prefill_tokens": m.prefill_tokens,
        "completion_tokens": m.generated,
        "compressed": st.compressed,
        "reason": None if st.compressed else st.reason,
        "method": cfg.method,
        "budget": None if full else st.budget,
        "window": cfg.window,
        "kv_cells_before": st.cells_before,
        "kv_cells_after": st.cells_after,
        "kv_cells_kept_mean": round(st.kept_mean, 1),
        "kv_bytes_before": st.kv_bytes_before,
        "kv_bytes_after": st.kv_bytes,
        "prefill_seconds": round(m.prefill_s, 4),
        "prefill_tps": round(m.prefill_tokens / m.prefill_s, 2) if m.prefill_s > 0 else None,
        "decode_seconds": round(m.decode_s, 4),
        "decode_tps": round(m.generated / m.decode_s, 2) if m.decode_s > 0 else None,
        "seconds": {k: round(float(v), 4) for k, v in st.seconds.items()},
        "footprint": st.footprint if st.compressed else st.cells_after,
        "chunks": st.chunks,
        "compressions": st.compressions,
        "peak_cells": st.peak_cells,
        "kv_bytes_peak": st.kv_bytes_peak,
        "kv_bytes_allocated": st.kv_bytes_allocated,
        "reevaluated": st.reevaluated,
        "decode_compressions": st.decode_compressions,
        "decode_compress_seconds": round(st.decode_seconds, 4),
        "state_resumed_tokens": m.resumed_tokens,
        "state_saved_bytes": m.saved_state_bytes,
    }
