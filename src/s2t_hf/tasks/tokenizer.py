"""A word-level tokenizer for the arithmetic task, built locally (no download) with the `tokenizers` library."""

from __future__ import annotations

from collections.abc import Sequence

from .arithmetic import task_words


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tokenizer", "padded_vocab_size"]

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
USER_TOKEN = "<user>"
ASSISTANT_TOKEN = "<assistant>"

# `<bos> <user> {problem} <assistant>` then the solution and `<eos>`. Whitespace does not matter to a
# whitespace-split word-level tokenizer, so the template only has to keep words apart.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' <user> ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ ' <assistant> ' + message['content'] + ' ' + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ raise_exception('The arithmetic task has no system role.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' <assistant>' }}{% endif %}"
)


def build_tokenizer(extra_words: Sequence[str] = (), model_max_length: int = 512):
    """
    Build the word-level tokenizer of the arithmetic task as a `transformers.PreTrainedTokenizerFast`.

    The vocabulary is the special tokens (`<pad>`, `<bos>`, `<eos>`, `<unk>`, `<user>`, `<assistant>`) followed by
    every word of the task, sorted, so it is the same on every machine. Padding is on the left (batched generation),
    and the tokenizer carries a chat template: `<bos> <user> {problem} <assistant>`, then the solution and `<eos>`.

    Args:
        extra_words (`Sequence[str]`, *optional*, defaults to `()`):
            More words to add after the task's own.
        model_max_length (`int`, *optional*, defaults to `512`):
            Recorded as the tokenizer's `model_max_length`.

    Returns:
        `transformers.PreTrainedTokenizerFast`: Save it with `save_pretrained`, load it with `AutoTokenizer`.

    Examples:

    ```python
    >>> from s2t_hf.tasks import build_tokenizer
    >>> tokenizer = build_tokenizer()
    >>> ids = tokenizer.apply_chat_template(
    ...     [{"role": "user", "content": "tom has 5 apples ."}], add_generation_prompt=True, tokenize=False
    ... )
    >>> ids.split()
    ['<bos>', '<user>', 'tom', 'has', '5', 'apples', '.', '<assistant>']
    ```
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS.values(), USER_TOKEN, ASSISTANT_TOKEN]
    for word in [*task_words(), *extra_words]:
        if any(ch.isspace() for ch in word) or not word:
            raise ValueError(f"`extra_words` must be non-empty words without whitespace, got {word!r}.")
        if word not in words:
            words.append(word)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="left",
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [USER_TOKEN, ASSISTANT_TOKEN]})
    return tokenizer


def padded_vocab_size(tokenizer_size: int, spare_rows: int = 32, multiple: int = 64) -> int:
    """
    Number of embedding rows for a model: the tokenizer size plus at least `spare_rows`, rounded up to `multiple`.

    The spare rows (never produced by the tokenizer) are where S2T-Local keeps its reserved "bins", like the padded
    vocabularies of Qwen models.

    Args:
        tokenizer_size (`int`):
            `len(tokenizer)`.
        spare_rows (`int`, *optional*, defaults to `32`):
            Fewest rows above the tokenizer's vocabulary.
        multiple (`int`, *optional*, defaults to `64`):
            Round up to a multiple of this.

    Returns:
        `int`

    Examples:

    ```python
    >>> padded_vocab_size(199)
    256
    ```
    """
    if tokenizer_size < 1 or spare_rows < 0 or multiple < 1:
        raise ValueError(
            f"`tokenizer_size` must be >= 1, `spare_rows` >= 0 and `multiple` >= 1, got {tokenizer_size}, "
            f"{spare_rows} and {multiple}."
        )
    return -(-(tokenizer_size + spare_rows) // multiple) * multiple
