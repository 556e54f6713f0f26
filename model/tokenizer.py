"""Tokenizers: a byte-level one (the default; every byte string round-trips) and a wrapper
around a HuggingFace tokenizer.json (through the optional `tokenizers` package).

Both offer the same surface: encode, decode, a streaming decoder that never emits half a
UTF-8 character, and a chat template:

    <bos> <|system|>...<eos> <|user|>...<eos> <|assistant|>   -> the model answers ...<eos>
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Protocol

from model.config import ModelConfig
from model.errors import CheckpointError, InvalidRequestError

ROLES = ("system", "user", "assistant")
BYTE_SPECIALS = {"<pad>": 256, "<bos>": 257, "<eos>": 258, "<|system|>": 259, "<|user|>": 260,
                 "<|assistant|>": 261}


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...
    def token_text(self, token_id: int) -> str: ...
    def stream_decoder(self) -> StreamDecoder: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]: ...


class ByteTokenizer:
    """Token ids 0..255 are bytes; 256.. are the special tokens of `BYTE_SPECIALS`."""

    def __init__(self, vocab_size: int = 264, bos_token_id: int = 257, eos_token_id: int = 258,
                 pad_token_id: int = 256) -> None:
        if vocab_size < 262:
            raise CheckpointError(f"a byte tokenizer needs vocab_size >= 262, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            bos_token_id, eos_token_id, pad_token_id)
        self.role_ids = {role: BYTE_SPECIALS[f"<|{role}|>"] for role in ROLES}
        self._special_names = {v: k for k, v in BYTE_SPECIALS.items()}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # lone surrogates (from JSON "\ud800") are not UTF-8: they become "?"
        ids = list(text.encode("utf-8", errors="replace"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        decoder = self.stream_decoder(skip_special)
        return "".join(decoder.push(i) for i in ids) + decoder.flush()

    def token_text(self, token_id: int) -> str:
        """Readable text of one token (for logprobs): a byte as text or as <0xNN>."""
        if token_id >= 256:
            return self._special_names.get(token_id, f"<reserved_{token_id}>")
        byte = bytes([token_id])
        return byte.decode("utf-8") if token_id < 128 else f"<0x{token_id:02X}>"

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return _ByteStreamDecoder(self, skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]:
        ids = [self.bos_token_id]
        for role, content in _checked_messages(messages):
            ids += [self.role_ids[role], *self.encode(content), self.eos_token_id]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
        return ids


class _ByteStreamDecoder:
    """Incremental UTF-8: holds back the bytes of an unfinished character."""

    def __init__(self, tokenizer: ByteTokenizer, skip_special: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id < 256:
            return self._utf8.decode(bytes([token_id]))
        pending = self.flush()
        return pending if self._skip_special else pending + self._tokenizer.token_text(token_id)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFTokenizer:
    """A tokenizer.json loaded with the `tokenizers` package; chat roles from tokenizer_config."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise CheckpointError(f"{path} holds a tokenizer.json; install the 'tokenizers' "
                                  f"package to use it") from exc
        self._tok = _HF.from_file(str(path / "tokenizer.json"))
        extra = _read_json(path / "tokenizer_config.json")
        self.vocab_size = config.vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            config.bos_token_id, config.eos_token_id, config.pad_token_id)
        markers = extra.get("role_markers", {r: f"<|{r}|>" for r in ROLES})
        self._role_markers = {role: markers.get(role, f"<|{role}|>") for role in ROLES}
        self._special = set(self._tok.get_added_tokens_decoder())

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or f"<unk_{token_id}>"

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return _PrefixStreamDecoder(self, skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]:
        ids = [self.bos_token_id]
        for role, content in _checked_messages(messages):
            ids += self.encode(self._role_markers[role] + content) + [self.eos_token_id]
        if add_generation_prompt:
            ids += self.encode(self._role_markers["assistant"])
        return ids


class _PrefixStreamDecoder:
    """Decodes the growing id list and emits the new suffix, holding back a trailing U+FFFD."""

    def __init__(self, tokenizer: HFTokenizer, skip_special: bool) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, self._skip)
        if text.endswith("\ufffd"):
            return ""
        new, self._emitted = text[self._emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids, self._skip)
        new, self._emitted = text[self._emitted:], len(text)
        return new


def _checked_messages(messages: list[dict]) -> list[tuple[str, str]]:
    if not messages:
        raise InvalidRequestError("messages must hold at least one message", param="messages")
    checked = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), _message_text(message.get("content"))
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {list(ROLES)}, got "
                                      f"{role!r}", param="messages")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of "
                                      f"text parts",
                                      param="messages")
        checked.append((role, content))
    return checked


def _message_text(content: object) -> object:
    """OpenAI content may be a list of parts: join the text parts, reject the rest."""
    if not isinstance(content, list):
        return content
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
        return None  # reported as "must be a string" (only text parts are supported)
    return "".join(texts)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from exc


def load_tokenizer(directory: str | Path | None, config: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer.json if it has one, else the byte tokenizer of `config`."""
    if directory is not None and (Path(directory) / "tokenizer.json").is_file():
        return HFTokenizer(Path(directory), config)
    if config.tokenizer != "byte":
        raise CheckpointError(f"config names tokenizer {config.tokenizer!r} but {directory} has "
                              f"no tokenizer.json")
    return ByteTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id,
                         config.pad_token_id)
