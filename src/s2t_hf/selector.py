"""`S2TSelector`: the local selector of a causal LM, packaged as a standard PEFT adapter.

The selector is the student itself with B reserved output rows ("bins") and, optionally, LoRA on every attention and
MLP projection. The score of a candidate token is the expected bin value at the candidate's position:
`sum_b softmax(bin logits)_b * v_b`. Only the LoRA weights and the B rows of the output head are trained and saved
(PEFT `trainable_token_indices`), never the whole head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from collections.abc import Iterator

import torch
from torch import nn
from transformers.utils import logging

from .adapter_injection import (
    CACHE_PRESERVING_PROJECTIONS,
    inject_adapter,
    model_name_or_path,
    num_decoder_layers,
    selector_peft_config,
)
from .adapter_state import AdapterState
from .atomic_files import PENDING_DIR, STAGING_DIR, recover_save, replace_files
from .bin_rows import choose_reserved_rows, grow_embeddings, output_head, output_head_rows, vocab_fingerprint
from .config import S2TConfig
from .kv import require_decoder_only
from .selection import expected_bin_value
from .selector_card import MODEL_CARD_NAME, selector_model_card
from .selector_loading import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, load_selector_adapter


# `expected_bin_value`, `vocab_fingerprint`, `CACHE_PRESERVING_PROJECTIONS` and the file names are re-exported: they
# have always been importable from `s2t_hf.selector`.
__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CACHE_PRESERVING_PROJECTIONS",
    "MODEL_CARD_NAME",
    "S2TSelector",
    "expected_bin_value",
    "vocab_fingerprint",
]

logger = logging.get_logger(__name__)


def _finish_interrupted_save(directory: str) -> None:
    """Finishes (or drops) a `save_pretrained` into `directory` that a crash interrupted, before loading from it; a
    folder that cannot be written is loaded as it is."""
    if not any(os.path.isdir(os.path.join(directory, name)) for name in (PENDING_DIR, STAGING_DIR)):
        return
    try:
        if recover_save(directory):
            logger.warning(f"Finished a save of the selector into `{directory}` that was interrupted.")
    except OSError as error:
        logger.warning(f"Could not finish an interrupted save of the selector into `{directory}` ({error}).")


def _settings_from_config(
    config: S2TConfig | None, num_bins: int | None, bin_token_ids, learned_trigger: bool, trigger_token_id: int | None
) -> tuple[S2TConfig, int, list[int] | None, int | None]:
    """`S2TSelector.create`'s arguments reconciled with `config`.

    Returns `(config, num_bins, bin_token_ids, trigger_token_id)`.
    """
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
    return config, num_bins, bin_token_ids, trigger_token_id


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
        head_rows = output_head_rows(model.get_base_model())
        if max(config.reserved_token_ids) >= head_rows:
            raise ValueError(
                f"`config.bin_token_ids` (and `trigger_token_id`) go up to {max(config.reserved_token_ids)} but the "
                "model's output head has only "
                f"{head_rows} rows (was it grown by `config.num_added_rows` = {config.num_added_rows}?)."
            )
        self.model = model
        self.config = config
        self._adapter_state: AdapterState | None = None

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

        last = num_decoder_layers(self.base_model) - 1
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
        """
        Context manager in which `self.model` is exactly the base model (LoRA and bin rows off). On exit every adapter
        layer is on or off, merged or not, as it was before (a selector switched off by a closed processor stays off).
        """
        with self.adapter_state.restored(), self.model.disable_adapter():
            yield

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """
        Context manager in which the LoRA layers are off and the reserved rows (bins, trigger) stay on: the model the
        processor generates with under `adapter_mode="scoring"` (the base model's hidden states and ordinary logits).
        Same as `selector.adapter_state.lora(False)`.
        """
        with self.adapter_state.lora(False):
            yield

    @property
    def adapter_state(self) -> AdapterState:
        """
        The [`~s2t_hf.adapter_state.AdapterState`] of `self.model`: the one owner of the adapter's PEFT state (LoRA on
        or off, reserved rows merged or not). Built on first use, then kept.
        """
        if self._adapter_state is None:
            self._adapter_state = AdapterState(self.model)
        return self._adapter_state

    @property
    def output_head(self) -> nn.Module:
        """The module of the base model that holds the reserved rows: its output head (`lm_head` for most causal LMs,
        wrapped by PEFT's trainable-token layer)."""
        return output_head(self.base_model)[1]

    def write_reserved_row(self, row: int, weights: torch.Tensor) -> None:
        """
        Writes `weights` into reserved row `row` of the adapter (e.g. the learned trigger's row), leaving every other
        row as it is. See [`~s2t_hf.adapter_state.AdapterState.write_row`].

        Args:
            row (`int`):
                Vocabulary id of one of `reserved_token_ids`.
            weights (`torch.Tensor`):
                The row's new weights, shape `(hidden_size,)`.
        """
        self.adapter_state.write_row(row, weights)

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
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise TypeError(
                "`model` already holds a PEFT adapter. Pass the plain transformers model to `S2TSelector.create`, or "
                "wrap the existing `PeftModel` with `S2TSelector(model, config)`."
            )
        require_decoder_only(model)
        config, num_bins, bin_token_ids, trigger_token_id = _settings_from_config(
            config, num_bins, bin_token_ids, learned_trigger, trigger_token_id
        )
        # 1. the reserved rows, chosen (and fingerprinted) on the model as it is
        rows = choose_reserved_rows(model, tokenizer, num_bins, bin_token_ids, learned_trigger, trigger_token_id)
        fingerprint = vocab_fingerprint(model, tokenizer, exclude_token_ids=rows.token_ids, sketch=True)
        # 2. the embeddings, grown when no free rows were found
        if rows.num_added_rows:
            grow_embeddings(model, rows.num_added_rows)
        # 3. the adapter
        peft_config = selector_peft_config(
            model, rows.token_ids, use_lora=use_lora, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=target_modules, preserve_cache=preserve_cache,
        )  # fmt: skip
        base_name = model_name_or_path(model)
        peft_model = inject_adapter(model, peft_config)
        config = dataclasses.replace(
            config,
            num_bins=num_bins,
            bin_token_ids=rows.bin_token_ids,
            trigger_token_id=rows.trigger_token_id,
            trigger_adapter_mode=None,
            base_model_name_or_path=base_name,
            vocab_fingerprint=fingerprint,
            num_added_rows=rows.num_added_rows,
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
        adapter_name = self.model.active_adapter
        self.model.peft_config[adapter_name].base_model_name_or_path = self.config.base_model_name_or_path
        card = self.model_card(repo_id or save_directory, metrics)

        def write(folder: str) -> None:
            # `save_embedding_layers=False`: never the whole head; "auto" would also look the base model up on the Hub.
            self.model.save_pretrained(
                folder, safe_serialization=True, save_embedding_layers=False, selected_adapters=[adapter_name]
            )
            self.config.save_pretrained(folder)
            with open(os.path.join(folder, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
                f.write(card)

        # written beside their place and moved in once complete: a crash leaves the previous selector or this one
        replace_files(save_directory, write)

    def model_card(self, location: str, metrics: dict | None = None) -> str:
        """
        The model card (`README.md`) that `save_pretrained` and `push_to_hub` write: Hub metadata, what the selector is,
        how to use it, its settings and `metrics`.

        Args:
            location (`str`):
                Where the selector is stored (a folder or a Hub repository id), for the usage example.
            metrics (`dict`, *optional*):
                Evaluation results, shown as a table.

        Returns:
            `str`: the card.
        """
        return selector_model_card(self.config, self.model.peft_config[self.model.active_adapter], location, metrics)

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
        from peft import PeftModel

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
        if os.path.isdir(os.fspath(path_or_repo_id)):
            _finish_interrupted_save(os.fspath(path_or_repo_id))
        peft_model, config = load_selector_adapter(
            model, path_or_repo_id,
            is_trainable=is_trainable, check_fingerprint=check_fingerprint, hub_kwargs=hub_kwargs,
        )  # fmt: skip
        return cls(peft_model, config)
