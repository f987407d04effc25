"""Fused S2T decoding: [`generate`] (a plain function), [`s2t_sample`] (the decoding method) and
`CUSTOM_GENERATE_PATH`, the folder that ships the loop for transformers' `custom_generate` mechanism; and
[`generate_batched`], batched generation for many prompts (plain `generate`, or the fused loop with `s2t=...`)."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from ..processor import S2TLogitsProcessor
from .batched import generate_batched
from .loop import s2t_sample


__all__ = ["CUSTOM_GENERATE_PATH", "generate", "generate_batched", "s2t_sample"]

# `model.generate(..., custom_generate=CUSTOM_GENERATE_PATH, trust_remote_code=True, s2t=processor)` loads
# `custom_generate/generate.py` from this folder (a Hub repository with the same layout works alike).
CUSTOM_GENERATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub")


def generate(model: torch.nn.Module, s2t: S2TLogitsProcessor, **generate_kwargs: Any) -> Any:
    """
    `model.generate(**generate_kwargs)` with S2T, S2T-Local's candidate scoring folded into the decoding forward.

    The tokens equal those of `model.generate(**generate_kwargs, logits_processor=[s2t])`; a trigger step of S2T-Local
    costs one forward instead of two. Every other `generate` argument (constraints, warpers, stopping criteria,
    streamers) works as in `generate`, which prepares them; see [`s2t_sample`] for what the loop does.

    Args:
        model (`PreTrainedModel`): the student, the model `s2t` was built for.
        s2t (`S2TLogitsProcessor`): the processor; it is added to `logits_processor` if it is not there.
        generate_kwargs: arguments of `model.generate` (`input_ids`, `attention_mask`, `max_new_tokens`, ...).

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> import s2t_hf
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> selector = s2t_hf.S2TSelector.create(model, bin_token_ids=list(range(56, 64)))
    >>> with s2t_hf.S2TLogitsProcessor(model, selector=selector, selection="local", trigger="always",
    ...                                top_k=4) as s2t:
    ...     fused = s2t_hf.generate(model, s2t, input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=6,
    ...                             do_sample=False)
    ...     plain = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False,
    ...                            logits_processor=[s2t])
    >>> torch.equal(fused, plain)
    True

    ```
    """
    if not isinstance(s2t, S2TLogitsProcessor):
        raise TypeError(f"`s2t` must be an `S2TLogitsProcessor`, got {type(s2t).__name__}.")
    if "custom_generate" in generate_kwargs:
        raise ValueError("`s2t_hf.generate` sets `custom_generate` itself; remove it from the arguments.")
    # the other refused decoding methods are in the generation config, checked by the decoding method itself
    if generate_kwargs.get("assistant_model") is not None:
        raise ValueError(
            "S2T supports greedy search and sampling only, not assisted generation: remove `assistant_model`."
        )
    # transformers hands a callable `custom_generate` only the arguments `_sample` lacks, and drops the tokenizer: the
    # streamer goes by another name, stop strings as a stopping criterion built here
    streamer = generate_kwargs.get("streamer")
    if streamer is not None:
        generate_kwargs["s2t_streamer"] = streamer
    _stop_strings_as_criteria(model, generate_kwargs)
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    if s2t not in processors:
        processors.append(s2t)
    return model.generate(**generate_kwargs, logits_processor=processors, custom_generate=s2t_sample, s2t=s2t)


def _stop_strings_as_criteria(model: torch.nn.Module, generate_kwargs: dict[str, Any]) -> None:
    """Moves `stop_strings` (argument or generation config) into `stopping_criteria`, with the `tokenizer` given."""
    tokenizer = generate_kwargs.pop("tokenizer", None)
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    stop_strings = generate_kwargs.pop("stop_strings", None) or getattr(config, "stop_strings", None)
    if not stop_strings:
        return
    if tokenizer is None:
        raise ValueError("`stop_strings` need the model's tokenizer: pass `tokenizer=...` as well.")
    if getattr(config, "stop_strings", None):
        config = copy.deepcopy(config)
        config.stop_strings = None
        generate_kwargs["generation_config"] = config
    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    generate_kwargs["stopping_criteria"] = criteria
