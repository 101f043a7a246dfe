#!/usr/bin/env python3
"""A chat front end's request pattern through `adakv-local serve`, with saved conversation states and
without (today's one-conversation server), in the same run.

Reproduces docs/RESULTS.md, *Serving several conversations: a front end's requests, SmolLM2-135M*.

    python scripts/serve_frontend.py --model smollm2-135m --budget 256 --threads 2 \\
        --json docs/results/serve-frontend-smollm2-run2.json

Two servers with the same eviction settings: `saved` (the default --cache-bytes) and `one cache`
(--cache-bytes 0: the cache holds the last request's conversation only, as before saved states).
Each gets the same requests, streamed with the official openai client, greedy, one server after
the other (never both at once: they share the CPU):

  A1  conversation A: a ~3,000-token document and a request to summarize it
  T   a title request, then G a tags request, as Open WebUI sends them after a first answer: one
      new user message quoting the conversation so far (its last two messages)
  B1  conversation B: another ~1,500-token document and a question
  A2  A's second question;  B2 B's second;  A3 A's third

Per request: prompt tokens, tokens evaluated (`prefill_tokens`), tokens of the saved state it
resumed from, time to first token (client side), and the bytes all saved states hold after it;
at the end, GET /v1/adakv/states (each saved state's size). Prints a table; --json writes every
number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_turns import document, start, turn  # noqa: E402

TITLE = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
         "### Output:\nJSON format: { \"title\": \"your concise title here\" }\n"
         "### Chat History:\n<chat_history>\n<<HISTORY>>\n</chat_history>")
TAGS = ("### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history.\n"
        "### Output:\nJSON format: { \"tags\": [\"tag1\", \"tag2\"] }\n"
        "### Chat History:\n<chat_history>\n<<HISTORY>>\n</chat_history>")
A_QUESTIONS = ["Summarize the document above in a few sentences.",
               "What does Ada-KV change compared with SnapKV, according to the document?",
               "What is the observation window used for?"]
B_QUESTIONS = ["Which logging levels does this text name?", "What does a handler do?"]


def pattern(client: Any, doc_a: str, doc_b: str, max_tokens: int) -> list[dict[str, Any]]:
    a: list[dict[str, str]] = [{"role": "user", "content": f"{doc_a}\n\n{A_QUESTIONS[0]}"}]
    b: list[dict[str, str]] = [{"role": "user", "content": f"{doc_b}\n\n{B_QUESTIONS[0]}"}]
    rows: list[dict[str, Any]] = []

    def send(label: str, history: list[dict[str, str]], keep: bool, tokens: int = max_tokens) -> None:
        reply, row = turn(client, history, tokens)
        if keep:
            history.append({"role": "assistant", "content": reply})
        rows.append({"request": label, **row})
        print(f"  {label}: prompt {row.get('prompt_tokens')}, evaluated {row.get('prefill_tokens')}, "
              f"TTFT {row['ttft_s']:.2f} s", file=sys.stderr)

    send("A1", a, True)
    quoted = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in a[-2:])
    send("title", [{"role": "user", "content": TITLE.replace("<<HISTORY>>", quoted)}], False, 24)
    send("tags", [{"role": "user", "content": TAGS.replace("<<HISTORY>>", quoted)}], False, 24)
    send("B1", b, True)
    a.append({"role": "user", "content": A_QUESTIONS[1]})
    send("A2", a, True)
    b.append({"role": "user", "content": B_QUESTIONS[1]})
    send("B2", b, True)
    a.append({"role": "user", "content": A_QUESTIONS[2]})
    send("A3", a, True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", default="256")
    p.add_argument("--method", default="ada-snapkv")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--doc-chars", type=int, default=13000, help="conversation A's document (~3,000 tokens)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import openai

    text = document(args.doc_chars + 7000)
    doc_a, doc_b = text[: args.doc_chars], text[args.doc_chars:]
    eviction = ["--method", args.method, "--budget", args.budget]
    modes = {"saved": eviction, "one cache": [*eviction, "--cache-bytes", "0"]}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in modes.items():
            print(f"{mode}:", file=sys.stderr)
            proc, url = start(mode.replace(" ", "-"), args, extra, Path(tmp))
            try:
                client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1800)
                rows = pattern(client, doc_a, doc_b, args.max_tokens)
                states = None
                if mode == "saved":
                    with urllib.request.urlopen(f"{url}/adakv/states", timeout=30) as r:
                        states = json.loads(r.read())
                results[mode] = {"requests": rows, "states": states}
            finally:
                proc.terminate()
                proc.wait(timeout=60)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"model {args.model}, {args.threads} threads, n_ctx {args.n_ctx}, {args.method} budget {args.budget}, "
          f"{args.max_tokens} tokens per reply; load average at the end {load}")
    print(f"{'request':<8} {'mode':<10} {'prompt':>7} {'evaluated':>9} {'resumed':>8} {'TTFT s':>7} {'saved MiB':>9}")
    for i, row in enumerate(results["saved"]["requests"]):
        for mode in modes:
            r = results[mode]["requests"][i]
            mib = f"{r['cache_bytes'] / 2**20:.1f}" if r.get("cache_bytes") is not None else "-"
            print(f"{row['request']:<8} {mode:<10} {r.get('prompt_tokens', '-'):>7} {r.get('prefill_tokens', '-'):>9} "
                  f"{r.get('state_resumed_tokens', 0):>8} {r['ttft_s']:>7.2f} {mib:>9}")
    by = {m: {r["request"]: r for r in results[m]["requests"]} for m in modes}
    for label in ("A2", "B2", "A3"):
        saved, one = by["saved"][label], by["one cache"][label]
        print(f"{label}: TTFT {saved['ttft_s']:.2f} s with saved states, {one['ttft_s']:.2f} s without "
              f"(x{one['ttft_s'] / saved['ttft_s']:.1f}); evaluated {saved['prefill_tokens']} vs "
              f"{one['prefill_tokens']} tokens")
    st = results["saved"]["states"]
    sizes = [e["bytes"] / 2**20 for e in st["states"]]
    print(f"saved states at the end: {len(sizes)}, {st['bytes'] / 2**20:.1f} MiB in all (each {min(sizes):.1f}-"
          f"{max(sizes):.1f} MiB)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load": load,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
