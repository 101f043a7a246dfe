"""``adakv-local chat``: a terminal chat whose KV cache is compressed after every user turn.

On a terminal: a ``you>`` prompt with readline editing and history, replies streamed, a progress
bar on stderr while a long turn is read. Driven through a pipe: one user message per input line,
each reply on stdout ending with a newline, no prompts or banners. Lines starting with ``/`` are
commands: ``/stats``, ``/reset``, ``/help``, ``/exit`` (EOF, Ctrl-D, ends the chat as well).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import AdaKVConfig
from ..progress import PrefillProgress
from .errors import EXIT_OK, CLIError

DEFAULT_BUDGET = 256
DEFAULT_N_CTX = 4096

HELP_TEXT = """commands:
  /stats   what the last turn did to the cache (compressed or why not), and its figures
  /reset   forget the conversation and clear the KV cache
  /help    this text
  /exit    end the chat (so does Ctrl-D)"""

EPILOG = f"""examples:
  adakv-local chat
  adakv-local chat --system "You are a terse assistant." --budget 128
  printf 'What is a KV cache?\\n/stats\\n/exit\\n' | adakv-local chat --max-tokens 64

{HELP_TEXT}

The whole conversation is the prompt of each turn; llama-cpp-python reuses the cached part, so
only the new turn is read, and the cache is then compressed back to the budget ({DEFAULT_BUDGET} cells
per KV head by default, of the order the Ada-KV paper evaluates; raise it if replies lose track
of earlier turns). Evicted tokens do not come back. The conversation is still limited to --n-ctx
tokens in all (llama-cpp-python counts positions, not cells); /reset starts over.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "chat", help="interactive chat, the KV cache compressed after each user turn",
        description="Chat with a model in the terminal (or through a pipe: one message per line). The KV "
        "cache is compressed with Ada-KV per-head eviction after each user turn that takes it above the budget.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .common import add_model_arguments

    add_model_arguments(
        p, n_ctx_default=None,
        n_ctx_help=f"context size in tokens: the longest conversation (default: {DEFAULT_N_CTX}, at most the "
        "model's trained context; more needs --allow-context-overflow)",
        max_tokens_help="longest reply, in tokens (default: 256)",
    )
    p.add_argument("--system", metavar="TEXT", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--quiet", "-q", action="store_true", help="no banner, progress bar or per-turn stats on stderr")
    AdaKVConfig.add_arguments(p, budget_default=DEFAULT_BUDGET)
    p.set_defaults(func=run)
    return p


class _Input:
    """Lines from stdin: input() with readline on a terminal, plain lines from a pipe."""

    def __init__(self) -> None:
        self.tty = sys.stdin.isatty() and sys.stdout.isatty()
        if self.tty:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:  # Windows
                pass

    def read(self) -> str | None:
        if self.tty:
            try:
                return input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return None
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")


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
        """Run a /command; False ends the chat."""
        from .common import describe_adakv_stats, format_stats

        name = line.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
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
        except _NotAnswered as e:
            progress.finish()
            self.history.pop()
            print(f"adakv-local: {e}", file=sys.stderr, flush=True)
            return
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
                raise _NotAnswered(f"that message was not answered: with it the conversation does not fit in the "
                               f"{llm.n_ctx()}-token context ({e}); /reset to start over, or restart with a larger "
                               "--n-ctx") from None
            raise _NotAnswered(f"that message was not answered: {e}") from None  # e.g. the chat template's checks
        except RuntimeError as e:
            if "cannot rewind" not in str(e):
                raise CLIError(f"generation failed: {e}") from None
            # the template re-rendered the history differently inside the compressed part: read it again
            llm.reset()
            yield from llm.create_chat_completion(**kwargs)


class _NotAnswered(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    from .common import check_n_ctx, config_from_args, load_llama, model_info, resolve_model_arg

    cfg = config_from_args(args)
    model = resolve_model_arg(args.model, quiet=args.quiet)
    n_train = model_info(model).n_ctx_train
    check_n_ctx(args.n_ctx, model, n_train, args)
    reader = _Input()
    n_ctx = args.n_ctx or (min(DEFAULT_N_CTX, n_train) if n_train else DEFAULT_N_CTX)
    llm = load_llama(model, cfg, args, n_ctx)
    try:
        chat = Chat(llm, cfg, args, reader.tty)
        if reader.tty and not args.quiet:
            eviction = "full cache" if cfg.method == "full" else f"{cfg.method}, budget {cfg.budget}"
            print(f"[adakv-local] chat with {model.name}: {eviction}, context {llm.n_ctx()} "
                  "tokens. /help for commands, Ctrl-D to quit.", file=sys.stderr)
        while True:
            line = reader.read()
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not chat.command(line):
                    break
                continue
            chat.turn(line)
    finally:
        llm.close()
    return EXIT_OK
