#!/usr/bin/env python3
"""Markdown tables for docs/RESULTS.md from the JSON files the eval/bench commands write.

    python scripts/results_tables.py docs/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fidelity(data: dict) -> str:
    l1 = {(r["method"], r["budget"]): r for r in data.get("summary_l1_attn", [])}
    lines = ["| method | budget | prompts | mean KL (95% CI) | top-1 agreement | attention L1 (95% CI) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in data["summary"]:
        a = l1.get((r["method"], r["budget"]))
        a_txt = f"{a['l1_attn']:.4f} ± {a['l1_attn_ci95']:.4f}" if a else "n/a"
        lines.append(f"| {r['method']} | {r['budget']} | {r['n']} | {r['kl_mean']:.4f} ± {r['kl_mean_ci95']:.4f} "
                     f"| {100 * r['top1']:.1f}% | {a_txt} |")
    l1p = {(p["ada"], p["budget"]): p for p in data.get("pairs_l1_attn", [])}
    lines += ["", "| Ada method vs baseline | budget | mean KL Ada / baseline | Ada lower on | "
              "attention L1 Ada / baseline | Ada lower on |", "|---|---:|---:|---:|---:|---:|"]
    for p in data["pairs"]:
        q = l1p.get((p["ada"], p["budget"]))
        q_txt = f"{q['ratio']:.3f} | {q['ada_wins']} of {q['n']}" if q else "n/a | n/a"
        lines.append(f"| {p['ada']} vs {p['baseline']} | {p['budget']} | {p['ratio']:.3f} | "
                     f"{p['ada_wins']} of {p['n']} prompts | {q_txt} |")
    return "\n".join(lines)


def bench(data: dict) -> str:
    lines = ["| prompt tokens | mode | prefill t/s | decode t/s | decode speed-up | KV cells | KV MiB | "
             "overhead (share of prefill) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["records"]:
        speed = f"x{r['decode_speedup']:.2f}" if "decode_speedup" in r else ""
        if "decode_speedup_nofa" in r:
            speed += f" (x{r['decode_speedup_nofa']:.2f} vs no flash attention)"
        over = f"{100 * r['overhead_share']:.1f}%" if r["budget"] is not None else ""
        lines.append(f"| {r['prompt_tokens']} | {r['mode']}{'' if r['budget'] is None else ' @ ' + str(r['budget'])} "
                     f"| {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {speed} | {r['kv_cells_after']} | "
                     f"{r['kv_bytes_after'] / 2**20:.1f} | {over} |")
    return "\n".join(lines)


def tasks(data: dict) -> str:
    lines = ["| task | method | budget | length | depth | correct | output |", "|---|---|---:|---:|---:|:---:|---|"]
    for r in data["records"]:
        out = r["output"].strip().replace("|", "/").replace("\n", " ")[:40]
        lines.append(f"| {r['task']} | {r['method']} | {r['budget'] or 'full'} | {r['length']} | {r['depth']} | "
                     f"{'yes' if r['correct'] else 'no'} | {out} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for p in paths:
        data = json.loads(Path(p).read_text())
        kind = "bench" if "lengths" in data["config"] and "budget" in data["config"] else (
            "tasks" if "tasks" in data["config"] else "fidelity")
        print(f"### {Path(p).name}\n")
        print({"bench": bench, "tasks": tasks, "fidelity": fidelity}[kind](data))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
