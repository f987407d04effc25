"""S2T under the constraints of the rest of a generation config: no selection ever emits a token that an earlier logits
processor ruled out (`min_new_tokens`, `bad_words_ids`, `suppress_tokens`, `prefix_allowed_tokens_fn`,
`no_repeat_ngram_size`), in the drop-in path and the fused loop, and sampling warpers never undo a selection."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, left_padded_batch, tiny_model
from test_processor_local import BINS, trained_like_selector

import s2t_hf
from s2t_hf import S2TLogitsProcessor
from s2t_hf.selection import takeover_selection


NEW = 12
ALLOWED_BY_FN = [t for t in range(3, 96) if t % 3 != 0 and t not in BINS]  # the grammar of `prefix_allowed_tokens_fn`


@pytest.fixture
def models():  # a selector is injected into the student in place: fresh models for every test
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1)


def plain(model, **kwargs):
    _, input_ids, attention_mask = left_padded_batch()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=PAD,
                         max_new_tokens=NEW, **kwargs)
    return out[:, input_ids.shape[1]:]


def constraint_kwargs(name: str, teacher_tokens: torch.Tensor) -> dict:
    """Generate arguments that rule out tokens the teacher's own greedy decoding emits (so a selection ignoring them
    would emit them)."""
    first = teacher_tokens[:, :3].flatten().unique().tolist()
    if name == "min_new_tokens":  # the teacher's third token of row 0 is the end of sequence, allowed from step 10
        return {"eos_token_id": int(teacher_tokens[0, 2]), "min_new_tokens": 10}
    if name == "bad_words_ids":  # single words and a two-token word
        return {"bad_words_ids": [[t] for t in first] + [teacher_tokens[1, 3:5].tolist()]}
    if name == "suppress_tokens":
        return {"suppress_tokens": first}
    if name == "prefix_allowed_tokens_fn":
        return {"prefix_allowed_tokens_fn": lambda batch_id, ids: ALLOWED_BY_FN}
    if name == "no_repeat_ngram_size":
        return {"no_repeat_ngram_size": 1}  # no token twice in a sequence (prompt included)
    raise ValueError(name)


def violations(name: str, kwargs: dict, generated: torch.Tensor) -> list[str]:
    """The places where `generated` breaks the constraint `name` (an independent check, not transformers' own)."""
    found = []
    _, input_ids, attention_mask = left_padded_batch()
    for row, tokens in enumerate(generated.tolist()):
        prompt = input_ids[row][attention_mask[row].bool()].tolist()
        if name == "min_new_tokens" and kwargs["eos_token_id"] in tokens[:10]:
            found.append(f"row {row}: EOS at step {tokens.index(kwargs['eos_token_id'])}")
        for step, token in enumerate(tokens):
            if token == PAD and step > 0 and name == "min_new_tokens":
                break  # finished row (padding after EOS)
            if name == "bad_words_ids":
                previous = tokens[step - 1] if step else prompt[-1]
                if any(w == [token] or w == [previous, token] for w in kwargs["bad_words_ids"]):
                    found.append(f"row {row} step {step}: bad word ending in {token}")
            if name == "suppress_tokens" and token in kwargs["suppress_tokens"]:
                found.append(f"row {row} step {step}: suppressed {token}")
            if name == "prefix_allowed_tokens_fn" and token not in ALLOWED_BY_FN:
                found.append(f"row {row} step {step}: {token} outside the grammar")
            if name == "no_repeat_ngram_size" and token in prompt + tokens[:step]:
                found.append(f"row {row} step {step}: {token} repeated")
    return found


def processor(model, teacher, selection: str, trigger: str = "always", **kwargs) -> S2TLogitsProcessor:
    common = dict(trigger=trigger, top_k=8, seed=0, warmup_tokens=0, **kwargs)
    if selection == "local":
        return S2TLogitsProcessor(model, selector=trained_like_selector(model), selection="local", **common)
    return S2TLogitsProcessor(model, teacher=teacher, selection=selection, **common)


def decode(model, s2t, path: str, **kwargs) -> torch.Tensor:
    _, input_ids, attention_mask = left_padded_batch()
    arguments = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=PAD, max_new_tokens=NEW,
                     **{"do_sample": False, **kwargs})
    with s2t:
        if path == "fused":
            out = s2t_hf.generate(model, s2t, **arguments)
        else:
            out = model.generate(**arguments, logits_processor=[s2t])
    return out[:, input_ids.shape[1]:]


CONSTRAINTS = ["min_new_tokens", "bad_words_ids", "suppress_tokens", "prefix_allowed_tokens_fn", "no_repeat_ngram_size"]


@pytest.mark.parametrize("path", ["processor", "fused"])
@pytest.mark.parametrize("name", CONSTRAINTS)
def test_always_takeover_equals_the_teacher_under_the_same_constraints(models, name, path):
    student, teacher = models
    kwargs = constraint_kwargs(name, plain(teacher))
    unconstrained = plain(teacher)
    assert violations(name, kwargs, unconstrained), "the constraint must rule out some of the teacher's own tokens"
    expected = plain(teacher, **kwargs)
    eos = {"eos_token_id": kwargs["eos_token_id"]} if "eos_token_id" in kwargs else {}
    got = decode(student, processor(student, teacher, "takeover", **eos), path, **kwargs)
    assert got.tolist() == expected.tolist()
    assert not violations(name, kwargs, got)


@pytest.mark.parametrize("path", ["processor", "fused"])
@pytest.mark.parametrize("selection", ["teacher", "local"])
@pytest.mark.parametrize("name", CONSTRAINTS)
def test_selection_among_candidates_respects_constraints(models, name, selection, path):
    student, teacher = models
    # ruled-out tokens are taken from the selector's own favourites: the student's and teacher's greedy tokens
    kwargs = constraint_kwargs(name, torch.cat([plain(teacher), plain(student)], dim=0))
    s2t = processor(student, teacher, selection)
    got = decode(student, s2t, path, **kwargs)
    assert not violations(name, kwargs, got)
    assert s2t.stats["triggers"] > 0


@pytest.mark.parametrize("path", ["processor", "fused"])
@pytest.mark.parametrize("selection", ["teacher", "takeover", "local"])
def test_sampling_warpers_never_undo_a_selection(models, selection, path):
    """S2T runs after `generate`'s own processors and before the sampling warpers (temperature, top-k, top-p): at a
    triggered step only the selected token is left, which every warper keeps, so sampling emits exactly it."""
    student, teacher = models
    greedy = decode(student, processor(student, teacher, selection), path)
    student = tiny_model("llama", seed=0)  # a second selector cannot be injected into the same model
    torch.manual_seed(0)
    sampled = decode(student, processor(student, teacher, selection), path, do_sample=True, temperature=0.7,
                     top_k=3, top_p=0.8)
    assert sampled.tolist() == greedy.tolist()


@pytest.mark.parametrize("path", ["processor", "fused"])
def test_sampling_with_a_random_trigger_respects_constraints(models, path):
    student, teacher = models
    kwargs = constraint_kwargs("bad_words_ids", torch.cat([plain(teacher), plain(student)], dim=0))
    for seed in range(3):
        torch.manual_seed(seed)
        s2t = processor(student, teacher, "takeover", trigger="random", trigger_rate=0.5)
        got = decode(student, s2t, path, do_sample=True, temperature=1.5, **kwargs)
        assert not violations("bad_words_ids", kwargs, got)


def test_takeover_selection_among_allowed_tokens():
    log_probs = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, float("-inf")]]), dim=-1)
    allowed = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert takeover_selection(log_probs, allowed=allowed).tolist() == [1, 2]
    # the teacher gives -inf to every allowed token: no choice (-1), the processor keeps the student's top-1
    assert takeover_selection(log_probs, allowed=torch.tensor([[False] * 4, [False, False, False, True]])).tolist() == [
        -1, -1
    ]
    # a narrower allowed mask (the student's output rows) blocks the teacher's extra rows
    assert takeover_selection(log_probs[1:], allowed=torch.tensor([[True, True]])).tolist() == [1]
