"""`S2TConfig`: every setting of Select-to-Think decoding, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from .version import __version__


logger = logging.get_logger(__name__)

CONFIG_NAME = "s2t_config.json"

# The built-in trigger and selection kinds. The kinds a config accepts are those registered in
# `s2t_hf.triggers.TRIGGERS` and `s2t_hf.selection.SELECTIONS` (these plus any registered later).
TRIGGER_KINDS = ("entropy", "kl", "learned", "random", "always", "never")
# triggers whose signal crosses a calibrated threshold
THRESHOLD_TRIGGERS = ("entropy", "kl", "learned")
SELECTION_KINDS = ("teacher", "takeover", "local")
SCORING_KINDS = ("pure", "residual")
# where the residual form's log-probabilities come from: the student with the selector's adapter on, or as it is
RESIDUAL_LOG_PROBS = ("selector", "student")
LOCAL_PATHS = ("auto", "cache", "recompute")
ADAPTER_MODES = ("generate", "scoring")


@dataclass
class S2TConfig:
    """
    Settings of Select-to-Think decoding: when to trigger, which candidates to consider, how to select among them,
    and (for S2T-Local) how the selector's reserved bins turn into a score.

    Saved as `s2t_config.json` next to a selector adapter; unknown keys on load warn instead of failing, so a file
    written by a newer version still loads.

    Examples:

    ```python
    >>> from s2t_hf import S2TConfig
    >>> config = S2TConfig(trigger="entropy", trigger_threshold=1.5, top_k=8)
    >>> S2TConfig.from_dict(config.to_dict()) == config
    True

    ```
    """

    # Trigger
    trigger: str = field(
        default="entropy", metadata={"help": f"When to intervene: one of {TRIGGER_KINDS}."}
    )
    trigger_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Trigger when the signal (entropy or KL in nats, or the learned trigger row's logit) exceeds this "
            "value. Set it directly or with `S2TLogitsProcessor.calibrate`. Required for `entropy`, `kl` and `learned` "
            "triggers at generation time."
        },
    )
    trigger_rate: float | None = field(
        default=None,
        metadata={"help": "Probability of a trigger per step for the `random` trigger; target rate for `calibrate`."},
    )
    signal_top_k: int = field(
        default=64,
        metadata={"help": "Size of the student's top-k support on which entropy and KL are computed (renormalised)."},
    )
    warmup_tokens: int = field(
        default=3, metadata={"help": "Number of generated tokens at the start of each sequence that never trigger."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of the `random` trigger's generator."})
    trigger_token_id: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary id of the learned trigger's reserved output row (set by "
            "`S2TSelector.create(..., learned_trigger=True)`); its logit is the `learned` trigger's signal."
        },
    )
    trigger_entropy_weight: float = field(
        default=0.0,
        metadata={
            "help": "The learned trigger's signal is its row's logit plus this weight times the student's entropy "
            "(on the top-`signal_top_k` support, as for the `entropy` trigger); fit with the row by `fit_trigger_row`."
        },
    )
    trigger_adapter_mode: str | None = field(
        default=None,
        metadata={
            "help": "The adapter mode whose hidden states the trigger row was fit on (set by `fit_trigger_row`): "
            "`scoring` (the base model's, LoRA off) or `generate` (LoRA on)."
        },
    )

    # Candidates
    top_k: int = field(default=8, metadata={"help": "Number K of the student's top candidates to select among."})
    candidate_ratio: float | None = field(
        default=None,
        metadata={"help": "If set, keep only candidates with probability >= ratio * the top candidate's probability."},
    )

    # Selection
    selection: str = field(default="teacher", metadata={"help": f"How to select: one of {SELECTION_KINDS}."})

    # Local selector (S2T-Local)
    num_bins: int = field(default=16, metadata={"help": "Number B of reserved output rows used as scoring bins."})
    bin_token_ids: list[int] | None = field(
        default=None, metadata={"help": "Vocabulary ids of the B reserved rows (set by `S2TSelector`)."}
    )
    bin_values: list[float] | None = field(
        default=None,
        metadata={"help": "Value of each bin; the score is the expected value. Defaults to linspace(0, 1, B)."},
    )
    scoring: str = field(
        default="pure",
        metadata={
            "help": "`pure`: score = expected bin value. `residual`: candidate logit = the selector's own "
            "log-probability of the candidate (the student with the adapter on) + score / residual_tau."
        },
    )
    residual_tau: float = field(default=0.1, metadata={"help": "Temperature of the residual form's score term."})
    residual_log_probs: str = field(
        default="selector",
        metadata={
            "help": "Whose log-probabilities the residual form adds the score to: `selector` (the student with the "
            "adapter on, so a LoRA's fine-tuning moves the choice too) or `student` (the student as it generates, "
            "adapter off: only the bins move the choice; needs `adapter_mode='scoring'`)."
        },
    )
    local_path: str = field(
        default="auto",
        metadata={
            "help": "How S2T-Local scores candidates: `cache` (one extra forward on the live KV cache), `recompute` "
            "(re-encode prefix + candidate) or `auto` (the cache path where the model and cache allow it)."
        },
    )
    max_context: int | None = field(
        default=None, metadata={"help": "Truncate the prefix to this many tokens on the recompute path."}
    )
    adapter_mode: str = field(
        default="generate",
        metadata={
            "help": "`generate`: the selector adapter is active during generation (as in the paper). `scoring`: the "
            "adapter is active only while scoring candidates, so untriggered tokens are exactly the base model's "
            "(fast on the live cache for a selector created with `preserve_cache=True`)."
        },
    )

    # Provenance, filled by `S2TSelector`
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "The base model of the selector."})
    vocab_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the base model's vocabulary; loading checks it."}
    )
    num_added_rows: int = field(
        default=0, metadata={"help": "Rows added to the embeddings to host the bins (repeated on load)."}
    )
    s2t_hf_version: str = field(default=__version__, metadata={"help": "Version of s2t_hf that wrote the file."})

    def __post_init__(self) -> None:
        def choose(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")

        from .selection import SELECTIONS
        from .triggers import TRIGGERS

        choose("trigger", tuple(TRIGGERS))
        choose("selection", tuple(SELECTIONS))
        choose("scoring", SCORING_KINDS)
        choose("residual_log_probs", RESIDUAL_LOG_PROBS)
        choose("local_path", LOCAL_PATHS)
        choose("adapter_mode", ADAPTER_MODES)
        if self.trigger_adapter_mode is not None:
            choose("trigger_adapter_mode", ADAPTER_MODES)
        for name in ("top_k", "signal_top_k", "num_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.top_k < 2:
            raise ValueError(f"`top_k` must be at least 2 to leave a choice, got {self.top_k}.")
        if not isinstance(self.warmup_tokens, int) or self.warmup_tokens < 0:
            raise ValueError(f"`warmup_tokens` must be a non-negative integer, got {self.warmup_tokens!r}.")
        if self.trigger_rate is not None and not 0.0 <= self.trigger_rate <= 1.0:
            raise ValueError(f"`trigger_rate` must lie in [0, 1], got {self.trigger_rate}.")
        if self.trigger == "random" and self.trigger_rate is None:
            raise ValueError("The `random` trigger needs `trigger_rate`, the probability of a trigger per step.")
        if self.candidate_ratio is not None and not 0.0 < self.candidate_ratio <= 1.0:
            raise ValueError(f"`candidate_ratio` must lie in (0, 1], got {self.candidate_ratio}.")
        if self.residual_tau <= 0:
            raise ValueError(f"`residual_tau` must be positive, got {self.residual_tau}.")
        if self.residual_log_probs == "student" and self.adapter_mode != "scoring":
            raise ValueError(
                "`residual_log_probs='student'` needs `adapter_mode='scoring'`: with the adapter on while the student "
                f"generates (`adapter_mode={self.adapter_mode!r}`) its own log-probabilities are the selector's. Set "
                "`adapter_mode='scoring'` (a selector created with `preserve_cache=True` scores on the live cache)."
            )
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"`max_context` must be a positive integer or None, got {self.max_context}.")
        if self.bin_token_ids is not None:
            self.bin_token_ids = [int(i) for i in self.bin_token_ids]
            if len(self.bin_token_ids) != self.num_bins:
                raise ValueError(
                    f"`bin_token_ids` has {len(self.bin_token_ids)} ids but `num_bins` is {self.num_bins}; give one id "
                    "per bin."
                )
            if len(set(self.bin_token_ids)) != self.num_bins:
                raise ValueError(f"`bin_token_ids` must be distinct, got {self.bin_token_ids}.")
        if self.trigger_token_id is not None:
            if not isinstance(self.trigger_token_id, int) or isinstance(self.trigger_token_id, bool):
                raise ValueError(f"`trigger_token_id` must be an integer id, got {self.trigger_token_id!r}.")
            if self.bin_token_ids is not None and self.trigger_token_id in self.bin_token_ids:
                raise ValueError(
                    f"`trigger_token_id` {self.trigger_token_id} is also a bin (`bin_token_ids`); the trigger needs a "
                    "row of its own."
                )
        if self.bin_values is not None:
            self.bin_values = [float(v) for v in self.bin_values]
            if len(self.bin_values) != self.num_bins:
                raise ValueError(
                    f"`bin_values` has {len(self.bin_values)} values but `num_bins` is {self.num_bins}; give one value "
                    "per bin or leave it None for linspace(0, 1, num_bins)."
                )

    @property
    def reserved_token_ids(self) -> list[int]:
        """Rows that are never generated: the bins and the learned trigger's row."""
        ids = list(self.bin_token_ids or [])
        if self.trigger_token_id is not None:
            ids.append(self.trigger_token_id)
        return ids

    @property
    def needs_teacher(self) -> bool:
        """Whether decoding with this config needs a teacher model."""
        from .selection import SELECTIONS
        from .triggers import TRIGGERS

        trigger = TRIGGERS[self.trigger]
        return trigger.needs_teacher_every_step or (trigger.can_fire and SELECTIONS[self.selection].needs_teacher)

    @property
    def trigger_has_threshold(self) -> bool:
        """Whether the trigger compares a signal to `trigger_threshold` (and can be calibrated to a rate)."""
        from .triggers import TRIGGERS

        return TRIGGERS[self.trigger].has_threshold

    def resolved_bin_values(self) -> list[float]:
        """The bin values: `bin_values` if set, else linspace(0, 1, num_bins)."""
        if self.bin_values is not None:
            return list(self.bin_values)
        if self.num_bins == 1:
            return [1.0]
        return [i / (self.num_bins - 1) for i in range(self.num_bins)]

    def to_dict(self) -> dict[str, Any]:
        """Serializes this config to a plain dictionary (JSON-compatible)."""
        output = dataclasses.asdict(self)
        output["s2t_hf_version"] = __version__
        return output

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> S2TConfig:
        """
        Builds a config from a dictionary; keys in `kwargs` override the dictionary. Unknown keys warn and are ignored.
        """
        values = {**config_dict, **kwargs}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown keys {unknown} in the S2T config (written by s2t_hf "
                f"{values.get('s2t_hf_version', 'unknown')}, this is {__version__}).",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in values.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Writes `s2t_config.json` into `save_directory` and returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **kwargs: Any) -> S2TConfig:
        try:
            with open(path, encoding="utf-8") as f:
                config_dict = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{path}` is not valid JSON ({error}); re-save the selector to repair it.") from error
        if not isinstance(config_dict, dict):
            raise ValueError(f"`{path}` must hold a JSON object, got {type(config_dict).__name__}.")
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> S2TConfig:
        """
        Loads `s2t_config.json` from a local directory or a Hub repository (the Hugging Face cache is used, so this
        works offline with `HF_HUB_OFFLINE=1` once the repository was downloaded).

        Args:
            path_or_repo_id (`str` or `os.PathLike`):
                A local directory holding `s2t_config.json`, or a Hub repository id.
            kwargs:
                `revision`, `token`, `cache_dir`, `subfolder` are passed to `huggingface_hub.hf_hub_download`; any other
                key overrides a config field.
        """
        hub_keys = ("revision", "token", "cache_dir", "subfolder", "local_files_only")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        path = resolve_file(path_or_repo_id, CONFIG_NAME, **hub_kwargs)
        return cls.from_json_file(path, **kwargs)


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs) -> str:
    """Returns a local path to `filename` in a local directory or a Hub repository (downloaded through the cache)."""
    if os.path.isdir(path_or_repo_id):
        path = os.path.join(path_or_repo_id, subfolder or "", filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No `{filename}` in `{path_or_repo_id}`. Is it a directory written by `save_pretrained` of s2t_hf?"
            )
        return path
    name = os.fspath(path_or_repo_id)
    if os.path.isfile(name):
        raise NotADirectoryError(
            f"`{name}` is a file; pass the directory written by `save_pretrained` (the one holding `{filename}`)."
        )
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"`{name}` does not exist: no such local directory, and it is not a Hub repository id ('org/name')."
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(str(path_or_repo_id), filename, subfolder=subfolder, **hub_kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised with a clearer message
        raise OSError(
            f"Could not find `{filename}` for `{path_or_repo_id}`: it is neither a local directory nor a Hub "
            f"repository reachable now (offline mode needs it in the Hugging Face cache). Cause: {error}"
        ) from error
