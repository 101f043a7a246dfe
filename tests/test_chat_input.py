"""Multi-line input in `adakv-local chat`: pastes, \"\"\" blocks, /file, and stdin through a pipe.

The reader is tested on lists of lines (what a terminal or a pipe hands over), on a real pseudo
terminal (bracketed paste with and without GNU readline), and end to end: `chat` with a tiny
random model, in-process with the user turns recorded, and as a subprocess in a pty.
"""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli_run import _cmd

from adakv_local.cli import chat as chat_mod
from adakv_local.cli.chat import BLOCK, PASTE_END, PASTE_OFF, PASTE_ON, PASTE_START, ChatInputError, Entry, Reader

LICENSE = "Apache License\nVersion 2.0, January 2004\n\n1. Definitions.\n\"License\" shall mean the terms."


def entries(lines: list[str], prompts: bool = False) -> list[Entry]:
    feed: Iterator[str] = iter(lines)
    reader = Reader(lambda prompt: next(feed, None), prompts=prompts)
    return list(iter(reader.read, None))


def test_typed_lines_and_commands():
    got = entries(["hello", "  ", "/stats", "  two words  ", "/file a.md what?"])
    assert got == [Entry("hello"), Entry("/stats", command=True), Entry("two words"),
                   Entry("/file a.md what?", command=True)]


def test_a_raw_paste_is_one_message_ending_at_the_enter_after_it():
    # a terminal without readline hands the paste over line by line, with its markers
    lines = [f"{PASTE_START}{LICENSE.splitlines()[0]}", *LICENSE.splitlines()[1:-1],
             f"{LICENSE.splitlines()[-1]}{PASTE_END} Summarize it.", "next"]
    assert entries(lines) == [Entry(f"{LICENSE} Summarize it."), Entry("next")]


def test_text_typed_before_a_paste_and_two_pastes_on_one_line():
    lines = [f"Read this: {PASTE_START}a", f"b{PASTE_END} and {PASTE_START}c", f"d{PASTE_END}"]
    assert entries(lines) == [Entry("Read this: a\nb and c\nd")]


def test_a_readline_paste_is_one_message_even_when_it_looks_like_a_command_or_block():
    # GNU readline reads the markers itself and returns the paste, newlines and all, as one line
    assert entries(["/etc/hosts lists\nhost names"]) == [Entry("/etc/hosts lists\nhost names")]
    assert entries([f'{BLOCK}\nquoted\n{BLOCK}', "x"]) == [Entry(f'{BLOCK}\nquoted\n{BLOCK}'), Entry("x")]


def test_a_paste_cut_by_the_end_of_input_is_sent():
    assert entries([f"{PASTE_START}one", "two"]) == [Entry("one\ntwo")]


def test_a_stray_end_marker_is_dropped():
    assert entries([f"hi{PASTE_END}"]) == [Entry("hi")]


@pytest.mark.parametrize("lines, text", [
    ([BLOCK, "first line", "", "  indented", "/stats is text", BLOCK], "first line\n\n  indented\n/stats is text"),
    ([f"{BLOCK}Summarize:", "a", f"b{BLOCK}"], "Summarize:\na\nb"),
    ([f"{BLOCK}one line{BLOCK}"], "one line"),
    ([BLOCK, "", "text", "", f"{BLOCK}  "], "text"),
    ([BLOCK, f"{PASTE_START}pasted", f"lines{PASTE_END}", BLOCK], "pasted\nlines"),
])
def test_a_block_is_one_message(lines, text):
    assert entries([*lines, "after"]) == [Entry(text), Entry("after")]


def test_an_empty_block_sends_nothing():
    assert entries([BLOCK, "  ", BLOCK, "x"]) == [Entry("x")]


def test_input_that_ends_inside_a_block_is_an_error_naming_its_line():
    feed = iter(["hello", BLOCK, "never closed"])
    reader = Reader(lambda prompt: next(feed, None), prompts=False)
    assert reader.read() == Entry("hello")
    with pytest.raises(ChatInputError, match=r'line 2, .*was not sent.*close it with a line """'):
        reader.read()


def test_prompts_only_on_a_terminal():
    seen: list[str] = []
    feed = iter([BLOCK, "a", BLOCK, "b"])

    def lines(prompt: str) -> str | None:
        seen.append(prompt)
        return next(feed, None)

    assert list(iter(Reader(lines, prompts=True).read, None)) == [Entry("a"), Entry("b")]
    assert seen == ["you> ", "...> ", "...> ", "you> ", "you> "]
    seen.clear()
    feed = iter([BLOCK, "a", BLOCK])
    list(iter(Reader(lines, prompts=False).read, None))
    assert set(seen) == {""}


def test_ctrl_c_inside_a_block_on_a_terminal_discards_the_block(capsys):
    feed = iter([BLOCK, "half a thought", KeyboardInterrupt, "hello"])

    def lines(prompt: str) -> str | None:
        item = next(feed, None)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    assert list(iter(Reader(lines, prompts=True).read, None)) == [Entry("hello")]
    assert "block discarded" in capsys.readouterr().err


# -- /file ------------------------------------------------------------------------------------------


def test_file_command_reads_a_document_and_the_question(tmp_path):
    doc = tmp_path / "my notes.md"
    doc.write_text(LICENSE + "\n")
    assert chat_mod.file_message(f'/file "{doc}" What is it?') == f"{LICENSE}\n\nWhat is it?"
    assert chat_mod.file_message(f"/file '{doc}'") == LICENSE
    plain = tmp_path / "notes.md"
    plain.write_text(LICENSE)
    assert chat_mod.file_message(f"/FILE {plain}   Who wrote it? ") == f"{LICENSE}\n\nWho wrote it?"


@pytest.mark.parametrize("name, data, reason", [
    ("missing.md", None, "cannot read {path}: No such file or directory"),
    ("folder", "dir", "cannot read {path}: Is a directory"),
    ("empty.md", b" \n\n", "{path} is empty: nothing to send"),
    ("elf.bin", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4, "{path} is not text: it has NUL bytes"),
    ("latin1.txt", "Caf\u00e9 cr\u00e8me. ".encode("latin-1") * 10, "{path} is not UTF-8 text (byte 0xe9"),
])
def test_file_command_says_what_is_wrong_with_the_file(tmp_path, name, data, reason):
    path = tmp_path / name
    if data == "dir":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data)
    with pytest.raises(ChatInputError) as e:
        chat_mod.file_message(f"/file {path} question")
    assert str(e.value).startswith("/file: ") and reason.format(path=path) in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_file_command_on_an_unreadable_file(tmp_path):
    path = tmp_path / "secret.md"
    path.write_text("text")
    path.chmod(0)
    with pytest.raises(ChatInputError, match="cannot read .*secret.md: Permission denied"):
        chat_mod.file_message(f"/file {path}")


@pytest.mark.parametrize("line, message", [
    ("/file", "/file needs a path: /file PATH [QUESTION]"),
    ("/file   ", "/file needs a path: /file PATH [QUESTION]"),
    ('/file "no end', "/file: the path has no closing \""),
])
def test_file_command_usage(line, message):
    with pytest.raises(ChatInputError, match=re.escape(message)):
        chat_mod.file_message(line)


# -- the chat loop, in-process with a tiny model ------------------------------------------------------


class _Stdin(io.TextIOWrapper):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def run_chat(tiny_llama, monkeypatch, capsys):
    """Run `adakv-local chat` in-process on bytes for stdin; returns (exit code, user turns, stdout, stderr)."""
    from adakv_local import cli

    def run(data: bytes, *flags: str) -> tuple[int, list[str], str, str]:
        turns: list[str] = []
        original = chat_mod.Chat.turn

        def turn(self: Any, text: str) -> None:
            turns.append(text)
            original(self, text)

        monkeypatch.setattr(chat_mod.Chat, "turn", turn)
        monkeypatch.setattr(sys, "stdin", _Stdin(io.BytesIO(data), encoding="utf-8"))
        code = cli.main(["chat", "--model", str(tiny_llama), "--max-tokens", "2", "--threads", "1", *flags])
        out = capsys.readouterr()
        return code, turns, out.out, out.err

    return run


def test_piped_stdin_is_one_message(run_chat):
    code, turns, out, err = run_chat(f"{LICENSE}\n/stats\n\nWhat is it?\n".encode())
    assert code == 0, err
    assert turns == [f"{LICENSE}\n/stats\n\nWhat is it?"]
    assert out.strip() and out.endswith("\n") and err == ""
    assert "last eviction" not in out and "no eviction yet" not in out  # /stats was text, not a command


def test_piped_stdin_that_is_empty_or_binary_is_refused(run_chat):
    code, turns, out, err = run_chat(b" \n\n")
    assert code == 1 and turns == [] and out == ""
    assert err.strip() == ("adakv-local: error: stdin is empty: nothing to send (pipe a message or a document; "
                           "--lines reads one message or /command per line)")
    code, turns, out, err = run_chat(b"\x7fELF\x00\x01" * 100)
    assert code == 1 and turns == [] and "stdin is not text: it has NUL bytes" in err


def test_lines_mode_reads_messages_blocks_commands_and_files(run_chat, tmp_path):
    doc = tmp_path / "license.txt"
    doc.write_text(LICENSE)
    script = (f"first\n{BLOCK}\ntwo\nlines\n{BLOCK}\n/file {doc} Who wrote it?\n/file {tmp_path}/nope.md\n"
              "/stats\n/exit\nnever sent\n")
    code, turns, out, err = run_chat(script.encode(), "--lines")
    assert code == 0, err
    assert turns == ["first", "two\nlines", f"{LICENSE}\n\nWho wrote it?"]
    assert f"adakv-local: /file: cannot read {tmp_path}/nope.md: No such file or directory" in err
    assert "last turn:" in out


def test_lines_mode_with_an_unclosed_block_fails(run_chat):
    code, turns, out, err = run_chat(f"hello\n{BLOCK}\nunfinished\n".encode(), "--lines")
    assert code == 1 and turns == ["hello"]
    assert 'adakv-local: error: input ended inside the """ block opened on line 2' in err


def test_help_explains_the_input_modes():
    from adakv_local.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["chat"]
    text = " ".join(sub.format_help().split())
    for words in ("/file PATH [QUESTION]", 'a line starting with """', "a paste is one message",
                  "all of stdin is one message", "--lines"):
        assert words in text, words


# -- on a real terminal (pty) -----------------------------------------------------------------------


def _gnu_readline_8() -> bool:
    try:
        import readline
    except ImportError:
        return False
    version = getattr(readline, "_READLINE_LIBRARY_VERSION", "0")
    return "libedit" not in (readline.__doc__ or "") and tuple(int(x) for x in version.split(".")[:2]) >= (8, 1)


def _pty_run(argv: list[str], steps: list[tuple[str, bytes]], timeout: float = 120,
             stderr_on_tty: bool = False) -> tuple[int, bytes, bytes]:
    """Run argv with stdin and stdout on a pty, stderr on a pipe (or the pty too); for each step wait for
    the text on the terminal, then type the bytes. Returns (exit code, terminal output, stderr)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave if stderr_on_tty else subprocess.PIPE,
                            close_fds=True, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    out, err = b"", b""
    deadline = time.monotonic() + timeout
    pending, pos = list(steps), 0
    watched = [master] if stderr_on_tty else [master, proc.stderr.fileno()]
    try:
        while watched:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"timed out; terminal: {out!r}; stderr: {err!r}")
            ready, _, _ = select.select(watched, [], [], 0.1)
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    watched.remove(fd)
                elif fd == master:
                    out += chunk
                else:
                    err += chunk
            found = out.find(pending[0][0].encode(), pos) if pending else -1
            if found >= 0:
                pos = found + len(pending[0][0])
                os.write(master, pending.pop(0)[1])
    finally:
        os.close(master)
    if proc.stderr is not None:
        proc.stderr.close()
    return proc.wait(), out, err


_READER_CHILD = textwrap.dedent("""
    import sys
    if sys.argv[1] == "plain":
        sys.modules["readline"] = None  # input() then reads the terminal's lines as they come
    from adakv_local.cli.chat import Reader, terminal_lines
    reader = Reader(terminal_lines(sys.stdout), prompts=True)
    for entry in iter(reader.read, None):
        print("ENTRY", repr(entry.text), entry.command, flush=True)
    print("DONE", flush=True)
""")


@pytest.mark.parametrize("flavour", ["plain", "readline"])
def test_bracketed_paste_on_a_terminal(flavour):
    if flavour == "readline" and not _gnu_readline_8():
        pytest.skip("needs GNU readline >= 8.1 in this Python")
    paste = PASTE_START.encode() + LICENSE.replace("\n", "\r").encode() + PASTE_END.encode()
    steps = [("you> ", paste + b" Summarize.\r"), ("you> ", b"/stats\r"), ("you> ", b"\x04")]
    # without readline, input() writes its prompt to stderr: the terminal shows both
    code, out, err = _pty_run([sys.executable, "-c", _READER_CHILD, flavour], steps, timeout=60, stderr_on_tty=True)
    assert code == 0, out
    text = out.decode(errors="replace")
    got = re.findall(r"ENTRY .*", text.replace("\r", ""))
    assert got == [f"ENTRY {(LICENSE + ' Summarize.')!r} False", "ENTRY '/stats' True"], text
    assert text.count(PASTE_ON) == text.count(PASTE_OFF) >= 3  # on while reading a line, off after
    assert text.rfind(PASTE_OFF) > text.rfind(PASTE_ON) and "DONE" in text


def test_chat_on_a_terminal_answers_a_paste_once(tmp_path):
    from adakv_local.testing import write_llama_gguf

    tiny = write_llama_gguf(tmp_path / "tiny.gguf", seed=3)
    paste = PASTE_START.encode() + LICENSE.replace("\n", "\r").encode() + PASTE_END.encode() + b"\r"
    argv = [*_cmd(), "chat", "--model", str(tiny), "--max-tokens", "3", "--threads", "1"]
    code, out, err = _pty_run(argv, [("you> ", paste), ("you> ", b"/exit\r")])
    assert code == 0, (out, err)
    text = out.decode(errors="replace")
    status = [line for line in err.decode().splitlines() if line.startswith("[adakv-local] KV cache")]
    assert len(status) == 1, err  # one reply: the paste was one message
    assert text.count("you> ") == 2, text
    assert text.rfind(PASTE_OFF) > text.rfind(PASTE_ON)  # the terminal is left as it was


def test_readme_and_help_agree_on_stdin():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "adakv-local chat --lines" in readme and "/file PATH" in readme
