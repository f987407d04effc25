"""`S2TSelector`: the local selector of a causal LM, packaged as a standard PEFT adapter.

The selector is the student itself with B reserved output rows ("bins") and, optionally, LoRA on every attention and
MLP projection. The score of a candidate token is the expected bin value at the candidate's position:
`sum_b softmax(bin logits)_b * v_b`. Only the LoRA weights and the B rows of the output head are trained and saved
(PEFT `trainable_token_indices`), never the whole head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
import torch
from torch import nn
from transformers.utils import logging

from .config import CONFIG_NAME, S2TConfig, resolve_file
from .kv import require_decoder_only
from .selection import expected_bin_value


logger = logging.get_logger(__name__)

__all__ = ["S2TSelector", "expected_bin_value", "vocab_fingerprint"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_CARD_NAME = "README.md"

# Names of tokens that tokenizers reserve and never use: `<|reserved_special_token_N|>` (Llama 3), `<unusedN>`
# (Gemma), `[unusedN]` (BERT), `<|reserved_N|>`, `<reserved_N>`.
_RESERVED_TOKEN_PATTERN = re.compile(r"^(?:<\|?|\[)(?:reserved|unused)[a-z_]*?\d+(?:\|?>|\])$", re.IGNORECASE)
_FINGERPRINT_VERSION = "v1"
_FINGERPRINT_ROWS = 64
# PEFT warns about any tied layer in an adapter; the selector only replaces rows the model never reads as inputs.
_TIED_WARNING = "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"
# PEFT warns about missing adapter keys; `S2TSelector.from_pretrained` raises an error instead.
_MISSING_KEYS_WARNING = "Found missing adapter keys"


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (or the model itself)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def _head(base: nn.Module) -> tuple[str, nn.Module]:
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


def _head_rows(base: nn.Module) -> int:
    return int(_head(base)[1].weight.shape[0])


def _input_weight(model: nn.Module) -> torch.Tensor:
    embeddings = _unwrap(model).get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        raise ValueError(f"`model` ({type(model).__name__}) has no input embedding matrix to fingerprint.")
    return weight


def _fingerprint(weight: torch.Tensor, num_rows: int, num_ordinary: int, exclude_token_ids=None) -> str:
    if weight.is_meta:
        raise ValueError("Cannot fingerprint a model on the `meta` device; load its weights first.")
    num_ordinary = max(1, min(num_ordinary, weight.shape[0]))
    index = torch.linspace(0, num_ordinary - 1, steps=min(_FINGERPRINT_ROWS, num_ordinary)).round().long().unique()
    if exclude_token_ids:
        keep = ~torch.isin(index, torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long))
        index = index[keep]
    # Rounded to bf16 so that a bf16 copy of a float32 model has the same fingerprint.
    rows = weight.detach()[index.to(weight.device)].to(torch.bfloat16).cpu().contiguous()
    digest = hashlib.sha256()
    digest.update(f"{num_rows}:{num_ordinary}:{weight.shape[1]}:".encode())
    digest.update(index.numpy().tobytes())
    digest.update(rows.view(torch.int16).numpy().tobytes())
    return f"{_FINGERPRINT_VERSION}-{num_rows}-{num_ordinary}-{digest.hexdigest()[:16]}"


def _parse_fingerprint(fingerprint: str) -> tuple[int, int] | None:
    match = re.fullmatch(rf"{_FINGERPRINT_VERSION}-(\d+)-(\d+)-[0-9a-f]+", fingerprint or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def vocab_fingerprint(model, tokenizer=None, *, exclude_token_ids=None) -> str:
    """
    A cheap fingerprint of a model's vocabulary: its number of embedding rows and a SHA-256 of a bf16-rounded,
    evenly spaced subset of its ordinary input-embedding rows. The same model in float32 or bfloat16 gives the same
    fingerprint; a model with another vocabulary size or other embedding weights gives another one.

    The result reads `v1-<rows>-<ordinary rows>-<hash>`, so a mismatch can be explained.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The model (before any rows were added for the bins).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            When given, only rows below `len(tokenizer)` count as ordinary (spare rows of a padded vocabulary are
            left out).
        exclude_token_ids (`list[int]`, *optional*):
            Rows to leave out, e.g. the bins when they are reserved tokens inside the tokenizer's range.

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
    weight = _input_weight(model)
    num_rows = int(weight.shape[0])
    num_ordinary = min(len(tokenizer), num_rows) if tokenizer is not None else num_rows
    return _fingerprint(weight, num_rows, num_ordinary, exclude_token_ids)


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


def _check_explicit_ids(ids, num_bins: int, head_rows: int, tokenizer, name: str = "bin_token_ids") -> list[int]:
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


def _choose_bin_rows(base: nn.Module, tokenizer, num_bins: int, bin_token_ids) -> tuple[list[int], int]:
    """`(bin_token_ids, num_added_rows)`: explicit ids, else spare rows, else reserved tokens, else new rows."""
    head_rows = _head_rows(base)
    if tokenizer is not None and len(tokenizer) > head_rows:
        raise ValueError(
            f"`tokenizer` has {len(tokenizer)} tokens but the model's output head only has {head_rows} rows; call "
            "`model.resize_token_embeddings(len(tokenizer))` before creating the selector."
        )
    if bin_token_ids is not None:
        return _check_explicit_ids(bin_token_ids, num_bins, head_rows, tokenizer), 0
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


def _grow(base: nn.Module, num_added_rows: int) -> None:
    """Adds `num_added_rows` zero rows to the input embeddings and the output head (deterministic, so a reload gives
    the same base model)."""
    head_rows = _head_rows(base)
    input_rows = int(_input_weight(base).shape[0])
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


def _shrink(base: nn.Module, num_rows: int) -> None:
    if _head_rows(base) != num_rows:
        base.resize_token_embeddings(num_rows, mean_resizing=False)


# Projections that never write the KV cache: a layer's keys and values depend only on the hidden states entering it and
# on its key/value projections, so LoRA on these modules of the *last* decoder layer leaves every cached key and value
# as the base model's (GPT-2's `c_proj` is the attention output or the MLP output; `c_attn` also makes keys/values).
CACHE_PRESERVING_PROJECTIONS = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_fc", "c_proj", "fc1", "fc2")


def _num_layers(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ValueError(f"Cannot tell the number of decoder layers of {type(model).__name__} from its config.")
    return num_layers


def _projection_names(base: nn.Module, head: nn.Module) -> tuple[list[str], bool]:
    """Leaf names of every Linear / Conv1D module other than the output head, and whether any is a Conv1D."""
    from transformers.pytorch_utils import Conv1D

    names: dict[str, None] = {}
    conv1d = False
    for name, module in base.named_modules():
        if module is head or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if getattr(module, "weight", None) is head.weight:
            continue
        names[name.rsplit(".", 1)[-1]] = None
        conv1d = conv1d or isinstance(module, Conv1D)
    return list(names), conv1d


@contextlib.contextmanager
def _quiet_peft_warnings(*messages: str) -> Iterator[None]:
    """Silences PEFT warnings that the selector handles itself."""
    with warnings.catch_warnings():
        for message in (_TIED_WARNING, *messages):
            warnings.filterwarnings("ignore", message=re.escape(message))
        yield


def _token_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    return [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and m.tied_adapter is None]


def _name_or_path(base: nn.Module) -> str | None:
    value = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    return str(value) if value else None


# --------------------------------------------------------------------------------------------------------------------
# The selector


class S2TSelector:
    """
    The local selector of S2T-Local: a causal LM with B reserved output rows used as scoring bins and optional LoRA,
    held as a `peft.PeftModel`.

    The score of a candidate token c after a prefix is the expected bin value read at c's position of the sequence
    prefix + c: `sum_b softmax(logits[bin_token_ids])_b * bin_values_b`. The adapter stores only the LoRA weights and
    the B rows of the output head; it loads with `S2TSelector.from_pretrained` or plain `PeftModel.from_pretrained`
    (after the same row growth, if `config.num_added_rows > 0`).

    Build one with [`S2TSelector.create`] (new, trainable) or [`S2TSelector.from_pretrained`] (saved).

    Args:
        model (`peft.PeftModel`):
            The student wrapped with the selector's adapter (PEFT modifies the student in place).
        config (`S2TConfig`):
            The S2T config, with `bin_token_ids` set.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf import S2TSelector
    >>> config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                      num_key_value_heads=1, vocab_size=64)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> selector = S2TSelector.create(model, num_bins=4, lora_r=2)
    >>> selector.bin_token_ids  # no tokenizer, no free rows: 4 rows were added
    [64, 65, 66, 67]
    >>> with torch.no_grad():
    ...     logits = selector.model(torch.tensor([[1, 2, 3]])).logits
    >>> selector.scores_from_logits(logits[:, -1])  # zero-initialised bins: uniform, score 0.5
    tensor([0.5000])

    ```
    """

    def __init__(self, model, config: S2TConfig):
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise TypeError(
                f"`model` must be a `peft.PeftModel`, got {type(model).__name__}. Use "
                "`S2TSelector.create(model, ...)` to add a new selector to a plain model, or "
                "`S2TSelector.from_pretrained(model, path)` to load one."
            )
        if not isinstance(config, S2TConfig):
            raise TypeError(f"`config` must be an `S2TConfig`, got {type(config).__name__}.")
        if config.bin_token_ids is None:
            raise ValueError("`config.bin_token_ids` is not set; build the selector with `S2TSelector.create`.")
        head_rows = _head_rows(model.get_base_model())
        if max(config.reserved_token_ids) >= head_rows:
            raise ValueError(
                f"`config.bin_token_ids` (and `trigger_token_id`) go up to {max(config.reserved_token_ids)} but the "
                "model's output head has only "
                f"{head_rows} rows (was it grown by `config.num_added_rows` = {config.num_added_rows}?)."
            )
        self.model = model
        self.config = config

    # ---------------------------------------------------------------------------------------------------------------
    # Properties

    @property
    def base_model(self) -> nn.Module:
        """The underlying transformers model (the object the user passed, modified in place by PEFT)."""
        return self.model.get_base_model()

    @property
    def bin_token_ids(self) -> list[int]:
        """Vocabulary ids of the B reserved rows."""
        return list(self.config.bin_token_ids)

    @property
    def trigger_token_id(self) -> int | None:
        """Vocabulary id of the learned trigger's row (`None` for a selector made without `learned_trigger=True`)."""
        return self.config.trigger_token_id

    @property
    def reserved_token_ids(self) -> list[int]:
        """Every row the selector reserves (never generated): the bins, then the learned trigger's row if any."""
        return self.config.reserved_token_ids

    @property
    def bin_values(self) -> torch.Tensor:
        """Value of each bin, float32, shape `(B,)`."""
        return torch.tensor(self.config.resolved_bin_values(), dtype=torch.float32)

    @property
    def num_bins(self) -> int:
        return self.config.num_bins

    @property
    def preserves_cache(self) -> bool:
        """
        Whether the adapter leaves every key and value of the KV cache as the base model's: no LoRA, or LoRA only on
        the last decoder layer's query, output and MLP projections (`S2TSelector.create(..., preserve_cache=True)`).
        With `adapter_mode="scoring"` the processor then scores candidates on the live cache instead of recomputing
        their contexts.
        """
        from peft.tuners.lora import LoraLayer

        last = _num_layers(self.base_model) - 1
        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            layer = re.search(r"\.(\d+)\.", name)
            if layer is None or int(layer.group(1)) != last:
                return False
            if name.rsplit(".", 1)[-1] not in CACHE_PRESERVING_PROJECTIONS:
                return False
        return True

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected bin value from full-vocabulary logits `(..., V)`; returns float32 `(...)`."""
        index = torch.tensor(self.config.bin_token_ids, device=logits.device)
        return expected_bin_value(logits.index_select(-1, index), self.bin_values)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Context manager in which `self.model` is exactly the base model (LoRA and bin rows off)."""
        with self.model.disable_adapter():
            yield

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """
        Context manager in which the LoRA layers are off and the reserved rows (bins, trigger) stay on: the model the
        processor generates with under `adapter_mode="scoring"` (the base model's hidden states and ordinary logits).
        """
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [
            m for m in self.model.modules()
            if isinstance(m, BaseTunerLayer) and not isinstance(m, TrainableTokensLayer) and not m.disable_adapters
        ]
        # only the flag: PEFT's `enable_adapters(True)` would also make the adapter's weights trainable again
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer._disable_adapters = False

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that train: LoRA weights and the delta of the B output rows."""
        return [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]

    def __repr__(self) -> str:
        kind = "LoRA + bins" if self._uses_lora() else "bins only"
        return (
            f"{type(self).__name__}(base={type(self.base_model).__name__}, {kind}, num_bins={self.config.num_bins}, "
            f"bin_token_ids={self.config.bin_token_ids})"
        )

    def _uses_lora(self) -> bool:
        from peft import PeftType

        return self.model.peft_config[self.model.active_adapter].peft_type == PeftType.LORA

    # ---------------------------------------------------------------------------------------------------------------
    # Creation

    @classmethod
    def create(
        cls,
        model,
        tokenizer=None,
        *,
        num_bins: int | None = None,
        bin_token_ids: list[int] | None = None,
        use_lora: bool = True,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        target_modules: list[str] | None = None,
        preserve_cache: bool = False,
        learned_trigger: bool = False,
        trigger_token_id: int | None = None,
        config: S2TConfig | None = None,
    ) -> S2TSelector:
        """
        Adds a new, trainable selector to `model` (in place, as PEFT does).

        The B bin rows are, in order of preference: `bin_token_ids` (or `config.bin_token_ids`) when given; spare
        output rows above `len(tokenizer)` (padded vocabularies such as Qwen's); the tokenizer's unused reserved
        tokens (`<|reserved_special_token_N|>`, `<unusedN>`, ...); else B new rows added with
        `resize_token_embeddings` (recorded in `config.num_added_rows`, repeated on load). The bins start at zero, so
        the initial bin distribution is uniform; LoRA starts with B = 0, so every ordinary logit is exactly the base
        model's. With `learned_trigger=True` one more row, chosen the same way, holds the learned trigger (a linear
        probe on the final hidden state, fit by [`~s2t_hf.learned_trigger.fit_trigger_row`]; `trigger="learned"`).

        Args:
            model (`PreTrainedModel`):
                The student, a causal LM. Untied and tied output heads both work.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                The student's tokenizer; used to find free rows and to refuse ordinary tokens as bins.
            num_bins (`int`, *optional*):
                Number B of bins. Defaults to `config.num_bins` (16).
            bin_token_ids (`list[int]`, *optional*):
                Explicit ids of the bins.
            use_lora (`bool`, *optional*, defaults to `True`):
                Whether to add LoRA; if `False` only the B rows train.
            lora_r (`int`, *optional*, defaults to 16), lora_alpha (`int`, *optional*, defaults to 32),
            lora_dropout (`float`, *optional*, defaults to 0.05):
                LoRA settings.
            target_modules (`list[str]`, *optional*):
                Modules that get LoRA. Defaults to every Linear / Conv1D projection other than the output head
                (q, k, v, o, gate, up, down for Llama-like models; c_attn, c_proj, c_fc for GPT-2).
            preserve_cache (`bool`, *optional*, defaults to `False`):
                Put LoRA only on the last decoder layer's projections that do not make keys or values
                (`CACHE_PRESERVING_PROJECTIONS`), so that the adapter leaves the KV cache as the base model's (see
                [`~S2TSelector.preserves_cache`]). Used with `adapter_mode="scoring"`: the student generates as
                itself and the selector scores candidates on its live cache, as fast as teacher selection.
            learned_trigger (`bool`, *optional*, defaults to `False`):
                Reserve one more row for the learned trigger (`config.trigger_token_id`). It starts at zero (a constant
                logit) until [`~s2t_hf.learned_trigger.fit_trigger_row`] fits it.
            trigger_token_id (`int`, *optional*):
                Explicit id of the trigger's row (implies `learned_trigger=True`); needed when `bin_token_ids` is given.
            config (`S2TConfig`, *optional*):
                Settings to save with the selector; defaults to `S2TConfig(selection="local")`.

        Returns:
            `S2TSelector`
        """
        from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model

        if isinstance(model, PeftModel):
            raise TypeError(
                "`model` already holds a PEFT adapter. Pass the plain transformers model to `S2TSelector.create`, or "
                "wrap the existing `PeftModel` with `S2TSelector(model, config)`."
            )
        require_decoder_only(model)
        if config is None:
            config = S2TConfig(selection="local")
        if num_bins is None:
            num_bins = len(bin_token_ids) if bin_token_ids is not None else config.num_bins
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"`num_bins` must be a positive integer, got {num_bins!r}.")
        if bin_token_ids is None and config.bin_token_ids is not None and len(config.bin_token_ids) == num_bins:
            bin_token_ids = config.bin_token_ids
            if learned_trigger and trigger_token_id is None:
                trigger_token_id = config.trigger_token_id
        if config.bin_values is not None and len(config.bin_values) != num_bins:
            raise ValueError(
                f"`config.bin_values` has {len(config.bin_values)} values but `num_bins` is {num_bins}; make them "
                "agree or set `config.bin_values=None`."
            )

        head_name, head = _head(model)
        learned_trigger = learned_trigger or trigger_token_id is not None
        if learned_trigger and trigger_token_id is None and bin_token_ids is not None:
            raise ValueError(
                "`learned_trigger=True` with explicit `bin_token_ids` needs `trigger_token_id` too (the id of the "
                "trigger's row), or leave both unset so that S2TSelector chooses free rows."
            )
        choose_trigger = learned_trigger and trigger_token_id is None
        ids, num_added = _choose_bin_rows(model, tokenizer, num_bins + int(choose_trigger), bin_token_ids)
        if choose_trigger:
            ids, trigger_token_id = ids[:-1], ids[-1]
        elif trigger_token_id is not None:
            trigger_token_id = _check_explicit_ids(
                [trigger_token_id], 1, _head_rows(model) + num_added, tokenizer, name="trigger_token_id"
            )[0]
            if trigger_token_id in ids:
                raise ValueError(
                    f"`trigger_token_id` {trigger_token_id} is also a bin row ({ids}); give the trigger a row of its own."
                )
        reserved = ids + ([trigger_token_id] if trigger_token_id is not None else [])
        fingerprint = vocab_fingerprint(model, tokenizer, exclude_token_ids=reserved)
        if num_added:
            _grow(model, num_added)
            head_name, head = _head(model)

        if use_lora:
            explicit_targets = target_modules is not None
            if target_modules is None:
                target_modules, conv1d = _projection_names(model, head)
                if not target_modules:
                    raise ValueError(
                        f"Found no Linear or Conv1D projection in {type(model).__name__} for LoRA; pass "
                        "`target_modules` or `use_lora=False`."
                    )
            else:
                from transformers.pytorch_utils import Conv1D

                target_modules = list(target_modules)
                names = [name for name, _ in model.named_modules()]
                if not any(n == t or n.endswith(f".{t}") for n in names for t in target_modules):
                    raise ValueError(
                        f"`target_modules={target_modules}` match no module of {type(model).__name__}; its "
                        f"projections are {_projection_names(model, head)[0]}. Pass some of these, or leave "
                        "`target_modules=None` to put LoRA on all of them."
                    )
                conv1d = any(
                    isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in target_modules
                    for name, m in model.named_modules()
                )
            layers_to_transform = None
            if preserve_cache:
                if explicit_targets:
                    unsafe = [name for name in target_modules if name not in CACHE_PRESERVING_PROJECTIONS]
                    if unsafe:
                        raise ValueError(
                            f"`preserve_cache=True` cannot put LoRA on {unsafe}: they make keys or values. Use "
                            f"modules among {CACHE_PRESERVING_PROJECTIONS}, or `preserve_cache=False`."
                        )
                target_modules = [name for name in target_modules if name in CACHE_PRESERVING_PROJECTIONS]
                if not target_modules:
                    raise ValueError(
                        f"`preserve_cache=True` found none of {CACHE_PRESERVING_PROJECTIONS} in "
                        f"{type(model).__name__}; use `use_lora=False` (head only) or `preserve_cache=False`."
                    )
                layers_to_transform = [_num_layers(model) - 1]
            peft_config = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=target_modules,
                layers_to_transform=layers_to_transform,
                fan_in_fan_out=conv1d,
                trainable_token_indices={head_name: reserved},
                task_type="CAUSAL_LM",
                bias="none",
            )
        else:
            peft_config = TrainableTokensConfig(token_indices=reserved, target_modules=[head_name])
        base_name = _name_or_path(model)
        was_training = model.training
        with _quiet_peft_warnings():
            peft_model = get_peft_model(model, peft_config)
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = base_name
        peft_model.train(was_training)  # new LoRA dropout modules start in train mode; keep the caller's mode
        with torch.no_grad():
            for layer in _token_layers(peft_model):
                for delta in layer.trainable_tokens_delta.values():
                    delta.zero_()

        config = dataclasses.replace(
            config,
            num_bins=num_bins,
            bin_token_ids=ids,
            trigger_token_id=trigger_token_id,
            trigger_adapter_mode=None,
            base_model_name_or_path=base_name,
            vocab_fingerprint=fingerprint,
            num_added_rows=num_added,
        )
        return cls(peft_model, config)

    # ---------------------------------------------------------------------------------------------------------------
    # Saving

    def save_pretrained(self, save_directory: str | os.PathLike, metrics: dict | None = None) -> None:
        """
        Writes the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`: LoRA weights and the B output
        rows only), `s2t_config.json` and a model card (`README.md`) into `save_directory`.

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder to write (created if needed).
            metrics (`dict`, *optional*):
                Evaluation results to show as a table in the model card.
        """
        self._save(save_directory, metrics=metrics, repo_id=None)

    def _save(self, save_directory, metrics: dict | None, repo_id: str | None) -> None:
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        adapter_name = self.model.active_adapter
        self.model.peft_config[adapter_name].base_model_name_or_path = self.config.base_model_name_or_path
        # `save_embedding_layers=False`: never the whole head; "auto" would also look the base model up on the Hub.
        self.model.save_pretrained(
            save_directory, safe_serialization=True, save_embedding_layers=False, selected_adapters=[adapter_name]
        )
        self.config.save_pretrained(save_directory)
        card = self._model_card(repo_id or save_directory, metrics)
        with open(os.path.join(save_directory, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
            f.write(card)

    def _model_card(self, location: str, metrics: dict | None) -> str:
        from peft import __version__ as peft_version

        from .version import __version__

        config = self.config
        peft_config = self.model.peft_config[self.model.active_adapter]
        base = config.base_model_name_or_path
        header = ["---", "library_name: peft"]
        if base:
            header.append(f"base_model: {json.dumps(base)}")
        header += ["tags:", "- s2t_hf", "- select-to-think", "- peft"]
        header += ["- lora"] if self._uses_lora() else []
        header += ["pipeline_tag: text-generation", "---", ""]
        if self._uses_lora():
            adapter = (
                f"LoRA (r {peft_config.r}, alpha {peft_config.lora_alpha}, dropout {peft_config.lora_dropout}) on "
                f"`{'`, `'.join(sorted(peft_config.target_modules))}`, plus the {config.num_bins} bin rows of the "
                "output head"
            )
        else:
            adapter = f"the {config.num_bins} bin rows of the output head only"
        base_line = f"`{base}`" if base else "its base model"
        residual = f" (tau {config.residual_tau})" if config.scoring == "residual" else ""
        lines = [
            f"# S2T local selector for {base_line}",
            "",
            "A Select-to-Think (S2T-Local) selector made with [s2t_hf](https://pypi.org/project/s2t-hf/). At "
            "uncertain decoding steps the student picks among its own top-K candidates; each candidate is scored by "
            f"the expected value of {config.num_bins} reserved output rows (\"bins\", token ids "
            f"{config.bin_token_ids[0]}..{config.bin_token_ids[-1]}) read at its position.",
            "",
            f"The adapter is a standard PEFT adapter: {adapter}. The whole output head is never stored."
            + (
                f" The base model's embeddings get {config.num_added_rows} extra rows on load (`num_added_rows` in "
                "`s2t_config.json`)."
                if config.num_added_rows
                else ""
            ),
            "",
            "## Usage",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "from s2t_hf import S2TLogitsProcessor",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{base or "<base model>"}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base or "<base model>"}")',
            'inputs = tokenizer("Natalia sold 48 clips in April...", return_tensors="pt")',
            "",
            f'processor = S2TLogitsProcessor.from_pretrained("{location}", model=model)',
            "out = model.generate(**inputs, logits_processor=[processor])",
            "```",
            "",
            "## Settings",
            "",
            "| setting | value |",
            "|---|---|",
            f"| selection | `{config.selection}` |",
            f"| scoring | `{config.scoring}`{residual} |",
            f"| trigger | `{config.trigger}` |",
            *(
                [f"| trigger_token_id | {config.trigger_token_id} (learned trigger row) |"]
                if config.trigger_token_id is not None
                else []
            ),
            f"| top_k | {config.top_k} |",
            f"| num_bins | {config.num_bins} |",
            f"| vocab_fingerprint | `{config.vocab_fingerprint}` |",
            "",
        ]
        if metrics:
            lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
            for key, value in metrics.items():
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                lines.append(f"| {str(key).replace('|', '/')} | {shown.replace('|', '/')} |")
            lines.append("")
        lines += [f"Written by s2t_hf {__version__} with PEFT {peft_version}.", ""]
        return "\n".join(header + lines)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload S2T selector",
        metrics: dict | None = None,
    ) -> str:
        """
        Uploads the selector (the files of `save_pretrained`) to a Hub model repository, creating it if needed.

        Args:
            repo_id (`str`):
                The repository, `"org/name"`.
            private (`bool`, *optional*):
                Visibility of a newly created repository.
            token (`str`, *optional*):
                Hub token; defaults to the stored login.
            commit_message (`str`, *optional*, defaults to `"Upload S2T selector"`):
                Message of the commit.
            metrics (`dict`, *optional*):
                Evaluation results for the model card.

        Returns:
            `str`: the URL of the commit.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        with tempfile.TemporaryDirectory() as folder:
            self._save(folder, metrics=metrics, repo_id=repo_id)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model"
            )
        return str(getattr(info, "commit_url", None) or info)

    # ---------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(
        cls,
        model,
        path_or_repo_id: str | os.PathLike,
        *,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        check_fingerprint: bool = True,
    ) -> S2TSelector:
        """
        Loads a saved selector onto `model` (in place, as PEFT does).

        Args:
            model (`PreTrainedModel`):
                The base model the selector was trained on (checked with the vocabulary fingerprint).
            path_or_repo_id (`str` or `os.PathLike`):
                A folder written by `save_pretrained`, or a Hub repository id (read through the Hugging Face cache,
                so it works with `HF_HUB_OFFLINE=1` once downloaded).
            is_trainable (`bool`, *optional*, defaults to `False`):
                Load the adapter trainable, to continue training.
            revision (`str`, *optional*), token (`str` or `bool`, *optional*), cache_dir (`str`, *optional*),
            local_files_only (`bool`, *optional*):
                Passed to `huggingface_hub.hf_hub_download` for a repository id.
            check_fingerprint (`bool`, *optional*, defaults to `True`):
                Refuse a base model whose vocabulary fingerprint differs from the one recorded at training time.

        Returns:
            `S2TSelector`
        """
        from peft import PeftConfig, PeftModel

        if isinstance(model, PeftModel):
            raise TypeError(
                "`model` already holds a PEFT adapter; pass the plain base model to `S2TSelector.from_pretrained`."
            )
        hub_kwargs = {
            k: v
            for k, v in dict(
                revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
            ).items()
            if v is not None
        }
        config = S2TConfig.from_pretrained(path_or_repo_id, **hub_kwargs)
        if config.bin_token_ids is None:
            raise ValueError(
                f"`{CONFIG_NAME}` of `{path_or_repo_id}` has no `bin_token_ids`: it was not written by "
                "`S2TSelector.save_pretrained`."
            )
        adapter_config_path = resolve_file(path_or_repo_id, ADAPTER_CONFIG_NAME, **hub_kwargs)
        try:
            weights_path = resolve_file(path_or_repo_id, ADAPTER_WEIGHTS_NAME, **hub_kwargs)
        except (OSError, FileNotFoundError) as error:
            raise FileNotFoundError(
                f"No `{ADAPTER_WEIGHTS_NAME}` for `{path_or_repo_id}`: S2TSelector loads safetensors only (never a "
                f"pickled `adapter_model.bin`). Re-save the selector with `save_pretrained`. Cause: {error}"
            ) from error
        adapter_dir = os.path.dirname(weights_path)
        if os.path.realpath(os.path.dirname(adapter_config_path)) != os.path.realpath(adapter_dir):
            raise OSError(f"`{ADAPTER_CONFIG_NAME}` and `{ADAPTER_WEIGHTS_NAME}` of `{path_or_repo_id}` are in "
                          "different folders.")
        try:
            peft_config = PeftConfig.from_pretrained(adapter_dir)
        except Exception as error:  # noqa: BLE001 - re-raised with a clearer message
            raise ValueError(
                f"`{ADAPTER_CONFIG_NAME}` of `{path_or_repo_id}` is not a valid PEFT config: {error}"
            ) from error
        indices = _adapter_token_indices(peft_config)
        reserved = config.reserved_token_ids
        if indices is not None and [int(i) for i in indices] != reserved:
            raise ValueError(
                f"The adapter of `{path_or_repo_id}` trains rows {list(indices)} but `{CONFIG_NAME}` names "
                f"`bin_token_ids` {config.bin_token_ids} and `trigger_token_id` {config.trigger_token_id}; the two "
                "files come from different selectors."
            )
        state = _read_adapter_weights(weights_path, path_or_repo_id)
        hidden = int(_head(model)[1].weight.shape[1])
        token_keys = [k for k in state if k.endswith("trainable_tokens_delta")]
        if len(token_keys) != 1 or tuple(state[token_keys[0]].shape) != (len(reserved), hidden):
            shapes = {k: tuple(state[k].shape) for k in token_keys}
            raise ValueError(
                f"`{ADAPTER_WEIGHTS_NAME}` of `{path_or_repo_id}` must hold one `trainable_tokens_delta` tensor of "
                f"shape ({len(reserved)}, {hidden}) (the bin rows for this model, and the trigger row if any), found "
                f"{shapes or 'none'}. The file is incomplete or belongs to another model."
            )

        rows_before = int(_input_weight(model).shape[0])
        grow = _rows_to_add(model, config, path_or_repo_id, check_fingerprint)
        if grow:
            _grow(model, grow)
        peft_config.inference_mode = not is_trainable
        peft_config.base_model_name_or_path = config.base_model_name_or_path
        try:
            with _quiet_peft_warnings(_MISSING_KEYS_WARNING):
                peft_model = PeftModel.from_pretrained(
                    model, adapter_dir, is_trainable=is_trainable, config=peft_config
                )
        except Exception as error:  # noqa: BLE001 - re-raised with a clearer message
            _restore(model, rows_before if grow else None)
            raise ValueError(
                f"Could not load the adapter of `{path_or_repo_id}` onto {type(model).__name__}: {error}"
            ) from error
        _check_loaded_keys(peft_model, state, path_or_repo_id, model, rows_before if grow else None)
        return cls(peft_model, config)


def _adapter_token_indices(peft_config) -> list[int] | None:
    indices = getattr(peft_config, "trainable_token_indices", None)
    if indices is None:
        indices = getattr(peft_config, "token_indices", None)
    if isinstance(indices, dict):
        if len(indices) != 1:
            return None
        indices = next(iter(indices.values()))
    return list(indices) if indices else None


def _read_adapter_weights(path: str, source) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(
            f"`{ADAPTER_WEIGHTS_NAME}` of `{source}` is corrupt or truncated ({type(error).__name__}: {error}). "
            "Re-save the selector, or download it again (`huggingface_hub.hf_hub_download(..., force_download=True)`)."
        ) from error


def _rows_to_add(model: nn.Module, config: S2TConfig, source, check_fingerprint: bool) -> int:
    """Checks the vocabulary fingerprint and returns the number of rows to add before loading."""
    rows = int(_input_weight(model).shape[0])
    added = config.num_added_rows
    parsed = _parse_fingerprint(config.vocab_fingerprint) if config.vocab_fingerprint else None
    already_grown = bool(added) and parsed is not None and rows == parsed[0] + added
    if check_fingerprint:
        if config.vocab_fingerprint is None:
            logger.warning(f"Selector at `{source}` records no vocabulary fingerprint; the base model is unchecked.")
        elif parsed is None:
            raise ValueError(
                f"Unrecognised `vocab_fingerprint` {config.vocab_fingerprint!r} in `{CONFIG_NAME}` of `{source}`; "
                "pass `check_fingerprint=False` to load anyway."
            )
        else:
            expected_rows, num_ordinary = parsed
            trained_on = f" (`{config.base_model_name_or_path}`)" if config.base_model_name_or_path else ""
            if rows != expected_rows and not already_grown:
                raise ValueError(
                    f"The selector at `{source}` was trained on a base model{trained_on} with {expected_rows} "
                    f"vocabulary rows, but `model` has {rows}. Load the selector onto its own base model, or pass "
                    "`check_fingerprint=False` to override."
                )
            found = _fingerprint(_input_weight(model), expected_rows, num_ordinary, config.reserved_token_ids)
            if found != config.vocab_fingerprint:
                raise ValueError(
                    f"The vocabulary fingerprint of `model` ({found}) differs from the one the selector at `{source}` "
                    f"was trained on ({config.vocab_fingerprint}){trained_on}: same vocabulary size but other "
                    "embedding weights, so probably another base model or checkpoint. Load the selector onto its own "
                    "base model, or pass `check_fingerprint=False` to override."
                )
    if not added or already_grown:
        return 0
    head_rows = _head_rows(model)
    if max(config.reserved_token_ids) < head_rows:
        return 0  # the rows are already there (e.g. grown by the caller); nothing to add
    return added


def _restore(model: nn.Module, rows_before: int | None) -> None:
    """Best-effort undo of a failed load: put the original layers back and remove the rows added for the bins."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    with contextlib.suppress(Exception):
        for name, module in list(model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper):
                original = module.original_module
            elif isinstance(module, BaseTunerLayer):
                original = module.get_base_layer()
            else:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, original)
        if "peft_config" in model.__dict__:
            del model.peft_config
    if rows_before is not None:
        with contextlib.suppress(Exception):
            _shrink(model, rows_before)


def _check_loaded_keys(peft_model, state: dict, source, model: nn.Module, rows_before: int | None) -> None:
    from peft import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    found = set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        _restore(model, rows_before)
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        raise ValueError(
            f"`{ADAPTER_WEIGHTS_NAME}` of `{source}` does not match its adapter config on this model: "
            f"{'; '.join(details)}. The file is incomplete or was written for another architecture; re-save it."
        )
