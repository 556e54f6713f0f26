"""Tokenizers: round trips, invalid UTF-8, streaming decode, chat template."""

from __future__ import annotations

import json

import pytest

from engine import ByteTokenizer, InvalidRequestError, ModelConfig, load_tokenizer

TEXTS = ["", "hello world", "What is the capital of Veltria?", "12+35=47", "naïve café ☕ 🚀",
         "tabs\tand\nnewlines", "<eos> is text here, not a special token"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True)[0] == tok.bos_token_id


def test_invalid_utf8_and_surrogates_never_crash():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 0xFE, ord("a")]) == "\ufffd\ufffda"
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # truncated character
    assert tok.encode("\ud800x") == [ord("?"), ord("x")]
    assert tok.decode(list(range(300)), skip_special=False)  # specials and reserved ids


def test_streaming_decoder_holds_back_partial_characters():
    tok = ByteTokenizer()
    ids = tok.encode("é🚀!")
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert pieces == ["", "é", "", "", "", "🚀", "!"]
    assert decoder.flush() == ""


def test_special_tokens_are_skipped_or_named():
    tok = ByteTokenizer()
    ids = [tok.bos_token_id, *tok.encode("hi"), tok.eos_token_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<bos>hi<eos>"
    assert tok.token_text(ord("a")) == "a" and tok.token_text(0xC3) == "<0xC3>"


def test_chat_template():
    tok = ByteTokenizer()
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.role_ids["assistant"]
    assert tok.decode(ids, skip_special=False) == (
        "<bos><|system|>Be brief.<eos><|user|>Hi<eos><|assistant|>")
    parts = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert parts == tok.apply_chat_template([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("messages, message", [
    ([], "at least one message"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": 3}], "content must be a string"),
])
def test_chat_template_rejects_bad_messages(messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        ByteTokenizer().apply_chat_template(messages)


def test_huggingface_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the capital of Veltria is Orsk", "12+35=47"] * 50, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"role_markers": {}}))
    config = ModelConfig(vocab_size=hf.get_vocab_size(), tokenizer="hf", pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    tok = load_tokenizer(tmp_path, config)
    for text in ["the capital of Veltria is Orsk", "naïve ☕"]:
        assert tok.decode(tok.encode(text)) == text
    decoder = tok.stream_decoder()
    ids = tok.encode("naïve ☕ ok")
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "naïve ☕ ok"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat[0] == 1 and 2 in chat


def test_byte_config_without_tokenizer_json(tmp_path):
    tok = load_tokenizer(tmp_path, ModelConfig())
    assert isinstance(tok, ByteTokenizer)
