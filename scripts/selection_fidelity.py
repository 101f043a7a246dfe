#!/usr/bin/env python3
"""``eval fidelity`` (raw-text continuations, built-in prompts) with any eviction options, paired
prompt by prompt with the default run of docs/RESULTS.md.

Reproduces docs/SELECTION.md, *What `max2` costs on raw continuations*, *What it costs on raw
continuations: within 1% of kernel 7*, *The new default on raw continuations*, *The query heads'
highest score (`gqa="max"`): the default*.

    python scripts/selection_fidelity.py --option pooling=max2 --n-prompts 26 --budgets 64,128,256 \\
        --methods ada-snapkv,snapkv --json out.json

The JSON has the layout of ``adakv-local eval fidelity --json`` (records, summary, pairs), so
``scripts/results_tables.py --paired docs/results/fidelity-smollm2.json out.json`` compares it with
the kernel-7 run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from instruct_fidelity import parse_option  # same folder

from adakv_local.eval.evaluate import builtin_prompts, compare_pairs, run_fidelity, summarize
from adakv_local.llama import Llama
from adakv_local.models import resolve_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="ada-snapkv,snapkv")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--n-prompts", type=int, default=26)
    p.add_argument("--first-prompt", type=int, default=0, help="skip the first N built-in prompts")
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--continuation", type=int, default=64)
    p.add_argument("--option", action="append", type=parse_option, default=[],
                   help="NAME=VALUE, an AdaKVConfig option")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    options = dict(a.option)
    model = str(resolve_model(a.model))
    vocab = Llama(model_path=model, vocab_only=True, verbose=False)
    prompts = builtin_prompts(vocab, a.first_prompt + a.n_prompts, a.prompt_tokens)[a.first_prompt :]
    vocab.close()
    t0 = time.time()
    records = run_fidelity(model, prompts, a.methods.split(","), [int(x) for x in a.budgets.split(",")],
                           n_continuation=a.continuation, n_threads=a.threads, options=options,
                           progress=lambda d, t, m: print(f"[{d}/{t} {time.time() - t0:.0f}s] {m}", file=sys.stderr,
                                                          flush=True))
    a.json.write_text(json.dumps({"records": records, "summary": summarize(records), "pairs": compare_pairs(records),
                                  "summary_l1_attn": summarize(records, "l1_attn"),
                                  "pairs_l1_attn": compare_pairs(records, "l1_attn"),
                                  "config": {"model": model, "options": options, "prompts": [n for n, _ in prompts],
                                             "budgets": a.budgets, "methods": a.methods,
                                             "continuation": a.continuation}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
