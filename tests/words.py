"""Seeded word salad for tests that need prompts of a given length (tokenized by tiny test models)."""

from __future__ import annotations

import numpy as np

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def text(n_words: int, seed: int) -> str:
    """n_words words drawn from WORDS with this seed."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))
