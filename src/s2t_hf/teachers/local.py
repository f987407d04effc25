"""[`LocalTeacher`]: a transformers model as the teacher, in this process, and [`as_teacher`], which wraps a model in
it.

The local teacher keeps its own KV cache that catches up on every token since its last call in one forward (lazy
teacher). `S2TLogitsProcessor(teacher=model)` wraps a model in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from ..kv import cache_argument, model_device, output_rows, positions_from_attention_mask, unwrap_model
from ..selection import takeover_selection, teacher_selection
from .base import Teacher, TeacherChoice, vocabulary_difference


__all__ = ["LocalTeacher", "as_teacher"]


class LocalTeacher(Teacher):
    r"""
    A transformers causal LM as the teacher, in this process. It may sit on another device and dtype than the student;
    probabilities are compared in float32 on the student's device.

    It keeps its own KV cache across the steps of one `generate` call: each call encodes only the tokens since the
    previous one (one forward, so a teacher consulted only at trigger steps catches up lazily).

    Args:
        model (`PreTrainedModel`):
            The teacher model (a PEFT model is unwrapped).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The shared tokenizer. Needed only when the teacher's and the student's output sizes differ (padded
            vocabularies): only the tokenizer's ids are compared then.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf.teachers import LocalTeacher
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> _ = torch.manual_seed(0)
    >>> student, model = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    >>> teacher = LocalTeacher(model)
    >>> teacher.prepare(student)
    >>> ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    >>> choice = teacher.select(ids, mask, torch.tensor([0]), torch.tensor([[8, 9, 10]]), torch.ones(1, 3, dtype=bool))
    >>> int(choice.token_ids[0]) in (8, 9, 10), teacher.calls
    (True, 1)

    ```
    """

    full_distribution = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"`model` must be a transformers model (`PreTrainedModel`), got {type(model).__name__}. For a served "
                "teacher use `RemoteTeacher`."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size: int | None = None
        self.comparable_vocab: int | None = None
        self.teacher_rows: int | None = None
        self.blocked_ids = torch.zeros(0, dtype=torch.long)
        self.reset()

    def prepare(self, student: torch.nn.Module, tokenizer: Any = None, blocked_ids: Sequence[int] = ()) -> None:
        super().prepare(student, tokenizer, blocked_ids)
        if model_device(unwrap_model(self.model)).type == "meta":
            raise ValueError(
                "The teacher's weights are on the `meta` device (an empty model, e.g. built under `init_empty_weights` "
                "or loaded with an offloading `device_map` that left them unmaterialised). Load its weights onto a real "
                "device, e.g. `from_pretrained(..., device_map='auto')` or `.to('cuda')`."
            )
        if tokenizer is not None and self.tokenizer is not None:
            difference = vocabulary_difference(tokenizer, self.tokenizer)
            if difference is not None:
                raise ValueError(
                    f"The teacher's tokenizer is not the student's: {difference}. S2T compares the two models' "
                    "probabilities token by token, so they must share a tokenizer; a teacher of another model family "
                    "is not supported yet. Pick a teacher that uses the student's tokenizer."
                )
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        student_vocab = output_rows(unwrap_model(student))
        teacher_vocab = output_rows(unwrap_model(self.model))
        self.vocab_size = self.comparable_vocab = student_vocab
        self.teacher_rows = teacher_vocab
        if teacher_vocab == student_vocab:
            return
        size = len(tokenizer) if tokenizer is not None else None
        if size is not None and size <= min(teacher_vocab, student_vocab):
            # Padded vocabularies of one tokenizer (e.g. Qwen2.5-1.5B with 151936 rows and 32B with 152064):
            # compare on the tokenizer's ids only.
            self.comparable_vocab = size
            return
        raise ValueError(
            f"The teacher has {teacher_vocab} output rows but the student has {student_vocab}. S2T compares their "
            "probabilities token by token, so both must use the same tokenizer. If they do and only the padding of "
            "the output layer differs, pass `tokenizer=` so only the tokenizer's ids are compared."
        )

    def reset(self) -> None:
        super().reset()
        self._cache = None
        self._seen = 0
        self._last: torch.Tensor | None = None

    @property
    def cached_tokens(self) -> int:
        """Tokens in the teacher's KV cache of the current generation."""
        return int(self._cache.get_seq_length()) if self._cache is not None else 0

    def _check_prepared(self) -> None:
        if self.vocab_size is None:
            raise RuntimeError("Call `teacher.prepare(student)` before using the teacher (the processor does it).")

    def _to_student_vocab(self, logits: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Log-probabilities on the student's indexing: rows beyond the comparable vocabulary and blocked rows out."""
        logits = logits.to(device=device, dtype=torch.float32)
        full = torch.full((*logits.shape[:-1], self.vocab_size), float("-inf"), device=logits.device)
        full[..., : self.comparable_vocab] = logits[..., : self.comparable_vocab]
        if self.blocked_ids.numel():
            full.index_fill_(-1, self.blocked_ids.to(full.device), float("-inf"))
        return torch.log_softmax(full, dim=-1)

    def next_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Advances the teacher's cache to the current prefix and returns its log-probabilities (float32)."""
        self._check_prepared()
        if self._last is not None and self._seen == input_ids.shape[1]:
            return self._last  # already asked at this step (e.g. by the `kl` trigger)
        teacher = unwrap_model(self.model)
        device = model_device(teacher)
        if self._cache is None:
            self._cache = DynamicCache(config=teacher.config)
            self._seen = 0
        new_ids = input_ids[:, self._seen :]
        # only a student with more output rows than the teacher can emit an id the teacher lacks (one sync then)
        largest = int(new_ids.max()) if self.teacher_rows < self.vocab_size and new_ids.numel() else -1
        if largest >= self.teacher_rows:
            raise ValueError(
                f"The student generated token id {largest}, a padding row of its output layer beyond the "
                f"teacher's {self.teacher_rows} rows, so the teacher cannot read it. Keep the student off the rows "
                f"above the tokenizer: `generate(..., suppress_tokens=list(range({self.comparable_vocab}, "
                f"{self.vocab_size})))`."
            )
        positions = positions_from_attention_mask(attention_mask)[:, self._seen :]
        with torch.no_grad():
            logits = teacher(
                input_ids=new_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_argument(teacher): self._cache},
            ).logits[:, -1]
        self.calls += 1
        self.tokens += int(new_ids.shape[1])
        self._seen = input_ids.shape[1]
        self._last = self._to_student_vocab(logits, input_ids.device)
        return self._last

    def select(self, input_ids, attention_mask, rows, candidate_ids, valid, *, with_log_probs=False) -> TeacherChoice:
        log_probs = self.next_log_probs(input_ids, attention_mask)[rows]
        positions = teacher_selection(candidate_ids, valid, log_probs)
        return TeacherChoice(
            token_ids=candidate_ids.gather(-1, positions[:, None])[:, 0],
            positions=positions,
            top1=log_probs.argmax(-1),
            candidate_log_probs=log_probs.gather(-1, candidate_ids),
        )

    def takeover(
        self, input_ids, attention_mask, rows, candidate_ids=None, *, allowed=None, with_log_probs=False
    ) -> TeacherChoice:
        log_probs = self.next_log_probs(input_ids, attention_mask)[rows]
        token_ids = takeover_selection(log_probs, allowed=allowed)
        return TeacherChoice(
            token_ids=token_ids,
            top1=log_probs.argmax(-1),
            candidate_log_probs=log_probs.gather(-1, candidate_ids) if candidate_ids is not None else None,
        )

    def candidate_log_probs(self, input_ids, attention_mask, rows, candidate_ids) -> torch.Tensor:
        return self.next_log_probs(input_ids, attention_mask)[rows].gather(-1, candidate_ids)

    @torch.no_grad()
    def trajectory_log_probs(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_new: int
    ) -> torch.Tensor:
        """
        Teacher-forced log-probabilities at the last `num_new` positions of `sequences` (one forward, no cache), on
        the student's indexing, shape `(batch, num_new, vocab)` (float32, on `sequences`' device).
        """
        self._check_prepared()
        teacher = unwrap_model(self.model)
        device = model_device(teacher)
        positions = positions_from_attention_mask(attention_mask)
        logits = teacher(
            input_ids=sequences.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            logits_to_keep=num_new,
        ).logits
        self.calls += 1
        self.tokens += int(attention_mask.sum())
        return self._to_student_vocab(logits.to(sequences.device), sequences.device)

    def score_trajectories(self, trajectories, positions, candidate_ids):
        rows = sorted({int(b) for b in positions[:, 0].tolist()})
        index = {b: i for i, b in enumerate(rows)}
        lengths = [len(trajectories[b]) for b in rows]
        width = max(lengths)
        pad = 0
        device = candidate_ids.device
        sequences = torch.tensor([[pad] * (width - n) + list(trajectories[b]) for b, n in zip(rows, lengths)],
                                 device=device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
        log_probs = self.trajectory_log_probs(sequences, mask, width)
        batch_rows = torch.tensor([index[int(b)] for b in positions[:, 0].tolist()], device=device)
        # after the first t tokens of a row of length n: column width - n + t - 1 of the padded batch
        cols = [width - lengths[index[int(b)]] + int(t) - 1 for b, t in positions.tolist()]
        cols = torch.tensor(cols, device=device)
        selected = log_probs[batch_rows, cols]
        return selected.gather(-1, candidate_ids), selected.argmax(-1)

def as_teacher(teacher: Any, tokenizer: Any = None) -> Teacher | None:
    """A [`Teacher`] from a `Teacher` (returned as is), a transformers model (wrapped in a [`LocalTeacher`]), or
    `None`."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, torch.nn.Module):
        return LocalTeacher(teacher, tokenizer=tokenizer)
    raise TypeError(
        f"`teacher` must be a transformers model or a `Teacher` (`LocalTeacher`, `RemoteTeacher`), got "
        f"{type(teacher).__name__}."
    )
