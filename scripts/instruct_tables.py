#!/usr/bin/env python3
"""Markdown tables from scripts/instruct_fidelity.py's JSON (docs/SELECTION.md, docs/RESULTS.md).

Reproduces docs/SELECTION.md, *Instruction fidelity of the candidates (4 documents x 2 prompts)*,
*What `max2` costs on answers, and summaries at budget 512*, *All 11 documents (SmolLM2, 1 thread)*,
*Three questions per document: 33 answers*, *Summaries, full cache against the new default at 512*,
*Summaries, full cache against the default at 512*.

    python scripts/instruct_tables.py out.json --base default
    python scripts/instruct_tables.py out.json --answers gpl-2,man-tar --sample default@512
    python scripts/instruct_tables.py a.json:spans=new,default=old b.json:old=old,default=new --base old

A file may be followed by ``:SETTING=NAME,...`` to rename its settings, so that runs made under
different labels (the same options) are paired as one setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adakv_local.eval.instruct import paired, summarize


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="FILE or FILE:SETTING=NAME,...")
    p.add_argument("--base", default="default", help="the setting the others are paired with")
    p.add_argument("--answers", default="", help="documents whose summaries to print side by side")
    p.add_argument("--sample", default="", help="the compressed answer to print next to the full cache's")
    a = p.parse_args()
    records, answers = [], []
    for arg in a.json:
        path, _, renames = arg.partition(":")
        names = dict(x.split("=", 1) for x in renames.split(",") if x)
        d = json.loads(Path(path).read_text())
        records += [{**r, "setting": names.get(r["setting"], r["setting"])} for r in d["records"]]
        for x in d["answers"]:
            answers.append({**x, "compressed": {names.get(k.split("@")[0], k.split("@")[0]) + "@" + k.split("@")[1]: v
                                                for k, v in x.get("compressed", {}).items()}})
    print("| task | setting | budget | prompts | mean KL (95% CI) | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|")
    for r in summarize(records):
        print(f"| {r['task']} | {r['setting']} | {r['budget']} | {r['n']} | {r['kl_mean']:.4f} ± "
              f"{r['kl_mean_ci95']:.4f} | {100 * r['top1']:.1f}% |")
    settings = sorted({r["setting"] for r in records} - {a.base})
    print(f"\n| task | setting vs {a.base} | budget | mean KL ratio | lower on | higher on | sign test p |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for s in settings:
        for q in paired(records, s, a.base):
            print(f"| {q['task']} | {s} | {q['budget']} | {q['ratio']:.3f} | {q['a_wins']} of {q['n']} | "
                  f"{q['a_losses']} | {q['sign_p']:.3f} |")
    for doc in filter(None, a.answers.split(",")):
        for x in answers:
            if x["document"] == doc and x["task"] == "summary":
                got = x["compressed"].get(a.sample, "(not sampled)")
                full, got = (" ".join(t.split()) for t in (x["full"], got))
                print(f"\n**{doc}**\n\n| full cache | {a.sample} |\n|---|---|\n| {full} | {got} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
