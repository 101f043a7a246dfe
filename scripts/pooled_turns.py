#!/usr/bin/env python3
"""The pooled block in a conversation (issue 23): KV bytes held after each of 5 turns, both layouts.

Reproduces docs/RESULTS.md, *A 5-turn conversation: KV bytes held after each turn*.

    python scripts/pooled_turns.py --model smollm2-135m --budget 256 --threads 2 \\
        --json docs/results/pooled-turns-smollm2.json

The conversation of scripts/serve_turns.py (a pasted document of --doc-chars characters, then the
same five requests, the first to summarize it), sent through adakv-local's Python API
(``create_chat_completion``, greedy, --max-tokens per reply), each turn with the whole conversation
so far as a chat front end sends it: once with the pooled block (ADAKV_LAYOUT=pooled, the default
since 2026-12-06) and once with the rect block (ADAKV_LAYOUT=rect, the layout before it), in the
same run. Per turn: prompt tokens, tokens evaluated, whether the turn was compressed, the cache
cells the sequence holds afterwards and their K/V bytes (the native memory figures), R and the
block's width (the most tokens one head keeps). The replies are the same in both layouts (the same
kept tokens, the same attention), which the script checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_turns import QUESTIONS, document  # noqa: E402


def conversation(model: str, doc: str, *, layout: str, budget: int, threads: int, max_tokens: int,
                 n_ctx: int) -> list[dict]:
    from adakv_local import Llama
    from adakv_local.models import model_path

    os.environ["ADAKV_LAYOUT"] = layout  # read when eviction is enabled on the context
    llm = Llama(model_path=str(model_path(model, quiet=True)), n_ctx=n_ctx, n_threads=threads,
                n_threads_batch=threads, adakv_budget=budget, verbose=False)
    try:
        messages: list[dict[str, str]] = []
        rows = []
        for turn, q in enumerate(QUESTIONS, 1):
            messages.append({"role": "user", "content": (doc + "\n\n" + q) if turn == 1 else q})
            out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
            reply = out["choices"][0]["message"]["content"] or ""
            messages.append({"role": "assistant", "content": reply})
            kv = llm.adakv_kvcache
            block = kv.block()
            rows.append({"turn": turn, "layout": layout, "prompt_tokens": out["usage"]["prompt_tokens"],
                         "compressed": llm.adakv_stats.compressed, "cells": block.cells_used,
                         "footprint": block.cells, "width": block.width,
                         "kv_bytes": kv.memory().used_bytes(block.cells_used), "reply": reply})
            print(f"{layout:6} turn {turn}: {rows[-1]['prompt_tokens']} prompt tokens, compressed "
                  f"{rows[-1]['compressed']}, {block.cells_used} cells (R {block.cells}, width {block.width}), "
                  f"{rows[-1]['kv_bytes'] / 2**20:.2f} MiB", file=sys.stderr, flush=True)
        return rows
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--doc-chars", type=int, default=14000, help="document characters (default: 14000, ~3,000 "
                    "SmolLM2 tokens)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import adakv_local  # noqa: F401  (the installed package, before document() puts the checkout on sys.path)

    doc = document(args.doc_chars)
    rows = {layout: conversation(args.model, doc, layout=layout, budget=args.budget, threads=args.threads,
                                 max_tokens=args.max_tokens, n_ctx=args.n_ctx) for layout in ("pooled", "rect")}
    same = [p["reply"] == r["reply"] for p, r in zip(rows["pooled"], rows["rect"], strict=True)]
    print("| turn | prompt tokens | compressed | pooled: cells (R, width) | pooled KV MiB | rect: cells (R) | "
          "rect KV MiB | pooled / rect bytes |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for p, r in zip(rows["pooled"], rows["rect"], strict=True):
        print(f"| {p['turn']} | {p['prompt_tokens']} | {'yes' if p['compressed'] else 'no'} | {p['cells']} "
              f"({p['footprint']}, {p['width']}) | {p['kv_bytes'] / 2**20:.2f} | {r['cells']} ({r['footprint']}) | "
              f"{r['kv_bytes'] / 2**20:.2f} | x{p['kv_bytes'] / r['kv_bytes']:.3f} |")
    print(f"\nreplies identical in both layouts: {sum(same)} of {len(same)} turns")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows["pooled"] + rows["rect"], "same_replies": same,
                                         "config": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
