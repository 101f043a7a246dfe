"""adakv_local.prompts: the one chat formatter and the vocabulary-only token count of ``summarize``
give what llama-cpp-python's own Llama gives."""

from __future__ import annotations

import pytest

from adakv_local.prompts import SUMMARY_INSTRUCTION, SYSTEM, Vocabulary, chat_formatter, summary_messages

TEXTS = ["", "hello", "  two  spaces\nand a newline", "Ünïcödé ✓ and 数字 12345", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gemma3"])
def pair(request):
    import llama_cpp

    import adakv_local  # noqa: F401 (binds llama_cpp to our library)

    path = str(request.getfixturevalue(request.param))
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, n_ctx=256, verbose=False)
    with Vocabulary(path) as vocab:
        yield llm, vocab
    llm.close()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("special", [True, False])
def test_tokenize_as_llama(pair, text, add_bos, special):
    llm, vocab = pair
    data = (text * 50).encode("utf-8")
    assert vocab.tokenize(data, add_bos=add_bos, special=special) == llm.tokenize(data, add_bos=add_bos,
                                                                                    special=special)


def test_formatter_as_llama(pair):
    llm, vocab = pair
    assert vocab.metadata.get("tokenizer.chat_template") == llm.metadata.get("tokenizer.chat_template")
    assert (vocab.token_bos(), vocab.token_eos()) == (llm.token_bos(), llm.token_eos())
    ours, theirs = chat_formatter(vocab), chat_formatter(llm)
    if theirs is None:
        assert ours is None
        return
    messages = summary_messages("A document.")
    assert ours(messages=messages).prompt == theirs(messages=messages).prompt


def test_summary_messages():
    m = summary_messages("DOC")
    assert m == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"DOC\n\n{SUMMARY_INSTRUCTION}"}]


def test_vocabulary_refuses_a_bad_file(tmp_path):
    import adakv_local  # noqa: F401

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match="Failed to load model"):
        Vocabulary(str(bad))
