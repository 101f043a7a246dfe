#!/usr/bin/env python3
"""Markdown tables for docs/RESULTS.md from the JSON files the eval/bench commands write.

Reproduces docs/RESULTS.md, *Fidelity to the full cache, SmolLM2-135M*, *The pooling kernel: 7
(default) or 15*, *Equal footprint, rerun: Ada-SnapKV and SnapKV at the same budget hold the same
bytes*, *Gemma 3 270M: a 24,000-token document through a 4096-cell cache*, *Fidelity: chunked
reading against one-shot eviction, SmolLM2-135M*, *Equal footprint: what the memory buys,
SmolLM2-135M (the rect block, before 2026-12-06)*; docs/SELECTION.md, *What `max2` costs on raw
continuations*, *What it costs on raw continuations: within 1% of kernel 7*, *The new default on raw
continuations*.

    python scripts/results_tables.py docs/results/*.json
    python scripts/results_tables.py --paired A.json B.json   # two fidelity runs, prompt by prompt
    python scripts/results_tables.py --footprint F.json       # Ada against SnapKV at equal footprint R
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test over the prompts that are not tied: the chance of a split at
    least this uneven if either side wins a prompt with probability 1/2."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else float("nan")


def _sign_test(data: dict, ada: str, base: str, budget: int) -> str:
    by = {(r["method"], r["budget"], r["prompt"]): r["kl_mean"] for r in data["records"]}
    prompts = [p for (m, b, p) in by if m == ada and b == budget and (base, budget, p) in by]
    wins = sum(by[(ada, budget, p)] < by[(base, budget, p)] for p in prompts)
    losses = sum(by[(ada, budget, p)] > by[(base, budget, p)] for p in prompts)
    return "all tied" if wins + losses == 0 else f"{sign_test_p(wins, losses):.3f}"


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
    lines += ["", "| Ada method vs baseline | budget | mean KL Ada / baseline | Ada lower on | sign test p | "
              "attention L1 Ada / baseline | Ada lower on |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in data["pairs"]:
        q = l1p.get((p["ada"], p["budget"]))
        q_txt = f"{q['ratio']:.3f} | {q['ada_wins']} of {q['n']}" if q else "n/a | n/a"
        sign = _sign_test(data, p["ada"], p["baseline"], p["budget"])
        lines.append(f"| {p['ada']} vs {p['baseline']} | {p['budget']} | {p['ratio']:.3f} | "
                     f"{p['ada_wins']} of {p['n']} prompts | {sign} | {q_txt} |")
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


def overhead(data: dict) -> str:
    """bench --repeats/--direct: the compression overhead against the full cache's prefill."""
    lines = ["| prompt tokens | mode | full prefill s | eviction prefill s | overhead (wall) | overhead (CPU) | "
             "extra work on the last ubatch (wall) | (CPU) | R |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    full = {}
    for r in data["records"]:
        if r["budget"] is None:
            full[(r["prompt_tokens"], r.get("repeat", 0))] = r
            continue
        f = full[(r["prompt_tokens"], r.get("repeat", 0))]
        direct = (f"{100 * r['overhead_direct_share']:+.2f}% ({r['extra_seconds']:+.2f} s) | "
                  f"{100 * r['overhead_direct_cpu_share']:+.2f}%" if "overhead_direct_share" in r else " | ")
        lines.append(f"| {r['prompt_tokens']} | {r['mode']} @ {r['budget']} | {f['prefill_seconds']:.1f} | "
                     f"{r['prefill_seconds']:.1f} | {100 * r['overhead_share']:+.1f}% | "
                     f"{100 * r['overhead_cpu_share']:+.1f}% | {direct} | {r['kv_cells_after']} |")
    return "\n".join(lines)


def chunked(data: dict) -> str:
    """eval chunked: one-shot eviction and chunked reading against the full cache."""
    c = data["config"]
    lines = ["| mode | cache (cells) | prompts | mean KL | top-1 | R | peak cells | KV MiB at peak | "
             "KV MiB allocated |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {mode: [r for r in data["records"] if r["mode"] == mode] for mode in ("one-shot", "chunked")}
    for mode, rs in by.items():
        m = {k: sum(r[k] for r in rs) / len(rs) for k in
             ("kl_mean", "top1", "footprint", "peak_cells", "kv_bytes_peak", "kv_bytes_allocated")}
        lines.append(f"| {mode} | {rs[0]['n_ctx']} | {len(rs)} | {m['kl_mean']:.4f} | {100 * m['top1']:.1f}% | "
                     f"{m['footprint']:.0f} | {m['peak_cells']:.0f} | {m['kv_bytes_peak'] / 2**20:.1f} | "
                     f"{m['kv_bytes_allocated'] / 2**20:.1f} |")
    wins = sum(a["kl_mean"] <= b["kl_mean"] for a, b in zip(by["chunked"], by["one-shot"]))
    lines.append(f"\nchunked / one-shot mean KL: {data['summary']['kl_ratio']:.3f} (chunked at most one-shot's KL on "
                 f"{wins} of {len(by['chunked'])} prompts; budget {c['budget']}, chunks of {c['chunk']})")
    return "\n".join(lines)


def bounded(data: dict) -> str:
    """scripts/bounded_memory.py: full cache vs chunked reading of one long document per depth."""
    lines = ["| depth | mode | pass key | prefill s | KV buffers MiB (llama.cpp) | peak KV MiB held | peak RSS MiB | "
             "chunks | compression steps | per-chunk time vs full (CPU) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["runs"]:
        peak = f"{r['kv_bytes_peak'] / 2**20:.1f}" if "kv_bytes_peak" in r else ""
        steps = f"{100 * r['steps_share']:.2f}%" if "steps_share" in r else ""
        per = ", ".join(f"{100 * x:+.0f}%" for x in r.get("chunk_cpu_overhead", ()))
        key = f"{'found' if r['retrieved'] else 'missed'} {r['answer'].strip()!r}"
        lines.append(f"| {r['depth']} | {r['mode']} | {key} | {r['prefill_seconds']:.0f} | {r['kv_buffers_mib']:.1f} | "
                     f"{peak} | {r['vm_hwm_kib'] / 1024:.0f} | {r.get('chunks', '')} | {steps} | {per} |")
    return "\n".join(lines)


def tasks(data: dict) -> str:
    lines = ["| task | method | budget | length | depth | correct | output |", "|---|---|---:|---:|---:|:---:|---|"]
    for r in data["records"]:
        out = r["output"].strip().replace("|", "/").replace("\n", " ")[:40]
        lines.append(f"| {r['task']} | {r['method']} | {r['budget'] or 'full'} | {r['length']} | {r['depth']} | "
                     f"{'yes' if r['correct'] else 'no'} | {out} |")
    return "\n".join(lines)


def paired(a: dict, b: dict) -> str:
    """Fidelity run b against run a on the (method, budget, prompt) records both have."""
    ra = {(r["method"], r["budget"], r["prompt"]): r for r in a["records"]}
    groups: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    for r in b["records"]:
        key = (r["method"], r["budget"], r["prompt"])
        if key in ra:
            groups.setdefault(key[:2], []).append((ra[key], r))
    def label(c: dict) -> str:
        opts = c["config"].get("options")
        if opts:
            return ", ".join(f"{k}={v}" for k, v in opts.items())
        return f"kernel {c['config'].get('kernel', 7)}"

    ka, kb = label(a), label(b)
    lines = [f"| method | budget | prompts | mean KL, {ka} | mean KL, {kb} | ratio | {kb} lower / higher on | "
             f"sign test p | attention L1, {ka} → {kb} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (m, bud), pairs in sorted(groups.items()):
        n = len(pairs)
        kl_a = sum(x["kl_mean"] for x, _ in pairs) / n
        kl_b = sum(y["kl_mean"] for _, y in pairs) / n
        wins = sum(y["kl_mean"] < x["kl_mean"] for x, y in pairs)
        losses = sum(y["kl_mean"] > x["kl_mean"] for x, y in pairs)
        p = sign_test_p(wins, losses)
        l1_a = sum(x["l1_attn"] for x, _ in pairs) / n
        l1_b = sum(y["l1_attn"] for _, y in pairs) / n
        lines.append(f"| {m} | {bud} | {n} | {kl_a:.4f} | {kl_b:.4f} | {kl_b / kl_a:.3f} | {wins} / {losses} of {n} | "
                     f"{'all tied' if wins + losses == 0 else f'{p:.3f}'} | {l1_a:.4f} → {l1_b:.4f} |")
    return "\n".join(lines)


def _mean_ci(xs: list[float]) -> str:
    """mean ± the half-width of its 95% normal confidence interval, as the fidelity tables give it."""
    n, mean = len(xs), sum(xs) / len(xs)
    if n < 2:
        return f"{mean:.4f}"
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return f"{mean:.4f} ± {1.96 * sd / math.sqrt(n):.4f}"


def footprint(data: dict) -> str:
    """Each Ada method's mean footprint R against SnapKV at the budget nearest to it (SnapKV's R is its
    budget): about the same memory, prompt by prompt. KV MiB: the K/V bytes the compressed cache
    holds (``kv_bytes``, records that have it)."""
    by = {(r["method"], r["budget"], r["prompt"]): r for r in data["records"]}
    snap = sorted({b for (m, b, _) in by if m == "snapkv"})
    lines = ["| Ada method @ budget | its mean R (max) | KV MiB | SnapKV @ budget (R) | KV MiB | KL Ada (95% CI) | "
             "KL SnapKV (95% CI) | Ada lower on | sign test p | attention L1 Ada / SnapKV |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ada in ("ada-snapkv", "ada-pyramid"):
        for b in sorted({b for (m, b, _) in by if m == ada}):
            prompts = sorted(p for (m, bb, p) in by if m == ada and bb == b)
            rs = [by[(ada, b, p)] for p in prompts]
            mean_r = sum(r["footprint"] for r in rs) / len(rs)
            sb = min(snap, key=lambda x: abs(x - mean_r))
            ss = [by[("snapkv", sb, p)] for p in prompts]
            wins = sum(x["kl_mean"] < y["kl_mean"] for x, y in zip(rs, ss))
            losses = sum(x["kl_mean"] > y["kl_mean"] for x, y in zip(rs, ss))
            m = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
            mib = lambda xs, m=m: (f"{m(xs, 'kv_bytes') / 2**20:.2f}"  # noqa: E731
                                   if all(x.get("kv_bytes") for x in xs) else "-")
            kl_a, kl_s = _mean_ci([r["kl_mean"] for r in rs]), _mean_ci([r["kl_mean"] for r in ss])
            lines.append(f"| {ada} @ {b} | {mean_r:.0f} ({max(r['footprint'] for r in rs)}) | {mib(rs)} | "
                         f"{sb} ({sb}) | {mib(ss)} | {kl_a} | {kl_s} | {wins} of {len(prompts)} | "
                         f"{sign_test_p(wins, losses):.3g} | "
                         f"{m(rs, 'l1_attn'):.4f} / {m(ss, 'l1_attn'):.4f} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    if paths[:1] == ["--footprint"]:
        print(footprint(json.loads(Path(paths[1]).read_text())))
        return
    if paths[:1] == ["--paired"]:
        a, b = (json.loads(Path(p).read_text()) for p in paths[1:3])
        print(paired(a, b))
        return
    for p in paths:
        data = json.loads(Path(p).read_text())
        cfg = data["config"]
        if "runs" in data:
            kind = "bounded"
        elif "chunk" in cfg and "lengths" not in cfg:
            kind = "chunked"
        elif "lengths" in cfg and "budget" in cfg:
            kind = "overhead" if cfg.get("repeats") or cfg.get("direct") else "bench"
        else:
            kind = "tasks" if "tasks" in cfg else "fidelity"
        print(f"### {Path(p).name}\n")
        print({"bench": bench, "tasks": tasks, "fidelity": fidelity, "overhead": overhead, "chunked": chunked,
               "bounded": bounded}[kind](data))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
