#!/usr/bin/env python3
"""docs/BAD-INPUT.md from real runs: every bad input tried on the Python API and the CLI, and what it gets.

Reproduces docs/BAD-INPUT.md, *Bad input: what the Python API and the CLI answer*.

    python scripts/bad_inputs.py > docs/BAD-INPUT.md

Needs the patched libllama (an installed package, or ADAKV_LIB_DIR pointing at a build) and takes
about a minute on 2 cores: tiny random-weight models, --threads 1. The CLI runs as
``python -m adakv_local`` from this checkout. Exits 1 if any case printed a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADER = """# Bad input: what the Python API and the CLI answer

Generated from real runs by `python scripts/bad_inputs.py > docs/BAD-INPUT.md` (rerun it after
changing a message). Models are tiny random-weight GGUF files (`adakv_local.testing`;
4096-token trained context); `DIR` is a temporary folder, `doc.md` a ~700-character document
(885 prompt tokens with the chat template), `huge.txt` ~5300.

CLI exit codes: 0 success; 1 runtime failure, including input that cannot be used (a missing,
empty or binary document, a model file that is not a complete GGUF file); 2 usage error (a bad
option value, an unknown model name, an `--n-ctx` above the trained context). Every error is one
line on stderr, no traceback. The next table lists the llama.cpp memory and state calls that a
compressed cache refuses, with what they return, and the eviction configs a made `Llama` refuses
(`llm.adakv_config = ...`); the last one what `adakv-local serve` answers to bad requests.
"""

DOC = ("The harbour town woke early. Fishing boats left before dawn, and by the time the bakery opened the first "
       "crates of herring were already on the quay. Tourists arrived later, with cameras and questions about the "
       "old lighthouse, which had not been lit for forty years. The council wanted to turn it into a museum; the "
       "fishermen wanted it repaired and working again, because fog still rolled in every autumn and the new "
       "electronic buoys failed more often than anyone liked to admit. After three public meetings the two sides "
       "agreed on a compromise: the lamp would be restored and kept for emergencies, and the lower floor would host "
       "a small exhibition about the keepers who had lived there, their logbooks, and the storms they had recorded.")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- the Python API -------------------------------------------------------------------------------------


def api_cases(d: Path) -> list[tuple[str, dict[str, Any], Callable[[Any], str] | None]]:
    """(what, keywords for adakv_local.Llama, what an accepted call shows)."""
    tiny = str(d / "tiny.gguf")
    base = {"model_path": tiny, "n_ctx": 512, "verbose": False}
    budget = lambda llm: f"accepted: adakv_config.budget = {llm.adakv_config.budget!r}"  # noqa: E731
    import numpy as np

    cases: list[tuple[str, dict[str, Any], Callable[[Any], str] | None]] = [
        ("budget 0", {"adakv_budget": 0}, None),
        ("budget negative", {"adakv_budget": -5}, None),
        ("budget not whole, above 1", {"adakv_budget": 2.5}, None),
        ("budget as a string", {"adakv_budget": "256"}, None),
        ("budget True", {"adakv_budget": True}, None),
        ("budget NaN", {"adakv_budget": math.nan}, None),
        ("budget infinite", {"adakv_budget": math.inf}, None),
        ("budget 1e3 (a whole float)", {"adakv_budget": 1e3}, budget),
        ("budget numpy int", {"adakv_budget": np.int64(256)}, budget),
        ("budget 1.0", {"adakv_budget": 1.0}, None),
        ("budget below the window", {"adakv_budget": 16}, None),
        ("budget below a smaller window", {"adakv_budget": 12, "adakv_window": 16}, None),
        ("unknown method", {"adakv_budget": 64, "adakv_method": "h2o"}, None),
        ("window 0", {"adakv_budget": 64, "adakv_window": 0}, None),
        ("window not an integer", {"adakv_budget": 64, "adakv_window": 16.0}, None),
        ("even kernel", {"adakv_budget": 64, "adakv_kernel": 4}, None),
        ("kernel 0", {"adakv_budget": 64, "adakv_kernel": 0}, None),
        ("unknown pooling", {"adakv_budget": 64, "adakv_pooling": "min"}, None),
        ("unknown GQA reduction", {"adakv_budget": 64, "adakv_gqa": "sum"}, None),
        ("alpha above 1", {"adakv_budget": 64, "adakv_alpha": 1.5}, None),
        ("alpha negative", {"adakv_budget": 64, "adakv_alpha": -0.1}, None),
        ("max_ratio below 1", {"adakv_budget": 64, "adakv_max_ratio": 0.5}, None),
        ("sinks negative", {"adakv_budget": 64, "adakv_sinks": -1}, None),
        ("span_share negative", {"adakv_budget": 64, "adakv_span_share": -0.5}, None),
        ("unknown spans", {"adakv_budget": 64, "adakv_spans": "digits"}, None),
        ("chunk 0", {"adakv_budget": 64, "adakv_chunk": 0}, None),
        ("chunk leaves no room for the window", {"adakv_budget": 64, "adakv_chunk": 500}, None),
        ("flash_attn=False with a budget", {"adakv_budget": 64, "flash_attn": False}, None),
        ("n_ubatch below the window", {"adakv_budget": 64, "n_ubatch": 16}, None),
        ("eviction keyword, budget None", {"adakv_method": "snapkv"}, None),
        ("two eviction keywords, budget None", {"adakv_window": 16, "adakv_alpha": 0.5}, None),
        ("n_ctx above the trained context", {"adakv_budget": 64, "n_ctx": 8192},
         lambda llm: f"accepted: n_ctx() = {llm.n_ctx()} (llama.cpp logs a warning; the CLI refuses this)"),
        ("model_path missing", {"model_path": str(d / "missing.gguf")}, None),
        ("model_path a folder", {"model_path": str(d)}, None),
        ("model_path truncated GGUF", {"model_path": str(d / "cut.gguf")}, None),
        ("model_path bad magic", {"model_path": str(d / "magic.gguf")}, None),
    ]
    return [(what, {**base, **kw}, ok) for what, kw, ok in cases]


def run_api(d: Path) -> list[str]:
    from adakv_local import Llama

    rows = ["## Python API: `adakv_local.Llama(model_path=..., n_ctx=512, verbose=False, **keywords)`", "",
            "`ConfigError` (`adakv_local.config`) is a `ValueError`; the option checks run before the model loads.", "",
            "| case | keywords | exception | message |", "|---|---|---|---|"]
    for what, kw, ok in api_cases(d):
        shown = {k: v for k, v in kw.items() if k not in ("model_path", "n_ctx", "verbose")}
        if kw["model_path"] != str(d / "tiny.gguf"):
            shown = {"model_path": kw["model_path"].replace(str(d), "DIR"), **shown}
        if kw["n_ctx"] != 512:
            shown["n_ctx"] = kw["n_ctx"]
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
                llm = Llama(**kw)
        except Exception as e:  # noqa: BLE001 - the point is to see what comes out
            rows.append(f"| {what} | `{cell(args)}` | {type(e).__name__} | {cell(str(e).replace(str(d), 'DIR'))} |")
            continue
        try:
            result = ok(llm) if ok is not None else "accepted"
        finally:
            llm.close()
        rows.append(f"| {what} | `{cell(args)}` | none | {cell(result)} |")
    return rows


# -- cache operations on a compressed context -----------------------------------------------------------


def run_cache_ops(d: Path) -> list[str]:
    """What llama.cpp's memory and state calls do to a compressed cache (they must lose nothing)."""
    import llama_cpp

    from adakv_local import AdaKVConfig, Llama

    def make() -> Any:
        return Llama(model_path=str(d / "tiny.gguf"), n_ctx=1024, n_threads=1, verbose=False, adakv_budget=64,
                     adakv_window=16)

    rows = ["## Cache operations on a compressed context", "",
            "A context whose prompt of N tokens was compressed (budget 64, window 16, tiny model); the block",
            "stands for positions 0 .. N-1. `mem` is `llama_get_memory(llm.ctx)`, `replace` `dataclasses.replace`.", "",
            "| operation | result | what is left |", "|---|---|---|"]
    llm = make()
    llm.eval(llm.tokenize(DOC.encode()))
    kv, n = llm.adakv_kvcache, llm.n_tokens
    mem = llama_cpp.llama_get_memory(llm.ctx)

    def left() -> str:
        last = llama_cpp.llama_memory_seq_pos_max(mem, 0)
        return f"{kv.n_cells()} cells, footprint {kv.footprint()}, last position {last}"

    def row(op: str, call: Callable[[], Any]) -> None:
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
                res = repr(call())
        except Exception as e:  # noqa: BLE001
            res = f"{type(e).__name__}: {e}"
        rows.append(f"| `{cell(op)}` | {cell(res.replace(str(d), 'DIR'))} | {left()} |")

    rows.append(f"| (after the compression, N = {n}) | | {left()} |")
    row("llama_memory_seq_rm(mem, 0, 10, -1)  # cut inside the block",
        lambda: llama_cpp.llama_memory_seq_rm(mem, 0, 10, -1))
    row(f"llama_memory_seq_rm(mem, -1, {n - 1}, -1)", lambda: llama_cpp.llama_memory_seq_rm(mem, -1, n - 1, -1))
    row("llama_memory_seq_add(mem, 0, 0, -1, 5)  # shift", lambda: llama_cpp.llama_memory_seq_add(mem, 0, 0, -1, 5))
    row("llama_memory_seq_div(mem, 0, 0, -1, 2)", lambda: llama_cpp.llama_memory_seq_div(mem, 0, 0, -1, 2))
    row("llama_memory_can_shift(mem)", lambda: llama_cpp.llama_memory_can_shift(mem))
    row("llm.n_tokens = 10; llm.eval([1, 2])  # rewind into the block", lambda: (setattr(llm, "n_tokens", 10),
                                                                                  llm.eval([1, 2]))[1])
    llm.n_tokens = n
    made = llm.adakv_config
    gqa = "mean" if made.gqa == "max" else "max"
    row(f"llm.adakv_config = replace(llm.adakv_config, gqa={gqa!r})",
        lambda: setattr(llm, "adakv_config", dataclasses.replace(made, gqa=gqa)))
    row("llm.adakv_config = replace(llm.adakv_config, budget=600, window=600)",
        lambda: setattr(llm, "adakv_config", dataclasses.replace(made, budget=600, window=600)))
    other = Llama(model_path=str(d / "tiny.gguf"), n_ctx=1024, n_threads=1, verbose=False)
    other.eval(other.tokenize(b"plain"))
    row("other.adakv_config = AdaKVConfig(budget=64)  # other: made without adakv_budget",
        lambda: setattr(other, "adakv_config", AdaKVConfig(budget=64)))
    row("llm.load_state(state of a context without eviction)", lambda: llm.load_state(other.save_state()))
    other.close()
    llm.close()
    llm = make()
    llm.eval(llm.tokenize(DOC.encode()))
    kv, mem = llm.adakv_kvcache, llama_cpp.llama_get_memory(llm.ctx)
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    import ctypes

    buf = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0)
    row("llama_state_seq_set_data(ctx, <sequence 0 of this compressed context>, size, 0)",
        lambda: llama_cpp.llama_state_seq_set_data(llm.ctx, buf, size, 0))
    os.environ["ADAKV_LAYOUT"] = "rect"  # read when eviction is enabled
    try:
        rect = make()
    finally:
        del os.environ["ADAKV_LAYOUT"]
    rect.eval(rect.tokenize(DOC.encode()))
    row("llm.load_state(state of a compressed context made with ADAKV_LAYOUT=rect)",
        lambda: llm.load_state(rect.save_state()))
    rect.close()
    saved = llm.save_state()

    def edited(edit: Callable[[bytearray, int], None]) -> Any:
        """A copy of `saved` with its adakv section (magic, version 3, ...) edited by hand."""
        blob = bytearray(saved.llama_state)
        edit(blob, bytes(blob).find(struct.pack("<II", 0x564B4441, 3)))
        state = copy.copy(saved)
        state.llama_state, state.llama_state_size = bytes(blob), len(blob)
        return state

    def first_after_labels(b: bytearray, at: int) -> None:  # block: layout, R, W, lo, hi, first
        struct.pack_into("<i", b, at + 16 + 20, struct.unpack_from("<i", b, at + 16 + 12)[0] + 1)

    def swap_kept(b: bytearray, at: int) -> None:  # the last two kept positions of the last head
        end = at + 40 + 4 * kv.n_layer * kv.n_head_kv * (1 + struct.unpack_from("<i", b, at + 24)[0])
        b[end - 8 : end] = b[end - 4 : end] + b[end - 8 : end - 4]

    row("llm.load_state(<a state whose pos_first was edited past its first label>)",
        lambda: llm.load_state(edited(first_after_labels)))
    row("llm.load_state(<a state with two kept positions of a head swapped>)",
        lambda: llm.load_state(edited(swap_kept)))
    row("llm.load_state(<a state cut inside its adakv section>)",
        lambda: llm.load_state(edited(lambda b, at: b.__delitem__(slice(at + 30, None)))))
    kv.arm_scores(16)
    row("kv.arm_scores(16); llm.eval([n_vocab + 5])  # a decode that fails",
        lambda: llm.eval([llm.n_vocab() + 5]))
    row("kv.read_scores()  # after that failed decode", lambda: kv.read_scores())
    row("kv._n.lib.llama_adakv_get_starts(ctx, NULL)",
        lambda: (kv._n.lib.llama_adakv_get_starts(kv._ctx, kv._n.ffi.NULL), kv.last_error()))
    row("llama_memory_seq_pos_min(mem, 0)  # the block's first label (llama-adakv.h)",
        lambda: llama_cpp.llama_memory_seq_pos_min(mem, 0))
    row("llama_memory_seq_rm(mem, 0, 0, -1)  # the whole sequence",
        lambda: llama_cpp.llama_memory_seq_rm(mem, 0, 0, -1))
    llm.adakv_config = None
    long_doc = llm.tokenize((DOC + " " + DOC).encode())
    row(f"llm.adakv_config = None; llm.create_completion(<{len(long_doc)} tokens>)  # eviction off: n_ctx limits",
        lambda: llm.create_completion(long_doc, max_tokens=1))
    llm.close()
    for op, call in (("llm.adakv_kvcache  # after llm.close()", lambda: llm.adakv_kvcache),
                     ("llm.eval([1, 2])  # after llm.close()", lambda: llm.eval([1, 2])),
                     ("kv.n_cells()  # a handle taken before llm.close()", lambda: kv.n_cells())):
        try:
            res = repr(call())
        except Exception as e:  # noqa: BLE001
            res = f"{type(e).__name__}: {e}"
        rows.append(f"| `{cell(op)}` | {cell(res)} | (closed: nothing) |")
    return rows


# -- the CLI -------------------------------------------------------------------------------------------


def cli_cases() -> list[tuple[str, list[str], str | None]]:
    """(what, arguments, stdin); {d} is the folder, M the tiny model with --threads 1."""
    m = ["--model", "{d}/tiny.gguf", "--threads", "1"]
    s = ["summarize", "{d}/doc.md", *m]
    return [
        ("document missing", ["summarize", "{d}/nope.md", *m], None),
        ("document is a folder", ["summarize", "{d}", *m], None),
        ("document empty", ["summarize", "{d}/empty.md", *m], None),
        ("document binary (ELF)", ["summarize", "{d}/elf.bin", *m], None),
        ("document binary on stdin", ["summarize", *m], "elf"),
        ("document Latin-1", ["summarize", "{d}/latin1.txt", *m], None),
        ("document UTF-16", ["summarize", "{d}/utf16.txt", *m], None),
        ("document of control bytes", ["summarize", "{d}/controls.txt", *m], None),
        ("model name unknown", ["summarize", "{d}/doc.md", "--model", "no-such-model"], None),
        ("model path missing", ["summarize", "{d}/doc.md", "--model", "{d}/nope.gguf"], None),
        ("model path a folder", ["summarize", "{d}/doc.md", "--model", "{d}"], None),
        ("model truncated", ["summarize", "{d}/doc.md", "--model", "{d}/cut.gguf"], None),
        ("model bad magic", ["summarize", "{d}/doc.md", "--model", "{d}/magic.gguf"], None),
        ("model empty file", ["summarize", "{d}/doc.md", "--model", "{d}/empty.gguf"], None),
        ("model unknown architecture", ["summarize", "{d}/doc.md", "--model", "{d}/arch.gguf"], None),
        ("same, --verbose (last line)", ["summarize", "{d}/doc.md", "--model", "{d}/arch.gguf", "--verbose"], None),
        ("--n-ctx above trained", [*s, "--n-ctx", "100000"], None),
        ("same, --allow-context-overflow", [*s, "--n-ctx", "4352", "--allow-context-overflow", "--max-tokens", "2",
                                            "--json"], None),
        ("chat --n-ctx above trained", ["chat", *m, "--n-ctx", "8192"], ""),
        ("--n-ctx not an integer", [*s, "--n-ctx", "1.5"], None),
        ("--n-ctx a word", [*s, "--n-ctx", "abc"], None),
        ("--n-ctx 0", [*s, "--n-ctx", "0"], None),
        ("prompt alone > --n-ctx, --method full", [*s, "--n-ctx", "512", "--method", "full"], None),
        ("prompt + summary > --n-ctx, --method full", [*s, "--n-ctx", "900", "--max-tokens", "100", "--method",
                                                      "full"], None),
        ("prompt > --n-ctx, too small for the budget", [*s, "--n-ctx", "512", "--budget", "480"], None),
        ("prompt > --n-ctx: read in chunks", [*s, "--n-ctx", "512", "--budget", "64", "--max-tokens", "2", "--json"],
         None),
        ("--chunk 0", [*s, "--chunk", "0"], None),
        ("prompt alone > trained context", ["summarize", "{d}/huge.txt", *m], None),
        ("--budget 1", [*s, "--budget", "1"], None),
        ("--budget 0", [*s, "--budget", "0"], None),
        ("--budget -5", [*s, "--budget", "-5"], None),
        ("--budget 2.5", [*s, "--budget", "2.5"], None),
        ("--budget 1e3", [*s, "--budget", "1e3", "--max-tokens", "2", "--json"], None),
        ("--budget a word", [*s, "--budget", "lots"], None),
        ("--budget 8 --method full", [*s, "--budget", "8", "--method", "full", "--max-tokens", "2", "--json"], None),
        ("--method unknown", [*s, "--method", "h2o"], None),
        ("--window 0", [*s, "--window", "0"], None),
        ("--kernel even", [*s, "--kernel", "4"], None),
        ("--alpha above 1", [*s, "--alpha", "1.5"], None),
        ("--max-ratio below 1", [*s, "--max-ratio", "0.5"], None),
        ("--sinks negative", [*s, "--sinks", "-1"], None),
        ("--span-share negative", [*s, "--span-share", "-1"], None),
        ("--pooling unknown", [*s, "--pooling", "min"], None),
        ("--max-tokens negative", [*s, "--max-tokens", "-3"], None),
        ("--max-tokens 0", [*s, "--max-tokens", "0"], None),
        ("--threads 0", ["summarize", "{d}/doc.md", "--model", "{d}/tiny.gguf", "--threads", "0"], None),
        ("--temperature negative", [*s, "--temperature", "-1"], None),
        ("--seed negative", [*s, "--seed", "-1"], None),
        ("--gpu-layers negative", [*s, "--gpu-layers", "-1"], None),
        ("unknown flag", [*s, "--budgett", "64"], None),
        ("no command", [], None),
        ("models path, unknown name", ["models", "path", "no-such-model"], None),
        ("models pull, unknown name", ["models", "pull", "no-such-model"], None),
        ("eval --json into a missing folder", ["eval", "fidelity", *m, "--json", "{d}/no/out.json"], None),
        ("eval --plot into a missing folder", ["eval", "fidelity", *m, "--json", "-", "--plot", "{d}/no/p.png"], None),
        ("eval --plot a folder", ["eval", "tasks", *m, "--plot", "{d}"], None),
        ("eval --budgets below the window", ["eval", "fidelity", *m, "--budgets", "8"], None),
        ("eval --tasks unknown", ["eval", "tasks", *m, "--tasks", "nope"], None),
        ("bench --json into a missing folder", ["bench", *m, "--json", "{d}/no/b.json"], None),
        ("bench --budget above a length", ["bench", *m, "--lengths", "200", "--budget", "256"], None),
        ("serve --port 0", ["serve", *m, "--port", "0"], None),
        ("serve --n-ctx above trained", ["serve", *m, "--n-ctx", "100000"], None),
        ("serve --budget below the window", ["serve", *m, "--budget", "8"], None),
        ("serve --cache-bytes not a size", ["serve", *m, "--cache-bytes", "lots"], None),
        ("serve --cache-dir a file", ["serve", *m, "--cache-dir", "{d}/tiny.gguf"], None),
    ]


def run_cli(d: Path, elf: bytes) -> tuple[list[str], bool]:
    rows = ["## CLI: `adakv-local ...`", "",
            "| case | command | exit | stderr (the error line) |", "|---|---|---:|---|"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tracebacks = False
    for what, args, stdin in cli_cases():
        argv = [a.format(d=d) for a in args]
        data = elf if stdin == "elf" else (stdin or "").encode()
        proc = subprocess.run([sys.executable, "-m", "adakv_local", *argv], input=data, capture_output=True,
                              timeout=300, cwd=ROOT, env=env)
        err = proc.stderr.decode(errors="replace").replace(str(d), "DIR")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if "Traceback" in err:
            tracebacks = True
            shown = "TRACEBACK: " + lines[-1]
        elif proc.returncode == 0:
            shown = "(runs)"
            with contextlib.suppress(ValueError, KeyError):
                st = json.loads(proc.stdout)["stats"]
                shown = f"(runs) stats: n_ctx {st['n_ctx']}, budget {st['budget']}, compressed {st['compressed']}"
        else:
            shown = lines[-1] if lines else "(nothing)"
            if len(lines) > 1 and "--verbose" in argv:
                shown = f"{len(lines) - 1} lines of llama.cpp's log, then: {shown}"
            elif len(lines) > 1:
                shown = f"MORE THAN ONE LINE ({len(lines)}): {shown}"
        cmd = "adakv-local " + " ".join(a.replace(str(d), "DIR") for a in argv)
        if stdin == "elf":
            cmd = "head -c 2k libllama.so | " + cmd
        rows.append(f"| {what} | `{cell(cmd)}` | {proc.returncode} | {cell(shown)} |")
    return rows, tracebacks


def serve_cases() -> list[tuple[str, str, bytes]]:
    """(what, path, body) of the requests sent to `adakv-local serve` (tiny model, --n-ctx 1024)."""
    def chat(**kw: Any) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **kw}).encode()

    long = [{"role": "user", "content": "x" * 4300}]  # over the 4096-token trained context
    return [
        ("a good request", "/v1/chat/completions", chat()),
        ("max_tokens negative", "/v1/chat/completions", chat(max_tokens=-5)),
        ("same, streamed", "/v1/chat/completions", chat(max_tokens=-5, stream=True)),
        ("completions, max_tokens negative", "/v1/completions",
         json.dumps({"prompt": "hi", "max_tokens": -5}).encode()),
        ("model unknown", "/v1/chat/completions", chat(model="gpt-4o")),
        ("same, streamed", "/v1/chat/completions", chat(model="gpt-4o", stream=True)),
        ("conversation > trained context", "/v1/chat/completions", chat(messages=long)),
        ("same, streamed", "/v1/chat/completions", chat(messages=long, stream=True)),
        ("body not JSON", "/v1/chat/completions", b'{"messages": [{"role": "user"'),
        ("messages not a list", "/v1/chat/completions", json.dumps({"messages": "hello"}).encode()),
        ("role unknown", "/v1/chat/completions", json.dumps({"messages": [{"role": "boss", "content": "x"}]}).encode()),
        ("temperature a word", "/v1/chat/completions", chat(temperature="hot")),
        ("after all that, a good request", "/v1/chat/completions", chat()),
    ]


def run_serve(d: Path) -> list[str]:
    """One `adakv-local serve` (tiny model, --n-ctx 1024) and the requests of serve_cases, with urllib."""
    import socket
    import time
    import urllib.error
    import urllib.request

    from adakv_local.cli.serve import missing_server_modules

    rows = ["## Server: `adakv-local serve --model DIR/tiny.gguf --n-ctx 1024 --threads 1`", ""]
    if missing_server_modules():
        return [*rows, f"(not run: {', '.join(missing_server_modules())} not installed)"]
    rows += ["The answers of `adakv_local.server` (OpenAI's error object, as llama-cpp-python's server sends it); "
             "the server keeps serving after each.", "", "| case | request | status | answer |", "|---|---|---:|---|"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "adakv_local", "serve", "--model", str(d / "tiny.gguf"),
                             "--threads", "1", "--n-ctx", "1024", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/v1/models", timeout=2).close()
                break
            time.sleep(0.3)
        for what, path, body in serve_cases():
            req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    status, text = r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode()
            try:
                data = json.loads(text)
                shown = data["error"]["message"] if "error" in data else "(a completion)"
            except ValueError:
                shown = "(an event stream)" if text.startswith("data:") else text[:120]
            request = f"POST {path} {body.decode()}"
            rows.append(f"| {what} | `{cell(request[:150] + ('...' if len(request) > 150 else ''))}` | {status} | "
                        f"{cell(shown)} |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def write_inputs(d: Path) -> bytes:
    from adakv_local._lib import libllama_path
    from adakv_local.testing import write_llama_gguf, write_unknown_arch_gguf

    tiny = write_llama_gguf(d / "tiny.gguf", n_embd=256, n_head=4, n_head_kv=2, n_ff=256, seed=5)
    data = tiny.read_bytes()
    (d / "cut.gguf").write_bytes(data[: len(data) // 2])
    (d / "magic.gguf").write_bytes(b"GGML" + data[4:])
    (d / "empty.gguf").write_bytes(b"")
    write_unknown_arch_gguf(d / "arch.gguf")
    (d / "doc.md").write_text(f"# The lighthouse\n\n{DOC}\n")
    (d / "huge.txt").write_text(DOC * 7)
    (d / "empty.md").write_text("  \n")
    elf = libllama_path().read_bytes()[:2048]
    (d / "elf.bin").write_bytes(elf)
    (d / "latin1.txt").write_bytes("Café au lait, crème brûlée. ".encode("latin-1") * 20)
    (d / "utf16.txt").write_bytes("A note in UTF-16.".encode("utf-16"))
    (d / "controls.txt").write_bytes(bytes(range(1, 9)) * 40 + b"some words")
    return elf


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="adakv-bad-") as tmp:
        d = Path(tmp)
        elf = write_inputs(d)
        api = run_api(d)
        cli, tracebacks = run_cli(d, elf)
        cache = run_cache_ops(d)
        serve = run_serve(d)
    print(HEADER)
    print("\n".join(api))
    print()
    print("\n".join(cli))
    print()
    print("\n".join(cache))
    print()
    print("\n".join(serve))
    return 1 if tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
