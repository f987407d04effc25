"""`ServingManifest`: what the engine side of a served student needs to know, written next to the exported checkpoint.

It is read by the vLLM logits processor inside the server (which imports nothing heavier than this module and torch)
and by the client driver ([`~s2t_hf.serving.ServedS2T`]).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


MANIFEST_NAME = "s2t_serving.json"

#: The logits processor to load into vLLM (`--logits-processors`), by its import path.
VLLM_PROCESSOR = "s2t_hf.serving.vllm_processor:S2TVllmLogitsProcessor"

#: The per-request arguments the processor reads from `SamplingParams.extra_args` (`vllm_xargs` over REST).
REQUEST_ARGS = (
    "s2t_trigger",  # "entropy", "learned", "random", "always" or "never"; absent: the request only masks the rows
    "s2t_threshold",  # the signal's threshold (entropy, learned)
    "s2t_warmup",  # generated tokens at the start that never trigger
    "s2t_offset",  # tokens generated before this request's prompt ended (a resumed request)
    "s2t_signal_top_k",  # the entropy's support
    "s2t_rate",  # the random trigger's rate
    "s2t_seed",  # the random trigger's seed (with s2t_offset)
    "s2t_entropy_weight",  # the learned trigger's entropy term
    "s2t_keep",  # a scoring request: the only rows kept (its processed log-probabilities are a softmax over them)
)


#: The triggers the engine runs (`s2t_trigger`).
SERVED_TRIGGERS = ("entropy", "learned", "random", "always", "never")
#: The most ids one request may keep (`s2t_keep`).
MAX_KEEP = 1024
# integer arguments: (smallest, largest) allowed
_INTEGER_RANGES = {
    "s2t_warmup": (0, 2**31 - 1),
    "s2t_offset": (0, 2**31 - 1),
    "s2t_signal_top_k": (1, 2**31 - 1),
    "s2t_seed": (-(2**63), 2**63 - 1),
}
_FINITE_NUMBERS = ("s2t_threshold", "s2t_entropy_weight")

def _shown(value: Any) -> str:
    """A request's value in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_request_args(args: Any) -> dict[str, Any]:
    """
    Checks the S2T arguments of one request (`SamplingParams.extra_args`) for type and range, and returns them.

    Raises `ValueError` naming the first bad argument, what it got and what is allowed: an unknown `s2t_*` name,
    `s2t_keep` not a non-empty list of at most `MAX_KEEP` ids >= 0, `s2t_trigger` not one of `SERVED_TRIGGERS`, a
    threshold or weight that is not a finite number, a rate outside [0, 1], a negative warm-up or offset,
    `s2t_signal_top_k` < 1. Ids at or beyond the vocabulary cannot be checked here (vLLM gives `validate_params` no
    vocabulary size): the processor drops them (see [`S2TVllmLogitsProcessor`]).

    Args:
        args (`dict`):
            The request's extra arguments (other processors' arguments, without the `s2t_` prefix, are left alone).

    Returns:
        `dict`: the request's `s2t_*` arguments.
    """
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise ValueError(f"The extra arguments (`vllm_xargs`) must be an object, got {_shown(args)}.")
    ours = {k: v for k, v in args.items() if isinstance(k, str) and k.startswith("s2t_")}
    for name in ours:
        if name not in REQUEST_ARGS:
            raise ValueError(f"Unknown S2T argument `{name}`; the S2T arguments are {', '.join(REQUEST_ARGS)}.")
    keep = ours.get("s2t_keep")
    if keep is not None and (
        not isinstance(keep, list) or not 1 <= len(keep) <= MAX_KEEP
        or not all(_is_integer(i) and 0 <= i < 2**31 for i in keep)
    ):
        raise ValueError(
            f"`s2t_keep` must be a non-empty list of at most {MAX_KEEP} token ids (integers >= 0), got "
            f"{_shown(keep)}."
        )
    for name, (low, high) in _INTEGER_RANGES.items():
        value = ours.get(name)
        if value is not None and not (_is_integer(value) and low <= value <= high):
            raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got {_shown(value)}.")
    for name in _FINITE_NUMBERS:
        value = ours.get(name)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            raise ValueError(f"`{name}` must be a finite number, got {_shown(value)}.")
    rate = ours.get("s2t_rate")
    if rate is not None and not (_is_number(rate) and 0.0 <= rate <= 1.0):
        raise ValueError(f"`s2t_rate` must be a number in [0, 1], got {_shown(rate)}.")
    trigger = ours.get("s2t_trigger")
    if trigger is not None:
        if not isinstance(trigger, str) or trigger not in SERVED_TRIGGERS:
            raise ValueError(f"`s2t_trigger` must be one of {SERVED_TRIGGERS}, got {_shown(trigger)}.")
        if trigger in ("entropy", "learned") and ours.get("s2t_threshold") is None:
            raise ValueError(f"`s2t_trigger={trigger!r}` needs `s2t_threshold` (a finite number).")
    return ours


@dataclass
class ServingManifest:
    """
    The served student's reserved rows, as the vLLM logits processor needs them.

    Args:
        reserved_token_ids (`list[int]`):
            Rows that are never generated: masked at every step of every request (the selector's bins and trigger row,
            or the sentinel row of an export without a selector).
        sentinel_token_id (`int`):
            The token the processor forces at a triggered step; the client sends it as a stop token, so the request
            ends there and the client selects the step's token. One of `reserved_token_ids`.
        trigger_token_id (`int`, *optional*):
            The learned trigger's row (its raw logit is the `learned` signal), if the selector has one.
        adapter_name (`str`, *optional*):
            The name the selector's LoRA is served under (`--lora-modules NAME=DIR`), if it has LoRA.
        lora_rank (`int`, *optional*):
            The LoRA's rank (`--max-lora-rank` must be at least this).

    Examples:

    ```python
    >>> from s2t_hf.serving import ServingManifest
    >>> manifest = ServingManifest(reserved_token_ids=[60, 61], sentinel_token_id=60)
    >>> ServingManifest.from_dict(manifest.to_dict()) == manifest
    True

    ```
    """

    reserved_token_ids: list[int]
    sentinel_token_id: int
    trigger_token_id: int | None = None
    adapter_name: str | None = None
    lora_rank: int | None = None
    s2t_hf_version: str | None = field(default=None)

    def __post_init__(self):
        self.reserved_token_ids = [int(i) for i in self.reserved_token_ids]
        if self.sentinel_token_id not in self.reserved_token_ids:
            raise ValueError(
                f"`sentinel_token_id` {self.sentinel_token_id} must be one of `reserved_token_ids` "
                f"{self.reserved_token_ids}: a row that is otherwise never generated."
            )
        if self.trigger_token_id is not None and self.trigger_token_id not in self.reserved_token_ids:
            raise ValueError(f"`trigger_token_id` {self.trigger_token_id} must be one of `reserved_token_ids`.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingManifest:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Writes `s2t_serving.json` into `save_directory` and returns its path."""
        path = os.path.join(os.fspath(save_directory), MANIFEST_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ServingManifest:
        """Reads `s2t_serving.json` from an exported checkpoint folder."""
        path = os.path.join(os.fspath(directory), MANIFEST_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {MANIFEST_NAME} in {os.fspath(directory)!r}: it is not a student exported for serving. Export "
                "it with `s2t-hf export` (or `s2t_hf.serving.export_for_vllm`) and serve the export's `model/` "
                "folder."
            )
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
