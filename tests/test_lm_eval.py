"""The `s2t` model type of lm-evaluation-harness, offline: a local task (YAML + JSONL written here) and tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig


lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 's2t-hf[lm-eval]')")

from s2t_hf.integrations.lm_eval import S2TLM  # noqa: E402  (registers the `s2t` model type)


TASK = "s2t_toy"
QUESTIONS = [
    "tom has 5 apples .", "ann gets 3 books and 2 boxes ?", "bob", "amy has 7 beads , ben has 9 .",
    "ada and anna are at the bus .", "how many buttons ?",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from s2t_hf.tasks import build_tokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = build_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, initializer_range=0.2,
        )
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n"
        '  until: ["<eos>"]\n'
        "  max_gen_toks: 10\n"
        "  do_sample: false\n"
        "metric_list:\n"
        "  - metric: exact_match\n"
    )
    return root


_RESULTS: dict[tuple[str, str], list[str]] = {}


def evaluate(workspace: Path, model: str, model_args: str) -> list[str]:
    """The generated answers, in document order (cached: the `hf` baselines are used by several tests)."""
    from lm_eval.tasks import TaskManager

    key = (model, model_args)
    if key not in _RESULTS:
        results = lm_eval.simple_evaluate(
            model=model,
            model_args=f"{model_args},dtype=float32",
            tasks=[TASK],
            # only the local task: indexing lm-eval's thousands of built-in tasks takes longer than the evaluation
            task_manager=TaskManager(include_path=str(workspace / "tasks"), include_defaults=False),
            batch_size=4,
            device="cpu",
            log_samples=True,
        )
        samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
        _RESULTS[key] = [s["resps"][0][0] for s in samples]
    return _RESULTS[key]


def test_s2t_lm_eval_command_line_with_trigger_never_equals_hf(workspace, tmp_path):
    """`s2t-lm-eval --model s2t` (lm-eval's command line) runs offline and, never triggering, answers as `hf`."""
    student = workspace / "student"
    args = f"pretrained={student},teacher={workspace / 'teacher'},trigger=never,dtype=float32"
    command = [
        sys.executable, "-m", "s2t_hf.integrations.lm_eval", "--model", "s2t", "--model_args", args, "--tasks", TASK,
        "--include_path", str(workspace / "tasks"), "--device", "cpu", "--batch_size", "4", "--log_samples",
        "--output_path", str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert TASK in done.stdout and "exact_match" in done.stdout
    [samples_file] = list((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl"))
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    plain = evaluate(workspace, "hf", f"pretrained={student}")
    assert [s["resps"][0][0] for s in samples] == plain
    assert any(plain)  # something was generated


def test_s2t_takeover_at_every_step_equals_hf_on_the_teacher(workspace):
    teacher = workspace / "teacher"
    on_teacher = evaluate(workspace, "hf", f"pretrained={teacher}")
    on_student = evaluate(workspace, "hf", f"pretrained={workspace / 'student'}")
    s2t = evaluate(
        workspace, "s2t",
        f"pretrained={workspace / 'student'},teacher={teacher},trigger=always,selection=takeover,warmup_tokens=0",
    )
    assert s2t == on_teacher
    assert s2t != on_student  # the teacher differs from the student on this task, so equality means something


def test_s2t_entropy_trigger_calibrated_from_a_rate(workspace):
    from lm_eval.api.registry import get_model

    model = get_model("s2t")(
        pretrained=str(workspace / "student"), teacher=str(workspace / "teacher"), trigger="entropy",
        trigger_rate=0.3, device="cpu", dtype="float32", batch_size=4,
    )
    assert isinstance(model, S2TLM)
    from lm_eval.api.instance import Instance

    requests = [
        Instance("generate_until", {}, (q, {"until": ["<eos>"], "max_gen_toks": 10, "do_sample": False}), i)
        for i, q in enumerate(QUESTIONS)
    ]
    outputs = model.generate_until(requests)
    assert len(outputs) == len(QUESTIONS)
    assert model.s2t.config.trigger_threshold is not None
    assert model.s2t_stats["eligible_steps"] > 0


def test_s2t_with_a_saved_learned_trigger_calibrated_from_a_rate(tmp_path):
    """A selector saved with a fit learned trigger row drives collaborative S2T in lm-eval: loaded with
    `from_pretrained`, its trigger calibrated from a rate on the first prompts, firing at about that rate."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from s2t_hf import S2TSelector
    from s2t_hf.tasks import build_tokenizer, padded_vocab_size

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, initializer_range=0.2,
    )  # fmt: skip
    for name, seed in (("student", 0), ("teacher", 1)):  # spare output rows for the selector's reserved rows
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    selector = S2TSelector.create(
        AutoModelForCausalLM.from_pretrained(tmp_path / "student"), tokenizer, num_bins=4, use_lora=False,
        learned_trigger=True,
    )
    selector.write_reserved_row(selector.trigger_token_id, torch.randn(32, generator=torch.Generator().manual_seed(0)))
    selector.config.trigger, selector.config.trigger_adapter_mode = "learned", selector.config.adapter_mode
    selector.save_pretrained(tmp_path / "selector")

    model = get_model("s2t")(
        pretrained=str(tmp_path / "student"), selector=str(tmp_path / "selector"), selection="teacher",
        teacher=str(tmp_path / "teacher"), trigger_rate=0.3, device="cpu", dtype="float32", batch_size=4,
    )
    requests = [
        Instance("generate_until", {}, (q, {"until": ["<eos>"], "max_gen_toks": 10, "do_sample": False}), i)
        for i, q in enumerate(QUESTIONS)
    ]
    assert len(model.generate_until(requests)) == len(QUESTIONS)
    assert model.s2t.config.trigger == "learned" and model.s2t.config.trigger_threshold is not None
    stats = model.s2t_stats
    assert 0 < stats["triggers"] < stats["eligible_steps"]


def test_s2t_model_arguments_are_checked(workspace, tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model

    from conftest import custom_code_checkpoint

    s2t = get_model("s2t")
    student = str(workspace / "student")
    with pytest.raises(ValueError, match="Give either `selector` .* or `teacher` .*, not both"):
        s2t(pretrained=student, selector=str(tmp_path / "selector"), teacher=str(workspace / "teacher"), device="cpu")
    with pytest.raises(ValueError, match="The `entropy` trigger needs `trigger_threshold=...` or `trigger_rate=...`"):
        s2t(pretrained=student, teacher=str(workspace / "teacher"), trigger="entropy", device="cpu")
    # a teacher checkpoint with custom code is refused, its code never run (as lm-eval does for the student); no
    # prompt asks for it either (the user would answer yes here)
    custom = custom_code_checkpoint(tmp_path / "custom")
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(ValueError, match="(?s)contains custom code.*trust_remote_code"):
        s2t(pretrained=student, teacher=str(custom), trigger="never", device="cpu")
    assert not (custom / "RAN").exists()


def test_without_lm_eval_the_import_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "s2t_hf.integrations.lm_eval")
    with pytest.raises(ImportError, match=r'needs `lm-eval`; install it with `pip install "s2t-hf\[lm-eval\]"`'):
        importlib.import_module("s2t_hf.integrations.lm_eval")


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason="../shared/data/gsm8k is not beside the checkout")
def test_lm_evals_own_gsm8k_runs_offline_on_the_local_jsonl(workspace, tmp_path):
    """`s2t-lm-eval --local_data gsm8k=DIR`: lm-eval's own GSM8K task (prompt, 5 shots, filters) on the local files."""
    args = f"pretrained={workspace / 'student'},teacher={workspace / 'teacher'},trigger=always,warmup_tokens=0"
    command = [
        sys.executable, "-m", "s2t_hf.integrations.lm_eval", "--model", "s2t", "--model_args", f"{args},dtype=float32",
        "--tasks", "gsm8k_local", "--local_data", f"gsm8k={GSM8K}", "--limit", "2", "--gen_kwargs", "max_gen_toks=3",
        "--device", "cpu", "--batch_size", "2", "--log_samples", "--output_path", str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gsm8k_local" in done.stdout and "exact_match" in done.stdout and "flexible-extract" in done.stdout
    [samples_file] = list((tmp_path / "out").rglob("samples_gsm8k_local_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    samples = sorted((s for s in samples if s["filter"] == "strict-match"), key=lambda s: s["doc_id"])  # one per doc
    test = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:2]]
    train = {json.loads(line)["question"] for line in (GSM8K / "train.jsonl").read_text().splitlines()}
    assert [s["doc"]["question"] for s in samples] == [t["question"] for t in test]
    for sample, problem in zip(samples, test):
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        shots = prompt.split("Question: ")[1:]
        # lm-eval's prompt: five solved training problems, then the test question
        assert len(shots) == 6 and shots[-1] == f"{problem['question']}\nAnswer:"
        assert all(shot.split("\nAnswer:")[0] in train for shot in shots[:5])


def test_local_task_names_what_is_wrong(tmp_path):
    from s2t_hf.integrations.lm_eval import _local_data_arguments, local_task

    with pytest.raises(ValueError, match="`task` must be one of"):
        local_task("mmlu", tmp_path, tmp_path / "tasks")
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"reads the splits \['train', 'test'\] but .* has no train.jsonl"):
        local_task("gsm8k", tmp_path, tmp_path / "tasks")
    (tmp_path / "train.jsonl").write_text("")
    argv = _local_data_arguments(["--tasks", "gsm8k_local", "--local_data", f"gsm8k={tmp_path}"], str(tmp_path / "t"))
    assert argv == ["--tasks", "gsm8k_local", "--include_path", str(tmp_path / "t")]
    assert (tmp_path / "t" / "gsm8k_local.yaml").read_text().startswith("include: ")
    with pytest.raises(SystemExit, match="--local_data takes TASK=DIR"):
        _local_data_arguments(["--local_data", "gsm8k"], str(tmp_path / "t"))


def test_a_teacher_of_another_tokenizer_is_loaded_with_its_own(workspace, tmp_path):
    """A local teacher directory with another tokenizer: loaded with it, it scores the candidates as text."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from tokenizer_pair import sentencepiece_unigram

    tokenizer = sentencepiece_unigram()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    model = get_model("s2t")(
        pretrained=str(workspace / "student"), teacher=str(tmp_path / "other"), trigger="always", warmup_tokens=0,
        device="cpu", dtype="float32", batch_size=4,
    )
    assert model.s2t.teacher_interface.text_scorer is not None
    requests = [
        Instance("generate_until", {}, (q, {"until": ["<eos>"], "max_gen_toks": 6, "do_sample": False}), i)
        for i, q in enumerate(QUESTIONS)
    ]
    assert len(model.generate_until(requests)) == len(QUESTIONS)
    stats = model.s2t_stats
    assert stats["triggers"] > 0 and stats["teacher_calls"] > 0 and stats["flips"] > 0


@pytest.mark.parametrize("adapter_mode", ["scoring", "generate"])
def test_log_likelihood_with_a_selector_scores_the_base_student(workspace, tmp_path, adapter_mode):
    """With a trained selector (LoRA and bin rows added to the vocabulary), log-likelihood requests give what `hf`
    gives on the base student, before and after a generation; the processor's hook is on the model only while it
    generates, and `close` leaves nothing behind."""
    from conftest import randomize_trainable
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from transformers import AutoTokenizer

    from s2t_hf import S2TSelector

    student = workspace / "student"
    tokenizer = AutoTokenizer.from_pretrained(student)
    selector = S2TSelector.create(AutoModelForCausalLM.from_pretrained(student), tokenizer, num_bins=4, lora_r=4)
    assert selector.config.num_added_rows > 0  # the tokenizer fills the vocabulary: rows are added for the bins
    randomize_trainable(selector, seed=3).save_pretrained(tmp_path / "selector")

    requests = [Instance("loglikelihood", {}, (q, " 5 ."), i) for i, q in enumerate(QUESTIONS)]
    options = dict(device="cpu", dtype="float32", batch_size=4)
    plain = [value for value, _ in get_model("hf")(pretrained=str(student), **options).loglikelihood(requests)]
    with get_model("s2t")(pretrained=str(student), selector=str(tmp_path / "selector"), trigger="always",
                          warmup_tokens=0, adapter_mode=adapter_mode, **options) as model:
        assert not model.s2t.state_hook.attached
        before = [value for value, _ in model.loglikelihood(requests)]
        generated = [Instance("generate_until", {}, (q, {"until": ["<eos>"], "max_gen_toks": 6, "do_sample": False}), i)
                     for i, q in enumerate(QUESTIONS)]
        model.generate_until(generated)
        assert model.s2t_stats["triggers"] > 0 and not model.s2t.state_hook.attached
        after = [value for value, _ in model.loglikelihood(requests)]
    assert before == pytest.approx(plain, abs=1e-4) and after == pytest.approx(plain, abs=1e-4)
    assert not model.s2t.state_hook.attached


def test_trust_remote_code_given_as_text_is_read_as_a_boolean(workspace, tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model

    from conftest import custom_code_checkpoint

    custom = custom_code_checkpoint(tmp_path / "custom")
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(ValueError, match="(?s)contains custom code.*trust_remote_code"):  # "False" is not true
        get_model("s2t")(pretrained=str(workspace / "student"), teacher=str(custom), trigger="never", device="cpu",
                         trust_remote_code="False")
    assert not (custom / "RAN").exists()
    with pytest.raises(ValueError, match="`trust_remote_code` must be true or false, got 'maybe'"):
        get_model("s2t")(pretrained=str(workspace / "student"), trigger="never", device="cpu",
                         trust_remote_code="maybe")
