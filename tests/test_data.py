"""Tests of selection-group collection (teacher-forced and on-policy), saving and resuming."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import datasets
import pytest
import torch

from conftest import EOS, tiny_model
from s2t_hf import collect_selection_data
from s2t_hf.collection import CollectionSettings, SelectionCollector
from s2t_hf.shard_store import IDENTITY_VERSION, legacy_fingerprint, stable_repr
from s2t_hf.selection import top_k_candidates
from s2t_hf.teachers import LocalTeacher, Teacher
from s2t_hf.triggers import entropy_signal, kl_signal


K = 6
COLUMNS = {
    "context_ids", "cand_ids", "teacher_probs", "student_probs", "teacher_top1", "prompt_index", "step", "signal",
}


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (count,), generator=generator).tolist()
    return [torch.randint(3, 96, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)


def recompute(model, context: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token after `context`, from one plain forward of the whole context."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([context])).logits[0, -1].float(), -1)


def check_groups(dataset, prompts, student, teacher, warmup: int = 3, signal_kind: str = "kl"):
    assert set(dataset.column_names) == COLUMNS and len(dataset) > 0
    for row in dataset:
        prompt = prompts[row["prompt_index"]]
        context = row["context_ids"]
        assert context[: len(prompt)] == prompt and len(context) == len(prompt) + row["step"]
        assert row["step"] >= warmup and len(row["cand_ids"]) == K and len(set(row["cand_ids"])) == K
        student_lp, teacher_lp = recompute(student, context), recompute(teacher, context)
        ids, log_probs, _ = top_k_candidates(student_lp[None], K)
        assert row["cand_ids"] == ids[0].tolist()
        torch.testing.assert_close(torch.tensor(row["student_probs"]), log_probs[0].exp(), rtol=1e-4, atol=1e-6)
        expected = teacher_lp[row["cand_ids"]].exp()
        torch.testing.assert_close(torch.tensor(row["teacher_probs"]), expected, rtol=1e-4, atol=1e-6)
        assert row["teacher_top1"] == int(teacher_lp.argmax())
        if signal_kind == "kl":
            signal = kl_signal(student_lp[None], teacher_lp[None], 64)
        else:
            signal = entropy_signal(student_lp[None], 64)
        assert row["signal"] == pytest.approx(float(signal), rel=1e-3, abs=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Teacher-forced


@pytest.mark.parametrize("signal_kind", ["kl", "entropy"])
def test_teacher_forced_groups_are_the_top_signal_positions(pair, signal_kind):
    student, teacher = pair
    prompts = random_prompts(7)
    dataset = collect_selection_data(
        student, teacher, prompts=prompts, top_k=K, fraction=0.2, max_new_tokens=12, batch_size=3,
        signal=signal_kind, show_progress=False,
    )
    check_groups(dataset, prompts, student, teacher, signal_kind=signal_kind)

    # independent recomputation, one prompt at a time (no padding): greedy trajectory, KL at every generated position
    signals, generated = [], 0
    for index, prompt in enumerate(prompts):
        out = student.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
        new = out[len(prompt):].tolist()
        if EOS in new:
            new = new[: new.index(EOS) + 1]
        generated += len(new)
        sequence = torch.tensor([prompt + new])
        with torch.no_grad():
            student_logits, teacher_logits = student(sequence).logits[0], teacher(sequence).logits[0]
        for step in range(3, len(new)):
            position = len(prompt) + step - 1
            if signal_kind == "kl":
                signal = kl_signal(student_logits[position][None], teacher_logits[position][None], 64)
            else:
                signal = entropy_signal(student_logits[position][None], 64)
            signals.append((float(signal), index, step))
    assert len(dataset) == round(0.2 * generated)
    chosen = {(row["prompt_index"], row["step"]) for row in dataset}
    assert chosen <= {(i, s) for _, i, s in signals}
    threshold = min(sig for sig, i, s in signals if (i, s) in chosen)
    assert all(sig <= threshold + 1e-4 for sig, i, s in signals if (i, s) not in chosen)
    assert [(r["prompt_index"], r["step"]) for r in dataset] == sorted(chosen)


def test_chat_template_string_prompts_and_suppressed_rows():
    from s2t_hf.tasks import build_tokenizer, padded_vocab_size

    tokenizer = build_tokenizer()
    vocab = padded_vocab_size(len(tokenizer))
    student, teacher = tiny_model("llama", seed=0, vocab_size=vocab), tiny_model("llama", seed=1, vocab_size=vocab)
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    with torch.no_grad():  # make the spare rows attractive: they must still never be generated nor offered
        student.get_output_embeddings().weight[len(tokenizer):] *= 20
    prompts = ["tom has 5 apples .", [{"role": "user", "content": "ann has 3 pens ."}]]
    dataset = collect_selection_data(student, teacher, tokenizer, prompts, top_k=K, fraction=0.5,
                                     max_new_tokens=8, show_progress=False)
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "tom has 5 apples ."}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
    first = [row for row in dataset if row["prompt_index"] == 0]
    assert first and first[0]["context_ids"][: len(prompt_ids)] == prompt_ids
    assert tokenizer.convert_ids_to_tokens(prompt_ids)[-1] == "<assistant>"
    assert all(max(row["cand_ids"]) < len(tokenizer) and max(row["context_ids"]) < len(tokenizer) for row in dataset)
    plain = collect_selection_data(student, teacher, tokenizer, prompts[:1], top_k=K, fraction=0.5,
                                   max_new_tokens=8, chat_template=False, show_progress=False)
    assert "<assistant>" not in tokenizer.convert_ids_to_tokens(plain[0]["context_ids"])


# --------------------------------------------------------------------------------------------------------------------
# On-policy


def test_on_policy_groups_follow_the_teachers_choices(pair):
    student, teacher = pair
    prompts = random_prompts(6, seed=1)
    dataset = collect_selection_data(
        student, teacher, prompts=prompts, mode="on_policy", top_k=K, trigger_rate=0.25, max_new_tokens=12,
        batch_size=4, show_progress=False,
    )
    check_groups(dataset, prompts, student, teacher)
    # the trajectory continues with the teacher's choice among the candidates at every trigger
    followed = 0
    rows = list(dataset)
    for row in rows:
        later = [r for r in rows if r["prompt_index"] == row["prompt_index"] and r["step"] > row["step"]]
        if later:
            best = row["cand_ids"][max(range(K), key=lambda i: row["teacher_probs"][i])]
            assert later[0]["context_ids"][len(row["context_ids"])] == best
            followed += 1
    assert followed > 0
    # a fixed threshold skips calibration; a huge one gives no trigger and a clear error
    with pytest.raises(ValueError, match="No selection group was collected"):
        collect_selection_data(student, teacher, prompts=prompts, mode="on_policy", top_k=K, trigger_threshold=1e9,
                               max_new_tokens=6, show_progress=False)


# --------------------------------------------------------------------------------------------------------------------
# Saving and resuming


def test_save_and_resume(pair, tmp_path, monkeypatch):
    student, teacher = pair
    prompts = random_prompts(4, seed=2)
    kwargs = dict(prompts=prompts, top_k=K, fraction=0.3, max_new_tokens=8, shard_size=2, show_progress=False)
    reference = collect_selection_data(student, teacher, **kwargs)

    calls = []
    original = SelectionCollector.teacher_forced_shard

    def interrupted(self, chunk, bar):
        calls.append(chunk[0][0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run stops in the middle of the second shard
        return original(self, chunk, bar)

    monkeypatch.setattr(SelectionCollector, "teacher_forced_shard", interrupted)
    target = tmp_path / "groups"
    with pytest.raises(KeyboardInterrupt):
        collect_selection_data(student, teacher, save_to=target, **kwargs)
    assert os.path.isdir(target / "shards" / "shard-00000") and not os.path.exists(target / "shards" / "shard-00001")

    calls.clear()
    monkeypatch.setattr(SelectionCollector, "teacher_forced_shard", original)
    counting = lambda self, chunk, bar: calls.append(chunk[0][0]) or original(self, chunk, bar)  # noqa: E731
    monkeypatch.setattr(SelectionCollector, "teacher_forced_shard", counting)
    resumed = collect_selection_data(student, teacher, save_to=target, **kwargs)
    assert calls == [2]  # only the missing shard ran
    assert resumed.to_dict() == reference.to_dict()
    assert datasets.load_from_disk(str(target)).to_dict() == reference.to_dict()
    assert not os.path.exists(target / "shards")

    calls.clear()
    again = collect_selection_data(student, teacher, save_to=target, **kwargs)  # complete: nothing runs
    assert calls == [] and again.to_dict() == reference.to_dict()

    with pytest.raises(ValueError, match="resume=False"):
        collect_selection_data(student, teacher, save_to=target, **{**kwargs, "fraction": 0.5})
    overwritten = collect_selection_data(student, teacher, save_to=target, resume=False, **{**kwargs, "fraction": 0.5})
    assert len(overwritten) > len(reference) and calls == [0, 2]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by"):
        collect_selection_data(student, teacher, save_to=foreign, **kwargs)


def _interrupted_collection(student, teacher, target, monkeypatch, **kwargs) -> list:
    """Runs a collection into `target` that stops in its second shard; returns the list the next runs' shards are
    recorded in (`teacher_forced_shard` counts them from then on)."""
    original = SelectionCollector.teacher_forced_shard
    calls = []

    def interrupted(self, chunk, bar):
        calls.append(chunk[0][0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, chunk, bar)

    monkeypatch.setattr(SelectionCollector, "teacher_forced_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_selection_data(student, teacher, save_to=target, **kwargs)
    calls.clear()
    counting = lambda self, chunk, bar: calls.append(chunk[0][0]) or original(self, chunk, bar)  # noqa: E731
    monkeypatch.setattr(SelectionCollector, "teacher_forced_shard", counting)
    return calls


def test_identity_tells_apart_checkpoints_that_share_embeddings(pair, tmp_path, monkeypatch):
    """Two checkpoints of one model with the same input embeddings (one layer trained further) are refused, the part
    that differs is named, and the same run (a copy of the same weights, another object) resumes."""
    student, teacher = pair
    kwargs = dict(prompts=random_prompts(4, seed=2), top_k=K, fraction=0.3, max_new_tokens=8, shard_size=2,
                  show_progress=False)
    target = tmp_path / "groups"
    calls = _interrupted_collection(student, teacher, target, monkeypatch, **kwargs)

    for role in ("student", "teacher"):
        later = copy.deepcopy(student if role == "student" else teacher)
        with torch.no_grad():
            later.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # embeddings untouched: version 1 saw no change
        models = (later, teacher) if role == "student" else (student, later)
        with pytest.raises(ValueError, match=rf"differing: {role}\.weights\).*resume=False"):
            collect_selection_data(*models, save_to=target, **kwargs)
    renamed = copy.deepcopy(student)
    renamed.name_or_path = renamed.config._name_or_path = "org/student-step-2000"
    with pytest.raises(ValueError, match=r"differing: student\.name_or_path\)"):
        collect_selection_data(renamed, teacher, save_to=target, **kwargs)
    with pytest.raises(ValueError, match=r"differing: collection_id\)"):
        collect_selection_data(student, teacher, save_to=target, collection_id="run-2", **kwargs)
    assert calls == []

    resumed = collect_selection_data(copy.deepcopy(student), copy.deepcopy(teacher), save_to=target, **kwargs)
    assert calls == [2] and len(resumed) > 0
    metadata = json.loads((target / "collection.json").read_text())
    assert metadata["identity_version"] == IDENTITY_VERSION and metadata["identity"]["student"]["kind"] == "local"


def test_identity_is_stable_across_processes_and_object_addresses(pair):
    """The same settings, prompts and models give the same fingerprint in another process, with `generation_kwargs`
    holding objects whose `repr` carries an address."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {tests!r})
        from conftest import tiny_model
        from s2t_hf.collection import CollectionSettings
        from s2t_hf.shard_store import collection_fingerprint, stable_repr
        from transformers import StoppingCriteriaList, MaxTimeCriteria

        class Stop:
            def __init__(self):
                self.after = 3

        kwargs = dict(stopping_criteria=StoppingCriteriaList([MaxTimeCriteria(60.0, initial_timestamp=0.0)]),
                      stop=Stop(), do_sample=False)
        settings = CollectionSettings(mode="teacher_forced", top_k=6, fraction=0.3, signal="kl", trigger_rate=0.3,
                                      max_new_tokens=8, signal_top_k=64, warmup_tokens=3, shard_size=2,
                                      suppress_token_ids=[], generation_kwargs=stable_repr(kwargs))
        print(collection_fingerprint(settings, [[5, 6, 7], [8, 9]], tiny_model("llama", seed=0),
                                     tiny_model("qwen2", seed=1), "run-1"))
        """
    ).format(tests=os.path.dirname(__file__))
    answers = set()
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONHASHSEED": "random"})
        answers.add(result.stdout.strip().splitlines()[-1])
    assert len(answers) == 1 and len(answers.pop()) == 32
    expected = {"f": "s2t_hf.shard_store.stable_repr", "x": "<object object>"}
    assert stable_repr({"f": stable_repr, "x": object()}) == expected
    assert stable_repr(float("nan")) == "nan" and stable_repr(torch.tensor([1, 2])) == {
        "tensor": "torch.int64", "shape": [2], "values": [1, 2]}


def test_a_collection_of_an_older_identity_version_says_how_to_resume(pair, tmp_path, monkeypatch):
    """A collection written under identity version 1 (s2t_hf 0.1.0's `collection.json`) is refused with what to do;
    `resume="upgrade"` resumes it when it matches under version 1, and records version 2."""
    student, teacher = pair
    kwargs = dict(prompts=random_prompts(4, seed=2), top_k=K, fraction=0.3, max_new_tokens=8, shard_size=2,
                  show_progress=False)
    reference = collect_selection_data(student, teacher, **kwargs)
    target = tmp_path / "groups"
    calls = _interrupted_collection(student, teacher, target, monkeypatch, **kwargs)
    path = target / "collection.json"
    metadata = json.loads(path.read_text())
    settings = CollectionSettings(
        mode="teacher_forced", top_k=K, fraction=0.3, signal="kl", trigger_rate=0.3, max_new_tokens=8,
        signal_top_k=64, warmup_tokens=3, shard_size=2, suppress_token_ids=[], generation_kwargs={},
    )
    old = {"format": 1, "s2t_hf_version": "0.1.0", "complete": False,
           "fingerprint": legacy_fingerprint(settings, kwargs["prompts"], student, teacher, {})}
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"s2t_hf 0\.1\.0 under identity version 1.*matches.*resume='upgrade'"):
        collect_selection_data(student, teacher, save_to=target, **kwargs)
    with pytest.raises(ValueError, match="does not match .* even under that version"):
        collect_selection_data(student, teacher, save_to=target, resume="upgrade", **{**kwargs, "fraction": 0.5})
    with pytest.raises(ValueError, match="`resume` must be `True`, `False` or `'upgrade'`, got 'yes'"):
        collect_selection_data(student, teacher, save_to=target, resume="yes", **kwargs)
    assert calls == []
    with pytest.warns(UserWarning, match="identity version 1.*now recorded under version 2"):
        resumed = collect_selection_data(student, teacher, save_to=target, resume="upgrade", **kwargs)
    assert calls == [2] and resumed.to_dict() == reference.to_dict()
    upgraded = json.loads(path.read_text())
    assert upgraded["identity_version"] == IDENTITY_VERSION and upgraded["fingerprint"] == metadata["fingerprint"]
    assert upgraded["upgraded_from"] == {"identity_version": 1, "fingerprint": old["fingerprint"]}

    path.write_text(json.dumps({**upgraded, "identity_version": IDENTITY_VERSION + 1, "s2t_hf_version": "9.0"}))
    with pytest.raises(ValueError, match=r"written by s2t_hf 9\.0 .* newer than this s2t_hf"):
        collect_selection_data(student, teacher, save_to=target, **kwargs)


def test_trajectories_hold_every_eligible_position(pair, tmp_path, monkeypatch):
    """`return_trajectories=True`: the same pass gives, at every eligible position of each trajectory, what a group at
    that position holds (with `fraction=1` every position is a group) and the student's entropy there."""
    student, teacher = pair
    prompts = random_prompts(6, seed=4)
    kwargs = dict(prompts=prompts, top_k=K, fraction=1.0, max_new_tokens=8, show_progress=False, shard_size=4)
    groups, trajectories = collect_selection_data(student, teacher, return_trajectories=True, **kwargs)
    assert groups.to_dict() == collect_selection_data(student, teacher, **kwargs).to_dict()
    assert sorted(trajectories["prompt_index"]) == list(range(len(prompts)))
    by_position = {(g["prompt_index"], g["step"]): g for g in groups}
    count = 0
    for row in trajectories:
        prompt = prompts[row["prompt_index"]]
        assert row["input_ids"][: len(prompt)] == prompt and row["prompt_length"] == len(prompt)
        assert row["steps"] == sorted(row["steps"]) and min(row["steps"]) == 3  # warmup_tokens
        for n, step in enumerate(row["steps"]):
            group = by_position[(row["prompt_index"], step)]
            assert group["context_ids"] == row["input_ids"][: len(prompt) + step]
            assert row["cand_ids"][n] == group["cand_ids"] and row["teacher_top1"][n] == group["teacher_top1"]
            assert row["teacher_probs"][n] == pytest.approx(group["teacher_probs"])
            assert row["kl"][n] == pytest.approx(group["signal"], rel=1e-5, abs=1e-7)
            expected = entropy_signal(recompute(student, group["context_ids"])[None], 64)
            assert row["entropy"][n] == pytest.approx(float(expected), rel=1e-3, abs=1e-5)
            count += 1
    assert count == len(groups)

    # saved with the groups and resumed shard by shard
    target = tmp_path / "collection"
    calls = _interrupted_collection(student, teacher, target, monkeypatch, return_trajectories=True, **kwargs)
    resumed = collect_selection_data(student, teacher, return_trajectories=True, save_to=target, **kwargs)
    again = collect_selection_data(student, teacher, return_trajectories=True, save_to=target, **kwargs)
    assert calls == [4]  # only the missing shard ran, once
    for groups_again, trajectories_again in (resumed, again):
        assert groups_again.to_dict() == groups.to_dict()
        assert trajectories_again.to_dict() == trajectories.to_dict()
    assert datasets.load_from_disk(str(target / "trajectories")).to_dict() == trajectories.to_dict()
    with pytest.raises(ValueError, match="resume=False"):  # collected with trajectories: other settings
        collect_selection_data(student, teacher, save_to=target, **kwargs)
    with pytest.raises(ValueError, match="`return_trajectories=True` needs `mode='teacher_forced'`"):
        collect_selection_data(student, teacher, prompts=prompts, mode="on_policy", return_trajectories=True)


class CandidatesOnlyTeacher(Teacher):
    """A teacher that scores candidates but gives no whole distribution (as a `RemoteTeacher`), over a local model."""

    def __init__(self, model):
        super().__init__()
        self.local = LocalTeacher(model)

    def prepare(self, student, tokenizer=None, blocked_ids=()):
        super().prepare(student, tokenizer, blocked_ids)
        self.local.prepare(student, tokenizer, blocked_ids)

    def select(self, *args, **kwargs):
        raise NotImplementedError

    def takeover(self, *args, **kwargs):
        raise NotImplementedError

    def candidate_log_probs(self, *args, **kwargs):
        raise NotImplementedError

    def score_trajectories(self, trajectories, positions, candidate_ids):
        self.calls += 1
        return self.local.score_trajectories(trajectories, positions, candidate_ids)


def test_a_teacher_without_the_whole_distribution_gives_groups_and_trajectories(pair):
    """The entropy signal with a teacher that only scores candidates: the groups are those of the local teacher, and
    the trajectories carry NaN for the KL."""
    student, teacher = pair
    kwargs = dict(prompts=random_prompts(5, seed=5), top_k=K, fraction=0.3, max_new_tokens=8, show_progress=False,
                  signal="entropy", batch_size=2, return_trajectories=True)
    scorer = CandidatesOnlyTeacher(teacher)
    groups, trajectories = collect_selection_data(student, scorer, **kwargs)
    local_groups, local_trajectories = collect_selection_data(student, teacher, **kwargs)
    assert scorer.calls > 0 and len(groups) == len(local_groups) > 0
    for group, local in zip(groups, local_groups):
        assert group["cand_ids"] == local["cand_ids"] and group["teacher_top1"] == local["teacher_top1"]
        assert group["teacher_probs"] == pytest.approx(local["teacher_probs"], rel=1e-4, abs=1e-6)
    assert trajectories["prompt_index"] == local_trajectories["prompt_index"]
    for row, local in zip(trajectories, local_trajectories):
        assert row["steps"] == local["steps"] and row["entropy"] == pytest.approx(local["entropy"])
        assert all(math.isnan(kl) for kl in row["kl"])


# --------------------------------------------------------------------------------------------------------------------
# Errors


def test_errors(pair):
    student, teacher = pair
    prompts = random_prompts(2)
    with pytest.raises(ValueError, match="No selection group was collected"):
        collect_selection_data(student, teacher, prompts=prompts, top_k=K, max_new_tokens=2, show_progress=False)
    with pytest.raises(ValueError, match="`mode`"):
        collect_selection_data(student, teacher, prompts=prompts, mode="beam")
    with pytest.raises(ValueError, match="`top_k`"):
        collect_selection_data(student, teacher, prompts=prompts, top_k=1)
    with pytest.raises(ValueError, match="`fraction`"):
        collect_selection_data(student, teacher, prompts=prompts, fraction=0.0)
    with pytest.raises(ValueError, match="`signal`"):
        collect_selection_data(student, teacher, prompts=prompts, signal="margin")
    with pytest.raises(ValueError, match="one teacher prompt per prompt"):
        collect_selection_data(student, teacher, prompts=prompts, teacher_prompts=["one"])
    with pytest.raises(TypeError, match="`teacher_prompts`"):
        collect_selection_data(student, teacher, prompts=prompts, teacher_prompts="one")
    with pytest.raises(ValueError, match="`prompts` is empty"):
        collect_selection_data(student, teacher, prompts=[])
    with pytest.raises(ValueError, match="tokenizer"):
        collect_selection_data(student, teacher, prompts=["text"])
    with pytest.raises(ValueError, match="output rows"):
        collect_selection_data(student, tiny_model("llama", vocab_size=128), prompts=prompts)


# --------------------------------------------------------------------------------------------------------------------
# Bad input (docs/reliability.md)


def test_prompts_in_a_wrong_form_are_named(pair):
    from s2t_hf.tasks import build_tokenizer

    student, teacher = pair
    def collect(prompts, **kwargs):
        return collect_selection_data(student, teacher, prompts=prompts, **kwargs)

    for single, named in (("tom has 5 apples .", "must be a list of prompts, got one string; wrap it in a list"),
                          ([5, 6, 7], "holds integers: one prompt's token ids\\? Wrap it in a list"),
                          ([{"role": "user", "content": "hi"}], "is one chat \\(a list of messages\\); wrap it")):
        with pytest.raises(TypeError, match=f"`prompts` {named}"):
            collect(single)
    with pytest.raises(ValueError, match=r"`prompts` as a tensor must be 2-D"):
        collect(torch.tensor([5, 6, 7]))
    with pytest.raises(TypeError, match=r"`prompts\[1\]` must be a string, a list of chat messages or"):
        collect([[5, 6], 3.5])
    with pytest.raises(ValueError, match=r"`prompts\[0\]` is empty \(no tokens\)"):
        collect([[]])
    with pytest.raises(ValueError, match=r"`prompts\[1\]` holds token ids \[96, 500\] outside the student's"):
        collect([[5, 6], [96, 7, 500]])
    with pytest.raises(ValueError, match=r"`calibration_prompts\[0\]` holds negative token ids"):
        collect([[5, 6]], mode="on_policy", calibration_prompts=[[-1, 5]])
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match=r"`prompts\[0\]` is a list of chat messages but `chat_template=False`"):
        collect([[{"role": "user", "content": "tom"}]], tokenizer=tokenizer, chat_template=False)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="`chat_template=True` but the tokenizer has no chat template"):
        collect(["tom"], tokenizer=tokenizer, chat_template=True)


def test_collection_arguments_are_checked(pair):
    student, teacher = pair
    prompts = random_prompts(2)
    def collect(**kwargs):
        return collect_selection_data(**{"student": student, "teacher": teacher, "prompts": prompts, **kwargs})

    with pytest.raises(ValueError, match="`generation_kwargs` must not set `max_new_tokens`"):
        collect(generation_kwargs={"max_new_tokens": 4})
    with pytest.raises(ValueError, match=r"`suppress_token_ids` must lie in \[0, 96\)"):
        collect(suppress_token_ids=[96])
    with pytest.raises(ValueError, match=r"`trigger_rate` must lie in \(0, 1\), got 1.0"):
        collect(mode="on_policy", trigger_rate=1.0)
    for name in ("max_new_tokens", "batch_size", "shard_size"):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive integer, got 0"):
            collect(**{name: 0})
    with pytest.raises(ValueError, match="`student` and `teacher` are both required"):
        collect(teacher=None)


# --------------------------------------------------------------------------------------------------------------------
# Teacher-forced on given responses (e.g. reference solutions)


def test_given_responses_are_scored_instead_of_generated(pair):
    student, teacher = pair
    prompts = random_prompts(5, seed=3)
    generator = torch.Generator().manual_seed(4)
    # token ids 3..95 (no EOS): one response longer than `max_new_tokens`, which is cut there
    responses = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in (4, 9, 6, 15, 7)]
    max_new = 10
    dataset = collect_selection_data(
        student, teacher, prompts=prompts, top_k=K, fraction=1.0, max_new_tokens=max_new, batch_size=2,
        responses=responses, show_progress=False,
    )
    check_groups(dataset, prompts, student, teacher)
    # every position of every response (its end-of-sequence token appended, cut to `max_new` tokens) after the
    # warm-up is a group, and its context is the prompt followed by the response so far: nothing was generated
    expected = []
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        forced = (response[: max_new - 1] + [EOS])
        expected += [(index, step, prompt + forced[:step]) for step in range(3, len(forced))]
    assert [(r["prompt_index"], r["step"], r["context_ids"]) for r in dataset] == expected


def test_given_responses_are_checked(pair):
    student, teacher = pair
    prompts = random_prompts(2)
    common = dict(top_k=K, max_new_tokens=8, show_progress=False)
    with pytest.raises(ValueError, match="mode='teacher_forced'"):
        collect_selection_data(student, teacher, prompts=prompts, mode="on_policy", responses=[[5], [6]], **common)
    with pytest.raises(ValueError, match="one per prompt"):
        collect_selection_data(student, teacher, prompts=prompts, responses=[[5]], **common)
    with pytest.raises(ValueError, match=r"`responses\[1\]` is empty"):
        collect_selection_data(student, teacher, prompts=prompts, responses=[[5], []], **common)
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        collect_selection_data(student, teacher, prompts=prompts, responses=[[5], [10_000]], **common)
    with pytest.raises(ValueError, match="need `tokenizer`"):
        collect_selection_data(student, teacher, prompts=prompts, responses=["a", "b"], **common)


def test_shards_and_metadata_are_flushed_to_disk_before_they_count(tmp_path, monkeypatch):
    """`ShardStore.save` flushes every file of a shard (`fsync`) before renaming it into place, and the folder after;
    `collection.json` is flushed before it replaces the previous one."""
    from s2t_hf import atomic_files
    from s2t_hf.shard_store import ShardStore

    synced = []
    original = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return original(descriptor)

    monkeypatch.setattr(atomic_files.os, "fsync", recording_fsync)
    monkeypatch.setattr("s2t_hf.shard_store.os.fsync", recording_fsync)
    store = ShardStore(str(tmp_path / "groups"), "f" * 32, resume=True)
    assert any(path.endswith("collection.json.tmp") for path in synced)
    synced.clear()
    store.save(0, datasets.Dataset.from_dict({"x": [1, 2, 3]}))
    temporary = str(tmp_path / "groups" / "shards" / "shard-00000.tmp")
    assert any(path.startswith(temporary + "/data-") for path in synced)  # the arrow file, under its temporary name
    assert temporary + "/state.json" in synced and str(tmp_path / "groups" / "shards") in synced
    assert store.has(0) and store.load(0)["x"] == [1, 2, 3]


def test_the_identity_samples_large_tensors_within_bounds():
    """A float32 `linspace` over a 151936 x 896 embedding (Qwen2.5-0.5B) rounded its last index past the end."""
    from s2t_hf.shard_store import sample_index

    for numel in (136_134_656, 2**24 + 3, 4097, 5000):
        index = sample_index(numel)
        assert int(index[0]) == 0 and int(index[-1]) == numel - 1 and int(index.max()) < numel
        assert bool((index[1:] > index[:-1]).all())
