#!/usr/bin/env python3
"""``eval tasks`` with any eviction options (the CLI has flags for the window and kernel only).

Reproduces docs/SELECTION.md, *Numbers written one token per digit: pooling in two scales (`max2`)*,
*Pass key at budget 128 with `spans="numbers"`: 20 of 20*, *Facts: a number or a date stated once in
a real document*, *The new default on the pass key and the facts*.

    python scripts/selection_tasks.py --model smollm2-135m --tasks passkey --lengths 3000 --budgets 128 \\
        --option pooling=max-fill --seeds 0,1 --json out.json
    python scripts/selection_tasks.py --model gemma3-270m --mode raw --tasks facts --lengths 4000 \\
        --budgets 128,256 --full --json out.json

Runs adakv_local.eval.tasks.run_tasks with ``options`` (AdaKVConfig names), one sample per seed of
--seeds at every depth; --full adds the full cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from instruct_fidelity import parse_option  # same folder

from adakv_local.eval.tasks import run_tasks, summarize
from adakv_local.models import resolve_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="passkey")
    p.add_argument("--mode", choices=["chat", "raw"], default="chat")
    p.add_argument("--lengths", default="3000")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--budgets", default="128")
    p.add_argument("--method", default="ada-snapkv")
    p.add_argument("--option", action="append", type=parse_option, default=[],
                   help="NAME=VALUE, an AdaKVConfig option")
    p.add_argument("--full", action="store_true", help="also answer with the full cache")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one sample each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per answer (default: 16)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    options = dict(a.option)
    settings = ([("full", None)] if a.full else []) + [(a.method, int(b)) for b in a.budgets.split(",")]
    records = []
    t0 = time.time()
    for seed in (int(x) for x in a.seeds.split(",")):
        records += run_tasks(str(resolve_model(a.model)), tasks=a.tasks.split(","),
                             lengths=[int(x) for x in a.lengths.split(",")],
                             depths=[float(x) for x in a.depths.split(",")], methods_budgets=settings, mode=a.mode,
                             seed=seed, n_threads=a.threads, max_tokens=a.max_tokens, options=options,
                             progress=lambda d, t, r: print(f"[{d}/{t} {time.time() - t0:.0f}s] {r['method']}@"
                                                            f"{r['budget']} depth {r['depth']} seed {r['seed']}: "
                                                            f"{'ok' if r['correct'] else 'MISS'} {r['output']!r}",
                                                            file=sys.stderr, flush=True))
    for r in summarize(records):
        print(f"{r['task']} {r['method']}@{r['budget']} len {r['length']}: {r['correct']}/{r['n']}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps({"records": records, "summary": summarize(records),
                                      "config": {**vars(a), "json": str(a.json), "options": options}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
