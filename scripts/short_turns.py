#!/usr/bin/env python3
"""A chat of many short turns through a small cache (issue #27): does it last, and where does the
cache stay?

Reproduces docs/RESULTS.md, *100 short turns through 1,024 cells*.

A document, then ``--turns`` short follow-up questions ("Why?"), each answered with at most
``--max-tokens`` greedy tokens through ``create_chat_completion`` (llama-cpp-python's prefix reuse,
as a chat front end uses it). Printed per turn (and written with ``--json``): the conversation's
tokens, the cells the cache holds after the answer, whether the turn was compressed, and the
tokens taken back to complete a short turn's window.

    python scripts/short_turns.py --model smollm2-135m --turns 100 --n-ctx 1024 --budget 128 \\
        --json docs/results/short-turns-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF file or a registry name")
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--document-tokens", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=40, help="the most tokens of each answer (default 40)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the per-turn figures here")
    args = ap.parse_args(argv)

    from adakv_local import Llama
    from adakv_local.eval.bench import prompt_tokens
    from adakv_local.models.registry import resolve_model

    llm = Llama(
        model_path=str(resolve_model(args.model)),
        n_ctx=args.n_ctx,
        adakv_budget=args.budget,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    doc = llm.detokenize(prompt_tokens(llm, args.document_tokens)).decode(errors="ignore")
    messages = [{"role": "user", "content": doc + "\n\nWhat is this about?"}]
    rows = []
    t0 = time.perf_counter()
    for turn in range(args.turns):
        out = llm.create_chat_completion(messages=messages, max_tokens=args.max_tokens, temperature=0.0)
        messages += [out["choices"][0]["message"], {"role": "user", "content": "Why?"}]
        st = llm.adakv_stats
        rows.append(
            dict(
                turn=turn + 1,
                conversation_tokens=llm.n_tokens,
                cells_held=llm.adakv_kvcache.n_cells(),
                compressed=st.compressed,
                reevaluated=st.reevaluated,
                footprint=st.footprint,
                answer_tokens=out["usage"]["completion_tokens"],
                finish_reason=out["choices"][0]["finish_reason"],
            )
        )
        r = rows[-1]
        print(
            f"turn {r['turn']:3d}: {r['conversation_tokens']:6d} tokens, {r['cells_held']:4d} cells held, "
            f"compressed {r['compressed']}, {r['reevaluated']} taken back",
            file=sys.stderr,
            flush=True,
        )
    held = [r["cells_held"] for r in rows]
    summary = dict(
        model=args.model,
        turns=args.turns,
        n_ctx=args.n_ctx,
        budget=args.budget,
        conversation_tokens=rows[-1]["conversation_tokens"],
        max_cells_held=max(held),
        cells_held_last=held[-1],
        compressed_turns=sum(r["compressed"] for r in rows),
        seconds=time.perf_counter() - t0,
    )
    print(
        f"{args.turns} turns, {summary['conversation_tokens']} tokens through {args.n_ctx} cells at budget "
        f"{args.budget}: at most {summary['max_cells_held']} cells held, {summary['compressed_turns']} turns "
        f"compressed, {summary['seconds']:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, turns=rows), f, indent=1)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
