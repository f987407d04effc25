"""A teacher with a prompt of its own (`teachers/teacher_prompts.py`): its chat template, a system prompt, or privileged
information (a hinted teacher), in decoding and in collection, checked against a slow reference forward."""

import math

import pytest
import torch
from test_cross_tokenizer import model_for, reference_scores
from tokenizer_pair import byte_level_bpe, sentencepiece_unigram

from s2t_hf import S2TLogitsProcessor, collect_selection_data
from s2t_hf.tasks import build_tokenizer
from s2t_hf.teachers import LocalTeacher
from s2t_hf.teachers.teacher_prompts import check_teacher_prompts, render_teacher_prompt


QUESTIONS = ["tom has 5 apples .", "how many apples does tom have ?"]
HINTS = [
    [{"role": "user", "content": "tom has 5 apples . answer 5"}],
    "<bos> <user> how many apples does tom have ? 7 apples <assistant>",
]


def chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def next_token_log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_render_and_check():
    tokenizer = build_tokenizer()
    rendered = render_teacher_prompt(HINTS[0], tokenizer)
    assert rendered.prefix_ids == [] and rendered.text.endswith("<assistant>")
    assert render_teacher_prompt("tom has", sentencepiece_unigram()).prefix_ids == [2]  # its BOS, added by default
    with pytest.raises(TypeError, match=r"`teacher_prompts\[1\]` must be a string or"):
        check_teacher_prompts(["a", [{"role": "user"}]])


def test_a_hinted_teacher_reads_its_own_prompt_in_decoding():
    """Same tokenizer (token path): at every trigger the teacher's probabilities are those of one forward over its own
    prompt followed by the student's continuation; without the hint they differ."""
    tokenizer = build_tokenizer()
    student, teacher_model = model_for(tokenizer, 0), model_for(tokenizer, 1)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in QUESTIONS]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch["input_ids"].shape[1]
    runs = {}
    for name, hints in (("hinted", HINTS), ("plain", None)):
        with S2TLogitsProcessor(student, teacher=LocalTeacher(teacher_model, tokenizer=tokenizer), tokenizer=tokenizer,
                                trigger="always", selection="teacher", top_k=4, record_triggers=True,
                                teacher_prompts=hints) as s2t:
            student.generate(**batch, max_new_tokens=6, do_sample=False, logits_processor=[s2t])
            runs[name] = s2t.records
    teacher_ids = [render_teacher_prompt(h, tokenizer).token_ids(tokenizer) for h in HINTS]
    differs = False
    for hinted, plain in zip(runs["hinted"], runs["plain"]):
        row = hinted["row"]
        prompt_length = width - int((batch["attention_mask"][row] == 0).sum())
        continuation = hinted["context_ids"][prompt_length:]
        expected = next_token_log_probs(teacher_model, teacher_ids[row] + continuation)[hinted["cand_ids"]].exp()
        assert torch.allclose(torch.tensor(hinted["teacher_probs"]), expected, atol=1e-6)
        differs |= not torch.allclose(torch.tensor(plain["teacher_probs"]), torch.tensor(hinted["teacher_probs"]))
    assert differs and len(runs["hinted"]) == len(runs["plain"]) == 6  # 2 rows x (6 steps - 3 warm-up)


def test_a_hinted_teacher_in_teacher_forced_collection():
    """The student's own weights as a hinted teacher: each group's teacher probabilities are the teacher's reading of
    its hint prompt and the student's continuation."""
    tokenizer = build_tokenizer()
    student = model_for(tokenizer, 0)
    teacher = LocalTeacher(student, tokenizer=tokenizer)  # the student's own weights
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    groups = collect_selection_data(student, teacher, tokenizer, prompts=prompts, teacher_prompts=HINTS, top_k=4,
                                    fraction=0.5, max_new_tokens=6, show_progress=False)
    plain = collect_selection_data(student, student, tokenizer, prompts=prompts, top_k=4, fraction=0.5,
                                   max_new_tokens=6, show_progress=False)
    assert len(groups) > 0
    encoded = [chat_ids(tokenizer, p) for p in prompts]
    teacher_ids = [render_teacher_prompt(h, tokenizer).token_ids(tokenizer) for h in HINTS]
    for group in groups:
        index = group["prompt_index"]
        continuation = group["context_ids"][len(encoded[index]):]
        expected = next_token_log_probs(student, teacher_ids[index] + continuation)[group["cand_ids"]].exp()
        assert torch.allclose(torch.tensor(group["teacher_probs"]), expected, atol=1e-5)
    # reading the student's own prompt, the same weights give the student's own probabilities back
    for group in plain:
        assert torch.allclose(torch.tensor(group["teacher_probs"]), torch.tensor(group["student_probs"]), atol=1e-5)


@pytest.mark.parametrize("mode", ["teacher_forced", "on_policy"])
def test_a_teacher_with_another_tokenizer_and_its_own_chat_template_in_collection(mode):
    """Across tokenizers the teacher renders its prompt with its own chat template; groups match the string
    reference, and the KL signal is refused with a pointer to the entropy one."""
    student_tokenizer, teacher_tokenizer = byte_level_bpe(), sentencepiece_unigram()
    student, teacher_model = model_for(student_tokenizer, 0), model_for(teacher_tokenizer, 1)
    prompts = [[{"role": "user", "content": "tom has 5 apples"}], [{"role": "user", "content": "the café"}]]
    teacher = LocalTeacher(teacher_model, tokenizer=teacher_tokenizer)
    with pytest.raises(ValueError, match="Use `signal='entropy'`"):
        collect_selection_data(student, teacher, student_tokenizer, prompts=prompts, signal="kl", show_progress=False)
    groups = collect_selection_data(student, teacher, student_tokenizer, prompts=prompts, teacher_prompts=prompts,
                                    mode=mode, signal="entropy", top_k=4, fraction=0.5, trigger_rate=0.5,
                                    max_new_tokens=6, show_progress=False)
    assert len(groups) > 0
    encoded = [chat_ids(student_tokenizer, p) for p in prompts]
    for group in groups:
        index = group["prompt_index"]
        continuation = group["context_ids"][len(encoded[index]):]
        teacher_text = teacher_tokenizer.apply_chat_template(prompts[index], add_generation_prompt=True, tokenize=False)
        # the reference over the teacher's own prompt: its text, then the student's continuation as text
        probe = student_tokenizer(teacher_text, add_special_tokens=False)["input_ids"]
        expected = reference_scores(teacher_model, teacher_tokenizer, student_tokenizer, [], probe + continuation,
                                    group["cand_ids"], teacher.text_scorer.teacher_end_ids)
        got = [math.log(p) if p > 0 else float("-inf") for p in group["teacher_probs"]]
        finite = [k for k, e in enumerate(expected) if math.isfinite(e) and group["student_probs"][k] > 0]
        assert all(abs(got[k] - expected[k]) < 1e-4 for k in finite), (got, expected)
