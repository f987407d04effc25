"""Tests of the built-in arithmetic task: generator, splits, answers, tokenizer, chat template, accuracy helper."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from s2t_hf.tasks import (
    ArithmeticTaskConfig,
    build_tokenizer,
    check_answer,
    decode_number,
    encode_number,
    extract_answer,
    generate_problems,
    iter_problems,
    padded_vocab_size,
    problem_split,
)


# ------------------------------------------------------------------------------------------------------------------
# An independent reader of problem texts: parses the sentences with regular expressions and simulates every count.
# It shares no code with the generator, so agreement checks both.
# ------------------------------------------------------------------------------------------------------------------

NUM = r"((?:\d )*\d)"
PATTERNS = [
    (rf"^(\w+) (?:has|starts with|owns) {NUM} (\w+)$", lambda a, n, o: [(a, o, "=", n)]),
    (rf"^(\w+) (?:buys|wins) {NUM} (\w+)$", lambda a, n, o: [(a, o, "+", n)]),
    (rf"^(\w+) finds {NUM} more (\w+)$", lambda a, n, o: [(a, o, "+", n)]),
    (rf"^(\w+) (?:sells|loses|uses) {NUM} (\w+)$", lambda a, n, o: [(a, o, "-", n)]),
    (rf"^(\w+) (?:gets|takes) {NUM} (\w+) from (\w+)$", lambda a, n, o, b: [(a, o, "+", n), (b, o, "-", n)]),
    (rf"^(\w+) gives {NUM} (\w+) to (\w+)$", lambda a, n, o, b: [(a, o, "-", n), (b, o, "+", n)]),
    (rf"^(\w+) gives (\w+) {NUM} (\w+)$", lambda a, b, n, o: [(a, o, "-", n), (b, o, "+", n)]),
    (r"^(\w+) doubles the (\w+)$", lambda a, o: [(a, o, "*", "2")]),
    (r"^(\w+) triples the (\w+)$", lambda a, o: [(a, o, "*", "3")]),
    (r"^(\w+) now has (twice|three times|four times) as many (\w+)$", None),
]
MULTIPLIERS = {"twice": 2, "three times": 3, "four times": 4}
HEAD = r"(\w+) (?:buys|wins|finds|sells|loses|uses|gets|takes|gives|doubles|triples|has (?:twice|(?:three|four) times))"


def lsd(text: str) -> int:
    return int("".join(reversed(text.split())))


def independent_answer(text: str) -> int:
    *sentences, question = re.split(r" [.?](?: |$)", text)[:-1] if text.endswith("?") else [text]
    del question
    body, question = text.rsplit(" . ", 1)
    match = re.match(r"^(?:how many (\w+) does (\w+) have|what is the number of (\w+) that (\w+) has)", question)
    assert match, question
    obj, person = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    counts: dict[tuple[str, str], int] = {}
    for sentence in (body + " .").split(" . "):
        sentence = sentence.rstrip(" .").split(" , ")[-1]  # drop a filler phrase such as "after lunch ,"
        for pattern, effects in PATTERNS:
            found = re.match(pattern, sentence)
            if not found:
                continue
            if effects is None:
                a, word, o = found.groups()
                changes = [(a, o, "*", str(MULTIPLIERS[word]))]
            else:
                changes = effects(*found.groups())
            for who, what, op, n in changes:
                key, n = (who, what), lsd(n)
                if op == "=":
                    counts[key] = n
                elif key in counts:
                    counts[key] = {"+": counts[key] + n, "-": counts[key] - n, "*": counts[key] * n}[op]
            break
    return counts[(person, obj)]


# ------------------------------------------------------------------------------------------------------------------
# Numbers and answers
# ------------------------------------------------------------------------------------------------------------------


def test_lsd_first_round_trip():
    assert encode_number(0) == "0"
    assert encode_number(305) == "5 0 3"
    assert encode_number(10) == "0 1"
    for value in [*range(1000), 123456]:
        assert decode_number(encode_number(value)) == value
    with pytest.raises(ValueError, match="`value`"):
        encode_number(-1)
    with pytest.raises(ValueError, match="`text`"):
        decode_number("12 3")


def test_extract_and_check_answer():
    assert extract_answer("tom buys : 5 + 2 = 7 ; answer 7") == 7
    assert extract_answer("answer 5 0 3 <eos> junk") == 305
    assert extract_answer("answer 2 1 ; answer 9") == 12  # the first answer commits
    assert extract_answer("tom buys : 5") is None
    assert extract_answer("answer ;") is None
    assert extract_answer("") is None
    assert check_answer("x ; answer 2 1", 12)
    assert not check_answer("x ; answer 2 1", 21)  # digits are least-significant first
    assert not check_answer("x ; answer 3 1", 12)
    assert not check_answer("tom buys : 5 + 2", 2)


# ------------------------------------------------------------------------------------------------------------------
# Generator
# ------------------------------------------------------------------------------------------------------------------


def test_generation_is_deterministic():
    first = generate_problems(30, "train", seed=3)
    assert first == generate_problems(30, "train", seed=3)
    assert generate_problems(10, "train", seed=3) == first[:10]
    assert [p.text for p in generate_problems(30, "train", seed=4)] != [p.text for p in first]
    stream = iter_problems("validation", seed=1)
    assert [next(stream).text for _ in range(5)] == [p.text for p in generate_problems(5, "validation", seed=1)]


def test_splits_are_disjoint():
    splits = ("train", "validation", "test")
    texts = {split: {p.text for p in generate_problems(300, split, seed=0)} for split in splits}
    assert all(len(t) == 300 for t in texts.values())  # no duplicates inside a split
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    for split, split_texts in texts.items():
        assert all(problem_split(t) == split for t in split_texts)
    with pytest.raises(ValueError, match="`split`"):
        generate_problems(1, split="dev")


@pytest.mark.parametrize(
    "split, placement", [("train", "before"), ("test", "before"), ("train", "outside"), ("train", "interleaved")]
)
def test_solution_matches_independent_evaluation(split, placement):
    config = ArithmeticTaskConfig(distractor_placement=placement)
    for problem in generate_problems(300, split, seed=7, config=config):
        assert independent_answer(problem.text) == problem.answer, problem.text
        assert extract_answer(problem.solution) == problem.answer
        assert check_answer(problem.solution, problem.answer)
        *steps, final = problem.solution.split(" ; ")
        assert final == f"answer {encode_number(problem.answer)}"
        assert config.min_operations <= len(steps) <= config.max_operations
        value = None
        for step in steps:
            head, equation = step.split(" : ")
            x, op, b, y = re.fullmatch(rf"{NUM} ([-+*]) {NUM} = {NUM}", equation).groups()
            x, b, y = lsd(x), lsd(b), lsd(y)
            assert value is None or x == value  # steps chain
            assert y == {"+": x + b, "-": x - b, "*": x * b}[op]
            assert 0 <= y <= config.max_value
            found = re.fullmatch(HEAD, head)
            assert found and found.group(1) == problem.person, head
            value = y
        assert value == problem.answer
        assert max(len(w) for w in problem.text.split()) <= 9  # numbers are split into digits
        assert len(problem.solution.split()) <= config.max_solution_words


def test_solutions_need_word_level_choices():
    problems = generate_problems(200, "train", seed=0)
    heads = [step.split(" : ")[0] for p in problems for step in p.solution.split(" ; ")[:-1]]
    assert len({h.split()[1] for h in heads}) >= 10  # verbs
    # the step order follows the text, and the verb of each sentence fixes the operation
    transfers = [p for p in problems if any(v in p.text for v in (" gives ", " takes ", " gets "))]
    assert len(transfers) > 100
    # distractors mention the tracked person or the tracked object too
    assert sum(p.text.count(p.person) > len(p.solution.split(" ; ")) for p in problems) > 20
    assert sum(p.text.count(p.obj) > len(p.solution.split(" ; ")) + 1 for p in problems) > 20


def test_config_validation():
    with pytest.raises(ValueError, match="`min_operations`"):
        ArithmeticTaskConfig(min_operations=3, max_operations=2)
    with pytest.raises(ValueError, match="`distractor_placement`"):
        ArithmeticTaskConfig(distractor_placement="after")
    with pytest.raises(ValueError, match="`max_amount`"):
        ArithmeticTaskConfig(max_amount=5000)
    easy = ArithmeticTaskConfig(min_operations=1, max_operations=1, max_value=99, max_start=50, max_amount=20)
    for problem in generate_problems(50, "train", config=easy):
        assert len(problem.solution.split(" ; ")) == 2
        assert problem.answer <= 99


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_covers_the_task(tokenizer):
    assert 150 <= len(tokenizer) <= 1000
    assert tokenizer.padding_side == "left"
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token} == {"<pad>", "<bos>", "<eos>"}
    for problem in generate_problems(300, "train", seed=1):
        for text in (problem.text, problem.solution):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert len(ids) == len(text.split())
            assert tokenizer.decode(ids) == text


def test_chat_template(tokenizer):
    problem = generate_problems(1, "test")[0]
    prompt = tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, tokenize=False)
    assert prompt.split() == ["<bos>", "<user>", *problem.text.split(), "<assistant>"]
    ids = tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer.apply_chat_template(
        [*problem.messages, {"role": "assistant", "content": problem.solution}], tokenize=False
    )
    assert full.split() == [*prompt.split(), *problem.solution.split(), "<eos>"]


def test_tokenizer_save_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    problem = generate_problems(1, "validation")[0]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.padding_side == "left"
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded(problem.text)["input_ids"] == tokenizer(problem.text)["input_ids"]
    batch = loaded([problem.text, "tom has 5 apples ."], padding=True)
    assert batch["input_ids"][1][0] == loaded.pad_token_id  # left padding survives the round trip


def test_padded_vocab_size(tokenizer):
    size = padded_vocab_size(len(tokenizer))
    assert size % 64 == 0 and size - len(tokenizer) >= 32
    assert padded_vocab_size(32) == 64 and padded_vocab_size(33) == 128
    with pytest.raises(ValueError, match="`tokenizer_size`"):
        padded_vocab_size(0)


def test_import_is_light():
    code = (
        "import json, sys, s2t_hf.tasks as t; t.generate_problems(2); t.check_answer('answer 1', 1); "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------------------------------------------------------
# Pair settings, training stream, accuracy helper (tiny random models, no real training)
# ------------------------------------------------------------------------------------------------------------------


def test_pair_config(tokenizer):
    from transformers import AutoModelForCausalLM

    from s2t_hf.tasks import PairTrainingConfig

    config = PairTrainingConfig()
    sizes = {}
    for role in ("teacher", "student"):
        model_config = config.model_config(role, tokenizer)
        assert model_config.vocab_size == padded_vocab_size(len(tokenizer))
        sizes[role] = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
    assert 120_000 < sizes["teacher"] < 180_000
    assert 35_000 < sizes["student"] < 0.5 * sizes["teacher"]
    assert PairTrainingConfig.from_dict(config.to_dict()) == config
    assert "parallel" not in config.cache_key() and "max_minutes" not in config.cache_key()
    assert config.max_minutes is None  # steps and accuracy only: the wall clock is an opt-in safety net
    with pytest.raises(ValueError, match="`student_min_accuracy`"):
        PairTrainingConfig(student_min_accuracy=0.7, student_max_accuracy=0.6)
    with pytest.raises(ValueError, match="`teacher_hidden_size`"):
        PairTrainingConfig(teacher_hidden_size=66)


def test_training_stream_masks_the_prompt(tokenizer):
    from s2t_hf.tasks.pair_training import ArithmeticStream, collate_examples

    stream = iter(ArithmeticStream(tokenizer, seed=0))
    examples = [next(stream) for _ in range(3)]
    problems = generate_problems(3, "train", seed=0)
    for example, problem in zip(examples, problems):
        labels = [t for t in example["labels"] if t != -100]
        assert tokenizer.decode(labels) == problem.solution + " <eos>"
        prompt = example["input_ids"][: len(example["input_ids"]) - len(labels)]
        assert tokenizer.decode(prompt).split()[-1] == "<assistant>"
    batch = collate_examples(tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def test_generate_solutions_is_batch_invariant(tokenizer, tiny_model):
    from s2t_hf.tasks import evaluate_greedy, generate_solutions

    problems = generate_problems(6, "validation")
    one = generate_solutions(tiny_model, tokenizer, problems, batch_size=1, max_new_tokens=8)
    batched = generate_solutions(tiny_model, tokenizer, problems, batch_size=4, max_new_tokens=8)
    assert one == batched  # left padding does not change greedy outputs
    assert all(len(c.split()) <= 8 for c in one)
    assert tokenizer.padding_side == "left"
    accuracy = evaluate_greedy(tiny_model, tokenizer, problems, max_new_tokens=8)
    assert 0.0 <= accuracy <= 1.0
    assert evaluate_greedy(tiny_model, tokenizer, [], max_new_tokens=8) == 0.0


def test_evaluate_greedy_scores_right_answers(tokenizer, tiny_model, monkeypatch):
    from s2t_hf.tasks import solutions

    problems = generate_problems(4, "validation")
    fake = [p.solution for p in problems[:3]] + ["answer 0 0 0 1"]
    monkeypatch.setattr(solutions, "generate_solutions", lambda *args, **kwargs: fake)
    assert solutions.evaluate_greedy(tiny_model, tokenizer, problems) == 0.75


def test_reserved_rows_are_never_generated(tokenizer, tiny_model):
    import torch

    from s2t_hf.tasks import generate_solutions

    head = tiny_model.get_output_embeddings().weight
    saved = head.detach().clone()
    with torch.no_grad():  # make the spare rows above the tokenizer win every argmax
        head[len(tokenizer) :] = saved[: len(tokenizer)].sum(0) * 100.0
        head[tokenizer.eos_token_id] = 0.0
    try:
        completions = generate_solutions(tiny_model, tokenizer, generate_problems(2, "validation"), max_new_tokens=4)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert all(len(c.split()) == 4 for c in completions)
    assert all(tokenizer.unk_token not in c for c in completions)


# ------------------------------------------------------------------------------------------------------------------
# Caching of the trained pair (tiny budgets)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [False, True])
def test_train_pair_caches_and_loads(tmp_path, parallel):
    from s2t_hf.tasks import PairTrainingConfig, load_pair, train_pair

    config = PairTrainingConfig(
        teacher_max_steps=4, student_max_steps=4, eval_steps=2, student_eval_steps=2, eval_problems=4,
        test_problems=4, batch_size=4, warmup_steps=1, parallel=parallel,
    )  # fmt: skip
    teacher, student, tokenizer = train_pair(tmp_path, seed=1, config=config)
    info = json.loads((tmp_path / "pair_info.json").read_text())
    assert info["seed"] == 1 and info["settings"]["seed"] == 1
    assert info["teacher"]["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert info["student"]["parameters"] < info["teacher"]["parameters"]
    for role in ("teacher", "student"):
        assert 0.0 <= info[role]["validation_accuracy"] <= 1.0
        assert info[role]["steps_trained"] == 4
        assert [h["step"] for h in info[role]["history"]] == [2, 4]
        assert (tmp_path / role / "model.safetensors").exists()
    assert teacher.config.vocab_size == info["vocab_size"] >= len(tokenizer) + 32
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    mtime = (tmp_path / "student" / "model.safetensors").stat().st_mtime_ns
    config.parallel = not parallel  # an execution setting: the cache still applies
    teacher2, student2, _ = train_pair(tmp_path, seed=1, config=config)
    assert (tmp_path / "student" / "model.safetensors").stat().st_mtime_ns == mtime
    for a, b in zip(student.parameters(), student2.parameters()):
        assert (a == b).all()
    loaded = load_pair(tmp_path)
    assert len(loaded) == 3 and loaded[2].padding_side == "left"

    with pytest.raises(ValueError, match="overwrite=True"):
        train_pair(tmp_path, seed=1, config=PairTrainingConfig(teacher_max_steps=5))
    with pytest.raises(FileNotFoundError, match="`path`"):
        load_pair(tmp_path / "nowhere")


def test_pair_training_stops_on_steps_not_the_wall_clock(tmp_path, monkeypatch, caplog):
    """A machine so slow that an hour passes between two clock reads trains the same pair; the
    opt-in `max_minutes` stops early, warns, and its truncated pair is never loaded as the full run."""
    import itertools
    import logging

    from s2t_hf.tasks import PairTrainingConfig, pair, train_pair

    caplog.set_level(logging.WARNING, logger="s2t_hf")
    hours = itertools.count()
    monkeypatch.setattr(pair.time, "monotonic", lambda: 3600.0 * next(hours))
    config = PairTrainingConfig(
        teacher_max_steps=2, student_max_steps=2, eval_steps=1, student_eval_steps=1, eval_problems=2,
        test_problems=0, batch_size=2, warmup_steps=1, parallel=False,
    )  # fmt: skip

    def trained(path):
        info = json.loads((path / "pair_info.json").read_text())
        return {role: (info[role]["steps_trained"], info[role]["stop_reason"]) for role in ("teacher", "student")}

    train_pair(tmp_path / "full", config=config)
    assert trained(tmp_path / "full") == {"teacher": (2, "max_steps"), "student": (2, "max_steps")}
    assert "max_minutes" not in caplog.text

    capped = PairTrainingConfig.from_dict({**config.to_dict(), "max_minutes": 1.0})
    caplog.clear()
    train_pair(tmp_path / "capped", config=capped)
    assert trained(tmp_path / "capped") == {"teacher": (1, "max_minutes"), "student": (1, "max_minutes")}
    assert "`max_minutes` (1.0) stopped the training" in caplog.text
    assert "the teacher at step 1 of 2, the student at step 1 of 2" in caplog.text

    weights = tmp_path / "capped" / "student" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    caplog.clear()
    train_pair(tmp_path / "capped", config=capped)  # the same opt-in limit: the cut-short pair is loaded
    assert weights.stat().st_mtime_ns == mtime and "stopped the training" in caplog.text
    caplog.clear()
    train_pair(tmp_path / "capped", config=config)  # the full run is asked for: trained again, to its steps
    assert "was cut short by `max_minutes=1.0`" in caplog.text
    assert trained(tmp_path / "capped") == {"teacher": (2, "max_steps"), "student": (2, "max_steps")}


@pytest.mark.parametrize("module", ["arithmetic", "tokenizer", "solutions"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"s2t_hf.tasks.{module}")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(mod, globs=vars(mod).copy()):
        for example in test.examples:  # the closing fence of a Markdown code block is not output
            example.want = "\n".join(line for line in example.want.splitlines() if line.strip() != "```")
            example.want += "\n" if example.want else ""
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_value=5), "`max_value` must be at least 9"),
        (dict(min_distractors=2, max_distractors=1), "`min_distractors` and `max_distractors` must satisfy"),
        (dict(max_fillers=-1), "`max_fillers` must be >= 0"),
        (dict(multiply_probability=1.5), r"`multiply_probability` must be in \[0, 1\]"),
    ],
)
def test_task_config_names_the_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticTaskConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=0), "`batch_size` must be a positive int, got 0"),
        (dict(student_target_accuracy=0.99), r"`student_target_accuracy` \(0.99\) must lie in"),
        (dict(max_minutes=0), "`max_minutes` must be positive or None"),
        (dict(num_threads=0), "`num_threads` must be >= 1 or None"),
    ],
)
def test_pair_config_names_the_bad_field(kwargs, message):
    from s2t_hf.tasks import PairTrainingConfig

    with pytest.raises(ValueError, match=message):
        PairTrainingConfig(**kwargs)


def test_task_helpers_refuse_bad_arguments(tokenizer, tiny_model):
    from s2t_hf.tasks import PairTrainingConfig, generate_solutions

    with pytest.raises(ValueError, match="`num_problems` must be a non-negative int, got -1"):
        generate_problems(-1, "train")
    with pytest.raises(ValueError, match="`extra_words` must be non-empty words without whitespace, got 'two words'"):
        build_tokenizer(extra_words=["two words"])
    with pytest.raises(ValueError, match="`role` must be one of"):
        PairTrainingConfig().model_config("assistant", tokenizer)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        generate_solutions(tiny_model, tokenizer, generate_problems(1, "test"), batch_size=0)


def test_load_pair_refuses_what_is_no_trained_pair(tmp_path, monkeypatch):
    from conftest import custom_code_checkpoint

    from s2t_hf.tasks import load_pair

    with pytest.raises(FileNotFoundError, match=r"not a trained arithmetic pair: \['teacher', 'student'"):
        load_pair(tmp_path / "nowhere")
    for role in ("teacher", "student"):  # a pair folder whose checkpoints ask for custom code: never run
        custom_code_checkpoint(tmp_path / "pair" / role)
    (tmp_path / "pair" / "pair_info.json").write_text("{}")
    monkeypatch.setattr("builtins.input", lambda *args: "y")  # no prompt asks for it (the user would say yes)
    with pytest.raises(ValueError, match="(?s)contains custom code.*trust_remote_code"):
        load_pair(tmp_path / "pair")
    assert not (tmp_path / "pair" / "teacher" / "RAN").exists()


def test_pair_workers_stop_when_the_parent_is_killed(tmp_path):
    """SIGTERM ends `train_pair`'s process without its cleanup; the two training workers notice that their parent is
    gone and stop, instead of training on as orphans."""
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    script = (
        "from s2t_hf.tasks import PairTrainingConfig, train_pair\n"
        "config = PairTrainingConfig(teacher_max_steps=10**6, student_max_steps=10**6, eval_steps=10**6,\n"
        "    student_eval_steps=10**6, eval_problems=2, test_problems=0, batch_size=2, warmup_steps=1)\n"
        f"train_pair({str(tmp_path / 'pair')!r}, config=config)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "pair" / ".progress_student.json").exists():
            assert parent.poll() is None, "train_pair ended before its workers trained"
            time.sleep(0.5)
        workers = psutil.Process(parent.pid).children()
        assert len(workers) == 2 and all("_pair_worker" in " ".join(w.cmdline()) for w in workers)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"workers still training after their parent was killed: {[w.pid for w in alive]}"
    finally:
        for process in [*workers, psutil.Process(parent.pid) if parent.poll() is None else None]:
            if process is not None and process.is_running():
                process.kill()
