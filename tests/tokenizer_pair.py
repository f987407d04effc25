"""Two genuinely different tokenizers over the same words, built offline with `tokenizers`, for the cross-tokenizer
tests: a byte-level BPE (GPT-2 / SmolLM2 style: `Ġ` for a space, ChatML end-of-turn) and a SentencePiece-style
Unigram (Gemma / Llama 2 style: `▁` for a space, `<0xNN>` byte fallback, `<end_of_turn>`)."""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


WORDS = (
    "the then there these they them a an and apples pears tom has had five seven 12 123 45 é café naïve x "
    "question answer total more less sold bought each day 3 9 = + - * . , ? !"
).split()


def corpus() -> list[str]:
    lines = []
    for i, word in enumerate(WORDS):
        nxt = WORDS[(i * 7 + 3) % len(WORDS)]
        lines.append(f"{word} {nxt} the {word}{nxt} then {nxt}.")
        lines.append(f"tom has {i} apples and {word} there, café naïve {i * 13}")
    return lines * 3


def _wrap(backend: Tokenizer, **special) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.padding_side = "left"
    return tokenizer


@lru_cache(maxsize=None)
def byte_level_bpe(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE with ChatML specials (`<|endoftext|>` pad/BOS, `<|im_end|>` EOS)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    tokenizer = _wrap(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


@lru_cache(maxsize=None)
def sentencepiece_unigram() -> PreTrainedTokenizerFast:
    """Gemma-style Unigram: `▁` for spaces, `<0xNN>` byte fallback, `<bos>` added, `<eos>`/`<end_of_turn>` ends."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    # a fixed vocabulary (the Unigram trainer is not deterministic): every character of the corpus, the words with and
    # without a leading `▁`, and a few word pieces; longer pieces score higher, so whole words win where they exist
    pieces: dict[str, float] = {}
    for line in corpus():
        for ch in line.replace(" ", "▁"):
            pieces.setdefault(ch, -8.0)
    for word in WORDS:
        for piece in (word, "▁" + word, word[:2], "▁" + word[:2]):
            pieces.setdefault(piece, -10.0 + 1.5 * len(piece))
    vocab = [(token, 0.0) for token in specials] + sorted(pieces.items())
    backend = Tokenizer(models.Unigram(vocab, unk_id=3))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    # byte fallback: the 256 `<0xNN>` pieces (rarely preferred), as SentencePiece adds them
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    vocab += [[f"<0x{b:02X}>", -20.0] for b in range(256)]
    data["model"]["byte_fallback"] = True
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
    }
    backend = Tokenizer.from_str(json.dumps(data))
    tokenizer = _wrap(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    # the turn markers are special tokens, as in Gemma's tokenizer (their ids stay those of the vocabulary)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    return tokenizer
