"""``adakv-local serve``: an OpenAI-compatible HTTP server over a Llama with eviction.

The command loads the model as ``chat`` loads it (the same options, checks and messages), gives
it a cache of saved conversation states (:class:`adakv_local.conversations.ConversationCache`,
``--cache-bytes``, ``--cache-dir``) and serves it with :mod:`adakv_local.server.app`: ``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, streaming, each response with the request's stats in the
extra field ``adakv``, one log line per request on stderr.

Multi-turn: a client sends the whole conversation every time. The context keeps the longest
common prefix with what it holds and evaluates the rest, which eviction then compresses again.
After every request the compressed state is saved; a request that extends another conversation
(a second chat, a front end's title or tags request in between) loads that conversation's own
state, so only its new tokens are evaluated. A history that diverges inside the compressed part
(an edited or regenerated earlier turn) cannot be cut there (the native library refuses to remove
part of a compacted block) and is evaluated again from an empty cache, as a fresh server would.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..server import STATS_FIELD
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError

DEFAULT_BUDGET = 256
DEFAULT_N_CTX = 4096
DEFAULT_CACHE_BYTES = "1G"
#: the modules the server needs (the `server` extra), import names
SERVER_MODULES = ("fastapi", "uvicorn")

EPILOG = f"""examples:
  adakv-local serve --model smollm2-135m --budget 256
  adakv-local serve --model ./my-model.gguf --n-ctx 8192 --port 8080 --gpu-layers 99
  adakv-local serve --cache-bytes 4G --cache-dir ~/.cache/adakv-local/states

  # any OpenAI client: base URL http://127.0.0.1:8000/v1, model name as in /v1/models
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "smollm2-135m", "messages": [{{"role": "user", "content": "Hi"}}]}}'

The API is OpenAI's, as llama-cpp-python's server serves it (pip install 'adakv-local[server]').
Settings that differ from llama-cpp-python's server: flash attention is on (its server passes
flash_attn=False, which eviction cannot run with), n_batch = n_ubatch = max(512, --window) (the
observation window must fit in one ubatch), n_ctx defaults to {DEFAULT_N_CTX} (at most the model's trained
context), concurrent requests queue and each is answered in full (--interrupt-requests: a new
request ends a streamed reply, as there). Each turn evaluates only what is new since the cached
conversation and compresses the cache back to the budget. After each request the compressed state
is saved (--cache-bytes, default {DEFAULT_CACHE_BYTES}; 0: off), so several conversations (and a front end's
title or tags requests) do not make each other read their documents again; an edited earlier turn
is evaluated from scratch. Responses carry the request's eviction stats in the extra field
"{STATS_FIELD}" (streaming: in the last chunk); GET /v1/adakv/states lists the saved conversations; the
server logs one line per request on stderr. Bind to 127.0.0.1 (the default) unless you mean to
serve other machines; --api-key then asks clients for a key.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with the KV cache compressed",
        description="Serve a model over OpenAI's HTTP API as llama-cpp-python's server serves it "
        "(/v1/chat/completions, /v1/completions, /v1/models, streaming), with the KV cache compressed by Ada-KV "
        "per-head eviction after each request's prompt and the compressed state of recent conversations kept. "
        "Chat front ends point their OpenAI base URL at it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .common import add_eviction_arguments, add_model_arguments

    add_model_arguments(
        p, n_ctx_default=None, generation=False,
        n_ctx_help=f"context size in tokens, the cells of the KV cache (default: {DEFAULT_N_CTX}, at most the "
        "model's trained context; more needs --allow-context-overflow)",
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--alias", metavar="NAME", default=None,
                   help="the model name clients send and /v1/models lists (default: the --model name, or the "
                   "GGUF file name without .gguf)")
    s.add_argument("--chat-format", metavar="NAME", default=None,
                   help="llama-cpp-python chat format (default: the GGUF's chat template)")
    s.add_argument("--api-key", metavar="KEY", default=None, help="require this bearer key from clients")
    s.add_argument("--interrupt-requests", action="store_true",
                   help="end a streamed reply as soon as another request arrives (llama-cpp-python's default, "
                   "meant for one user who supersedes their last request); by default requests queue on the "
                   "model and every one is answered in full")
    c = p.add_argument_group("saved conversations")
    c.add_argument("--cache-bytes", type=byte_size, default=byte_size(DEFAULT_CACHE_BYTES), metavar="SIZE",
                   help=f"keep the compressed states of recent conversations, at most SIZE bytes in all (K, M, G: "
                   f"e.g. 512M; default {DEFAULT_CACHE_BYTES}; least recently used out first; 0: keep none, every "
                   "conversation that is not the last one is read again). A compressed state costs about its "
                   "budget's cells, not its length")
    c.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the saved states in files under DIR instead of RAM (still at most --cache-bytes); a "
                   "server restarted with the same model and --n-ctx resumes them")
    add_eviction_arguments(p, budget_default=DEFAULT_BUDGET)
    p.set_defaults(func=run)
    return p


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {value}")
    return value


def check_listen(host: str, port: int) -> None:
    """Fail before the model loads when host:port cannot be listened on (in use, not this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise CLIError(f"--host {host}: {e.strerror or e}", EXIT_USAGE) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (or stop "
                           "what is using it)", EXIT_FAILURE) from None


def missing_server_modules() -> list[str]:
    """The modules of the server extra that are not installed."""
    return [m for m in SERVER_MODULES if find_spec(m) is None]


def run(args: argparse.Namespace) -> int:
    from .common import check_n_ctx, config_from_args, load_llama, metered_class, model_info, resolve_model_arg

    missing = missing_server_modules()
    if missing:
        raise CLIError(f"serve needs the server extra ({', '.join(missing)} not installed): "
                       "pip install 'adakv-local[server]'", EXIT_FAILURE)
    cfg = config_from_args(args)
    check_listen(args.host, args.port)
    model = resolve_model_arg(args.model)
    n_train = model_info(model).n_ctx_train
    check_n_ctx(args.n_ctx, model, n_train, args)
    n_ctx = args.n_ctx or (min(DEFAULT_N_CTX, n_train) if n_train else DEFAULT_N_CTX)
    alias = args.alias or (model.stem if Path(args.model).expanduser().is_file() else args.model)

    import uvicorn

    from ..metering import request_stats
    from ..server.app import ServerSettings, create_app

    llm = load_llama(model, cfg, args, n_ctx, cls=metered_class(), chat_format=args.chat_format)
    try:
        cache = conversation_cache(args, model, llm)
        settings = ServerSettings(alias=alias, api_key=args.api_key, interrupt_requests=args.interrupt_requests)
        app = create_app(llm, settings, stats=lambda m: request_stats(m, m.adakv_config))
        eviction = "full cache" if cfg.method == "full" else f"{cfg.method}, budget {cfg.budget}"
        saved = ("no saved conversations" if cache is None else
                 f"saved conversations up to {_size_text(cache.capacity_bytes)}"
                 + (f" in {cache.directory}" if cache.directory else " in RAM"))
        print(f"adakv-local serve: {alias} ({model.name}), {eviction}, context {llm.n_ctx()} tokens, {saved}; "
              f"OpenAI base URL http://{_url_host(args.host)}:{args.port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        llm.close()
    return EXIT_OK


def conversation_cache(args: argparse.Namespace, model: Path, llm: Any) -> Any:
    """The cache of saved conversation states set on llm (None with --cache-bytes 0). With --cache-dir,
    the files go to a folder named after the model file and the context's size, so that a state only
    ever meets a context like the one that saved it."""
    from ..conversations import ConversationCache

    if args.cache_bytes == 0:
        return None
    directory = None
    if args.cache_dir is not None:
        st = model.stat()
        key = f"{model.resolve()}:{st.st_size}:{st.st_mtime_ns}:{llm.n_ctx()}:{llm.adakv_kvcache.gqa_reduce}"
        directory = Path(args.cache_dir).expanduser() / f"{model.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    try:
        cache = ConversationCache(args.cache_bytes, directory=directory)
    except OSError as e:
        raise CLIError(f"--cache-dir {args.cache_dir}: {e.strerror or e}", EXIT_FAILURE) from None
    llm.set_cache(cache)
    return cache


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def byte_size(text: str) -> int:
    """A size in bytes: a number with an optional K, M, G or T (powers of 1024), e.g. 512M, 2G, 0."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a number of bytes, or with K, M, G: e.g. 512M, 2G)")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * 1024**power)


def _size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
