"""The Hugging Face stream decoder: pushing ids one at a time gives exactly the text of
decoding them all at once (multi-byte characters split across tokens, special tokens
skipped or kept, decoders that strip a leading space), never emits half a character, and
does constant work per token (it decodes a short window, not the whole growing list)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from model.tokenizer import HFTokenizer
from model.weights import BUNDLED_MODEL_DIR

tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["naïve café ☕ 🙂 — 日本語のテキスト", "plain ascii, with  spaces\tand\nlines",
         "Ünïcödé ✓✓✓ 🙂🙂 ﷽", "x" * 50 + "é" * 20]
UNSEEN = "🦀 ẞ ₿ 𝔘 ẞ🦀"  # not in the training texts: byte tokens for every character
SPECIALS = ["<bos>", "<eos>", "<|user|>"]


def _config() -> SimpleNamespace:
    return SimpleNamespace(vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _trained(tmp_path: Path, kind: str) -> HFTokenizer:
    """A small BPE trained on TEXTS: its merges span bytes of multi-byte characters
    (byte level) or whole words with a Metaspace prefix (as SentencePiece tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS + ["<unk>"],
                                  initial_alphabet=alphabet if kind == "byte_level" else [])
    tok.train_from_iterator(TEXTS * 20, trainer)
    spec = json.loads(tok.to_str())
    if kind != "byte_level":  # byte-fallback tokens go into the model's own vocabulary
        vocab = spec["model"]["vocab"]
        vocab.update({b: len(vocab) + i for i, b in enumerate(alphabet) if b not in vocab})
    directory = tmp_path / kind
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return HFTokenizer(directory, _config())


@pytest.fixture(params=["bundled", "byte_level", "metaspace"])
def tokenizer(request, tmp_path) -> HFTokenizer:
    if request.param == "bundled":
        return HFTokenizer(BUNDLED_MODEL_DIR, _config())
    return _trained(tmp_path, request.param)


def _sequences(tok: HFTokenizer) -> list[list[int]]:
    """Each text's ids, the texts joined by special tokens, and random ids (which cut
    characters anywhere and leave some incomplete at the end). Not random ids for a
    ByteFallback decoder: it turns every byte of an invalid run into U+FFFD, so how it
    decodes a valid byte depends on the garbage after it, which no stream can know."""
    special_ids = [tok._tok.token_to_id(s) for s in SPECIALS if tok._tok.token_to_id(s)
                   is not None]
    ids = [tok.encode(text) for text in (*TEXTS, UNSEEN)]
    joined = [t for text_ids in ids for t in (*text_ids, *special_ids[:1])]
    rng = random.Random(0)
    vocab = tok._tok.get_vocab_size()
    noise = [rng.randrange(vocab) for _ in range(300)]
    sequences = [*ids, joined, [*special_ids, *ids[0], *special_ids]]
    byte_fallback = "ByteFallback" in tok._tok.to_str()
    return sequences if byte_fallback else [*sequences, noise]


@pytest.mark.parametrize("skip_special", [True, False])
def test_streaming_equals_decoding_all_at_once(tokenizer, skip_special):
    for ids in _sequences(tokenizer):
        decoder = tokenizer.stream_decoder(skip_special)
        pieces = [decoder.push(i) for i in ids]
        tail = decoder.flush()
        assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special), ids
        assert not any(piece.endswith("\ufffd") for piece in pieces)


def test_a_character_split_across_tokens_comes_out_whole(tokenizer):
    ids = tokenizer.encode("🦀")
    if len(ids) < 2:
        pytest.skip("this tokenizer has the emoji as one token")
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert pieces[-1].endswith("🦀") and not any(pieces[:-1])


def test_work_per_token_is_constant(tokenizer):
    """The ids decoded in all stay linear in the stream's length (the old decoder re-decoded
    the whole list every token: n^2 / 2 ids)."""
    ids = tokenizer.encode(" ".join(TEXTS) * 40)
    decoded = 0
    real_decode = tokenizer.decode

    def counting(chunk, skip_special=True):
        nonlocal decoded
        decoded += len(chunk)
        return real_decode(chunk, skip_special)

    tokenizer.decode = counting
    decoder = tokenizer.stream_decoder()
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    tokenizer.decode = real_decode
    assert text == tokenizer.decode(ids)
    assert decoded < 12 * len(ids), (decoded, len(ids))


def test_the_bundled_tokenizer_files_are_byte_level():
    spec = json.loads((BUNDLED_MODEL_DIR / "tokenizer.json").read_text())
    assert spec["decoder"]["type"] == "ByteLevel"
