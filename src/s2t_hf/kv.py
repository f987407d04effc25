"""Scoring K candidate tokens on the state of `generate` (its live KV cache, or the prefixes encoded again).

What `generate` passes the model at each forward is recorded by [`~s2t_hf.state_hook.GenerationStateHook`]
(`state_hook.py`); when the processor runs, the cache already holds the step's tokens.

Candidates are scored in one of two ways:

- `score_candidates_on_cache` (fast path): the K candidates of the scored rows are fed at the *same* position in one
  forward, on a `scoring_view` of the live cache (a shallow copy holding the live tensors, or the scored rows gathered
  from them), with 4-D masks (`scoring_masks`, one per kind of layer: full or sliding window) that let each candidate
  see the prefix and itself only. Cache layers concatenate into new tensors, so the live cache is never written to.
- `score_candidates_by_recompute` (fallback): every row's prefix + candidate is re-encoded from scratch, K copies in
  one batch, with an ordinary 2-D mask (works with any attention implementation and any cache).

Both return the logits at each candidate's position, shape `(rows, K, vocab)`; they agree to float precision.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Attention implementations that accept an additive 4-D float mask as given.
MASK_4D_ATTENTION = ("eager", "sdpa")


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_rows(model: torch.nn.Module) -> int:
    """Number of rows of the model's output layer (the logits' last dimension), padding rows included."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` makes them with left padding: cumulative count of real tokens minus one."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def candidate_attention_mask(
    prefix_mask: torch.Tensor,
    num_candidates: int,
    dtype: torch.dtype,
    causal_prefix: bool = False,
    sliding_window: int | None = None,
    prefix_ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Additive 4-D mask for K candidates placed after a prefix: each candidate sees the prefix's real tokens and itself.

    Args:
        prefix_mask (`torch.Tensor` of shape `(batch, prefix_length)`):
            1 for real tokens, 0 for padding.
        num_candidates (`int`):
            K, the number of candidate tokens that follow the prefix.
        dtype (`torch.dtype`):
            Floating dtype of the model; masked entries get its most negative value.
        causal_prefix (`bool`, *optional*, defaults to `False`):
            If `False`, the mask has K query rows (the candidates, scored on a cache that holds the prefix). If `True`,
            it has `prefix_length + K` rows: the prefix itself is encoded too, causally (packed encoding of a context and
            its candidates without a cache).
        sliding_window (`int`, *optional*):
            The window of a sliding-window layer: a query at sequence index `q` sees index `k` only if `q - k` is
            smaller. The candidates sit at index `prefix_length`, where each would be if it followed the prefix alone.
        prefix_ends (`torch.Tensor` of shape `(batch, num_candidates)`, *optional*):
            Each candidate sees only the prefix columns before its end (defaults to `prefix_length` for all): the
            candidates of several groups whose contexts are prefixes of one row, each placed (for the sliding window)
            at the index of its end.

    Returns:
        `torch.Tensor` of shape `(batch, 1, queries, prefix_length + K)`, 0 where attention is allowed.
    """
    batch, length = prefix_mask.shape
    device = prefix_mask.device
    real = prefix_mask.bool()
    eye = torch.eye(num_candidates, dtype=torch.bool, device=device)
    columns = torch.arange(length, device=device)
    if prefix_ends is None:
        prefix_ends = torch.full((batch, num_candidates), length, dtype=torch.long, device=device)
    ends = prefix_ends[:, :, None]
    seen = real[:, None, :] & (columns[None, None] < ends)
    if sliding_window is not None:
        seen = seen & (ends - columns[None, None] < sliding_window)
    candidate_rows = torch.cat([seen, eye[None].expand(batch, -1, -1)], dim=-1)
    if causal_prefix:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if sliding_window is not None:
            causal = causal & (columns[:, None] - columns[None, :] < sliding_window)
        prefix_rows = causal[None] & real[:, None, :]
        # a padding query must still see something to keep softmax finite: let it see itself
        prefix_rows = prefix_rows | torch.eye(length, dtype=torch.bool, device=device)[None]
        prefix_rows = torch.cat(
            [prefix_rows, torch.zeros(batch, length, num_candidates, dtype=torch.bool, device=device)], dim=-1
        )
        allowed = torch.cat([prefix_rows, candidate_rows], dim=1)
    else:
        allowed = candidate_rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


# Cache layers whose `update` concatenates new keys and values into new tensors: a shallow copy of such a layer can take
# a scoring forward while the original layer, and the tensors it holds, stay untouched.
COPYABLE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def require_decoder_only(model: torch.nn.Module, argument: str = "model") -> None:
    """
    Raises a `ValueError` if `model` is an encoder-decoder: S2T feeds prefixes and candidates to a decoder-only causal
    LM (the decoder's own inputs alone do not determine an encoder-decoder's next token).
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"`{argument}` is a {type(model).__name__}, an encoder-decoder ({config.model_type!r}); S2T scores "
            "candidates with a decoder-only causal LM (`AutoModelForCausalLM`). Use a decoder-only model."
        )


def _text_config(model: torch.nn.Module) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def candidate_mask_support(model: torch.nn.Module) -> tuple[bool, str]:
    """
    Whether `model` can encode K candidates at one position in one forward: a custom 4-D float mask and explicit
    position ids must decide what each token sees and where it sits. This is what scoring on the cache, the fused loop
    and the trainer's packed encoding need; if not, the reason.

    Architectures that cannot: attention implementations that take no 4-D mask (flash, flex), ALiBi models (Bloom, MPT,
    Falcon with `alibi=True`: their biases come from sequence indices or the 2-D mask, not from position ids) and
    GPT-Neo's local layers (their window is applied by sequence index inside the attention).
    """
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in MASK_4D_ATTENTION:
        if attention is not None and "flex" in attention:
            return False, (
                f"attention implementation {attention!r} takes a block mask, not the 4-D float mask that places K "
                "candidates at one position (load the model with `attn_implementation='sdpa'` for the fast path)"
            )
        return False, (
            f"attention implementation {attention!r} does not take a custom 4-D mask (load the model with "
            "`attn_implementation='sdpa'` or 'eager' for the fast path)"
        )
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    if (
        model_type == "bloom"
        or getattr(config, "alibi", False) is True
        or getattr(getattr(config, "attn_config", None), "alibi", False) is True
    ):
        return False, (
            f"{model_type!r} adds ALiBi position biases computed from sequence indices or the 2-D mask, not from "
            "position ids, so K candidates cannot share one position"
        )
    if "local" in (getattr(config, "attention_layers", None) or ()):
        return False, (
            f"the local attention layers of {model_type!r} apply their window by sequence index, not through the "
            "mask, so K candidates cannot share one position"
        )
    return True, ""


def architecture_scoring_support(model: torch.nn.Module) -> tuple[bool, str]:
    """
    What can be told of the fast path before `generate` runs: [`candidate_mask_support`], and whether the cache that
    `generate` builds for `model` (a `DynamicCache` made from its config) holds only layers that can be scored on.
    [`cache_scoring_support`] checks the live cache itself.
    """
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports_dynamic) and not supports_dynamic():
        return False, f"{type(model).__name__} does not decode on a `DynamicCache`"
    cache = _empty_cache(model)
    if cache is None:  # a config the probe does not understand: the live cache decides
        return candidate_mask_support(model)
    return cache_scoring_support(cache, model)


def _empty_cache(model: torch.nn.Module) -> Any:
    """The `DynamicCache` that `generate` builds for `model` (its layers, no tensors yet), or None."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception as error:
        logger.debug(f"Could not build a `DynamicCache` from the config of {type(model).__name__}: {error}")
        return None


def packed_candidate_masks(
    model: torch.nn.Module,
    prefix_mask: torch.Tensor,
    num_candidates: int,
    dtype: torch.dtype,
    prefix_ends: torch.Tensor | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """
    [`candidate_attention_mask`] with `causal_prefix=True` (and `prefix_ends`) for each kind of layer of `model` (full,
    or sliding with its window): one tensor when every layer is alike, else a dict from layer type to mask (as
    [`scoring_masks`]).
    Check [`architecture_scoring_support`] first: a model whose layers mix kinds needs `layer_types` in its config.
    """
    cache = _empty_cache(model)
    windows = [_window(layer) for layer in cache.layers] if cache is not None and cache.layers else [None]
    masks = {
        window: candidate_attention_mask(
            prefix_mask, num_candidates, dtype, causal_prefix=True, sliding_window=window, prefix_ends=prefix_ends
        )
        for window in dict.fromkeys(windows)
    }
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {layer_type: masks[window] for layer_type, window in zip(_layer_types(model), windows)}


def cache_scoring_support(cache: Any, model: torch.nn.Module, num_slots: int = 1) -> tuple[bool, str]:
    """
    Whether candidates can be scored on `cache` (the fast path and the fused loop); if not, the reason.

    Args:
        cache: the live cache of `generate`.
        model (`PreTrainedModel`): the model that owns it.
        num_slots (`int`, *optional*, defaults to 1): query tokens placed on the cache at once (K, or K + 1 when the
            last token is encoded again); a sliding window must be longer than that.
    """
    ok, reason = candidate_mask_support(model)
    if not ok:
        return ok, reason
    if cache is None:
        return False, "generate runs without a cache (`use_cache=False`)"
    if type(cache).__name__ != "DynamicCache":
        return False, f"{type(cache).__name__} cannot be scored on (only a `DynamicCache` can)"
    kinds = set()
    for layer in getattr(cache, "layers", []):
        name = type(layer).__name__
        if name not in COPYABLE_LAYERS:
            return False, (
                f"cache layer {name} (e.g. linear attention, a state-space layer or an offloaded layer) cannot be "
                "scored on"
            )
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        if window is not None and window - 1 < num_slots:
            return False, f"the sliding window ({window}) is too short for {num_slots} query tokens"
        kinds.add(window is not None)
    if len(kinds) > 1 and not _layer_types(model):
        return False, "the cache mixes sliding and full layers but the model config has no `layer_types`"
    return True, ""


def _layer_types(model: torch.nn.Module) -> list[str] | None:
    return getattr(_text_config(model), "layer_types", None)


def _window(layer: Any) -> int | None:
    return int(layer.sliding_window) if getattr(layer, "is_sliding", False) else None


def previous_sliding_state(cache: Any) -> list[tuple | None]:
    """
    References to the tensors of every sliding-window layer of `cache` (no copy), taken before a forward: the tokens a
    window evicts during that forward stay reachable, so the forward's last token can be encoded again exactly.
    """
    state: list[tuple | None] = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) and getattr(layer, "is_initialized", False):
            state.append((layer.keys, layer.values, layer.cumulative_length))
        else:
            state.append(None)
    return state


def can_drop_last(cache: Any, previous: list[tuple | None] | None) -> bool:
    """
    Whether [`scoring_view`] can leave out the last cached token: every sliding layer either has its state from before
    the last forward in `previous`, or has not yet dropped a token the last one attends to. (After the prefill of a
    prompt longer than the window there is no such state: the prompt was encoded in one forward.)
    """
    for index, layer in enumerate(cache.layers):
        window = _window(layer)
        if window is None or not getattr(layer, "is_initialized", False):
            continue
        has_previous = previous is not None and index < len(previous) and previous[index] is not None
        if not has_previous and layer.cumulative_length >= window:
            return False
    return True


def scoring_view(
    cache: Any, rows: torch.Tensor | None = None, drop_last: bool = False, previous: list[tuple | None] | None = None
) -> Any:
    """
    A shallow copy of `cache` that a scoring forward may write into while `cache` itself stays untouched.

    Args:
        cache (`DynamicCache`): the live cache (layers listed in `COPYABLE_LAYERS`).
        rows (`torch.Tensor`, *optional*): keep only these batch rows (their keys and values are gathered).
        drop_last (`bool`, *optional*, defaults to `False`): leave out the last cached token, to encode it again.
            Sliding layers take the state in `previous` (from [`previous_sliding_state`] before the last forward):
            their window may already have dropped the oldest token the last one attends to.
        previous (`list`, *optional*): see `drop_last`.

    Returns:
        An object of the same class as `cache` whose layers hold views or gathered copies of the live tensors.
    """
    view = copy.copy(cache)
    view.layers = []
    for index, layer in enumerate(cache.layers):
        new = copy.copy(layer)
        if getattr(layer, "is_initialized", False):
            keys, values = layer.keys, layer.values
            if drop_last:
                state = previous[index] if previous is not None and index < len(previous) else None
                if _window(layer) is not None and state is not None:
                    keys, values, new.cumulative_length = state
                elif _window(layer) is not None and layer.cumulative_length >= layer.sliding_window:
                    raise RuntimeError(
                        "Encoding the last token again on a sliding layer that has dropped tokens needs its state from "
                        "before the last forward (`previous`); check `can_drop_last` first."
                    )
                else:
                    keys, values = keys[:, :, :-1], values[:, :, :-1]
                    if _window(layer) is not None:
                        new.cumulative_length = layer.cumulative_length - 1
            if rows is not None:
                keys, values = keys.index_select(0, rows), values.index_select(0, rows)
            new.keys, new.values = keys, values
        view.layers.append(new)
    return view


def scoring_masks(
    model: torch.nn.Module,
    cache: Any,
    prefix_mask: torch.Tensor,
    num_candidates: int,
    with_last_token: bool,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """
    Additive 4-D masks for K candidates placed at one position on `cache` (a [`scoring_view`]), one per layer kind.

    Column `j` of `prefix_mask` is sequence index `j` (left padding included, as in transformers' own masks). A layer
    that stores `S` tokens holds the last `S` of the prefix; a sliding layer with window `w` lets a query at index `q`
    see index `k` only if `q - k < w`. Query rows: the re-encoded last token (index `P`, where `P` is the prefix length)
    if `with_last_token`, then the K candidates (one index after the prefix and the last token). Each candidate sees the
    prefix, the re-encoded last token and itself; the last token sees the prefix and itself.

    Returns:
        One tensor of shape `(batch, 1, queries, S + queries)` when every layer is alike, else a dict from layer type
        (`"full_attention"`, `"sliding_attention"`) to such a tensor, as models with hybrid layers accept.
    """
    batch, prefix = prefix_mask.shape
    device = prefix_mask.device
    real = prefix_mask.bool()
    extra = 1 if with_last_token else 0
    queries = extra + num_candidates
    query_index = torch.full((queries,), prefix + extra, device=device)
    if with_last_token:
        query_index[0] = prefix
    new_block = torch.zeros(queries, queries, dtype=torch.bool, device=device)
    new_block[extra:, extra:] = torch.eye(num_candidates, dtype=torch.bool, device=device)
    new_block[:, :extra] = True
    masks: dict[tuple[int, int | None], torch.Tensor] = {}
    kinds: list[tuple[int, int | None]] = []
    for layer in cache.layers:
        stored = int(layer.keys.shape[-2]) if getattr(layer, "is_initialized", False) else 0
        key = (stored, _window(layer))
        kinds.append(key)
        if key in masks:
            continue
        columns = torch.arange(prefix - stored, prefix, device=device)
        allowed = real[:, None, prefix - stored :].expand(batch, queries, stored)
        if key[1] is not None:
            allowed = allowed & ((query_index[:, None] - columns[None, :]) < key[1])[None]
        allowed = torch.cat([allowed, new_block[None].expand(batch, -1, -1)], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        masks[key] = mask[:, None]
    if len(masks) == 1:
        return next(iter(masks.values()))
    by_type: dict[str, torch.Tensor] = {}
    for layer_type, key in zip(_layer_types(model), kinds):
        if by_type.setdefault(layer_type, masks[key]) is not masks[key]:
            raise RuntimeError(f"Layers of type {layer_type!r} hold caches of different shapes; cannot build one mask.")
    return by_type


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper, or `model` itself (PEFT modifies it in place, so hooks on it see
    every forward)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unmark_dequantized_gguf(model: torch.nn.Module) -> None:
    """
    A model loaded from a GGUF file (`from_pretrained(..., gguf_file=...)`) has its weights de-quantised to float
    tensors, yet keeps its GGUF quantizer, and `Trainer` refuses to train a quantized model. When every weight is a
    float tensor, the quantization marks are removed (transformers' own `remove_quantization_config`); weights kept in
    GGUF blocks are left alone. The trainer and the vLLM export (`save_pretrained` refuses a quantized model too)
    call it.
    """
    base = unwrap_model(model)
    quantizer = getattr(base, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        return
    if not all(p.is_floating_point() for p in base.parameters()):
        return
    quantizer.remove_quantization_config(base)
    logger.info("The model was loaded from a GGUF file with its weights de-quantised: handled as the float model it is.")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (`meta` for an empty model)."""
    return next(model.parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if dtype is None or not dtype.is_floating_point:
        dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return dtype


@torch.no_grad()
def score_candidates_on_cache(
    model: torch.nn.Module,
    cache: Any,
    attention_mask: torch.Tensor,
    next_positions: torch.Tensor,
    candidate_ids: torch.Tensor,
    last_token_ids: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    previous: list[tuple | None] | None = None,
) -> torch.Tensor:
    """
    Logits at K candidate tokens per row, computed in one forward on a [`scoring_view`] of the live cache. The live
    cache is never written to, so sliding-window layers are served as well as full ones.

    Args:
        model (`PreTrainedModel`): the model that owns `cache`.
        cache (`DynamicCache`): holds `attention_mask.shape[1]` tokens per row.
        attention_mask (`torch.Tensor` of shape `(batch, length)`): the 2-D mask of the cached tokens.
        next_positions (`torch.Tensor` of shape `(batch,)`): position id of the next token of each row.
        candidate_ids (`torch.Tensor` of shape `(rows, K)`): the candidates of the scored rows.
        last_token_ids (`torch.Tensor` of shape `(batch,)`, *optional*):
            The last cached token of each row. When given, it is encoded again in the same forward, ahead of the
            candidates, and its logits are returned too: the next-token distribution of `model` as it is now (e.g.
            with an adapter enabled that the cache was built without, which must leave keys and values unchanged).
        rows (`torch.Tensor`, *optional*):
            Indices of the rows to score (e.g. the triggered ones); defaults to every row. Only their cache entries
            are gathered, so the cost grows with the scored rows, not with the batch.
        previous (`list`, *optional*):
            [`previous_sliding_state`] taken before the last forward; needed with `last_token_ids` on sliding layers.

    Returns:
        `torch.Tensor` of shape `(rows, K, vocab)`: the logits after each candidate (prefix + candidate); with
        `last_token_ids`, shape `(rows, 1 + K, vocab)`, the last token's logits first.
    """
    num_candidates = candidate_ids.shape[1]
    length = int(attention_mask.shape[1])
    full_layers = [layer for layer in cache.layers if _window(layer) is None and getattr(layer, "is_initialized", 0)]
    if full_layers and int(full_layers[0].keys.shape[-2]) != length:
        raise RuntimeError(
            f"The cache holds {int(full_layers[0].keys.shape[-2])} tokens but the attention mask covers {length}; the "
            "fast path cannot score on this cache. Set `local_path='recompute'`."
        )
    if rows is not None:
        rows = rows.to(attention_mask.device)
        attention_mask, next_positions = attention_mask[rows], next_positions.to(rows.device)[rows]
        if last_token_ids is not None:
            last_token_ids = last_token_ids.to(rows.device)[rows]
    with_last = last_token_ids is not None
    view = scoring_view(cache, rows=rows, drop_last=with_last, previous=previous)
    prefix_mask = attention_mask[:, :-1] if with_last else attention_mask
    mask = scoring_masks(model, view, prefix_mask, num_candidates, with_last, model_dtype(model))
    positions = next_positions.to(candidate_ids.device)[:, None].expand(-1, num_candidates)
    input_ids = candidate_ids
    if with_last:
        positions = torch.cat([positions[:, :1] - 1, positions], dim=1)
        input_ids = torch.cat([last_token_ids.to(candidate_ids.device)[:, None], candidate_ids], dim=1)
    outputs = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_argument(model): view},
    )
    return outputs.logits


@torch.no_grad()
def score_candidates_by_recompute(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    candidate_ids: torch.Tensor,
    max_context: int | None = None,
    pad_token_id: int = 0,
    with_last_token: bool = False,
) -> torch.Tensor:
    """
    Logits at K candidate tokens per row, re-encoding every prefix + candidate from scratch (no cache, 2-D mask).

    Args:
        model (`PreTrainedModel`): the scoring model.
        input_ids (`torch.Tensor` of shape `(batch, length)`): the prefixes (left padding allowed).
        attention_mask (`torch.Tensor` of shape `(batch, length)`): 1 for real tokens.
        candidate_ids (`torch.Tensor` of shape `(batch, K)`): the candidates.
        max_context (`int`, *optional*): keep only the last `max_context` tokens of each prefix.
        pad_token_id (`int`, *optional*, defaults to 0): id written in padding positions.
        with_last_token (`bool`, *optional*, defaults to `False`):
            Also return the logits at the prefix's last token (the next-token distribution), as in
            [`score_candidates_on_cache`] with `last_token_ids`.

    Returns:
        `torch.Tensor` of shape `(batch, K, vocab)`; with `with_last_token`, `(batch, 1 + K, vocab)`, the last token's
        logits first.
    """
    batch, num_candidates = candidate_ids.shape
    if max_context is not None and input_ids.shape[1] > max_context:
        input_ids = input_ids[:, -max_context:]
        attention_mask = attention_mask[:, -max_context:]
    ids = input_ids.repeat_interleave(num_candidates, dim=0)
    mask = attention_mask.repeat_interleave(num_candidates, dim=0)
    ids = torch.cat([ids.masked_fill(mask == 0, pad_token_id), candidate_ids.reshape(-1, 1)], dim=1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    positions = positions_from_attention_mask(mask)
    keep = 2 if with_last_token else 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep)
    logits = logits.logits.reshape(batch, num_candidates, keep, -1)
    if with_last_token:
        return torch.cat([logits[:, :1, 0], logits[:, :, 1]], dim=1)
    return logits[:, :, -1]

