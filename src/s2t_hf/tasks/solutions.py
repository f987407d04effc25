"""The model's solutions to arithmetic problems, batched and greedy by default, and their accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel

from ..generation import generate_batched
from ..prompts import prompt_token_ids
from .arithmetic import ArithmeticProblem, ArithmeticTaskConfig, check_answer


__all__ = ["evaluate_greedy", "generate_solutions", "problem_prompt_ids"]


def problem_prompt_ids(tokenizer, problems: Sequence[ArithmeticProblem]) -> list[list[int]]:
    """Each problem's prompt: its chat applied to the tokenizer's chat template (the bare text without a template)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return prompt_token_ids(
        [p.messages if has_template else p.text for p in problems], tokenizer, chat_template=has_template,
        add_special_tokens=False, name="problems",
    )


def generate_solutions(
    model: PreTrainedModel,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    show_progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """
    Generate a solution for each problem with [`s2t_hf.generate_batched`]: batches of left-padded prompts, greedy by
    default.

    The prompt is the tokenizer's chat template applied to the problem text (the bare text if the tokenizer has no
    template). Embedding rows above the tokenizer's vocabulary are never generated.

    Args:
        model (`PreTrainedModel`):
            A causal LM.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer (its `padding_side` does not matter: prompts are padded on the left).
        problems (`Sequence[ArithmeticProblem]`):
            The problems (anything with `.text` and `.messages`).
        batch_size (`int`, *optional*, defaults to `64`):
            Problems per `generate` call.
        max_new_tokens (`int`, *optional*):
            Defaults to the longest possible solution of the default task plus one.
        show_progress (`bool`, *optional*, defaults to `False`):
            Show a tqdm bar over problems.
        generate_kwargs (`dict`, *optional*):
            Passed to `generate_batched` and on to `model.generate` (e.g. `logits_processor=[...]`, `do_sample=True`;
            `s2t=processor` decodes with the fused S2T loop).

    Returns:
        `list[str]`: The completions, special tokens removed, in the order of `problems`.
    """
    if not problems:
        return []
    max_new_tokens = max_new_tokens or ArithmeticTaskConfig().max_solution_words + 1
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    if vocab_rows > len(tokenizer) and "suppress_tokens" not in generate_kwargs:
        generate_kwargs["suppress_tokens"] = list(range(len(tokenizer), vocab_rows))
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("desc", "solutions")
    was_training = model.training
    model.eval()
    try:
        return generate_batched(
            model, problem_prompt_ids(tokenizer, problems), tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, show_progress=show_progress,
            **generate_kwargs,
        )  # type: ignore[return-value]
    finally:
        model.train(was_training)


def evaluate_greedy(
    model: PreTrainedModel,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    **generate_kwargs: Any,
) -> float:
    """
    Greedy accuracy of `model` on `problems`: the share of completions whose final answer is right.

    Args:
        model (`PreTrainedModel`):
            A causal LM.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer.
        problems (`Sequence[ArithmeticProblem]`):
            The problems (anything with `.text`, `.messages` and `.answer`).
        batch_size (`int`, *optional*, defaults to `64`):
            Problems per `generate` call.
        max_new_tokens (`int`, *optional*):
            Defaults to the longest possible solution plus one.
        generate_kwargs (`dict`, *optional*):
            Passed to `model.generate`, e.g. `logits_processor=[s2t]` to measure S2T decoding.

    Returns:
        `float`: Accuracy in [0, 1] (0 for no problems).

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf.tasks import build_tokenizer, evaluate_greedy, generate_problems
    >>> tokenizer = build_tokenizer()
    >>> config = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> evaluate_greedy(model, tokenizer, generate_problems(4), max_new_tokens=4)
    0.0
    ```
    """
    if not problems:
        return 0.0
    completions = generate_solutions(model, tokenizer, problems, batch_size, max_new_tokens, **generate_kwargs)
    return sum(check_answer(c, p.answer) for c, p in zip(completions, problems)) / len(problems)
