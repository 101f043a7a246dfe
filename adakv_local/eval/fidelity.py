"""Fidelity of a compressed cache to the full one: teacher-forced next-token distributions.

For a prompt and a fixed continuation, the model's next-token logits at every continuation
position are computed twice: after the full prompt and after the compressed prompt (the
continuation itself is never compressed). The distance between the two is the mean
KL(full || compressed), the largest KL, and the top-1 agreement. The paper's own objective,
the L1 distance of the attention outputs, is measured on the same continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def last_logits(llm: Any) -> np.ndarray:
    """A copy of the logits of the last evaluated token (llama.cpp's own buffer, whatever logits_all is)."""
    import llama_cpp  # bound to adakv-local's library by whoever created llm

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Fidelity:
    kl_mean: float
    kl_max: float
    top1: float  # share of positions whose argmax agrees with the full cache's


def compare(full: np.ndarray, compressed: np.ndarray) -> Fidelity:
    """KL(full || compressed) and top-1 agreement of two [n_positions, n_vocab] logit arrays."""
    if full.shape != compressed.shape:
        raise ValueError(f"logit arrays differ in shape: {full.shape} vs {compressed.shape}")
    lp, lq = log_softmax(full), log_softmax(compressed)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = float(np.mean(full.argmax(axis=-1) == compressed.argmax(axis=-1)))
    return Fidelity(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1=top1)


def attention_l1(full: np.ndarray, compressed: np.ndarray) -> float:
    """Relative L1 distance of attention outputs, ``[n_layer, n_tokens, width]`` each:
    ``||full - compressed||_1 / ||full||_1`` per layer and token, averaged over both."""
    if full.shape != compressed.shape or full.ndim != 3:
        raise ValueError(f"attention outputs must be two equal [n_layer, n_tokens, width] arrays, "
                         f"got {full.shape} and {compressed.shape}")
    a, b = full.astype(np.float64), compressed.astype(np.float64)
    norm = np.maximum(np.abs(a).sum(axis=-1), np.finfo(np.float64).tiny)
    return float((np.abs(a - b).sum(axis=-1) / norm).mean())


def teacher_forced_logits(llm: Any, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
    """Logits predicting each continuation token: [len(continuation), n_vocab].

    llm must have been created with logits_all=True. The prompt is evaluated from scratch (and
    compressed if llm is an adakv_local.Llama with a budget); the continuation is not compressed.
    """
    if not getattr(llm, "_logits_all", False):
        raise ValueError("teacher forcing needs a Llama created with logits_all=True")
    llm.reset()
    llm.eval(list(prompt))
    n0 = llm.n_tokens
    suspended = getattr(llm, "adakv_suspended", None)
    if suspended is not None:
        with suspended():
            llm.eval(list(continuation[:-1]))
    else:
        llm.eval(list(continuation[:-1]))
    return np.array(llm.scores[n0 - 1 : n0 - 1 + len(continuation)], dtype=np.float32)
