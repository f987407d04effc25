"""`AdapterState`: the one owner of a selector's PEFT adapter state.

A selector's adapter has two kinds of PEFT layers: LoRA layers (on the attention and MLP projections) and
trainable-token layers (the reserved bin and trigger rows of the output head). `AdapterState` switches the LoRA layers
on and off and merges or unmerges the trainable-token rows. It is the only place in s2t_hf that touches PEFT's adapter
state; everything else goes through it (usually as `S2TSelector.adapter_state`).

It uses PEFT's public API wherever one exists. The one exception is [`AdapterState.lora`], the temporary switch of
the processor's hot path: PEFT's public `enable_adapters(True)` also redoes the adapter's requires-grad bookkeeping
(`set_adapter`), which costs a sizeable fraction of a small model's forward, twice per triggered decoding step
(measured by `benchmarks/adapter_switch.py`). `lora` therefore flips only the flag that `enable_adapters` sets.
`tests/test_adapter_state.py` fails if PEFT's behaviour behind that flag changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


__all__ = ["AdapterState"]


class AdapterState:
    """
    Switches a PEFT model's LoRA on and off and merges or unmerges its trainable-token rows (the reserved bin/trigger
    rows). The one place in s2t_hf that touches PEFT's adapter state.

    The layers are found once, at construction: build a new `AdapterState` if adapters are added to the model later.

    Args:
        peft_model (`torch.nn.Module`):
            A model holding PEFT layers, usually the `peft.PeftModel` of an [`S2TSelector`] (`selector.model`).

    Attributes:
        lora_layers (`list[torch.nn.Module]`):
            The LoRA layers (every PEFT tuner layer that is not a trainable-token layer), in module order.
        token_layers (`list[torch.nn.Module]`):
            The trainable-token layers that own their rows (`tied_adapter is None`), in module order: the reserved rows
            of the output head.
        tied_token_layers (`list[torch.nn.Module]`):
            The trainable-token layers that share the rows of another one (the input embeddings of a model with tied
            word embeddings). Merged and unmerged together with `token_layers`.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf import S2TSelector
    >>> from s2t_hf.adapter_state import AdapterState
    >>> config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                      num_key_value_heads=1, vocab_size=64)
    >>> selector = S2TSelector.create(AutoModelForCausalLM.from_config(config), num_bins=4, lora_r=2)
    >>> state = AdapterState(selector.model)
    >>> len(state.lora_layers) > 0, len(state.token_layers)
    (True, 1)
    >>> with state.lora(False):  # LoRA off, the bin rows stay on
    ...     state.lora_layers[0].disable_adapters
    True
    >>> state.lora_layers[0].disable_adapters
    False
    >>> state.merge_rows(True)
    >>> state.rows_merged
    True
    >>> state.merge_rows(False)

    ```
    """

    def __init__(self, peft_model: torch.nn.Module):
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not isinstance(peft_model, nn.Module):
            raise TypeError(f"`peft_model` must be a `torch.nn.Module` (a `peft.PeftModel`), got {type(peft_model)}.")
        tuner_layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        self.lora_layers: list[nn.Module] = [m for m in tuner_layers if not isinstance(m, TrainableTokensLayer)]
        self.token_layers: list[nn.Module] = [
            m for m in tuner_layers if isinstance(m, TrainableTokensLayer) and m.tied_adapter is None
        ]
        self.tied_token_layers: list[nn.Module] = [
            m for m in tuner_layers if isinstance(m, TrainableTokensLayer) and m.tied_adapter is not None
        ]
        # every trainable-token layer in module order: the order in which they are merged and unmerged
        self._row_layers = [m for m in tuner_layers if isinstance(m, TrainableTokensLayer)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lora_layers={len(self.lora_layers)}, token_layers={len(self.token_layers)}, "
            f"tied_token_layers={len(self.tied_token_layers)}, rows_merged={self.rows_merged})"
        )

    # ------------------------------------------------------------------------------------------------------------------
    # LoRA

    def set_lora(self, enabled: bool) -> None:
        """
        Switches every LoRA layer on or off, persistently, with PEFT's public `enable_adapters(enabled)` (which also
        makes the adapter's weights trainable again when enabling, and freezes them when disabling). The reserved rows
        are left as they are.

        Args:
            enabled (`bool`):
                `True` to switch LoRA on, `False` to switch it off.
        """
        for layer in self.lora_layers:
            layer.enable_adapters(enabled)

    @property
    def lora_merged(self) -> bool:
        """Whether the LoRA layers are merged into their base weights (see [`~AdapterState.merge_lora`])."""
        return any(layer.merged for layer in self.lora_layers)

    def merge_lora(self, merged: bool) -> None:
        """
        Merges every active LoRA layer into its base weight, or unmerges it, with PEFT's public `merge()` /
        `unmerge()`. Merged, a LoRA that is on for every token costs nothing at decoding time (unmerged, each of its
        layers runs two extra matrix products per forward); unmerging restores the base weights up to float rounding.
        Only for a LoRA that stays on: PEFT unmerges a merged layer on the fly when it is switched off.

        Args:
            merged (`bool`):
                `True` to merge, `False` to unmerge.
        """
        _merge(self.lora_layers, merged)

    @contextlib.contextmanager
    def lora(self, enabled: bool) -> Iterator[None]:
        """
        Context manager that switches every LoRA layer on or off for the duration of the block, for hot paths: it
        flips only PEFT's enabled flag, without the requires-grad bookkeeping of `enable_adapters` (the measured
        reason is in `benchmarks/adapter_switch.py`), so the trainability of the adapter's weights is unchanged. Layers
        already in the wanted state are left alone; on exit every switched layer gets its previous state back. The
        reserved rows are left as they are.

        Args:
            enabled (`bool`):
                `True` to switch LoRA on inside the block, `False` to switch it off.
        """
        switched = [layer for layer in self.lora_layers if layer.disable_adapters == enabled]
        # PEFT exposes the flag as the read-only property `disable_adapters`; `enable_adapters` is the public setter.
        # This is the one place in s2t_hf that writes it directly (tests/test_adapter_state.py guards it).
        for layer in switched:
            layer._disable_adapters = not enabled
        try:
            yield
        finally:
            for layer in switched:
                layer._disable_adapters = enabled

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """
        Context manager that gives every adapter layer (LoRA and reserved rows) back, on exit, the state it had on
        entry: on or off (PEFT's public `enable_adapters`), merged or not (`merge()`). For blocks that switch adapters
        with PEFT's own context managers: `PeftModel.disable_adapter()` switches every adapter *on* when it ends, even
        one that was off before.
        """
        layers = [*self.lora_layers, *self._row_layers]
        enabled = [not layer.disable_adapters for layer in layers]
        merged = [layer.merged for layer in layers]
        try:
            yield
        finally:
            for layer, was_enabled, was_merged in zip(layers, enabled, merged):
                if not was_enabled and not layer.disable_adapters:
                    if layer.merged:
                        layer.unmerge()
                    layer.enable_adapters(False)
                elif was_enabled and layer.disable_adapters:
                    layer.enable_adapters(True)
                if was_merged and not layer.merged:
                    layer.merge()

    # ------------------------------------------------------------------------------------------------------------------
    # Reserved rows

    @property
    def rows_merged(self) -> bool:
        """Whether the reserved rows are merged into the weights they live in (see [`~AdapterState.merge_rows`])."""
        return any(layer.merged for layer in self._row_layers)

    def merge_rows(self, merged: bool) -> None:
        """
        Merges the reserved rows into the output head (and tied input embeddings), or unmerges them, with PEFT's
        public `merge()` / `unmerge()`. While unmerged and active, PEFT rebuilds the whole matrix at every forward;
        merged, the rows cost nothing. Merging leaves out layers whose adapter is disabled or already merged;
        unmerging touches only merged layers.

        Args:
            merged (`bool`):
                `True` to merge, `False` to unmerge.
        """
        _merge(self._row_layers, merged)

    def set_rows(self, enabled: bool) -> None:
        """
        Switches the reserved rows on or off, persistently, with PEFT's public `enable_adapters(enabled)`: off, the
        output head (and tied input embeddings) hold the base model's rows again. Unmerges merged rows before switching
        them off. LoRA is left as it is.

        Args:
            enabled (`bool`):
                `True` to switch the rows on, `False` to switch them off.
        """
        if not enabled:
            _merge(self._row_layers, False)
        for layer in self._row_layers:
            layer.enable_adapters(enabled)

    def write_row(self, row: int, weights: torch.Tensor) -> None:
        """
        Writes `weights` into the trainable delta of reserved row `row` (e.g. the learned trigger's row), leaving every
        other row as it is.

        Args:
            row (`int`):
                Vocabulary id of a reserved row of the adapter.
            weights (`torch.Tensor`):
                The row's new weights, shape `(hidden_size,)`; cast to the delta's device and dtype.

        Raises:
            `ValueError`: when the rows are merged (an `S2TLogitsProcessor` is open on the selector), or when no layer
            trains `row`.
        """
        if any(layer.merged for layer in self.token_layers):
            raise ValueError(
                "The selector's reserved rows are merged into the output head: an `S2TLogitsProcessor` is open on it. "
                "Fit the trigger row outside the processor's `with` block."
            )
        written = False
        for layer in self.token_layers:
            for adapter, indices in layer.token_indices.items():
                if row in indices:
                    delta = layer.trainable_tokens_delta[adapter]
                    with torch.no_grad():
                        delta[indices.index(row)] = weights.to(delta.device, delta.dtype)
                    written = True
        if not written:
            raise ValueError(f"The selector's adapter trains no row {row}; was it created with `learned_trigger=True`?")


def _merge(layers: list[nn.Module], merged: bool) -> None:
    """PEFT's public `merge()` / `unmerge()` on `layers`: merging leaves out layers whose adapter is disabled or
    already merged; unmerging touches only merged layers."""
    for layer in layers:
        if merged and not layer.merged and not layer.disable_adapters:
            layer.merge()
        elif not merged and layer.merged:
            layer.unmerge()
