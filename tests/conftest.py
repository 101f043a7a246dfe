"""Shared fixtures: tiny random-weight models, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer llama GGUF with GQA (4 query / 2 KV heads), f32 random weights."""
    from adakv_local.testing import write_llama_gguf

    return write_llama_gguf(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", seed=1)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    """A small gemma3 GGUF with iSWA (sliding-window and global layers)."""
    from adakv_local.testing import write_gemma3_gguf

    return write_gemma3_gguf(tmp_path_factory.mktemp("models") / "tiny-gemma3.gguf", seed=2)


@pytest.fixture(scope="session")
def tiny64(tmp_path_factory) -> Path:
    """Tiny llama with head size 64 (so that q8_0 / q4_0 head rows are whole 4-byte words)."""
    from adakv_local.testing import write_llama_gguf

    path = tmp_path_factory.mktemp("models") / "tiny64.gguf"
    return write_llama_gguf(path, n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, seed=11)
