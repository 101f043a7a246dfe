#!/usr/bin/env python3
"""Decode speed of several ways to hold and read a compressed block, interleaved in one process.

Each mode (a block layout and an attention path, e.g. ``pooled:mask`` against ``rect:mask``) gets
its own context, which reads the same prompt once and compresses it at the same budget. Then, for
``--rounds`` rounds, every mode in turn decodes the same ``--tokens`` tokens one at a time and
forgets them again (they are cells after the block, which a removal may take). Each round gives
each mode's tokens per second and the ratio of each mode to the first, measured seconds apart, so
that the load of a shared machine falls on all modes alike; the medians over rounds are printed
(and written with ``--json``).

    python scripts/decode_ab.py --model smollm2-135m --length 8000 --budget 256 \\
        --modes rect:mask,pooled:mask,rect:auto,pooled:auto --rounds 15 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np


def _decode(llm: Any, tokens: list[int]) -> float:
    """Evaluates tokens one by one after the prompt, then forgets them; returns the seconds."""
    import llama_cpp

    n_past = llm.n_tokens
    t0 = time.perf_counter()
    for t in tokens:
        llama_cpp.Llama.eval(llm, [t])
    dt = time.perf_counter() - t0
    llm.n_tokens = n_past  # the next eval removes the decoded cells (after the block)
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF file or a registry name")
    ap.add_argument("--length", type=int, default=8000, help="prompt tokens (default 8000)")
    ap.add_argument("--budget", type=int, default=256, help="eviction budget (default 256)")
    ap.add_argument("--method", default="ada-snapkv")
    ap.add_argument(
        "--modes",
        default="rect:mask,pooled:mask,rect:auto,pooled:auto",
        help="LAYOUT:PATH,...; ratios are against the first (default: %(default)s)",
    )
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per mode and round (default 64)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds (default 15)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the per-round figures and the medians here")
    args = ap.parse_args(argv)

    from adakv_local import Llama
    from adakv_local.eval.bench import attn_path_env, prompt_tokens
    from adakv_local.models.registry import resolve_model

    modes = [tuple(m.split(":")) for m in args.modes.split(",")]
    path = str(resolve_model(args.model))
    n_ctx = ((args.length + args.tokens + 64) // 256 + 1) * 256
    llms = []
    for layout, attn in modes:
        with attn_path_env(attn, layout):
            llm = Llama(
                model_path=path,
                n_ctx=n_ctx,
                n_batch=512,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                verbose=False,
                adakv_budget=args.budget,
                adakv_method=args.method,
            )
        toks = prompt_tokens(llm, args.length)
        print(f"{layout}:{attn}: reading {len(toks)} tokens ...", file=sys.stderr, flush=True)
        llm.eval(toks)
        used = llm.adakv_kvcache.attn_used()
        print(f"  {llm.adakv_stats.cells_after} cells after compression, route {used[0]}", file=sys.stderr)
        llms.append(llm)
    # the same continuation for every mode: the first mode's greedy tokens
    first = llms[0]
    cont: list[int] = []
    n_vocab = first.n_vocab()
    import llama_cpp

    for _ in range(args.tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(first.ctx, -1), shape=(n_vocab,))
        cont.append(int(logits.argmax()))
        llama_cpp.Llama.eval(first, [cont[-1]])
    first.n_tokens -= args.tokens

    names = [f"{layout}:{attn}" for layout, attn in modes]
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        tps = {}
        order = list(range(len(llms)))
        order = order[r % len(order) :] + order[: r % len(order)]  # each mode goes first in turn
        for i in order:
            tps[names[i]] = args.tokens / _decode(llms[i], cont)
        rounds.append(tps)
        print(f"round {r + 1}: " + "  ".join(f"{n} {tps[n]:.1f} t/s" for n in names), file=sys.stderr)
    medians = {n: statistics.median(rd[n] for rd in rounds) for n in names}
    ratios = {n: statistics.median(rd[n] / rd[names[0]] for rd in rounds) for n in names}
    print(
        f"decode t/s, {args.length}-token prompt, budget {args.budget}, {args.threads} thread(s), "
        f"{args.rounds} rounds of {args.tokens} tokens (medians):"
    )
    for n in names:
        print(f"  {n:14s} {medians[n]:7.1f} t/s   x{ratios[n]:.3f} of {names[0]} (median of per-round ratios)")
    # the ratio of each pooled mode to the rect mode of the same path, when both ran
    for n in names:
        layout, attn = n.split(":")
        other = f"rect:{attn}"
        if layout == "pooled" and other in names:
            pr = statistics.median(rd[n] / rd[other] for rd in rounds)
            print(f"  pooled/rect, path {attn}: x{pr:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rounds=rounds, medians=medians, ratios=ratios), f, indent=1)
    for llm in llms:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
