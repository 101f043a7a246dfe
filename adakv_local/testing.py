"""Tiny random-weight GGUF models for tests (and scripts): never imported by the runtime.

The files written here are real GGUF models that llama.cpp loads and runs:
they have the exact tensor names/shapes and metadata keys that llama.cpp's
loaders for ``LLM_ARCH_LLAMA`` (``src/models/llama.cpp``) and
``LLM_ARCH_GEMMA3`` (``src/models/gemma3.cpp``) expect, plus a small working
SentencePiece-style ("llama") vocabulary with byte fallback, so arbitrary text
(any UTF-8) can be tokenized and detokenized, and a chat template so chat code
paths work.  Weights are seeded random numbers, so output is gibberish but
deterministic for a given seed (same arguments => byte-identical file).

Generation properties (so tests behave predictably):

* logits of generatable tokens have std ~``logit_std`` (default 2; entropy
  ~3 nats out of ~4.6), independent of depth/width;
* only printable ASCII, ``"▁"`` (space) and the newline byte can be generated:
  all other tokens (specials incl. EOS/EOT, the other byte-fallback tokens,
  padding) get a logit offset of about -100 through a reserved constant
  "bias" channel (hidden dim 0: constant in every token embedding, never
  written by any layer, read by an untied ``output.weight``).  So generated
  text is always valid UTF-8 and generation always runs to ``max_tokens``.

Vocabulary layout (both writers): special tokens first, then the 256 byte
tokens ``<0x00>``..``<0xFF>``, then ``"▁"`` (SentencePiece's escaped space) and
the printable ASCII characters ``!``..``~`` as normal tokens, optionally padded
with ``<unused{i}>`` tokens up to ``n_vocab``.  Every printable ASCII character
and the space therefore maps to exactly one token; anything else falls back to
one token per UTF-8 byte.

Usage::

    from adakv_local.testing import write_llama_gguf, write_gemma3_gguf

    llama_path = write_llama_gguf(tmp_path / "tiny-llama.gguf")
    gemma_path = write_gemma3_gguf(tmp_path / "tiny-gemma3.gguf", sliding_window=8)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import gguf
import numpy as np

__all__ = [
    "CHATML_TEMPLATE",
    "GEMMA_TEMPLATE",
    "TinyVocab",
    "write_gemma3_gguf",
    "write_llama_gguf",
]

DType = Literal["f32", "f16"]
_WriterFn = Callable[["gguf.GGUFWriter"], None]

#: ChatML template (as used by SmolLM2 / Qwen); written into the tiny llama model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Gemma 3 style template (system prompt folded into the first user turn).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_SPM_SPACE = "\u2581"  # "▁"


@dataclass(frozen=True)
class TinyVocab:
    """A minimal SentencePiece ("llama" tokenizer model) vocabulary.

    Attributes:
        tokens: Token texts, index == token id.
        scores: SentencePiece scores (only used for merges; all single chars).
        types: ``gguf.TokenType`` values as ints.
        special: Special token name -> id (e.g. ``{"bos": 1, "eos": 2, ...}``).
    """

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    special: Mapping[str, int]

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def _build_vocab(specials: Sequence[tuple[str, str, gguf.TokenType]], n_vocab: int | None) -> TinyVocab:
    """Build special tokens + byte fallback + printable ASCII vocab.

    Args:
        specials: ``(role, text, type)`` triples in id order; ``role`` is the
            key under which the id is recorded in :attr:`TinyVocab.special`.
        n_vocab: Pad with ``<unused{i}>`` tokens up to this size (``None``:
            minimal size).
    """
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    special: dict[str, int] = {}
    for role, text, ttype in specials:
        special[role] = len(tokens)
        tokens.append(text)
        scores.append(0.0)
        types.append(int(ttype))
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(int(gguf.TokenType.BYTE))
    for i, ch in enumerate([_SPM_SPACE] + [chr(c) for c in range(0x21, 0x7F)]):
        tokens.append(ch)
        scores.append(-float(i))
        types.append(int(gguf.TokenType.NORMAL))
    if n_vocab is not None:
        if n_vocab < len(tokens):
            raise ValueError(f"n_vocab={n_vocab} is too small; the tokenizer needs at least {len(tokens)} tokens")
        for i in range(n_vocab - len(tokens)):
            tokens.append(f"<unused{i}>")
            scores.append(-1e4)
            types.append(int(gguf.TokenType.UNUSED))
    assert len(set(tokens)) == len(tokens)
    return TinyVocab(tuple(tokens), tuple(scores), tuple(types), MappingProxyType(special))


def llama_vocab(n_vocab: int | None) -> TinyVocab:
    return _build_vocab(
        [
            ("unk", "<unk>", gguf.TokenType.UNKNOWN),
            ("bos", "<s>", gguf.TokenType.CONTROL),
            ("eos", "</s>", gguf.TokenType.CONTROL),
            ("im_start", "<|im_start|>", gguf.TokenType.CONTROL),
            ("im_end", "<|im_end|>", gguf.TokenType.CONTROL),
        ],
        n_vocab,
    )


def _gemma_vocab(n_vocab: int | None) -> TinyVocab:
    # same ids as the real Gemma 3 vocabulary for pad/eos/bos/unk
    return _build_vocab(
        [
            ("pad", "<pad>", gguf.TokenType.CONTROL),
            ("eos", "<eos>", gguf.TokenType.CONTROL),
            ("bos", "<bos>", gguf.TokenType.CONTROL),
            ("unk", "<unk>", gguf.TokenType.UNKNOWN),
            ("start_of_turn", "<start_of_turn>", gguf.TokenType.CONTROL),
            ("end_of_turn", "<end_of_turn>", gguf.TokenType.CONTROL),
        ],
        n_vocab,
    )


#: Hidden channel reserved as a constant "bias" feature.  Token embeddings
#: carry a constant value there and no layer writes to it, so after the final
#: RMSNorm it is a positive constant, and the LM head can give every token a
#: fixed logit offset through it (llama/gemma3 have no output bias).
_BIAS_CH = 0
#: Logit offset (before scaling by the normalized bias feature) for tokens the
#: tiny models should never generate.
_SUPPRESS = -30.0
#: Per-dimension RMS the bias channel is given in the residual stream.
_BIAS_VALUE = 0.5


def _generatable(vocab: TinyVocab) -> np.ndarray:
    """Bool mask of tokens the tiny models may generate.

    Only printable ASCII, ``▁`` and the newline byte: byte-fallback tokens
    >= 0x80 would produce invalid UTF-8 streams (which e.g. make
    llama-cpp-python's ``create_completion`` ignore ``max_tokens``), and
    control/special/unused tokens would make output length unpredictable.
    """
    return np.array(
        [t == int(gguf.TokenType.NORMAL) or tok == "<0x0A>" for tok, t in zip(vocab.tokens, vocab.types)],
        dtype=bool,
    )


class _Weights:
    """Seeded random tensor factory (all values generated in f32)."""

    def __init__(self, seed: int, dtype: DType) -> None:
        if dtype not in ("f32", "f16"):
            raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
        self._rng = np.random.default_rng(seed)
        self._np_dtype = np.float16 if dtype == "f16" else np.float32

    def cast(self, a: np.ndarray) -> np.ndarray:
        """Convert a 2-D weight to the requested storage dtype."""
        return np.ascontiguousarray(a, dtype=self._np_dtype)

    def matrix(self, rows: int, cols: int, std: float | None = None) -> np.ndarray:
        """A f32 ``(rows, cols)`` matrix == GGUF/ggml shape ``{cols, rows}``.

        Default std is ``1/sqrt(cols)`` (fan-in scaling), which keeps
        activations O(1) for small widths.
        """
        if std is None:
            std = 1.0 / np.sqrt(cols)
        return self._rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)

    def residual_out(self, n_embd: int, n_in: int, n_layer: int) -> np.ndarray:
        """Projection back into the residual stream (attn_output / ffn_down).

        Scaled by ``1/sqrt(2*n_layer)`` (GPT-2 style) so the residual stream
        stays O(1) regardless of depth.  Row :data:`_BIAS_CH` is zero so no
        layer ever writes the bias channel.
        """
        m = self.matrix(n_embd, n_in, std=1.0 / np.sqrt(n_in * 2 * n_layer))
        m[_BIAS_CH, :] = 0.0
        return self.cast(m)

    def embedding(self, n_vocab: int, n_embd: int, std: float, bias_value: float) -> np.ndarray:
        """Token embeddings with a constant bias channel."""
        m = self.matrix(n_vocab, n_embd, std=std)
        m[:, _BIAS_CH] = bias_value
        return self.cast(m)

    def lm_head(self, allowed: np.ndarray, n_embd: int, logit_std: float) -> np.ndarray:
        """Untied output matrix: random rows, suppressed rows get a big negative bias."""
        m = self.matrix(len(allowed), n_embd, std=logit_std / np.sqrt(n_embd))
        m[:, _BIAS_CH] = np.where(allowed, 0.0, _SUPPRESS).astype(np.float32)
        return self.cast(m)

    def norm(self, n: int, bias_channel: bool = False, scale: float = 1.0) -> np.ndarray:
        """RMSNorm weight around ``scale`` (always f32, as llama.cpp converters do)."""
        v = (1.0 + 0.05 * self._rng.standard_normal(n, dtype=np.float32)) * np.float32(scale)
        if bias_channel:
            v[_BIAS_CH] = 1.0
        return v.astype(np.float32)


def _file_type(dtype: DType) -> int:
    return int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)


def add_vocab(writer: gguf.GGUFWriter, vocab: TinyVocab) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_scores(list(vocab.scores))
    writer.add_token_types(list(vocab.types))
    writer.add_bos_token_id(vocab.special["bos"])
    writer.add_eos_token_id(vocab.special["eos"])
    writer.add_unk_token_id(vocab.special["unk"])
    if "pad" in vocab.special:
        writer.add_pad_token_id(vocab.special["pad"])


def _write_atomically(writer_fn: _WriterFn, path: Path, arch: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer_fn(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_dims(n_layer: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int, n_ff: int) -> None:
    if min(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff) <= 0:
        raise ValueError("all model dimensions must be positive")
    if n_embd < 2:
        raise ValueError("n_embd must be >= 2 (hidden dim 0 is reserved as a bias channel)")
    if n_head % n_head_kv != 0:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim ({head_dim}) must be even for RoPE")


def write_llama_gguf(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,
    n_ff: int = 128,
    n_vocab: int | None = None,
    n_ctx_train: int = 4096,
    rope_freq_base: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    logit_std: float = 2.0,
    chat_template: str | None = CHATML_TEMPLATE,
    seed: int = 0,
    dtype: DType = "f32",
) -> Path:
    """Write a tiny random-weight ``llama``-architecture GGUF (GQA) to ``path``.

    Args:
        path: Output file; written atomically (temp file + rename), parent
            directories are created.
        n_layer: Number of transformer blocks.
        n_embd: Hidden size.
        n_head: Query heads.
        n_head_kv: Key/value heads (GQA when smaller than ``n_head``).
        head_dim: Per-head size; default ``n_embd // n_head``.  Written as
            ``llama.attention.key_length``/``value_length`` and
            ``llama.rope.dimension_count`` (llama.cpp requires rope dim ==
            head dim for this arch).
        n_ff: FFN hidden size (SwiGLU).
        n_vocab: Vocabulary size; ``None`` = the minimal size the tokenizer
            needs (356: 5 specials ``<unk> <s> </s> <|im_start|> <|im_end|>``,
            256 byte tokens, ``▁`` and printable ASCII); larger values pad
            with ``<unused{i}>`` tokens.
        n_ctx_train: ``llama.context_length``.
        rope_freq_base: RoPE theta.
        rms_norm_eps: RMSNorm epsilon.
        logit_std: Approximate std of the logits of generatable tokens.
        chat_template: Jinja chat template stored as
            ``tokenizer.chat_template`` (ChatML by default; ``None`` omits it).
        seed: Seed for the numpy RNG; same arguments => identical file.
        dtype: ``"f32"`` or ``"f16"`` for the 2-D weights (norms stay f32).

    Returns:
        ``Path(path)``.
    """
    head_dim = n_embd // n_head if head_dim is None else head_dim
    _check_dims(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff)
    vocab = llama_vocab(n_vocab)
    w = _Weights(seed, dtype)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type("model")
        writer.add_name("adakv-tiny-llama")
        writer.add_file_type(_file_type(dtype))
        writer.add_vocab_size(vocab.n_vocab)
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_freq_base)
        writer.add_layer_norm_rms_eps(rms_norm_eps)

        add_vocab(writer, vocab)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(True)
        if chat_template is not None:
            writer.add_chat_template(chat_template)

        # numpy shape (rows, cols) == ggml {cols, rows}; e.g. token_embd {n_embd, n_vocab}
        emb = w.embedding(vocab.n_vocab, n_embd, std=0.1, bias_value=_BIAS_VALUE * np.sqrt(n_embd))
        writer.add_tensor("token_embd.weight", emb)
        for i in range(n_layer):
            p = f"blk.{i}"
            writer.add_tensor(f"{p}.attn_norm.weight", w.norm(n_embd))
            writer.add_tensor(f"{p}.attn_q.weight", w.cast(w.matrix(n_head * head_dim, n_embd)))
            writer.add_tensor(f"{p}.attn_k.weight", w.cast(w.matrix(n_head_kv * head_dim, n_embd)))
            writer.add_tensor(f"{p}.attn_v.weight", w.cast(w.matrix(n_head_kv * head_dim, n_embd)))
            writer.add_tensor(f"{p}.attn_output.weight", w.residual_out(n_embd, n_head * head_dim, n_layer))
            writer.add_tensor(f"{p}.ffn_norm.weight", w.norm(n_embd))
            writer.add_tensor(f"{p}.ffn_gate.weight", w.cast(w.matrix(n_ff, n_embd)))
            writer.add_tensor(f"{p}.ffn_up.weight", w.cast(w.matrix(n_ff, n_embd)))
            writer.add_tensor(f"{p}.ffn_down.weight", w.residual_out(n_embd, n_ff, n_layer))
        writer.add_tensor("output_norm.weight", w.norm(n_embd, bias_channel=True))
        writer.add_tensor("output.weight", w.lm_head(_generatable(vocab), n_embd, logit_std))

    return _write_atomically(fill, Path(path), "llama")


def write_gemma3_gguf(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 6,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 32,
    n_ff: int = 128,
    n_vocab: int | None = None,
    n_ctx_train: int = 4096,
    sliding_window: int | None = 8,
    sliding_window_pattern: int | Sequence[bool] | None = 3,
    rope_freq_base: float = 1_000_000.0,
    rope_freq_base_swa: float = 10_000.0,
    rms_norm_eps: float = 1e-6,
    final_logit_softcapping: float | None = None,
    logit_std: float = 2.0,
    chat_template: str | None = GEMMA_TEMPLATE,
    seed: int = 0,
    dtype: DType = "f32",
) -> Path:
    """Write a tiny random-weight ``gemma3``-architecture GGUF to ``path``.

    Mirrors the real Gemma 3 layout: per-head Q/K RMSNorm, post-attention and
    post-FFN norms, GELU FFN, ``head_dim`` independent of ``n_embd / n_head``,
    sqrt(n_embd)-scaled input embeddings and interleaved sliding window (iSWA)
    attention.  Unlike the real model the LM head is untied (an explicit
    ``output.weight``, which llama.cpp's gemma3 loader accepts) - see the
    module docstring for why.

    Args:
        path: Output file; written atomically, parent directories created.
        n_layer: Number of blocks.
        n_embd: Hidden size.
        n_head: Query heads.
        n_head_kv: Key/value heads.
        head_dim: Per-head size (``gemma3.attention.key_length``/``value_length``).
        n_ff: FFN hidden size.
        n_vocab: Vocabulary size; ``None`` = minimal (357: specials ``<pad>
            <eos> <bos> <unk> <start_of_turn> <end_of_turn>`` at Gemma's ids
            0..5, 256 byte tokens, ``▁`` and printable ASCII).
        n_ctx_train: ``gemma3.context_length``.
        sliding_window: SWA window size (``gemma3.attention.sliding_window``);
            ``None`` or 0 disables SWA entirely (all layers global).
        sliding_window_pattern: ``gemma3.attention.sliding_window_pattern``.
            An int ``N`` makes every N-th layer global (layer ``il`` is SWA
            iff ``il % N < N - 1``; llama.cpp's default when absent is 6); a
            sequence of bools gives the per-layer flag (True = SWA) and must
            have ``n_layer`` entries; ``None`` omits the key; ``0`` makes all
            layers SWA.  The default 3 with 6 layers gives SWA layers 0,1,3,4
            and global layers 2,5.  Ignored when SWA is disabled.
        rope_freq_base: RoPE theta of the global layers.
        rope_freq_base_swa: RoPE theta of the SWA layers
            (``gemma3.rope.freq_base_swa``).
        rms_norm_eps: RMSNorm epsilon.
        final_logit_softcapping: Optional logit soft-capping value
            (``gemma3.final_logit_softcapping``; values below ~10 squash the
            logits enough to weaken the suppression of non-generatable tokens).
        logit_std: Approximate std of the logits of generatable tokens.
        chat_template: Jinja chat template (Gemma turn format by default;
            ``None`` omits it).
        seed: Seed for the numpy RNG.
        dtype: ``"f32"`` or ``"f16"`` for the 2-D weights (norms stay f32).

    Returns:
        ``Path(path)``.
    """
    _check_dims(n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff)
    if sliding_window_pattern is not None and not isinstance(sliding_window_pattern, int):
        sliding_window_pattern = [bool(x) for x in sliding_window_pattern]
        if len(sliding_window_pattern) != n_layer:
            raise ValueError(
                f"sliding_window_pattern has {len(sliding_window_pattern)} entries, expected n_layer={n_layer}"
            )
    elif isinstance(sliding_window_pattern, int) and sliding_window_pattern < 0:
        raise ValueError("sliding_window_pattern must be >= 0")
    vocab = _gemma_vocab(n_vocab)
    w = _Weights(seed, dtype)
    # post-attention / post-FFN norms set the scale of what each block adds to
    # the residual stream; 1/sqrt(2*n_layer) keeps it O(1) at any depth.
    post_scale = 1.0 / np.sqrt(2 * n_layer)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type("model")
        writer.add_name("adakv-tiny-gemma3")
        writer.add_file_type(_file_type(dtype))
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(rms_norm_eps)
        writer.add_rope_freq_base(rope_freq_base)
        if sliding_window:
            writer.add_sliding_window(sliding_window)
            writer.add_rope_freq_base_swa(rope_freq_base_swa)
            if sliding_window_pattern is not None:
                writer.add_sliding_window_pattern(sliding_window_pattern)
        if final_logit_softcapping:
            writer.add_final_logit_softcapping(final_logit_softcapping)

        add_vocab(writer, vocab)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)

        # Inputs are scaled by sqrt(n_embd) inside the graph, so these values
        # end up the same as the llama writer's in the residual stream.
        emb = w.embedding(vocab.n_vocab, n_embd, std=0.1 / np.sqrt(n_embd), bias_value=_BIAS_VALUE)
        writer.add_tensor("token_embd.weight", emb)
        for i in range(n_layer):
            p = f"blk.{i}"
            writer.add_tensor(f"{p}.attn_norm.weight", w.norm(n_embd))
            writer.add_tensor(f"{p}.attn_q.weight", w.cast(w.matrix(n_head * head_dim, n_embd)))
            writer.add_tensor(f"{p}.attn_k.weight", w.cast(w.matrix(n_head_kv * head_dim, n_embd)))
            writer.add_tensor(f"{p}.attn_v.weight", w.cast(w.matrix(n_head_kv * head_dim, n_embd)))
            writer.add_tensor(f"{p}.attn_q_norm.weight", w.norm(head_dim))
            writer.add_tensor(f"{p}.attn_k_norm.weight", w.norm(head_dim))
            writer.add_tensor(f"{p}.attn_output.weight", w.residual_out(n_embd, n_head * head_dim, n_layer))
            writer.add_tensor(f"{p}.post_attention_norm.weight", w.norm(n_embd, scale=post_scale))
            writer.add_tensor(f"{p}.ffn_norm.weight", w.norm(n_embd))
            writer.add_tensor(f"{p}.ffn_gate.weight", w.cast(w.matrix(n_ff, n_embd)))
            writer.add_tensor(f"{p}.ffn_up.weight", w.cast(w.matrix(n_ff, n_embd)))
            writer.add_tensor(f"{p}.ffn_down.weight", w.residual_out(n_embd, n_ff, n_layer))
            writer.add_tensor(f"{p}.post_ffw_norm.weight", w.norm(n_embd, scale=post_scale))
        writer.add_tensor("output_norm.weight", w.norm(n_embd, bias_channel=True))
        # untied LM head (real Gemma 3 ties it to token_embd; llama.cpp's gemma3
        # loader accepts an explicit output.weight) - needed for the logit bias.
        writer.add_tensor("output.weight", w.lm_head(_generatable(vocab), n_embd, logit_std))

    return _write_atomically(fill, Path(path), "gemma3")


def write_unknown_arch_gguf(path: str | os.PathLike[str], arch: str = "no-such-arch") -> Path:
    """A complete, valid GGUF file of an architecture llama.cpp does not know: it refuses to load
    it, for tests of what the user is told."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(2048)
    writer.add_tensor("x", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
