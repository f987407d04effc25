"""Tests of `S2TTrainer`: packed vs K-copies encoding, learning, what trains, saving, Trainer features, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import EarlyStoppingCallback

from conftest import tiny_model
from s2t_hf import S2TConfig, S2TSelector, S2TTrainer, S2TTrainingArguments, SelectionGroupCollator
from s2t_hf import collect_selection_data


K = 8
NUM_BINS = 16


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 8, (count,), generator=generator).tolist()
    return [torch.randint(3, 96, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def groups():
    """Selection groups of a tiny llama student (seed 0) against a tiny llama teacher (seed 1), teacher-forced."""
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    return collect_selection_data(
        student, teacher, prompts=random_prompts(32), top_k=K, fraction=0.3, max_new_tokens=16, batch_size=16,
        show_progress=False,
    )


def make_selector(arch: str = "llama", seed: int = 0, scoring: str = "residual", dropout: float = 0.0, **kwargs):
    student = tiny_model(arch, seed=seed)
    config = S2TConfig(selection="local", scoring=scoring, residual_tau=0.1)
    return S2TSelector.create(student, num_bins=NUM_BINS, lora_r=8, lora_dropout=dropout, config=config, **kwargs)


def make_args(tmp_path, **overrides) -> S2TTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, seed=0,
    )
    return S2TTrainingArguments(**{**defaults, **overrides})


def synthetic_batch(num_groups: int = 3, seed: int = 0, ragged: bool = True) -> dict[str, torch.Tensor]:
    return SelectionGroupCollator()(synthetic_features(num_groups, seed, ragged))


def synthetic_features(num_groups: int = 3, seed: int = 0, ragged: bool = True) -> list[dict[str, list]]:
    """Selection groups with random contexts, candidates and probabilities (lengths 4, 7, 10...; K, K - 1... when
    `ragged`)."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for i in range(num_groups):
        length = 4 + 3 * i
        k = K - (i if ragged else 0)
        features.append(
            {
                "context_ids": torch.randint(3, 96, (length,), generator=generator).tolist(),
                "cand_ids": torch.randperm(93, generator=generator)[:k].add(3).tolist(),
                "teacher_probs": torch.rand(k, generator=generator).tolist(),
                "student_probs": torch.rand(k, generator=generator).tolist(),
            }
        )
    return features


def perturb(selector: S2TSelector, seed: int = 0) -> None:
    """Gives LoRA B and the bin rows non-zero values so that every parameter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in selector.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def trainable_state(selector: S2TSelector) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in selector.model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------------------------
# The loss: packed encoding == K copies


def packed_and_copies(trainer: S2TTrainer, batch: dict[str, torch.Tensor], copies: bool = True) -> list[tuple]:
    """`(loss, candidate logits, gradients)` of `batch`, packed then (with `copies`) as K copies of every context."""
    model, pack = trainer.model, trainer._pack
    results = []
    try:
        for trainer._pack in (True, False) if copies else (True,):
            model.zero_grad()
            loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.detach(), outputs["candidate_logits"].detach(), grads))
    finally:
        trainer._pack = pack
        model.zero_grad()
    return results


@pytest.mark.parametrize(("arch", "scoring"), [("llama", "residual"), ("qwen2", "residual"), ("qwen2", "pure")])
def test_packed_matches_k_copies(tmp_path, arch, scoring):
    selector = make_selector(arch, scoring=scoring)
    perturb(selector)
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path))
    (loss_p, logits_p, grads_p), (loss_n, logits_n, grads_n) = packed_and_copies(trainer, synthetic_batch())
    assert loss_p.item() > 0
    torch.testing.assert_close(loss_p, loss_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_p, logits_n, rtol=1e-5, atol=1e-5)
    assert grads_p.keys() == grads_n.keys() and len(grads_p) > 4
    for name in grads_p:
        assert grads_p[name].abs().sum() > 0, name
        scale = grads_n[name].abs().max().item()
        torch.testing.assert_close(grads_p[name], grads_n[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def prompt_features(seed: int = 0) -> list[dict[str, list]]:
    """Groups as collection writes them: two prompts with three and two steps each (each context a prefix of the
    next), and one group of a third prompt, in a mixed order; K and K - 2 candidates."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for prompt, ends in ((0, (5, 9, 14)), (1, (4, 11)), (2, (7,))):
        reply = torch.randint(3, 96, (max(ends),), generator=generator).tolist()
        for i, end in enumerate(ends):
            k = K - 2 * (i % 2)
            features.append(
                {
                    "context_ids": reply[:end],
                    "cand_ids": torch.randperm(93, generator=generator)[:k].add(3).tolist(),
                    "teacher_probs": torch.rand(k, generator=generator).tolist(),
                    "prompt_index": prompt,
                }
            )
    order = [3, 0, 5, 1, 4, 2]
    return [features[i] for i in order]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "starcoder2"])
@pytest.mark.parametrize("lm_kl_weight", [0.0, 0.1])
def test_shared_contexts_match_one_row_per_group_and_k_copies(tmp_path, arch, lm_kl_weight):
    """Groups whose contexts are prefixes of one row: the same loss, candidate logits and gradients as one row per
    group (packed) and as K copies of every context (the reference); sliding windows (gemma2, starcoder2: window 6,
    contexts up to 14) and the LM-KL term included."""
    selector = make_selector(arch)
    perturb(selector)
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path, lm_kl_weight=lm_kl_weight))
    features = prompt_features()
    shared = SelectionGroupCollator(share_contexts=True)(features)
    assert shared["input_ids"].shape[0] == 3 and shared["group_rows"].tolist() == [1, 0, 2, 0, 1, 0]
    ((loss_s, logits_s, grads_s),) = packed_and_copies(trainer, shared, copies=False)
    (loss_p, logits_p, grads_p), (loss_c, logits_c, grads_c) = packed_and_copies(
        trainer, SelectionGroupCollator()(features)
    )
    assert loss_s.item() > 0 and torch.isfinite(logits_s).sum() == 4 * K + 2 * (K - 2)
    for other_loss, other_logits, other_grads in ((loss_p, logits_p, grads_p), (loss_c, logits_c, grads_c)):
        torch.testing.assert_close(loss_s, other_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_s, other_logits, rtol=1e-5, atol=1e-5)
        for name in grads_s:
            scale = other_grads[name].abs().max().item()
            torch.testing.assert_close(grads_s[name], other_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_group_by_prompt_batches_prompt_by_prompt_and_trains(tmp_path, groups):
    """`group_by_prompt=True`: every group once per epoch, a prompt's groups together, the same order when resumed
    (seed and epoch), and training runs with shared contexts; without `prompt_index` it is refused by name."""
    args = make_args(tmp_path, group_by_prompt=True, max_steps=3, per_device_train_batch_size=8, lm_kl_weight=0.0)
    trainer = S2TTrainer(selector=make_selector(), args=args, train_dataset=groups)
    sampler = trainer._get_train_sampler()
    order = list(sampler)
    assert sorted(order) == list(range(len(groups)))
    prompts = [groups["prompt_index"][i] for i in order]
    assert sum(a != b for a, b in zip(prompts, prompts[1:])) == len(set(prompts)) - 1  # one run per prompt
    assert list(trainer._get_train_sampler()) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert trainer.train().global_step == 3
    trainer._pack = False
    with pytest.raises(ValueError, match="share_contexts=False"):
        trainer.compute_loss(trainer.model, SelectionGroupCollator(share_contexts=True)(prompt_features()))
    with pytest.raises(ValueError, match="prompt_index"):
        S2TTrainer(selector=make_selector(), args=args, train_dataset=groups.remove_columns("prompt_index"))


def test_candidate_logits_match_the_processor_recompute_path(tmp_path):
    """The trainer's candidate logits are those S2T-Local computes at inference for the same context."""
    from s2t_hf.kv import score_candidates_by_recompute
    from s2t_hf.selection import local_candidate_logits

    selector = make_selector("qwen2", scoring="residual")
    perturb(selector)
    selector.model.eval()
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path))
    batch = synthetic_batch(ragged=False)
    with torch.no_grad():
        _, outputs = trainer.compute_loss(selector.model, batch, return_outputs=True)
        logits = score_candidates_by_recompute(
            selector.model, batch["input_ids"], batch["attention_mask"], batch["cand_ids"]
        )
        last = selector.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
    bins = torch.tensor(selector.bin_token_ids)
    log_probs = torch.log_softmax(last.index_fill(-1, bins, float("-inf")), -1).gather(-1, batch["cand_ids"])
    expected = local_candidate_logits(logits[..., bins], selector.bin_values, "residual", 0.1, log_probs)
    torch.testing.assert_close(outputs["candidate_logits"], expected, rtol=1e-5, atol=1e-5)


def test_residual_on_the_students_own_log_probs_learns_only_through_the_bins(tmp_path):
    """With `residual_log_probs="student"` the candidate logits are the collected log-probabilities plus the pure
    score / tau, and the adapter's effect on the last context position's distribution does not reach the loss."""
    student = tiny_model("qwen2", seed=0)
    config = S2TConfig(selection="local", scoring="residual", residual_tau=0.1, adapter_mode="scoring")
    selector = S2TSelector.create(student, num_bins=NUM_BINS, lora_r=8, preserve_cache=True, config=config)
    perturb(selector)
    selector.model.eval()
    batch = synthetic_batch(ragged=True)
    outputs = {}
    for scoring, source in (("pure", None), ("residual", "student"), ("residual", "selector")):
        args = make_args(tmp_path, scoring=scoring, residual_log_probs=source, lm_kl_weight=0.0)
        trainer = S2TTrainer(selector=selector, args=args)
        with torch.no_grad():
            _, outputs[scoring, source] = trainer.compute_loss(selector.model, batch, return_outputs=True)
    assert selector.config.residual_log_probs == "selector"  # the last trainer's override, written into the config
    mask = batch["cand_mask"]
    expected = batch["student_probs"].log() + outputs["pure", None]["candidate_logits"] / 0.1
    torch.testing.assert_close(
        outputs["residual", "student"]["candidate_logits"][mask], expected[mask], rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(outputs["residual", "selector"]["candidate_logits"][mask], expected[mask], atol=1e-2)

    # a dataset without the students' probabilities is refused before training
    from datasets import Dataset

    groups = Dataset.from_list([{k: v for k, v in f.items() if k != "student_probs"} for f in synthetic_features()])
    args = make_args(tmp_path, residual_log_probs="student")
    with pytest.raises(ValueError, match="`train_dataset` has no `student_probs` column"):
        S2TTrainer(selector=selector, args=args, train_dataset=groups)


def test_lm_kl_is_zero_at_initialisation(tmp_path):
    selector = make_selector("llama")
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path))
    _, outputs = trainer.compute_loss(selector.model, synthetic_batch(), return_outputs=True)
    # LoRA starts at B = 0 and the bins are left out: zero up to float rounding (packed vs plain encoding)
    assert outputs["lm_kl"].abs().max() < 1e-6
    perturb(selector)
    _, outputs = trainer.compute_loss(selector.model, synthetic_batch(), return_outputs=True)
    assert (outputs["lm_kl"] > 0).all()


def test_loss_is_normalised_by_num_items_in_batch(tmp_path):
    selector = make_selector("llama")
    perturb(selector)
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path))
    batch = synthetic_batch()
    _, outputs = trainer.compute_loss(selector.model, batch, return_outputs=True)
    loss = trainer.compute_loss(selector.model, batch, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(loss, outputs["loss"].sum() / 7)
    assert trainer._get_num_items_in_batch([batch, synthetic_batch(2)], torch.device("cpu")) == 5


# --------------------------------------------------------------------------------------------------------------------
# Training


def test_training_learns_the_teacher_choice_and_changes_only_lora_and_bins(tmp_path, groups):
    selector = make_selector("llama")
    base = selector.base_model
    frozen_before = {n: p.detach().clone() for n, p in selector.model.named_parameters() if not p.requires_grad}
    trainable_before = trainable_state(selector)
    probe = torch.tensor([[5, 9, 17, 33, 2, 40]])
    head_before = selector.base_model.get_output_embeddings().weight.detach().clone()
    with torch.no_grad(), selector.adapter_disabled():
        base_logits_before = selector.model(input_ids=probe).logits
    args = make_args(
        tmp_path, max_steps=40, learning_rate=3e-3, per_device_train_batch_size=16, lr_scheduler_type="constant",
        logging_steps=10,
    )
    trainer = S2TTrainer(selector=selector, args=args, train_dataset=groups)
    before = trainer.evaluate(groups)
    trainer.train()
    after = trainer.evaluate(groups)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.6 * losses[0]
    assert after["eval_loss"] < 0.6 * before["eval_loss"]
    assert before["eval_agreement"] == pytest.approx(before["eval_student_agreement"])  # residual form at init
    assert after["eval_student_agreement"] < 0.3
    assert after["eval_agreement"] > after["eval_student_agreement"] + 0.4
    assert after["eval_spearman"] > before["eval_spearman"]
    assert "agreement" in [k for entry in trainer.state.log_history for k in entry]

    # only LoRA and the B bin rows train; every other weight is bit-identical
    trainable_names = selector.trainable_parameter_names()
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable_names)
    deltas = [p for n, p in selector.model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == 1 and deltas[0].shape[0] == NUM_BINS
    for name, value in trainable_before.items():
        assert not torch.equal(value, dict(selector.model.named_parameters())[name]), f"{name} did not train"
    for name, parameter in selector.model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, frozen_before[name]), name
    with torch.no_grad(), selector.adapter_disabled():
        assert torch.equal(selector.model(input_ids=probe).logits, base_logits_before)
    # the adapted output head differs from the base head in the B bin rows only
    head = selector.base_model.get_output_embeddings()
    hidden = torch.randn(3, head_before.shape[1])
    with torch.no_grad():
        adapted, base_rows = head(hidden), hidden @ head_before.T
    ordinary = [i for i in range(adapted.shape[-1]) if i not in selector.bin_token_ids]
    assert torch.equal(adapted[:, ordinary], base_rows[:, ordinary])
    assert not torch.equal(adapted[:, selector.bin_token_ids], base_rows[:, selector.bin_token_ids])
    assert base is selector.base_model


def test_gradient_accumulation_is_exact(tmp_path, groups):
    """One optimiser step over 3 groups: a batch of 3 == batches of 2 + 1 accumulated (normalised by 3 groups)."""
    subset = groups.select(range(3))
    results = []
    for batch_size, accumulation in ((3, 1), (2, 2)):
        selector = make_selector("llama")
        perturb(selector)
        initial = trainable_state(selector)
        args = make_args(
            tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_grad_norm=0.0, lr_scheduler_type="constant",
        )
        S2TTrainer(selector=selector, args=args, train_dataset=subset).train()
        results.append({name: initial[name] - value for name, value in trainable_state(selector).items()})  # = grad
    for name in results[0]:
        scale = results[0][name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_gradient_checkpointing_trains(tmp_path, groups):
    selector = make_selector("qwen2")
    before = trainable_state(selector)
    args = make_args(tmp_path, max_steps=2, learning_rate=1e-2, gradient_checkpointing=True)
    trainer = S2TTrainer(selector=selector, args=args, train_dataset=groups.select(range(8)))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = trainable_state(selector)
    assert sum(not torch.equal(before[n], after[n]) for n in before) == len(before)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints, best model, model card, Hub


def test_checkpoints_early_stopping_and_final_model_are_selectors(tmp_path, groups):
    train, held_out = groups.select(range(96)), groups.select(range(96, len(groups)))
    selector = make_selector("llama")
    args = make_args(
        tmp_path, max_steps=12, learning_rate=3e-3, per_device_train_batch_size=16, eval_strategy="steps",
        eval_steps=4, save_strategy="steps", save_steps=4, metric_for_best_model="eval_agreement",
        greater_is_better=True, load_best_model_at_end=True, save_total_limit=2, lr_scheduler_type="constant",
    )
    trainer = S2TTrainer(
        selector=selector, args=args, train_dataset=train, eval_dataset=held_out,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=10)],
    )
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_agreement" in entry]
    assert len(evals) == 3 and all("eval_spearman" in e and "eval_lm_kl" in e for e in evals)
    assert trainer.state.best_model_checkpoint is not None
    best = max(e["eval_agreement"] for e in evals)
    assert trainer.state.best_metric == pytest.approx(best)
    final_metrics = trainer.evaluate()
    assert final_metrics["eval_agreement"] == pytest.approx(best)  # the best adapter was reloaded

    output = tmp_path / "out"
    trainer.save_model()
    checkpoints = sorted(p for p in os.listdir(output) if p.startswith("checkpoint-"))
    assert checkpoints
    for folder in [output / checkpoints[-1], output]:
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "s2t_config.json", "README.md"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
        loaded = S2TSelector.from_pretrained(tiny_model("llama", seed=0), folder)
        assert loaded.config.scoring == "residual" and loaded.bin_token_ids == selector.bin_token_ids
    card = (output / "README.md").read_text()
    assert "s2t_hf" in card and "selection-distillation" in card and "eval_agreement" in card
    # the final directory holds the best (reloaded) adapter
    reloaded = S2TSelector.from_pretrained(tiny_model("llama", seed=0), output)
    for name, value in trainable_state(reloaded).items():
        torch.testing.assert_close(value, dict(selector.model.named_parameters())[name])

    # training resumes from a selector checkpoint (adapter, optimizer and trainer state)
    resumed_selector = make_selector("llama")
    resumed = S2TTrainer(
        selector=resumed_selector, args=make_args(tmp_path, max_steps=14, per_device_train_batch_size=16,
                                                  save_strategy="steps", save_steps=4), train_dataset=train,
    )
    resumed.train(resume_from_checkpoint=str(output / checkpoints[-1]))
    assert resumed.state.global_step == 14
    assert any("eval_agreement" in entry for entry in resumed.state.log_history)  # history of the first run


def test_push_to_hub_uploads_a_loadable_selector(tmp_path, groups, monkeypatch):
    import transformers.trainer as trainer_module

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["repo_id"] = repo_id
            paths = {name: os.path.join(folder_path, name) for name in os.listdir(folder_path)}
            uploaded["files"] = {name: open(path, "rb").read() for name, path in paths.items() if os.path.isfile(path)}
            return "https://hub/commit"

    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    selector = make_selector("llama")
    args = make_args(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="tiny-s2t", hub_strategy="end")
    trainer = S2TTrainer(selector=selector, args=args, train_dataset=groups.select(range(4)))
    trainer.train()
    trainer.push_to_hub(tags=["my-tag"])
    assert uploaded["repo_id"] == "user/tiny-s2t"
    files = uploaded["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "s2t_config.json", "README.md"} <= files.keys()
    card = files["README.md"].decode()
    assert "my-tag" in card and "select-to-think" in card and 'from_pretrained("user/tiny-s2t"' in card
    assert json.loads(files["s2t_config.json"])["bin_token_ids"] == selector.bin_token_ids


# --------------------------------------------------------------------------------------------------------------------
# Arguments and errors


def test_arguments_and_errors(tmp_path):
    args = make_args(tmp_path)
    assert args.remove_unused_columns is False and args.per_device_train_batch_size == 4
    assert args.learning_rate == 5e-5 and args.label_names == []
    with pytest.raises(ValueError, match="remove_unused_columns"):
        make_args(tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="candidate_temperature"):
        make_args(tmp_path, candidate_temperature=0.0)
    with pytest.raises(TypeError, match="S2TSelector"):
        S2TTrainer(selector=tiny_model("llama"), args=args)
    selector = make_selector("llama", scoring="pure")
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path, scoring="residual", residual_tau=0.5))
    assert selector.config.scoring == "residual" and selector.config.residual_tau == 0.5
    batch = synthetic_batch()
    batch["attention_mask"] = batch["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="left"):
        trainer.compute_loss(selector.model, batch)


def test_eager_attention_packs_and_other_attention_falls_back(tmp_path):
    student = tiny_model("llama", seed=0, attn="eager")
    selector = S2TSelector.create(student, num_bins=NUM_BINS, lora_r=4, lora_dropout=0.0)
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path))
    assert trainer._pack
    selector.base_model.config._attn_implementation = "flash_attention_2"
    assert not S2TTrainer(selector=selector, args=make_args(tmp_path))._pack


# --------------------------------------------------------------------------------------------------------------------
# Multi-process


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path, groups):
    data_dir, output_dir = tmp_path / "groups", tmp_path / "run"
    groups.select(range(32)).save_to_disk(str(data_dir))
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import datasets, torch
            from conftest import tiny_model
            from s2t_hf import S2TSelector, S2TTrainer, S2TTrainingArguments

            data = datasets.load_from_disk({str(data_dir)!r})
            selector = S2TSelector.create(tiny_model("llama", seed=0), num_bins={NUM_BINS}, lora_r=4, lora_dropout=0.0)
            args = S2TTrainingArguments(output_dir={str(output_dir)!r}, report_to="none", max_steps=3,
                                        per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                                        eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
                                        disable_tqdm=True, use_cpu=True)
            trainer = S2TTrainer(selector=selector, args=args, train_dataset=data, eval_dataset=data.select(range(10)))
            trainer.train()
            trainer.save_model()
            if trainer.is_world_process_zero():
                evals = [e for e in trainer.state.log_history if "eval_agreement" in e]
                last = evals[-1]
                print("WORLD", trainer.args.world_size, "EVAL", last["eval_agreement"], last["eval_spearman"])
            """
        )
    )
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    # `accelerate launch --cpu` starts a single process (several CPU processes need mpirun); `--multi_gpu` starts them
    # with torchrun, and `use_cpu=True` (ACCELERATE_USE_CPU) makes them a gloo process group on the CPU.
    result = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WORLD 2" in result.stdout
    agreement, spearman = map(float, result.stdout.split("EVAL")[1].split())
    loaded = S2TSelector.from_pretrained(tiny_model("llama", seed=0), output_dir, is_trainable=True)
    assert loaded.bin_token_ids == list(range(96, 96 + NUM_BINS))
    assert os.path.isfile(output_dir / "checkpoint-3" / "s2t_config.json")
    # the metrics gathered over both processes equal a single-process evaluation of the saved selector
    single = S2TTrainer(selector=loaded, args=make_args(tmp_path)).evaluate(groups.select(range(10)))
    assert single["eval_agreement"] == pytest.approx(agreement)
    assert single["eval_spearman"] == pytest.approx(spearman, abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(margin=-1.0), "`margin` must be non-negative"),
        (dict(teacher_kl_weight=-0.1), "`teacher_kl_weight` must be non-negative"),
        (dict(lm_kl_weight=-0.1), "`lm_kl_weight` must be non-negative"),
        (dict(scoring="mixed"), r"`scoring` must be one of \('pure', 'residual'\) or None"),
        (dict(residual_tau=0.0), "`residual_tau` must be positive"),
        (dict(residual_log_probs="teacher"), r"`residual_log_probs` must be one of \('selector', 'student'\)"),
        (dict(max_context_length=0), "`max_context_length` must be a positive integer or None"),
    ],
)
def test_training_arguments_name_the_bad_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_trainer_refuses_what_it_cannot_train(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    selector = make_selector("llama", scoring="pure")
    args = make_args(tmp_path)
    with pytest.raises(TypeError, match="pass `selector=` instead of `model=`"):
        S2TTrainer(selector=selector, args=args, model=selector.model)
    with pytest.raises(TypeError, match="`args` must be `S2TTrainingArguments`, got TrainingArguments"):
        S2TTrainer(selector=selector, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    selector.save_pretrained(tmp_path / "selector")
    frozen = S2TSelector.from_pretrained(tiny_model("llama", seed=0), tmp_path / "selector")
    with pytest.raises(ValueError, match="no trainable parameter.*is_trainable=True"):
        S2TTrainer(selector=frozen, args=args)
    # empty or foreign datasets are refused at construction, not at the first step
    empty = Dataset.from_dict({"context_ids": [], "cand_ids": [], "teacher_probs": []})
    with pytest.raises(ValueError, match="`train_dataset` is empty: it holds no selection groups"):
        S2TTrainer(selector=selector, args=args, train_dataset=empty)
    with pytest.raises(ValueError, match="`eval_dataset` is empty"):
        S2TTrainer(selector=selector, args=args, eval_dataset={"dev": empty})
    text = Dataset.from_dict({"text": ["tom has 5 apples ."]})
    with pytest.raises(KeyError, match=r"missing \['context_ids', 'cand_ids', 'teacher_probs'\]"):
        S2TTrainer(selector=selector, args=args, train_dataset=text)


def test_groups_of_another_vocabulary_are_refused(tmp_path):
    selector = make_selector("llama", scoring="pure")
    trainer = S2TTrainer(selector=selector, args=make_args(tmp_path))
    batch = synthetic_batch()
    batch["cand_ids"][0, 0] = 500  # collected with a model of a larger vocabulary
    with pytest.raises(ValueError, match="token id 500 but the selector's model has 112 vocabulary rows"):
        trainer.compute_loss(selector.model, batch)


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_logs_go_to_a_file_instead_of_the_console(tmp_path, groups, capsys, disable_tqdm):
    """`log_to_file`: every log as a JSON line in the file, none of the log dictionaries on the console."""
    args = make_args(tmp_path, max_steps=3, logging_steps=1, disable_tqdm=disable_tqdm, eval_strategy="steps",
                     eval_steps=3)
    trainer = S2TTrainer(selector=make_selector(), args=args, train_dataset=groups.select(range(12)),
                         eval_dataset=groups.select(range(12, 16)))
    trainer.log_to_file(tmp_path / "logs" / "trainer_log.jsonl")
    trainer.train()
    console = capsys.readouterr()
    assert "'loss'" not in console.out + console.err and "'eval_loss'" not in console.out + console.err
    lines = [json.loads(line) for line in (tmp_path / "logs" / "trainer_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]
    assert any("eval_agreement" in line for line in lines) and all("total_flos" not in line for line in lines)
    assert [line["loss"] for line in lines if "loss" in line] == [
        entry["loss"] for entry in trainer.state.log_history if "loss" in entry
    ]
