"""A teacher with another tokenizer scores the student's candidates as text (`teachers/cross_tokenizer.py`), checked
against an independent slow reference that re-encodes whole strings and runs the teacher without a cache."""

import math

import pytest
import torch
from tokenizer_pair import byte_level_bpe, sentencepiece_unigram
from transformers import AutoModelForCausalLM, LlamaConfig

from s2t_hf import S2TLogitsProcessor
from s2t_hf.tasks import build_tokenizer
from s2t_hf.teachers import LocalTeacher
from s2t_hf.teachers.teacher_prompts import leading_special_ids


def model_for(tokenizer, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def special_ids(tokenizer):
    """The named special tokens and the added tokens marked special (`<|im_start|>`...)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def text_tokens(tokenizer):
    """Ids of tokens that are whole UTF-8 text and not special (to keep a random student writing text)."""
    ids = []
    for i in range(len(tokenizer)):
        if i in special_ids(tokenizer):
            continue
        text = tokenizer.decode([i])
        if "\ufffd" not in text and text:
            ids.append(i)
    return ids


@pytest.fixture(scope="module", params=["bpe_student", "unigram_student"])
def pair(request):
    student_tokenizer, teacher_tokenizer = byte_level_bpe(), sentencepiece_unigram()
    if request.param == "unigram_student":
        student_tokenizer, teacher_tokenizer = teacher_tokenizer, student_tokenizer
    return student_tokenizer, model_for(student_tokenizer, 0), teacher_tokenizer, model_for(teacher_tokenizer, 1)


def sequence_log_prob(model, ids):
    """log P(ids[1:] | ids[0]) with one forward and no cache, and the distribution after the last token."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(log_probs[i - 1, ids[i]]) for i in range(1, len(ids))), log_probs[-1]


def reference_scores(teacher, teacher_tokenizer, student_tokenizer, prefix, context_ids, candidates, end_ids):
    """
    The slow reference: every candidate's whole string `decode(context + candidate)`, encoded by the teacher from
    scratch, `log P(enc(context + candidate)) - log P(enc(context))`; a candidate that is a string prefix of another
    loses the teacher's probability of going on towards it; an end token scores as the teacher's end tokens.
    """
    decode = lambda ids: student_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    base = decode(context_ids).rstrip("\ufffd")
    encode = lambda text: prefix + teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
    base_log_prob, base_after = sequence_log_prob(teacher, encode(base))
    strings = {}
    for k, candidate in enumerate(candidates):
        if candidate in special_ids(student_tokenizer):
            continue
        whole = decode(context_ids + [candidate])
        if "\ufffd" not in whole:
            strings[k] = whole[len(base):]
    scores = [float("-inf")] * len(candidates)
    for k, string in strings.items():
        log_prob, after = sequence_log_prob(teacher, encode(base + string))
        scores[k] = log_prob - base_log_prob
        extensions = [s[len(string):] for j, s in strings.items() if j != k and s.startswith(string) and s != string]
        if extensions:
            mass = 0.0
            for v in range(len(teacher_tokenizer)):
                text = teacher_tokenizer.decode([v])
                if v not in special_ids(teacher_tokenizer) and text and "\ufffd" not in text and any(
                    text.startswith(e) or e.startswith(text) for e in extensions
                ):
                    mass += float(after[v].exp())
            scores[k] += math.log1p(-min(mass, 1 - 1e-6))
    for k, candidate in enumerate(candidates):
        if candidate == student_tokenizer.eos_token_id:
            scores[k] = float(torch.logsumexp(base_after[end_ids], dim=0))
    return scores


CASES = {
    # a context ending mid-word: the teacher's tokenization of "app" changes with what follows
    "mid_word": ("tom has app", ["les", "le", "s", " apples", "x"]),
    # candidates that are string prefixes of one another
    "nested_prefixes": ("tom has", [" the", " then", " there", " t", " th"]),
    # candidates the teacher writes with several tokens; leading-space conventions (Ġ / ▁)
    "multi_token_and_spaces": ("tom sold", [" 123", "123", " naïve", " apples", "apples", " ,"]),
    # end tokens (student EOS -> teacher end tokens) beside text
    "end_tokens": ("tom has 5 apples .", ["<eos>", " the", " then"]),
}


def candidate_ids(tokenizer, pieces):
    ids = []
    for piece in pieces:
        if piece == "<eos>":
            ids.append(tokenizer.eos_token_id)
            continue
        token = tokenizer(piece, add_special_tokens=False)["input_ids"][0]
        if token not in ids:
            ids.append(token)
    return ids


@pytest.mark.parametrize("case", sorted(CASES))
def test_candidate_scores_match_the_string_likelihood_reference(pair, case):
    student_tokenizer, student, teacher_tokenizer, teacher_model = pair
    context, pieces = CASES[case]
    teacher = LocalTeacher(teacher_model, tokenizer=teacher_tokenizer)
    teacher.prepare(student, student_tokenizer)
    scorer = teacher.text_scorer
    context_ids = student_tokenizer(context, add_special_tokens=False)["input_ids"]
    candidates = candidate_ids(student_tokenizer, pieces)
    got = scorer.score(0, context_ids[:1], context_ids[1:], candidates, [True] * len(candidates))
    prefix = leading_special_ids(teacher_tokenizer)
    expected = reference_scores(teacher_model, teacher_tokenizer, student_tokenizer, prefix, context_ids, candidates,
                                scorer.teacher_end_ids)
    assert got.scored
    assert torch.allclose(torch.tensor(got.log_probs), torch.tensor(expected), atol=1e-4), (got.log_probs, expected)
    if case == "end_tokens":
        assert math.isfinite(got.log_probs[0])
    # asked again with a longer context, the row's cache is extended, not rebuilt, and the scores still match
    longer = context_ids + student_tokenizer(" and", add_special_tokens=False)["input_ids"]
    tokens_before = teacher.tokens
    got = scorer.score(0, longer[:1], longer[1:], candidates, [True] * len(candidates))
    expected = reference_scores(teacher_model, teacher_tokenizer, student_tokenizer, prefix, longer, candidates,
                                scorer.teacher_end_ids)
    assert torch.allclose(torch.tensor(got.log_probs), torch.tensor(expected), atol=1e-4)
    assert teacher.tokens - tokens_before < len(prefix) + len(longer) + 6 * len(candidates)


def test_a_context_ending_inside_a_character_is_completed_by_the_candidates():
    """Byte-fallback pieces: the student wrote the first byte of "é"; candidates that complete it are scored as
    text, one that does not (another lead byte) is left out, and a top-1 that cannot be read keeps the row unscored."""
    student_tokenizer, teacher_tokenizer = byte_level_bpe(), sentencepiece_unigram()
    student, teacher_model = model_for(student_tokenizer, 0), model_for(teacher_tokenizer, 1)
    teacher = LocalTeacher(teacher_model, tokenizer=teacher_tokenizer)
    teacher.prepare(student, student_tokenizer)
    vocab = student_tokenizer.get_vocab()
    lead, second = vocab["Ã"], vocab["©"]  # the two bytes of "é" (0xC3 0xA9)
    context_ids = student_tokenizer("tom has caf", add_special_tokens=False)["input_ids"] + [lead]
    candidates = [second, vocab["Ã"], student_tokenizer(" the", add_special_tokens=False)["input_ids"][0]]
    got = teacher.text_scorer.score(0, context_ids[:1], context_ids[1:], candidates, [True] * 3)
    assert got.scored and math.isfinite(got.log_probs[0]) and got.log_probs[1] == float("-inf")
    expected = reference_scores(teacher_model, teacher_tokenizer, student_tokenizer, leading_special_ids(teacher_tokenizer),
                                context_ids, candidates, teacher.text_scorer.teacher_end_ids)
    assert abs(got.log_probs[0] - expected[0]) < 1e-4
    # " the" after an incomplete character is not text: left out too
    assert got.log_probs[2] == float("-inf")
    unscored = teacher.text_scorer.score(0, context_ids[:1], context_ids[1:], [vocab["Ã"], second], [True, True])
    assert not unscored.scored


def test_same_tokenizer_text_path_equals_the_token_path():
    """On one tokenizer, scoring as text gives today's choices, and the same probabilities within 1e-5."""
    tokenizer = build_tokenizer()
    student, teacher_model = model_for(tokenizer, 0), model_for(tokenizer, 1)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in ["tom has 5 apples .", "how many apples ?"]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    runs = {}
    for scoring in ("tokens", "text"):
        teacher = LocalTeacher(teacher_model, tokenizer=tokenizer, candidate_scoring=scoring)
        with S2TLogitsProcessor(student, teacher=teacher, tokenizer=tokenizer, trigger="always", selection="teacher",
                                top_k=4, record_triggers=True) as s2t:
            output = student.generate(**batch, max_new_tokens=10, do_sample=False, logits_processor=[s2t])
            runs[scoring] = output, s2t.records, s2t.stats
    assert (runs["text"][0] == runs["tokens"][0]).all()
    assert runs["text"][2]["flips"] > 0 and runs["text"][2]["teacher_unscored"] == 0
    for by_tokens, by_text in zip(runs["tokens"][1], runs["text"][1]):
        assert by_tokens["chosen_id"] == by_text["chosen_id"]
        assert torch.allclose(torch.tensor(by_tokens["teacher_probs"]), torch.tensor(by_text["teacher_probs"]),
                              atol=1e-5)


def _generate(student, student_tokenizer, teacher, texts, **kwargs):
    batch = student_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    suppress = [i for i in range(len(student_tokenizer)) if i not in set(text_tokens(student_tokenizer))]
    suppress = [i for i in suppress if i != student_tokenizer.eos_token_id]
    with S2TLogitsProcessor(student, teacher=teacher, tokenizer=student_tokenizer, record_triggers=True,
                            top_k=4, **kwargs) as s2t:
        output = student.generate(**batch, max_new_tokens=10, do_sample=False, logits_processor=[s2t],
                                  suppress_tokens=suppress)
        return batch, output, s2t.records, s2t.stats


def test_generate_across_tokenizers_with_left_padding_and_lazy_catch_up(pair):
    """Inside `generate`, on a left-padded batch with a trigger that skips steps (the teacher catches up lazily), every
    trigger's teacher probabilities and choice match the slow reference."""
    student_tokenizer, student, teacher_tokenizer, teacher_model = pair
    teacher = LocalTeacher(teacher_model, tokenizer=teacher_tokenizer)
    texts = ["tom has 5 apples and", "café the"]
    _, _, records, stats = _generate(student, student_tokenizer, teacher, texts, trigger="random", trigger_rate=0.5,
                                     selection="teacher")
    assert stats["triggers"] > 3 and stats["teacher_hits"] == 0  # no top-1 over another vocabulary
    prefix = leading_special_ids(teacher_tokenizer)
    for record in records:
        context = record["context_ids"]
        expected = reference_scores(teacher_model, teacher_tokenizer, student_tokenizer, prefix, context,
                                    record["cand_ids"], teacher.text_scorer.teacher_end_ids)
        # candidates the suppressed rows rule out (student probability 0) are never valid
        expected = [e if q > 0 else float("-inf") for e, q in zip(expected, record["student_probs"])]
        got = [math.log(p) if p > 0 else float("-inf") for p in record["teacher_probs"]]
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4)
        assert record["chosen_id"] == record["cand_ids"][max(range(len(expected)), key=expected.__getitem__)]


def test_takeover_across_tokenizers_emits_the_student_token_that_starts_the_teachers_text(pair):
    student_tokenizer, student, teacher_tokenizer, teacher_model = pair
    teacher = LocalTeacher(teacher_model, tokenizer=teacher_tokenizer)
    _, _, records, stats = _generate(student, student_tokenizer, teacher, ["tom has 5 apples and", "the"],
                                     trigger="always", selection="takeover")
    prefix = leading_special_ids(teacher_tokenizer)
    taken = 0
    for record in records:
        context = record["context_ids"]
        text = student_tokenizer.decode(context, clean_up_tokenization_spaces=False)
        _, after = sequence_log_prob(teacher_model, prefix + teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
        best = int(after.argmax())
        if best in teacher.text_scorer.teacher_end_ids:
            expected = student_tokenizer.eos_token_id
        else:
            piece = teacher_tokenizer.decode([best], clean_up_tokenization_spaces=False)
            expected = student_tokenizer(piece, add_special_tokens=False)["input_ids"][0] if piece else None
            if expected is not None and not piece.startswith(student_tokenizer.decode([expected])):
                expected = None
        if expected is None or "\ufffd" in (piece if best not in teacher.text_scorer.teacher_end_ids else ""):
            continue  # the teacher's token cannot be written as a student token: the student keeps its own
        taken += 1
        # (a token the student's suppressed rows rule out is never emitted: the student keeps its top-1 then)
        assert record["chosen_id"] in (expected, record["cand_ids"][0])
    assert taken > 0 and stats["triggers"] == len(records)


def test_the_kl_trigger_needs_one_tokenizer():
    student_tokenizer, teacher_tokenizer = byte_level_bpe(), sentencepiece_unigram()
    student, teacher_model = model_for(student_tokenizer, 0), model_for(teacher_tokenizer, 1)
    with pytest.raises(ValueError, match="`entropy`, `learned` or `random` trigger"):
        S2TLogitsProcessor(student, teacher=LocalTeacher(teacher_model, tokenizer=teacher_tokenizer),
                           tokenizer=student_tokenizer, trigger="kl", selection="teacher")
    with pytest.raises(ValueError, match="needs both tokenizers"):
        LocalTeacher(teacher_model, tokenizer=teacher_tokenizer, candidate_scoring="text").prepare(student)
