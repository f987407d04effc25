"""`ServingManifest`: what the engine side of a served student needs to know, written next to the exported checkpoint.

It is read by the vLLM logits processor inside the server (which imports nothing heavier than this module and torch)
and by the client driver ([`~s2t_hf.serving.ServedS2T`]).
"""

from __future__ import annotations

import dataclasses
import json
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
