"""Building a new selector's PEFT adapter: which projections get LoRA, the PEFT config, and its injection.

The adapter is LoRA on the student's projections (every Linear / Conv1D other than the output head, or with
`preserve_cache=True` only the last decoder layer's projections that make no keys or values) plus PEFT's trainable
tokens for the reserved rows of the output head; or, without LoRA, the trainable tokens alone.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .adapter_state import AdapterState
from .bin_rows import output_head


__all__ = [
    "CACHE_PRESERVING_PROJECTIONS",
    "MISSING_KEYS_WARNING",
    "has_fused_experts",
    "inject_adapter",
    "lora_targets",
    "model_name_or_path",
    "num_decoder_layers",
    "projection_names",
    "qualified_projection_names",
    "quiet_peft_warnings",
    "selector_peft_config",
]

# Projections that never write the KV cache: a layer's keys and values depend only on the hidden states entering it and
# on its key/value projections, so LoRA on these modules of the *last* decoder layer leaves every cached key and value
# as the base model's (GPT-2's `c_proj` is the attention output or the MLP output; `c_attn` also makes keys/values).
CACHE_PRESERVING_PROJECTIONS = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_fc", "c_proj", "fc1", "fc2")

# PEFT warns about any tied layer in an adapter; the selector only replaces rows the model never reads as inputs.
_TIED_WARNING = "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"
# PEFT warns about missing adapter keys; `S2TSelector.from_pretrained` raises an error instead.
MISSING_KEYS_WARNING = "Found missing adapter keys"


@contextlib.contextmanager
def quiet_peft_warnings(*messages: str) -> Iterator[None]:
    """Silences PEFT warnings that the selector handles itself: the tied-layer warning, and `messages`."""
    with warnings.catch_warnings():
        for message in (_TIED_WARNING, *messages):
            warnings.filterwarnings("ignore", message=re.escape(message))
        yield


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers of `model`, read from its (text) config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ValueError(f"Cannot tell the number of decoder layers of {type(model).__name__} from its config.")
    return num_layers


def projection_names(base: nn.Module, head: nn.Module) -> tuple[list[str], bool]:
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


def _explicit_targets(model: nn.Module, head: nn.Module, target_modules: list[str]) -> tuple[list[str], bool]:
    """The user's `target_modules`, checked against the model, and whether any of them is a Conv1D."""
    from transformers.pytorch_utils import Conv1D

    target_modules = list(target_modules)
    names = [name for name, _ in model.named_modules()]
    if not any(n == t or n.endswith(f".{t}") for n in names for t in target_modules):
        raise ValueError(
            f"`target_modules={target_modules}` match no module of {type(model).__name__}; its "
            f"projections are {projection_names(model, head)[0]}. Pass some of these, or leave "
            "`target_modules=None` to put LoRA on all of them."
        )
    conv1d = any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in target_modules for name, m in model.named_modules()
    )
    return target_modules, conv1d


def has_fused_experts(model: nn.Module) -> bool:
    """Whether `model` keeps mixture-of-experts weights as fused 3-D parameters (transformers 5's MoE layers)."""
    return any(
        param.ndim >= 3
        for module in model.modules()
        if not isinstance(module, nn.Linear)
        for param in module.parameters(recurse=False)
    )


def qualified_projection_names(model: nn.Module, target_modules: list[str]) -> list[str]:
    """
    `target_modules` as `parent.leaf` names of the Linear / Conv1D modules they match (`shared_expert.down_proj` for
    `down_proj`), so that they name those modules only.

    PEFT (0.22 on) rewrites a bare leaf name of an MoE model (`gate_proj`, `down_proj`) into a target *parameter* of
    its fused experts as well (`experts.gate_up_proj`), which puts LoRA on every routed expert, and refuses any LoRA
    dropout there. The selector's LoRA stays on the Linear projections on every PEFT version.
    """
    from transformers.pytorch_utils import Conv1D

    qualified: dict[str, None] = {}
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in target_modules and isinstance(module, (nn.Linear, Conv1D)):
            qualified[f"{parent.rpartition('.')[2]}.{leaf}" if parent else leaf] = None
    return list(qualified)


def lora_targets(
    model: nn.Module, head: nn.Module, target_modules: list[str] | None, preserve_cache: bool
) -> tuple[list[str], bool, list[int] | None]:
    """
    The modules that get LoRA, as `(target_modules, fan_in_fan_out, layers_to_transform)` for `peft.LoraConfig`.

    Args:
        model (`PreTrainedModel`):
            The student.
        head (`torch.nn.Module`):
            Its output head (never a target).
        target_modules (`list[str]`, *optional*):
            The user's choice; `None` for every Linear / Conv1D projection.
        preserve_cache (`bool`):
            Keep only `CACHE_PRESERVING_PROJECTIONS` of the last decoder layer.
    """
    explicit = target_modules is not None
    if explicit:
        target_modules, conv1d = _explicit_targets(model, head, target_modules)
    else:
        target_modules, conv1d = projection_names(model, head)
        if not target_modules:
            raise ValueError(
                f"Found no Linear or Conv1D projection in {type(model).__name__} for LoRA; pass "
                "`target_modules` or `use_lora=False`."
            )
    if not preserve_cache:
        return _qualified_if_fused(model, target_modules), conv1d, None
    if explicit:
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
    return _qualified_if_fused(model, target_modules), conv1d, [num_decoder_layers(model) - 1]


def _qualified_if_fused(model: nn.Module, target_modules: list[str]) -> list[str]:
    """`target_modules`, as `qualified_projection_names` beside fused experts, and unchanged otherwise."""
    return qualified_projection_names(model, target_modules) if has_fused_experts(model) else target_modules


def selector_peft_config(
    model: nn.Module,
    reserved_token_ids: list[int],
    *,
    use_lora: bool,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    target_modules: list[str] | None,
    preserve_cache: bool,
):
    """
    The PEFT config of a new selector: `peft.LoraConfig` with `trainable_token_indices` for the reserved rows, or
    `peft.TrainableTokensConfig` for the reserved rows alone (`use_lora=False`). The other arguments are those of
    [`S2TSelector.create`].
    """
    from peft import LoraConfig, TrainableTokensConfig

    head_name, head = output_head(model)
    if not use_lora:
        return TrainableTokensConfig(token_indices=reserved_token_ids, target_modules=[head_name])
    target_modules, conv1d, layers_to_transform = lora_targets(model, head, target_modules, preserve_cache)
    return LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        fan_in_fan_out=conv1d,
        trainable_token_indices={head_name: reserved_token_ids},
        task_type="CAUSAL_LM",
        bias="none",
    )


def model_name_or_path(base: nn.Module) -> str | None:
    """The name or path `base` was loaded from, if it records one."""
    value = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    return str(value) if value else None


def inject_adapter(model: nn.Module, peft_config):
    """
    Wraps `model` (in place, as PEFT does) with the adapter of `peft_config`: the reserved rows start at zero, the
    model keeps its train / eval mode, and the adapter records the base model's name or path.

    Returns:
        `peft.PeftModel`
    """
    from peft import get_peft_model

    base_name = model_name_or_path(model)
    was_training = model.training
    with quiet_peft_warnings():
        peft_model = get_peft_model(model, peft_config)
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = base_name
    peft_model.train(was_training)  # new LoRA dropout modules start in train mode; keep the caller's mode
    with torch.no_grad():
        for layer in AdapterState(peft_model).token_layers:
            for delta in layer.trainable_tokens_delta.values():
                delta.zero_()
    return peft_model
