#!/usr/bin/env python3
"""How many KV heads keep each token around the pass key after compression (docs/RESULTS.md).

Reproduces docs/RESULTS.md, *Passkey retrieval, SmolLM2-135M (chat mode, ~3000 tokens, 5 depths)*.

    python scripts/passkey_kept_cells.py --kernel 7 --depth 0.5
    python scripts/passkey_kept_cells.py --kernel 15 --depth 0.5 --method snapkv

Builds the passkey task of ``adakv-local eval tasks`` (chat mode, seed 0), answers it with
SmolLM2-135M under eviction, and prints, for the tokens from 4 before to 7 after the first digit
of the key, how many of the model's (layer, KV head) pairs kept that token's cell.
"""

from __future__ import annotations

import argparse

import numpy as np

from adakv_local.eval.tasks import passkey
from adakv_local.llama import Llama
from adakv_local.models import model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", type=int, default=7, help="score pooling width (default: 7)")
    ap.add_argument("--depth", type=float, default=0.5, help="depth of the key in the text (default: 0.5)")
    ap.add_argument("--method", default="ada-snapkv", help="eviction method (default: ada-snapkv)")
    ap.add_argument("--budget", type=int, default=128, help="budget (default: 128)")
    ap.add_argument("--length", type=int, default=3000, help="prompt tokens (default: 3000)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    args = ap.parse_args()

    llm = Llama(model_path=str(model_path("smollm2-135m")), n_ctx=args.length + 512, n_threads=args.threads,
                adakv_budget=args.budget, adakv_kernel=args.kernel, adakv_method=args.method, verbose=False)
    sample = passkey(lambda t: llm.tokenize(t.encode(), add_bos=False), args.length, args.depth, seed=0, mode="chat")
    r = llm.create_chat_completion(messages=sample.messages(), max_tokens=16, temperature=0.0, top_k=1, seed=0)
    print(f"answer {r['choices'][0]['message']['content']!r}, expected {sample.answer}")
    ids = list(llm._input_ids[: r["usage"]["prompt_tokens"]])
    pieces = [llm.detokenize([t]).decode(errors="replace") for t in ids]
    kept = llm.adakv_kept_positions()
    n_heads = sum(len(layer) for layer in kept)
    k = len(sample.answer)
    starts = [i for i in range(len(pieces) - k) if "".join(pieces[i : i + k]).strip() == sample.answer]
    for p0 in starts:
        print(f"key at token {p0} of {len(ids)}; heads keeping each token (of {n_heads}):")
        for p in range(max(0, p0 - 4), min(len(ids), p0 + 8)):
            n = sum(int(np.isin(p, cells)) for layer in kept for cells in layer)
            print(f"  {pieces[p]!r:>12} {n:3d}")


if __name__ == "__main__":
    main()
