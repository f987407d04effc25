"""Property-based tests (hypothesis) of `S2TLogitsProcessor` inside `model.generate` on tiny models: batch sizes, left
padding, EOS timing, K, candidate ratios, triggers, selections (teacher, takeover, local with a randomised selector)
and bfloat16 models.

- Other processors' masks hold: a token that `suppress_tokens` / `bad_words_ids` (or the selector's reserved bins) set
  to `-inf` is never generated, at triggered steps included.
- Batching changes nothing: every row of a left-padded batch generates what its prompt generates alone, as long as
  every decision of the batch-1 run (greedy top-2, entropy vs threshold, top-K boundary, ratio boundary, selection)
  has a margin of at least `MARGIN`. Padding moves float32 logits by ~1e-6 here, so a near-tie could flip a token
  without a bug; the comparison stops before such a step, never elsewhere.

Each example runs a few `generate` calls, so these tests take half of the profile's `max_examples`.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import EOS, PAD, VOCAB, tiny_model
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_processor_local import BINS, trained_like_selector

from s2t_hf import S2TLogitsProcessor
from s2t_hf.triggers import entropy_signal


PROCESSOR_SETTINGS = settings(max_examples=max(4, settings.default.max_examples // 2))
MARGIN = 1e-4
ORDINARY = [t for t in range(2, VOCAB) if t not in BINS]  # tokens a prompt may hold (PAD = 0 and EOS = 1 aside)


@functools.cache
def student_and_teacher(dtype: torch.dtype, attn: str):
    return tiny_model("llama", seed=0, attn=attn, dtype=dtype), tiny_model("llama", seed=1, attn=attn, dtype=dtype)


@functools.cache
def local_student(dtype: torch.dtype, attn: str, seed: int):
    """A student with a randomised selector (LoRA and bin rows as if trained), one per seed."""
    model = tiny_model("llama", seed=0, attn=attn, dtype=dtype)
    return model, trained_like_selector(model, seed=seed)


@functools.cache
def likely_tokens(model: torch.nn.Module) -> list[int]:
    """Tokens the model generates greedily on a few prompts (the selector's bins masked, as the processor masks them):
    EOS ids it emits early, suppressions that matter."""
    prompts = torch.tensor([[5, 6, 7, 8], [10, 11, 12, 13], [20, 30, 40, 50], [3, 3, 3, 3]])
    with torch.no_grad():
        out = model.generate(prompts, do_sample=False, max_new_tokens=6, pad_token_id=PAD, suppress_tokens=BINS)
    return sorted(set(out[:, 4:].flatten().tolist()) - {PAD})


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, attention_mask


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


PROMPTS = st.lists(st.lists(st.sampled_from(ORDINARY), min_size=1, max_size=8), min_size=1, max_size=4)


@st.composite
def decoding(draw, triggers=("always", "random", "entropy")):
    """Processor settings: trigger, K (up to the whole vocabulary: beyond it is refused), candidate ratio, warm-up."""
    trigger = draw(st.sampled_from(triggers))
    kwargs = dict(
        trigger=trigger,
        top_k=draw(st.integers(2, VOCAB)),
        candidate_ratio=draw(st.none() | st.floats(0.01, 1.0)),
        warmup_tokens=draw(st.integers(0, 3)),
    )
    if trigger == "random":
        kwargs.update(trigger_rate=draw(st.floats(0.0, 1.0)), seed=draw(st.integers(0, 2**16)))
    if trigger == "entropy":  # the signal lies in [0, log 64]
        kwargs.update(trigger_threshold=draw(st.floats(0.0, 4.2)))
    return kwargs


def models_for(selection: str, dtype: torch.dtype, attn: str, data) -> tuple[torch.nn.Module, dict]:
    """The student and the processor's model arguments for `selection`."""
    if selection == "local":
        student, selector = local_student(dtype, attn, data.draw(st.integers(0, 1), label="selector seed"))
        options = dict(scoring=data.draw(st.sampled_from(["pure", "residual"]), label="scoring"),
                       adapter_mode=data.draw(st.sampled_from(["generate", "scoring"]), label="adapter_mode"))
        return student, dict(selector=selector, **options)
    student, teacher = student_and_teacher(dtype, attn)
    return student, dict(teacher=teacher)


# ------------------------------------------------------------------ masked tokens stay masked


def check_masked_tokens_are_never_generated(selection: str, mode: str, data) -> None:
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    student, model_kwargs = models_for(selection, dtype, "sdpa", data)
    likely = likely_tokens(student)
    prompts = data.draw(PROMPTS, label="prompts")
    settings_ = data.draw(decoding(), label="decoding")
    if mode == "all but a few":
        allowed = data.draw(st.sets(st.sampled_from(sorted(set(likely) | set(ORDINARY[:10]))), min_size=1,
                                    max_size=6), label="allowed")
        suppressed = [t for t in range(1, VOCAB) if t not in allowed]
        # more candidates than allowed tokens (PAD and EOS may be allowed too): those at -inf must stay invalid
        settings_["top_k"] = data.draw(st.integers(len(allowed) + 2, VOCAB), label="top_k")
    else:  # the tokens the model (and the teacher) like best
        suppressed = data.draw(st.lists(st.sampled_from(likely), min_size=1, max_size=4, unique=True),
                               label="suppressed")
    eos = data.draw(st.sampled_from(sorted({EOS, *likely})), label="eos_token_id")
    mechanism = data.draw(st.sampled_from(["suppress_tokens", "bad_words_ids"]), label="mechanism")
    masking = {"suppress_tokens": suppressed} if mechanism == "suppress_tokens" else {
        "bad_words_ids": [[t] for t in suppressed]}
    max_new_tokens = data.draw(st.integers(1, 8), label="max_new_tokens")
    input_ids, attention_mask = left_pad(prompts)
    with S2TLogitsProcessor(student, selection=selection, eos_token_id=eos, **model_kwargs, **settings_) as s2t:
        out = student.generate(
            input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos, **masking,
        )
        stats = s2t.stats
    forbidden = set(suppressed) | (set(BINS) if selection == "local" else set())
    if mechanism == "bad_words_ids":
        forbidden.discard(eos)  # transformers never bans the EOS id as a bad word
    for row in out[:, input_ids.shape[1] :].tolist():
        generated = until_eos(row, eos)
        assert not set(generated) & forbidden, (generated, sorted(forbidden))
    assert stats["triggers"] <= stats["eligible_steps"] <= stats["steps"] <= len(prompts) * max_new_tokens
    assert stats["flips"] <= stats["triggers"]
    if settings_["trigger"] == "always":
        assert stats["triggers"] == stats["eligible_steps"]


MASKING = ["likely tokens", "all but a few"]


@pytest.mark.parametrize("mode", MASKING)
@pytest.mark.parametrize("selection", ["teacher", "takeover", "local"])
@given(data=st.data())
@PROCESSOR_SETTINGS
def test_masked_tokens_are_never_generated(selection, mode, data):
    check_masked_tokens_are_never_generated(selection, mode, data)


# ------------------------------------------------------------------ batch == batch size 1


def gap(values: torch.Tensor) -> float:
    """Gap between the two largest values (inf when there are fewer than two finite ones)."""
    top = values[torch.isfinite(values)].topk(min(2, int(torch.isfinite(values).sum()))).values
    return float(top[0] - top[1]) if top.numel() == 2 else math.inf


def clear_steps(selection: str, options: dict, logits: tuple, teacher_log_probs, records: list[dict]) -> int:
    """How many leading steps of a batch-1 run decide with margins of at least `MARGIN` (see the module docstring)."""
    by_step = {record["step"]: record for record in records}
    for step, step_logits in enumerate(logits):
        scores = step_logits[0].float().clone()
        if selection == "local":
            scores[BINS] = -math.inf
        triggered = step >= options["warmup_tokens"] and options["trigger"] != "never"
        if triggered and options["trigger"] == "entropy":
            signal = float(entropy_signal(scores[None], 64)[0])
            if abs(signal - options["trigger_threshold"]) < MARGIN:
                return step
            triggered = signal > options["trigger_threshold"]
        if gap(scores) < MARGIN:  # the greedy token, or the candidates' top-1
            return step
        if not triggered:
            continue
        values, ids = torch.log_softmax(scores, -1).sort(descending=True)
        k = min(options["top_k"], values.numel())
        if k < values.numel() and math.isfinite(values[k]) and values[k - 1] - values[k] < MARGIN:
            return step  # which tokens are candidates
        candidates, log_probs = ids[:k], values[:k]
        valid = torch.isfinite(log_probs)
        if options["candidate_ratio"] is not None:
            bound = log_probs[0] + math.log(options["candidate_ratio"])
            if ((log_probs[1:] - bound).abs() < MARGIN).any():
                return step  # which candidates the ratio keeps
            valid &= log_probs >= bound
        valid[0] = True
        if selection == "teacher":
            choice = teacher_log_probs[step][candidates[valid]]
        elif selection == "takeover":
            choice = teacher_log_probs[step]
        else:
            scores_by_id = dict(zip(by_step[step]["cand_ids"], by_step[step]["local_scores"]))
            choice = torch.tensor([scores_by_id[int(c)] for c in candidates[valid]])
        if gap(choice) < MARGIN:
            return step
    return len(logits)


@pytest.mark.parametrize("selection", ["teacher", "takeover", "local"])
@given(data=st.data())
@PROCESSOR_SETTINGS
def test_each_row_of_a_left_padded_batch_generates_what_it_generates_alone(selection, data):
    student, model_kwargs = models_for(selection, torch.float32, "eager", data)
    teacher = model_kwargs.get("teacher")
    prompts = data.draw(PROMPTS.filter(lambda p: len(p) > 1), label="prompts")
    # the random trigger draws per batch row, so its pattern depends on the batch: not a batching invariant
    options = data.draw(decoding(triggers=("always", "entropy", "never")), label="decoding")
    options.setdefault("trigger_threshold", None)
    eos = data.draw(st.sampled_from(sorted({EOS, *likely_tokens(student)})), label="eos_token_id")
    generation = dict(do_sample=False, max_new_tokens=data.draw(st.integers(1, 8), label="max_new_tokens"),
                      pad_token_id=PAD, eos_token_id=eos)
    input_ids, attention_mask = left_pad(prompts)
    with S2TLogitsProcessor(student, selection=selection, eos_token_id=eos, record_triggers=True, **model_kwargs,
                            **options) as s2t:
        batched = student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                                   **generation)
        batch_stats = s2t.stats
        for row, prompt in enumerate(prompts):
            single = student.generate(torch.tensor([prompt]), logits_processor=[s2t], output_logits=True,
                                      return_dict_in_generate=True, **generation)
            expected = single.sequences[0, len(prompt) :].tolist()
            teacher_log_probs = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(single.sequences).logits[0, len(prompt) - 1 :].float()
                teacher_log_probs = torch.log_softmax(teacher_logits, -1)
            clear = clear_steps(selection, options, single.logits, teacher_log_probs, s2t.records)
            row_tokens = batched[row, input_ids.shape[1] :].tolist()
            assert row_tokens[:clear] == expected[:clear], (row, clear, s2t.records)
            event("row compared to its end" if clear == len(expected) else "row compared up to a near-tie")
            if clear == len(expected):  # the whole row: its statistics too
                for name in ("steps", "eligible_steps", "triggers", "flips"):
                    assert batch_stats[f"{name}_per_row"][row] == s2t.stats[name], name
                assert until_eos(row_tokens, eos) == expected
