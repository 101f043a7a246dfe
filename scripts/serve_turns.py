#!/usr/bin/env python3
"""A 5-turn conversation over a pasted ~6,000-token document, through `adakv-local serve`, with
eviction and with the full cache, in the same run.

Reproduces docs/RESULTS.md, *Serving: a 5-turn conversation over a ~6,000-token document, SmolLM2-135M*.

    python scripts/serve_turns.py --model smollm2-135m --budget 256 --threads 2 --json turns.json

Two servers run side by side on free localhost ports: one with eviction (--method, --budget),
one with --method full (every cell kept; flash attention on as well, so that only the eviction
differs). Each turn goes to both, one after the other (eviction first), streamed with the
official openai client, greedy, --max-tokens each. Turn 1 is the document and a request to
summarize it; turns 2-5 are questions about it, each sent with the whole conversation so far, as
a chat front end sends it. Per turn and server: time to first token (client side, request sent
to first content chunk), the server's stats (prompt tokens, tokens evaluated, KV cells per layer
after the turn, decode tokens/s after the first token). Prints a table; --json writes every number.

The document: examples/ada-kv.md followed by the documentation of Python's `argparse` and `logging`
modules (adakv_local.eval.texts), cut at --doc-chars characters (28,000: ~6,000 SmolLM2 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Summarize the document above in a few sentences.",
    "What does Ada-KV change compared with SnapKV, according to the document?",
    "What is the observation window used for?",
    "Which command-line parser features does the second part of the document describe?",
    "In one sentence: what is freed after the prompt is compressed?",
]


def document(n_chars: int) -> str:
    sys.path.insert(0, str(ROOT))
    from adakv_local.eval.texts import module_text

    parts = [(ROOT / "examples" / "ada-kv.md").read_text()]
    parts += [f"# {m}\n\n{module_text(m)}" for m in ("argparse", "logging")]
    text = "\n\n".join(parts)
    return text[:n_chars]


def _cmd() -> list[str]:
    exe = shutil.which("adakv-local")
    return [exe] if exe else [sys.executable, "-m", "adakv_local"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(label: str, args: argparse.Namespace, eviction: list[str], log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = (log_dir / f"{label}.log").open("w")
    cmd = [*_cmd(), "serve", "--model", args.model, "--n-ctx", str(args.n_ctx), "--threads", str(args.threads),
           "--port", str(port), "--alias", "model", *eviction]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{label} server exited: {(log_dir / f'{label}.log').read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{label} server did not start within 300 s")


def turn(client: Any, history: list[dict[str, str]], max_tokens: int) -> tuple[str, dict[str, Any]]:
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    stats: dict[str, Any] = {}
    for chunk in client.chat.completions.create(model="model", messages=history, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        stats = (chunk.model_extra or {}).get("adakv", stats)
    return "".join(parts), {"ttft_s": round(ttft or float("nan"), 3), "wall_s": round(time.perf_counter() - t0, 3),
                            **stats}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", default="256")
    p.add_argument("--method", default="ada-snapkv")
    p.add_argument("--n-ctx", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--doc-chars", type=int, default=28000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import openai

    doc = document(args.doc_chars)
    modes = {"eviction": ["--method", args.method, "--budget", args.budget], "full": ["--method", "full"]}
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {m: start(m, args, ev, Path(tmp)) for m, ev in modes.items()}
        try:
            clients = {m: openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1800)
                       for m, (_, url) in servers.items()}
            histories: dict[str, list[dict[str, str]]] = {m: [] for m in modes}
            for i, question in enumerate(QUESTIONS):
                for m in modes:
                    content = f"{doc}\n\n{question}" if i == 0 else question
                    histories[m].append({"role": "user", "content": content})
                    reply, row = turn(clients[m], histories[m], args.max_tokens)
                    histories[m].append({"role": "assistant", "content": reply})
                    row["reply"] = reply
                    results[m].append(row)
                    print(f"turn {i + 1} {m}: ttft {row['ttft_s']:.2f} s, {row.get('decode_tps')} t/s", file=sys.stderr)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"model {args.model}, {args.threads} threads, n_ctx {args.n_ctx}, {args.max_tokens} tokens per reply, "
          f"eviction: {args.method} budget {args.budget}; load average at the end {load}")
    print(f"{'turn':>4} {'mode':<9} {'prompt':>7} {'evaluated':>9} {'cells':>6} {'TTFT s':>7} {'decode t/s':>10}")
    for i in range(len(QUESTIONS)):
        for m in modes:
            r = results[m][i]
            print(f"{i + 1:>4} {m:<9} {r.get('prompt_tokens', '-'):>7} {r.get('prefill_tokens', '-'):>9} "
                  f"{r.get('kv_cells_after', '-'):>6} {r['ttft_s']:>7.2f} {r.get('decode_tps') or 0:>10.1f}")
    for m in modes:
        rows = results[m][1:]
        tps = [r["decode_tps"] for r in results[m] if r.get("decode_tps")]
        print(f"{m}: TTFT turn 2 {results[m][1]['ttft_s']:.2f} s, mean TTFT turns 2-5 "
              f"{sum(r['ttft_s'] for r in rows) / len(rows):.2f} s, mean decode {sum(tps) / len(tps):.1f} t/s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load": load,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
