"""``adakv-local eval fidelity|tasks`` and ``adakv-local bench``: the commands behind docs/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..policies import METHODS
from .common import eviction_flag, non_negative_int, positive_int, resolve_model_arg, thread_counts, threads_help
from .errors import EXIT_OK, EXIT_USAGE, CLIError

_EPILOG_FIDELITY = """examples:
  adakv-local eval fidelity --model smollm2-135m --methods ada-snapkv,snapkv --budgets 64,128,256 \\
      --json fidelity.json --plot fidelity.png
  adakv-local eval fidelity --prompts my-docs/ --budgets 128 --json out.json
  adakv-local eval fidelity --instructions --methods ada-snapkv --budgets 256,512,1024 --prompt-tokens 4000 \\
      --json answers.json

--instructions: the prompts are real documents installed on this machine (licenses, Python's
documentation, man pages, tables; `adakv_local.eval.corpus`), each followed in the chat template by
"Summarize the document above in a few sentences." and by a question about it (--questions 3: by
each of its three questions); the full cache's greedy answer (at most --continuation tokens) is
what is teacher-forced (docs/SELECTION.md).
"""

_EPILOG_TASKS = """examples:
  adakv-local eval tasks --model smollm2-135m --tasks passkey --lengths 3000 --budgets 128 --json tasks.json
  adakv-local eval tasks --model gemma3-270m --mode raw --tasks passkey,needle --lengths 4000,7000
"""

_EPILOG_BENCH = """examples:
  adakv-local bench --model smollm2-135m --lengths 1000,4000,8000 --budget 256 --json bench.json --plot bench.png
  adakv-local bench --lengths 4000,8000 --repeats 3 --decode-tokens 16       # compression overhead, medians
  adakv-local bench --model gemma3-270m --lengths 24000 --n-ctx 4096         # chunked prefill, per chunk
  adakv-local bench --interleave 11 --lengths 8000 --layouts rect,pooled --attn-paths auto,mask  # decode A/B

The compression overhead is the eviction prefill's time (the window's scores, allocation and
compaction included; chunks and their probes too) over the full cache's prefill of the same
prompt in one batch sequence, run just before it in the same process, minus 1; in wall time
and in process CPU time (with --threads 1 the CPU time is the work done, which the load of a
shared machine disturbs far less than the wall time).

--interleave ROUNDS compares decode speeds a few percent apart: the full cache and every eviction
mode (--attn-paths x --layouts) each read the prompt once in a context of their own, all held at
once; then, round after round, each decodes the same --decode-tokens tokens (rotating which goes
first) and forgets them. Printed: per mode the median tokens/s and the median of the per-round
ratios to the full cache (and pooled over rect, where both layouts ran with the same path).
"""


def _names_arg(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of names out of ``allowed``."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{option}: {', '.join(bad) or 'empty list'}: use a comma-separated list "
                                         f"of {', '.join(allowed)}")
    return items


def _attn_paths_arg(text: str) -> list[str]:
    """--attn-paths: a comma-separated list of bench.ATTN_PATHS."""
    from ..eval.bench import ATTN_PATHS

    return _names_arg(text, "--attn-paths", ATTN_PATHS)


def _layouts_arg(text: str) -> list[str]:
    """--layouts: a comma-separated list of bench.LAYOUTS."""
    from ..eval.bench import LAYOUTS

    return _names_arg(text, "--layouts", LAYOUTS)


def _csv(kind: Any, name: str):
    def parse(text: str) -> list[Any]:
        try:
            items = [kind(x) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{name}: not a comma-separated list of numbers: {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return items

    return parse


def _methods(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [m for m in items if m not in METHODS or m == "full"]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from "
                                         f"{', '.join(m for m in METHODS if m != 'full')}")
    return items


def _selection_flags(p: argparse.ArgumentParser) -> None:
    from ..config import GQA_REDUCTIONS
    from ..spans import SPAN_MODES

    eviction_flag(p, "spans", dest="spans", choices=SPAN_MODES, metavar=None)
    eviction_flag(p, "span_share", dest="span_share", type=_span_share_arg)
    eviction_flag(p, "gqa", dest="gqa", choices=GQA_REDUCTIONS, metavar=None)


def _span_share_arg(text: str) -> float:
    """--span-share, checked by AdaKVConfig's own rule for the option."""
    from ..config import AdaKVConfig

    try:
        return AdaKVConfig(budget=64, span_share=float(text)).span_share
    except ValueError as e:  # ConfigError (a ValueError) names the rule; float() says only "could not convert"
        raise argparse.ArgumentTypeError(getattr(e, "reason", f"not a number: {text!r}")) from None


def _selection_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options spans, span_share and gqa as AdaKVConfig takes them."""
    return {"spans": args.spans, "span_share": args.span_share, "gqa": args.gqa}


def _budget_and_method(p: argparse.ArgumentParser) -> None:
    """--budget (a whole number of cells here, 256 by default) and --method (an eviction method: not full)."""
    eviction_flag(p, "budget", dest="budget", type=positive_int, default=256)
    methods = [m for m in METHODS if m != "full"]
    eviction_flag(p, "method", dest="method", choices=methods, default="ada-snapkv", metavar=None,
                  help=f"allocation method: {', '.join(methods)}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="smollm2-135m", metavar="NAME|PATH",
                   help="a GGUF file or a registry name (default: smollm2-135m)")
    p.add_argument("--threads", "-t", type=positive_int, default=thread_counts(None)[0], metavar="N",
                   help=threads_help(measuring=True))
    p.add_argument("--gpu-layers", type=non_negative_int, default=0, metavar="N", help="layers on a GPU (default 0)")
    p.add_argument("--json", dest="json_out", type=Path, default=None, metavar="OUT",
                   help="write all records as JSON to OUT ('-' for stdout)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="draw a plot (needs matplotlib)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def add_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="measure fidelity to the full cache and accuracy on long-context tasks",
                        description="Evaluations behind docs/RESULTS.md.")
    esub = ev.add_subparsers(dest="eval_command", metavar="KIND")
    esub.required = True

    f = esub.add_parser(
        "fidelity", help="teacher-forced KL and top-1 agreement against the full cache",
        description="For every prompt, the full cache's greedy continuation is teacher-forced after the "
        "compressed prompt of every (method, budget); records KL(full || compressed) per position (mean, max) "
        "and top-1 agreement. Default prompts: standard-library documentation (prose shipped with Python).",
        epilog=_EPILOG_FIDELITY, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(f)
    f.add_argument("--methods", type=_methods, default=["ada-snapkv", "snapkv", "ada-pyramid", "pyramidkv"],
                   help="comma-separated methods (default: ada-snapkv,snapkv,ada-pyramid,pyramidkv)")
    f.add_argument("--budgets", type=_csv(positive_int, "--budgets"), default=[64, 128, 256],
                   help="comma-separated budgets in cells per KV head (default: 64,128,256)")
    f.add_argument("--prompts", type=Path, default=None, metavar="FILE|DIR",
                   help="a text file, or a folder of .txt/.md files, one prompt each (default: built-in)")
    f.add_argument("--n-prompts", type=positive_int, default=10, metavar="N",
                   help="built-in prompts to use (default: 10)")
    f.add_argument("--prompt-tokens", type=positive_int, default=2000, metavar="N",
                   help="prompt length in tokens (built-in prompts; files are cut there) (default: 2000)")
    f.add_argument("--continuation", type=positive_int, default=64, metavar="N",
                   help="teacher-forced tokens after the prompt (default: 64)")
    eviction_flag(f, "window", dest="window", type=positive_int)
    eviction_flag(f, "kernel", dest="kernel", type=positive_int)
    _selection_flags(f)
    f.add_argument("--instructions", action="store_true",
                   help="answers to instructions after real documents instead of raw-text continuations: a summary "
                   "and a question per document (in the model's chat template if it has one), documents cut to at "
                   "most --prompt-tokens (those with fewer than 3/4 of it left out), the full cache's answer of at "
                   "most --continuation tokens teacher-forced")
    f.add_argument("--documents", default=None, metavar="NAMES",
                   help="with --instructions: comma-separated document names (default: all found here)")
    f.add_argument("--questions", type=positive_int, default=None, metavar="N",
                   help="with --instructions: ask up to N of each document's questions (the corpus has 3 for "
                   "each document long enough; default: 1)")
    f.set_defaults(func=_cmd_fidelity)

    c = esub.add_parser(
        "chunked", help="chunked prefill (a cache smaller than the prompt) against one-shot eviction",
        description="For every prompt, the full cache's greedy continuation is teacher-forced after the prompt "
        "compressed once (one-shot, the cache holds the prompt) and after the prompt read in chunks through a "
        "cache of --n-ctx cells; KL to the full cache, top-1 agreement, footprint R, peak cells and KV bytes.",
        epilog="example (docs/RESULTS.md):\n  adakv-local eval chunked --model smollm2-135m --prompt-tokens 7000 "
        "--n-prompts 8 --n-ctx 2048 --chunk 1024 --budget 256 --json chunked.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(c)
    c.add_argument("--n-prompts", type=positive_int, default=8, metavar="N",
                   help="prompts cut from the standard library's documentation read as one stream (default: 8)")
    c.add_argument("--prompt-tokens", type=positive_int, default=7000, metavar="N",
                   help="prompt length in tokens (default: 7000)")
    c.add_argument("--n-ctx", type=positive_int, default=2048, metavar="N",
                   help="the chunked run's cache, below --prompt-tokens (default: 2048)")
    eviction_flag(c, "chunk", dest="chunk", type=positive_int, default=1024)
    _budget_and_method(c)
    c.add_argument("--continuation", type=positive_int, default=64, metavar="N",
                   help="teacher-forced tokens after the prompt (default: 64)")
    c.set_defaults(func=_cmd_chunked)

    t = esub.add_parser(
        "tasks", help="synthetic long-context tasks: passkey, needle, multi-key needle, variable tracking",
        description="Generates seeded synthetic tasks locally and answers each with the full cache and with every "
        "(method, budget); accuracy per setting. Chat mode uses the model's chat template (instruct models), raw "
        "mode a completion prompt (base models such as gemma3-270m).",
        epilog=_EPILOG_TASKS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(t)
    t.add_argument("--tasks", default="passkey", metavar="LIST",
                   help="comma-separated: passkey, needle, multikey, vartrack (default: passkey)")
    t.add_argument("--lengths", type=_csv(positive_int, "--lengths"), default=[3000],
                   help="prompt lengths in tokens (default: 3000)")
    t.add_argument("--depths", type=_csv(float, "--depths"), default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="needle depths, fractions of the prompt (default: 0.1,0.3,0.5,0.7,0.9)")
    t.add_argument("--methods", type=_methods, default=["ada-snapkv", "snapkv"],
                   help="comma-separated methods (default: ada-snapkv,snapkv)")
    t.add_argument("--budgets", type=_csv(positive_int, "--budgets"), default=[128],
                   help="comma-separated budgets (default: 128)")
    t.add_argument("--mode", choices=["chat", "raw"], default="chat", help="prompt format (default: chat)")
    t.add_argument("--samples", type=positive_int, default=1, metavar="N",
                   help="samples per (task, length, depth), seeds seed..seed+N-1 (default: 1)")
    t.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="first seed (default: 0)")
    eviction_flag(t, "window", dest="window", type=positive_int)
    eviction_flag(t, "kernel", dest="kernel", type=positive_int)
    _selection_flags(t)
    t.set_defaults(func=_cmd_tasks)


def add_bench_parser(sub: Any) -> None:
    """The top-level ``bench`` command (registered by the CLI's main module; it shares this module's options)."""
    b = sub.add_parser(
        "bench", help="prefill and decode speed, full cache vs eviction, in the same run",
        description="At every prompt length: full cache, then eviction, same model and threads; prints the "
        "ratios. Compression overhead: the eviction prefill's time over the full cache's, minus 1.",
        epilog=_EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(b)
    b.add_argument("--lengths", type=_csv(positive_int, "--lengths"), default=[1000, 4000, 8000],
                   help="prompt lengths in tokens (default: 1000,4000,8000)")
    _budget_and_method(b)
    b.add_argument("--decode-tokens", type=positive_int, default=64, metavar="N",
                   help="greedy tokens decoded after the prompt (default: 64)")
    b.add_argument("--attn-paths", type=_attn_paths_arg, default=["auto"],
                   help="one eviction run per way of honouring the start cells, e.g. auto,mask,heads: auto (the "
                   "best the backend has: inside the kernel on the CPU), mask (a per-head mask on the stock "
                   "kernel, Metal's path), heads (one stock call per KV head) (default: auto)")
    b.add_argument("--layouts", type=_layouts_arg, default=["pooled"],
                   help="one eviction run per layout of the compacted block, e.g. pooled,rect: pooled (each "
                   "head's kept tokens packed: the block costs the sum of the per-head budgets), rect (as "
                   "wide as the largest head in every head, the layout before 2026-12-06) (default: pooled)")
    b.add_argument("--repeats", type=positive_int, default=1, metavar="N",
                   help="alternate the full cache and eviction N times per length; overheads are medians (default: 1)")
    b.add_argument("--direct", type=non_negative_int, default=0, metavar="N",
                   help="also measure eviction's extra work where it arises: the prompt's last ubatch with and "
                   "without scoring + allocation + compaction, from one saved state, N times each (default: 0, off)")
    b.add_argument("--n-ctx", type=positive_int, default=None, metavar="N",
                   help="eviction's cache size; below the prompt length the prompt is read in chunks (default: the "
                   "prompt fits)")
    eviction_flag(b, "chunk", dest="chunk", type=positive_int,
                  help="with --n-ctx: at most C prompt tokens per chunk; None: as many as fit")
    b.add_argument("--interleave", type=positive_int, default=None, metavar="ROUNDS",
                   help="decode speed only, interleaved: every mode (the full cache, each --attn-paths x --layouts "
                   "eviction run) in a context of its own, decoding the same tokens in turn for ROUNDS rounds; "
                   "ratios within each round, medians (default: off)")
    b.add_argument("--nofa-baseline", action="store_true",
                   help="also time the full cache without flash attention (llama.cpp's other attention path; "
                   "eviction always uses flash attention)")
    b.set_defaults(func=_cmd_bench)


def _log(args: argparse.Namespace):
    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    return log


def _open_model(args: argparse.Namespace) -> tuple[Path, Any]:
    """--model, checked and loaded vocabulary-only (a model llama.cpp refuses exits 1 here, not mid-run)."""
    from ..llama import Llama

    model = resolve_model_arg(args.model, quiet=args.quiet)
    try:
        return model, Llama(model_path=str(model), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError) as e:
        raise CLIError(f"cannot load model {model}: {e}") from None


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --plot, checked before a run that may take hours rather than after it (exit 2; 1 without
    matplotlib)."""
    for flag, path in (("--json", args.json_out), ("--plot", args.plot)):
        if path is None or (flag == "--json" and str(path) == "-"):
            continue
        path = path.expanduser()
        if path.is_dir():
            raise CLIError(f"{flag}: {path} is a directory; give a file name", EXIT_USAGE)
        if not path.parent.is_dir():
            raise CLIError(f"{flag}: the folder {path.parent} does not exist", EXIT_USAGE)
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CLIError(f"{flag}: {path} is not writable", EXIT_USAGE)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install 'adakv-local[plot]', or leave --plot out") from None


def _json_safe(x: Any) -> Any:
    """x with every infinite or NaN float as None (span_share inf: no limit), so that the JSON is strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    text = json.dumps(_json_safe(payload), indent=1, allow_nan=False)
    if str(path) == "-":
        print(text)
        return
    try:
        path.expanduser().write_text(text + "\n")
    except OSError as e:
        raise CLIError(f"--json: cannot write {path}: {e.strerror or e}") from None


def _plot(draw: Any, data: Any, path: Path, title: str) -> None:
    try:
        draw(data, path.expanduser(), title)
    except (OSError, RuntimeError) as e:
        raise CLIError(f"--plot: cannot draw {path}: {e}") from None


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from ..eval.evaluate import builtin_prompts, compare_pairs, file_prompts, plot_fidelity, run_fidelity, summarize

    if args.window >= min(args.budgets):
        raise CLIError(f"--budgets: every budget must exceed the window ({args.window})", EXIT_USAGE)
    _check_outputs(args)
    if args.instructions:
        return _instruction_fidelity(args)
    for flag, value in (("--documents", args.documents), ("--questions", args.questions)):
        if value is not None:
            raise CLIError(f"{flag} needs --instructions", EXIT_USAGE)
    model, vocab = _open_model(args)
    try:
        if args.prompts is not None:
            if not args.prompts.exists():
                raise CLIError(f"--prompts: {args.prompts} does not exist")
            prompts = file_prompts(vocab, args.prompts, args.prompt_tokens)
        else:
            prompts = builtin_prompts(vocab, args.n_prompts, args.prompt_tokens)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    log = _log(args)
    log(f"fidelity: {len(prompts)} prompts x {len(args.methods)} methods x {len(args.budgets)} budgets on {model.name}")
    records = run_fidelity(str(model), prompts, args.methods, args.budgets, window=args.window, kernel=args.kernel,
                           n_continuation=args.continuation, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                           progress=lambda d, t, m: log(f"[{d}/{t}] {m}"), options=_selection_options(args))
    summary, pairs = summarize(records), compare_pairs(records)
    summary_l1, pairs_l1 = summarize(records, "l1_attn"), compare_pairs(records, "l1_attn")
    for r, r1 in zip(summary, summary_l1):
        cost = (f", R {r['footprint']:.0f} cells" if "footprint" in r else "") + (
            f", KV {r['kv_bytes'] / 2**20:.1f} MiB" if "kv_bytes" in r else "")
        log(f"{r['method']:>12} @ {r['budget']:>5}: KL {r['kl_mean']:.4f} +- {r['kl_mean_ci95']:.4f}, "
            f"top-1 {100 * r['top1']:.1f}%, attention L1 {r1['l1_attn']:.4f}{cost}")
    for r, r1 in zip(pairs, pairs_l1):
        log(f"{r['ada']} vs {r['baseline']} @ {r['budget']}: KL ratio {r['ratio']:.3f}, "
            f"Ada wins {r['ada_wins']}/{r['n']}; attention L1 ratio {r1['ratio']:.3f}, "
            f"Ada wins {r1['ada_wins']}/{r1['n']}")
    config = {"model": str(model), "methods": args.methods, "budgets": args.budgets, "window": args.window,
              "kernel": args.kernel, **_selection_options(args), "continuation": args.continuation,
              "prompt_tokens": args.prompt_tokens,
              "prompts": [name for name, _ in prompts], "threads": args.threads}
    _write_json(args.json_out, {"records": records, "summary": summary, "pairs": pairs, "summary_l1_attn": summary_l1,
                                "pairs_l1_attn": pairs_l1, "config": config})
    if args.plot:
        _plot(plot_fidelity, records, args.plot, f"{model.name}: fidelity to the full cache")
    return EXIT_OK


def _instruction_fidelity(args: argparse.Namespace) -> int:
    from ..eval.corpus import find_documents
    from ..eval.instruct import build_prompts, paired, run_instruction_fidelity, summarize

    if args.prompts is not None:
        raise CLIError("--prompts and --instructions: choose one (--instructions reads installed documents)",
                       EXIT_USAGE)
    if args.plot is not None:
        raise CLIError("--plot draws raw-text fidelity only; leave it out with --instructions", EXIT_USAGE)
    if args.continuation < 2:
        raise CLIError("--continuation: the answer needs at least 2 tokens", EXIT_USAGE)
    questions = args.questions or 1  # None: not given (refused without --instructions)
    names = None if args.documents is None else [x.strip() for x in args.documents.split(",") if x.strip()]
    try:
        docs, missing = find_documents(names)
    except ValueError as e:
        raise CLIError(f"--documents: {e}", EXIT_USAGE) from None
    log = _log(args)
    for m in missing:
        log(f"left out {m.name}: {m.reason}")
    model, vocab = _open_model(args)
    # the model's chat template when it has one (instruct models), else a plain completion prompt
    mode = "chat" if vocab.metadata.get("tokenizer.chat_template") else "raw"
    try:
        prompts = build_prompts(vocab, docs, mode=mode, max_doc_tokens=args.prompt_tokens,
                                min_doc_tokens=args.prompt_tokens * 3 // 4, questions=questions)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    finally:
        vocab.close()
    if not prompts:
        raise CLIError(f"no document of at least {args.prompt_tokens * 3 // 4} tokens found; lower --prompt-tokens "
                       "or name other --documents")
    settings = [(m, {"method": m, "kernel": args.kernel, **_selection_options(args)}) for m in args.methods]
    log(f"instruction fidelity ({mode}): {len(prompts)} prompts ({len({p.document for p in prompts})} documents) x "
        f"{len(settings)} methods x {len(args.budgets)} budgets on {model.name}")
    records, answers = run_instruction_fidelity(
        str(model), prompts, settings, args.budgets, window=args.window, max_answer=args.continuation,
        n_threads=args.threads, n_gpu_layers=args.gpu_layers, progress=lambda d, t, m: log(f"[{d}/{t}] {m}"))
    summary = summarize(records)
    for r in summary:
        log(f"{r['task']:>8} {r['setting']:>12} @ {r['budget']:>5}: KL {r['kl_mean']:.4f} +- {r['kl_mean_ci95']:.4f}, "
            f"top-1 {100 * r['top1']:.1f}% (n={r['n']})")
    pairs = [q for ada, base in (("ada-snapkv", "snapkv"), ("ada-pyramid", "pyramidkv"))
             if ada in args.methods and base in args.methods for q in paired(records, ada, base)]
    for q in pairs:
        log(f"{q['task']:>8} {q['a']} vs {q['b']} @ {q['budget']}: KL ratio {q['ratio']:.3f}, lower on "
            f"{q['a_wins']}/{q['n']}, sign test p {q['sign_p']:.3f}")
    config = {"model": str(model), "instructions": True, "mode": mode, "methods": args.methods, "budgets": args.budgets,
              "window": args.window, "kernel": args.kernel, **_selection_options(args), "max_answer": args.continuation,
              "max_doc_tokens": args.prompt_tokens, "questions": questions,
              "documents": {d.name: d.source for d in docs}, "missing": [m.name for m in missing],
              "threads": args.threads}
    _write_json(args.json_out, {"records": records, "answers": answers, "summary": summary, "pairs": pairs,
                                "config": config})
    return EXIT_OK


def _cmd_chunked(args: argparse.Namespace) -> int:
    from ..config import AdaKVConfig
    from ..eval.chunked import run_chunked_fidelity, stream_prompts, summarize_chunked

    if args.n_ctx >= args.prompt_tokens:
        raise CLIError(f"--n-ctx ({args.n_ctx}) must be below --prompt-tokens ({args.prompt_tokens})", EXIT_USAGE)
    _check_outputs(args)
    model, vocab = _open_model(args)
    try:
        prompts = stream_prompts(vocab, args.n_prompts, args.prompt_tokens)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    finally:
        vocab.close()
    try:
        cfg = AdaKVConfig(budget=args.budget, method=args.method)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    log = _log(args)
    log(f"chunked: {len(prompts)} prompts of {args.prompt_tokens} tokens on {model.name}, budget {args.budget}, "
        f"cache {args.n_ctx} cells, chunks of {args.chunk}")
    try:
        records = run_chunked_fidelity(str(model), prompts, cfg, n_ctx=args.n_ctx, chunk=args.chunk,
                                       n_continuation=args.continuation, n_threads=args.threads,
                                       n_gpu_layers=args.gpu_layers, progress=lambda d, t, m: log(f"[{d}/{t}] {m}"))
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    summary = summarize_chunked(records)
    for mode in ("one-shot", "chunked"):
        r = summary[mode]
        peak, alloc = r["kv_bytes_peak"] / 2**20, r["kv_bytes_allocated"] / 2**20
        log(f"{mode:>8}: KL {r['kl_mean']:.4f}, top-1 {100 * r['top1']:.1f}%, R {r['footprint']:.0f}, peak "
            f"{r['peak_cells']:.0f} cells, {peak:.1f} MiB peak of {alloc:.1f} MiB allocated")
    log(f"chunked / one-shot mean KL: {summary['kl_ratio']:.3f}")
    config = {"model": str(model), "budget": args.budget, "method": args.method, "n_ctx": args.n_ctx,
              "chunk": args.chunk, "prompt_tokens": args.prompt_tokens, "continuation": args.continuation,
              "prompts": [name for name, _ in prompts], "threads": args.threads}
    _write_json(args.json_out, {"records": records, "summary": summary, "config": config})
    return EXIT_OK


def _cmd_tasks(args: argparse.Namespace) -> int:
    from ..eval.tasks import TASKS, run_tasks, summarize

    tasks = [x.strip() for x in args.tasks.split(",") if x.strip()]
    bad = [x for x in tasks if x not in TASKS]
    if bad or not tasks:
        raise CLIError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}",
                       EXIT_USAGE)
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise CLIError("--depths: every depth must be in [0, 1]", EXIT_USAGE)
    _check_outputs(args)
    model, vocab = _open_model(args)
    vocab.close()
    settings: list[tuple[str, int | None]] = [("full", None)]
    settings += [(m, b) for m in args.methods for b in args.budgets]
    log = _log(args)

    def progress(done: int, total: int, rec: dict[str, Any]) -> None:
        mark = "ok " if rec["correct"] else "MISS"
        log(f"[{done}/{total}] {mark} {rec['task']} {rec['method']}@{rec['budget']} len {rec['length']} "
            f"depth {rec['depth']:.2f}: {rec['output'].strip()[:40]!r}")

    try:
        records = run_tasks(str(model), tasks=tasks, lengths=args.lengths, depths=args.depths,
                            methods_budgets=settings, mode=args.mode, n_samples=args.samples, seed=args.seed,
                            n_threads=args.threads, n_gpu_layers=args.gpu_layers, window=args.window,
                            kernel=args.kernel, options=_selection_options(args), progress=progress)
    except ValueError as e:  # e.g. a length too short for a task: names the parameter
        raise CLIError(str(e), EXIT_USAGE) from None
    summary = summarize(records)
    for r in summary:
        log(f"{r['task']:>9} {r['method']:>12} @ {str(r['budget']):>5} len {r['length']}: "
            f"{r['correct']}/{r['n']} ({100 * r['accuracy']:.0f}%)")
    config = {"model": str(model), "tasks": tasks, "lengths": args.lengths, "depths": args.depths,
              "settings": settings, "mode": args.mode, "samples": args.samples, "seed": args.seed,
              "window": args.window, "kernel": args.kernel, **_selection_options(args)}
    _write_json(args.json_out, {"records": records, "summary": summary, "config": config})
    if args.plot:
        from ..eval.evaluate import plot_tasks

        _plot(plot_tasks, summary, args.plot, f"{model.name}: long-context tasks ({args.mode})")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..eval.bench import overhead_summary, plot_bench, run

    if args.budget >= min(args.lengths):
        raise CLIError(f"--budget ({args.budget}) must be below every prompt length", EXIT_USAGE)
    _check_outputs(args)
    if args.interleave is not None:
        return _bench_interleaved(args)
    model, vocab = _open_model(args)
    vocab.close()
    records = run(str(model), args.lengths, budget=args.budget, method=args.method, n_decode=args.decode_tokens,
                  n_threads=args.threads, n_gpu_layers=args.gpu_layers, nofa_baseline=args.nofa_baseline,
                  attn_paths=args.attn_paths, repeats=args.repeats, n_ctx=args.n_ctx, chunk=args.chunk,
                  direct=args.direct, layouts=args.layouts,
                  log=_log(args))
    cpu = overhead_summary(records, "overhead_cpu_share")
    for (mode, n), share in sorted(overhead_summary(records).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        _log(args)(f"compression overhead, {mode} at {n} tokens: {100 * share:+.2f}% of the full cache's prefill "
                   f"time, {100 * cpu[(mode, n)]:+.2f}% of its CPU time (medians of {args.repeats})")
    config = _bench_config(args, model, nofa_baseline=args.nofa_baseline, repeats=args.repeats, n_ctx=args.n_ctx,
                           chunk=args.chunk, direct=args.direct)
    _write_json(args.json_out, {"records": records, "config": config})
    if args.plot:
        _plot(plot_bench, records, args.plot, f"{model.name}: decode speed, {args.threads} threads")
    return EXIT_OK


def _bench_config(args: argparse.Namespace, model: Path, **mode: Any) -> dict[str, Any]:
    """The options of a bench run, for its JSON: those every mode has, then ``mode``'s own."""
    return {"model": str(model), "lengths": args.lengths, "budget": args.budget, "method": args.method,
            "decode_tokens": args.decode_tokens, "threads": args.threads, "gpu_layers": args.gpu_layers,
            "attn_paths": args.attn_paths, "layouts": args.layouts, **mode}


def _bench_interleaved(args: argparse.Namespace) -> int:
    """``bench --interleave ROUNDS``: decode speeds of all modes, round after round in one process."""
    from ..eval.bench import interleave

    other = [flag for flag, on in (("--repeats", args.repeats != 1), ("--direct", args.direct), ("--n-ctx", args.n_ctx),
                                   ("--chunk", args.chunk is not None), ("--nofa-baseline", args.nofa_baseline),
                                   ("--plot", args.plot is not None)) if on]
    if other:
        raise CLIError(f"--interleave measures decode speed only; leave out {', '.join(other)}", EXIT_USAGE)
    model, vocab = _open_model(args)
    vocab.close()
    log = _log(args)
    records = interleave(str(model), args.lengths, budget=args.budget, rounds=args.interleave, method=args.method,
                         n_decode=args.decode_tokens, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                         attn_paths=args.attn_paths, layouts=args.layouts, log=log)
    for r in records:
        pr = r.get("pooled_over_rect_rounds")
        pooled = (f"; pooled / rect x{r['pooled_over_rect']:.3f} (x{min(pr):.2f}-x{max(pr):.2f}, pooled faster in "
                  f"{sum(x > 1 for x in pr)} of {len(pr)} rounds)" if pr else "")
        log(f"{r['prompt_tokens']:>6} tokens {r['mode']:<24} decode {r['decode_tps']:7.1f} t/s (median), "
            f"x{r['decode_speedup']:.3f} of the full cache (median of {args.interleave} per-round ratios), "
            f"{r['kv_cells_after']} cells, route {r['route']}{pooled}")
    _write_json(args.json_out, {"records": records, "config": _bench_config(args, model, interleave=args.interleave)})
    return EXIT_OK
