"""Batched generation for many prompts: [`generate_batched`] encodes them (see [`s2t_hf.prompts.encode_prompts`]),
generates `batch_size` left-padded prompts per `generate` call (or per fused S2T call with `s2t=...`), and returns only
the generated continuations, in the order of the prompts.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
from transformers.utils import logging

from ..processor import S2TLogitsProcessor
from ..prompts import left_pad, prompt_token_ids, resolve_pad_token_id


__all__ = ["generate_batched"]

logger = logging.get_logger(__name__)

# `generate` arguments `generate_batched` sets itself, or whose output it cannot split into one continuation per prompt
_RESERVED_GENERATE_KWARGS = ("input_ids", "attention_mask", "inputs")


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _eos_ids(generate_kwargs: dict[str, Any], model: Any, tokenizer: Any) -> list[int]:
    eos = generate_kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return [int(eos)] if isinstance(eos, numbers.Integral) else [int(e) for e in eos]


def _until_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    """The generated ids up to and including the first end-of-sequence token (the rest is padding)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1]
    return ids


def generate_batched(
    model: torch.nn.Module,
    prompts: Iterable[Any],
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    s2t: Any = None,
    chat_template: bool | None = None,
    add_special_tokens: bool = True,
    decode: bool = True,
    skip_special_tokens: bool = True,
    sort_by_length: bool = True,
    show_progress: bool = True,
    desc: str = "Generating",
    **generate_kwargs: Any,
) -> list[str] | list[list[int]]:
    """
    Generate for many prompts, `batch_size` left-padded prompts per `generate` call, and return only the continuations.

    Prompts are encoded as in [`s2t_hf.prompts.encode_prompts`]; with `sort_by_length`, prompts of similar lengths share a batch (less
    padding) and the results still come back in the order of `prompts`. Each continuation stops after its first
    end-of-sequence token: the padding `generate` writes after it is dropped.

    Args:
        model (`PreTrainedModel`):
            A causal LM.
        prompts (iterable of `str`, of chat messages or of token-id lists):
            The prompts (see [`encode_prompts`]).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed for strings, chat messages and `decode=True`.
        batch_size (`int`, *optional*, defaults to 8):
            Prompts per `generate` call.
        s2t (`S2TLogitsProcessor`, *optional*):
            Decode with S2T through the fused loop ([`s2t_hf.generate`]); to use the drop-in path instead, pass
            `logits_processor=[s2t]`. The processor's `stats` and `records` then describe the last batch. Its
            `teacher_prompts`, if any, hold one teacher prompt per prompt, in the order of `prompts`: each batch gets
            its own.
        chat_template (`bool`, *optional*):
            Whether strings are formatted with the tokenizer's chat template; defaults to `True` when it has one.
        add_special_tokens (`bool`, *optional*, defaults to `True`):
            Whether strings tokenized as plain text get the tokenizer's special tokens.
        decode (`bool`, *optional*, defaults to `True`):
            Return strings (`tokenizer.decode` of each continuation) instead of token-id lists.
        skip_special_tokens (`bool`, *optional*, defaults to `True`):
            Passed to `tokenizer.decode`.
        sort_by_length (`bool`, *optional*, defaults to `True`):
            Batch prompts of similar lengths together.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm bar over prompts (hidden when transformers' progress bars are disabled).
        desc (`str`, *optional*, defaults to `"Generating"`):
            The bar's label.
        generate_kwargs:
            Passed to `model.generate` (e.g. `max_new_tokens=64`, `do_sample=False`, `logits_processor=[...]`).
            `pad_token_id` defaults to the tokenizer's, then the model's; it also pads the prompts.

    Returns:
        `list[str]` (`decode=True`) or `list[list[int]]`: one continuation per prompt, in the order of `prompts`.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf.generation import generate_batched
    >>> from s2t_hf.tasks import build_tokenizer, padded_vocab_size
    >>> tokenizer = build_tokenizer()
    >>> config = LlamaConfig(vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> _ = torch.manual_seed(0)
    >>> model = AutoModelForCausalLM.from_config(config).eval()
    >>> prompts = ["tom has 5 apples .", [{"role": "user", "content": "ann has 3 pens ."}], [2, 4, 6]]
    >>> unused_rows = list(range(len(tokenizer), config.vocab_size))  # rows above the tokenizer's vocabulary
    >>> continuations = generate_batched(model, prompts, tokenizer, batch_size=2, max_new_tokens=4, do_sample=False,
    ...                                  suppress_tokens=unused_rows, show_progress=False)
    >>> len(continuations), all(len(text.split()) <= 4 for text in continuations)
    (3, True)
    >>> ids = generate_batched(model, [[2, 4, 6]], tokenizer, decode=False, max_new_tokens=4, do_sample=False,
    ...                        suppress_tokens=unused_rows, show_progress=False)
    >>> tokenizer.decode(ids[0], skip_special_tokens=True) == continuations[2]
    True

    ```
    """
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    for key in _RESERVED_GENERATE_KWARGS:
        if key in generate_kwargs:
            raise ValueError(f"`generate_batched` builds `{key}` from `prompts`; remove `{key}` from the arguments.")
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError(
            "`generate_batched` returns one continuation per prompt; for several samples of a prompt, repeat it in "
            "`prompts` instead of `num_return_sequences`."
        )
    if generate_kwargs.get("return_dict_in_generate"):
        raise ValueError(
            "`generate_batched` returns the continuations only; call `model.generate` for `return_dict_in_generate`."
        )
    if decode and tokenizer is None:
        raise ValueError("`decode=True` needs the `tokenizer`; pass it, or `decode=False` to get token ids.")
    if s2t is not None:
        # looked up on the package at call time (`generate` is defined in `generation/__init__.py`, which imports this
        # module); tests replace `s2t_hf.generation.generate` to count the fused calls
        from . import generate as fused_generate

        if not isinstance(s2t, S2TLogitsProcessor):
            raise TypeError(f"`s2t` must be an `S2TLogitsProcessor`, got {type(s2t).__name__}.")

    rows = prompt_token_ids(prompts, tokenizer, chat_template=chat_template, add_special_tokens=add_special_tokens)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    num_embeddings = getattr(embeddings, "num_embeddings", None)
    if num_embeddings is not None:
        for index, row in enumerate(rows):
            if max(row) >= num_embeddings:
                raise ValueError(
                    f"`prompts[{index}]` holds token id {max(row)}, but the model's embedding has {num_embeddings} "
                    "rows; was it encoded with another tokenizer?"
                )
    pad = resolve_pad_token_id(generate_kwargs.pop("pad_token_id", None), tokenizer, model)
    eos_ids = _eos_ids(generate_kwargs, model, tokenizer)
    device = _model_device(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort_by_length else list(range(len(rows)))
    teacher_prompts = None if s2t is None else s2t.teacher_prompts
    if teacher_prompts is not None and len(teacher_prompts) != len(rows):
        raise ValueError(
            f"`s2t.teacher_prompts` has {len(teacher_prompts)} prompts for {len(rows)} `prompts`: give one teacher "
            "prompt per prompt, in the order of `prompts` (each batch gets its own)."
        )
    continuations: list[list[int]] = [[] for _ in rows]

    from transformers.utils.logging import tqdm

    with tqdm(total=len(rows), desc=desc, unit="prompt", leave=False, disable=not show_progress) as bar:
        try:
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = left_pad([rows[i] for i in index], pad, device)
                if s2t is not None:
                    if teacher_prompts is not None:
                        s2t.teacher_prompts = [teacher_prompts[i] for i in index]
                    output = fused_generate(model, s2t, **batch, pad_token_id=pad, **generate_kwargs)
                else:
                    output = model.generate(**batch, pad_token_id=pad, **generate_kwargs)
                new = output[:, batch["input_ids"].shape[1] :].tolist()
                for i, ids in zip(index, new):
                    continuations[i] = _until_eos(ids, eos_ids)
                bar.update(len(index))
        finally:
            if teacher_prompts is not None:
                s2t.teacher_prompts = teacher_prompts
    if not decode:
        return continuations
    return [tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in continuations]
