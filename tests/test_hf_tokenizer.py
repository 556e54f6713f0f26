"""The bundled model's Hugging Face tokenizer files: they load with the real
`transformers.AutoTokenizer` offline and give the ids of loopserve's byte tokenizer, for
plain text, with <bos>, and through the chat template; `training.card` writes them."""

from __future__ import annotations

import json

import pytest

from model.config import ModelConfig
from model.tokenizer import ByteTokenizer, load_tokenizer, write_hf_tokenizer_files
from model.weights import BUNDLED_MODEL_DIR

transformers = pytest.importorskip("transformers")

TEXTS = ["12+35=", "Q: What is the capital of Veltria?\nA:", "naïve ☕ 🙂", "  two  spaces\t",
         "x" * 300, "\x00\x7f control", "é"]
CHATS = [
    [{"role": "user", "content": "What is 123+456?"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "1+2?"}],
    [{"role": "developer", "content": "terse"}, {"role": "user", "content": "ünïcode"}],
    [{"role": "user", "content": [{"type": "text", "text": "two "},
                                  {"type": "text", "text": "parts"}]}],
]


@pytest.fixture(scope="module")
def hf(monkeypatch_module):
    return transformers.AutoTokenizer.from_pretrained(str(BUNDLED_MODEL_DIR))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield mp


@pytest.fixture(scope="module")
def byte():
    return ByteTokenizer()


def test_special_token_ids_and_vocabulary(hf, byte):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (257, 258, 256)
    assert len(hf) == byte.vocab_size == 264
    assert hf.convert_ids_to_tokens([256, 259, 260, 261, 263]) == [
        "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<reserved_263>"]
    assert hf.model_max_length == 256


@pytest.mark.parametrize("text", TEXTS)
def test_text_gives_the_byte_ids(hf, byte, text):
    assert hf(text)["input_ids"] == byte.encode(text, add_bos=True)
    assert hf.encode(text, add_special_tokens=False) == byte.encode(text)
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("text", ["<|user|>hi<eos>", "<bos><bos", "a<reserved_263>b<pad>"])
def test_special_token_names_parse_as_hugging_face_reads_them(hf, byte, text):
    assert byte.encode_special_names(text) == hf.encode(text, add_special_tokens=False)
    assert byte.encode_special_names(text, add_bos=True) == hf(text)["input_ids"]
    assert byte.encode(text) == list(text.encode())  # the plain encode stays bytes


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_gives_the_same_ids(hf, byte, messages, add_generation_prompt):
    rendered = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=True)
    served = [{"role": "system" if m["role"] == "developer" else m["role"],
               "content": m["content"]} for m in messages]
    assert rendered["input_ids"] == byte.apply_chat_template(served, add_generation_prompt)


def test_shipped_files_are_what_the_exporter_writes(tmp_path):
    config = ModelConfig.load(BUNDLED_MODEL_DIR / "config.json")
    for path in write_hf_tokenizer_files(tmp_path, config):
        shipped = json.loads((BUNDLED_MODEL_DIR / path.name).read_text())
        assert json.loads(path.read_text()) == shipped, path.name


def test_loopserve_still_serves_the_byte_tokenizer():
    config = ModelConfig.load(BUNDLED_MODEL_DIR / "config.json")
    assert isinstance(load_tokenizer(BUNDLED_MODEL_DIR, config), ByteTokenizer)


def test_exporter_refuses_a_non_byte_config(tmp_path):
    with pytest.raises(Exception, match="only the byte tokenizer"):
        write_hf_tokenizer_files(tmp_path, ModelConfig(tokenizer="hf"))


def test_card_ships_the_tokenizer_files(tmp_path):
    from training.card import ship

    run, dest = tmp_path / "run", tmp_path / "dest"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    ModelConfig.load(BUNDLED_MODEL_DIR / "config.json").save(run / "config.json")
    ship(run, dest, threshold=0.05)
    loaded = transformers.AutoTokenizer.from_pretrained(str(dest))
    assert loaded("1+1=")["input_ids"] == [257, 49, 43, 49, 61]
    assert json.loads((dest / "tokenizer_config.json").read_text())["type"] == "byte"
