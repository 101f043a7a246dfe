#!/usr/bin/env python3
"""Instruction fidelity over real documents (adakv_local.eval.instruct): summaries and answers of the
full cache, teacher-forced after the compressed prompt of every (setting, budget).

Reproduces docs/SELECTION.md, *The measurement: instruction fidelity over real documents*,
*Instruction fidelity of the candidates (4 documents x 2 prompts)*, *All 11 documents (SmolLM2, 1
thread)*, *Three questions per document: 33 answers*; docs/RESULTS.md, *Instruction fidelity, real
documents, and numbers kept whole (issue 14)*.

    python scripts/instruct_fidelity.py --model smollm2-135m --budgets 256,512,1024 \\
        --setting default --setting k15:kernel=15 --json out.json

A setting is NAME or NAME:option=value,...  (AdaKVConfig options other than budget and window:
method, kernel, pooling, gqa, alpha, max_ratio, sinks). Documents missing on this machine are
listed on stderr and left out; the run fails only if fewer than --min-documents remain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from adakv_local.eval.corpus import SPECS, find_documents
from adakv_local.eval.instruct import TASKS, build_prompts, paired, run_instruction_fidelity, summarize


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "None" else text


def parse_option(text: str) -> tuple[str, Any]:
    """``option=value`` (an AdaKVConfig option): the value as an int, a float, None or a string."""
    key, sep, val = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected option=value")
    return key.strip(), _value(val.strip())


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    try:
        return name, dict(parse_option(item) for item in filter(None, rest.split(",")))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--setting {text!r}: expected NAME:option=value,...") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--documents", default=",".join(s.name for s in SPECS), help="comma-separated corpus names")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--questions", type=int, default=1,
                   help="how many of each document's questions to ask (corpus: the first, and two more)")
    p.add_argument("--mode", choices=["chat", "raw"], default="chat")
    p.add_argument("--budgets", default="256,512,1024")
    p.add_argument("--setting", dest="settings", action="append", type=parse_setting, default=None)
    p.add_argument("--max-doc-tokens", type=int, default=4000)
    p.add_argument("--min-doc-tokens", type=int, default=3000)
    p.add_argument("--min-documents", type=int, default=1)
    p.add_argument("--max-answer", type=int, default=96)
    p.add_argument("--sample-budgets", default="", help="budgets at which the compressed cache's own answer is kept")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    from adakv_local.llama import Llama
    from adakv_local.models import resolve_model

    model = str(resolve_model(a.model))
    docs, missing = find_documents(x for x in a.documents.split(",") if x)
    for m in missing:
        print(f"missing document {m.name}: {m.reason}", file=sys.stderr)
    vocab = Llama(model_path=model, vocab_only=True, verbose=False)
    try:
        prompts = build_prompts(vocab, docs, tasks=a.tasks.split(","), mode=a.mode, max_doc_tokens=a.max_doc_tokens,
                                min_doc_tokens=a.min_doc_tokens, questions=a.questions)
    finally:
        vocab.close()
    n_docs = len({q.document for q in prompts})
    if n_docs < a.min_documents:
        print(f"only {n_docs} documents of >= {a.min_doc_tokens} tokens found; need {a.min_documents}", file=sys.stderr)
        return 1
    settings = a.settings or [("default", {})]
    budgets = [int(x) for x in a.budgets.split(",")]
    samples = [int(x) for x in a.sample_budgets.split(",") if x]
    t0 = time.time()
    records, answers = run_instruction_fidelity(
        model, prompts, settings, budgets, window=a.window, max_answer=a.max_answer, sample_budgets=samples,
        n_threads=a.threads, progress=lambda d, t, msg: print(f"[{d}/{t} {time.time() - t0:.0f}s] {msg}",
                                                              file=sys.stderr, flush=True))
    summary = summarize(records)
    for r in summary:
        print(f"{r['task']:>8} {r['setting']:>12} @ {r['budget']:>5}: KL {r['kl_mean']:.4f} +- "
              f"{r['kl_mean_ci95']:.4f}  top-1 {100 * r['top1']:.1f}%  (n={r['n']})", file=sys.stderr)
    pairs = [q for s, _ in settings[1:] for q in paired(records, s, settings[0][0])]
    for q in pairs:
        print(f"{q['task']:>8} {q['a']} vs {q['b']} @ {q['budget']}: ratio {q['ratio']:.3f}, lower on {q['a_wins']}"
              f"/{q['n']}, higher on {q['a_losses']}, sign p {q['sign_p']:.3f}", file=sys.stderr)
    if a.json:
        config = {"model": model, "documents": {d.name: d.source for d in docs}, "missing": [m.name for m in missing],
                  "tasks": a.tasks, "questions": a.questions, "mode": a.mode, "budgets": budgets,
                  "settings": settings, "window": a.window, "max_doc_tokens": a.max_doc_tokens,
                  "max_answer": a.max_answer, "threads": a.threads, "seconds": time.time() - t0}
        a.json.write_text(json.dumps({"records": records, "answers": answers, "summary": summary, "pairs": pairs,
                                      "config": config}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
