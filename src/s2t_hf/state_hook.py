"""`GenerationStateHook`: what `generate` passes the model at each forward, recorded for the S2T processor.

`generate` hands a logits processor only `(input_ids, scores)`. The hook is a forward pre-hook on the model that
records, at every forward of `generate`, the live cache (through a weak reference), the 2-D attention mask (left
padding included) and the position ids; when the processor runs, the cache already holds the step's tokens. It counts
the forwards and the new generations; it never calls into the processor.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .kv import previous_sliding_state


__all__ = ["ForwardRecord", "GenerationStateHook", "padding_mask_from_4d"]


@dataclass
class ForwardRecord:
    """What the last forward of `generate` saw."""

    input_length: int
    cache_length_before: int
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    # False when `generate` passed a prepared mask (e.g. a dict per layer kind) the padding could not be read from
    mask_readable: bool = True
    # the watched output row's logit at the last position, as the model returned it (before any logits processor)
    watched_logits: torch.Tensor | None = None


def padding_mask_from_4d(mask: torch.Tensor, length: int, window: int | None = None) -> torch.Tensor | None:
    """
    The 2-D padding mask (1 = real token) of a sequence of `length` tokens, read from the 4-D mask `generate` prepares
    for a static cache (boolean, True = attend, or additive float, 0 = attend): the keys its last query attends to.
    `None` when the mask may hide real tokens too (a sliding window shorter than `length`).
    """
    if mask.dim() != 4 or mask.shape[-1] < length or (window is not None and length > window):
        return None
    last = mask[:, 0, -1, :length]
    attend = last if last.dtype == torch.bool else last == 0
    return attend.long()


class GenerationStateHook:
    """
    A forward pre-hook (registered with `with_kwargs=True`) that records what `generate` passes to the model.

    The cache is held through a weak reference so the hook never keeps a finished generation's cache alive.
    A forward on an empty cache (a new `generate` call) counts in `generations`; the processor reads the count at its
    next step (the hook never calls back into it from inside a forward). With `watch_row`, a forward
    hook also records that output row's logit at the last position from the model's own output
    (`ForwardRecord.watched_logits`), before any logits processor can change it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        keep_previous_sliding: bool = False,
        watch_row: int | None = None,
    ):
        self.module = module
        self.watch_row = watch_row
        self.paused = False
        self.last: ForwardRecord | None = None
        # forwards recorded so far: the processor checks that a new one happened before each of its steps
        self.forwards = 0
        # forwards that started a new generation (a prefill on an empty cache): the processor resets itself at its
        # next step when this changed, never from inside a forward
        self.generations = 0
        # references (no copies) to the sliding-window layers' tensors before the last forward, kept only when asked
        self.keep_previous_sliding = keep_previous_sliding
        self.previous_sliding: list | None = None
        self._cache_ref = None
        self._handle = None
        self._output_handle = None
        self.attach()

    @property
    def attached(self) -> bool:
        """Whether the hook is registered on the module."""
        return self._handle is not None

    def attach(self) -> None:
        """Registers the hook on the module (again, after [`remove`]); a no-op while it is registered."""
        if self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self, with_kwargs=True)
        if self._output_handle is None and self.watch_row is not None:
            self._output_handle = self.module.register_forward_hook(self._read_output)

    def _read_output(self, module, args, output) -> None:
        if self.paused or self.last is None:
            return
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            logits = output[0]  # `return_dict=False`, no labels: the logits come first
        if isinstance(logits, torch.Tensor) and logits.dim() == 3:
            self.last.watched_logits = self.watched(logits[:, -1])

    def watched(self, logits: torch.Tensor) -> torch.Tensor:
        """The watched row of one position's logits `(batch, vocab)`, as a float32 copy (the logits are not kept)."""
        return logits[:, self.watch_row].to(torch.float32, copy=True)

    def __call__(self, module, args, kwargs):
        if self.paused:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            input_ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_length = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            cache_length = int(cache.get_seq_length())
        attention_mask = kwargs.get("attention_mask")
        input_length = int(input_ids.shape[1]) if input_ids is not None else 0
        readable = True
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            # prepared by `generate` for a static cache: the padding is read back from it
            window = getattr(getattr(module, "config", None), "sliding_window", None)
            attention_mask = padding_mask_from_4d(attention_mask, cache_length + input_length, window)
            readable = attention_mask is not None
        elif attention_mask is not None and (isinstance(attention_mask, dict) or attention_mask.dim() != 2):
            attention_mask, readable = None, False
        if cache is not None:
            new_generation = cache_length == 0
        else:  # `use_cache=False`: every forward re-encodes the whole sequence, one token longer than the last
            new_generation = self.last is None or input_length != self.last.input_length + 1
        if new_generation:
            self.generations += 1
        if self.keep_previous_sliding and cache is not None and hasattr(cache, "layers"):
            self.previous_sliding = previous_sliding_state(cache)
        self.note(input_length, cache, attention_mask, kwargs.get("position_ids"), cache_length, readable)
        return None

    def note(
        self,
        input_length: int,
        cache: Any,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache_length_before: int = 0,
        mask_readable: bool = True,
        next_logits: torch.Tensor | None = None,
    ) -> None:
        """
        Records a forward; the fused decoding loop calls it for the forwards it runs with the hook paused, with the
        logits `(batch, vocab)` that forward yields for the next step (`next_logits`: the watched row is read there).
        """
        self.forwards += 1
        watched = next_logits is not None and self.watch_row is not None
        self.last = ForwardRecord(
            input_length=input_length,
            cache_length_before=cache_length_before,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mask_readable=mask_readable,
            watched_logits=self.watched(next_logits) if watched else None,
        )
        self._cache_ref = weakref.ref(cache) if cache is not None else None

    @property
    def cache(self):
        return self._cache_ref() if self._cache_ref is not None else None

    @contextlib.contextmanager
    def pause(self):
        """Ignore forwards made by the processor itself."""
        previous, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = previous

    def remove(self) -> None:
        for handle in (self._handle, self._output_handle):
            if handle is not None:
                handle.remove()
        self._handle = self._output_handle = None
        self.last = None
        self.previous_sliding = None
        self._cache_ref = None
