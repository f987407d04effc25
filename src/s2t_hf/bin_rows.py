"""The selector's reserved rows: choosing and checking them, fingerprinting the vocabulary, growing the embeddings.

An [`S2TSelector`] reserves B output rows for its bins (and one for the learned trigger). They are, in order of
preference: ids given by the user, spare output rows above the tokenizer, the tokenizer's unused reserved tokens, or new
rows added to the embeddings. The vocabulary fingerprint records which base model the rows were chosen on, so that a
saved selector refuses another base model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .kv import unwrap_model


logger = logging.get_logger(__name__)

__all__ = [
    "ReservedRows",
    "check_explicit_ids",
    "choose_bin_rows",
    "choose_reserved_rows",
    "FINGERPRINT_TOLERANCE",
    "fingerprint_distance",
    "fingerprint_rows",
    "grow_embeddings",
    "input_embedding_weight",
    "output_head",
    "output_head_rows",
    "parse_fingerprint",
    "shrink_embeddings",
    "vocab_fingerprint",
]

# Names of tokens that tokenizers reserve and never use: `<|reserved_special_token_N|>` (Llama 3), `<unusedN>`
# (Gemma), `[unusedN]` (BERT), `<|reserved_N|>`, `<reserved_N>`.
_RESERVED_TOKEN_PATTERN = re.compile(r"^(?:<\|?|\[)(?:reserved|unused)[a-z_]*?\d+(?:\|?>|\])$", re.IGNORECASE)
_FINGERPRINT_VERSION = "v1"
_FINGERPRINT_ROWS = 64
# v2: the v1 hash and a sketch of the sampled rows, compared with a tolerance (quantised copies of a model match)
_SKETCH_VERSION = "v2"
_SKETCH_DIRECTIONS = 4
#: The largest relative sketch distance [`fingerprint_distance`] accepts as the same model (4-bit quantisation: ~0.1).
FINGERPRINT_TOLERANCE = 0.25


# --------------------------------------------------------------------------------------------------------------------
# The output head and the fingerprint


def output_head(base: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the output head (`lm_head` for most causal LMs)."""
    get_output_embeddings = getattr(base, "get_output_embeddings", None)
    head = get_output_embeddings() if get_output_embeddings is not None else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"`model` ({type(base).__name__}) has no output head (`get_output_embeddings()` returned {head!r}); "
            "S2TSelector needs a causal LM such as `AutoModelForCausalLM.from_pretrained(...)`."
        )
    for name, module in base.named_modules():
        if module is head:
            return name, head
    raise ValueError(f"The output head of `model` ({type(head).__name__}) is not one of its named modules.")


def output_head_rows(base: nn.Module) -> int:
    """Number of rows of the output head of `base` (its vocabulary size as the head sees it)."""
    return int(output_head(base)[1].weight.shape[0])


def input_embedding_weight(model: nn.Module) -> torch.Tensor:
    """The input embedding matrix of `model` (a transformers model or a `PeftModel` around one)."""
    embeddings = unwrap_model(model).get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        raise ValueError(f"`model` ({type(model).__name__}) has no input embedding matrix to fingerprint.")
    return weight


def _sampled_rows(weight: torch.Tensor, num_ordinary: int, exclude_token_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The evenly spaced ordinary rows a fingerprint samples: their indices and their values (on the CPU)."""
    if weight.is_meta:
        raise ValueError("Cannot fingerprint a model on the `meta` device; load its weights first.")
    num_ordinary = max(1, min(num_ordinary, weight.shape[0]))
    index = torch.linspace(0, num_ordinary - 1, steps=min(_FINGERPRINT_ROWS, num_ordinary)).round().long().unique()
    if exclude_token_ids:
        keep = ~torch.isin(index, torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long))
        index = index[keep]
    return index, weight.detach()[index.to(weight.device)].cpu()


def _sketch(rows: torch.Tensor) -> torch.Tensor:
    """Each sampled row projected on `_SKETCH_DIRECTIONS` fixed random directions (float64, so that the same weights
    give the same sketch on any machine up to float16 rounding)."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(rows.shape[1], _SKETCH_DIRECTIONS, generator=generator, dtype=torch.float64)
    return (rows.double() @ directions / rows.shape[1] ** 0.5).flatten()


def fingerprint_rows(
    weight: torch.Tensor, num_rows: int, num_ordinary: int, exclude_token_ids=None, *, sketch: bool = False
) -> str:
    """
    The fingerprint of an embedding matrix (see [`vocab_fingerprint`]): `num_rows` is the number of rows recorded in
    it, `num_ordinary` the number of rows sampled from, `exclude_token_ids` rows left out of the sample. With
    `sketch=True` (format `v2`) it also holds a sketch of the sampled rows that [`fingerprint_distance`] compares.
    """
    num_ordinary = max(1, min(num_ordinary, weight.shape[0]))
    index, sampled = _sampled_rows(weight, num_ordinary, exclude_token_ids)
    # Rounded to bf16 so that a bf16 copy of a float32 model has the same fingerprint.
    rows = sampled.to(torch.bfloat16).contiguous()
    digest = hashlib.sha256()
    digest.update(f"{num_rows}:{num_ordinary}:{weight.shape[1]}:".encode())
    digest.update(index.numpy().tobytes())
    digest.update(rows.view(torch.int16).numpy().tobytes())
    if not sketch:
        return f"{_FINGERPRINT_VERSION}-{num_rows}-{num_ordinary}-{digest.hexdigest()[:16]}"
    values = _sketch(sampled.float()).to(torch.float16).numpy().astype(">f2").tobytes().hex()
    return f"{_SKETCH_VERSION}-{num_rows}-{num_ordinary}-{digest.hexdigest()[:16]}-{values}"


def parse_fingerprint(fingerprint: str) -> tuple[int, int] | None:
    """`(rows, ordinary rows)` of a fingerprint written by [`vocab_fingerprint`] (format `v1`, or `v2` with a
    sketch), or `None` for an unknown format."""
    match = re.fullmatch(rf"{_FINGERPRINT_VERSION}-(\d+)-(\d+)-[0-9a-f]+", fingerprint or "") or re.fullmatch(
        rf"{_SKETCH_VERSION}-(\d+)-(\d+)-[0-9a-f]{{16}}-(?:[0-9a-f]{{4}})+", fingerprint or ""
    )
    return (int(match.group(1)), int(match.group(2))) if match else None


def fingerprint_distance(fingerprint: str, weight: torch.Tensor, exclude_token_ids=None) -> float | None:
    """
    How far the embeddings `weight` lie from those a `v2` fingerprint was taken of: the relative distance
    `||sketch(weight) - recorded|| / ||recorded||` of the sketches (0 for the same weights, in any dtype; about 0.1 for
    4-bit quantised weights; about 1 or more for another model). `None` for a `v1` fingerprint, which holds a hash only.
    """
    parsed = parse_fingerprint(fingerprint)
    if parsed is None or not fingerprint.startswith(f"{_SKETCH_VERSION}-"):
        return None
    _, num_ordinary = parsed
    recorded = torch.from_numpy(np.frombuffer(bytes.fromhex(fingerprint.rsplit("-", 1)[1]), dtype=">f2").astype(
        np.float64))
    _, sampled = _sampled_rows(weight, num_ordinary, exclude_token_ids)
    found = _sketch(sampled.float())
    if found.shape != recorded.shape:
        return float("inf")
    return float((found - recorded).norm() / recorded.norm().clamp_min(1e-12))


def vocab_fingerprint(model, tokenizer=None, *, exclude_token_ids=None, sketch: bool = False) -> str:
    """
    A cheap fingerprint of a model's vocabulary: its number of embedding rows and a SHA-256 of a bf16-rounded,
    evenly spaced subset of its ordinary input-embedding rows. The same model in float32 or bfloat16 gives the same
    fingerprint; a model with another vocabulary size or other embedding weights gives another one.

    The result reads `v1-<rows>-<ordinary rows>-<hash>`, so a mismatch can be explained. With `sketch=True` it reads
    `v2-<rows>-<ordinary rows>-<hash>-<sketch>`: the sketch (the sampled rows projected on four fixed random
    directions, in float16) lets [`fingerprint_distance`] accept the same model with quantisation-level differences
    (a GGUF's de-quantised weights against the original checkpoint) and still refuse another model. Selectors record
    this form.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The model (before any rows were added for the bins).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            When given, only rows below `len(tokenizer)` count as ordinary (spare rows of a padded vocabulary are
            left out).
        exclude_token_ids (`list[int]`, *optional*):
            Rows to leave out, e.g. the bins when they are reserved tokens inside the tokenizer's range.
        sketch (`bool`, *optional*, defaults to `False`):
            Add the sketch (format `v2`).

    Returns:
        `str`: the fingerprint.

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf.selector import vocab_fingerprint
    >>> config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                      num_key_value_heads=1, vocab_size=64)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> fingerprint = vocab_fingerprint(model)
    >>> fingerprint.startswith("v1-64-64-")
    True
    >>> vocab_fingerprint(model.bfloat16()) == fingerprint  # stable across dtypes
    True

    ```
    """
    weight = input_embedding_weight(model)
    num_rows = int(weight.shape[0])
    num_ordinary = min(len(tokenizer), num_rows) if tokenizer is not None else num_rows
    return fingerprint_rows(weight, num_rows, num_ordinary, exclude_token_ids, sketch=sketch)


# --------------------------------------------------------------------------------------------------------------------
# Choosing the reserved rows


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}


def _reserved_token_ids(tokenizer, head_rows: int) -> list[int]:
    """Ids of the tokenizer's unused reserved tokens (not used as bos/eos/pad/... either), sorted."""
    special = _special_ids(tokenizer)
    return sorted(
        int(i)
        for token, i in tokenizer.get_vocab().items()
        if _RESERVED_TOKEN_PATTERN.match(token) and int(i) not in special and int(i) < head_rows
    )


def check_explicit_ids(ids, num_bins: int, head_rows: int, tokenizer, name: str = "bin_token_ids") -> list[int]:
    """
    Checks ids given by the user for reserved rows and returns them as a list of `int`: `num_bins` distinct ids below
    `head_rows` that the tokenizer never generates (spare rows, unused reserved tokens or tokens the user added).
    `name` is the argument named in the errors.
    """
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a list of integers, got {ids!r}.") from error
    if len(ids) != num_bins:
        raise ValueError(
            f"`{name}` has {len(ids)} ids but `num_bins` is {num_bins}; give one id per bin or change "
            "`num_bins`."
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"`{name}` must be distinct, got {ids}.")
    out_of_range = [i for i in ids if not 0 <= i < head_rows]
    if out_of_range:
        raise ValueError(
            f"`{name}` {out_of_range} are out of range: the model's output head has {head_rows} rows (ids 0 to "
            f"{head_rows - 1}). Pick ids below {head_rows}, resize the embeddings first, or leave "
            "`bin_token_ids=None` so that S2TSelector chooses free rows (it adds rows when none are free)."
        )
    if tokenizer is not None:
        special = _special_ids(tokenizer)
        reserved = set(_reserved_token_ids(tokenizer, head_rows))
        added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})} - special
        size = len(tokenizer)
        ordinary = [i for i in ids if i < size and i not in reserved and i not in added]
        if ordinary:
            shown = ", ".join(f"{i} ({tokenizer.convert_ids_to_tokens(i)!r})" for i in ordinary[:8])
            raise ValueError(
                f"`{name}` contains tokens the tokenizer uses: {shown}. Bins must be rows the model never has "
                f"to generate: ids >= len(tokenizer) ({size}), unused reserved tokens such as "
                "`<|reserved_special_token_N|>`, or tokens you added yourself. Leave `bin_token_ids=None` to let "
                "S2TSelector choose (it adds rows to the embeddings when none are free)."
            )
    return ids


def choose_bin_rows(base: nn.Module, tokenizer, num_bins: int, bin_token_ids) -> tuple[list[int], int]:
    """`(bin_token_ids, num_added_rows)`: explicit ids, else spare rows, else reserved tokens, else new rows."""
    head_rows = output_head_rows(base)
    if tokenizer is not None and len(tokenizer) > head_rows:
        raise ValueError(
            f"`tokenizer` has {len(tokenizer)} tokens but the model's output head only has {head_rows} rows; call "
            "`model.resize_token_embeddings(len(tokenizer))` before creating the selector."
        )
    if bin_token_ids is not None:
        return check_explicit_ids(bin_token_ids, num_bins, head_rows, tokenizer), 0
    if tokenizer is not None:
        size = len(tokenizer)
        if head_rows - size >= num_bins:
            logger.info(f"S2T bins use the spare output rows {size} to {size + num_bins - 1} above the tokenizer.")
            return list(range(size, size + num_bins)), 0
        reserved = _reserved_token_ids(tokenizer, head_rows)
        if len(reserved) >= num_bins:
            ids = reserved[-num_bins:]
            logger.info(f"S2T bins use {num_bins} unused reserved tokens (ids {ids[0]} to {ids[-1]}).")
            return ids, 0
    logger.info(f"S2T bins: no free rows found, adding {num_bins} rows to the embeddings ({head_rows} to "
                f"{head_rows + num_bins - 1}).")
    return list(range(head_rows, head_rows + num_bins)), num_bins


def grow_embeddings(base: nn.Module, num_added_rows: int) -> None:
    """Adds `num_added_rows` zero rows to the input embeddings and the output head (deterministic, so a reload gives
    the same base model)."""
    head_rows = output_head_rows(base)
    input_rows = int(input_embedding_weight(base).shape[0])
    if head_rows != input_rows:
        raise ValueError(
            f"Cannot add rows for the bins: the input embeddings have {input_rows} rows but the output head has "
            f"{head_rows}. Pass `bin_token_ids` with ids of rows that exist in the output head."
        )
    base.resize_token_embeddings(head_rows + num_added_rows, mean_resizing=False)
    with torch.no_grad():
        base.get_input_embeddings().weight[head_rows:].zero_()
        head = base.get_output_embeddings()
        head.weight[head_rows:].zero_()
        bias = getattr(head, "bias", None)
        if bias is not None and bias.shape[0] == head_rows + num_added_rows:
            bias[head_rows:].zero_()


def shrink_embeddings(base: nn.Module, num_rows: int) -> None:
    """Resizes the embeddings of `base` back to `num_rows` rows (undoes [`grow_embeddings`])."""
    if output_head_rows(base) != num_rows:
        base.resize_token_embeddings(num_rows, mean_resizing=False)


@dataclasses.dataclass(frozen=True)
class ReservedRows:
    """
    The rows a new selector reserves, as chosen by [`choose_reserved_rows`].

    Args:
        bin_token_ids (`list[int]`):
            The B bin rows.
        trigger_token_id (`int`, *optional*):
            The learned trigger's row, or `None`.
        num_added_rows (`int`):
            Rows to add to the embeddings before the adapter is injected (0 when the rows exist already).
    """

    bin_token_ids: list[int]
    trigger_token_id: int | None
    num_added_rows: int

    @property
    def token_ids(self) -> list[int]:
        """Every reserved row: the bins, then the trigger's row if any."""
        return self.bin_token_ids + ([self.trigger_token_id] if self.trigger_token_id is not None else [])


def choose_reserved_rows(
    model: nn.Module,
    tokenizer,
    num_bins: int,
    bin_token_ids: list[int] | None,
    learned_trigger: bool,
    trigger_token_id: int | None,
) -> ReservedRows:
    """
    Chooses the rows of a new selector: `num_bins` bin rows (see [`choose_bin_rows`]) and, with `learned_trigger`
    (or an explicit `trigger_token_id`), the learned trigger's row, chosen the same way right after the bins.

    Args:
        model (`PreTrainedModel`):
            The student (not grown yet).
        tokenizer (`PreTrainedTokenizerBase` or `None`):
            The student's tokenizer, if known.
        num_bins (`int`):
            Number of bins.
        bin_token_ids (`list[int]`, *optional*):
            Explicit bin rows.
        learned_trigger (`bool`):
            Whether to reserve a row for the learned trigger.
        trigger_token_id (`int`, *optional*):
            Explicit row of the learned trigger (needed when `bin_token_ids` is given).

    Returns:
        [`ReservedRows`]
    """
    output_head(model)  # a model without an output head fails here, before any other check
    learned_trigger = learned_trigger or trigger_token_id is not None
    if learned_trigger and trigger_token_id is None and bin_token_ids is not None:
        raise ValueError(
            "`learned_trigger=True` with explicit `bin_token_ids` needs `trigger_token_id` too (the id of the "
            "trigger's row), or leave both unset so that S2TSelector chooses free rows."
        )
    choose_trigger = learned_trigger and trigger_token_id is None
    ids, num_added = choose_bin_rows(model, tokenizer, num_bins + int(choose_trigger), bin_token_ids)
    if choose_trigger:
        ids, trigger_token_id = ids[:-1], ids[-1]
    elif trigger_token_id is not None:
        trigger_token_id = check_explicit_ids(
            [trigger_token_id], 1, output_head_rows(model) + num_added, tokenizer, name="trigger_token_id"
        )[0]
        if trigger_token_id in ids:
            raise ValueError(
                f"`trigger_token_id` {trigger_token_id} is also a bin row ({ids}); give the trigger a row of its own."
            )
    return ReservedRows(bin_token_ids=ids, trigger_token_id=trigger_token_id, num_added_rows=num_added)
