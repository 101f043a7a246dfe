#!/usr/bin/env python3
"""Bounded memory (issue #12): a document far longer than the cache, full cache vs chunked eviction.

Reproduces docs/RESULTS.md, *Gemma 3 270M: a 24,000-token document through a 4096-cell cache*.

For each pass-key depth, one seeded raw-mode pass-key document of --tokens tokens (adakv_local.eval.tasks)
is answered twice, each run in a child process of its own so that its peak RSS is its own:

- full: llama-cpp-python as it is (eviction off): the cache must hold the whole document
  (n_ctx = document + answer, rounded up to 256; sliding-window layers full-size, llama.cpp's default);
- chunked: adakv-local with --n-ctx cells and --budget, the document read in chunks.

Per run: whether the pass key came back, prefill seconds, the KV buffers llama.cpp allocated (its own
log lines, all layers, sliding ones included), the peak cells / KV bytes the chunked cache held
(AdaKVStats), the process's peak RSS (VmHWM), and per chunk the compression overhead against the full
cache's prefill of the same tokens in the same script run (adakv_local.eval.bench.chunk_overhead).

    python scripts/bounded_memory.py --model gemma3-270m --tokens 24000 --n-ctx 4096 --budget 256 \\
        --json docs/results/bounded-memory-gemma3.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_KV_LOG = re.compile(r"KV buffer size\s*=\s*([\d.]+) MiB")


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def child(args: argparse.Namespace) -> None:
    """One run; prints one JSON line on stdout (llama.cpp's log goes to stderr)."""
    from adakv_local import Llama
    from adakv_local.models import model_path

    prompt = Path(args.prompt_file).read_text()
    path = str(model_path(args.model, quiet=True))
    kw: dict = dict(model_path=path, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=True)
    if args.child == "full":
        probe = Llama(model_path=path, vocab_only=True, verbose=False)
        n = len(probe.tokenize(prompt.encode()))
        probe.close()
        llm = Llama(n_ctx=((n + args.max_tokens + 64) // 256 + 1) * 256, **kw)
    else:
        llm = Llama(n_ctx=args.n_ctx, adakv_budget=args.budget, adakv_chunk=args.chunk, **kw)
    toks = llm.tokenize(prompt.encode())
    timeline: list[tuple[int, float, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    llm.progress_callback = lambda done, total: timeline.append(
        (done, time.perf_counter() - t0, time.process_time() - c0))
    llm.eval(toks)
    prefill = time.perf_counter() - t0
    llm.progress_callback = None
    st = llm.adakv_stats
    out = llm.create_completion(toks, max_tokens=args.max_tokens, temperature=0.0, top_k=1, seed=0)
    rec = {
        "mode": args.child, "prompt_tokens": len(toks), "n_ctx": llm.n_ctx(), "answer": out["choices"][0]["text"],
        "prefill_seconds": prefill, "timeline": timeline, "vm_hwm_kib": _vm_hwm_kib(),
    }
    if st is not None:
        rec.update(footprint=st.footprint, chunks=st.chunks, compressions=st.compressions, peak_cells=st.peak_cells,
                   kv_bytes_peak=st.kv_bytes_peak, kv_bytes_allocated=st.kv_bytes_allocated,
                   chunk_tokens=st.chunk_tokens, chunk_seconds=st.chunk_seconds,
                   chunk_cpu_seconds=st.chunk_cpu_seconds, seconds=st.seconds)
    llm.close()
    print(json.dumps(rec), flush=True)


def run_child(mode: str, prompt: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt)
    try:
        cmd = [sys.executable, __file__, "--child", mode, "--prompt-file", f.name, "--model", args.model,
               "--n-ctx", str(args.n_ctx), "--budget", str(args.budget), "--threads", str(args.threads),
               "--max-tokens", str(args.max_tokens)] + (["--chunk", str(args.chunk)] if args.chunk else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["kv_buffers_mib"] = sum(float(m) for m in _KV_LOG.findall(proc.stderr))
    return rec


def write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    runs = [{k: v for k, v in r.items() if k != "timeline"} for r in rows]
    args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tokens", type=int, default=24000)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--modes", default="full,chunked", help="which runs: full, chunked or both (default: both)")
    p.add_argument("--full-depths", default=None,
                   help="the depths that also run the full cache, comma-separated, '' for none (default: all; it "
                   "is the slow run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=("full", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from adakv_local import Llama
    from adakv_local.eval.bench import chunk_overhead
    from adakv_local.eval.tasks import passkey, score
    from adakv_local.models import model_path

    tok = Llama(model_path=str(model_path(args.model)), vocab_only=True, verbose=False)
    rows = []
    full_depths = None if args.full_depths is None else {float(d) for d in args.full_depths.split(",") if d.strip()}
    for depth in (float(d) for d in args.depths.split(",")):
        sample = passkey(tok, args.tokens, depth, args.seed, mode="raw")
        pair = {}
        modes = [m for m in ("full", "chunked") if m in args.modes.split(",")]
        if full_depths is not None and depth not in full_depths:
            modes = [m for m in modes if m != "full"]
        for mode in modes:
            rec = run_child(mode, sample.prompt, args)
            rec.update(depth=depth, key=sample.answer, retrieved=score(sample, rec["answer"]))
            pair[mode] = rec
            print(f"depth {depth:.1f} {mode:>7}: {'found' if rec['retrieved'] else 'MISSED'} {rec['answer']!r}, "
                  f"prefill {rec['prefill_seconds']:.1f} s, KV buffers {rec['kv_buffers_mib']:.1f} MiB, "
                  f"peak RSS {rec['vm_hwm_kib'] / 1024:.0f} MiB"
                  + (f", {rec['chunks']} chunks, peak {rec['peak_cells']} cells "
                     f"({rec['kv_bytes_peak'] / 2**20:.1f} MiB)" if mode == "chunked" else ""), flush=True)
        ch, full = pair.get("chunked"), pair.get("full")
        rows += [r for r in (full, ch) if r is not None]
        if args.json:  # after every depth, so that an interrupted run keeps what it measured
            write_json(args, rows)
        if ch is None:
            continue
        if full is not None:
            ch["chunk_overhead"] = chunk_overhead(ch["chunk_tokens"], ch["chunk_seconds"], full["timeline"],
                                                  ch["prompt_tokens"])
            ch["chunk_cpu_overhead"] = chunk_overhead(ch["chunk_tokens"], ch["chunk_cpu_seconds"], full["timeline"],
                                                      ch["prompt_tokens"], column=2)
            print(f"  per chunk, time vs the full cache's prefill of the same tokens: "
                  f"{', '.join(f'{100 * c:+.1f}%' for c in ch['chunk_overhead'])}; CPU time: "
                  f"{', '.join(f'{100 * c:+.1f}%' for c in ch['chunk_cpu_overhead'])}", flush=True)
        steps = ch["seconds"]["allocate"] + ch["seconds"]["compact"]
        probes = (ch["compressions"] - 1) * 32  # each compression but the last evaluates the 32-token probe
        ch["steps_share"], ch["probe_share"] = steps / ch["prefill_seconds"], probes / ch["prompt_tokens"]
        print(f"  compression steps (allocate + compact): {steps:.2f} s of the {ch['prefill_seconds']:.1f} s prefill "
              f"({100 * ch['steps_share']:.2f}%); probes: {probes} more tokens evaluated "
              f"({100 * ch['probe_share']:.2f}% of the document)", flush=True)
        if args.json:
            write_json(args, rows)
    for mode in ("full", "chunked"):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        print(f"{mode:>7}: {sum(r['retrieved'] for r in rs)}/{len(rs)} pass keys, KV buffers "
              f"{max(r['kv_buffers_mib'] for r in rs):.1f} MiB, peak RSS {max(r['vm_hwm_kib'] for r in rs) / 1024:.0f} "
              f"MiB, prefill {sum(r['prefill_seconds'] for r in rs) / len(rs):.1f} s on average")


if __name__ == "__main__":
    main()
