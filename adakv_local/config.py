"""The one place where adakv-local's eviction options are defined.

:class:`AdaKVConfig` holds the defaults, the help text and the validation of every option.
``adakv_local.Llama(..., adakv_<name>=...)`` keywords and the CLI's ``--<name>`` flags are
both built from :data:`OPTIONS` (the flags by :mod:`adakv_local.cli.common`: this module knows
nothing of argparse), so that the three never drift apart.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .policies import METHODS
from .pooling import POOLING_MODES
from .spans import SPAN_MODES

POOLINGS = POOLING_MODES
GQA_REDUCTIONS = ("mean", "max")


class ConfigError(ValueError):
    """An option value is out of range. ``option`` is the option's name without prefix."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option} {message}")
        self.option = option
        self.reason = message

    def named(self, name: str) -> ConfigError:
        """The same error, with the option spelled as the caller knows it (``adakv_budget``, ``--budget``)."""
        err = ConfigError(self.option, self.reason)
        err.args = (f"{name} {self.reason}",)
        return err


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    metavar: str


OPTIONS: tuple[Option, ...] = (
    Option("budget", "cells kept per KV head on average, window included (the paper's B): an integer >= the "
           "window (32 by default; 1e3 means 1000), or a fraction of the prompt in (0, 1); prompts shorter than the "
           "budget are left alone; method full ignores it", "B"),
    Option("method", f"allocation method: {', '.join(METHODS)}", "NAME"),
    Option("window", "observation window: the last prompt tokens whose attention scores the cells; "
           "always kept by every head", "W"),
    Option("kernel", "width of the 1-D pooling of the scores along the prompt (odd)", "K"),
    Option("pooling", f"pooling of the scores: {', '.join(POOLINGS)} (max and avg: SnapKV's; -fill: a cell "
           "between two high-scoring cells at most 2 x kernel apart ranks with them, so numbers and phrases are kept "
           "whole; -spread: a quarter of each head's budget is spread over the whole prompt; max2: two scales, a "
           "strong cell's neighbourhood 2 x kernel + 1 wide, keeps 5-digit numbers at budget 128 but costs KL: "
           "docs/SELECTION.md)", "MODE"),
    Option("spans", f"cells ranked as one span: {', '.join(SPAN_MODES)} (numbers: every digit of a number ranks "
           "with its best digit, so numbers are kept whole; long-numbers: the same for numbers of 4 digits or more; "
           "words: the same for every word of several tokens)", "MODE"),
    Option("span_share", "the most cells whole spans may take in one head, as a share of the average selectable "
           "budget (budget - window): the spans with the best scores first, the rest rank cell by cell (inf: no "
           "limit; docs/SELECTION.md)", "S"),
    Option("gqa", f"how the scores of the query heads of one KV head are combined: {' or '.join(GQA_REDUCTIONS)} "
           "(max: a cell one query head attends to is not diluted by the others; closer to the full cache than mean "
           "on answers, summaries and raw text: docs/SELECTION.md; mean was the default before 2026-11-30)", "MODE"),
    Option("alpha", "Ada-KV safeguard: every head keeps at least alpha * (budget - window) of its own best cells "
           "(0 to 1)", "A"),
    Option("max_ratio", "cap on one head's budget as a multiple of the average (>= 1). It no longer bounds memory: "
           "the pooled block costs the sum of the per-head budgets whatever their spread (until 2026-12-06 it "
           "bounded R, the largest head's budget, which every head paid); it only limits Ada's adaptivity", "R"),
    Option("sinks", "first prompt cells always kept (StreamingLLM's sinks; a floor for the other methods)", "N"),
    Option("chunk", "a prompt longer than the cache (n_ctx) is read in chunks of at most this many tokens, "
           "compressed in between with the prompt's last window as a probe; default: as many as fit", "C"),
)


def option(name: str) -> Option:
    """The option called ``name`` (as in :data:`OPTIONS`); KeyError for an unknown one."""
    for opt in OPTIONS:
        if opt.name == name:
            return opt
    raise KeyError(name)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and math.isfinite(x)


def whole_number(x: Any) -> Any:
    """x as a Python int when it is a whole number (1000, 1e3, np.int64(1000)), else x unchanged."""
    if _is_int(x):
        return int(x)
    if _is_real(x) and float(x) == int(x) and float(x) >= 1.0:
        return int(x)
    return x


@dataclass(frozen=True)
class AdaKVConfig:
    """Configuration of per-head KV eviction (defaults follow the Ada-KV and SnapKV papers, except
    ``spans`` and ``gqa``, chosen by measurement: docs/SELECTION.md).

    Raises:
        ConfigError (a ValueError) naming the option and its allowed range, or TypeError.
    """

    budget: int | float
    method: str = "ada-snapkv"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    spans: str = "long-numbers"
    span_share: float = float("inf")
    gqa: str = "max"
    alpha: float = 0.2
    max_ratio: float | None = None
    sinks: int = 0
    chunk: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", whole_number(self.budget))  # 1e3 -> 1000
        for name in ("window", "kernel", "sinks"):  # np.int64(8) -> 8
            if _is_int(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        if self.method not in METHODS:
            raise ConfigError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not _is_int(self.window) or self.window < 1:
            raise ConfigError("window", f"must be an integer >= 1, got {self.window!r}")
        b, lowest = self.budget, 1 if self.method == "full" else self.window
        allowed = (f"an integer >= {lowest if self.method == 'full' else f'the window ({lowest}, always kept)'} "
                   "or a fraction of the prompt in (0, 1)")
        if not _is_real(b) or (_is_int(b) and b < lowest):
            raise ConfigError("budget", f"must be {allowed}; got {b!r}")
        if not _is_int(b) and not 0.0 < b < 1.0:
            raise ConfigError("budget", f"must be {allowed}; got {b!r}, which is neither")
        if not _is_int(self.kernel) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError("kernel", f"must be an odd integer >= 1, got {self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError("pooling", f"must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.spans not in SPAN_MODES:
            raise ConfigError("spans", f"must be one of {', '.join(SPAN_MODES)}, got {self.spans!r}")
        share = self.span_share
        if isinstance(share, (bool, np.bool_)) or not isinstance(share, numbers.Real) or not share >= 0.0:
            raise ConfigError("span_share", f"must be a number >= 0 (inf: no limit), got {share!r}")
        if self.gqa not in GQA_REDUCTIONS:
            raise ConfigError("gqa", f"must be one of {', '.join(GQA_REDUCTIONS)}, got {self.gqa!r}")
        if not _is_real(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must be a number in [0, 1], got {self.alpha!r}")
        if self.max_ratio is not None and (not _is_real(self.max_ratio) or self.max_ratio < 1.0):
            raise ConfigError("max_ratio", f"must be None or a number >= 1, got {self.max_ratio!r}")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise ConfigError("sinks", f"must be an integer >= 0, got {self.sinks!r}")
        if self.chunk is not None:
            if _is_int(self.chunk) or (_is_real(self.chunk) and float(self.chunk) == int(self.chunk)):
                object.__setattr__(self, "chunk", int(self.chunk))
            if not _is_int(self.chunk) or self.chunk < 1:
                raise ConfigError("chunk", f"must be None or an integer >= 1, got {self.chunk!r}")

    def cells_for(self, n_cells: int) -> int:
        """The budget in cells for a prompt of n_cells (a fraction is taken of the prompt)."""
        if _is_int(self.budget):
            return int(self.budget)
        return max(self.window + 1, int(round(self.budget * n_cells)))

    # -- the two front doors ------------------------------------------------------------------------

    @classmethod
    def from_llama_kwargs(cls, kwargs: Mapping[str, Any]) -> AdaKVConfig | None:
        """From ``adakv_<name>`` keywords; None when ``adakv_budget`` is None (eviction off)."""
        if kwargs.get("adakv_budget") is None:
            others = [k for k, v in kwargs.items() if k != "adakv_budget" and v is not None]
            if others:
                raise ConfigError("budget", f"is None (eviction off) but {', '.join(sorted(others))} were given; "
                                  "set adakv_budget to enable eviction").named("adakv_budget")
            return None
        values = {k[len("adakv_"):]: v for k, v in kwargs.items() if v is not None}
        try:
            return cls(**values)
        except ConfigError as e:
            raise e.named(f"adakv_{e.option}") from None

    def llama_kwargs(self) -> dict[str, Any]:
        """The ``adakv_<name>`` keywords that give ``adakv_local.Llama`` this configuration."""
        return {f"adakv_{opt.name}": getattr(self, opt.name) for opt in OPTIONS}
