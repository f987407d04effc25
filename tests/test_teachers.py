"""The teacher interface (`s2t_hf.teachers`): the local teacher behind it, a custom teacher, argument checks.

The remote teacher against a real vLLM server is tested in `test_remote_teacher.py` (marker `engine`).
"""

from __future__ import annotations

import doctest
import importlib
import socket

import pytest
import torch
from conftest import GREEDY, left_padded_batch, tiny_model

import s2t_hf.teachers as teachers_module
from s2t_hf import S2TLogitsProcessor, collect_selection_data
from s2t_hf.teachers import LocalTeacher, RemoteTeacher, RemoteTeacherError, Teacher, TeacherChoice, as_teacher


@pytest.mark.parametrize("name", ["", ".base", ".local", ".remote", ".transport"])
def test_docstring_examples_run(name):
    module = importlib.import_module(name, teachers_module.__name__) if name else teachers_module
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def recompute(model, context):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([context])).logits[0, -1].float(), -1)


def test_local_teacher_answers_match_a_recomputation_on_a_left_padded_batch():
    student, model = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    prompts, input_ids, attention_mask = left_padded_batch()
    teacher = LocalTeacher(model)
    teacher.prepare(student, blocked_ids=[7])
    rows = torch.tensor([0, 2])
    candidate_ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    choice = teacher.select(input_ids, attention_mask, rows, candidate_ids, valid)
    takeover = teacher.takeover(input_ids, attention_mask, rows, candidate_ids)
    assert teacher.calls == 1 and teacher.tokens == input_ids.shape[1]  # one forward answers the whole step
    for n, row in enumerate(rows.tolist()):
        expected = recompute(model, prompts[row])
        expected[7] = float("-inf")  # blocked
        expected = torch.log_softmax(expected, -1)
        allowed = [c for c, ok in zip(candidate_ids[n].tolist(), valid[n].tolist()) if ok]
        assert int(choice.token_ids[n]) == max(allowed, key=lambda c: expected[c])
        assert int(candidate_ids[n, choice.positions[n]]) == int(choice.token_ids[n])
        assert int(takeover.token_ids[n]) == int(expected.argmax()) == int(choice.top1[n])
        torch.testing.assert_close(choice.candidate_log_probs[n], expected[candidate_ids[n]], rtol=1e-4, atol=1e-5)
    # the next step catches up on the new token only
    step_ids = torch.cat([input_ids, torch.tensor([[11], [12], [13]])], 1)
    step_mask = torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], 1)
    lp = teacher.candidate_log_probs(step_ids, step_mask, torch.tensor([1]), torch.tensor([[3, 4]]))
    assert teacher.calls == 2 and teacher.tokens == input_ids.shape[1] + 1
    expected = recompute(model, prompts[1] + [12])
    expected[7] = float("-inf")
    torch.testing.assert_close(lp[0], torch.log_softmax(expected, -1)[[3, 4]], rtol=1e-4, atol=1e-5)
    teacher.reset()
    assert teacher.calls == 0


def test_local_teacher_scores_trajectories_like_a_recomputation():
    student, model = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    teacher = LocalTeacher(model)
    teacher.prepare(student)
    trajectories = [[5, 6, 7, 8, 9], [10, 11, 12]]
    positions = torch.tensor([[0, 2], [1, 3], [0, 5], [1, 1]])
    candidate_ids = torch.tensor([[3, 4, 5]] * 4)
    log_probs, top1 = teacher.score_trajectories(trajectories, positions, candidate_ids)
    for n, (b, t) in enumerate(positions.tolist()):
        expected = recompute(model, trajectories[b][:t])
        torch.testing.assert_close(log_probs[n], expected[[3, 4, 5]], rtol=1e-4, atol=1e-5)
        assert int(top1[n]) == int(expected.argmax())


def test_processor_with_a_local_teacher_instance_equals_the_model():
    student, model = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    _, input_ids, attention_mask = left_padded_batch()
    outs = []
    for teacher in (model, LocalTeacher(model)):
        with S2TLogitsProcessor(student, teacher=teacher, trigger="random", trigger_rate=0.5, seed=0, top_k=4,
                                record_triggers=True) as s2t:
            outs.append(student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                                         **GREEDY))
            outs.append({k: s2t.stats[k] for k in ("teacher_calls", "teacher_tokens", "teacher_hits", "flips")})
            outs.append(s2t.records)
    assert torch.equal(outs[0], outs[3]) and outs[1] == outs[4] and outs[2] == outs[5]
    assert outs[1]["teacher_calls"] > 0


class LastCandidateTeacher(Teacher):
    """A teacher without a model: it prefers the student's last valid candidate (shows the interface is pluggable)."""

    def select(self, input_ids, attention_mask, rows, candidate_ids, valid, *, with_log_probs=False):
        self.calls += 1
        positions = valid.long().cumsum(-1).argmax(-1)
        return TeacherChoice(token_ids=candidate_ids.gather(-1, positions[:, None])[:, 0], positions=positions)

    def takeover(self, input_ids, attention_mask, rows, candidate_ids=None, *, with_log_probs=False):
        raise NotImplementedError

    def candidate_log_probs(self, input_ids, attention_mask, rows, candidate_ids):
        raise NotImplementedError

    def score_trajectories(self, trajectories, positions, candidate_ids):
        raise NotImplementedError


def test_a_custom_teacher_drives_selection_and_kl_needs_the_full_distribution():
    student = tiny_model("llama", seed=0)
    teacher = LastCandidateTeacher()
    with S2TLogitsProcessor(student, teacher=teacher, trigger="always", top_k=3, warmup_tokens=0,
                            record_triggers=True) as s2t:
        student.generate(torch.tensor([[5, 6, 7]]), logits_processor=[s2t], **GREEDY)
        assert s2t.records and all(r["chosen_id"] == r["cand_ids"][-1] for r in s2t.records)
        assert "teacher_probs" not in s2t.records[0] and s2t.stats["teacher_hits"] == 0
        assert s2t.stats["teacher_calls"] == GREEDY["max_new_tokens"]
    with pytest.raises(ValueError, match="`kl` trigger needs the teacher's distribution"):
        S2TLogitsProcessor(student, teacher=teacher, trigger="kl")
    with pytest.raises(ValueError, match="signal='entropy'"):
        collect_selection_data(student, teacher, prompts=[[5, 6]], show_progress=False)


def test_bad_teachers_and_remote_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="`teacher` must be a transformers model or a `Teacher`"):
        as_teacher("http://127.0.0.1:1")
    with pytest.raises(TypeError, match="RemoteTeacher"):
        LocalTeacher("gpt2")
    with pytest.raises(ValueError, match="`base_url`"):
        RemoteTeacher("127.0.0.1:8000")
    with pytest.raises(ValueError, match="`max_retries`"):
        RemoteTeacher("http://127.0.0.1:8000", max_retries=-1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(RemoteTeacherError, match=r"did not answer `GET /v1/models` after 2 tries"):
        RemoteTeacher(f"http://127.0.0.1:{port}", max_retries=1, backoff=0.01)
    student, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1, vocab_size=128)
    with pytest.raises(ValueError, match=r"same tokenizer.*`LocalTeacher\(model, tokenizer=teacher_tokenizer\)`"):
        LocalTeacher(other).prepare(student)


class _PlainCompletionsServer:
    """An OpenAI-compatible `/v1/completions` server *without* vLLM's extensions (it ignores `allowed_token_ids` and
    has no `/tokenize`), on loopback: what the remote teacher must refuse at construction. Not a stand-in for vLLM,
    which `test_remote_teacher.py` runs for real."""

    def __init__(self, delay: float = 0.0, models: list | None = None, raw_models_answer: bytes | None = None):
        import http.server
        import json
        import threading
        import time

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_GET(self):
                time.sleep(delay)
                if raw_models_answer is not None:
                    return self._send(200, raw_models_answer)
                self._send(200, {"data": [{"id": "plain", "max_model_len": 64}] if models is None else models})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/completions":
                    return self._send(404, {"detail": "Not Found"})
                logprobs = {"tokens": ["token_id:2"], "token_logprobs": [-0.1], "top_logprobs": [{"token_id:2": -0.1}]}
                self._send(200, {"choices": [{"index": 0, "text": "x", "logprobs": logprobs}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_without_the_needed_parameters_is_refused_at_construction():
    from s2t_hf.tasks import build_tokenizer

    server = _PlainCompletionsServer()
    try:
        with pytest.warns(UserWarning, match="no `/tokenize` endpoint"):
            with pytest.raises(RemoteTeacherError, match="ignores `allowed_token_ids`"):
                RemoteTeacher(server.url, tokenizer=build_tokenizer(), max_retries=0)
        with pytest.raises(RemoteTeacherError, match="does not serve `model='big'`"):
            RemoteTeacher(server.url, model="big", check=False)
    finally:
        server.close()


def test_a_server_slower_than_the_timeout_is_retried_then_reported():
    server = _PlainCompletionsServer(delay=1.0)
    try:
        with pytest.raises(RemoteTeacherError, match=r"after 2 tries \(TimeoutError"):
            RemoteTeacher(server.url, timeout=0.2, max_retries=1, backoff=0.01, check=False)
    finally:
        server.close()


def test_remote_teacher_arguments_and_answers_it_cannot_use():
    from s2t_hf.tasks import build_tokenizer

    for kwargs, name in ((dict(max_concurrency=0), "max_concurrency"), (dict(top_logprobs=0), "top_logprobs")):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive integer, got 0"):
            RemoteTeacher("http://127.0.0.1:8000", **kwargs)
    with pytest.raises(ValueError, match="`timeout` must be positive and `backoff` non-negative, got 0 and 0.5"):
        RemoteTeacher("http://127.0.0.1:8000", timeout=0)
    for server_kwargs, error in (
        (dict(raw_models_answer=b"<html>Bad Gateway</html>"), "answered with something that is not JSON: b'<html>"),
        (dict(models=[]), "lists no model at `/v1/models`"),
    ):
        server = _PlainCompletionsServer(**server_kwargs)
        try:
            with pytest.raises(RemoteTeacherError, match=error):
                RemoteTeacher(server.url, check=False, max_retries=0)
        finally:
            server.close()
    server = _PlainCompletionsServer()  # serves a model of `max_model_len` 64, ignores `allowed_token_ids`
    try:
        student, tokenizer = tiny_model("llama", seed=0), build_tokenizer()
        teacher = RemoteTeacher(server.url, tokenizer=tokenizer, check=False, max_retries=0)
        with pytest.raises(ValueError, match="is not the one the `RemoteTeacher` was checked with"):
            teacher.prepare(student, build_tokenizer(extra_words=["zebra"]))
        teacher.prepare(student, tokenizer)
        ids = torch.tensor([[5, 6, 7]])
        valid = torch.ones(1, 2, dtype=torch.bool)
        one = dict(rows=torch.tensor([0]), candidate_ids=torch.tensor([[8, 9]]), valid=valid)
        with pytest.raises(RemoteTeacherError, match="returned a token outside `allowed_token_ids`"):
            teacher.select(ids, torch.ones_like(ids), **one)
        long = torch.arange(3, 73)[None]
        with pytest.raises(RemoteTeacherError, match="context of 70 tokens does not fit .* `max_model_len` of 64"):
            teacher.select(long, torch.ones_like(long), **one)
        with pytest.raises(RemoteTeacherError, match="answered without `prompt_logprobs`"):
            teacher.score_trajectories([[5, 6, 7, 8]], torch.tensor([[0, 2]]), torch.tensor([[8, 9]]))
        with pytest.raises(RemoteTeacherError, match="trajectory of 70 tokens does not fit .* `max_model_len` of 64"):
            teacher.score_trajectories([list(range(3, 73))], torch.tensor([[0, 69]]), torch.tensor([[8, 9]]))
    finally:
        server.close()


def test_a_teacher_used_before_prepare_or_without_its_distribution():
    student = tiny_model("llama", seed=0)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match=r"Call `teacher.prepare\(student\)` before using the teacher"):
        LocalTeacher(tiny_model("llama", seed=1)).next_log_probs(ids, torch.ones_like(ids))

    class ClaimsFullDistribution(LastCandidateTeacher):
        full_distribution = True  # but implements no `next_log_probs`

    with S2TLogitsProcessor(student, teacher=ClaimsFullDistribution(), trigger="kl", trigger_threshold=0.1) as s2t:
        with pytest.raises(NotImplementedError, match="cannot give its distribution over the whole vocabulary"):
            student.generate(ids, logits_processor=[s2t], **GREEDY)
    # teacher-forced collection asks such a teacher for whole trajectories: the interface names the missing method
    with pytest.raises(NotImplementedError, match="does not implement `trajectory_log_probs`"):
        collect_selection_data(student, ClaimsFullDistribution(), prompts=[[5, 6, 7]], max_new_tokens=6)


def _word_tokenizer(words: list[str]):
    """A word-level tokenizer: `<pad>`, `<eos>`, `<unk>`, then `words` in order."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_a_teacher_with_another_tokenizer_is_told_apart_whatever_the_sizes():
    """The student's vocabulary fits inside the teacher's, so sizes alone would compare it token by token: the tokens
    decide, and such a teacher scores the candidates as text (or is refused where token-by-token is asked for)."""
    from s2t_hf.teachers import vocabulary_difference

    words = [f"w{i}" for i in range(93)]
    student_tokenizer = _word_tokenizer(words)  # 96 tokens, the student's 96 rows
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1, vocab_size=128)
    other_family = _word_tokenizer(words[::-1] + [f"x{i}" for i in range(32)])  # 128 tokens, another order
    assert "id 3 is 'w0' for the student and 'w92' for the teacher" in vocabulary_difference(
        student_tokenizer, other_family
    )
    with pytest.raises(ValueError, match="The teacher's tokenizer is not the student's: id 3 is 'w0'"):
        S2TLogitsProcessor(student, teacher=LocalTeacher(teacher, tokenizer=other_family, candidate_scoring="tokens"),
                           tokenizer=student_tokenizer, selection="teacher", trigger="always")
    assert not student._forward_pre_hooks  # refused before the processor hooked the model
    other = LocalTeacher(teacher, tokenizer=other_family)
    with S2TLogitsProcessor(student, teacher=other, tokenizer=student_tokenizer, selection="teacher",
                            trigger="always"):
        assert other.text_scorer is not None and not other.full_distribution
    # without the teacher's tokenizer, a teacher whose end token is none of the student's is told apart too
    teacher.generation_config.eos_token_id = 127
    with pytest.raises(ValueError, match="it has another tokenizer. Pass it"):
        S2TLogitsProcessor(student, teacher=teacher, tokenizer=student_tokenizer, selection="teacher",
                           trigger="always")
    teacher.generation_config.eos_token_id = None
    # the same tokenizer with rows added after the student's (a padded or extended vocabulary) is accepted
    extended = _word_tokenizer(words + [f"x{i}" for i in range(32)])
    assert vocabulary_difference(student_tokenizer, extended) is None
    with S2TLogitsProcessor(student, teacher=LocalTeacher(teacher, tokenizer=extended), tokenizer=student_tokenizer,
                            selection="teacher", trigger="always") as s2t:
        student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                         logits_processor=[s2t])
        assert s2t.stats["triggers"] > 0


def test_a_served_teachers_identity_is_what_the_server_lists():
    """A collection's identity of a served teacher: the served model's name, root and maximum length (a restarted
    server that serves another checkpoint under the same name is another teacher), not the server's address."""
    from s2t_hf.shard_store import model_identity

    identities = []
    for root in ("/models/step-1000", "/models/step-1000", "/models/step-2000"):
        server = _PlainCompletionsServer(models=[{"id": "plain", "root": root, "max_model_len": 64}])
        try:
            identities.append(model_identity(RemoteTeacher(server.url, check=False, max_retries=0)))
        finally:
            server.close()
    assert identities[0] == {
        "kind": "served", "model": "plain", "root": "/models/step-1000", "max_model_len": 64,
        "teacher": "RemoteTeacher",
    }
    assert identities[1] == identities[0] and identities[2]["root"] == "/models/step-2000"


# --------------------------------------------------------------------------------------------------------------------
# The transport: size cap, jitter, Retry-After, a counter shared by threads, credentials never shown


def test_transport_refuses_an_oversized_answer_and_honours_retry_after():
    import time

    from scripted_server import ScriptedServer

    from s2t_hf.teachers.transport import JSONClient, ServerError

    with ScriptedServer(lambda method, path, body: (200, {"data": "x" * 5000})) as server:
        client = JSONClient(server.url, max_retries=0, max_response_bytes=1000)
        with pytest.raises(ServerError, match=r"answered `GET /v1/models` with more than 1000 bytes; raise "):
            client.request("GET", "/v1/models")
        assert JSONClient(server.url).request("GET", "/v1/models") == {"data": "x" * 5000}
    with pytest.raises(ValueError, match="`max_response_bytes` must be a positive integer, got 0"):
        JSONClient("http://127.0.0.1:9", max_response_bytes=0)

    answers = iter([(503, {"detail": "busy"}, {"Retry-After": "1"}), (200, {"ok": True})])
    with ScriptedServer(lambda method, path, body: next(answers)) as server:
        client = JSONClient(server.url, max_retries=1, backoff=0.01)
        start = time.monotonic()
        assert client.request("GET", "/v1/models") == {"ok": True}
        assert time.monotonic() - start >= 1.0  # the server's wait, not the 0.01 s backoff
    assert client.requests == 2


def test_a_completion_the_server_dropped_is_retried_then_reported_as_no_answer():
    # vLLM answers every request in flight with finish_reason "abort" and no token when it shuts down: that is no
    # answer (a client reading its empty log-probabilities would report a wrong cause, or keep a cut reply)
    from scripted_server import ScriptedServer

    from s2t_hf.teachers.transport import JSONClient, ServerError

    aborted = {"choices": [{"index": 0, "text": "", "token_ids": [], "logprobs": {"top_logprobs": []},
                            "finish_reason": "abort"}]}
    answered = {"choices": [{"index": 0, "text": "4", "token_ids": [19], "finish_reason": "length"}]}
    answers = iter([(200, aborted), (200, answered)])
    with ScriptedServer(lambda method, path, body: next(answers)) as server:
        client = JSONClient(server.url, max_retries=1, backoff=0.01)
        assert client.request("POST", "/v1/completions", {"prompt": [1]}) == answered
        assert server.posts("/v1/completions") == 2
    errored = {"choices": [{"index": 0, "text": "", "finish_reason": "error"}]}
    for dropped, reason in ((aborted, "abort"), (errored, "error")):
        with ScriptedServer(lambda method, path, body, dropped=dropped: (200, dropped)) as server:
            client = JSONClient(server.url, max_retries=0, server_name="vLLM server")
            with pytest.raises(ServerError, match=rf"vLLM server at .* did not answer `POST /v1/completions` after 1 "
                                                  rf"tries \(the server ended the request without answering it "
                                                  rf"\(finish_reason '{reason}' for choice 0\)\)"):
                client.request("POST", "/v1/completions", {"prompt": [1]})
    # any other answer, completions that ended normally included, is returned as it is
    for fine in ({"choices": [{"index": 0, "finish_reason": "stop"}]}, {"choices": "x"}, [1, 2], {"data": []}):
        with ScriptedServer(lambda method, path, body, fine=fine: (200, fine)) as server:
            assert JSONClient(server.url, max_retries=0).request("POST", "/v1/completions", {}) == fine


def test_transport_retries_with_jitter_and_counts_from_many_threads():
    from concurrent.futures import ThreadPoolExecutor

    from scripted_server import ScriptedServer

    from s2t_hf.teachers.transport import JSONClient

    client = JSONClient("http://127.0.0.1:9", backoff=1.0)
    delays = [client.retry_delay(2) for _ in range(200)]
    assert all(1.0 <= d < 3.0 for d in delays) and len(set(delays)) > 150  # spread, so threads do not retry at once
    assert client.retry_delay(1, retry_after=7.0) == 7.0 and client.retry_delay(1, retry_after=0.0) >= 0.5
    with ScriptedServer(lambda method, path, body: (200, {})) as server:
        client = JSONClient(server.url, max_concurrency=16)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: client.request("GET", "/v1/models"), range(800)))
        assert client.requests == 800 == len(server.requests)


def test_credentials_in_base_url_are_sent_and_never_shown():
    from scripted_server import ScriptedServer

    from s2t_hf.teachers.transport import JSONClient, ServerError, redact_url, server_root

    with ScriptedServer(lambda method, path, body: (200, {"data": [{"id": "m"}]})) as server:
        url = server.url.replace("http://", "http://alice:s3cret@") + "/v1/"
        teacher = RemoteTeacher(url, check=False, max_retries=0)
        assert teacher.base_url == server.url.replace("http://", "http://alice:***@")
        assert "s3cret" not in repr(teacher) and teacher.model == "m"
        assert server.requests[0][1] == "/v1/models"  # `/v1/` dropped from the address
        assert server.requests[0][3]["Authorization"] == "Basic YWxpY2U6czNjcmV0"
    with pytest.raises(ServerError) as error:
        JSONClient("http://alice:s3cret@127.0.0.1:9", max_retries=0, timeout=0.5).request("GET", "/v1/models")
    assert "s3cret" not in str(error.value) and "alice:***@127.0.0.1:9" in str(error.value)
    with pytest.raises(ValueError) as error:
        JSONClient("ftp://alice:s3cret@host")
    assert "s3cret" not in str(error.value)
    assert redact_url("http://host:1") == "http://host:1" and server_root("http://h/v1") == "http://h"


# --------------------------------------------------------------------------------------------------------------------
# Replies of the wrong shape: the documented error, never a raw AttributeError or TypeError

WRONG_SHAPES = [
    [1, 2],
    {"choices": None},
    {"choices": [1]},
    {"choices": [{"index": 0, "logprobs": [1]}]},
    {"choices": [{"index": 0, "logprobs": {"tokens": [5], "token_logprobs": ["x"], "top_logprobs": [{}]}}]},
    {"choices": [{"index": 0, "logprobs": {"tokens": ["token_id:-3"], "token_logprobs": [-0.1],
                                           "top_logprobs": [{}]}}]},
    {"choices": [{"index": 0, "logprobs": {"tokens": [None], "token_logprobs": [0.0], "top_logprobs": None}}]},
    {"choices": [{"index": -1, "prompt_logprobs": [None, {"token_id:5": {"logprob": -1.0}}] * 4}]},
    {"choices": [{"index": 0, "prompt_logprobs": [None, {"token_id:5": -1.0}] * 4}]},
    "a string",
]


@pytest.mark.parametrize("reply", WRONG_SHAPES, ids=range(len(WRONG_SHAPES)))
def test_a_remote_teacher_refuses_replies_of_the_wrong_shape(reply):
    from scripted_server import ScriptedServer

    def answer(method, path, body):
        return (200, {"data": [{"id": "m", "max_model_len": 64}]}) if method == "GET" else (200, reply)

    with ScriptedServer(answer) as server:
        teacher = RemoteTeacher(server.url, check=False, max_retries=0)
        teacher.prepare(tiny_model("llama", seed=0))
        ids = torch.tensor([[5, 6, 7]])
        valid = torch.ones(1, 2, dtype=torch.bool)
        one = dict(rows=torch.tensor([0]), candidate_ids=torch.tensor([[8, 9]]), valid=valid)
        with pytest.raises(RemoteTeacherError):
            teacher.select(ids, torch.ones_like(ids), **one)
        with pytest.raises(RemoteTeacherError):
            teacher.takeover(ids, torch.ones_like(ids), torch.tensor([0]))
        with pytest.raises(RemoteTeacherError):
            teacher.score_trajectories([[5, 6, 7, 8]], torch.tensor([[0, 2]]), torch.tensor([[8, 9]]))
    for models in ([1, 2], {"data": {"id": "m"}}, {"data": [{"name": "m"}]}):
        with ScriptedServer(lambda method, path, body, models=models: (200, models)) as server:
            with pytest.raises(RemoteTeacherError, match="/v1/models|lists no model"):
                RemoteTeacher(server.url, check=False, max_retries=0)


def test_a_server_in_a_processed_log_probability_mode_is_refused():
    """A server that honours `allowed_token_ids` but returns the log-probabilities after it (vLLM's
    `--logprobs-mode processed_logprobs`): the teacher's top-1 over its vocabulary cannot be read."""
    from scripted_server import ScriptedServer

    def answer(method, path, body):
        if method == "GET":
            return 200, {"data": [{"id": "m"}]}
        if path != "/v1/completions":
            return 404, {"detail": "Not Found"}
        token = (body.get("allowed_token_ids") or [2])[0]  # processed: only the allowed token is left
        key = f"token_id:{token}"
        logprobs = {"tokens": [key], "token_logprobs": [0.0], "top_logprobs": [{key: 0.0}]}
        return 200, {"choices": [{"index": 0, "text": "x", "logprobs": logprobs}]}

    with ScriptedServer(answer) as server:
        with pytest.warns(UserWarning, match="got no `tokenizer`"):
            with pytest.raises(RemoteTeacherError, match="processed log-probability mode.*raw_logprobs"):
                RemoteTeacher(server.url, max_retries=0)
