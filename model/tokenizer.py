"""Tokenizers: a byte-level one (the default; every byte string round-trips) and a wrapper
around a HuggingFace tokenizer.json (through the optional `tokenizers` package).

Both offer the same surface: encode, decode, a streaming decoder that never emits half a
UTF-8 character, and a chat template:

    <bos> <|system|>...<eos> <|user|>...<eos> <|assistant|>   -> the model answers ...<eos>
"""

from __future__ import annotations

import codecs
import json
import re
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

    @property
    def role_markers(self) -> dict[str, str]: ...
    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...
    def encode_special_names(self, text: str, add_bos: bool = False) -> list[int]: ...
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
        self._special_ids = {self.token_text(i): i for i in range(256, vocab_size)}
        names = sorted(self._special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    @property
    def role_markers(self) -> dict[str, str]:
        """Each role's marker token as text."""
        return {role: self.token_text(i) for role, i in self.role_ids.items()}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # lone surrogates (from JSON "\ud800") are not UTF-8: they become "?"
        ids = list(text.encode("utf-8", errors="replace"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_special_names(self, text: str, add_bos: bool = False) -> list[int]:
        """Like `encode`, except that a special token's name in the text ("<eos>") is that
        token, as Hugging Face tokenizers (and the exported tokenizer.json) read it."""
        ids = [self.bos_token_id] if add_bos else []
        for piece in self._special_pattern.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids += self.encode(piece)
        return ids

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

    @property
    def role_markers(self) -> dict[str, str]:
        """Each role's marker text (from tokenizer_config.json's role_markers)."""
        return dict(self._role_markers)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_special_names(self, text: str, add_bos: bool = False) -> list[int]:
        return self.encode(text, add_bos)  # `tokenizers` reads added tokens' names already

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or f"<unk_{token_id}>"

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return _OffsetStreamDecoder(self, skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]:
        ids = [self.bos_token_id]
        for role, content in _checked_messages(messages):
            ids += self.encode(self._role_markers[role] + content) + [self.eos_token_id]
        if add_generation_prompt:
            ids += self.encode(self._role_markers["assistant"])
        return ids


class _OffsetStreamDecoder:
    """Incremental decoding in constant work per token (vLLM's offset scheme): decode only a
    short window of ids, from `prefix` (where the text was last complete) to the end, and
    emit what it adds to the window's already-emitted part (up to `read`). Decoding a window
    and its prefix together keeps what a tokenizer's decoder does at a boundary (a leading
    space that a Metaspace decoder strips, say) out of the emitted text; a window whose text
    ends in U+FFFD waits for the rest of its character. The result equals decoding the
    whole id list at once."""

    def __init__(self, tokenizer: HFTokenizer, skip_special: bool) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: the text before it is complete and emitted
        self._read = 0  # ids up to here are emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""  # nothing new, or half a character: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """What is still held (an incomplete character becomes U+FFFD, as in `decode`)."""
        emitted = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return text[len(emitted):]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], self._skip) if end > start else ""


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


def _is_byte_export(directory: Path) -> bool:
    """tokenizer.json written by `write_hf_tokenizer_files`: the byte tokenizer serves it."""
    return _read_json(directory / "tokenizer_config.json").get("type") == "byte"


def load_tokenizer(directory: str | Path | None, config: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer.json if it has one (unless it is the byte tokenizer's own
    export, see `write_hf_tokenizer_files`), else the byte tokenizer of `config`."""
    if directory is not None and (Path(directory) / "tokenizer.json").is_file() and not (
            config.tokenizer == "byte" and _is_byte_export(Path(directory))):
        return HFTokenizer(Path(directory), config)
    if config.tokenizer != "byte":
        raise CheckpointError(f"config names tokenizer {config.tokenizer!r} but {directory} has "
                              f"no tokenizer.json")
    return ByteTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id,
                         config.pad_token_id)


# ---------------------------------------------------------------------- Hugging Face export
# The byte tokenizer as Hugging Face files, for clients that load a tokenizer themselves
# (transformers.AutoTokenizer, lm-evaluation-harness, guidellm). Byte-level BPE without
# merges: every byte is one token whose id is the byte, the special tokens are added tokens
# with their ids, and a text gets <bos> first when special tokens are added (as the server's
# text prompts and /tokenize do). The chat template renders the same ids as
# `apply_chat_template`, because the rendered role markers parse as their special tokens.
# A text that spells a special token ("<eos>") is that token to Hugging Face, as it is to
# `encode_special_names` (and so to the server's /tokenize), and bytes to `encode`.
def hf_chat_template(role_markers: dict[str, str], bos: str, eos: str) -> str:
    """The chat template as Jinja over text, for clients that render it themselves. The
    special tokens are written out, not read from `bos_token` / `eos_token`: some renderers
    (lm-evaluation-harness's remote tokenizer) pass only `messages` and
    `add_generation_prompt`."""
    roles = "".join(f"{'{% if' if i == 0 else '{% elif'} role == '{r}' %}}{role_markers[r]}"
                    for i, r in enumerate(ROLES)) + "{% endif %}"
    return (
        f"{bos}{{% for message in messages %}}"
        "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
        f"{roles}{{% if message['content'] is string %}}{{{{ message['content'] }}}}"
        "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
        f"{eos}{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{role_markers['assistant']}{{% endif %}}")


def _byte_chars() -> list[str]:
    """GPT-2's printable character for each byte (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def hf_tokenizer_json(tok: ByteTokenizer) -> dict:
    """tokenizer.json (the `tokenizers` format) of the byte tokenizer."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    added = [{"id": i, "content": tok.token_text(i), "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i in range(256, tok.vocab_size)]
    bos = tok.token_text(tok.bos_token_id)
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_token_id],
                                         "tokens": [bos]}}}
    model = {"type": "BPE", "dropout": None, "unk_token": None,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
             "byte_fallback": False, "ignore_merges": False,
             "vocab": {c: b for b, c in enumerate(_byte_chars())}, "merges": []}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": template,
            "decoder": byte_level, "model": model}


def hf_tokenizer_config(tok: ByteTokenizer, max_length: int) -> dict:
    """tokenizer_config.json: what transformers reads, and loopserve's own description."""
    name = tok.token_text
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_token_id), "eos_token": name(tok.eos_token_id),
        "pad_token": name(tok.pad_token_id), "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": hf_chat_template(tok.role_markers, name(tok.bos_token_id),
                                          name(tok.eos_token_id)),
        # loopserve's description (`type` makes load_tokenizer serve the byte tokenizer)
        "type": "byte", "vocab_size": tok.vocab_size,
        "byte_ids": "0..255 are the UTF-8 bytes themselves",
        "special_tokens": {name(i): i for i in range(256, 262)},
        "role_markers": tok.role_markers,
    }


def write_hf_tokenizer_files(directory: str | Path, config: ModelConfig) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json of a byte-tokenizer checkpoint."""
    if config.tokenizer != "byte":
        raise CheckpointError(f"only the byte tokenizer can be exported, the config names "
                              f"{config.tokenizer!r}")
    tok = ByteTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id,
                        config.pad_token_id)
    out = Path(directory)
    files = {"tokenizer.json": hf_tokenizer_json(tok),
             "tokenizer_config.json": hf_tokenizer_config(tok, config.max_position)}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return [out / name for name in files]
