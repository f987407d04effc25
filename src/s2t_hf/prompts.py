"""Prompts in, token ids out: [`encode_prompts`] turns strings, chat messages or token ids into a left-padded batch.
This module only encodes and imports nothing else from `s2t_hf`; batched generation is
[`s2t_hf.generation.generate_batched`].

Left padding is what batched generation with a decoder-only model needs: every row's last prompt token sits in the last
column, so the first generated token of every row comes from the same position. The tokenizer's `padding_side` is never
changed: the padding is done here, from token ids.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchEncoding
from transformers.utils import logging


__all__ = ["encode_prompts", "is_token_id", "left_pad", "prompt_token_ids", "resolve_pad_token_id"]

logger = logging.get_logger(__name__)


def _is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def is_token_id(value: Any) -> bool:
    """Whether `value` is an integer token id (Python or numpy integer; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and all(is_token_id(t) for t in prompt)


def _as_prompt_list(prompts: Any, name: str) -> list[Any]:
    if isinstance(prompts, str):
        raise TypeError(f"`{name}` must be a list of prompts, got one string; wrap it in a list: `[{prompts[:20]!r}]`.")
    if isinstance(prompts, (torch.Tensor, np.ndarray)):
        if prompts.ndim != 2:
            raise ValueError(
                f"`{name}` as a tensor must be 2-D (one row of token ids per prompt), got shape {tuple(prompts.shape)}."
            )
        return prompts.tolist()
    if _is_messages(prompts):
        raise TypeError(f"`{name}` is one chat (a list of messages); wrap it in a list for one prompt: `[messages]`.")
    prompts = list(prompts)
    if prompts and all(is_token_id(t) for t in prompts):
        raise TypeError(f"`{name}` holds integers: one prompt's token ids? Wrap it in a list: `[[{prompts[0]}, ...]]`.")
    return prompts


def prompt_token_ids(
    prompts: Iterable[Any],
    tokenizer: Any = None,
    *,
    chat_template: bool | None = None,
    add_special_tokens: bool = True,
    name: str = "prompts",
) -> list[list[int]]:
    """
    The token ids of every prompt, unpadded (see [`encode_prompts`] for the rules).

    Args:
        prompts (iterable of `str`, of chat messages or of token-id lists):
            The prompts.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed for strings and chat messages.
        chat_template (`bool`, *optional*):
            Whether strings are formatted with the tokenizer's chat template; defaults to `True` when it has one.
        add_special_tokens (`bool`, *optional*, defaults to `True`):
            Whether strings tokenized as plain text get the tokenizer's special tokens (e.g. BOS).
        name (`str`, *optional*, defaults to `"prompts"`):
            The argument's name in error messages.

    Returns:
        `list[list[int]]`: one list of token ids per prompt, in order.
    """
    prompts = _as_prompt_list(prompts, name)
    if not prompts:
        raise ValueError(f"`{name}` is empty; give at least one prompt.")
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    use_template = has_template if chat_template is None else bool(chat_template)
    if use_template and not has_template:
        raise ValueError(
            "`chat_template=True` but the tokenizer has no chat template; set `tokenizer.chat_template` or pass "
            "`chat_template=False` to tokenize prompts as plain text."
        )
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, (torch.Tensor, np.ndarray)):
            if prompt.ndim != 1:
                raise ValueError(
                    f"`{name}[{index}]` as a tensor must be 1-D token ids, got shape {tuple(prompt.shape)}."
                )
            prompt = prompt.tolist()
        if isinstance(prompt, str) or _is_messages(prompt):
            if tokenizer is None:
                raise ValueError(f"`{name}` holds text or chat messages; pass the `tokenizer` to encode them.")
            if isinstance(prompt, str) and not use_template:
                ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            else:
                if not use_template:
                    why = "`chat_template=False`" if has_template else "the tokenizer has no chat template"
                    raise ValueError(
                        f"`{name}[{index}]` is a list of chat messages but {why}; pass strings or token ids instead"
                        + ("" if has_template else ", or set `tokenizer.chat_template`")
                        + "."
                    )
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                # the template writes the special tokens (BOS...) itself
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif _is_token_ids(prompt):
            ids = [int(t) for t in prompt]
            if any(t < 0 for t in ids):
                raise ValueError(f"`{name}[{index}]` holds negative token ids: {ids[:8]}.")
        else:
            raise TypeError(
                f"`{name}[{index}]` must be a string, a list of chat messages or a list of token ids, got "
                f"{type(prompt).__name__}."
            )
        if not ids:
            raise ValueError(f"`{name}[{index}]` is empty (no tokens); every prompt needs at least one token.")
        encoded.append(list(ids))
    return encoded


def left_pad(
    rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str | None = None
) -> BatchEncoding:
    """
    Token-id lists as one left-padded batch: `input_ids` (padding `pad_token_id`) and `attention_mask` (0 on padding).

    Args:
        rows (sequence of token-id lists):
            One non-empty list per prompt.
        pad_token_id (`int`):
            The id written in the padding positions.
        device (`torch.device` or `str`, *optional*):
            Where the tensors go (default: CPU).

    Returns:
        `BatchEncoding`: `input_ids` and `attention_mask`, `torch.long` tensors of shape `(len(rows), longest)`.
    """
    if not isinstance(pad_token_id, numbers.Integral) or isinstance(pad_token_id, bool) or pad_token_id < 0:
        raise ValueError(f"`pad_token_id` must be a non-negative integer, got {pad_token_id!r}.")
    if not rows:
        raise ValueError("`rows` is empty; give at least one prompt.")
    length = max(len(r) for r in rows)
    if min(len(r) for r in rows) == 0:
        raise ValueError("Every prompt needs at least one token; one of `rows` is empty.")
    input_ids = torch.tensor([[int(pad_token_id)] * (length - len(r)) + list(r) for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return BatchEncoding({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)})


def resolve_pad_token_id(pad_token_id: int | None, tokenizer: Any = None, model: Any = None) -> int:
    """
    The id that pads prompts: `pad_token_id` if given, else the tokenizer's pad token, else the model's generation
    config's (the first one if it holds several).

    Args:
        pad_token_id (`int`, *optional*):
            An explicit padding id; returned as it is.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Its `pad_token_id` is the first fallback.
        model (`PreTrainedModel`, *optional*):
            Its `generation_config.pad_token_id` is the second fallback.

    Returns:
        `int`: the padding id.

    Raises:
        `ValueError`: when none of them gives a pad token; the message says how to set one.
    """
    if pad_token_id is not None:
        return pad_token_id
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    generation_config = getattr(model, "generation_config", None)
    if getattr(generation_config, "pad_token_id", None) is not None:
        pad = generation_config.pad_token_id
        return int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    if tokenizer is not None:
        raise ValueError(
            "The tokenizer has no pad token, which left padding needs; set one (e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`) or pass `pad_token_id=...`."
        )
    raise ValueError("Padding token-id prompts needs a pad token: pass `pad_token_id=...` or a tokenizer that has one.")


def encode_prompts(
    prompts: Iterable[Any],
    tokenizer: Any = None,
    *,
    chat_template: bool | None = None,
    add_special_tokens: bool = True,
    pad_token_id: int | None = None,
    device: torch.device | str | None = None,
) -> BatchEncoding:
    """
    Encode prompts into one left-padded batch (`input_ids` + `attention_mask`) for `model.generate`.

    Each prompt is a string, a list of chat messages (`{"role", "content"}` dicts) or a list of token ids. Chat messages
    are formatted with the tokenizer's chat template (`add_generation_prompt=True`); so are strings, as one user
    message, when `chat_template` is on (the default when the tokenizer has a template, as in
    [`collect_selection_data`]; pass `chat_template=False` for text already formatted). Token ids are used as they
    are. Rows are padded on the left whatever the tokenizer's `padding_side` (which is left unchanged).

    Args:
        prompts (iterable of `str`, of chat messages or of token-id lists):
            The prompts (token ids also as 1-D tensors or arrays); a 2-D tensor or array gives one prompt per row.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed for strings and chat messages; its `pad_token_id` pads unless `pad_token_id` is given.
        chat_template (`bool`, *optional*):
            Whether strings are formatted with the chat template (`False`: tokenized as plain text). Defaults to `True`
            when the tokenizer has a chat template.
        add_special_tokens (`bool`, *optional*, defaults to `True`):
            Whether strings tokenized as plain text get the tokenizer's special tokens (e.g. BOS); a chat template
            writes its own.
        pad_token_id (`int`, *optional*):
            The padding id; defaults to the tokenizer's pad token.
        device (`torch.device` or `str`, *optional*):
            Where the tensors go (e.g. `model.device`); default CPU.

    Returns:
        `BatchEncoding`: `input_ids` and `attention_mask` of shape `(num_prompts, longest_prompt)`.

    Examples:

    ```python
    >>> from s2t_hf import encode_prompts
    >>> from s2t_hf.tasks import build_tokenizer
    >>> tokenizer = build_tokenizer()  # a word-level tokenizer with a chat template, built locally
    >>> batch = encode_prompts(["tom has 5 apples .", "ann has 3 pens and 2 cups ."], tokenizer)
    >>> [tokenizer.decode(row) for row in batch["input_ids"]]  # doctest: +NORMALIZE_WHITESPACE
    ['<pad> <pad> <pad> <bos> <user> tom has 5 apples . <assistant>',
     '<bos> <user> ann has 3 pens and 2 cups . <assistant>']
    >>> batch["attention_mask"][0].tolist()
    [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    >>> encode_prompts([[5, 6, 7], [8]], pad_token_id=0)["input_ids"].tolist()
    [[5, 6, 7], [0, 0, 8]]

    ```
    """
    rows = prompt_token_ids(prompts, tokenizer, chat_template=chat_template, add_special_tokens=add_special_tokens)
    return left_pad(rows, resolve_pad_token_id(pad_token_id, tokenizer), device)

