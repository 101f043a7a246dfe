"""The server's error answers: OpenAI's error object, with the status and wording clients expect."""

from __future__ import annotations

import re
from typing import Any

from ..errors import CacheFullError

#: llama-cpp-python's message for a prompt over the context (its own server's regex, kept)
_CONTEXT_EXCEEDED = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


class RequestError(Exception):
    """A request answered with an error status: ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_exception(exc: BaseException, *, chat: bool, max_tokens: int | None) -> RequestError:
    """The answer to an exception raised while a completion ran.

    A prompt over the model's context (llama-cpp-python's ValueError) is a 400 with code
    ``context_length_exceeded`` in OpenAI's wording; any other ValueError (an option the prompt cannot
    be read with, such as a context too small to read it in chunks) and a cache that cannot make
    room are 400s with their own message; anything else is a 500 that names the error.
    """
    if isinstance(exc, RequestError):
        return exc
    match = _CONTEXT_EXCEEDED.search(str(exc)) if isinstance(exc, ValueError) else None
    if match is not None:
        prompt, window = int(match.group(1)), int(match.group(2))
        requested = prompt + (max_tokens or 0)
        message = (f"This model's maximum context length is {window} tokens. However, you requested {requested} "
                   f"tokens ({prompt} in the messages, {max_tokens} in the completion). Please reduce the length of "
                   "the messages or completion." if chat else
                   f"This model's maximum context length is {window} tokens, however you requested {requested} "
                   f"tokens ({prompt} in your prompt; {max_tokens} for the completion). Please reduce your prompt; "
                   "or completion length.")
        return RequestError(400, message, param="messages" if chat else "prompt", code="context_length_exceeded")
    if isinstance(exc, (ValueError, CacheFullError)):
        return RequestError(400, str(exc))
    return RequestError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


def validation_error(exc: Any) -> RequestError:
    """A body that does not match the request schema (pydantic's ValidationError): 422, with the fields."""
    problems, param = [], None
    for e in exc.errors():
        names = [str(x) for x in e.get("loc", ())]
        problems.append(f"{'.'.join(names)}: {e.get('msg')}")
        if param is None:
            param = next((n for n in names if not n.isdigit()), None)
    return RequestError(422, f"invalid request: {'; '.join(problems)}", param=param)
