"""The OpenAI-compatible HTTP app of ``adakv-local serve``: a small router of its own over one ``Llama``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as
server-sent events or not) and ``GET /v1/adakv/states`` (the saved conversations). Requests are
validated with llama-cpp-python's request types (``llama_cpp.server.types``) and answered by the
model's ``create_chat_completion`` / ``create_completion``, one request at a time: every call into
the model runs on one worker thread, and a request holds the model from its first token to its
last, so concurrent requests queue and each is answered in full with its own stats.

Each completion carries the request's stats in the extra field ``adakv`` (streamed: in the last
chunk, the one with a ``finish_reason``) and logs one line on stderr. A request answered with an
error status gets OpenAI's error object and one log line with its reason. A streamed request that
fails before its first token is answered with the error status, not a 200: the response starts with
the first chunk, or after ``first_chunk_wait`` seconds of prompt reading with SSE comments (pings)
every ``ping_seconds`` that keep the connection open; an error after that ends the stream with an
error event.

Conversations: with a cache set on the model (``Llama.set_cache``, e.g. a
:class:`adakv_local.conversations.ConversationCache`), llama-cpp-python saves the compressed state
after every completion and loads the one that shares the longest prefix with the next prompt, so a
conversation resumes from its own state whatever was asked in between (``state_resumed_tokens``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse

from . import STATS_FIELD
from .errors import RequestError, from_exception, validation_error

_END = object()  # the end of a completion's chunks


@dataclass(frozen=True)
class ServerSettings:
    """What the app needs besides the model.

    alias: the model name clients send and ``/v1/models`` lists (a request naming another is a 400).
    api_key: when set, clients must send ``Authorization: Bearer <api_key>`` (401 otherwise).
    interrupt_requests: end a streamed reply as soon as another request waits (llama-cpp-python's
        server's default); off, requests queue and each is answered in full.
    first_chunk_wait / ping_seconds: see the module docs.
    """

    alias: str
    api_key: str | None = None
    interrupt_requests: bool = False
    first_chunk_wait: float = 10.0
    ping_seconds: float = 15.0


def log(line: str) -> None:
    print(f"adakv-local serve: {line}", file=sys.stderr, flush=True)


class ModelServer:
    """One model behind the routes: the lock, the worker thread, the stats of each request.

    ``stats(llm)`` returns the finished request's stats (``adakv_local.metering.request_stats`` with
    the config); the model must be a ``metered_class()`` Llama (``llm.meter``).
    """

    def __init__(self, llm: Any, settings: ServerSettings, stats: Callable[[Any], dict[str, Any]]) -> None:
        self.llm, self.settings, self._stats = llm, settings, stats
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="adakv-model")
        self._lock = asyncio.Lock()
        self._waiting = 0
        self.n_requests = 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the model's worker thread."""
        return await asyncio.wrap_future(self._worker.submit(fn, *args))

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    @property
    def waiting(self) -> int:
        """Requests waiting for the model."""
        return self._waiting

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # -- on the worker thread -------------------------------------------------------------------------

    def start(self, chat: bool, kwargs: dict[str, Any]) -> Any:
        """Begin a request: the whole completion (not streamed) or its chunk iterator (streamed)."""
        self.n_requests += 1
        self.llm.meter.reset()
        call = self.llm.create_chat_completion if chat else self.llm.create_completion
        result = call(**kwargs)
        if isinstance(result, dict):
            result[STATS_FIELD] = self.finish()
        return result

    def finish(self, note: str = "") -> dict[str, Any]:
        """The stats of the request that just ended, logged."""
        stats = self._stats(self.llm)
        stats["n_ctx"] = self.llm.n_ctx()
        cache = self.llm.cache
        if cache is not None:
            stats["cache_states"] = len(cache) if hasattr(cache, "__len__") else None
            stats["cache_bytes"] = int(cache.cache_size)
        log(f"request {self.n_requests}: {request_line(stats)}{note}")
        return stats

    def finish_stream(self, chunk: dict[str, Any], chunks: Iterator[Any]) -> dict[str, Any]:
        """The last chunk of a stream: run the completion to its end (llama-cpp-python saves the
        conversation's state after its last chunk), then put the stats in."""
        for _ in chunks:
            pass
        chunk[STATS_FIELD] = self.finish()
        return chunk

    def abandon(self, chunks: Iterator[Any]) -> None:
        """A stream ended early (the client went away, or another request interrupted it)."""
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        if self.llm.meter.prefill_done:
            self.finish(" (stopped early)")


def request_line(s: dict[str, Any]) -> str:
    """The log line of one request."""
    dec = f"{s['decode_tps']:.1f} t/s" if s["decode_tps"] else "-"
    cells = (f"{s['kv_cells_before']} -> {s['kv_cells_after']} cells per layer" if s["compressed"]
             else f"{s['kv_cells_after']} cells per layer, not compressed")
    line = (f"prompt {s['prompt_tokens']} tokens, evaluated {s['prefill_tokens']}, {cells} "
            f"({s['kv_cells_kept_mean']:.1f} kept per head), reply {s['completion_tokens']} tokens at {dec}")
    if s.get("state_resumed_tokens"):
        line += f"; resumed from a saved state of {s['state_resumed_tokens']} tokens"
    if s.get("cache_bytes") is not None:
        line += f"; {s.get('cache_states')} saved states, {s['cache_bytes'] / 2**20:.1f} MiB"
    return line


# -- the app -----------------------------------------------------------------------------------------


def create_app(llm: Any, settings: ServerSettings, stats: Callable[[Any], dict[str, Any]]) -> Any:
    """The FastAPI app serving ``llm`` (a ``metered_class()`` Llama, loaded) as ``settings.alias``."""
    server = ModelServer(llm, settings, stats)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()  # the last request's step ends before the model is closed

    app = FastAPI(title="adakv-local", lifespan=lifespan)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.state.model_server = server

    def refuse(request: Request, err: RequestError) -> Any:
        reason = " ".join(str(err).split())
        log(f"{request.method} {request.url.path} rejected with {err.status}: {reason[:400]}")
        return JSONResponse(err.body, status_code=err.status)

    if settings.api_key is not None:
        @app.middleware("http")
        async def check_key(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
            if request.url.path.startswith("/v1/") and (
                    request.headers.get("authorization") != f"Bearer {settings.api_key}"):
                return refuse(request, RequestError(401, "Invalid API key: send the server's --api-key as a bearer "
                                                    "token", code="invalid_api_key"))
            return await call_next(request)

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": settings.alias, "object": "model", "owned_by": "me",
                                            "permissions": []}]}

    @app.get("/v1/adakv/states")
    async def states() -> Any:
        """The saved conversations, least recently used first, and the bytes they hold."""
        cache = llm.cache
        entries = cache.entries() if hasattr(cache, "entries") else []
        return {"capacity_bytes": getattr(cache, "capacity_bytes", 0), "bytes": int(cache.cache_size) if cache else 0,
                "states": [{"tokens": e.tokens, "bytes": e.nbytes, "age_seconds": e.age_seconds} for e in entries]}

    async def complete(request: Request, chat: bool) -> Any:
        try:
            kwargs = await read_request(request, chat, settings.alias, llm)
        except RequestError as err:
            return refuse(request, err)
        if kwargs.get("stream"):
            return await stream(request, server, chat, kwargs, refuse)
        await server.acquire()
        try:
            return await server.run(server.start, chat, kwargs)
        except Exception as exc:
            return refuse(request, from_exception(exc, chat=chat, max_tokens=kwargs.get("max_tokens")))
        finally:
            server.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    return app


async def read_request(request: Request, chat: bool, alias: str, llm: Any) -> dict[str, Any]:
    """The keyword arguments of the model's call for this request's body (RequestError: 4xx)."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError

    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    max_tokens = data.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens < 0:
        raise RequestError(400, "max_tokens must be 0 or more (0 or null: until the context is full); got "
                           f"{max_tokens}", param="max_tokens")
    try:
        body = (CreateChatCompletionRequest if chat else CreateCompletionRequest).model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    if body.model is not None and body.model != alias:
        raise RequestError(400, f"The model `{body.model}` does not exist; this server serves `{alias}` "
                           "(GET /v1/models)", code="model_not_found")
    kwargs = body.model_dump(exclude={"n", "best_of", "logit_bias_type", "user", "min_tokens"})
    if not chat and isinstance(kwargs.get("prompt"), list):
        if len(kwargs["prompt"]) > 1:
            raise RequestError(400, "one prompt per request", param="prompt")
        kwargs["prompt"] = kwargs["prompt"][0] if kwargs["prompt"] else ""
    if body.logit_bias is not None and body.logit_bias_type == "tokens":
        kwargs["logit_bias"] = {str(t): score for text, score in body.logit_bias.items()
                                for t in llm.tokenize(text.encode(), add_bos=False, special=True)}
    import llama_cpp

    if body.grammar is not None:
        try:
            kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(body.grammar, verbose=False)
        except ValueError as e:
            raise RequestError(400, f"grammar: {e}", param="grammar") from None
    if body.min_tokens > 0:
        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
            [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llm.token_eos())])
    return kwargs


async def stream(request: Request, server: ModelServer, chat: bool, kwargs: dict[str, Any],
                 refuse: Callable[[Request, RequestError], Any]) -> Any:
    """A streamed completion: the error status when it fails before its first chunk, else the events."""

    def fail(exc: BaseException) -> RequestError:
        return from_exception(exc, chat=chat, max_tokens=kwargs.get("max_tokens"))

    await server.acquire()
    state: dict[str, Any] = {"chunks": None, "done": False}

    def first() -> Any:
        state["chunks"] = iter(server.start(chat, kwargs))
        return next(state["chunks"], _END)

    pending = asyncio.ensure_future(server.run(first))
    try:
        await asyncio.wait({pending}, timeout=server.settings.first_chunk_wait)
    except BaseException:
        await _cleanup(server, state, pending)
        raise
    if pending.done() and pending.exception() is not None:
        await _cleanup(server, state, pending)
        return refuse(request, fail(pending.exception()))  # type: ignore[arg-type]

    async def events() -> AsyncIterator[str]:
        while not pending.done():
            await asyncio.wait({pending}, timeout=server.settings.ping_seconds)
            if not pending.done():
                yield f": ping {time.strftime('%H:%M:%S')}\n\n"
        try:
            chunk = pending.result()
            while chunk is not _END:
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is not None:
                    chunk = await server.run(server.finish_stream, chunk, state["chunks"])
                    state["done"] = True
                    yield _event(chunk)
                    break
                yield _event(chunk)
                if server.settings.interrupt_requests and server.waiting:
                    break
                chunk = await server.run(next, state["chunks"], _END)
            else:
                state["done"] = True
        except Exception as exc:
            err = fail(exc)
            log(f"{request.method} {request.url.path} failed while streaming: {err}")
            yield _event(err.body)
        yield "data: [DONE]\n\n"

    return _Stream(events(), cleanup=lambda: _cleanup(server, state, pending))


async def _cleanup(server: ModelServer, state: dict[str, Any], pending: Any) -> None:
    """End a streamed request, however it ended: wait for the model's step in flight, close the
    completion if it did not finish (its stats logged as stopped early), let the next request in."""
    try:
        await asyncio.shield(asyncio.wait({pending}))
        if not state["done"] and state["chunks"] is not None:
            await asyncio.shield(server.run(server.abandon, state["chunks"]))
    finally:
        server.release()


def _event(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Stream(StreamingResponse):
    """Server-sent events whose cleanup runs however the response ends (sent in full, the client gone)."""

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()
