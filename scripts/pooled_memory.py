#!/usr/bin/env python3
"""The pooled block's memory (issue 23): KV bytes held after one compression, per method and budget.

Reproduces docs/RESULTS.md, *KV bytes after one compression*.

For each model, KV cache type, method, budget and block layout, one prompt of --tokens tokens of
standard-library prose (adakv_local.eval.bench.prompt_tokens) is evaluated by adakv-local's Llama and
compressed once (the prompt but its last ubatch is evaluated once per context and restored for
every setting); the row records what the compacted cache holds: R (``adakv_stats.footprint``, cache
cells of the block) and the K/V bytes of the cells the sequence uses (``adakv_stats.kv_bytes``, from
the native memory figures), and each Ada method's bytes over its baseline's (Ada-SnapKV / SnapKV,
Ada-Pyramid / PyramidKV) at the same budget and layout. The layouts are set with ADAKV_LAYOUT:
"pooled" (the default since 2026-12-06) and "rect" (the block before it).

Models: smollm2-135m (the registry, 30 layers x 3 KV heads) and a random-weight model written here
with Llama-3-8B's attention shape (32 layers, 32 query / 8 KV heads of 128; narrow otherwise: its
scores are those of random weights, which is enough to measure memory).

    python scripts/pooled_memory.py --models smollm2-135m --json docs/results/pooled-memory-smollm2.json
    python scripts/pooled_memory.py --models random-32x8 --tokens 600 --json docs/results/pooled-memory-32x8.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

METHODS = ("ada-snapkv", "snapkv", "ada-pyramid", "pyramidkv")
BASELINE = {"ada-snapkv": "snapkv", "ada-pyramid": "pyramidkv"}
TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


def measure(path: str, tokens: list[int], *, budgets: list[int], type_kv: str, layout: str,
            threads: int) -> list[dict]:
    """Every method and budget on one context: the prompt but its last ubatch is evaluated once (no
    compression) and saved; each run restores it and evaluates the last ubatch with its setting."""
    from dataclasses import replace

    from adakv_local.llama import Llama

    os.environ["ADAKV_LAYOUT"] = layout
    llm = Llama(model_path=path, n_ctx=len(tokens) + 256, n_threads=threads, n_threads_batch=threads,
                type_k=TYPES[type_kv], type_v=TYPES[type_kv], adakv_budget=budgets[0], verbose=False)
    try:
        k = min(len(tokens), llm.n_batch, int(llm.context_params.n_ubatch))
        with llm.adakv_suspended():
            llm.eval(tokens[:-k])
        state, cfg, rows = llm.save_state(), llm.adakv_config, []
        for method, budget in itertools.product(METHODS, budgets):
            llm.load_state(state)
            llm.adakv_config = replace(cfg, method=method, budget=budget)
            llm.eval(tokens[-k:])
            st = llm.adakv_stats
            if st is None or st.budget != budget or st.method != method:
                raise RuntimeError(f"{method} at {budget} did not compress a {len(tokens)}-token prompt")
            rows.append({"method": method, "budget": budget, "type_kv": type_kv, "layout": layout,
                         "footprint": st.footprint, "width": llm.adakv_kvcache.block().width,
                         "kv_bytes": st.kv_bytes, "kv_bytes_allocated": st.kv_bytes_allocated,
                         "prompt_tokens": len(tokens)})
        return rows
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000, help="prompt tokens (default: 2000)")
    ap.add_argument("--budgets", default="64,128,256", help="comma-separated budgets (default: 64,128,256)")
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="KV cache types (default: f16,q8_0,q4_0)")
    ap.add_argument("--models", default="smollm2-135m,random-32x8", help="models (default: both)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()

    from adakv_local.eval.bench import prompt_tokens
    from adakv_local.llama import Llama
    from adakv_local.models import model_path
    from adakv_local.testing import write_llama_gguf

    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "random-32x8":
                path = str(write_llama_gguf(Path(tmp) / "l32x8.gguf", n_layer=32, n_embd=256, n_head=32, n_head_kv=8,
                                            head_dim=128, n_ff=256, dtype="f16", n_ctx_train=8192, seed=13))
            else:
                path = str(model_path(name, quiet=True))
            vocab = Llama(model_path=path, vocab_only=True, verbose=False)
            tokens = prompt_tokens(vocab, args.tokens)
            vocab.close()
            for type_kv, layout in itertools.product(args.types.split(","), ("pooled", "rect")):
                for row in measure(path, tokens, budgets=budgets, type_kv=type_kv, layout=layout,
                                   threads=args.threads):
                    rows.append(dict(row, model=name))
                    print(f"{name} {type_kv} {layout:6} {row['method']:11} @ {row['budget']:3}: R "
                          f"{row['footprint']:4} cells, {row['kv_bytes'] / 2**20:7.2f} MiB", file=sys.stderr,
                          flush=True)
    by_key = {(r["model"], r["type_kv"], r["layout"], r["method"], r["budget"]): r for r in rows}
    print("| model | KV type | budget | layout | Ada-SnapKV R / MiB | SnapKV R / MiB | Ada/SnapKV bytes | "
          "Ada-Pyramid R / MiB | PyramidKV R / MiB | Ada/PyramidKV bytes |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for model, type_kv, layout, method, budget in by_key:
        if method != "ada-snapkv":
            continue
        cells = []
        for ada in BASELINE:
            a = by_key[(model, type_kv, layout, ada, budget)]
            b = by_key[(model, type_kv, layout, BASELINE[ada], budget)]
            cells += [f"{a['footprint']} / {a['kv_bytes'] / 2**20:.2f}",
                      f"{b['footprint']} / {b['kv_bytes'] / 2**20:.2f}", f"x{a['kv_bytes'] / b['kv_bytes']:.3f}"]
        print(f"| {model} | {type_kv} | {budget} | {layout} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "config": vars(args) | {"json": str(args.json)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
