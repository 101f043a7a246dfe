"""Real documents, written by others, found among the files installed on this machine.

Instruction fidelity (``adakv_local.eval.instruct``) needs long documents that nobody here wrote, of
several kinds: prose, reference text, markup, tables of numbers, logs. No data set can be
downloaded, so they are taken from files that ship with the operating system and with Python:

* Python itself: its ``LICENSE.txt`` and the reference topics of ``pydoc_data.topics`` (the text of
  ``help('FORMATTING')``, always present where Python is);
* this project's own dependency ``llama-cpp-python`` (its README, as the package metadata);
* Debian / Ubuntu packages present on nearly every such machine: ``base-files``
  (``/usr/share/common-licenses``), ``netbase`` (``/etc/services``), ``tzdata``, ``gzip``,
  ``xz-utils``, ``tar``, ``grep``, ``bash`` (their manuals, man pages and release notes).

A document that is not on the machine (a slim container, macOS, a distribution that strips
``/usr/share/doc``) is reported by :func:`find_documents` as a :class:`Missing` record that says
where it was looked for and which package installs it; nothing raises. Every document records the
path it was read from.

Each document comes with questions written for it (answered from the document by a reader, not by
a model) for the question-answering prompts: the first one, and for the documents of 3000 tokens
or more two further ones (``more_questions``: one answered in the first half of the document's
first 4000 SmolLM2 tokens, one in the second half), so that a mean over the answers does not
rest on one passage per document.
"""

from __future__ import annotations

import gzip
import importlib.util
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

KINDS: tuple[str, ...] = ("prose", "reference", "markup", "table", "log")


@dataclass(frozen=True)
class Document:
    """A real document: its text and where it came from.

    name: short identifier (``gpl-2``). kind: one of :data:`KINDS`. source: the file it was read
    from (``pydoc_data/topics.py#formatstrings`` for an entry inside a file). question: a
    question about its content, for the question prompts; more_questions: further ones.
    package: what installs it.
    """

    name: str
    kind: str
    source: str
    text: str
    question: str
    package: str
    more_questions: tuple[str, ...] = ()

    @property
    def questions(self) -> tuple[str, ...]:
        """The question and the further ones, in order."""
        return (self.question, *self.more_questions)


@dataclass(frozen=True)
class Missing:
    """A document that is not on this machine: where it was looked for and what installs it."""

    name: str
    reason: str


@dataclass(frozen=True)
class Spec:
    """How to find one document. ``locate`` returns (source label, text) or raises LookupError."""

    name: str
    kind: str
    package: str
    question: str
    locate: Callable[[], tuple[str, str]]
    more_questions: tuple[str, ...] = ()


def _read(path: Path) -> str:
    """A text file, gunzipped if its name ends in .gz; undecodable bytes replaced."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _file(*candidates: str) -> Callable[[], tuple[str, str]]:
    """The first of the candidate paths that exists (a path may end in .gz)."""

    def locate() -> tuple[str, str]:
        for c in candidates:
            p = Path(c)
            if p.is_file():
                return str(p), _read(p)
        raise LookupError(f"none of {', '.join(candidates)} exists")

    return locate


def _python_license() -> tuple[str, str]:
    for base in (sys.base_prefix, sys.prefix):
        p = Path(base) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"
        if p.is_file():
            return str(p), _read(p)
    raise LookupError(f"no LICENSE.txt in the standard library of {sys.base_prefix} (Debian ships it separately)")


def _pydoc_topic(key: str) -> Callable[[], tuple[str, str]]:
    def locate() -> tuple[str, str]:
        spec = importlib.util.find_spec("pydoc_data.topics")
        if spec is None or spec.origin is None:
            raise LookupError("this Python has no pydoc_data.topics (a build without its documentation topics)")
        from pydoc_data.topics import topics

        if key not in topics:
            raise LookupError(f"pydoc_data.topics of Python {sys.version.split()[0]} has no topic {key!r}")
        return f"{spec.origin}#{key}", topics[key]

    return locate


def _dist_readme(dist: str) -> Callable[[], tuple[str, str]]:
    def locate() -> tuple[str, str]:
        try:
            md = metadata.metadata(dist)
        except metadata.PackageNotFoundError:
            raise LookupError(f"the Python package {dist} is not installed") from None
        body = md.get_payload() if hasattr(md, "get_payload") else None  # type: ignore[attr-defined]
        text = body or md.get("Description") or ""
        if not text.strip():
            raise LookupError(f"the metadata of {dist} has no long description")
        files = metadata.files(dist) or []
        meta = next((f for f in files if f.name == "METADATA"), None)
        source = str(meta.locate()) if meta is not None else f"{dist} METADATA"
        return source, text

    return locate


SPECS: tuple[Spec, ...] = (
    Spec("gpl-2", "prose", "base-files", "What must accompany the Program when you distribute it in object code "
         "or executable form?", _file("/usr/share/common-licenses/GPL-2"),
         more_questions=("Under Section 2, what must modified files carry?",
                         "If the Program does not specify a version number of the License, which version may you "
                         "choose?")),
    Spec("mpl-2.0", "prose", "base-files", "What happens to your rights under this License if you fail to comply "
         "with it?", _file("/usr/share/common-licenses/MPL-2.0"),
         more_questions=("When do the licenses granted in Section 2.1 become effective for a Contribution?",
                         "Who is the license steward of the Mozilla Public License?")),
    Spec("python-license", "table", "python (the standard library)", "According to the table, who owns "
         "Python 2.0, and in which year was it released?", _python_license,
         more_questions=("Starting with which Python version are code examples in the documentation dual licensed?",
                         "By the law of which state is the BeOpen Python license agreement governed?")),
    Spec("py-formatstrings", "reference", "python (pydoc_data)", "What does the presentation type 'x' do for "
         "integers?", _pydoc_topic("formatstrings"),
         more_questions=("What does the '^' alignment option do?",
                         "What does the '+' sign option indicate?")),
    Spec("py-debugger", "reference", "python (pydoc_data)", "Which command sets a breakpoint in the debugger?",
         _pydoc_topic("debugger"),
         more_questions=("What is the debugger's prompt that indicates you are in debug mode?",
                         "What happens when you enter a blank line at the debugger prompt?")),
    Spec("llama-cpp-python-readme", "markup", "llama-cpp-python (pip)", "Which command installs llama-cpp-python?",
         _dist_readme("llama_cpp_python"),
         more_questions=("Which environment variable must be set before installing to get CUDA support?",
                         "Which class provides the simple managed interface of the high-level API?")),
    Spec("man-tar", "markup", "tar (Debian: /usr/share/man)", "What does the -c option of tar do?",
         _file("/usr/share/man/man1/tar.1.gz", "/usr/share/man/man1/tar.1"),
         more_questions=("According to the man page, what does the name tar stand for?",
                         "What does the --ignore-failed-read option of tar do?")),
    Spec("man-grep", "markup", "grep (Debian: /usr/share/man)", "What does the -i option of grep do?",
         _file("/usr/share/man/man1/grep.1.gz", "/usr/share/man/man1/grep.1"),
         more_questions=("What does the -F option of grep do?",
                         "What does the -c option of grep do?")),
    Spec("etc-services", "table", "netbase", "Which port number and protocol does the ssh service use?",
         _file("/etc/services"),
         more_questions=("Which port number and protocol does the ntp service use?",
                         "Which port number and protocol does the postgresql service use?")),
    Spec("tz-zone1970", "table", "tzdata", "What are the coordinates of Europe/Andorra?",
         _file("/usr/share/zoneinfo/zone1970.tab"),
         more_questions=("In what format are the latitude and longitude of each timezone's principal location given?",
                         "Which timezone is listed for the Canary Islands?")),
    Spec("gzip-news", "log", "gzip (Debian: /usr/share/doc)", "What changed in the behaviour of 'gzip -l' in "
         "release 1.12?", _file("/usr/share/doc/gzip/NEWS.gz", "/usr/share/doc/gzip/NEWS"),
         more_questions=("Which option did gzip release 1.6 add for consistency with tools like xz, lzip and bzip2?",
                         "Which CVE was fixed in gzip release 1.4?")),
    Spec("xz-readme", "prose", "xz-utils (Debian: /usr/share/doc)", "Which compression filter is the primary "
         "filter of the .xz format?", _file("/usr/share/doc/xz-utils/README.gz", "/usr/share/doc/xz-utils/README")),
    Spec("bash-posix", "reference", "bash (Debian: /usr/share/doc)", "How do you start bash in POSIX mode?",
         _file("/usr/share/doc/bash/POSIX.gz", "/usr/share/doc/bash/POSIX")),
)  # fmt: skip


def find_documents(names: Iterable[str] | None = None, specs: Sequence[Spec] = SPECS
                   ) -> tuple[list[Document], list[Missing]]:
    """The documents of ``specs`` (all, or those named) present here, and those that are not.

    Never raises for a missing or unreadable file: it becomes a :class:`Missing` naming where it was
    looked for and the package that installs it. Unknown names raise ValueError.
    """
    by_name = {s.name: s for s in specs}
    wanted = list(by_name) if names is None else list(names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"documents: unknown name(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    found: list[Document] = []
    missing: list[Missing] = []
    for name in wanted:
        s = by_name[name]
        try:
            source, text = s.locate()
        except (LookupError, OSError, ValueError) as e:  # ValueError: a corrupt .gz
            missing.append(Missing(name, f"{e} (installed by {s.package})"))
            continue
        if not text.strip():
            missing.append(Missing(name, f"{source} is empty (installed by {s.package})"))
            continue
        found.append(Document(name=s.name, kind=s.kind, source=source, text=text.strip(), question=s.question,
                              package=s.package, more_questions=s.more_questions))
    return found, missing


def cut_to_tokens(text: str, count: Callable[[str], int], max_tokens: int) -> str:
    """The longest run of ``text``'s first lines whose token count is at most ``max_tokens``.

    ``count`` maps text to its number of tokens. Cut at a line boundary (a single line longer than
    the limit is cut at a character boundary); a text that fits is returned whole.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens: expected an int >= 1, got {max_tokens!r}")
    if count(text) <= max_tokens:
        return text
    lines = text.splitlines(keepends=True)
    lo, hi = 0, len(lines)  # count(first lo lines) <= max_tokens < count(first hi lines)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count("".join(lines[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        chars = lines[0]
        a, b = 0, len(chars)
        while b - a > 1:
            mid = (a + b) // 2
            if count(chars[:mid]) <= max_tokens:
                a = mid
            else:
                b = mid
        return chars[:a].rstrip()
    return "".join(lines[:lo]).rstrip()
