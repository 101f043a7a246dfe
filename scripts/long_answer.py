#!/usr/bin/env python3
"""A long answer through a small cache: what compressing during generation costs and changes.

Reproduces docs/RESULTS.md, *A 2,000-token answer through 1,024 cells*.

The full cache (n_ctx large enough for the whole answer) generates ``--tokens`` tokens greedily
from a short prompt; every step's logits are kept. Then a context with eviction and a cache of
``--n-ctx`` cells generates the same answer, teacher-forced through ``generate`` itself (a logits
processor records the logits and then allows only the full cache's next token), so that the
compressions happen where a real generation has them: whenever the cache is full, with the last
``window`` generated tokens as the observation window. Printed (and written with ``--json``): the
compressions and their cost (wall seconds each: the window evaluated again, allocation,
compaction), the decode speed of both runs, and per segment between compressions the mean KL
divergence of the evicted logits from the full cache's and how often their top token agrees.

    python scripts/long_answer.py --model smollm2-135m --tokens 2000 --n-ctx 1024 --budget 256 \\
        --json docs/results/long-answer-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

PROMPT = (
    "Write a long story about a lighthouse keeper on a small northern island: the storms, the ships, "
    "the supply boat, the letters from the mainland, and the year the light was automated.\n\nChapter 1\n\n"
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def run(llm: Any, prompt: list[int], n: int, forced: list[int] | None) -> tuple[list[int], list[np.ndarray], float]:
    """Generate n tokens (greedy, or the forced ones); the tokens, each step's log-probabilities and
    the seconds the generation took after the prompt."""
    steps: list[np.ndarray] = []
    tokens: list[int] = []

    def processor(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        steps.append(_log_softmax(scores))
        if forced is None:
            return scores
        out = np.full_like(scores, -np.inf)
        out[forced[len(steps) - 1]] = 0.0
        return out

    import llama_cpp

    t0 = time.perf_counter()
    t_first = None
    for tok in llm.generate(prompt, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([processor])):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(int(tok))
        if len(tokens) == n:
            break
    return tokens, steps, time.perf_counter() - (t_first or t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF file or a registry name")
    ap.add_argument("--tokens", type=int, default=2000, help="tokens generated (default 2000)")
    ap.add_argument("--n-ctx", type=int, default=1024, help="the evicted context's cache cells (default 1024)")
    ap.add_argument("--budget", type=int, default=256, help="eviction budget (default 256)")
    ap.add_argument("--method", default="ada-snapkv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from adakv_local import Llama
    from adakv_local.models.registry import resolve_model

    path = str(resolve_model(args.model))
    common = dict(model_path=path, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, flash_attn=True)
    full = Llama(n_ctx=((args.tokens + 512) // 256 + 1) * 256, **common)
    prompt = full.tokenize(PROMPT.encode())
    print(f"full cache: generating {args.tokens} tokens ...", file=sys.stderr, flush=True)
    ref, ref_lp, full_s = run(full, prompt, args.tokens, None)
    full.close()
    if len(ref) < args.tokens:
        print(f"the full cache stopped after {len(ref)} tokens (end of text)", file=sys.stderr)

    ev = Llama(n_ctx=args.n_ctx, adakv_budget=args.budget, adakv_method=args.method, **common)
    print(f"eviction, {args.n_ctx} cells, budget {args.budget}: the same answer ...", file=sys.stderr, flush=True)
    cells: list[int] = []
    kv = ev.adakv_kvcache

    import llama_cpp

    got: list[int] = []
    steps: list[np.ndarray] = []

    def processor(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        cells.append(kv.n_cells())
        steps.append(_log_softmax(scores))
        out = np.full_like(scores, -np.inf)
        out[ref[len(steps) - 1]] = 0.0
        return out

    t_first = None
    for tok in ev.generate(prompt, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([processor])):
        if t_first is None:
            t_first = time.perf_counter()
        got.append(int(tok))
        if len(got) == len(ref):
            break
    ev_s = time.perf_counter() - (t_first or time.perf_counter())
    got_lp = steps
    st = ev.adakv_stats
    assert got == ref[: len(got)]

    # segments: between the compressions (a drop of the cells held from one step to the next)
    bounds = [0] + [i for i in range(1, len(cells)) if cells[i] < cells[i - 1]] + [len(cells)]
    kl = np.array([float(np.sum(np.exp(a) * (a - b))) for a, b in zip(ref_lp, got_lp)])
    agree = np.array([int(np.argmax(a) == np.argmax(b)) for a, b in zip(ref_lp, got_lp)])
    segments = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        if s1 > s0:
            segments.append(
                dict(first=s0, last=s1 - 1, kl_mean=float(kl[s0:s1].mean()), top1_agree=float(agree[s0:s1].mean()))
            )
    n_comp = st.decode_compressions if st is not None else 0
    out = dict(
        model=args.model,
        tokens=len(got),
        n_ctx=args.n_ctx,
        budget=args.budget,
        method=args.method,
        threads=args.threads,
        prompt_tokens=len(prompt),
        compressions=n_comp,
        compress_seconds_each=(st.decode_seconds / n_comp) if n_comp else None,
        decode_tps_full=(len(ref) - 1) / full_s,
        decode_tps_evicted=(len(got) - 1) / ev_s,
        kl_mean=float(kl.mean()),
        top1_agree=float(agree.mean()),
        max_cells=max(cells),
        segments=segments,
    )
    ev.close()
    print(
        f"{out['tokens']} tokens through {args.n_ctx} cells, budget {args.budget} ({args.method}), "
        f"{args.threads} thread(s): {n_comp} compressions while generating, "
        f"{out['compress_seconds_each'] or 0:.3f} s each; most cells held {out['max_cells']}"
    )
    print(
        f"decode: full cache {out['decode_tps_full']:.1f} t/s, evicted {out['decode_tps_evicted']:.1f} t/s "
        f"(compressions included)"
    )
    print(
        f"teacher-forced against the full cache: mean KL {out['kl_mean']:.4f}, top-1 agreement {out['top1_agree']:.3f}"
    )
    for seg in segments:
        print(f"  tokens {seg['first']:5d}-{seg['last']:5d}: KL {seg['kl_mean']:.4f}, top-1 {seg['top1_agree']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
