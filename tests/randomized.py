"""Seeded randomized test of ``adakv_local.Llama`` through its public API: cases, oracle, replay.

One case is one seed. The seed draws a configuration (a tiny random-weight model: llama with 1, 2
or 4 KV heads or none shared, gemma3 with iSWA, 16 layers x 8 KV heads; the eviction options;
``n_batch``; ``logits_all``; the attention path; q8_0/q4_0 caches for head size 64)
and a script of 3-6 steps, drawn one at a time from the state the script has reached:

* ``eval``: ``llm.eval(new tokens)`` (always extends the history);
* ``complete``: ``llm.create_completion(prompt, temperature=0, max_tokens=1..6, stream=...)`` (a
  streamed completion is sometimes dropped after a few chunks), where the prompt token list
  extends the history, is a prefix of it, or diverges from it inside the compacted block (before
  its last R positions, where a plain ``seq_rm`` would take every cell, or in those R positions)
  or after the block;
* ``reset()``, ``save_state()``, ``load_state()`` of any earlier saved state.

New token counts: 1, the window -1/0/+1, below the budget, the budget, and a few times the budget.

The oracle, for every step:

* no exception; finite logits (``scores`` rows with ``logits_all``, else the last row of the
  context's logits);
* for every ``eval`` call (also those made inside ``create_completion``): the cache holds what
  llama-cpp-python believes it holds (its history is never cut inside the compacted block, and
  cells = footprint + tokens after the block); a compression happens exactly when the call has
  at least ``window`` tokens and takes the average cells per head above the budget (a fraction
  of the conversation's tokens), or fewer tokens and takes them more than a window above it (its
  window completed with at most the cells after the block), or, for a token ``generate``
  decodes, when it does not fit the cache; after one:
  ``adakv_stats`` matches (budget, cells, footprint = the block of the layout = cells held), each layer keeps
  the total that the method's allocation gives (``policies.METHODS[m].allocate`` on scores of
  the same validity pattern: totals and uniform counts do not depend on the score values), Ada
  heads stay between their safeguard floor and their ``max_ratio`` cap, every head keeps the
  window and only positions it held before, and the attention sinks stay while every
  compression's selectable budget could hold them;
* kept positions (``adakv_kept_positions()``) after every step: sorted, unique, in
  ``[0, n_tokens)``, every token after the last compression present in every head, the last
  compressed prompt's window present, unevicted layers and method ``full`` hold everything;
* equality with a reference: after every step that evaluates or loads a state, a *fresh*
  ``Llama`` with the same configuration replays the steps that make up the same history
  without detours (no ``save``/``load`` round trips, no steps that a ``reset()`` or a
  re-evaluation discarded) and then performs the same step. A prompt that diverges inside the
  compacted block must be re-evaluated from scratch, so its reference is a fresh context that
  runs that one step; a divergence after the block may reuse the cached prefix, so its
  reference replays the history first. Compared exactly (the same computation on the same CPU
  with one thread; no tolerance): the text, the token history, the logits, the compression
  events of the step, cells, footprint, starts and every head's kept positions.

Three things of llama.cpp / llama-cpp-python (true without eviction too) shape the references:
the last logits are not part of a saved state (llama-cpp-python re-evaluates the last token
after ``load_state``), so they are compared again only after the next evaluation; for the same
reason a prompt equal to the whole history is not drawn right after a load (its last token would
be decoded alone, rounding differently from the batch the reference decoded it in); and an iSWA
model's restored cache rounds differently from a computed one, so there the reference saves and
loads in place at the branch point (see ``Case._run``).

A fresh reference is cheap (a tiny model loads in a few milliseconds), so every comparison uses a
new one. Configurations with another attention path than the default (the per-head fallback,
the per-head mask) are run in a subprocess by the test, so that a native abort (GGML_ASSERT) is
reported as that case's failure.

A case is named by its seed, or by ``SEED:VARIANT`` for a draw with some options pinned
(:data:`VARIANTS`). Run cases: ``python tests/randomized.py SEED [SEED:deep ...]`` (prints the
configuration and the script), or ``ADAKV_RANDOM_SEEDS=SEED,... python -m pytest
tests/test_random_api.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

# run as a script, this imports the installed adakv_local, or the one PYTHONPATH names (a checkout
# whose libraries ADAKV_LIB_DIR points at): run_in_subprocess passes its own on
import adakv_local  # (binds llama_cpp to our libllama before it is imported)
from adakv_local import Llama  # noqa: E402
from adakv_local.config import AdaKVConfig  # noqa: E402
from adakv_local.fattn import GGML_TYPES  # noqa: E402
from adakv_local.policies import METHODS, AllocationConfig, pyramid_schedule  # noqa: E402

# ---------------------------------------------------------------------------- models

#: name -> (writer, keywords, weight in the draw). Head size >= 16 everywhere; f16 caches except "-h64".
MODELS: dict[str, tuple[str, dict[str, Any], float]] = {
    "llama-kv1": ("llama", dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=1, n_ff=64, seed=31), 0.16),
    "llama-kv2": ("llama", dict(n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=64, seed=32), 0.20),
    "llama-kv4": ("llama", dict(n_layer=2, n_embd=128, n_head=8, n_head_kv=4, n_ff=64, seed=33), 0.14),
    "llama-mha": ("llama", dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=4, n_ff=64, seed=34), 0.08),
    "gemma3-kv2": ("gemma3", dict(n_layer=6, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64,
                                  sliding_window=8, sliding_window_pattern=3, seed=35), 0.18),
    "gemma3-kv1": ("gemma3", dict(n_layer=4, n_embd=64, n_head=2, n_head_kv=1, head_dim=32, n_ff=64,
                                  sliding_window=4, sliding_window_pattern=2, seed=36), 0.12),
    # head size 64: also run with q8_0 and q4_0 caches (rows of whole quantization blocks)
    "llama-h64": ("llama", dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=64, n_ff=64, seed=38), 0.08),
    "gemma3-h64": ("gemma3", dict(n_layer=4, n_embd=64, n_head=2, n_head_kv=1, head_dim=64, n_ff=64,
                                  sliding_window=8, sliding_window_pattern=2, seed=39), 0.06),
    # many layers x 8 KV heads: the per-head fallback attention builds one call per KV head and layer
    "llama-deep-kv8": ("llama", dict(n_layer=16, n_embd=128, n_head=8, n_head_kv=8, n_ff=32, seed=37), 0.12),
}  # fmt: skip


def write_models(folder: str | os.PathLike[str]) -> Path:
    """Write every model of MODELS that is not in ``folder`` yet (deterministic files)."""
    from adakv_local.testing import write_gemma3_gguf, write_llama_gguf

    folder = Path(folder)
    for name, (kind, kw, _) in MODELS.items():
        path = folder / f"{name}.gguf"
        if not path.exists():
            (write_llama_gguf if kind == "llama" else write_gemma3_gguf)(path, **kw)
    return folder


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class CaseConfig:
    seed: int
    model: str
    budget: int | float
    method: str
    window: int
    kernel: int
    pooling: str
    gqa: str
    alpha: float
    max_ratio: float | None
    sinks: int
    n_batch: int
    logits_all: bool
    attn_path: str  # "auto" (the fast path), "heads" (one call per KV head: the fallback), "mask"
    type_kv: str = "f16"
    n_ctx: int = 1024
    spans: str = "long-numbers"
    span_share: float = float("inf")
    layout: str = "pooled"  # how the block lies in memory (ADAKV_LAYOUT): "pooled" or "rect"

    def llama_kwargs(self, models: Path) -> dict[str, Any]:
        return dict(
            model_path=str(models / f"{self.model}.gguf"), n_ctx=self.n_ctx, n_batch=self.n_batch,
            logits_all=self.logits_all, n_threads=1, n_threads_batch=1, seed=0, verbose=False,
            type_k=GGML_TYPES[self.type_kv], type_v=GGML_TYPES[self.type_kv],
            adakv_budget=self.budget, adakv_method=self.method, adakv_window=self.window,
            adakv_kernel=self.kernel, adakv_pooling=self.pooling, adakv_gqa=self.gqa, adakv_alpha=self.alpha,
            adakv_max_ratio=self.max_ratio, adakv_sinks=self.sinks, adakv_spans=self.spans,
            adakv_span_share=self.span_share,
        )  # fmt: skip

    @property
    def adakv(self) -> AdaKVConfig:
        cfg = AdaKVConfig.from_llama_kwargs({k: v for k, v in self.llama_kwargs(Path(".")).items()
                                             if k.startswith("adakv_")})  # fmt: skip
        assert cfg is not None
        return cfg


def _pick(rng: np.random.Generator, values: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    p = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
    return values[int(rng.choice(len(values), p=p))]


#: variants of a seed's draw (a case key is "SEED" or "SEED:VARIANT")
VARIANTS = {
    # the per-head fallback attention on 16 layers x 8 KV heads (graph size), in every default run
    "deep": dict(model="llama-deep-kv8", attn_path="heads", type_kv="f16"),
}


def parse_key(key: int | str) -> tuple[int, str]:
    seed, _, variant = str(key).partition(":")
    if variant and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} in case {key!r}; known: {sorted(VARIANTS)}")
    return int(seed), variant


def random_config(key: int | str) -> CaseConfig:
    seed, variant = parse_key(key)
    cfg = _draw_config(seed)
    return dataclasses.replace(cfg, **VARIANTS[variant]) if variant else cfg


def _draw_config(seed: int) -> CaseConfig:
    rng = np.random.default_rng([seed, 0])
    names = list(MODELS)
    model = _pick(rng, names, [MODELS[n][2] for n in names])
    method = _pick(rng, list(METHODS))
    window = int(_pick(rng, [1, 2, 3, 4, 6, 8, 16, 32], [0.04, 0.1, 0.06, 0.2, 0.1, 0.25, 0.15, 0.1]))
    if rng.random() < 0.65:
        budget: int | float = window + int(_pick(rng, [0, 1, int(rng.integers(2, 17)), int(rng.integers(17, 65))],
                                                 [0.1, 0.1, 0.45, 0.35]))  # fmt: skip
        if method == "full" and rng.random() < 0.3:
            budget = int(rng.integers(1, window + 1))  # "full" ignores the budget: any integer >= 1
    else:
        budget = round(float(rng.uniform(0.05, 0.95)), 2)
    n_batch = 512
    u = rng.random()
    if u < 0.04:
        n_batch = max(1, window - 1) if window > 1 else 512  # smaller than the window: refused or working
    elif u < 0.3:
        n_batch = int(_pick(rng, [window, 2 * window + 1, 64]))
    return CaseConfig(
        seed=seed, model=model, budget=budget, method=method, window=window,
        kernel=int(_pick(rng, [1, 3, 5, 7, 15])), pooling=_pick(rng, ["max", "avg"]), gqa=_pick(rng, ["mean", "max"]),
        alpha=float(_pick(rng, [0.0, 0.2, 0.5, 1.0, round(float(rng.uniform(0, 1)), 2)])),
        max_ratio=None if rng.random() < 0.5 else float(_pick(rng, [1.0, 1.25, 1.5, 2.0, 3.0])),
        sinks=0 if rng.random() < 0.75 else int(rng.integers(1, 6)),
        n_batch=n_batch, logits_all=bool(rng.random() < 0.5),
        attn_path=_pick(rng, ["auto", "heads", "mask"], [0.25, 0.6, 0.15] if model == "llama-deep-kv8"
                        else [0.75, 0.15, 0.1]),
        type_kv=_pick(rng, ["f16", "q8_0", "q4_0"]) if model.endswith("-h64") else "f16",
        # drawn from a stream of its own, so that the other options of every seed stay as they were
        spans=_pick(np.random.default_rng([seed, 14]), ["none", "numbers", "long-numbers", "words"]),
        span_share=_pick(np.random.default_rng([seed, 15]), [float("inf"), 0.0, 0.125, 0.25, 0.5, 2.0]),
        layout=_pick(np.random.default_rng([seed, 16]), ["pooled", "rect"], [0.75, 0.25]),
    )  # fmt: skip


# ---------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    kind: str  # eval, complete, reset, save, load; roundtrip (save and load at once: references only)
    what: str = ""  # how the prompt relates to the history (extend, prefix, diverge-head, ...)
    tokens: tuple[int, ...] = ()  # eval: the new tokens; complete: the whole prompt
    max_tokens: int = 0
    stream: bool = False
    stop_after: int | None = None  # stream: drop the generator after this many chunks
    slot: int = -1  # save/load: which saved state

    def __str__(self) -> str:
        if self.kind == "eval":
            return f"eval({len(self.tokens)} tokens)"
        if self.kind == "complete":
            s = f", stream, dropped after {self.stop_after} chunks" if self.stop_after else ", stream" * self.stream
            return f"complete[{self.what}](prompt of {len(self.tokens)}, max_tokens={self.max_tokens}{s})"
        return f"{self.kind}({self.slot})" if self.kind in ("save", "load") else f"{self.kind}()"


@dataclass
class Ideal:
    """What the context should hold: the steps that a fresh context replays to get there."""

    steps: list[Step] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    block_end: int | None = None  # n_tokens after the last compression
    footprint: int = 0
    requires_eval: bool = True  # llama-cpp-python re-evaluates the last token of an exact cache hit
    compressed: bool = False  # a compression since the last save or load

    def copy(self) -> Ideal:
        return dataclasses.replace(self, steps=list(self.steps), tokens=list(self.tokens))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ideal_after(ideal: Ideal, step: Step) -> list[Step]:
    """The steps a fresh context replays, then ``step``, to reach what ``step`` should leave.

    Mirrors llama-cpp-python's ``generate``: an exact cache hit with live logits samples at once;
    otherwise the longest common prefix (minus one when the prompt is consumed) is kept if the cache
    can be cut there, i.e. after the compacted block, and everything is re-evaluated if not.
    """
    if step.kind == "eval":
        return [*ideal.steps, step] if ideal.tokens else [step]
    h, p = ideal.tokens, list(step.tokens)
    lp = _common_prefix(h, p)
    consumed = lp == len(p)
    if consumed and len(h) == len(p) and not ideal.requires_eval:
        return [*ideal.steps, step]
    reuse = lp - 1 if consumed else lp
    if reuse > 0 and (ideal.block_end is None or reuse >= ideal.block_end):
        return [*ideal.steps, step]
    return [step]


def next_step(rng: np.random.Generator, cfg: CaseConfig, ideal: Ideal, n_saved: int, vocab: Sequence[int],
              bos: int, branchy: bool = False) -> Step:  # fmt: skip
    """The next step from the state reached. ``branchy``: save after compressions and load after
    compressions more often (a stale state after a load needs save, compression, load)."""
    h = ideal.tokens
    b, r = ideal.block_end, ideal.footprint
    kinds: dict[str, float] = {"eval": 0.18, "extend": 0.32}
    if h:
        kinds.update({"prefix": 0.06, "reset": 0.05, "save": 0.16 if b is not None else 0.06})
        if b is not None and b - r > 1:
            kinds["diverge-head"] = 0.12  # before the footprint: seq_rm would take out the whole block
        if b is not None and r > 0:
            kinds["diverge-tail"] = 0.06  # in the last R positions of the block: seq_rm is refused
        if len(h) > (b or 1):
            kinds["diverge-after"] = 0.12
    if n_saved:
        kinds["load"] = 0.2  # branch back: compressions on both branches, compared with one that never branched
    if branchy and ideal.compressed:
        kinds["save"] = 0.4
        if n_saved:
            kinds["load"] = 0.8
    kind = _pick(rng, list(kinds), list(kinds.values()))
    if kind in ("reset", "save", "load"):
        slot = n_saved if kind == "save" else int(rng.integers(0, max(n_saved, 1)))
        return Step(kind, slot=slot if kind != "reset" else -1)

    if kind == "prefix":
        p = int(rng.integers(1, len(h) + 1))
        if p == len(h) and ideal.requires_eval:
            p = max(1, p - 1)  # an exact hit after load_state decodes its last token alone: see the docstring
        return _complete(rng, cfg, "prefix", list(h[:p]))
    if kind == "eval" or kind == "extend":
        base = list(h) if h else [bos]
        what = "extend"
    else:
        if kind == "diverge-after":
            lo, hi = b or 1, len(h)
        else:
            assert b is not None
            lo, hi = (1, b - r) if kind == "diverge-head" else (max(1, b - r), b)
        p = int(rng.integers(lo, hi))
        other = [t for t in vocab if t != h[p]]
        base = [*h[:p], int(rng.choice(other))]
        what = f"{kind}@{p}"
    room = cfg.n_ctx - 16 - len(base)
    if room < 1:
        return Step("reset")
    new = [int(t) for t in rng.choice(vocab, size=min(_new_count(rng, cfg), room))]
    if kind == "eval":
        if not h:
            new = [bos, *new[:-1]] if len(new) > 1 else [bos]
        return Step("eval", "extend", tuple(new))
    return _complete(rng, cfg, what, base + new)


def _new_count(rng: np.random.Generator, cfg: CaseConfig) -> int:
    w = cfg.window
    b = cfg.budget if isinstance(cfg.budget, int) else w + 24
    b = max(b, w + 1)
    return int(_pick(rng, [
        1, max(1, w - 1), w, w + 1, int(rng.integers(1, b)), b, b + 1, int(rng.integers(2 * b, 5 * b + 1)),
    ], [0.08, 0.08, 0.12, 0.08, 0.22, 0.07, 0.07, 0.28]))  # fmt: skip


def _complete(rng: np.random.Generator, cfg: CaseConfig, what: str, prompt: list[int]) -> Step:
    max_tokens = int(rng.integers(1, 7))
    if len(prompt) + max_tokens >= cfg.n_ctx - 8:
        prompt = prompt[: cfg.n_ctx - 8 - max_tokens]
    stream = bool(rng.random() < 0.5)
    stop = int(rng.integers(1, max_tokens + 1)) if stream and max_tokens > 1 and rng.random() < 0.25 else None
    return Step("complete", what, tuple(prompt), max_tokens, stream, stop)


# ---------------------------------------------------------------------------- the oracle


class CheckFailed(AssertionError):
    pass


def check(cond: Any, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def _sel_budgets(cfg: CaseConfig, n_layer: int, budget: int, n_sel: int) -> list[int]:
    """B'_l, the selectable budget of each evicted layer (the PyramidKV schedule for the pyramids)."""
    sel = budget - cfg.window
    if cfg.method in ("pyramidkv", "ada-pyramid"):
        return [int(x) for x in pyramid_schedule(sel, n_layer, METHODS[cfg.method].beta, n_sel)]
    return [sel] * n_layer


def _floor_mul(x: float, n: int) -> int:
    return math.floor(Fraction(repr(float(x))) * n)  # the rounding rule of policies.py


class CheckedLlama(Llama):
    """``adakv_local.Llama`` that checks every top-level ``eval`` call, including those that
    ``create_completion`` makes (test instrumentation: the library is used as is)."""

    rt_cfg: CaseConfig | None = None
    rt_depth = 0
    rt_after_load = False

    def rt_start(self, cfg: CaseConfig) -> None:
        self.rt_cfg = cfg
        self.rt_block_end: int | None = None  # n_tokens after the last compression
        self.rt_sinks_kept: list[bool] | None = None  # per evicted layer: sinks must still be there
        self.rt_events: list[tuple[Any, ...]] = []  # the compressions of the current step

    def eval(self, tokens: Sequence[int]) -> None:
        if self.rt_cfg is None or self.rt_depth:
            return super().eval(tokens)
        self.rt_depth += 1
        try:
            before = self._rt_before(tokens)
            super().eval(tokens)
            self._rt_after(tokens, before)
        finally:
            self.rt_depth -= 1
        return None

    def _rt_before(self, tokens: Sequence[int]) -> dict[str, Any]:
        kv = self.adakv_kvcache
        n = self.n_tokens
        if n == 0:
            self.rt_block_end, self.rt_sinks_kept = None, None
            shape = (kv.n_layer, kv.n_head_kv)
            return dict(n=0, cells=0, view=0, starts=np.zeros(shape, np.int64), positions=None,
                        stats=self.adakv_stats, footprint=0, decoding=self._decoding)
        check_cache_holds_history(self)
        return dict(n=n, cells=kv.n_cells(), view=kv.view_cells(), starts=kv.starts().astype(np.int64),
                    positions=self.adakv_kept_positions(), stats=self.adakv_stats, footprint=kv.footprint(),
                    decoding=self._decoding)  # fmt: skip

    def _rt_after(self, tokens: Sequence[int], before: dict[str, Any]) -> None:
        cfg = self.rt_cfg
        assert cfg is not None
        kv = self.adakv_kvcache
        m, w = len(tokens), cfg.window
        check(self.n_tokens == before["n"] + m, f"n_tokens {self.n_tokens} after eval of {m} on {before['n']}")
        n_after = before["cells"] + m  # cache cells
        n_view = before["view"] + m  # cells of the per-head view (what starts and kept cells index)
        budget = cfg.adakv.cells_for(self.n_tokens)  # a fraction is of the conversation's tokens
        starts = before["starts"]
        new = self.adakv_stats
        where = f"eval of {m} tokens on {before['n']} (cells {before['cells']} -> {n_after}, budget {budget})"
        if before["decoding"]:
            # a token generate decodes: no record of its own; a compression (counted in the prompt's
            # record) exactly when it did not fit the cache
            old = before["stats"]
            made_room = (new is not None and old is not None and new.decode_compressions > old.decode_compressions)
            full = n_after > self.n_ctx() and cfg.method != "full"
            check(made_room == full, f"{'a' if made_room else 'no'} compression while decoding, {where}, "
                  f"n_ctx {self.n_ctx()}")
            if made_room:
                self.rt_block_end = self.n_tokens - m
            return
        # a prompt: a new record, compressed when the average cells per head go above the budget (a
        # turn shorter than the window: a window above it, its window completed from the cache)
        compressed = new is not before["stats"] and new is not None and new.compressed
        held = n_view - float(starts.mean())
        should = cfg.method != "full" and held > (budget if m >= w else budget + w)
        if compressed and m < w:
            taken = new.reevaluated
            check(0 <= taken <= min(w - m, before["cells"] - before["footprint"], before["n"]),
                  f"{taken} tokens taken back to complete the window of a {m}-token turn, {where}")
            w = m + taken
        if cfg.method == "full":
            pass  # keeps every cell: compressing or not are both right; positions are checked below
        elif should:
            check(compressed, f"no compression after the {where}, whose average cells per head "
                  f"{n_view - float(starts.mean()):.1f} exceed the budget")  # fmt: skip
        else:
            check(not compressed, f"a compression after the {where}, which does not need one")
        if not compressed:
            return
        self.rt_block_end = self.n_tokens
        st = self.adakv_stats
        ids = list(kv.layout.layer_ids)
        pos = self.adakv_kept_positions()
        kept = np.array([[len(pos[il][h]) for h in range(kv.n_head_kv)] for il in ids])
        r = kv.footprint()
        self.rt_events.append((st.cells_before, st.budget, st.footprint, st.kept.tolist()))
        check(st.cells_before == n_after and st.budget == budget and st.window == cfg.window
              and st.method == cfg.method,
              f"adakv_stats {st.cells_before=} {st.budget=} {st.window=} {st.method=} after the {where}")
        check(st.prompt_tokens == self.n_tokens, f"adakv_stats.prompt_tokens {st.prompt_tokens} != {self.n_tokens}")
        check(np.array_equal(st.kept[ids], kept), f"adakv_stats.kept {st.kept[ids].tolist()} != kept positions "
              f"{kept.tolist()}")  # fmt: skip
        # the rect block is as wide as the largest head; the pooled one packs each layer's kept rows
        want_r = kept.max() if cfg.layout == "rect" else int(max(-(-row.sum() // kv.n_head_kv) for row in kept))
        check(r == st.footprint == want_r == kv.n_cells() and st.freed == n_after - r,
              f"footprint {r} / stats {st.footprint} / {cfg.layout} block {want_r} / cells {kv.n_cells()} / "
              f"freed {st.freed} after the {where}")  # fmt: skip
        check(kv.view_cells() == kept.max(), f"view cells {kv.view_cells()} != most kept {kept.max()}")

        # the allocation: policies' own counts on scores with the same validity pattern
        n_sel = n_view - min(w, n_view)
        alloc = AllocationConfig(budget=budget, window=w, alpha=cfg.alpha, max_ratio=cfg.max_ratio, sinks=cfg.sinks)
        policy = METHODS[cfg.method]
        rng = np.random.default_rng(0)
        fake = []
        for i in range(len(ids)):
            a = rng.random((kv.n_head_kv, n_sel)) + 1.0
            for h in range(kv.n_head_kv):
                a[h, : starts[i, h]] = -np.inf
            fake.append(a)
        counts = policy.allocate(policy.rank(fake, alloc), alloc)
        sel_b = _sel_budgets(cfg, len(ids), budget, n_sel)
        ada = cfg.method in ("ada-snapkv", "ada-pyramid")
        for i, il in enumerate(ids):
            win = np.array([n_view - max(n_sel, int(s)) for s in starts[i]])
            want = np.asarray(counts[i]) + win
            got = kept[i]
            check(got.sum() == want.sum(), f"layer {il} keeps {got.sum()} cells in all (heads {got.tolist()}), "
                  f"the {cfg.method} allocation gives {want.sum()} (heads {want.tolist()}) after the {where}")
            if not ada:
                check(np.array_equal(got, want), f"layer {il} heads keep {got.tolist()}, {cfg.method} gives "
                      f"{want.tolist()}")  # fmt: skip
            else:
                valid = n_sel - np.minimum(starts[i], n_sel)
                floor = np.minimum(_floor_mul(cfg.alpha, max(sel_b[i], 0)), valid)
                check(np.all(got - win >= floor), f"layer {il}: heads keep {(got - win).tolist()} selected cells, "
                      f"below the safeguard floor {floor.tolist()}")  # fmt: skip
                if cfg.max_ratio is not None:
                    cap = _floor_mul(cfg.max_ratio, max(sel_b[i], 0))
                    check(np.all(got - win <= cap), f"layer {il}: heads keep {(got - win).tolist()} selected "
                          f"cells, above the max_ratio cap {cap}")  # fmt: skip

        # positions: the window, nothing resurrected, the sinks
        window = np.arange(self.n_tokens - w, self.n_tokens)
        s_eff = max(4, cfg.sinks) if cfg.method == "streamingllm" else cfg.sinks
        if self.rt_sinks_kept is None:
            self.rt_sinks_kept = [True] * len(ids)
        for i, il in enumerate(ids):
            self.rt_sinks_kept[i] = self.rt_sinks_kept[i] and sel_b[i] >= s_eff
            for h in range(kv.n_head_kv):
                p = pos[il][h]
                check(np.all(np.isin(window, p)), f"layer {il} head {h} lost window positions "
                      f"{sorted(set(window.tolist()) - set(p.tolist()))} after the {where}")  # fmt: skip
                held = np.arange(before["n"], self.n_tokens)
                if before["positions"] is not None:
                    held = np.concatenate([before["positions"][il][h], held])
                extra = np.setdiff1d(p, held)
                check(extra.size == 0, f"layer {il} head {h} keeps positions {extra[:8].tolist()} that it did "
                      f"not hold before the {where}")  # fmt: skip
                if s_eff and self.rt_sinks_kept[i]:
                    sinks = np.arange(min(s_eff, self.n_tokens))
                    lost = np.setdiff1d(sinks, p)
                    check(lost.size == 0, f"layer {il} head {h} lost the attention sinks {lost.tolist()} "
                          f"(sinks {s_eff}, every compression so far had B' >= sinks) after the {where}")


def check_cache_holds_history(llm: CheckedLlama) -> None:
    """The KV cache holds what llama-cpp-python believes: the block, then every later token."""
    kv = llm.adakv_kvcache
    n, b = llm.n_tokens, llm.rt_block_end
    if b is not None:
        check(n >= b, f"llama-cpp-python keeps {n} tokens of a history whose first {b} were compressed: the "
              "cache was cut inside the compacted block (prefix reuse after a compression)")  # fmt: skip
        want = kv.footprint() + n - b
        check(kv.footprint() > 0 and kv.n_cells() == want, f"the cache holds {kv.n_cells()} cells (footprint "
              f"{kv.footprint()}) for {n} tokens compressed up to {b}: expected {want}")  # fmt: skip
    else:
        check(kv.n_cells() == n, f"the cache holds {kv.n_cells()} cells for {n} uncompressed tokens")


def check_state(llm: CheckedLlama, cfg: CaseConfig) -> None:
    """Invariants after every step."""
    n = llm.n_tokens
    if cfg.logits_all:
        check(np.isfinite(llm.scores[:n]).all(), "non-finite logits in scores")
    if n > 0 and not llm.rt_after_load:
        check(np.isfinite(last_logits(llm)).all(), "non-finite last logits")
    if n > 0:
        check_cache_holds_history(llm)
    kv = llm.adakv_kvcache
    ids = set(kv.layout.layer_ids)
    b = llm.rt_block_end
    everything = np.arange(n)
    for il, layer in enumerate(llm.adakv_kept_positions()):
        for h, p in enumerate(layer):
            p = np.asarray(p)
            where = f"kept positions of layer {il} head {h}"
            if il not in ids or cfg.method == "full":
                check(np.array_equal(p, everything), f"{where}: {_short(p)}, expected all of [0, {n})")
                continue
            check(p.size == 0 or (p[0] >= 0 and p[-1] < n and np.all(np.diff(p) > 0)),
                  f"{where} are not sorted unique positions in [0, n_tokens={n}): {_short(p)}")
            if n > 0:
                tail = np.arange(b if b is not None else 0, n)
                check(np.all(np.isin(tail, p)), f"{where} miss tokens after the last compression (at {b}): "
                      f"{_short(np.setdiff1d(tail, p))}")  # fmt: skip
                if b is not None:
                    win = np.arange(b - cfg.window, b)
                    check(np.all(np.isin(win, p)), f"{where} miss the last compressed prompt's window "
                          f"{_short(np.setdiff1d(win, p))}")  # fmt: skip


def _short(a: Any) -> str:
    a = np.asarray(a).tolist()
    return str(a) if len(a) <= 12 else f"{a[:6]} ... {a[-6:]} ({len(a)})"


def last_logits(llm: Llama) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def observe(llm: CheckedLlama, cfg: CaseConfig) -> dict[str, Any]:
    n = llm.n_tokens
    kv = llm.adakv_kvcache
    obs: dict[str, Any] = {"n_tokens": n, "tokens": llm.input_ids[:n].tolist(), "events": list(llm.rt_events)}
    obs["positions"] = [[np.asarray(p).tolist() for p in layer] for layer in llm.adakv_kept_positions()]
    if n > 0:
        obs.update(cells=kv.n_cells(), footprint=kv.footprint(), starts=kv.starts().tolist())
        if not llm.rt_after_load:
            obs["last_logits"] = last_logits(llm)
    if cfg.logits_all:
        obs["scores"] = np.array(llm.scores[:n])
    return obs


def compare(got: dict[str, Any], ref: dict[str, Any]) -> None:
    for key in ("n_tokens", "tokens", "text", "events", "cells", "footprint", "starts", "positions"):
        if key in ref or key in got:
            a, b = got.get(key), ref.get(key)
            check(a == b, f"{key} differs from the reference: {_diff(a, b)}")
    for key in ("scores", "last_logits"):
        if key in ref and key in got:
            a, b = got[key], ref[key]
            same = a.shape == b.shape and np.array_equal(a, b)
            err = float(np.abs(a - b).max()) if a.shape == b.shape and a.size else None
            check(same, f"{key} differ from the reference (shape {a.shape} vs {b.shape}, max abs diff {err})")


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"first at [{i}]: {_shorten(x)} vs reference {_shorten(y)}"
    return f"{_shorten(a)} vs reference {_shorten(b)}"


def _shorten(x: Any) -> str:
    s = repr(x)
    return s if len(s) < 400 else s[:200] + " ... " + s[-150:]


# ---------------------------------------------------------------------------- running a case


def perform(llm: CheckedLlama, step: Step, saved: list[Any]) -> dict[str, Any]:
    llm.rt_events = []
    # llama.cpp's state does not bring back the last logits (llama-cpp-python re-evaluates the last
    # token after load_state), so they are not looked at until the next evaluation
    llm.rt_after_load = step.kind == "load" or (llm.rt_after_load and step.kind in ("save", "reset"))
    if step.kind == "eval":
        llm.eval(list(step.tokens))
        return {}
    if step.kind == "complete":
        kw = dict(max_tokens=step.max_tokens, temperature=0.0, stream=step.stream)
        if step.stream:
            gen = llm.create_completion(list(step.tokens), **kw)
            texts = []
            for chunk in gen:
                texts.append(chunk["choices"][0]["text"])
                if step.stop_after is not None and len(texts) >= step.stop_after:
                    gen.close()
                    break
            text = "".join(texts)
        else:
            text = llm.create_completion(list(step.tokens), **kw)["choices"][0]["text"]
        return {"text": text}
    if step.kind == "reset":
        llm.reset()
    elif step.kind == "save":
        sinks = None if llm.rt_sinks_kept is None else list(llm.rt_sinks_kept)
        saved.append((llm.save_state(), llm.rt_block_end, sinks))
    elif step.kind == "roundtrip":
        llm.load_state(llm.save_state())
        llm.rt_after_load = True
    elif step.kind == "load":
        state, llm.rt_block_end, sinks = saved[step.slot]
        llm.rt_sinks_kept = None if sinks is None else list(sinks)
        llm.load_state(state)
    return {}


class Case:
    """One seeded case: ``Case(seed, models).run()`` raises CheckFailed with a full report."""

    def __init__(self, key: int | str, models: str | os.PathLike[str]) -> None:
        self.key = str(key)
        self.seed = parse_key(key)[0]
        self.models = Path(models)
        self.cfg = random_config(key)
        self.done: list[Step] = []

    def make(self) -> CheckedLlama:
        # read when eviction is enabled: ADAKV_ATTN_PATH=auto|heads|mask, or (older libraries, and
        # the same meaning in newer ones) ADAKV_FORCE_FALLBACK=1 for heads
        env = {"ADAKV_ATTN_PATH": self.cfg.attn_path, "ADAKV_FORCE_FALLBACK": str(int(self.cfg.attn_path == "heads")),
               "ADAKV_LAYOUT": self.cfg.layout}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            llm = CheckedLlama(**self.cfg.llama_kwargs(self.models))
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
        llm.rt_start(self.cfg)
        return llm

    def report(self, message: str) -> str:
        steps = "\n".join(f"  {i}: {s}" for i, s in enumerate(self.done))
        return (f"case {self.key}: step {len(self.done) - 1}: {message}\n"
                f"config: {self.cfg}\nsteps:\n{steps}\n"
                f"reproduce: python tests/randomized.py {self.key}   or   "
                f"ADAKV_RANDOM_SEEDS={self.key} python -m pytest tests/test_random_api.py -q")  # fmt: skip

    def run(self) -> str:
        """Runs the case; returns "ok" or "refused: ..." (a configuration the constructor refused)."""
        try:
            llm = self.make()
        except ValueError as e:
            if self.cfg.n_batch < self.cfg.window and ("window" in str(e) or "batch" in str(e)):
                return f"refused: {e}"
            raise CheckFailed(self.report(f"constructor raised {type(e).__name__}: {e}")) from None
        try:
            return self._run(llm)
        finally:
            llm.close()

    def _run(self, llm: CheckedLlama) -> str:
        rng = np.random.default_rng([self.seed, 1])
        vocab = sorted(set(llm.tokenize(bytes(range(33, 127)) + b" ", add_bos=False)))
        bos = llm.token_bos()
        ideal, saved_ideal, saved = Ideal(), [], []
        branchy = bool(rng.random() < 0.35)
        for _ in range(int(rng.integers(3, 7))):
            step = next_step(rng, self.cfg, ideal, len(saved), vocab, bos, branchy)
            self.done.append(step)
            try:
                if step.kind == "complete" or step.kind == "eval":
                    replay = ideal_after(ideal, step)
                elif step.kind == "load":
                    # iSWA models: llama.cpp lays a restored cache out differently from a computed one, so
                    # even without eviction the next tokens' logits differ by ~1e-2 from those of a context
                    # that never saved and loaded (llama_cpp.Llama, gemma3, flash attention). The reference
                    # saves and loads in place at the same point: it never runs the other branch, and its
                    # layout is the restored one (then everything is exactly equal again).
                    replay = saved_ideal[step.slot].steps
                    if MODELS[self.cfg.model][0] == "gemma3" and replay:
                        replay = [*replay, Step("roundtrip")]
                out = perform(llm, step, saved)
                check_state(llm, self.cfg)
                if step.kind == "save":
                    saved_ideal.append(ideal.copy())
                    ideal.compressed = False
                elif step.kind == "reset":
                    ideal = Ideal()
                else:
                    got = {**observe(llm, self.cfg), **out}
                    before = ideal.compressed
                    ref_obs, ideal = self.reference(replay, step if step.kind != "load" else None)
                    ideal.compressed = step.kind != "load" and (before or bool(ref_obs["events"]))
                    if step.kind == "load":
                        ideal.requires_eval = True
                        got.pop("events")
                        ref_obs.pop("events")
                    compare(got, ref_obs)
            except CheckFailed as e:
                raise CheckFailed(self.report(str(e))) from None
            except Exception as e:
                tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
                raise CheckFailed(self.report(f"{type(e).__name__}: {e}\n{tb}")) from None
        return "ok"

    def reference(self, replay: list[Step], step: Step | None) -> tuple[dict[str, Any], Ideal]:
        """A fresh context: replays ``replay`` (whose last item is ``step`` unless loading), observed."""
        ref = self.make()
        try:
            out: dict[str, Any] = {}
            for s in replay:
                try:
                    out = perform(ref, s, [])
                    check_state(ref, self.cfg)
                except CheckFailed as e:
                    raise CheckFailed(f"in the reference, replaying {s}: {e}") from None
            if step is None:
                out = {}
            obs = {**observe(ref, self.cfg), **out}
            if step is None:
                ref.rt_events = []
                obs["events"] = []
            kv = ref.adakv_kvcache
            ideal = Ideal(steps=list(replay), tokens=ref.input_ids[: ref.n_tokens].tolist(),
                          block_end=ref.rt_block_end, footprint=kv.footprint() if ref.n_tokens else 0,
                          requires_eval=False)  # fmt: skip
            return obs, ideal
        finally:
            ref.close()


def run_in_subprocess(key: int | str, models: Path, timeout: float = 300) -> tuple[bool, str]:
    """Runs one case in a child process (a native abort fails that case only)."""
    # the child imports the adakv_local this process imported (a checkout with ADAKV_LIB_DIR, or
    # the installed package), never the checkout's by accident of the working directory
    root = Path(adakv_local.__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, GGML_NO_BACKTRACE="1", ADAKV_RANDOM_MODELS=str(models), PYTHONPATH=path)
    proc = subprocess.run([sys.executable, __file__, str(key)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=models)  # fmt: skip
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return True, out
    if proc.returncode < 0:
        tail = "\n".join(out.splitlines()[-8:])
        return False, (f"case {key}: the case's process died with signal {-proc.returncode}\n"
                       f"config: {random_config(key)}\noutput tail:\n{tail}\n"
                       f"reproduce: python tests/randomized.py {key}")  # fmt: skip
    return False, out


def main(argv: list[str]) -> int:
    import tempfile

    models = os.environ.get("ADAKV_RANDOM_MODELS") or os.path.join(tempfile.gettempdir(), "adakv-random-models")
    os.makedirs(models, exist_ok=True)
    write_models(models)
    status = 0
    for arg in argv:
        case = Case(arg, models)
        try:
            print(f"case {arg}: {case.run()}\nconfig: {case.cfg}\nsteps: {[str(s) for s in case.done]}")
        except CheckFailed as e:
            print(e)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
