"""The remote teacher against a real vLLM server (marker `engine`), token for token against the same teacher in
transformers.

The server runs from its own virtual environment (`bash scripts/engine_venv.sh` builds `.venv-engine`; vLLM pins an
older transformers than the library's). It is started once per test session on loopback, serving a small Llama teacher
with random weights and a locally built word-level tokenizer; the tests load the same directory into transformers as
the local teacher.

`S2T_ENGINE_PYTHON` names the engine's Python (default: `.venv-engine/bin/python` when it exists). When it is unset and
no engine venv exists the tests are skipped with a message; `S2T_SKIP_ENGINE=1` skips them explicitly. `.ci/run` sets
`S2T_ENGINE_PYTHON`, so in CI they run (and fail if the server does not start).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import entropy_gap_threshold
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LogitsProcessor, LogitsProcessorList

from s2t_hf import S2TLogitsProcessor, collect_selection_data
from s2t_hf.teachers import RemoteTeacher, RemoteTeacherError


pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = float(os.environ.get("S2T_ENGINE_START_TIMEOUT", "900"))
GREEDY_NEW = 16


def engine_python() -> str | None:
    if os.environ.get("S2T_SKIP_ENGINE") == "1":
        pytest.skip("S2T_SKIP_ENGINE=1: the tests against a real vLLM server are skipped.")
    path = os.environ.get("S2T_ENGINE_PYTHON")
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"S2T_ENGINE_PYTHON={path} does not exist; build it with `bash scripts/engine_venv.sh`."
            )
        return path
    default = REPO / ".venv-engine" / "bin" / "python"
    if default.exists():
        return str(default)
    pytest.skip(
        "No serving engine: the remote-teacher tests need vLLM in its own venv. Build it with "
        "`bash scripts/engine_venv.sh` (or set S2T_ENGINE_PYTHON); set S2T_SKIP_ENGINE=1 to silence this."
    )


def save_teacher(directory: Path, tokenizer=None):
    """A small Llama teacher (random weights, head_dim 64) and its tokenizer (by default the word-level task
    tokenizer), saved for vLLM."""
    from s2t_hf.tasks import build_tokenizer

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(model_max_length=1024)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, python: str, model_dir: Path, log_path: Path, extra_args: Sequence[str] = (),
                 extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = model_dir
        self.log_path = log_path
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)
        env.update(extra_env or {})
        command = [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024", "--max-logprobs", "20",
            "--enforce-eager", "--disable-log-stats", *extra_args,
        ]
        self.log = open(log_path, "w")
        start = time.monotonic()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"The vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - start > START_TIMEOUT:
                self.stop()
                raise RuntimeError(f"The vLLM server did not start within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
            time.sleep(1)
        self.start_seconds = time.monotonic() - start
        sys.stderr.write(f"\n[engine] vLLM server up on {self.url} in {self.start_seconds:.1f} s\n")

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "".join(open(self.log_path).readlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def teacher_server(tmp_path_factory):
    """A vLLM server of a small Llama teacher with the word-level tokenizer (a generator: the server, then stopped)."""
    python = engine_python()
    directory = tmp_path_factory.mktemp("engine")
    model_dir = directory / "teacher"
    save_teacher(model_dir)
    server = Server(python, model_dir, directory / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    # the last test of this module kills it
    yield from teacher_server(tmp_path_factory)


@pytest.fixture(scope="session")
def models(engine):
    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(teacher.config).eval()
    student.save_pretrained(engine.model_dir.parent / "student")  # for lm-eval
    tokenizer.save_pretrained(engine.model_dir.parent / "student")
    return student, teacher, tokenizer


@pytest.fixture(scope="session")
def remote(engine, models):
    return RemoteTeacher(engine.url, tokenizer=models[2], timeout=60, max_retries=2, backoff=0.2)


def batch(tokenizer, prompts=((5, 6, 7, 8, 9), (10, 11, 12), (13, 14, 15, 16))):
    length = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, attention_mask


def greedy(tokenizer, **overrides):
    return dict(do_sample=False, max_new_tokens=GREEDY_NEW, pad_token_id=tokenizer.pad_token_id, **overrides)


def gap_threshold(student, input_ids, attention_mask, tokenizer) -> float:
    """An entropy threshold near the median, in a clear gap between two signal values (no float-rounding flips)."""
    out = student.generate(input_ids=input_ids, attention_mask=attention_mask, output_scores=True,
                           return_dict_in_generate=True, **greedy(tokenizer))
    return entropy_gap_threshold(out.scores)


def run(student, teacher, input_ids, attention_mask, tokenizer, **kwargs):
    with S2TLogitsProcessor(student, teacher=teacher, tokenizer=tokenizer, record_triggers=True, **kwargs) as s2t:
        out = student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                               **greedy(tokenizer))
        return out, s2t.stats, s2t.records


def assert_same_records(local_records, remote_records):
    assert len(local_records) == len(remote_records) > 0
    for a, b in zip(local_records, remote_records):
        for key in ("row", "step", "cand_ids", "chosen_id"):
            assert a[key] == b[key], key
        assert a["teacher_top1"] == b["teacher_top1"]
        # vLLM's CPU kernels and transformers' differ in float32 rounding only
        torch.testing.assert_close(torch.tensor(b["teacher_probs"]), torch.tensor(a["teacher_probs"]), rtol=1e-4,
                                   atol=1e-5)


def test_s2t_remote_equals_local_entropy_trigger_left_padded_batch(models, remote):
    student, teacher, tokenizer = models
    input_ids, attention_mask = batch(tokenizer)
    threshold = gap_threshold(student, input_ids, attention_mask, tokenizer)
    kwargs = dict(trigger="entropy", trigger_threshold=threshold, top_k=4, warmup_tokens=2)
    local_out, local_stats, local_records = run(student, teacher, input_ids, attention_mask, tokenizer, **kwargs)
    start = time.perf_counter()
    remote_out, remote_stats, remote_records = run(student, remote, input_ids, attention_mask, tokenizer, **kwargs)
    elapsed = time.perf_counter() - start
    assert torch.equal(remote_out, local_out)
    assert 0 < local_stats["triggers"] < local_stats["eligible_steps"]
    for key in ("triggers", "flips", "teacher_hits", "triggers_per_row"):
        assert remote_stats[key] == local_stats[key], key
    assert local_stats["flips"] > 0  # the teacher changed something, so equality means something
    assert 0 < remote_stats["teacher_calls"] <= remote_stats["triggers"]
    assert_same_records(local_records, remote_records)
    sys.stderr.write(f"\n[engine] S2T generate with the remote teacher: {elapsed:.2f} s, "
                     f"{remote_stats['teacher_calls']} trigger steps\n")


def test_s2t_remote_equals_local_random_trigger_without_records(models, remote):
    student, teacher, tokenizer = models
    input_ids, attention_mask = batch(tokenizer, prompts=((20, 21, 22), (23, 24, 25, 26, 27, 28), (29,), (30, 31)))
    kwargs = dict(trigger="random", trigger_rate=0.3, seed=0, top_k=8, warmup_tokens=0)
    outs = []
    for t in (teacher, remote):
        with S2TLogitsProcessor(student, teacher=t, tokenizer=tokenizer, **kwargs) as s2t:
            outs.append(student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                                         **greedy(tokenizer)))
            outs.append(s2t.stats["teacher_hits"])
    assert torch.equal(outs[0], outs[2])
    assert outs[1] == outs[3]


def test_takeover_remote_equals_local_and_teacher_greedy(models, remote):
    student, teacher, tokenizer = models
    input_ids, attention_mask = batch(tokenizer)
    kwargs = dict(trigger="always", selection="takeover", warmup_tokens=0)
    local_out, local_stats, local_records = run(student, teacher, input_ids, attention_mask, tokenizer, **kwargs)
    remote_out, remote_stats, remote_records = run(student, remote, input_ids, attention_mask, tokenizer, **kwargs)
    teacher_out = teacher.generate(input_ids=input_ids, attention_mask=attention_mask, **greedy(tokenizer))
    assert torch.equal(remote_out, local_out)
    assert torch.equal(remote_out, teacher_out)
    assert remote_stats["teacher_hits"] == local_stats["teacher_hits"]
    assert_same_records(local_records, remote_records)


def test_takeover_remote_respects_other_processors_constraints(models, remote):
    """The served teacher's greedy token, when an earlier processor rules it out, is replaced by its argmax among the
    allowed tokens (a request constrained to them): the same tokens as the teacher's own constrained generate."""
    student, teacher, tokenizer = models
    input_ids, attention_mask = batch(tokenizer)
    unconstrained = teacher.generate(input_ids=input_ids, attention_mask=attention_mask, **greedy(tokenizer))
    banned = unconstrained[:, input_ids.shape[1]:][:, :3].flatten().unique().tolist()
    constraints = dict(bad_words_ids=[[t] for t in banned], min_new_tokens=GREEDY_NEW)
    expected = teacher.generate(input_ids=input_ids, attention_mask=attention_mask, **greedy(tokenizer, **constraints))
    with S2TLogitsProcessor(student, teacher=remote, tokenizer=tokenizer, trigger="always", selection="takeover",
                            warmup_tokens=0) as s2t:
        out = student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                               **greedy(tokenizer, **constraints))
    assert torch.equal(out, expected)
    assert not set(out[:, input_ids.shape[1]:].flatten().tolist()) & set(banned)


def test_collection_through_the_server_matches_local_collection(models, remote):
    student, teacher, tokenizer = models
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, len(tokenizer), (int(n),), generator=generator).tolist()
               for n in torch.randint(2, 6, (5,), generator=generator)]
    kwargs = dict(prompts=prompts, tokenizer=tokenizer, top_k=6, fraction=0.2, max_new_tokens=12, batch_size=3,
                  signal="entropy", show_progress=False)
    local = collect_selection_data(student, teacher, **kwargs)
    served = collect_selection_data(student, remote, **kwargs)
    assert len(local) == len(served) > 0
    for a, b in zip(local, served):
        for key in ("context_ids", "cand_ids", "prompt_index", "step", "teacher_top1"):
            assert a[key] == b[key], key
        # stated tolerance: float32 rounding of two implementations (measured differences ~1e-6)
        torch.testing.assert_close(torch.tensor(b["teacher_probs"]), torch.tensor(a["teacher_probs"]), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(torch.tensor(b["student_probs"]), torch.tensor(a["student_probs"]))


def test_remote_teacher_clear_errors(engine, models, remote):
    student, teacher, tokenizer = models
    with pytest.raises(ValueError, match="`kl` trigger needs the teacher's distribution"):
        S2TLogitsProcessor(student, teacher=remote, trigger="kl")
    with pytest.raises(ValueError, match="`lazy_teacher=False`"):
        S2TLogitsProcessor(student, teacher=remote, trigger="entropy", lazy_teacher=False)
    with pytest.raises(ValueError, match="signal='entropy'"):
        collect_selection_data(student, remote, prompts=[[5, 6, 7]], signal="kl", show_progress=False)
    with pytest.raises(ValueError, match="signal='entropy'"):
        collect_selection_data(student, remote, prompts=[[5, 6, 7]], mode="on_policy", show_progress=False)
    from s2t_hf.tasks import build_tokenizer

    other = build_tokenizer(extra_words=["zebra", "quokka"])
    with pytest.raises(ValueError, match="does not match `tokenizer`"):
        RemoteTeacher(engine.url, tokenizer=other)
    with pytest.raises(RemoteTeacherError, match="does not serve `model='other'`"):
        RemoteTeacher(engine.url, tokenizer=tokenizer, model="other")
    with pytest.raises(RemoteTeacherError, match="did not answer"):
        RemoteTeacher(f"http://127.0.0.1:{free_port()}", tokenizer=tokenizer, max_retries=1, backoff=0.01)
    wide = RemoteTeacher(engine.url, tokenizer=tokenizer, top_logprobs=50)  # the server allows 20
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RemoteTeacherError, match="--max-logprobs"):
        wide.select(ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([[8, 9]]),
                    torch.ones(1, 2, dtype=torch.bool), with_log_probs=True)


def test_lm_eval_s2t_model_with_the_served_teacher_equals_the_local_teacher(engine, models):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 's2t-hf[lm-eval]')")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import s2t_hf.integrations.lm_eval  # noqa: F401  (registers `s2t`)

    student_dir = engine.model_dir.parent / "student"
    questions = ["tom has 5 apples .", "ann gets 3 books and 2 boxes ?", "bob", "how many buttons ?"]
    requests = [
        Instance("generate_until", {}, (q, {"until": ["<eos>"], "max_gen_toks": 12, "do_sample": False}), i)
        for i, q in enumerate(questions)
    ]
    answers = {}
    for name, teacher in (("local", str(engine.model_dir)), ("remote", engine.url)):
        model = get_model("s2t")(
            pretrained=str(student_dir), teacher=teacher, trigger="random", trigger_rate=0.5, seed=0, top_k=4,
            warmup_tokens=0, device="cpu", dtype="float32", batch_size=4,
        )
        answers[name] = model.generate_until(requests)
        assert model.s2t_stats["triggers"] > 0
    assert answers["remote"] == answers["local"]


class _KillServerAt(LogitsProcessor):
    """Kills the server process when generation reaches `step` new tokens (runs before the S2T processor)."""

    def __init__(self, engine, prompt_length: int, step: int):
        self.engine, self.prompt_length, self.step = engine, prompt_length, step

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step and self.engine.process.poll() is None:
            os.killpg(self.engine.process.pid, signal.SIGKILL)
            self.engine.process.wait()
        return scores


def test_zz_killed_server_mid_generation_raises_a_clear_error(engine, models):
    """Runs last: it kills the session's server."""
    student, _, tokenizer = models
    teacher = RemoteTeacher(engine.url, tokenizer=tokenizer, max_retries=2, backoff=0.05, timeout=10)
    input_ids, attention_mask = batch(tokenizer)
    with S2TLogitsProcessor(student, teacher=teacher, tokenizer=tokenizer, trigger="always", warmup_tokens=0) as s2t:
        processors = LogitsProcessorList([_KillServerAt(engine, input_ids.shape[1], 4), s2t])
        with pytest.raises(RemoteTeacherError, match="did not answer .* after 3 tries"):
            student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                             **greedy(tokenizer))
        assert s2t.stats["teacher_calls"] == 4  # it answered until the server died
