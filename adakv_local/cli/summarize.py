"""``adakv-local summarize``: summarize a document with a compressed KV cache.

The document goes into the model's chat template, followed by a short instruction. While the prompt is
read, a progress bar runs on stderr; once it is read, the cache is compressed to the budget
(Ada-KV per-head eviction) and the summary is generated from the compressed cache, streamed to
stdout. A short stats block follows on stderr (``--json``: one JSON object on stdout instead).

Stats (also the keys of ``--json``'s ``stats``), measured right after the prompt was processed,
before the summary was generated:

- ``prompt_tokens``: tokens of the whole chat prompt (instruction + document + template).
- ``kv_cells_before``: cells per layer the cache held before this prompt's compression: the
  prompt's tokens on a first turn; on a later turn (``chat``, ``serve``) the compacted block of the
  earlier turns plus the new tokens.
- ``kv_cells_after``: cells per layer the cache holds after eviction. A cell stores one token for
  every KV head; heads keep different numbers of tokens (Ada-KV), and the compacted block packs
  each layer's kept tokens into the memory of its first cells (the footprint). ``kv_cells_kept_mean``
  is the average number of tokens a KV head actually kept.
- ``kv_bytes_before`` / ``kv_bytes_after``: those cells in bytes of K and V as the cache stores them
  (f16, q8_0, ...), from the native library's memory figures, sliding-window layers (iSWA models,
  never evicted) included with the cells they hold (with eviction their cache is a ring of about
  n_swa + a batch cells, swa_full off).
- ``footprint``: R, the cells of the compacted block (= ``kv_cells_after``; when nothing was
  compressed, the cells held).
- ``chunks`` / ``compressions``: a document longer than the cache is read in chunks with a
  compression between them (1 / 1 when it fits). ``peak_cells``: the most cells the cache held at
  once; ``kv_bytes_peak``: the bytes those held (sliding-window layers included);
  ``kv_bytes_allocated``: the bytes allocated for the whole cache (``n_ctx`` cells and the ring).
- ``prefill_tps``: prompt tokens per second of the prompt processing, eviction included;
  ``decode_tps``: generated tokens per second of wall time after the prompt.
- ``seconds``: ``allocate`` and ``compact``, eviction's own steps, and ``scored_ubatch``, the
  decodes of the ubatches that carried the window: prompt reading (part of ``prefill_seconds``) with
  the window's scores computed in their graph, whose own extra cost is a small part of it
  (``adakv-local bench --direct`` measures it); summed over the compressions.
- ``compressed``: whether anything was evicted; when not, ``reason`` says why (e.g. the budget
  exceeds the prompt; always with ``--method full``, which keeps every cell), else null.
- ``state_resumed_tokens`` / ``state_saved_bytes``: the tokens of a saved conversation state the
  request resumed from and the bytes of the state saved after it (``serve``'s saved conversations;
  0 here).
- also: ``prefill_tokens`` (prompt tokens evaluated, = prompt_tokens here), ``completion_tokens``,
  ``prefill_seconds``, ``decode_seconds``, ``method``, ``budget`` (in cells; null with ``--method full``), ``window``,
  ``n_ctx``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..progress import PrefillProgress
from ..prompts import Vocabulary, chat_formatter, summary_messages
from .common import decode_text
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError

DEFAULT_BUDGET = 256
_CTX_MARGIN = 16  # tokens left free beyond prompt + max tokens (llama-cpp-python wants a strict <)
_CTX_ROUND = 256
# the default cache with eviction: a longer document is read in chunks, compressed in between
DEFAULT_N_CTX = 4096

EPILOG = f"""examples:
  adakv-local summarize examples/ada-kv.md
  cat notes.txt | adakv-local summarize --max-tokens 128
  adakv-local summarize report.md --budget 0.1 --method snapkv
  adakv-local summarize report.md --json --quiet | jq .stats
  adakv-local summarize report.md --model ./my-model.gguf --gpu-layers 99

The default budget, {DEFAULT_BUDGET} cells per KV head, is of the order the Ada-KV paper evaluates
(128-2048 per head on long-document tasks, quality falling off gradually as the budget
shrinks): the cache of a 1k-4k-token document shrinks several times. Small models are
fragile: with SmolLM2-135M, summaries at budgets 256-1024 can drift off the document or loop
where the full cache's stay on topic; what was measured, and why (the instruction's attention
favours the document's end), is in docs/SELECTION.md. Raise the budget (or use a fraction such
as 0.2) if a summary degrades, and --repeat-penalty against loops. A prompt shorter than the
budget is not evicted at all; --method full keeps every cell.

The instruction comes after the document, so that the observation window (the prompt's last
--window tokens, whose attention decides what is kept) is the request to summarize.

A document longer than the cache (--n-ctx, by default what the document needs but at most
{DEFAULT_N_CTX} cells) is read in chunks: whenever the next chunk would not fit, the cache is
compressed to the budget, with the instruction evaluated after the chunk as a probe so that each
compression keeps what the summary needs. Memory is then set by --n-ctx, not by the document,
which can be as long as the model's trained context. --method full needs the whole document in
the cache.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "summarize", help="summarize a document, with the KV cache compressed after the prompt",
        description="Summarize a text or markdown document with the model's chat template. The KV cache is "
        "compressed with Ada-KV per-head eviction after the document is read; the summary is streamed to "
        "stdout, progress and stats go to stderr.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", nargs="?", default="-", metavar="FILE",
                   help="text or markdown file; - (the default) reads stdin")
    from .common import add_eviction_arguments, add_model_arguments

    add_model_arguments(
        p, n_ctx_default=None,
        n_ctx_help="KV cache size in cells (default: what the document needs: prompt + --max-tokens + a "
        f"margin, rounded up to a multiple of {_CTX_ROUND}, at most {DEFAULT_N_CTX} with eviction (a longer "
        "document is read in chunks) and at most the model's trained context; more needs "
        "--allow-context-overflow)",
        max_tokens_help="longest summary, in tokens (default: 256)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help='print one JSON object {"summary": ..., "stats": {...}} on stdout instead of streaming')
    out.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no stats on stderr")
    add_eviction_arguments(p, budget_default=DEFAULT_BUDGET)
    p.set_defaults(func=run)
    return p


def read_document(name: str) -> str:
    """The document as text; a missing, empty or binary one exits 1 with a message naming it."""
    label = "stdin" if name == "-" else name
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            data = Path(name).expanduser().read_bytes()
    except OSError as e:
        raise CLIError(f"cannot read {label}: {e.strerror or e}") from None
    text = decode_text(data, label).strip()
    if not text:
        raise CLIError(f"{label} is empty: nothing to summarize")
    return text




def count_prompt(model: Path, messages: list[dict[str, str]], args: argparse.Namespace
                 ) -> tuple[int, int | None, list[dict[str, str]]]:
    """(prompt tokens, trained context, messages), from the model's vocabulary alone (``vocab_only``: no
    weights, no context, no second load of the model) and its GGUF header.

    The prompt is rendered with the GGUF's chat template as llama-cpp-python renders it; without a
    template (llama-cpp-python then falls back to another format) it is estimated generously. A
    template that refuses a system message gets the messages without it.
    """
    from .common import llama_cpp_module, load_failure, model_info

    llama_cpp_module()
    n_train = model_info(model).n_ctx_train  # <arch>.context_length, as llama.cpp reads it
    try:
        tok = Vocabulary(str(model), verbose=args.verbose)
    except (ValueError, RuntimeError, OSError) as e:
        raise load_failure(model, e, args) from None
    try:
        fmt = chat_formatter(tok)
        if fmt is not None:
            try:
                prompt = fmt(messages=messages).prompt
            except Exception:  # e.g. "roles must alternate user/assistant"
                messages = messages[1:]
                try:
                    prompt = fmt(messages=messages).prompt
                except Exception as e:
                    raise CLIError(f"the chat template of {model.name} fails on a plain user message: {e}") from None
            n = len(tok.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
        else:
            n = sum(len(tok.tokenize(m["content"].encode("utf-8"), add_bos=False)) for m in messages) + 64
    finally:
        tok.close()
    return n, n_train, messages


def _too_long(prompt: int, max_tokens: int, limit: int, n_train: int | None, explicit: bool,
              allow_overflow: bool, chunked: bool = False) -> CLIError:
    """Why the prompt and summary do not fit in limit tokens, and the advice that can help in this case."""
    where = f"--n-ctx {limit}" if explicit else f"the {limit}-token context the model was trained for"
    ceiling = None if allow_overflow or not n_train else n_train  # the largest --n-ctx that is allowed
    want = prompt + max_tokens + 1  # llama-cpp-python wants prompt + max tokens < n_ctx
    split = "split the document" + ("" if chunked else " (or let eviction read it in chunks: drop --method full)")
    room = limit - prompt - 1  # the longest summary that fits
    if room >= 1:  # the prompt fits, the summary does not
        fix = f"use --max-tokens {room} or less"
        if explicit and (ceiling is None or limit < ceiling):
            fix += f", or --n-ctx {want if ceiling is None else min(want, ceiling)}"
        return CLIError(f"the document and its summary do not fit in {where}: the prompt is {prompt} tokens, "
                        f"+ {max_tokens} for the summary = {prompt + max_tokens}; {fix}")
    if explicit and (ceiling is None or prompt + 1 < ceiling):  # a larger --n-ctx can help
        if ceiling is None or want <= ceiling:
            fix = f"raise --n-ctx to at least {want}"
        else:
            fix = (f"raise --n-ctx to {ceiling} (the model's trained context) with --max-tokens "
                   f"{ceiling - prompt - 1} or less")
        return CLIError(f"the document is too long for {where}: its prompt alone is {prompt} tokens; {fix}, or {split}")
    trained = f" (the model was trained for {n_train})" if explicit and n_train else ""
    return CLIError(f"the document is too long for {where}{trained}: its prompt alone is {prompt} tokens; shorten "
                    f"or {split}")


def choose_n_ctx(prompt: int, max_tokens: int, n_train: int | None, n_ctx: int | None,
                 allow_overflow: bool = False, chunked: bool = False) -> int:
    """--n-ctx if given and large enough, else what the prompt and summary need, at most the trained context.

    chunked: eviction is on, so a prompt longer than the cache is read in chunks: only the positions
    (prompt + summary) must stay within the trained context, and the default cache is at most
    DEFAULT_N_CTX cells.
    """
    need = prompt + max_tokens  # llama-cpp-python wants need < n_ctx
    if chunked and n_train and need >= n_train and (n_ctx is None or n_ctx < need or not allow_overflow):
        raise _too_long(prompt, max_tokens, n_train, n_train, False, False, chunked=True)
    if n_ctx is not None:
        if need >= n_ctx and not chunked:
            raise _too_long(prompt, max_tokens, n_ctx, n_train, True, allow_overflow)
        return n_ctx
    ceiling = None if allow_overflow or not n_train else n_train
    if ceiling is not None and need >= ceiling:
        raise _too_long(prompt, max_tokens, ceiling, n_train, False, allow_overflow)
    size = -(-(need + _CTX_MARGIN) // _CTX_ROUND) * _CTX_ROUND
    if chunked:
        size = min(size, DEFAULT_N_CTX)
    return size if ceiling is None else min(size, ceiling)


def run(args: argparse.Namespace) -> int:
    from .common import (
        check_n_ctx,
        config_from_args,
        format_stats,
        load_llama,
        model_info,
        request_stats,
        resolve_model_arg,
    )

    cfg = config_from_args(args)
    text = read_document(args.file)
    model = resolve_model_arg(args.model, quiet=args.quiet)
    check_n_ctx(args.n_ctx, model, model_info(model).n_ctx_train, args)
    messages = summary_messages(text)
    prompt_tokens, n_train, messages = count_prompt(model, messages, args)
    n_ctx = choose_n_ctx(prompt_tokens, args.max_tokens, n_train, args.n_ctx, args.allow_context_overflow,
                         chunked=cfg.method != "full")
    llm = load_llama(model, cfg, args, n_ctx)
    try:
        progress = PrefillProgress("reading the document", enabled=not args.quiet)
        llm.progress_callback = progress
        llm.meter.on_prefill_done = progress.finish
        summary = _generate(llm, messages, args, progress)
        stats = request_stats(llm, cfg)
        stats["n_ctx"] = n_ctx
    finally:
        llm.close()
    if args.json:
        print(json.dumps({"summary": summary, "stats": stats}, indent=2))
    elif not args.quiet:
        for line in format_stats(stats):
            print(f"[adakv-local] {line}", file=sys.stderr)
    return EXIT_OK


def _generate(llm: Any, messages: list[dict[str, str]], args: argparse.Namespace, progress: PrefillProgress) -> str:
    from .common import sampling_kwargs

    parts: list[str] = []
    llm.meter.reset()
    progress.start()
    try:
        chunks = llm.create_chat_completion(messages=messages, max_tokens=args.max_tokens,
                                            stream=True, **sampling_kwargs(args))
        for chunk in chunks:
            piece = chunk["choices"][0]["delta"].get("content") or ""
            if not piece:
                continue
            if not parts:  # the reply's leading whitespace
                progress.finish()
                piece = piece.lstrip()
                if not piece:
                    continue
            parts.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except ValueError as e:
        if "exceed context window" in str(e):  # our count was off (a chat format without a template)
            raise CLIError(f"the document is too long for the {llm.n_ctx()}-token context: {e}; use a larger "
                           "--n-ctx, a smaller --max-tokens or split the document", EXIT_FAILURE) from None
        if str(e).startswith("n_ctx = "):  # too small a cache for the budget to read the document in chunks
            msg = str(e).replace("n_ctx", "--n-ctx").replace("adakv_max_ratio", "--max-ratio")
            raise CLIError(msg.replace("a smaller budget", "a smaller --budget"), EXIT_USAGE) from None
        raise CLIError(f"generation failed: {e}") from None  # e.g. the chat template's checks
    except RuntimeError as e:
        raise CLIError(f"generation failed: {e}") from None
    finally:
        progress.finish()
    if not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return "".join(parts)
