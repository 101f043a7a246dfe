"""Exit codes and the one exception every command raises for an expected failure.

Exit codes: 0 success; 1 runtime failure, including input that cannot be used (a missing, empty
or binary document, a model file that is not a complete GGUF file); 2 usage error (a bad option
value, an unknown model name, an --n-ctx above the model's trained context; the message names the
option). The dispatcher (:func:`adakv_local.cli.main`) prints a CLIError as one line on stderr,
``adakv-local: error: ...``, no traceback, and exits with its code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An expected failure: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code
