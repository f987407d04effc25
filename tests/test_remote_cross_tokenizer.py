"""A served teacher with another tokenizer than the student's (marker `engine`): a real vLLM server serves a tiny Llama
teacher with the SentencePiece-style Unigram tokenizer of `tokenizer_pair.py`, the student writes byte-level BPE, and
the remote teacher's text scoring (`RemoteTeacher` + `CrossTokenizerScorer.plan`/`finish`) is checked against the same
teacher run locally (`LocalTeacher`'s text path): the same chosen tokens, candidate log-probabilities within 1e-3.

The server starts once for this module (~1 min on 2 cores); see `test_remote_teacher.py` for the engine's venv.
"""

from __future__ import annotations

import pytest
import torch
from test_cross_tokenizer import model_for, text_tokens
from test_remote_teacher import Server, engine_python, save_teacher
from tokenizer_pair import byte_level_bpe, sentencepiece_unigram
from transformers import AutoModelForCausalLM

from s2t_hf import S2TLogitsProcessor, collect_selection_data
from s2t_hf.teachers import LocalTeacher, RemoteTeacher


pytestmark = pytest.mark.engine

TEXTS = ["tom has 5 apples and", "café the", "the then"]


@pytest.fixture(scope="module")
def unigram_engine(tmp_path_factory):
    python = engine_python()
    directory = tmp_path_factory.mktemp("engine_unigram")
    save_teacher(directory / "teacher", sentencepiece_unigram())  # a tiny Llama, random weights
    server = Server(python, directory / "teacher", directory / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(unigram_engine):
    student_tokenizer, teacher_tokenizer = byte_level_bpe(), sentencepiece_unigram()
    teacher = AutoModelForCausalLM.from_pretrained(unigram_engine.model_dir, dtype=torch.float32).eval()
    return student_tokenizer, model_for(student_tokenizer, 0), teacher_tokenizer, teacher


@pytest.fixture(params=["logprob_token_ids", "allowed_token_ids"])
def remote(request, unigram_engine, pair):
    """The served teacher, reading log-probabilities of given ids through `logprob_token_ids` (what this vLLM serves)
    or, as with a server without it, one constrained request per id."""
    teacher = RemoteTeacher(unigram_engine.url, tokenizer=pair[2], timeout=60, max_retries=2, backoff=0.2)
    teacher.id_log_probs = request.param
    yield teacher
    teacher.close()


def generate(student, student_tokenizer, teacher, teacher_prompts=None, **kwargs):
    batch = student_tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    suppress = [i for i in range(len(student_tokenizer)) if i not in set(text_tokens(student_tokenizer))]
    suppress = [i for i in suppress if i != student_tokenizer.eos_token_id]
    with S2TLogitsProcessor(student, teacher=teacher, tokenizer=student_tokenizer, record_triggers=True, top_k=4,
                            teacher_prompts=teacher_prompts, **kwargs) as s2t:
        output = student.generate(**batch, max_new_tokens=12, do_sample=False, logits_processor=[s2t],
                                  suppress_tokens=suppress)
        return output, s2t.records, s2t.stats


def assert_same_records(local_records, remote_records):
    """The same triggers and choices; candidate log-probabilities within 1e-3 (float32 rounding of the two)."""
    keys = ("row", "step", "cand_ids", "chosen_id")
    assert [[r[k] for k in keys] for r in remote_records] == [[r[k] for k in keys] for r in local_records] != []
    log_probs = lambda records: torch.tensor([r["teacher_probs"] for r in records], dtype=torch.float64).log()
    torch.testing.assert_close(log_probs(remote_records), log_probs(local_records), rtol=0, atol=1e-3, equal_nan=True)


def test_selection_across_tokenizers_matches_the_local_teacher(pair, remote):
    student_tokenizer, student, teacher_tokenizer, teacher_model = pair
    kwargs = dict(trigger="random", trigger_rate=0.6, seed=0, selection="teacher", warmup_tokens=0)
    local_out, local_records, local_stats = generate(
        student, student_tokenizer, LocalTeacher(teacher_model, tokenizer=teacher_tokenizer), **kwargs
    )
    requests = remote.requests
    remote_out, remote_records, remote_stats = generate(student, student_tokenizer, remote, **kwargs)
    assert remote.text_scorer is not None
    assert torch.equal(remote_out, local_out)
    for key in ("triggers", "flips", "teacher_unscored"):
        assert remote_stats[key] == local_stats[key], key
    assert local_stats["flips"] > 0  # the teacher changed something, so equality means something
    assert_same_records(local_records, remote_records)
    assert remote_stats["teacher_calls"] <= remote_stats["triggers"] and remote.requests > requests


def test_teacher_prompts_across_tokenizers_match_the_local_teacher(pair, remote):
    """The served teacher reads its own chat template (rendered client-side) before the student's continuation."""
    student_tokenizer, student, teacher_tokenizer, teacher_model = pair
    prompts = [[{"role": "user", "content": f"{text} ?"}] for text in TEXTS]
    kwargs = dict(trigger="always", selection="teacher", warmup_tokens=0, teacher_prompts=prompts)
    local_out, local_records, _ = generate(
        student, student_tokenizer, LocalTeacher(teacher_model, tokenizer=teacher_tokenizer), **kwargs
    )
    remote_out, remote_records, _ = generate(student, student_tokenizer, remote, **kwargs)
    assert torch.equal(remote_out, local_out)
    assert_same_records(local_records, remote_records)


def test_takeover_across_tokenizers_matches_the_local_teacher(pair, remote):
    student_tokenizer, student, teacher_tokenizer, teacher_model = pair
    kwargs = dict(trigger="always", selection="takeover", warmup_tokens=0)
    local_out, local_records, local_stats = generate(
        student, student_tokenizer, LocalTeacher(teacher_model, tokenizer=teacher_tokenizer), **kwargs
    )
    remote_out, remote_records, remote_stats = generate(student, student_tokenizer, remote, **kwargs)
    assert torch.equal(remote_out, local_out)
    assert remote_stats["teacher_unscored"] == local_stats["teacher_unscored"] < remote_stats["triggers"]
    assert_same_records(local_records, remote_records)


def test_collection_across_tokenizers_matches_local_collection(pair, remote):
    student_tokenizer, student, teacher_tokenizer, teacher_model = pair
    prompts = [student_tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    suppress = [i for i in range(len(student_tokenizer)) if i not in set(text_tokens(student_tokenizer))]
    kwargs = dict(prompts=prompts, tokenizer=student_tokenizer, top_k=4, fraction=0.3, max_new_tokens=10,
                  batch_size=2, signal="entropy", show_progress=False, suppress_token_ids=suppress)
    local = collect_selection_data(student, LocalTeacher(teacher_model, tokenizer=teacher_tokenizer), **kwargs)
    served = collect_selection_data(student, remote, **kwargs)
    assert len(local) == len(served) > 0
    for a, b in zip(local, served):
        for key in ("context_ids", "cand_ids", "prompt_index", "step"):
            assert a[key] == b[key], key
        torch.testing.assert_close(torch.tensor(b["teacher_probs"]), torch.tensor(a["teacher_probs"]), rtol=1e-3,
                                   atol=1e-5, equal_nan=True)


def test_the_server_is_probed_for_logprob_token_ids_and_the_kl_trigger_is_refused(pair, unigram_engine):
    student_tokenizer, student, teacher_tokenizer, _ = pair
    remote = RemoteTeacher(unigram_engine.url, tokenizer=teacher_tokenizer)
    remote.prepare(student, student_tokenizer)
    assert remote.text_scorer is not None and remote.id_log_probs == "logprob_token_ids"
    with pytest.raises(ValueError, match="`entropy`, `learned` or `random` trigger"):
        S2TLogitsProcessor(student, teacher=remote, tokenizer=student_tokenizer, trigger="kl", selection="teacher")
    with pytest.raises(ValueError, match="needs both tokenizers"):
        RemoteTeacher(unigram_engine.url, tokenizer=teacher_tokenizer, candidate_scoring="text").prepare(student)
    with pytest.raises(ValueError, match="candidate_scoring='auto'"):
        RemoteTeacher(unigram_engine.url, tokenizer=teacher_tokenizer, candidate_scoring="tokens").prepare(
            student, student_tokenizer
        )
