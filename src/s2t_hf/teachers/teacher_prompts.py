"""Teacher prompts: the teacher may read another prompt than the student's (its own chat template, a system prompt,
privileged information such as the reference solution), followed by the student's continuation.

A teacher prompt is a string (the teacher's text as is; the teacher's tokenizer adds its BOS token where it does by
default) or a list of chat messages (`[{"role": "user", "content": ...}]`, rendered with the teacher tokenizer's own
chat template and its generation prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union


__all__ = ["RenderedPrompt", "TeacherPrompt", "check_teacher_prompts", "leading_special_ids", "render_teacher_prompt",
           "rows_of_prompts"]

TeacherPrompt = Union[str, Sequence[dict]]


@dataclass
class RenderedPrompt:
    """
    A teacher prompt on the teacher's side: `prefix_ids` (tokens before the text, e.g. the BOS token a plain-string
    prompt gets) and `text` (the rest, special tokens of a chat template included as text).
    """

    prefix_ids: list[int]
    text: str

    def token_ids(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids under `tokenizer`."""
        return [*self.prefix_ids, *tokenizer(self.text, add_special_tokens=False)["input_ids"]]


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The tokens `tokenizer` puts before a text by default (its BOS token, for most causal LMs)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def check_teacher_prompts(prompts: Sequence[TeacherPrompt] | None, argument: str = "teacher_prompts") -> list | None:
    """Checks that `prompts` is a list of strings or of chat-message lists, and returns it as a list."""
    if prompts is None:
        return None
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"`{argument}` must be a list with one teacher prompt per prompt row (a string, or a list of chat messages "
            f"`{{'role': ..., 'content': ...}}`), got {type(prompts).__name__}."
        )
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            continue
        if (
            isinstance(prompt, Sequence)
            and prompt
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
        ):
            continue
        raise TypeError(
            f"`{argument}[{i}]` must be a string or a non-empty list of chat messages with 'role' and 'content', got "
            f"{prompt!r:.80}."
        )
    return list(prompts)


def render_teacher_prompt(prompt: TeacherPrompt, tokenizer: Any) -> RenderedPrompt:
    """
    A teacher prompt on the teacher's side: a string as is, after the teacher tokenizer's BOS token where it adds
    one; chat messages through the teacher tokenizer's chat template with its generation prompt.

    Examples:

    ```python
    >>> from s2t_hf.tasks import build_tokenizer
    >>> from s2t_hf.teachers.teacher_prompts import render_teacher_prompt
    >>> tokenizer = build_tokenizer()
    >>> render_teacher_prompt([{"role": "user", "content": "tom has 5 apples ."}], tokenizer).text
    '<bos> <user> tom has 5 apples . <assistant>'

    ```
    """
    if isinstance(prompt, str):
        return RenderedPrompt(leading_special_ids(tokenizer), prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "A teacher prompt given as chat messages needs the teacher tokenizer's chat template, and it has none. "
            "Give the teacher prompt as a string instead."
        )
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return RenderedPrompt([], text)


def rows_of_prompts(prompts: list, batch: int) -> list:
    """One teacher prompt per batch row: `prompts` as is, or each repeated when `generate` expands every prompt into
    several rows (`num_return_sequences`, `num_beams`)."""
    if len(prompts) == batch:
        return prompts
    if prompts and batch % len(prompts) == 0:
        repeat = batch // len(prompts)
        return [prompt for prompt in prompts for _ in range(repeat)]
    raise ValueError(
        f"`teacher_prompts` has {len(prompts)} prompts but the batch has {batch} rows: give one teacher prompt per "
        "prompt, in the order of the prompts."
    )
