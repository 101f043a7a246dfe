"""``adakv-local serve``: llama-cpp-python's OpenAI-compatible server, on a Llama with eviction.

The HTTP side is llama-cpp-python's own server (``llama_cpp.server``: FastAPI, uvicorn,
sse-starlette), unchanged: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
streaming, chat formats and its error responses. What this module adds:

- the model is adakv-local's ``Llama`` (loaded like ``chat`` loads it: the same options, checks and
  messages), handed to llama-cpp-python's ``LlamaProxy`` in place of the one it would build;
- every completion and chat completion carries the request's compression stats in an extra field,
  ``adakv`` (non-streaming: in the response object; streaming: in the last chunk, the one with a
  ``finish_reason``). Its keys are those of ``summarize --json``'s ``stats`` (see
  :mod:`adakv_local.cli.summarize`); ``prefill_tokens`` is what this request evaluated, the rest of
  ``prompt_tokens`` came from the cache;
- one line on stderr per request: prompt tokens, tokens evaluated, cells kept, decode speed; for a
  request answered with an error status, the status and the error's message instead;
- 4xx, in llama-cpp-python's error format, where llama-cpp-python 0.3.36 does otherwise: a model
  name the server does not serve (it answers with its only model), a negative ``max_tokens`` (it
  generates until the context is full), a body that is not JSON or not a valid request (500 under
  current FastAPI), and a streamed request that fails before its first event (an empty 200).

Multi-turn: a client sends the whole conversation every time; llama-cpp-python keeps the longest
common prefix of the cached tokens and evaluates the rest, which eviction then compresses again.
A history that diverges inside the compressed part (an edited or regenerated earlier turn) cannot
be cut there (the native library refuses to remove part of a compacted block), and
llama-cpp-python then evaluates the whole prompt again from an empty cache, exactly as a fresh
server would.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import threading
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError

DEFAULT_BUDGET = 256
DEFAULT_N_CTX = 4096
STATS_FIELD = "adakv"
#: the modules of llama-cpp-python's `server` extra (its setup metadata), import names
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings", "yaml")

EPILOG = f"""examples:
  adakv-local serve --model smollm2-135m --budget 256
  adakv-local serve --model ./my-model.gguf --n-ctx 8192 --port 8080 --gpu-layers 99

  # any OpenAI client: base URL http://127.0.0.1:8000/v1, model name as in /v1/models
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "smollm2-135m", "messages": [{{"role": "user", "content": "Hi"}}]}}'

This is llama-cpp-python's server (pip install 'adakv-local[server]'), with the model replaced by
adakv-local's Llama. Settings that differ from llama-cpp-python's server: flash attention is on
(its server passes flash_attn=False, which eviction cannot run with), n_batch = n_ubatch =
max(512, --window) (the observation window must fit in one ubatch), n_ctx defaults to
{DEFAULT_N_CTX} (at most the model's trained context), concurrent requests queue and each is answered in
full (--interrupt-requests: a new request ends a streamed reply, as there). Each turn evaluates only what is new since
the cached conversation and compresses the cache back to the budget; an edited earlier turn is
evaluated from scratch. Responses carry the request's eviction stats in the extra field
"{STATS_FIELD}" (streaming: in the last chunk), and the server logs one line per request on stderr.
Bind to 127.0.0.1 (the default) unless you mean to serve other machines; --api-key then asks
clients for a key.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (llama-cpp-python's) with the KV cache compressed",
        description="Serve a model over llama-cpp-python's OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, streaming), with the KV cache compressed by Ada-KV per-head eviction "
        "after each request's prompt. Chat front ends point their OpenAI base URL at it.",
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
    """The modules of llama-cpp-python's server extra that are not installed."""
    return [m for m in SERVER_MODULES if find_spec(m) is None]


def run(args: argparse.Namespace) -> int:
    from .common import check_n_ctx, config_from_args, load_llama, model_info, resolve_model_arg

    missing = missing_server_modules()
    if missing:
        raise CLIError(f"serve needs llama-cpp-python's server extra ({', '.join(missing)} not installed): "
                       "pip install 'adakv-local[server]'", EXIT_FAILURE)
    cfg = config_from_args(args)
    check_listen(args.host, args.port)
    model = resolve_model_arg(args.model)
    n_train = model_info(model).n_ctx_train
    check_n_ctx(args.n_ctx, model, n_train, args)
    n_ctx = args.n_ctx or (min(DEFAULT_N_CTX, n_train) if n_train else DEFAULT_N_CTX)
    alias = args.alias or (model.stem if Path(args.model).expanduser().is_file() else args.model)

    import uvicorn

    llm = load_llama(model, cfg, args, n_ctx, cls=_serve_class(), chat_format=args.chat_format)
    try:
        app = create_app(llm, alias=alias, host=args.host, port=args.port, api_key=args.api_key,
                         interrupt_requests=args.interrupt_requests)
        eviction = "full cache" if cfg.method == "full" else f"{cfg.method}, budget {cfg.budget}"
        print(f"adakv-local serve: {alias} ({model.name}), {eviction}, context {llm.n_ctx()} tokens; "
              f"OpenAI base URL http://{_url_host(args.host)}:{args.port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        llm.close()
    return EXIT_OK


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the app: llama-cpp-python's, with our model -------------------------------------------------------


def create_app(llm: Any, *, alias: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               interrupt_requests: bool = False) -> Any:
    """llama-cpp-python's FastAPI app serving ``llm`` (a Llama of :func:`_serve_class`) as ``alias``.

    Requests queue on the model's lock and each is answered in full; ``interrupt_requests=True`` is
    llama-cpp-python's default instead: a streamed reply ends (without its last chunk, so without its
    stats) as soon as another request waits.

    ``llama_cpp.server.app.create_app`` builds its ``LlamaProxy`` from the module's global name;
    for that one call the name is our proxy, which hands out ``llm`` instead of building a model.
    """
    from llama_cpp.server import app as server_app
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    _wrap_chat_handler(llm)

    class Proxy(LlamaProxy):
        """LlamaProxy over one model already loaded; unknown model names are refused."""

        def load_llama_from_model_settings(self, settings: ModelSettings) -> Any:  # type: ignore[override]
            return llm

        def __call__(self, model: str | None = None) -> Any:
            if model is not None and model not in self._model_settings_dict:
                # llama-cpp-python's error handler answers this message with 400, code model_not_found
                # ("The model `NAME` does not exist"); GET /v1/models lists the name to use
                raise ValueError(f"Model path does not exist: {model}")
            return super().__call__(model)

        def free(self) -> None:  # the model belongs to `serve`, which closes it
            pass

    # the settings only name the model: it is loaded already (flash attention on, eviction set up)
    model_settings = ModelSettings(model=str(llm.model_path), model_alias=alias, n_ctx=llm.n_ctx(),
                                   flash_attn=True, verbose=llm.verbose)
    server_settings = ServerSettings(host=host, port=port, api_key=api_key, interrupt_requests=interrupt_requests)
    stock = server_app.LlamaProxy
    server_app.LlamaProxy = Proxy
    try:
        app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])
    finally:
        server_app.LlamaProxy = stock
    _answer_bad_requests(app, server_app.router)
    app.add_middleware(_StatsIntoResponse, llm=llm)
    app.add_middleware(_StreamErrorsAsResponses, router=server_app.router)
    app.add_middleware(_LogRejected)  # outermost: it sees the status every client gets
    return app


class _LogRejected:
    """One line on stderr for every request answered with an error status (4xx, 5xx), with its reason.

    The reason is the error object's message (llama-cpp-python's ``{"error": {"message": ...}}``,
    FastAPI's ``{"detail": ...}``), else the start of the body. The line is written before the body's
    last part goes out, so it is in the log when the client has the answer.
    """

    max_reason = 400  # characters of the reason in the log line

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}
        parts: list[bytes] = []

        async def logging_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            elif message["type"] == "http.response.body" and status["code"] >= 400:
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self._log(scope, status["code"], b"".join(parts))
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        except Exception as exc:
            if status["code"] == 0:  # answered with 500 by the server's last handler
                self._log(scope, 500, f"{type(exc).__name__}: {exc}".encode())
            raise

    def _log(self, scope: Any, code: int, body: bytes) -> None:
        print(f"adakv-local serve: {scope.get('method', '?')} {scope.get('path', '?')} rejected with {code}: "
              f"{self.reason(body)}", file=sys.stderr, flush=True)

    @classmethod
    def reason(cls, body: bytes) -> str:
        import json

        text = body.decode("utf-8", "replace")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and error.get("message"):
                text = str(error["message"])
            elif "detail" in data:
                text = str(data["detail"])
        text = " ".join(text.split()) or "(no body)"
        return text if len(text) <= cls.max_reason else text[: cls.max_reason - 3] + "..."


class _StreamErrorsAsResponses:
    """A streamed request that fails before its first event gets an error response, not an empty 200.

    llama-cpp-python starts a streamed response (200, text/event-stream) before it looks the model up
    and tokenizes the prompt, so an unknown model or a conversation over the context raised inside
    the stream, and the client got an empty 200. Here the response start is held until the first
    event (or ping) goes out; if the app raises before that, the error is answered as
    llama-cpp-python answers it for a request that is not streamed (its error formatters: 400 with
    its message). Errors after the first event still end the stream, as there.
    """

    def __init__(self, app: Any, router: Any) -> None:
        self.app, self.router = app, router

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(("/chat/completions", "/completions")):
            return await self.app(scope, receive, send)
        request_body: list[bytes] = []
        held: list[dict[str, Any]] = []
        state = {"forwarded": False}

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                request_body.append(message.get("body", b""))
            return message

        async def holding_send(message: dict[str, Any]) -> None:
            if state["forwarded"]:
                return await send(message)
            if message["type"] == "http.response.start":
                if dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream"):
                    held.append(message)
                    return
            elif message["type"] == "http.response.body" and held:
                held.append(message)
                if not message.get("body"):  # sse-starlette closes a failed stream with an empty body, then raises
                    return
            state["forwarded"] = True
            for m in held:
                await send(m)
            if not held:
                await send(message)
            held.clear()

        try:
            await self.app(scope, recording_receive, holding_send)
        except Exception as exc:
            if state["forwarded"]:
                raise
            from fastapi.responses import JSONResponse

            status, error = self._error(exc, b"".join(request_body))
            await JSONResponse({"error": error}, status_code=status)(scope, receive, send)
            return
        for m in held:  # a stream that ended without a single byte
            await send(m)

    def _error(self, exc: BaseException, raw: bytes) -> tuple[int, dict[str, Any]]:
        import json

        from llama_cpp.server.errors import RouteErrorHandler
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

        while getattr(exc, "exceptions", None):  # an exception group from the stream's task group
            exc = exc.exceptions[0]  # type: ignore[attr-defined]
        try:
            data = json.loads(raw)
            body: Any = CreateChatCompletionRequest(**data) if "messages" in data else CreateCompletionRequest(**data)
        except Exception:
            body = None
        route = next(r for r in self.router.routes if isinstance(r, RouteErrorHandler))
        return route.error_message_wrapper(error=exc, body=body)


class _StatsIntoResponse:
    """Puts a completion's stats into its non-streaming JSON response.

    The routes return the completion through a ``response_model`` (a TypedDict), which drops keys it
    does not know, so the field is added after serialization: the model files each completion's
    stats under its id (``_create_completion``) and this middleware takes them back out by the
    response's ``id`` (a chat completion's id is ``chat`` + its completion's). Streaming responses
    carry the field in their last chunk already and pass through untouched.
    """

    def __init__(self, app: Any, llm: Any) -> None:
        self.app, self.llm = app, llm

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(("/chat/completions", "/completions")):
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def send_with_stats(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] == 200 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    start.update(message)  # held until the body is complete
                    return
            elif message["type"] == "http.response.body" and start:
                parts.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = self._with_stats(b"".join(parts))
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_with_stats)

    def _with_stats(self, body: bytes) -> bytes:
        import json

        try:
            data = json.loads(body)
        except ValueError:
            return body
        take = self.llm.adakv_take_stats
        key = data.get("id") if isinstance(data, dict) else None
        stats = take(key) if isinstance(key, str) else None
        if stats is None and isinstance(key, str) and key.startswith("chat"):
            stats = take(key[len("chat"):])
        if stats is None:
            return body
        data[STATS_FIELD] = stats
        return json.dumps(data).encode()


def _answer_bad_requests(app: Any, library_router: Any) -> None:
    """4xx, in llama-cpp-python's error format, for what its error handler (``RouteErrorHandler``)
    answers with 500: a body that fails validation (it re-reads the body to find the request type,
    and FastAPI >= 0.100 raises validation errors inside the route), malformed JSON (re-reading
    it raises again, out of the handler), and a negative max_tokens (our message)."""
    import json

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from llama_cpp.server.errors import RouteErrorHandler

    def error_response(route: Any) -> Any:
        stock = route.__dict__.get("_adakv_stock_wrapper") or route.error_message_wrapper  # once per route
        route._adakv_stock_wrapper = stock

        def wrapper(error: Exception, body: Any = None) -> tuple[int, dict[str, Any]]:
            if isinstance(error, RequestValidationError):
                problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}"
                                     for e in error.errors())
                return 422, _error(f"invalid request: {problems}", param=_first_param(error))
            match = _NEGATIVE_MAX_TOKENS.search(str(error))
            if match:
                return 400, _error(f"max_tokens must be 0 or more (0 or null: until the context is full); got "
                                   f"{match.group(1)}", param="max_tokens")
            return stock(error, body)

        return wrapper

    # the routes that answer: the library's own (FastAPI >= 0.13x includes a router by reference) or
    # this app's copies of them (older FastAPI); instance attributes, the class is left alone
    for route in [*library_router.routes, *app.router.routes]:
        if isinstance(route, RouteErrorHandler):
            route.error_message_wrapper = error_response(route)

    async def malformed_json(request: Any, exc: Exception) -> Any:
        return JSONResponse({"error": _error(f"the request body is not valid JSON: {exc}")}, status_code=400)

    app.add_exception_handler(json.JSONDecodeError, malformed_json)


def _error(message: str, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": "invalid_request_error", "param": param, "code": None}


def _first_param(error: Any) -> str | None:
    for e in error.errors():
        names = [str(x) for x in e.get("loc", ()) if x != "body" and not isinstance(x, int)]
        if names:
            return names[0]
    return None


_NEGATIVE_MAX_TOKENS = re.compile(r"max_tokens must be 0 or more .*got (-\d+)")


# -- the model: stats per request --------------------------------------------------------------------


_SERVE: Any = None


def _serve_class() -> Any:
    """The measured Llama of :mod:`.common`, with stats attached to every completion."""
    global _SERVE
    if _SERVE is None:
        from .common import metered_class, request_stats

        class ServeLlama(metered_class()):  # type: ignore[misc]
            n_requests = 0
            last_request_stats: dict[str, Any] | None = None

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.adakv_pending_stats: dict[str, dict[str, Any]] = {}  # completion id -> stats
                self.adakv_pending_lock = threading.Lock()
                super().__init__(*args, **kwargs)

            def _create_completion(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
                max_tokens = kwargs.get("max_tokens")
                if isinstance(max_tokens, int) and max_tokens < 0:
                    raise ValueError(f"max_tokens must be 0 or more (0 or null: until the context is full), "
                                     f"got {max_tokens}")
                return self._with_stats(super()._create_completion(*args, **kwargs), bool(kwargs.get("stream")))

            def _with_stats(self, chunks: Iterator[Any], stream: bool) -> Iterator[Any]:
                self.meter.reset()
                self.n_requests += 1
                self.last_request_stats = None
                try:
                    for chunk in chunks:
                        if chunk["choices"] and chunk["choices"][0].get("finish_reason") is not None:
                            chunk[STATS_FIELD] = self._finish()
                            if not stream:  # a stream carries them in this chunk; nobody would collect them
                                self._file_stats(chunk.get("id"), chunk[STATS_FIELD])
                        yield chunk
                finally:
                    if self.last_request_stats is None and self.meter.prefill_done:
                        with contextlib.suppress(Exception):  # a request cut short: log what it did
                            self._finish(note=" (stopped early)")

            def _file_stats(self, key: Any, stats: dict[str, Any]) -> None:
                """Kept for the response middleware, which takes them out by the response's id on the event
                loop (this runs on the thread pool): under the lock. The oldest go beyond 64 (a response
                that never reached the middleware, e.g. its client went away)."""
                if not isinstance(key, str):
                    return
                with self.adakv_pending_lock:
                    pending = self.adakv_pending_stats
                    pending[key] = stats
                    while len(pending) > 64:
                        pending.pop(next(iter(pending)))

            def adakv_take_stats(self, key: str) -> dict[str, Any] | None:
                """The stats filed under a completion id, removed (None if there are none)."""
                with self.adakv_pending_lock:
                    return self.adakv_pending_stats.pop(key, None)

            def _finish(self, note: str = "") -> dict[str, Any]:
                stats = request_stats(self, self.adakv_config)
                stats["n_ctx"] = self.n_ctx()
                self.last_request_stats = stats
                print(f"adakv-local serve: {request_line(self.n_requests, stats)}{note}", file=sys.stderr, flush=True)
                return stats

        _SERVE = ServeLlama
    return _SERVE


def request_line(n: int, s: dict[str, Any]) -> str:
    """The log line of one request."""
    dec = f"{s['decode_tps']:.1f} t/s" if s["decode_tps"] else "-"
    cells = (f"{s['kv_cells_before']} -> {s['kv_cells_after']} cells per layer" if s["compressed"]
             else f"{s['kv_cells_after']} cells per layer, not compressed")
    return (f"request {n}: prompt {s['prompt_tokens']} tokens, evaluated {s['prefill_tokens']}, {cells} "
            f"({s['kv_cells_kept_mean']:.1f} kept per head), reply {s['completion_tokens']} tokens at {dec}")


def _wrap_chat_handler(llm: Any) -> None:
    """Chat completions are built from completions by the chat handler, which drops unknown keys:
    put the stats of the completion back on the chat response (its last chunk when streaming)."""
    from llama_cpp import llama_chat_format

    base = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
            or llama_chat_format.get_chat_completion_handler(llm.chat_format))

    def handler(*args: Any, **kwargs: Any) -> Any:
        result = base(*args, **kwargs)
        if isinstance(result, dict):
            if llm.last_request_stats is not None:
                result[STATS_FIELD] = llm.last_request_stats
            return result
        return _stream_with_stats(llm, result)

    llm.chat_handler = handler


def _stream_with_stats(llm: Any, chunks: Iterator[Any]) -> Iterator[Any]:
    for chunk in chunks:
        choices = chunk.get("choices") or []
        if choices and choices[0].get("finish_reason") is not None and llm.last_request_stats is not None:
            chunk[STATS_FIELD] = llm.last_request_stats
        yield chunk
