"""[`TokenText`]: the exact bytes a tokenizer's tokens stand for, so that text can cross from one tokenizer to another
without a lossy decode.

A byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen) writes each byte as one printable character (`Ġ` for a space); a
SentencePiece-style tokenizer (Gemma, Llama 2, Mistral) writes a space as `▁` and a byte it has no piece for as
`<0xNN>` (byte fallback). Reading the tokens through these conventions gives every token's bytes, partial UTF-8
included, with no clean-up of spaces. For any other tokenizer (word-level, WordPiece, a slow tokenizer) the text of a
token is read off `decode` as the difference it makes after its context, which is exact unless the context ends in an
incomplete character.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any


__all__ = ["TokenText", "end_token_ids", "split_incomplete_utf8"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# end-of-turn markers of common chat templates (ChatML, Gemma, Llama 3, Phi)
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<eos>", "</s>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's map from the printable character of each byte back to the byte (`bytes_to_unicode`, inverted)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters)}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The component types of a fast tokenizer's decoder (`ByteLevel`, `Metaspace`, `ByteFallback`, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds: set[str] = set()
    stack = [decoder]
    while stack:
        part = stack.pop()
        if isinstance(part, dict):
            kinds.add(str(part.get("type")))
            if part.get("type") == "Replace" and "▁" in json.dumps(part.get("pattern")):
                kinds.add("ReplaceMetaspace")
            stack.extend(part.get("decoders") or [])
    return kinds


def split_incomplete_utf8(data: bytes) -> tuple[bytes, bytes]:
    """
    Splits `data` into its longest prefix that ends on a UTF-8 character boundary and the incomplete character after
    it (at most 3 bytes, empty when `data` ends on a boundary).

    Examples:

    ```python
    >>> from s2t_hf.teachers.token_text import split_incomplete_utf8
    >>> split_incomplete_utf8("né".encode()[:-1])
    (b'n', b'\\xc3')

    ```
    """
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its character end inside `data`?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return (data, b"") if need <= back else (data[:-back], data[-back:])
    return data, b""


def end_token_ids(tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """
    The ids that end a reply for `tokenizer`: its `eos_token_id`, the end-of-turn markers of common chat templates it
    knows (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...) and `extra` (e.g. a generation config's `eos_token_id`).
    """
    ids = [int(i) for i in extra]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    # only where the marker is a special token (Gemma's `</s>` is ordinary text)
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values() if t.special}
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab and token in special]
    return sorted(set(ids))


class TokenText:
    """
    The bytes of a tokenizer's tokens.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer.

    Attributes:
        kind (`str`): `"byte_level"`, `"sentencepiece"` (exact bytes per token) or `"decode"` (read off `decode`).
        special_ids (`set[int]`): the special and added-special tokens' ids (never plain text).

    Examples:

    ```python
    >>> from s2t_hf.tasks import build_tokenizer
    >>> from s2t_hf.teachers.token_text import TokenText
    >>> tokenizer = build_tokenizer()
    >>> text = TokenText(tokenizer)
    >>> ids = tokenizer("tom has 5", add_special_tokens=False)["input_ids"]
    >>> text.kind, text.continuation_bytes(ids[:1], ids[1:])
    ('decode', b' has 5')

    ```
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        if "ByteLevel" in kinds:
            self.kind = "byte_level"
        elif kinds & {"Metaspace", "ByteFallback", "ReplaceMetaspace"}:
            self.kind = "sentencepiece"
        else:
            self.kind = "decode"
        self.special_ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
        self.table: list[bytes] | None = self._table() if self.kind != "decode" else None
        self._anchor: int | None = None

    def _table(self) -> list[bytes]:
        vocab = self.tokenizer.get_vocab()
        table = [b""] * (max(vocab.values()) + 1)
        added = {int(i): token.content for i, token in (getattr(self.tokenizer, "added_tokens_decoder", {}) or {}).items()}
        byte_of = _byte_level_decoder()
        for token, i in vocab.items():
            if i in added:
                table[i] = added[i].encode()
            elif self.kind == "byte_level":
                table[i] = bytes(byte_of[c] for c in token) if all(c in byte_of for c in token) else token.encode()
            else:
                match = _BYTE_FALLBACK.match(token)
                table[i] = bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode()
        return table

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token on its own (`decode` kind: its decoded text; a word-level token has no spacing)."""
        if self.table is not None:
            return self.table[token_id] if 0 <= token_id < len(self.table) else b""
        return self._decode([token_id]).encode()

    def following_bytes(self, token_id: int) -> bytes:
        """
        The bytes a token adds after ordinary text: its own bytes, or for the `decode` kind what it adds after another
        word (a word-level tokenizer's `" word"`).
        """
        if self.table is not None:
            return self.token_bytes(token_id)
        if self._anchor is None:
            self._anchor = next(i for i in range(len(self.tokenizer)) if i not in self.special_ids)
        return self.continuation_bytes([self._anchor], [token_id]) or b""

    def continuation_bytes(self, context_ids: Sequence[int], ids: Sequence[int]) -> bytes | None:
        """
        The bytes `ids` add after `context_ids`, or `None` where the `decode` kind cannot tell (the decoded context
        is not a prefix of the decoded whole, e.g. it ends in an incomplete character).
        """
        if not ids:
            return b""
        if self.table is not None:
            return b"".join(self.token_bytes(int(i)) for i in ids)
        before = self._decode(context_ids)
        after = self._decode([*context_ids, *ids])
        if not after.startswith(before) or "\ufffd" in after[len(before) :]:
            return None
        return after[len(before) :].encode()

    def text(self, ids: Sequence[int]) -> str:
        """The text of `ids` (no clean-up of spaces; an incomplete or invalid byte sequence becomes `\ufffd`)."""
        if self.table is None:
            return self._decode(ids)
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")
