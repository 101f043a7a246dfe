"""What the ``summarize`` and ``chat`` commands share: model options, loading, measuring, stats.

Nothing here imports llama_cpp at import time, so that ``--help`` stays fast and works without
the native library.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any

from ..config import OPTIONS, AdaKVConfig, ConfigError, option, whole_number
from ..gguf_check import GGUFFileError, GGUFInfo, check_gguf
from ..metering import Meter, metered_class, request_stats  # noqa: F401 (the CLI's measured Llama)
from .errors import EXIT_FAILURE, EXIT_USAGE, CLIError

DEFAULT_MODEL = "smollm2-135m"
_MIB = 1 << 20


# -- options ----------------------------------------------------------------------------------------


def _int_at_least(lowest: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def available_cpus() -> int:
    """The logical CPUs this process may run on (its affinity mask where the OS has one, e.g. under taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def thread_counts(threads: int | None, cpus: int | None = None) -> tuple[int, int]:
    """(n_threads, n_threads_batch) for the model: --threads N for both, else llama-cpp-python's own
    defaults (its Llama's): half the logical CPUs, at least 1, for generating, all of them for prompts.

    Why not all for generating: ggml's worker threads spin while they wait for each other, and a decoded
    token is many small steps, so one thread more than the free cores (SMT siblings, other programs)
    slows generation down many times; reading a prompt is large matrix products, which use them all.
    """
    if threads is not None:
        return threads, threads
    n = cpus if cpus is not None else available_cpus()
    return max(n // 2, 1), max(n, 1)


def threads_help(measuring: bool = False) -> str:
    """--threads' help: the default on this machine, and why it is not all of its CPUs."""
    gen, batch = thread_counts(None)
    why = ("ggml's threads spin while they wait, so more threads than free cores slow decoding down many "
           "times (a busy 2-core machine decoded 5.8 tokens/s with 2 threads, 85 with 1): on a busy machine "
           "give fewer")
    if measuring:
        return (f"CPU threads, the same for prompts and generation (default: {gen}, half the logical CPUs, "
                f"llama-cpp-python's default for generating; {why})")
    return (f"CPU threads (default: llama-cpp-python's choice, half the logical CPUs for generating, {gen} here, "
            f"and all of them, {batch}, for reading prompts; {why})")


def add_model_arguments(p: argparse.ArgumentParser, *, n_ctx_help: str, n_ctx_default: int | None,
                        max_tokens_help: str = "", generation: bool = True) -> None:
    """The model options; ``generation=False`` leaves out --max-tokens and --temperature (``serve``:
    each request sets them)."""
    g = p.add_argument_group("model and generation" if generation else "model")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help=f"a GGUF file, or a name from `adakv-local models list` (pulled on first use; "
                   f"default: {DEFAULT_MODEL})")
    g.add_argument("--n-ctx", type=positive_int, default=n_ctx_default, metavar="N", help=n_ctx_help)
    if generation:
        g.add_argument("--max-tokens", type=positive_int, default=256, metavar="N", help=max_tokens_help)
    g.add_argument("--threads", "-t", type=positive_int, default=None, metavar="N", help=threads_help())
    g.add_argument("--gpu-layers", type=non_negative_int, default=0, metavar="N",
                   help="layers offloaded to a GPU, for a GPU build (default: 0)")
    g.add_argument("--seed", type=non_negative_int, default=None, metavar="N",
                   help="sampling seed (default: random; irrelevant with --temperature 0)" if generation else
                   "sampling seed of the model, for requests that set none (default: random; irrelevant with "
                   "temperature 0)")
    if generation:
        g.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                       help="sampling temperature; 0 is greedy, deterministic (default: 0; llama-cpp-python's "
                       "chat default is 0.2)")
        g.add_argument("--top-p", type=_unit_float, default=0.95, metavar="P",
                       help="nucleus sampling: keep the most likely tokens up to this probability mass, 0 to 1 "
                       "(default: 0.95, llama-cpp-python's; no effect with --temperature 0)")
        g.add_argument("--top-k", type=non_negative_int, default=40, metavar="K",
                       help="sample among the K most likely tokens, 0 for all (default: 40, llama-cpp-python's; no "
                       "effect with --temperature 0)")
        g.add_argument("--repeat-penalty", type=_positive_float, default=1.0, metavar="R",
                       help="divide the logits of tokens already in the context by R (> 1 discourages repeating "
                       "them; default: 1.0, off, llama-cpp-python's)")
    g.add_argument("--allow-context-overflow", action="store_true",
                   help="accept an --n-ctx above the context the model was trained for (GGUF <arch>.context_length); "
                   "past it the model's output degrades into nonsense")
    g.add_argument("--verbose", "-v", action="store_true",
                   help="let llama.cpp's own log through to stderr (e.g. why a model does not load)")


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # C0 and C1 controls but \t \n \v \f \r
_MAX_CONTROL = 0.05  # a larger share of control characters is not a document


def decode_text(data: bytes, label: str, reader: str = "summarize") -> str:
    """data as UTF-8 text, or a CLIError saying why it is not text (NUL bytes, not UTF-8, mostly control bytes).

    label names the data in the message (a path, "stdin"); reader, the command that reads it.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CLIError(f"{label} is UTF-16 text; {reader} reads UTF-8 (convert it, e.g. with iconv -t utf-8)")
    if b"\0" in data:
        raise CLIError(f"{label} is not text: it has NUL bytes (a binary file?); {reader} reads UTF-8 text or "
                       "markdown")
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{label} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); convert it to "
                       "UTF-8, e.g. with iconv -t utf-8") from None
    control = len(_CONTROL.findall(text))
    if control > _MAX_CONTROL * len(text):
        raise CLIError(f"{label} is not text: {control} of its {len(text)} characters are control characters "
                       "(a binary file?)")
    return text


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options for create_chat_completion."""
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, repeat_penalty=args.repeat_penalty)


def _unit_float(text: str) -> float:
    value = non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


# -- eviction options: the flags of config.OPTIONS ---------------------------------------------------


def budget_arg(text: str) -> int | float:
    """--budget: a whole number of cells (256, 1e3), or a fraction such as 0.1; the range is checked later."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return whole_number(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


# how a flag's text becomes the option's value (AdaKVConfig checks the range); str for the others
_FLAG_TYPES: dict[str, Any] = {"budget": budget_arg, "window": int, "kernel": int, "alpha": float,
                               "max_ratio": float, "span_share": float, "sinks": int, "chunk": int}
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AdaKVConfig)}
_UNSET: Any = object()


def eviction_flag(p: Any, name: str, *, default: Any = _UNSET, dest: str | None = None, help: str | None = None,
                  **kwargs: Any) -> None:
    """``--<name>`` for the option ``name`` of config.OPTIONS, declared once for every command: help and
    metavar from OPTIONS, default AdaKVConfig's (unless ``default``), dest ``adakv_<name>`` (unless ``dest``);
    ``kwargs`` go to argparse (a stricter ``type``, ``choices``)."""
    opt = option(name)
    if default is _UNSET:
        default = _CONFIG_DEFAULTS[name]
    kwargs.setdefault("type", _FLAG_TYPES.get(name, str))
    kwargs.setdefault("metavar", opt.metavar)
    p.add_argument(f"--{name.replace('_', '-')}", dest=dest or f"adakv_{name}", default=default,
                   help=f"{help or opt.help} (default: {default})", **kwargs)


def add_eviction_arguments(parser: argparse.ArgumentParser, *, budget_default: Any = None) -> None:
    """``--budget``, ``--method``, ... (all of config.OPTIONS) in a group; values checked by config_from_args."""
    group = parser.add_argument_group("KV-cache eviction")
    for opt in OPTIONS:
        eviction_flag(group, opt.name, **({"default": budget_default} if opt.name == "budget" else {}))


def config_from_flags(args: argparse.Namespace) -> AdaKVConfig:
    """The configuration of add_eviction_arguments' flags; a ConfigError names the flag (``--budget``)."""
    values = {opt.name: getattr(args, f"adakv_{opt.name}") for opt in OPTIONS}
    values = {k: v for k, v in values.items() if v is not None or k == "budget"}
    try:
        return AdaKVConfig(**values)
    except ConfigError as e:
        raise e.named(f"--{e.option.replace('_', '-')}") from None


def config_from_args(args: argparse.Namespace) -> AdaKVConfig:
    """As config_from_flags; a bad value exits 2."""
    try:
        return config_from_flags(args)
    except ConfigError as e:
        raise CLIError(str(e), EXIT_USAGE) from None


def resolve_model_arg(name: str, quiet: bool = False) -> Path:
    """--model: a GGUF file, or a registry name (pulled when missing), checked before llama.cpp loads it.

    Unknown names and folders exit 2; a file that is not a complete GGUF file exits 1 with the reason.
    """
    from ..models import MODELS, ModelFetchError, UnknownModelError, model_path, resolve_model

    if Path(name).expanduser().is_dir():
        raise CLIError(f"--model: {name} is a directory; give a .gguf file or a model name", EXIT_USAGE)
    try:
        if name in MODELS and not Path(name).expanduser().is_file():
            path = model_path(name, quiet=quiet)
        else:
            path = resolve_model(name)
    except UnknownModelError as e:
        raise CLIError(f"--model: {e}", EXIT_USAGE) from None
    except ModelFetchError as e:
        raise CLIError(str(e).splitlines()[0]) from None
    model_info(path)
    return path


def model_info(path: Path) -> GGUFInfo:
    """The GGUF header of path, checked (see :mod:`adakv_local.gguf_check`); a broken file exits 1."""
    try:
        st = path.stat()
        return _model_info(str(path), st.st_size, st.st_mtime_ns)
    except (OSError, GGUFFileError) as e:
        reason = e.reason if isinstance(e, GGUFFileError) else (e.strerror or str(e))
        raise CLIError(f"cannot load model {path}: {reason}") from None


@functools.lru_cache(maxsize=4)
def _model_info(path: str, size: int, mtime_ns: int) -> GGUFInfo:
    return check_gguf(path)


def check_n_ctx(n_ctx: int | None, model: Path, n_train: int | None, args: argparse.Namespace) -> None:
    """Refuse (exit 2) an --n-ctx above the model's trained context, unless --allow-context-overflow."""
    if n_ctx is None or not n_train or n_ctx <= n_train or args.allow_context_overflow:
        return
    raise CLIError(
        f"--n-ctx {n_ctx} is above the {n_train} tokens {model.name} was trained for (GGUF context_length), "
        f"past which its output degrades into nonsense; use --n-ctx {n_train} or less, or add "
        "--allow-context-overflow to run anyway", EXIT_USAGE)


def load_failure(model: Path, e: Exception, args: argparse.Namespace) -> CLIError:
    """A model that passed the GGUF check and still did not load (exit 1), with a pointer to llama.cpp's log."""
    hint = "" if getattr(args, "verbose", False) else " (--verbose shows llama.cpp's log, which says why)"
    return CLIError(f"cannot load model {model}: {e}{hint}", EXIT_FAILURE)


def llama_cpp_module() -> Any:
    """llama_cpp, bound to adakv-local's patched library (a missing library exits 1)."""
    from ..errors import AdaKVError

    try:
        from .. import llama as _llama  # binds the library before llama_cpp is imported

        return _llama.llama_cpp
    except (AdaKVError, OSError) as e:
        raise CLIError(str(e).splitlines()[0] if str(e) else repr(e)) from None


# -- the model, measured -----------------------------------------------------------------------------


def load_llama(model: Path, cfg: AdaKVConfig, args: argparse.Namespace, n_ctx: int, cls: Any = None,
               **extra: Any) -> Any:
    """The eviction-enabled Llama, measured (``llm.meter``). Load failures exit 1, bad options 2.

    cls: a subclass of the measured Llama (default: that class); extra: more llama_cpp.Llama keywords.
    """
    llama_cpp_module()
    cls = cls or metered_class()
    n_batch = max(512, cfg.window)
    n_threads, n_threads_batch = thread_counts(args.threads)
    kwargs: dict[str, Any] = dict(
        model_path=str(model), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
        n_threads_batch=n_threads_batch, n_gpu_layers=args.gpu_layers, verbose=args.verbose, **cfg.llama_kwargs(),
    )  # fmt: skip
    if args.seed is not None:
        kwargs["seed"] = args.seed
    kwargs.update(extra)
    try:
        llm = cls(**kwargs)
    except ConfigError as e:
        raise CLIError(str(e).replace("adakv_", "--"), EXIT_USAGE) from None
    except (ValueError, RuntimeError, OSError) as e:
        raise load_failure(model, e, args) from None
    return llm


# -- stats -------------------------------------------------------------------------------------------


def format_stats(s: dict[str, Any]) -> list[str]:
    """A few human lines for stderr."""
    pre = f"{s['prefill_tps']:.1f} tok/s" if s["prefill_tps"] else "-"
    dec = f"{s['decode_tps']:.1f} tok/s" if s["decode_tps"] else "-"
    cached = s["prompt_tokens"] - s["prefill_tokens"]
    lines = [
        f"prompt: {s['prompt_tokens']} tokens" + (f" ({cached} from the prefix cache)" if cached > 0 else "")
        + f", {s['prefill_seconds']:.2f} s ({pre}); reply: {s['completion_tokens']} tokens, "
        f"{s['decode_seconds']:.2f} s ({dec})",
    ]
    before, after = s["kv_bytes_before"] / _MIB, s["kv_bytes_after"] / _MIB
    if s["compressed"]:
        t = s["seconds"]
        lines.append(
            f"KV cache: {s['kv_cells_before']} -> {s['kv_cells_after']} cells per layer "
            f"({s['kv_cells_kept_mean']:.0f} valid per head on average), {before:.1f} -> {after:.1f} MiB; "
            f"{s['method']}, budget {s['budget']}, window {s['window']}"
        )
        lines.append(eviction_seconds(t))
        if s["chunks"] > 1:
            lines.append(f"read in {s['chunks']} chunks, {s['compressions']} compressions: at most "
                         f"{s['peak_cells']} cells ({s['kv_bytes_peak'] / _MIB:.1f} MiB) held at once")
    elif s["budget"] is None:
        lines.append(f"KV cache: {s['kv_cells_after']} cells per layer, {after:.1f} MiB; full cache, nothing evicted")
    else:
        lines.append(f"KV cache: {s['kv_cells_after']} cells per layer, {after:.1f} MiB; not compressed this time: "
                     f"{s['reason']} ({s['method']})")
    return lines


def eviction_seconds(t: dict[str, float]) -> str:
    """The eviction's times in words: its own steps, and the ubatch that carried the window, which is
    prompt reading (counted in the prefill) with the scores computed in its graph."""
    return (f"eviction: allocate {t.get('allocate', 0.0):.3f} s, compact {t.get('compact', 0.0):.3f} s; the window "
            f"was scored in the graph of its ubatch, read in {t.get('scored_ubatch', 0.0):.3f} s (prompt reading, "
            "part of the prefill; the scoring's own share is small: adakv-local bench --direct measures it)")


def short_stats(s: dict[str, Any]) -> str:
    """One line: the cache after the turn and the reply's speed (chat, on a terminal)."""
    dec = f", reply {s['decode_tps']:.1f} tok/s" if s["decode_tps"] else ""
    evicted = f"{s['kv_cells_before']} -> {s['kv_cells_after']}" if s["compressed"] else f"{s['kv_cells_after']}"
    n = s.get("decode_compressions", 0)
    during = f", compressed {n} time{'s' if n > 1 else ''} while answering" if n else ""
    return f"KV cache {evicted} cells per layer ({s['kv_bytes_after'] / _MIB:.1f} MiB){dec}{during}"


def describe_adakv_stats(st: Any, llm: Any = None) -> list[str]:
    """The last turn's AdaKVStats, in words (chat's /stats); None: nothing evaluated since the start or
    the last /reset. Kept cells over the evicted layers of llm."""
    if st is None:
        return ["no eviction yet (since the start or the last /reset): nothing evaluated"]
    if not st.compressed:
        return [f"last turn: not compressed: {st.reason} ({st.method})",
                f"  the cache holds {st.cells_after} cells per layer ({st.kept_mean:.1f} per KV head on average), "
                f"{st.kv_bytes / _MIB:.1f} MiB, after a {st.prompt_tokens}-token conversation"] + _turn_notes(st)
    kv = llm.adakv_kvcache if llm is not None else None
    kept = st.kept[list(kv.layout.layer_ids)] if kv is not None and len(kv.layout.layer_ids) else st.kept
    return [
        f"last eviction: {st.method}, budget {st.budget} cells per head, window {st.window}, "
        f"after a {st.prompt_tokens}-token conversation",
        f"  cells per layer {st.cells_before} -> {st.cells_after} ({st.freed} freed), {st.kv_bytes_before / _MIB:.1f} "
        f"-> {st.kv_bytes / _MIB:.1f} MiB; cells kept per KV head: min {int(kept.min())}, mean {st.kept_mean:.1f}, "
        f"max {int(kept.max())}",
        "  " + eviction_seconds(st.seconds),
    ] + _turn_notes(st)


def _turn_notes(st: Any) -> list[str]:
    """What a short turn or a long answer added to a record: the window completed from the cache, the
    compressions while answering."""
    notes = []
    if st.reevaluated:
        notes.append(f"  a short turn: its window completed with the cache's last {st.reevaluated} token(s), "
                     "evaluated again")
    if st.decode_compressions:
        notes.append(f"  while answering: the cache filled and was compressed {st.decode_compressions} time(s), "
                     f"{st.decode_seconds:.2f} s in all")
    return notes
