"""Saved conversation states: a prompt cache for ``Llama.set_cache``, bounded in bytes.

llama-cpp-python's ``Llama`` looks its cache up before every completion (the saved state whose
tokens share the longest prefix with the prompt, loaded when that prefix is longer than what the
context holds) and saves the context's state into it after every completion. With eviction the
state is the compressed cache (``Llama.save_state``), so a conversation costs its compressed cells
(budget x layers x KV heads), not its length: many conversations fit where a full cache fits a
few. :class:`ConversationCache` is that cache with every byte of a state counted (llama-cpp-python's
``LlamaRAMCache`` counts only the native part) and kept in RAM or, with ``directory``, in files;
llama-cpp-python's own caches work too.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _lib

_lib.bind_llama_cpp()  # before llama_cpp is imported

import llama_cpp  # noqa: E402
from llama_cpp.llama_cache import BaseLlamaCache  # noqa: E402

#: the arrays of a state file (np.savez, uncompressed)
_FIELDS = ("tokens", "input_ids", "scores", "n_tokens", "seed", "llama_state")


def state_bytes(state: llama_cpp.LlamaState) -> int:
    """The bytes a saved state holds: the native state (KV cells, layout, logits) and the arrays."""
    return int(state.llama_state_size) + int(state.scores.nbytes) + int(state.input_ids.nbytes)


@dataclass
class _Entry:
    tokens: np.ndarray  # the key: the conversation's tokens (prompt and completion)
    nbytes: int
    saved: float  # time.time() when it was stored
    state: llama_cpp.LlamaState | None = None  # in RAM; None: in its file
    path: Path | None = None


@dataclass(frozen=True)
class CacheEntry:
    """One saved conversation, as :meth:`ConversationCache.entries` lists it."""

    tokens: int
    nbytes: int
    age_seconds: float


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading tokens a and b share."""
    m = min(a.shape[0], b.shape[0])
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if differ.size else m


class ConversationCache(BaseLlamaCache):
    """Saved conversation states, least recently used first out, at most ``capacity_bytes`` in all.

    Args:
        capacity_bytes: the most bytes the saved states hold together (every byte of each state:
            its native part, token history and logits table); a state larger than that is not kept.
        directory: keep the states in files there (one per conversation) instead of in RAM; the
            states already there are used (a server restarted on the same model and settings
            resumes its conversations). Use one directory per model and context settings: a state
            only loads into a context like the one that saved it.

    ``hits`` / ``misses`` count lookups that found a conversation sharing a prefix with the prompt
    or none. Thread-safe (one lock around the index); llama-cpp-python calls it from the thread that
    runs the completion.
    """

    def __init__(self, capacity_bytes: int = 1 << 30, directory: str | os.PathLike[str] | None = None) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be an integer >= 0, got {capacity_bytes!r}")
        super().__init__(capacity_bytes)
        self.directory = Path(directory).expanduser() if directory is not None else None
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._read_directory()

    # -- BaseLlamaCache --------------------------------------------------------------------------------

    @property
    def cache_size(self) -> int:
        """The bytes the saved states hold now."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:  # llama-cpp-python tests `if self.cache:`; an empty cache is a cache
        return True

    def __contains__(self, key: Sequence[int]) -> bool:
        with self._lock:
            return self._longest(_tokens(key)) is not None

    def __getitem__(self, key: Sequence[int]) -> llama_cpp.LlamaState:
        """The saved state whose tokens share the longest prefix with ``key`` (KeyError: none shares
        one); it becomes the most recently used."""
        with self._lock:
            name = self._longest(_tokens(key))
            if name is None:
                self.misses += 1
                raise KeyError("no saved conversation shares a prefix with this prompt")
            self.hits += 1
            self._entries.move_to_end(name)
            entry = self._entries[name]
        if entry.state is not None:
            return entry.state
        assert entry.path is not None
        try:
            return _read_state(entry.path)
        except (OSError, ValueError, KeyError) as e:
            self._drop(name)
            print(f"adakv-local: the saved conversation {entry.path} cannot be read ({e}); it was removed from the "
                  "cache", file=sys.stderr)
            raise KeyError("the saved conversation cannot be read") from None

    def __setitem__(self, key: Sequence[int], value: llama_cpp.LlamaState) -> None:
        """Save a state under the conversation's tokens (replacing one saved under the same tokens),
        then drop the least recently used states until the cache is within its capacity."""
        tokens = _tokens(key)
        name = _name(tokens)
        nbytes = state_bytes(value)
        self._drop(name)
        if nbytes > self.capacity_bytes:
            return
        entry = _Entry(tokens=tokens, nbytes=nbytes, saved=time.time())
        if self.directory is None:
            entry.state = value
        else:
            entry.path = self.directory / f"{name.hex()}.npz"
            _write_state(entry.path, tokens, value)
        with self._lock:
            self._entries[name] = entry
            dropped = self._over_capacity()
        for e in dropped:
            _remove(e)

    # -- inspection -------------------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """The saved conversations, least recently used first."""
        now = time.time()
        with self._lock:
            return [CacheEntry(int(e.tokens.shape[0]), e.nbytes, round(now - e.saved, 3))
                    for e in self._entries.values()]

    def clear(self) -> None:
        """Drop every saved state (and its file)."""
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for e in entries:
            _remove(e)

    # -- internals --------------------------------------------------------------------------------------

    def _longest(self, tokens: np.ndarray) -> bytes | None:
        best, best_len = None, 0
        for name, e in self._entries.items():
            n = common_prefix(e.tokens, tokens)
            if n > best_len:
                best, best_len = name, n
        return best

    def _over_capacity(self) -> list[_Entry]:
        """Pop the least recently used entries while over capacity (under the lock); returns them."""
        dropped = []
        total = sum(e.nbytes for e in self._entries.values())
        while total > self.capacity_bytes and self._entries:
            _, e = self._entries.popitem(last=False)
            total -= e.nbytes
            dropped.append(e)
        return dropped

    def _drop(self, name: bytes) -> None:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is not None:
            _remove(entry)

    def _read_directory(self) -> None:
        """Index the state files already in the directory, oldest first; unreadable ones are skipped."""
        assert self.directory is not None
        found = []
        for path in self.directory.glob("*.npz"):
            try:
                with np.load(path) as f:
                    tokens = np.asarray(f["tokens"], dtype=np.int32)
                found.append((path.stat().st_mtime, path, tokens))
            except (OSError, ValueError, KeyError) as e:
                print(f"adakv-local: skipping {path}: not a saved conversation ({e})", file=sys.stderr)
        for mtime, path, tokens in sorted(found, key=lambda t: t[0]):
            self._entries[_name(tokens)] = _Entry(tokens=tokens, nbytes=path.stat().st_size, saved=mtime, path=path)
        for e in self._over_capacity():
            _remove(e)


def _tokens(key: Sequence[int]) -> np.ndarray:
    return np.asarray(key, dtype=np.int32).reshape(-1)


def _name(tokens: np.ndarray) -> bytes:
    return hashlib.sha1(tokens.tobytes()).digest()


def _remove(entry: _Entry) -> None:
    if entry.path is not None:
        entry.path.unlink(missing_ok=True)


def _write_state(path: Path, tokens: np.ndarray, state: llama_cpp.LlamaState) -> None:
    """One state file (written aside, then renamed: a crash leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, tokens=tokens, input_ids=np.asarray(state.input_ids), scores=np.asarray(state.scores),
                 n_tokens=np.int64(state.n_tokens), seed=np.int64(state.seed),
                 llama_state=np.frombuffer(state.llama_state, dtype=np.uint8))
    os.replace(tmp, path)


def _read_state(path: Path) -> llama_cpp.LlamaState:
    with np.load(path) as f:
        missing = [k for k in _FIELDS if k not in f.files]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        blob = f["llama_state"].tobytes()
        return llama_cpp.LlamaState(input_ids=f["input_ids"], scores=f["scores"], n_tokens=int(f["n_tokens"]),
                                    llama_state=blob, llama_state_size=len(blob), seed=int(f["seed"]))
