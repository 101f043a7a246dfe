"""Chunk planning: how a prompt longer than the cache's free cells is read (a pure function).

``Llama.eval`` reads such a prompt in chunks, compressing in between, with the prompt's last
``window`` tokens (the question) as a probe that scores each compression. Which chunk comes next
depends only on the tokens left, the cells the cache holds now (after the last compression, whose
size is known only once it is done), the cache's size, the window and the largest chunk allowed:
:func:`next_chunk` decides it, and ``Llama`` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkStep:
    """One step of reading a long prompt.

    kind: ``"last"``: the ``take`` tokens left and the window fit: evaluate them and compress as
    for any prompt (the end); ``"probe"``: too little room for a useful chunk: compress what the
    cache holds, scored by the probe, and plan again; ``"chunk"``: evaluate the next ``take``
    tokens, then compress them with the probe if ``compress`` (the rest would not fit after them).
    """

    kind: str
    take: int = 0
    compress: bool = False


def next_chunk(left: int, cells: int, n_ctx: int, window: int, chunk: int | None) -> ChunkStep:
    """The next step of reading ``left`` more prompt tokens (the window not counted) into a cache
    of ``n_ctx`` cells that holds ``cells`` now, in chunks of at most ``chunk`` tokens (None: as
    many as fit). Every step leaves room for the window after what it evaluates."""
    if left < 0 or cells < 0 or window < 0 or n_ctx < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"next_chunk: invalid arguments left={left}, cells={cells}, n_ctx={n_ctx}, "
                         f"window={window}, chunk={chunk}")
    room = n_ctx - cells - window
    if left <= room and (chunk is None or left <= chunk):
        return ChunkStep("last", left)
    if room < min(window, left):  # no useful room left (a long history before this prompt)
        return ChunkStep("probe")
    take = min(left, room, chunk or left)
    left_next = left - take
    compress = left_next > 0 and min(left_next, chunk or left_next) > n_ctx - (cells + take) - window
    return ChunkStep("chunk", take, compress)
