"""The fused S2T decoding loop: candidate scoring rides in the decoding forward.

In the drop-in processor path a trigger step of S2T-Local costs two forwards: one that scores the K candidates on the
cache, then the ordinary decoding forward of the chosen token. Here they are one. At a trigger step every row gets K
query slots at its next position under a 4-D mask (a triggered row's K candidates; an untriggered row's own token,
repeated); the forward's logits at the slots give the selector's bins, the chosen slot's logits are the next step's
logits, and only the chosen slot's keys and values are appended to the cache. Steps without a trigger run one ordinary
forward, exactly as `generate` does.

The loop is a decoding method for transformers' `custom_generate` mechanism: `generate` prepares the processors, the
stopping criteria and the cache as usual (so `min_new_tokens`, `bad_words_ids`, temperature, top-k... all apply) and
calls [`s2t_sample`] in place of its own sampling loop.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from ..fused import FusedSession
from ..kv import cache_argument, model_dtype, positions_from_attention_mask, scoring_masks, scoring_view
from ..processor import INPUTS_EMBEDS_REFUSED, PendingSelection, S2TLogitsProcessor, forced_scores


logger = logging.get_logger(__name__)

# model inputs the loop passes on itself; anything else `generate` hands over is refused (see `_check_model_kwargs`)
_HANDLED_KWARGS = {
    "attention_mask", "cache", "past_key_values", "use_cache", "cache_position", "position_ids", "logits_to_keep",
}


def _find_processor(logits_processor: LogitsProcessorList, s2t: S2TLogitsProcessor | None) -> S2TLogitsProcessor:
    found = [p for p in logits_processor if isinstance(p, S2TLogitsProcessor)]
    if s2t is None:
        if len(found) != 1:
            raise ValueError(
                "The fused S2T loop needs exactly one `S2TLogitsProcessor`: pass it as `s2t=processor` (and it is "
                f"added to `logits_processor`); found {len(found)} among the logits processors."
            )
        return found[0]
    if not isinstance(s2t, S2TLogitsProcessor):
        raise TypeError(f"`s2t` must be an `S2TLogitsProcessor`, got {type(s2t).__name__}.")
    if s2t not in found:
        raise ValueError("`s2t` must also be among the logits processors; call `s2t_hf.generate`, which adds it.")
    return s2t


# decoding methods a generation config can ask for that S2T does not serve (assisted generation's `assistant_model`
# never reaches a decoding method: `s2t_hf.generate` refuses it)
_REFUSED_MODES = (
    ("prompt_lookup_num_tokens", "prompt-lookup generation"), ("dola_layers", "DoLa decoding"),
    ("penalty_alpha", "contrastive search"),
)


def _check_model_kwargs(model_kwargs: dict[str, Any], generation_config) -> None:
    for name, what in _REFUSED_MODES:
        if getattr(generation_config, name, None) is not None:
            raise ValueError(f"S2T supports greedy search and sampling only, not {what}: remove `{name}`.")
    if getattr(generation_config, "num_beams", 1) != 1:
        raise ValueError("S2T supports greedy search and sampling only, not beam search: set `num_beams=1`.")
    unknown = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _HANDLED_KWARGS)
    if "inputs_embeds" in unknown:
        raise ValueError(INPUTS_EMBEDS_REFUSED)
    if unknown:
        raise ValueError(
            f"The fused S2T loop decodes from `input_ids` and `attention_mask` only; it got {unknown}. Use the drop-in "
            "path (`model.generate(..., logits_processor=[s2t])`) for these inputs."
        )
    if not model_kwargs.get("use_cache", True):
        raise ValueError("The fused S2T loop decodes on a KV cache; remove `use_cache=False`.")


def _append_chosen_slots(cache: Any, view: Any, slots: torch.Tensor, num_slots: int) -> None:
    """Appends each row's chosen slot (keys and values of the fused forward, held by `view`) to the live `cache`."""
    for live, scored in zip(cache.layers, view.layers):
        index = slots.to(scored.keys.device)[:, None, None, None]
        keys = scored.keys[:, :, -num_slots:].gather(2, index.expand(-1, scored.keys.shape[1], 1, scored.keys.shape[3]))
        values = scored.values[:, :, -num_slots:].gather(
            2, index.expand(-1, scored.values.shape[1], 1, scored.values.shape[3])
        )
        live.update(keys, values)  # the layer's own update: it appends, and a sliding layer keeps its window


@torch.no_grad()
def s2t_sample(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    synced_gpus: bool = False,
    streamer: Any = None,
    s2t: S2TLogitsProcessor | None = None,
    s2t_streamer: Any = None,
    **model_kwargs: Any,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """
    Greedy search or sampling with S2T, the candidates of S2T-Local scored inside the decoding forward.

    A decoding method with the signature of transformers' `GenerationMixin._sample`: pass it to `generate` as
    `custom_generate=s2t_sample` together with `s2t=processor`, or call [`s2t_hf.generate`]. Its tokens equal those of
    the drop-in path (`model.generate(..., logits_processor=[s2t])`) for every selection; only S2T-Local with
    `adapter_mode="generate"` (the adapter on while the student generates) is fused. With `adapter_mode="scoring"` the
    next step needs the base model's logits, which a forward with the adapter on cannot give, so the processor scores the
    candidates of the triggered rows in a forward of its own, as in the drop-in path; teacher selection and takeover
    need no student forward. Finished rows ride in the forwards with padding, as in `generate`.

    Args:
        model (`PreTrainedModel`): the student, with a `DynamicCache` (sliding-window layers included).
        input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs:
            as transformers' `generate` passes them to its decoding methods.
        s2t (`S2TLogitsProcessor`, *optional*): the processor; found among `logits_processor` if not given.
        s2t_streamer (`BaseStreamer`, *optional*): the streamer, under the name [`s2t_hf.generate`] passes it (for a
            callable `custom_generate`, transformers passes only the arguments `_sample` does not have).

    Returns:
        `torch.LongTensor` of the sequences, or a `GenerateDecoderOnlyOutput` with `return_dict_in_generate=True`
        (`scores` and `logits` when asked for, as in the drop-in path: at a trigger step `scores` is `-inf` but at the
        selected token, and `logits` are the model's own).
    """
    processor = _find_processor(logits_processor, s2t)
    streamer = streamer if streamer is not None else s2t_streamer
    if synced_gpus:
        raise ValueError("The fused S2T loop does not support `synced_gpus`; run it on one device per process.")
    _check_model_kwargs(model_kwargs, generation_config)
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is None:
        raise ValueError("The fused S2T loop needs the cache `generate` prepares; remove `use_cache=False`.")
    cache_name = cache_argument(model)
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    do_sample = generation_config.do_sample
    return_dict = generation_config.return_dict_in_generate
    scores_out = () if (return_dict and generation_config.output_scores) else None
    logits_out = () if (return_dict and generation_config.output_logits) else None

    batch = input_ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    prefill_positions = positions_from_attention_mask(attention_mask)
    last_position = prefill_positions[:, -1:]  # advanced by one per step: nothing per step grows with the length
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=prefill_positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_name: cache},
    )
    next_logits = outputs.logits[:, -1].to(dtype=torch.float32, device=input_ids.device)
    del outputs
    # the session decides on the filled cache whether candidates can ride in the decoding forwards
    with processor.fused_session(model, cache) as session:
        need_forward = False
        while True:
            if need_forward:
                outputs = model(
                    input_ids=input_ids[:, -1:],
                    attention_mask=attention_mask,
                    position_ids=last_position,
                    use_cache=True,
                    **{cache_name: cache},
                )
                next_logits = outputs.logits[:, -1].to(dtype=torch.float32, device=input_ids.device)
                del outputs
            step_scores = logits_processor(input_ids, next_logits)
            if scores_out is not None:
                scores_out += (step_scores,)
            if logits_out is not None:
                logits_out += (next_logits,)
            if do_sample:
                tokens = torch.multinomial(torch.softmax(step_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(step_scores, dim=-1)
            if has_eos_stopping_criteria:
                tokens = tokens * unfinished + pad_token_id * (1 - unfinished)

            pending = session.take_pending()
            need_forward = pending is None
            if pending is not None:
                tokens, next_logits = _fused_step(model, session, cache, attention_mask, last_position + 1, tokens, pending)
                if scores_out is not None:  # as in the drop-in path: a triggered row's scores keep the selection only
                    scores_out = scores_out[:-1] + (forced_scores(step_scores, tokens, pending.triggered),)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            last_position = last_position + 1
            if streamer is not None:
                streamer.put(tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores_out)
            if unfinished.max() == 0:
                break
    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    output = GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores_out, logits=logits_out)
    setattr(output, "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values", cache)
    return output


def _fused_step(
    model: torch.nn.Module,
    session: FusedSession,
    cache: Any,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    tokens: torch.Tensor,
    pending: PendingSelection,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One forward that scores the triggered rows' candidates and yields every row's next-step logits.

    Returns:
        `(tokens, next_logits)`: every row's token of this step (the selector's choice in triggered rows) and the
        logits after it, shape `(batch,)` and `(batch, vocab)`.
    """
    triggered = pending.triggered
    slots = torch.where(triggered[:, None], pending.candidate_ids, tokens[:, None])
    num_slots = slots.shape[1]
    view = scoring_view(cache)
    mask = scoring_masks(model, view, attention_mask, num_slots, False, model_dtype(model))
    with session.scoring_forward():
        logits = model(
            input_ids=slots,
            attention_mask=mask,
            position_ids=positions.expand(-1, num_slots),
            use_cache=True,
            **{cache_argument(model): view},
        ).logits
    chosen, positions_chosen = session.complete(pending, logits[triggered])
    slot = torch.zeros_like(tokens)
    slot[triggered] = positions_chosen
    tokens = torch.where(triggered, chosen, tokens)
    _append_chosen_slots(cache, view, slot, num_slots)
    next_attention = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
    rows = torch.arange(tokens.shape[0], device=logits.device)
    next_logits = logits[rows, slot.to(logits.device)].to(dtype=torch.float32, device=tokens.device)
    session.note_forward(cache, next_attention, positions, next_logits)
    return tokens, next_logits
