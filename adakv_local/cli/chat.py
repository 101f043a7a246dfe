"""``adakv-local chat``: a terminal chat whose KV cache is compressed after every user turn.

Input, by where stdin comes from:

- *a terminal* (stdin and stdout): a ``you>`` prompt with readline editing and history, replies
  streamed, a progress bar on stderr while a long turn is read. Bracketed paste is on while a line is
  read (``ESC[?2004h``, off again with ``ESC[?2004l`` before the reply, and on every way out), so the
  terminal marks a paste with ``ESC[200~`` ... ``ESC[201~`` and a pasted document is one message,
  sent with the Enter after it (GNU readline reads the markers itself and returns the paste as one
  line; without readline the marked lines are joined here).
- *a pipe or a file*: all of stdin is one message; the reply goes to stdout and the chat ends.
- ``--lines`` (and a terminal on stdin whose stdout is not one): one message or command per line,
  no prompts, for scripted conversations.

In the line modes a line starting with ``\"\"\"`` opens a block that a line ending with ``\"\"\"``
closes: the lines between are one message. Lines starting with ``/`` are commands: ``/file``,
``/stats``, ``/reset``, ``/help``, ``/exit`` (EOF, Ctrl-D, ends the chat as well).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..config import AdaKVConfig
from ..progress import PrefillProgress
from .errors import EXIT_OK, CLIError

DEFAULT_BUDGET = 256
DEFAULT_N_CTX = 4096

PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"  # terminal modes: bracketed paste on, off
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # what the terminal sends around a paste
BLOCK = '"""'
PROMPT, MORE_PROMPT = "you> ", "...> "

HELP_TEXT = """commands:
  /file PATH [QUESTION]  send a UTF-8 text file as one message, followed by the question if given
                         (quote a PATH with spaces: /file "my notes.md" What is missing?)
  /stats   what the last turn did to the cache (compressed or why not), and its figures
  /reset   forget the conversation and clear the KV cache
  /help    this text
  /exit    end the chat (so does Ctrl-D)
multi-line messages:
  paste    on a terminal a paste is one message, sent with the Enter after it (type a question
           before that Enter to add it)
  \"\"\"      a line starting with \"\"\" opens a block, a line ending with \"\"\" closes it; the lines
           between are one message (Ctrl-C discards an open block)"""

EPILOG = f"""examples:
  adakv-local chat
  adakv-local chat --system "You are a terse assistant." --budget 128
  adakv-local chat < question.txt                  # all of stdin is one message, one reply
  git diff | adakv-local chat --system "Review this patch."
  printf 'What is a KV cache?\\n/stats\\n/exit\\n' | adakv-local chat --lines --max-tokens 64

{HELP_TEXT}

stdin: on a terminal, one message per line (or paste, or block) as above. Through a pipe or from a
file, all of stdin is one message: the reply goes to stdout and the chat ends, as `summarize` reads a
document. --lines reads a piped stdin line by line instead: each line a message or a /command, \"\"\"
blocks for messages of several lines, no prompts (a script of turns).

The whole conversation is the prompt of each turn; llama-cpp-python reuses the cached part, so
only the new turn is read, and the cache is then compressed back to the budget ({DEFAULT_BUDGET} cells
per KV head by default, of the order the Ada-KV paper evaluates; raise it if replies lose track
of earlier turns). Evicted tokens do not come back. The conversation is still limited to --n-ctx
tokens in all (llama-cpp-python counts positions, not cells); /reset starts over.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "chat", help="interactive chat, the KV cache compressed after each user turn",
        description="Chat with a model in the terminal (or through a pipe: all of stdin is one message, or one "
        "message per line with --lines). The KV cache is compressed with Ada-KV per-head eviction after each "
        "user turn that takes it above the budget.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .common import add_eviction_arguments, add_model_arguments

    add_model_arguments(
        p, n_ctx_default=None,
        n_ctx_help=f"context size in tokens: the longest conversation (default: {DEFAULT_N_CTX}, at most the "
        "model's trained context; more needs --allow-context-overflow)",
        max_tokens_help="longest reply, in tokens (default: 256)",
    )
    p.add_argument("--system", metavar="TEXT", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--lines", action="store_true",
                   help='read a piped stdin line by line: each line a message or a /command, """ blocks for '
                   "several lines (default off a terminal: all of stdin is one message)")
    p.add_argument("--quiet", "-q", action="store_true", help="no banner, progress bar or per-turn stats on stderr")
    add_eviction_arguments(p, budget_default=DEFAULT_BUDGET)
    p.set_defaults(func=run)
    return p


# -- input ---------------------------------------------------------------------------------------------


class ChatInputError(Exception):
    """A message or command that cannot be sent as typed; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    """One thing the user sent: a message, or a /command line (``command``)."""

    text: str
    command: bool = False


#: a line source: the next line for a prompt ("" off a terminal), None at the end of input
LineSource = Callable[[str], "str | None"]


class Reader:
    """Messages and /commands out of lines: typed lines, pastes and \"\"\" blocks.

    lines: where lines come from (:func:`terminal_lines`, :func:`stream_lines`); prompts: show the
    ``you>`` / ``...>`` prompts (a terminal). A line that holds a paste (GNU readline returns one with
    its newlines; a terminal without readline sends the ``ESC[200~`` ... ``ESC[201~`` markers, here
    read up to the end marker) is one message, never a command or a block.
    """

    def __init__(self, lines: LineSource, prompts: bool) -> None:
        self.lines, self.prompts = lines, prompts
        self.line_no = 0  # lines read so far, for messages

    def _next(self, prompt: str) -> str | None:
        line = self.lines(prompt if self.prompts else "")
        if line is not None:
            self.line_no += 1 + line.count("\n")
        return line

    def read(self) -> Entry | None:
        """The next message or command; None at the end of input."""
        while True:
            line = self._next(PROMPT)
            if line is None:
                return None
            if PASTE_START in line or "\n" in line:
                text = self._paste(line).strip()
                if text:
                    return Entry(text)
                continue
            text = line.replace(PASTE_END, "").strip()
            if text.startswith(BLOCK):
                block = self._block(text[len(BLOCK):])
                if block:
                    return Entry(block)
            elif text:
                return Entry(text, command=text.startswith("/"))

    def _paste(self, line: str) -> str:
        text = line
        while text.rfind(PASTE_START) > text.rfind(PASTE_END):  # a paste still open: its lines follow
            more = self._next("")
            if more is None:
                break
            text += "\n" + more
        return _unmark(text)

    def _block(self, first: str) -> str:
        opened = self.line_no
        lines: list[str] = []
        line = first.lstrip()
        try:
            while True:
                end = line.rstrip()
                if end.endswith(BLOCK):
                    lines.append(end[: -len(BLOCK)])
                    break
                lines.append(line)
                more = self._next(MORE_PROMPT)
                if more is None:
                    raise ChatInputError(
                        f"input ended inside the {BLOCK} block opened on line {opened}, which was not sent; close "
                        f"it with a line {BLOCK}")
                line = _unmark(more)
        except KeyboardInterrupt:
            if not self.prompts:
                raise
            print("\n(block discarded)", file=sys.stderr, flush=True)
            return ""
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        return "\n".join(lines).rstrip()


def _unmark(text: str) -> str:
    return text.replace(PASTE_START, "").replace(PASTE_END, "")


def terminal_lines(out: TextIO) -> LineSource:
    """Lines typed on a terminal: input() (with readline when there is one), bracketed paste on while it
    waits and off again before it returns, however it returns (Enter, Ctrl-D, Ctrl-C)."""
    try:
        import readline  # line editing and history for input()
    except ImportError:  # Windows, or a Python without it
        readline = None  # type: ignore[assignment]
    paste = _bracketed_paste_works(readline)

    def read(prompt: str) -> str | None:
        if paste:
            out.write(PASTE_ON)
            out.flush()
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return None
        finally:
            if paste:
                out.write(PASTE_OFF)
                out.flush()

    return read


def _bracketed_paste_works(readline: Any) -> bool:
    """Whether input() can take a marked paste: GNU readline >= 8.1 reads the markers itself, and without
    readline the terminal hands them over in the lines; libedit and older readlines would take them for
    keys (the paste then arrives line by line, as before; \"\"\" blocks and /file work everywhere)."""
    if readline is None:
        return True
    if "libedit" in (readline.__doc__ or ""):
        return False
    match = re.match(r"(\d+)\.(\d+)", getattr(readline, "_READLINE_LIBRARY_VERSION", ""))
    return match is not None and (int(match.group(1)), int(match.group(2))) >= (8, 1)


def stream_lines(stream: TextIO) -> LineSource:
    """Lines of a stream (a pipe, a file, a terminal whose output goes elsewhere), no prompts."""

    def read(prompt: str) -> str | None:
        line = stream.readline()
        return None if line == "" else line.rstrip("\r\n")

    return read


def file_message(line: str) -> str:
    """The message of a ``/file PATH [QUESTION]`` line: the file's text, a blank line and the question.

    A PATH with spaces is quoted ('...' or "..."). Raises ChatInputError naming what is wrong.
    """
    from .common import decode_text

    rest = line.strip()[len("/file"):].strip()
    if not rest:
        raise ChatInputError("/file needs a path: /file PATH [QUESTION]")
    if rest[0] in "\"'":
        end = rest.find(rest[0], 1)
        if end < 0:
            raise ChatInputError(f"/file: the path has no closing {rest[0]}")
        name, question = rest[1:end], rest[end + 1:].strip()
    else:
        name, _, question = rest.partition(" ") if " " in rest else (rest, "", "")
        name, question = name.strip(), question.strip()
    try:
        data = Path(name).expanduser().read_bytes()
    except OSError as e:
        raise ChatInputError(f"/file: cannot read {name}: {e.strerror or e}") from None
    try:
        text = decode_text(data, name, reader="chat").strip()
    except CLIError as e:
        raise ChatInputError(f"/file: {e}") from None
    if not text:
        raise ChatInputError(f"/file: {name} is empty: nothing to send")
    return f"{text}\n\n{question}" if question else text


def read_stdin_message(stdin: TextIO) -> str:
    """All of a piped stdin, as one message (exit 1 when it is empty or not text)."""
    from .common import decode_text

    try:
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
    except OSError as e:
        raise CLIError(f"cannot read stdin: {e.strerror or e}") from None
    text = decode_text(data, "stdin", reader="chat").strip()
    if not text:
        raise CLIError("stdin is empty: nothing to send (pipe a message or a document; --lines reads one message "
                       "or /command per line)")
    return text


# -- the conversation ----------------------------------------------------------------------------------


class Chat:
    def __init__(self, llm: Any, cfg: AdaKVConfig, args: argparse.Namespace, tty: bool) -> None:
        self.llm, self.cfg, self.args, self.tty = llm, cfg, args, tty
        self.system = args.system
        self.history: list[dict[str, str]] = []
        self.last: dict[str, Any] | None = None
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.llm.reset()
        self.last = None

    def command(self, line: str) -> bool:
        """Run a /command; False ends the chat. ChatInputError: it could not run (the chat goes on)."""
        from .common import describe_adakv_stats, format_stats

        name = line.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/file":
            text = file_message(line)
            if self.tty and not self.args.quiet:
                print(f"[adakv-local] /file: {len(text)} characters", file=sys.stderr, flush=True)
            self.turn(text)
        elif name == "/reset":
            self.reset()
            self.say("conversation and KV cache cleared")
        elif name == "/stats":
            st = self.llm.adakv_stats
            if self.cfg.method == "full":
                lines = ["--method full: every cell is kept, nothing is evicted"]
            else:
                lines = describe_adakv_stats(st, self.llm)  # the last turn's record (None after /reset)
            if self.last is not None:
                lines += ["last turn:"] + [f"  {s}" for s in format_stats(self.last)]
            self.say("\n".join(lines))
        elif name == "/help":
            self.say(HELP_TEXT)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def say(self, text: str) -> None:
        print(text, flush=True)

    def turn(self, text: str) -> None:
        """Answer one user message on stdout. ChatInputError: it was not answered (the history is as before)."""
        from .common import request_stats, short_stats

        llm, args = self.llm, self.args
        self.history.append({"role": "user", "content": text})
        progress = PrefillProgress("reading", enabled=self.tty and not args.quiet)
        llm.progress_callback = progress
        llm.meter.reset()
        llm.meter.on_prefill_done = progress.finish
        progress.start()
        parts: list[str] = []
        try:
            for chunk in self._stream():
                piece = chunk["choices"][0]["delta"].get("content") or ""
                if not parts:
                    piece = piece.lstrip()
                    if not piece:
                        continue
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            parts.append(" [interrupted]")
            sys.stdout.write(" [interrupted]")
        except ChatInputError:
            progress.finish()
            self.history.pop()
            raise
        finally:
            progress.finish()
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.history.append({"role": "assistant", "content": "".join(parts)})
        self.last = request_stats(llm, self.cfg)
        if self.tty and not args.quiet:
            print(f"[adakv-local] {short_stats(self.last)}", file=sys.stderr)

    def _stream(self) -> Any:
        from .common import sampling_kwargs

        llm, args = self.llm, self.args
        kwargs = dict(messages=self.history, max_tokens=args.max_tokens, stream=True, **sampling_kwargs(args))
        try:
            yield from llm.create_chat_completion(**kwargs)
        except ValueError as e:
            if "exceed context window" in str(e):
                raise ChatInputError(f"that message was not answered: with it the conversation does not fit in the "
                                     f"{llm.n_ctx()}-token context ({e}); /reset to start over, or restart with a "
                                     "larger --n-ctx") from None
            raise ChatInputError(f"that message was not answered: {e}") from None  # e.g. the chat template's checks
        except RuntimeError as e:
            if "cannot rewind" not in str(e):
                raise CLIError(f"generation failed: {e}") from None
            # the template re-rendered the history differently inside the compressed part: read it again
            llm.reset()
            yield from llm.create_chat_completion(**kwargs)


def run(args: argparse.Namespace) -> int:
    from .common import check_n_ctx, config_from_args, load_llama, model_info, resolve_model_arg

    cfg = config_from_args(args)
    model = resolve_model_arg(args.model, quiet=args.quiet)
    n_train = model_info(model).n_ctx_train
    check_n_ctx(args.n_ctx, model, n_train, args)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    whole = not terminal and not args.lines and not sys.stdin.isatty()
    message = read_stdin_message(sys.stdin) if whole else None  # before the model loads: bad input fails fast
    n_ctx = args.n_ctx or (min(DEFAULT_N_CTX, n_train) if n_train else DEFAULT_N_CTX)
    llm = load_llama(model, cfg, args, n_ctx)
    try:
        chat = Chat(llm, cfg, args, terminal)
        if message is not None:
            try:
                chat.turn(message)
            except ChatInputError as e:
                raise CLIError(str(e)) from None
            return EXIT_OK
        if terminal and not args.quiet:
            eviction = "full cache" if cfg.method == "full" else f"{cfg.method}, budget {cfg.budget}"
            print(f"[adakv-local] chat with {model.name}: {eviction}, context {llm.n_ctx()} "
                  "tokens. /help for commands, Ctrl-D to quit.", file=sys.stderr)
        reader = Reader(terminal_lines(sys.stdout) if terminal else stream_lines(sys.stdin), prompts=terminal)
        converse(chat, reader)
    finally:
        llm.close()
    return EXIT_OK


def converse(chat: Chat, reader: Reader) -> None:
    """Messages and commands until /exit or the end of input. A message or command that cannot be answered
    is reported on stderr and the chat goes on; input that ends inside a block exits 1."""
    while True:
        try:
            entry = reader.read()
        except ChatInputError as e:
            raise CLIError(str(e)) from None
        if entry is None:
            return
        try:
            if entry.command:
                if not chat.command(entry.text):
                    return
            else:
                chat.turn(entry.text)
        except ChatInputError as e:
            print(f"adakv-local: {e}", file=sys.stderr, flush=True)
