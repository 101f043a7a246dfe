#!/usr/bin/env python3
"""Decode speed with the full cache, with eviction and with the forced per-head fallback, one run.

Reproduces docs/CUDA.md, *The device check*.

    python scripts/device_speed.py --write-model /tmp/llama8b-q4k.gguf --json speed.json

Part of scripts/device_check.sh (the GPU check). With --write-model it first writes a random
Llama-3-8B-shaped model (32 layers, 32 query / 8 KV heads of 128, FFN 14336, vocabulary 128256;
every matrix Q4_K, random blocks with zero-mean weights: ~4.6 GB, written in seconds).

For every prompt length, in one context (n_ctx fits the longest prompt): the prompt is evaluated
without eviction (prefill time), the full cache decodes --decode tokens greedily; then the
decoded tokens and the window are removed and the window evaluated again with eviction at
--budget (the compression overhead: that window's time minus its first evaluation), and the
compressed cache decodes as many tokens. A child process loads the compressed state into a
context whose attention is forced onto the per-head fallback and decodes the same (its speed,
for comparison; a crash there is reported, not fatal). Device memory (nvidia-smi) is sampled
before and after the compression. Prints one short table; --json writes every number.

The same script runs on the CPU with a small model for a dry run (--gpu-layers 0, --dims).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Llama-3-8B: n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab
DIMS_8B = (32, 4096, 32, 8, 128, 14336, 128256)
QK_K, Q4_K_BYTES = 256, 144  # block_q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles


def random_q4_k(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_K rows of cols weights; weight = d*sc*q - dmin*m with sc, m in [0, 64), q in [0, 16):
    dmin = 7.5 d makes them zero-mean, d = 2^-14 gives them a std of ~0.016 (1/sqrt(4096))."""
    blocks = np.frombuffer(rng.bytes(rows * (cols // QK_K) * Q4_K_BYTES), dtype=np.uint8).copy()
    blocks = blocks.reshape(rows, cols // QK_K, Q4_K_BYTES)
    blocks[..., 0:4] = np.array([2.0**-14, 7.5 * 2.0**-14], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_model(path: Path, dims: tuple[int, ...], n_ctx_train: int, seed: int = 0) -> Path:
    """A random llama-architecture GGUF with every 2-D weight in Q4_K (metadata and vocabulary as
    adakv_local.testing writes them; the same random matrices in every layer)."""
    import gguf

    from adakv_local.testing import add_vocab, llama_vocab  # the tiny models' vocabulary

    n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab = dims
    rng = np.random.default_rng(seed)
    vocab = llama_vocab(n_vocab)
    q4k = gguf.GGMLQuantizationType.Q4_K
    mats = {  # numpy shape (rows, cols) == ggml {cols, rows}
        "attn_q": (n_head * head_dim, n_embd), "attn_k": (n_head_kv * head_dim, n_embd),
        "attn_v": (n_head_kv * head_dim, n_embd), "attn_output": (n_embd, n_head * head_dim),
        "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff),
    }  # fmt: skip
    data = {name: random_q4_k(rng, *shape) for name, shape in mats.items()}
    norm = np.ones(n_embd, dtype=np.float32)

    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_type("model")
    w.add_name("adakv-random-llama3-8b-shape")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    w.add_vocab_size(vocab.n_vocab)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    add_vocab(w, vocab)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_tensor("token_embd.weight", random_q4_k(rng, vocab.n_vocab, n_embd), raw_dtype=q4k)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        for name in mats:
            w.add_tensor(f"blk.{i}.{name}.weight", data[name], raw_dtype=q4k)  # bytes [rows, blocks * 144]
    w.add_tensor("output_norm.weight", norm)
    w.add_tensor("output.weight", random_q4_k(rng, vocab.n_vocab, n_embd), raw_dtype=q4k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def gpu_mib() -> float | None:
    """Device memory in use (MiB, first GPU) as nvidia-smi reports it; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    try:
        return float(out.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def make_llm(args: argparse.Namespace):
    from adakv_local import Llama

    return Llama(model_path=str(args.model), n_ctx=args.n_ctx, n_batch=args.batch, n_ubatch=args.ubatch,
                 n_threads=args.threads, n_threads_batch=args.threads, n_gpu_layers=args.gpu_layers,
                 adakv_budget=args.budget, adakv_window=args.window, verbose=False)  # fmt: skip


def decode_tps(llm, n: int, warmup: int = 4) -> float:
    """Greedy decode speed over n tokens, after `warmup` untimed ones (new graph shapes, CUDA graphs)."""
    from adakv_local.eval.bench import greedy_decode

    greedy_decode(llm, warmup)
    return n / greedy_decode(llm, n)


def fallback_child(args: argparse.Namespace) -> int:
    """Load the compressed state into a context forced onto the per-head fallback; print its t/s."""
    os.environ["ADAKV_FORCE_FALLBACK"] = "1"  # read when eviction is enabled on the new context
    os.environ["ADAKV_ATTN_PATH"] = "heads"
    llm = make_llm(args)
    with open(args.fallback_state, "rb") as f:
        llm.load_state(pickle.load(f))
    llm.eval([300])  # a restored state has no logits to decode from
    tps = decode_tps(llm, args.decode)
    print(json.dumps({"fallback_tps": tps, "fallback_attn": sorted(set(llm.adakv_kvcache.attn_used()))}), flush=True)
    return 0


def run_length(llm, args: argparse.Namespace, n: int, rng: np.random.Generator, tmp: Path) -> dict:
    import llama_cpp

    w = args.window
    toks = [int(t) for t in rng.integers(300, 350, size=n)]  # printable ASCII tokens of the vocabulary
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    t0 = time.perf_counter()
    with llm.adakv_suspended():
        llm.eval(toks[:-w])
        llm.eval(toks[-w:])
        prefill = time.perf_counter() - t0
        llm.n_tokens = n - w  # the window once more, warm: the base of the compression overhead
        t0 = time.perf_counter()
        llm.eval(toks[-w:])
        t_plain = time.perf_counter() - t0
    mem_full = gpu_mib()
    full_tps = decode_tps(llm, args.decode)

    llm.n_tokens = n - w  # the next eval removes the decoded tokens and the window, then compresses
    t0 = time.perf_counter()
    llm.eval(toks[-w:])
    t_evict = time.perf_counter() - t0
    mem_evict = gpu_mib()
    st = llm.adakv_stats
    assert st is not None and st.cells_before == n, "the window did not compress the prompt"
    evict_tps = decode_tps(llm, args.decode)
    attn = sorted(set(llm.adakv_kvcache.attn_used()))  # "kernel" where the backend honours the starts

    rec = {"prompt_tokens": n, "budget": args.budget, "window": w, "decode_tokens": args.decode,
           "prefill_s": prefill, "prefill_tps": n / prefill, "full_tps": full_tps, "evict_tps": evict_tps,
           "speedup": evict_tps / full_tps, "attn": attn, "footprint": st.footprint,
           "overhead_s": t_evict - t_plain, "overhead_share": (t_evict - t_plain) / prefill,
           "seconds": st.seconds, "gpu_mib_full": mem_full, "gpu_mib_after": mem_evict,
           "extra_mib": None if mem_full is None or mem_evict is None else mem_evict - mem_full}  # fmt: skip
    if not args.no_fallback:
        state = tmp / f"state-{n}.pkl"
        with open(state, "wb") as f:
            pickle.dump(llm.save_state(), f)
        cmd = [sys.executable, __file__, "--fallback-state", str(state), *args.child_args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        state.unlink()
        try:
            rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            rec["fallback_tps"] = None
            rec["fallback_error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"
    return rec


def print_table(recs: list[dict]) -> None:
    print(f"{'prompt':>7} {'prefill s':>9} {'full t/s':>9} {'evict t/s':>9} {'x full':>7} {'fallback':>9} "
          f"{'overhead':>14} {'R':>6} {'+MiB':>6} route")  # fmt: skip
    for r in recs:
        fb = f"{r['fallback_tps']:9.1f}" if r.get("fallback_tps") else f"{'-':>9}"
        extra = f"{r['extra_mib']:6.0f}" if r["extra_mib"] is not None else f"{'-':>6}"
        route = "+".join(r["attn"]) + "/" + "+".join(r.get("fallback_attn", ["-"]))  # eviction / fallback
        print(f"{r['prompt_tokens']:>7} {r['prefill_s']:9.2f} {r['full_tps']:9.1f} {r['evict_tps']:9.1f} "
              f"{r['speedup']:6.2f}x {fb} {r['overhead_s']:6.3f}s {100 * r['overhead_share']:5.2f}% "
              f"{r['footprint']:>6} {extra} {route}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "adakv-llama8b-q4k.gguf")
    ap.add_argument("--write-model", action="store_true", help="write the random model first (if absent)")
    ap.add_argument(
        "--dims",
        default=",".join(map(str, DIMS_8B)),
        help="n_layer,n_embd,n_head,n_head_kv,head_dim,n_ff,n_vocab of a written model",
    )
    ap.add_argument("--lengths", default="4096,32768,131072", help="prompt lengths, comma-separated")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--decode", type=int, default=128, help="tokens decoded per measurement")
    ap.add_argument("--gpu-layers", type=int, default=999)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--no-fallback", action="store_true", help="skip the forced fallback's speed")
    ap.add_argument("--json", type=Path, help="write the records here (after every prompt length)")
    ap.add_argument("--fallback-state", type=Path, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--n-ctx", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.n_ctx is None:
        args.n_ctx = ((max(lengths) + args.decode + 64) // 256 + 1) * 256
    args.child_args = ["--model", str(args.model), "--n-ctx", str(args.n_ctx), "--budget", str(args.budget),
                       "--window", str(args.window), "--decode", str(args.decode), "--gpu-layers",
                       str(args.gpu_layers), "--threads", str(args.threads), "--batch", str(args.batch),
                       "--ubatch", str(args.ubatch)]  # fmt: skip
    if args.fallback_state is not None:
        return fallback_child(args)

    if args.write_model and not args.model.exists():
        t0 = time.perf_counter()
        dims = tuple(int(x) for x in args.dims.split(","))
        write_model(args.model, dims, n_ctx_train=max(args.n_ctx, 262144))
        print(f"model written in {time.perf_counter() - t0:.1f} s: {args.model} "
              f"({args.model.stat().st_size / 2**30:.2f} GiB)", flush=True)  # fmt: skip

    import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)

    t0 = time.perf_counter()
    llm = make_llm(args)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s (n_ctx {args.n_ctx})", flush=True)
    kv = llm.adakv_kvcache
    scores_mib = kv.n_layer * args.n_ctx * kv.n_head_kv * 4 / 2**20
    print(f"score buffers: {kv.n_layer} layers x {args.n_ctx} cells x {kv.n_head_kv} heads x f32 = "
          f"{scores_mib:.0f} MiB (grows with n_ctx)", flush=True)  # fmt: skip
    rng = np.random.default_rng(0)
    recs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        warm = argparse.Namespace(**{**vars(args), "no_fallback": True})
        run_length(llm, warm, min(lengths), rng, Path(tmp))  # first use of every graph shape and kernel
        print(f"warm-up run ({min(lengths)} tokens) in {time.perf_counter() - t0:.1f} s", flush=True)
        for n in lengths:
            rec = run_length(llm, args, n, rng, Path(tmp))
            rec["score_buffers_mib"] = kv.n_layer * n * kv.n_head_kv * 4 / 2**20  # at n_ctx == prompt
            recs.append(rec)
            print(json.dumps(rec), flush=True)
            if args.json:
                args.json.write_text(json.dumps(recs, indent=1))
    llm.close()
    print_table(recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
