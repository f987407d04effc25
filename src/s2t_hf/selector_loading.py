"""Loading a saved selector: reading its files and checking them against each other and against the base model.

`S2TSelector.from_pretrained` refuses, with an error that says what to do, a folder that is not a selector, a pickled
adapter, an adapter config and weights from different selectors, a corrupt or incomplete weights file, and (through the
vocabulary fingerprint) a base model other than the one the selector was trained on. A failed load leaves the base
model as it was.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from transformers.utils import logging

from .adapter_injection import MISSING_KEYS_WARNING, quiet_peft_warnings
from .bin_rows import (
    FINGERPRINT_TOLERANCE,
    fingerprint_distance,
    fingerprint_rows,
    grow_embeddings,
    input_embedding_weight,
    output_head,
    output_head_rows,
    parse_fingerprint,
    shrink_embeddings,
)
from .config import CONFIG_NAME, S2TConfig, resolve_file


logger = logging.get_logger(__name__)

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "load_selector_adapter"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def load_selector_adapter(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    *,
    is_trainable: bool,
    check_fingerprint: bool,
    hub_kwargs: dict,
) -> tuple[nn.Module, S2TConfig]:
    """
    Loads a saved selector's adapter onto `model` (in place, as PEFT does) after checking every file, and returns the
    `peft.PeftModel` and the selector's `S2TConfig`. The arguments are those of [`S2TSelector.from_pretrained`];
    `hub_kwargs` go to `huggingface_hub.hf_hub_download` for a repository id.
    """
    from peft import PeftModel

    config = S2TConfig.from_pretrained(path_or_repo_id, **hub_kwargs)
    if config.bin_token_ids is None:
        raise ValueError(
            f"`{CONFIG_NAME}` of `{path_or_repo_id}` has no `bin_token_ids`: it was not written by "
            "`S2TSelector.save_pretrained`."
        )
    adapter_dir, weights_path = _adapter_files(path_or_repo_id, hub_kwargs)
    peft_config = _read_peft_config(adapter_dir, config, path_or_repo_id)
    state = _read_adapter_weights(weights_path, path_or_repo_id)
    _check_token_delta(state, model, config, path_or_repo_id)

    rows_before = int(input_embedding_weight(model).shape[0])
    grow = _rows_to_add(model, config, path_or_repo_id, check_fingerprint)
    if grow:
        grow_embeddings(model, grow)
    peft_config.inference_mode = not is_trainable
    peft_config.base_model_name_or_path = config.base_model_name_or_path
    try:
        with quiet_peft_warnings(MISSING_KEYS_WARNING):
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable, config=peft_config)
    except Exception as error:  # noqa: BLE001 - re-raised with a clearer message
        _restore(model, rows_before if grow else None)
        raise ValueError(
            f"Could not load the adapter of `{path_or_repo_id}` onto {type(model).__name__}: {error}"
        ) from error
    _check_loaded_keys(peft_model, state, path_or_repo_id, model, rows_before if grow else None)
    return peft_model, config


def _adapter_files(path_or_repo_id, hub_kwargs: dict) -> tuple[str, str]:
    """`(adapter folder, weights file)`: the safetensors weights and the adapter config, in one folder."""
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
    return adapter_dir, weights_path


def _read_peft_config(adapter_dir: str, config: S2TConfig, source):
    """The adapter's PEFT config, checked to train exactly the reserved rows of `config`."""
    from peft import PeftConfig

    try:
        peft_config = PeftConfig.from_pretrained(adapter_dir)
    except Exception as error:  # noqa: BLE001 - re-raised with a clearer message
        raise ValueError(f"`{ADAPTER_CONFIG_NAME}` of `{source}` is not a valid PEFT config: {error}") from error
    indices = _adapter_token_indices(peft_config)
    if indices is not None and [int(i) for i in indices] != config.reserved_token_ids:
        raise ValueError(
            f"The adapter of `{source}` trains rows {list(indices)} but `{CONFIG_NAME}` names "
            f"`bin_token_ids` {config.bin_token_ids} and `trigger_token_id` {config.trigger_token_id}; the two "
            "files come from different selectors."
        )
    return peft_config


def _check_token_delta(state: dict[str, torch.Tensor], model: nn.Module, config: S2TConfig, source) -> None:
    """The weights hold one delta of the reserved rows, of the model's hidden size."""
    reserved = config.reserved_token_ids
    hidden = int(output_head(model)[1].weight.shape[1])
    token_keys = [k for k in state if k.endswith("trainable_tokens_delta")]
    if len(token_keys) != 1 or tuple(state[token_keys[0]].shape) != (len(reserved), hidden):
        shapes = {k: tuple(state[k].shape) for k in token_keys}
        raise ValueError(
            f"`{ADAPTER_WEIGHTS_NAME}` of `{source}` must hold one `trainable_tokens_delta` tensor of "
            f"shape ({len(reserved)}, {hidden}) (the bin rows for this model, and the trigger row if any), found "
            f"{shapes or 'none'}. The file is incomplete or belongs to another model."
        )


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
    rows = int(input_embedding_weight(model).shape[0])
    added = config.num_added_rows
    parsed = parse_fingerprint(config.vocab_fingerprint) if config.vocab_fingerprint else None
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
            weight = input_embedding_weight(model)
            saved = config.vocab_fingerprint
            found = fingerprint_rows(weight, expected_rows, num_ordinary, config.reserved_token_ids,
                                     sketch=saved.startswith("v2-"))
            if found != saved:
                distance = fingerprint_distance(saved, weight, config.reserved_token_ids)
                if distance is not None and distance <= FINGERPRINT_TOLERANCE:
                    logger.info(
                        f"`model`'s embeddings differ slightly from those the selector at `{source}` was trained on "
                        f"(relative sketch distance {distance:.3f} <= {FINGERPRINT_TOLERANCE}): the same model at "
                        "another precision or quantisation. Loading."
                    )
                else:
                    how_far = (
                        f" (relative sketch distance {distance:.2f}; the same model quantised stays under "
                        f"{FINGERPRINT_TOLERANCE})" if distance is not None else ""
                    )
                    raise ValueError(
                        f"The vocabulary fingerprint of `model` differs from the one the selector at `{source}` was "
                        f"trained on{trained_on}{how_far}: same vocabulary size but other embedding weights, so "
                        "probably another base model or checkpoint. Load the selector onto its own base model, or "
                        "pass `check_fingerprint=False` to override."
                    )
    if not added or already_grown:
        return 0
    head_rows = output_head_rows(model)
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
            shrink_embeddings(model, rows_before)


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
