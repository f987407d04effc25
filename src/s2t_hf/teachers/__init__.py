"""Teachers: what S2T decoding and selection-group collection ask of a teacher, behind one interface.

A [`Teacher`] answers, for the *triggered rows* of a decoding step, which of the student's candidates it prefers
([`~Teacher.select`]), its own next token ([`~Teacher.takeover`]) and its log-probabilities of given candidates
([`~Teacher.candidate_log_probs`]); for data collection it scores whole trajectories
([`~Teacher.score_trajectories`]). Only a teacher with `full_distribution = True` also gives its distribution over the
whole vocabulary at every row ([`~Teacher.next_log_probs`]), which the `kl` trigger needs.

Two implementations:

- [`LocalTeacher`]: a transformers model in this process, with its own KV cache that catches up on every token since
  its last call in one forward (lazy teacher). `S2TLogitsProcessor(teacher=model)` wraps a model in it.
- [`RemoteTeacher`]: a model served by vLLM (or another server of the OpenAI-compatible `/v1/completions` API that
  accepts token-id prompts and vLLM's sampling extensions). The S2T choice is one constrained greedy token
  (`allowed_token_ids=<candidates>`, `temperature=0`, `max_tokens=1`); Takeover is one plain greedy token;
  teacher-forced collection reads `prompt_logprobs`. See `docs/serving.md`.

The modules:

- `base`: the interface, [`Teacher`] and its answer [`TeacherChoice`]; [`vocabulary_difference`], the check that a
  teacher's tokenizer is the student's;
- `local`: [`LocalTeacher`] and [`as_teacher`];
- `remote`: [`RemoteTeacher`], the vLLM protocol (what to ask, how to read the answers), and [`RemoteTeacherError`];
- `transport`: [`~transport.JSONClient`], a small JSON-over-HTTP client (connections, retries, timeouts, the thread
  pool), which knows nothing of vLLM.
"""

from .base import Teacher, TeacherChoice, vocabulary_difference
from .local import LocalTeacher, as_teacher
from .remote import RemoteTeacher, RemoteTeacherError


__all__ = [
    "LocalTeacher", "RemoteTeacher", "RemoteTeacherError", "Teacher", "TeacherChoice", "as_teacher",
    "vocabulary_difference",
]
