"""[`LocalTeacher`]: a transformers model as the teacher, in this process, and [`as_teacher`], which wraps a model in
it.

The local teacher keeps its own KV cache that catches up on every token since its last call in one forward (lazy
teacher). `S2TLogitsProcessor(teacher=model)` wraps a model in it. A teacher with another tokenizer than the student's
scores the candidates as text ([`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer`], chosen once in `prepare`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from ..kv import cache_argument, model_device, output_rows, positions_from_attention_mask, unwrap_model
from ..selection import takeover_selection, teacher_selection
from .base import Teacher, TeacherChoice
from .cross_tokenizer import CrossTokenizerScorer, generation_end_ids, uses_text_scoring
from .teacher_prompts import check_teacher_prompts, render_teacher_prompt
from .token_text import end_token_ids


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
            The teacher's tokenizer. When it is not the student's (another model family, checked on the vocabularies
            against the student's tokenizer given to the processor), the teacher scores the student's candidates as
            text under its own tokenizer ([`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer`]). With the
            student's tokenizer it is needed only when the two output layers are padded differently.
        candidate_scoring (`str`, *optional*, defaults to `"auto"`):
            `"tokens"` compares the two models token by token (one tokenizer), `"text"` scores candidates as strings
            under the teacher's tokenizer (any two tokenizers; the `kl` trigger is not available), `"auto"` picks
            `"text"` exactly when the tokenizers differ.

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
    reads_teacher_prompts = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, candidate_scoring: str = "auto"):
        super().__init__()
        if candidate_scoring not in ("auto", "tokens", "text"):
            raise ValueError(f"`candidate_scoring` must be 'auto', 'tokens' or 'text', got {candidate_scoring!r}.")
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
        self.candidate_scoring = candidate_scoring
        #: Set by `prepare` when the teacher scores candidates as text (another tokenizer).
        self.text_scorer: CrossTokenizerScorer | None = None
        self.prompt_block: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset()

    def prepare(self, student: torch.nn.Module, tokenizer: Any = None, blocked_ids: Sequence[int] = ()) -> None:
        super().prepare(student, tokenizer, blocked_ids)
        if model_device(unwrap_model(self.model)).type == "meta":
            raise ValueError(
                "The teacher's weights are on the `meta` device (an empty model, e.g. built under `init_empty_weights` "
                "or loaded with an offloading `device_map` that left them unmaterialised). Load its weights onto a real "
                "device, e.g. `from_pretrained(..., device_map='auto')` or `.to('cuda')`."
            )
        student_vocab = output_rows(unwrap_model(student))
        teacher_vocab = output_rows(unwrap_model(self.model))
        self.vocab_size = self.comparable_vocab = student_vocab
        self.teacher_rows = teacher_vocab
        self.text_scorer = None
        self.full_distribution = True
        if uses_text_scoring(self.candidate_scoring, tokenizer, self.tokenizer):
            self._prepare_text_scoring(student, tokenizer)
            return
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if teacher_vocab == student_vocab:
            return
        self._check_same_family(student, tokenizer)
        size = len(tokenizer) if tokenizer is not None else None
        if size is not None and size <= min(teacher_vocab, student_vocab):
            # Padded vocabularies of one tokenizer (e.g. Qwen2.5-1.5B with 151936 rows and 32B with 152064):
            # compare on the tokenizer's ids only.
            self.comparable_vocab = size
            return
        raise ValueError(
            f"The teacher has {teacher_vocab} output rows but the student has {student_vocab}. Compared token by "
            "token, they need the same tokenizer: if they share one and only the padding of the output layer differs, "
            "pass `tokenizer=` so only the tokenizer's ids are compared; if the teacher has its own tokenizer, pass "
            "it, `LocalTeacher(model, tokenizer=teacher_tokenizer)`, and the candidates are scored as text."
        )

    def _prepare_text_scoring(self, student: torch.nn.Module, tokenizer: Any) -> None:
        if tokenizer is None or self.tokenizer is None:
            raise ValueError(
                "Scoring the candidates as text needs both tokenizers: the teacher's as "
                "`LocalTeacher(model, tokenizer=teacher_tokenizer)` and the student's as `tokenizer=` of the processor "
                "(or of `collect_selection_data`)."
            )
        self.text_scorer = CrossTokenizerScorer(
            self.model, self.tokenizer, tokenizer, generation_end_ids(student), counters=self
        )
        self.full_distribution = False  # its distribution is over another vocabulary

    def _check_same_family(self, student: torch.nn.Module, tokenizer: Any) -> None:
        """A teacher given without its tokenizer whose end tokens are none of the student's has another tokenizer."""
        teacher = unwrap_model(self.model)
        config_eos = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
        if config_eos is None:
            config_eos = getattr(teacher.config, "eos_token_id", None)
        teacher_eos = {config_eos} if isinstance(config_eos, int) else set(config_eos or [])
        student_ends = set(end_token_ids(tokenizer)) if tokenizer is not None else set()
        if not teacher_eos or not student_ends:
            return
        if not teacher_eos & student_ends:
            raise ValueError(
                f"The teacher's end tokens {sorted(teacher_eos)} are none of the student tokenizer's "
                f"{sorted(student_ends)}, and its output layer has {self.teacher_rows} rows against the student's "
                f"{self.vocab_size}: it has another tokenizer. Pass it: `LocalTeacher(model, "
                "tokenizer=teacher_tokenizer)`, and the student's tokenizer as the processor's `tokenizer=`; the "
                "candidates are then scored as text."
            )

    def reset(self) -> None:
        super().reset()
        self._cache = None
        self._seen = 0
        self._last: torch.Tensor | None = None
        if self.text_scorer is not None:
            self.text_scorer.reset()

    def begin(self, prompt_lengths, teacher_prompts=None) -> None:
        teacher_prompts = check_teacher_prompts(teacher_prompts)
        super().begin(prompt_lengths, teacher_prompts)
        self.prompt_block = None
        if self.text_scorer is not None:
            self.text_scorer.set_prompts(teacher_prompts)
            return
        if teacher_prompts is None:
            return
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError(
                "`teacher_prompts` need the teacher's tokenizer: `LocalTeacher(model, tokenizer=...)` (or the "
                "processor's `tokenizer=` when the teacher shares it)."
            )
        rows = [render_teacher_prompt(p, tokenizer).token_ids(tokenizer) for p in teacher_prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        self.prompt_block = (ids, mask)

    def teacher_view(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The sequences as the teacher reads them: with teacher prompts, each row's teacher prompt (left padded) in
        place of the student's prompt (the first `prompt_lengths` columns); otherwise as given.
        """
        if self.prompt_block is None:
            return input_ids, attention_mask
        ids, mask = self.prompt_block
        if ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} teacher prompts for a batch of {input_ids.shape[0]} rows.")
        start = self.prompt_lengths[0]
        return (
            torch.cat([ids.to(input_ids.device), input_ids[:, start:]], dim=1),
            torch.cat([mask.to(attention_mask.device), attention_mask[:, start:]], dim=1),
        )

    def _text_scores(self, input_ids, attention_mask, rows, candidate_ids, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """Text scoring of the triggered rows' candidates: `(log_probs (n, K), unscored (n,))`."""
        log_probs, unscored = [], []
        for row, candidates, ok in zip(rows.tolist(), candidate_ids.tolist(), valid.tolist()):
            prompt, continuation = self.row_tokens(input_ids, attention_mask, row)
            scores = self.text_scorer.score(row, prompt, continuation, candidates, ok)
            log_probs.append(scores.log_probs)
            unscored.append(not scores.scored)
        device = candidate_ids.device
        return (
            torch.tensor(log_probs, dtype=torch.float32, device=device).reshape(candidate_ids.shape),
            torch.tensor(unscored, dtype=torch.bool, device=device),
        )

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
        if self.text_scorer is not None:
            raise NotImplementedError(
                "This teacher has another tokenizer than the student: its distribution is over its own vocabulary, so "
                "the `kl` trigger and `lazy_teacher=False` cannot compare it with the student's. Use the `entropy` or "
                "`learned` trigger (or `random`)."
            )
        input_ids, attention_mask = self.teacher_view(input_ids, attention_mask)
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
        if self.text_scorer is not None:
            scores, unscored = self._text_scores(input_ids, attention_mask, rows, candidate_ids, valid)
            positions = scores.masked_fill(~valid, float("-inf")).argmax(-1).masked_fill(unscored, 0)
            return TeacherChoice(
                token_ids=candidate_ids.gather(-1, positions[:, None])[:, 0],
                positions=positions,
                candidate_log_probs=scores.masked_fill(unscored[:, None], float("nan")),
                unscored=unscored,
            )
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
        if self.text_scorer is not None:
            tokens = []
            for n, row in enumerate(rows.tolist()):
                prompt, continuation = self.row_tokens(input_ids, attention_mask, row)
                token = self.text_scorer.greedy_token(
                    row, prompt, continuation, allowed=allowed[n] if allowed is not None else None
                )
                tokens.append(-1 if token is None else token)
            token_ids = torch.tensor(tokens, dtype=torch.long, device=input_ids.device)
            candidate_log_probs = None
            if with_log_probs and candidate_ids is not None:
                candidate_log_probs, _ = self._text_scores(
                    input_ids, attention_mask, rows, candidate_ids, torch.ones_like(candidate_ids, dtype=torch.bool)
                )
            return TeacherChoice(token_ids=token_ids, candidate_log_probs=candidate_log_probs, unscored=token_ids < 0)
        log_probs = self.next_log_probs(input_ids, attention_mask)[rows]
        token_ids = takeover_selection(log_probs, allowed=allowed)
        return TeacherChoice(
            token_ids=token_ids,
            top1=log_probs.argmax(-1),
            candidate_log_probs=log_probs.gather(-1, candidate_ids) if candidate_ids is not None else None,
        )

    def candidate_log_probs(self, input_ids, attention_mask, rows, candidate_ids) -> torch.Tensor:
        if self.text_scorer is not None:
            valid = torch.ones_like(candidate_ids, dtype=torch.bool)
            scores, unscored = self._text_scores(input_ids, attention_mask, rows, candidate_ids, valid)
            return scores.masked_fill(unscored[:, None], float("nan"))
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
        if self.text_scorer is not None:
            raise NotImplementedError(
                "This teacher has another tokenizer than the student: it scores candidates as text "
                "(`score_trajectories`) and has no distribution over the student's vocabulary."
            )
        sequences, attention_mask = self.teacher_view(sequences, attention_mask)
        return self._forced_log_probs(sequences, attention_mask, num_new)

    @torch.no_grad()
    def _forced_log_probs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
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
        prompt_lengths = self.prompt_lengths or [0] * len(trajectories)
        if self.text_scorer is not None:
            log_probs = []
            for (b, t), candidates in zip(positions.tolist(), candidate_ids.tolist()):
                prompt, continuation = trajectories[b][: prompt_lengths[b]], trajectories[b][prompt_lengths[b] : t]
                log_probs.append(self.text_scorer.score(b, prompt, continuation, candidates, [True] * len(candidates)))
            values = torch.tensor([s.log_probs for s in log_probs], dtype=torch.float32, device=candidate_ids.device)
            unscored = torch.tensor([not s.scored for s in log_probs], dtype=torch.bool, device=candidate_ids.device)
            top1 = torch.full_like(candidate_ids[:, 0], -1)
            return values.reshape(candidate_ids.shape).masked_fill(unscored[:, None], float("nan")), top1
        if self.prompt_block is not None:
            # the teacher's prompt in place of the student's, the positions shifted by the difference
            teacher_prompts = [[int(i) for i, m in zip(ids, mask) if m] for ids, mask in zip(*self.prompt_block)]
            shift = [len(p) - n for p, n in zip(teacher_prompts, prompt_lengths)]
            trajectories = [p + list(t[n:]) for p, t, n in zip(teacher_prompts, trajectories, prompt_lengths)]
            positions = positions.clone()
            positions[:, 1] += torch.tensor([shift[int(b)] for b in positions[:, 0].tolist()], dtype=positions.dtype)
        rows = sorted({int(b) for b in positions[:, 0].tolist()})
        index = {b: i for i, b in enumerate(rows)}
        lengths = [len(trajectories[b]) for b in rows]
        width = max(lengths)
        pad = 0
        device = candidate_ids.device
        sequences = torch.tensor([[pad] * (width - n) + list(trajectories[b]) for b, n in zip(rows, lengths)],
                                 device=device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
        log_probs = self._forced_log_probs(sequences, mask, width)
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
