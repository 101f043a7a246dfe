"""The chunk planner (adakv_local.planning), without a model: seeded random reads of long prompts
with a simulated compression, checked for what Llama relies on."""

from __future__ import annotations

import random

import pytest

from adakv_local.planning import ChunkStep, next_chunk


def simulate(seed: int) -> None:
    """Read a prompt through a cache whose compressions leave between 1 and `bound` cells: the cache
    never holds more than n_ctx cells with the window, every step makes progress, and the prompt's
    tokens are all read, the last ones with the window."""
    rng = random.Random(seed)
    window = rng.randint(1, 64)
    bound = rng.randint(1, 512)  # the most cells a compression leaves (Llama's footprint bound)
    n_ctx = bound + 2 * window + rng.randint(0, 2048)  # what Llama._check_chunking requires
    chunk = rng.choice([None, rng.randint(1, 4096)])
    cells = rng.randint(0, n_ctx - window)  # a history before the prompt
    left = rng.randint(0, 50_000)
    total, steps = left, 0
    while True:
        step = next_chunk(left, cells, n_ctx, window, chunk)
        steps += 1
        assert steps <= 4 * total + 10, (seed, step)
        if step.kind == "last":
            assert step.take == left and cells + left + window <= n_ctx, (seed, cells, left)
            assert chunk is None or left <= chunk
            return
        if step.kind == "probe":
            assert cells > 0 and n_ctx - cells - window < min(window, left), (seed, cells)
            cells = rng.randint(min(cells, 1), min(cells, bound))  # compressed
            continue
        assert step.kind == "chunk" and 1 <= step.take <= left, (seed, step)
        assert cells + step.take + window <= n_ctx, (seed, cells, step)  # room for the probe after it
        assert chunk is None or step.take <= chunk
        cells += step.take
        left -= step.take
        if step.compress:
            cells = rng.randint(1, min(cells, bound))
        else:
            # not compressing: what comes next still fits after it (the next chunk or the rest)
            assert left == 0 or min(left, chunk or left) <= n_ctx - cells - window, (seed, cells, left)


@pytest.mark.parametrize("block", range(10))
def test_random_reads_of_long_prompts(block):
    for seed in range(block * 50, block * 50 + 50):
        simulate(seed)


def test_steps_by_hand():
    # 1000 tokens into 256 cells, window 8, nothing held: chunks of 248, each compressed
    assert next_chunk(1000, 0, 256, 8, None) == ChunkStep("chunk", 248, True)
    # the rest fits: the last step
    assert next_chunk(100, 40, 256, 8, None) == ChunkStep("last", 100)
    # a chunk limit splits what would fit
    assert next_chunk(100, 0, 256, 8, 64) == ChunkStep("chunk", 64, False)
    # a full cache: compress first
    assert next_chunk(100, 250, 256, 8, None) == ChunkStep("probe")
    with pytest.raises(ValueError, match="invalid arguments"):
        next_chunk(-1, 0, 256, 8, None)
