"""Chat prompts as llama-cpp-python renders them, and the one summary instruction.

``adakv-local summarize`` and ``adakv-local eval fidelity --instructions`` ask for a summary with
the same system message and instruction, rendered with the GGUF's own chat template by the same
formatter: both come from here.
"""

from __future__ import annotations

from typing import Any

SYSTEM = "You summarize documents accurately and briefly."
# after the document: the observation window (the prompt's last tokens) then holds the instruction,
# so the attention that scores the cells is the attention of "summarize", as in SnapKV's setting
SUMMARY_INSTRUCTION = "Summarize the document above in a few sentences."


def summary_messages(text: str) -> list[dict[str, str]]:
    """The chat messages that ask for a summary of text: a system message, the document and the instruction."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{text}\n\n{SUMMARY_INSTRUCTION}"}]


def chat_formatter(llm: Any) -> Any:
    """llama-cpp-python's formatter for the GGUF's own chat template (``tokenizer.chat_template``), with
    the model's BOS and EOS texts, or None when the GGUF has no template. ``llm``: a ``llama_cpp.Llama``
    or a :class:`Vocabulary`."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp import llama_chat_format

    eos, bos = llm.token_eos(), llm.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "")


class Vocabulary:
    """A GGUF model's vocabulary, loaded without its weights and without a context (llama.cpp's
    ``vocab_only``): enough to render and count a prompt before the model itself is loaded.

    It answers what :func:`chat_formatter` and token counting ask of a ``llama_cpp.Llama``
    (``metadata["tokenizer.chat_template"]``, ``token_bos``, ``token_eos``, ``tokenize``), through
    llama-cpp-python's plain bindings of llama.h. llama.cpp's log follows ``verbose`` as
    llama-cpp-python's own ``Llama`` has it (its logger, ``llama-cpp-python``). Close it (or use
    ``with``) to free the vocabulary. Raises ValueError when llama.cpp cannot load the file.
    """

    def __init__(self, path: str, *, verbose: bool = False) -> None:
        import logging

        import llama_cpp

        self._lc = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        logger = logging.getLogger("llama-cpp-python")  # what llama_cpp.Llama(verbose=...) sets
        level = logger.level
        logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
        try:
            self._ptr = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        finally:
            logger.setLevel(level)
        if not self._ptr:
            raise ValueError(f"Failed to load model from file: {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._ptr)
        self._model = self  # chat_formatter reads token texts as llm._model.token_get_text
        buf = bytes(1 << 20)  # chat templates are a few KiB
        n = llama_cpp.llama_model_meta_val_str(self._ptr, b"tokenizer.chat_template", buf, len(buf))
        self.metadata = {"tokenizer.chat_template": buf[:n].decode("utf-8")} if n > 0 else {}

    def token_bos(self) -> int:
        return int(self._lc.llama_vocab_bos(self._vocab))

    def token_eos(self) -> int:
        return int(self._lc.llama_vocab_eos(self._vocab))

    def token_get_text(self, token: int) -> str:
        return self._lc.llama_vocab_get_text(self._vocab, token).decode("utf-8")

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """As ``llama_cpp.Llama.tokenize``."""
        n = len(text) + 2  # at most a token per byte, and BOS/EOS
        tokens = (self._lc.llama_token * n)()
        got = self._lc.llama_tokenize(self._vocab, text, len(text), tokens, n, add_bos, special)
        if got < 0:  # -got tokens needed
            n = -got
            tokens = (self._lc.llama_token * n)()
            got = self._lc.llama_tokenize(self._vocab, text, len(text), tokens, n, add_bos, special)
        if got < 0:
            raise RuntimeError(f"failed to tokenize {len(text)} bytes: {got}")
        return list(tokens[:got])

    def close(self) -> None:
        if self._ptr:
            self._lc.llama_model_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Vocabulary:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
