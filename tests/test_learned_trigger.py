"""The learned trigger: its row on the selector, fitting it, reading it inside `generate`, calibration, save / load."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from conftest import EOS, GREEDY, PAD, left_padded_batch, rows_until_eos, tiny_model

from s2t_hf import S2TLogitsProcessor, S2TSelector, collect_selection_data
from s2t_hf.learned_trigger import fit_trigger_row, roc_auc, trigger_labels, trigger_signals


BINS = list(range(80, 88))
TRIGGER = 88
RESERVED = [*BINS, TRIGGER]


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (count,), generator=generator).tolist()
    return [torch.randint(3, 80, (n,), generator=generator).tolist() for n in lengths]


def learned_selector(model, seed: int = 0, preserve_cache: bool = True, lora_scale: float = 0.5):
    """A selector with random (as if trained) LoRA and bins, and a random trigger row marked as fit."""
    selector = S2TSelector.create(
        model, bin_token_ids=BINS, trigger_token_id=TRIGGER, preserve_cache=preserve_cache, lora_r=4
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in selector.model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (lora_scale if "lora" in name else 2.0))
    selector.config.trigger_adapter_mode = "scoring"
    return selector


def trigger_weights(selector) -> torch.Tensor:
    """The trigger row's weights in the selector's adapter (a view: writing it changes the row)."""
    layer = selector.adapter_state.token_layers[0]
    return layer.trainable_tokens_delta["default"][layer.token_indices["default"].index(TRIGGER)]


def hidden_states(model, sequence: list[int]) -> torch.Tensor:
    """The output head's input at every position of `sequence` (one plain forward, batch 1, no cache)."""
    captured = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(torch.tensor([sequence]))
    finally:
        handle.remove()
    return captured[-1][0].float()


@torch.no_grad()
def reference_learned_s2t(selector, teacher, prompt, threshold, top_k, warmup, max_new_tokens, entropy_weight=0.0):
    """Slow, independent collaborative S2T with the learned trigger: batch 1, no cache, every prefix encoded again with
    the LoRA off; the trigger value is the base model's final hidden state times the row's weights, plus the weighted
    entropy of the student's top-64 (reserved rows masked)."""
    model = selector.base_model
    row = trigger_weights(selector).detach().float()
    sequence = list(prompt)
    with selector.adapter_disabled():
        for step in range(max_new_tokens):
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
            signal = float(hidden_states(model, sequence)[-1] @ row)
            logits[RESERVED] = float("-inf")
            top = torch.softmax(logits.topk(64).values, -1)
            signal += entropy_weight * float(-(top * top.log()).sum())
            token = int(logits.argmax())
            if step >= warmup and signal > threshold:
                candidates = logits.topk(top_k).indices
                teacher_log_probs = torch.log_softmax(teacher(torch.tensor([sequence])).logits[0, -1].float(), -1)
                token = int(candidates[teacher_log_probs[candidates].argmax()])
            sequence.append(token)
            if token == EOS:
                break
    return sequence[len(prompt) :]


# --------------------------------------------------------------------------------------------------------------------
# Metrics and labels


def test_roc_auc_equals_the_pairwise_definition():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(2, 40, (1,), generator=generator))
        scores = torch.randint(0, 6, (n,), generator=generator).double()  # many ties
        labels = torch.rand(n, generator=generator) < 0.4
        if labels.all() or not labels.any():
            continue
        pairs = [(p, q) for p, q in itertools.product(scores[labels], scores[~labels])]
        expected = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
        assert roc_auc(scores, labels) == pytest.approx(expected)
    assert roc_auc([float("nan"), 0.2, 0.9], [1, 0, 1]) == 1.0  # NaN left out
    assert roc_auc([0.1, 0.2], [1, 1]) != roc_auc([0.1, 0.2], [1, 1])  # one class: NaN
    with pytest.raises(ValueError, match="`scores` has 2 values but `labels` has 3"):
        roc_auc([0.1, 0.2], [1, 0, 1])


def test_labels():
    trajectory = {
        "steps": [3, 4, 5],
        "cand_ids": [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]],
        "teacher_top1": [7, 9, 40],  # a lower candidate / the student's top-1 / outside the top-K
        "teacher_probs": [[0.1, 0.2, 0.3, 0.0], [0.5, 0.1, 0.1, 0.1], [0.01, 0.02, 0.0, 0.0]],
    }
    assert trigger_labels(trajectory, 4, "fixable").tolist() == [True, False, False]
    assert trigger_labels(trajectory, 2, "fixable").tolist() == [False, False, False]  # 7 is not in the top-2
    assert trigger_labels(trajectory, 4, "flip").tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"`top_k=5` must lie in \[2, 4\]"):
        trigger_labels(trajectory, 5)
    with pytest.raises(ValueError, match="`label` must be one of"):
        trigger_labels(trajectory, 4, "better")


# --------------------------------------------------------------------------------------------------------------------
# The row on the selector


def test_selector_reserves_and_saves_the_trigger_row(tmp_path):
    selector = S2TSelector.create(tiny_model("llama"), num_bins=4, learned_trigger=True)
    assert selector.bin_token_ids == [96, 97, 98, 99] and selector.trigger_token_id == 100
    assert selector.config.num_added_rows == 5 and selector.reserved_token_ids == [96, 97, 98, 99, 100]
    layer = selector.adapter_state.token_layers[0]
    assert layer.token_indices["default"] == [96, 97, 98, 99, 100]
    with torch.no_grad():
        layer.trainable_tokens_delta["default"][-1] = torch.arange(32).float()
    selector.save_pretrained(tmp_path)
    loaded = S2TSelector.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.trigger_token_id == 100
    loaded_layer = loaded.adapter_state.token_layers[0]
    assert torch.equal(loaded_layer.trainable_tokens_delta["default"][-1], torch.arange(32).float())
    assert "trigger_token_id | 100" in (tmp_path / "README.md").read_text()

    with pytest.raises(ValueError, match="needs `trigger_token_id` too"):
        S2TSelector.create(tiny_model("llama"), bin_token_ids=BINS, learned_trigger=True)
    with pytest.raises(ValueError, match="`trigger_token_id` 81 is also a bin row"):
        S2TSelector.create(tiny_model("llama"), bin_token_ids=BINS, trigger_token_id=81)
    with pytest.raises(ValueError, match=r"`trigger_token_id` \[500\] are out of range"):
        S2TSelector.create(tiny_model("llama"), bin_token_ids=BINS, trigger_token_id=500)


# --------------------------------------------------------------------------------------------------------------------
# Reading the row inside generate


def rule_out_reserved_rows(batch_id, input_ids):
    """A `prefix_allowed_tokens_fn` that allows every ordinary token: it rules out the reserved rows, as any
    constraint rules out the tokens it does not allow."""
    return [i for i in range(96) if i not in RESERVED]


@pytest.mark.parametrize(
    "fused, entropy_weight, constrained", [(False, 0.0, False), (True, 0.0, False), (False, 1.5, False),
                                          (False, 0.0, True), (True, 1.5, True)],
)
def test_learned_trigger_with_teacher_selection_equals_the_slow_reference(fused, entropy_weight, constrained):
    """Also with logits processors before S2T that rule out the trigger row (`constrained`): the row is read from the
    model's output, so the trigger fires where it would without them."""
    import s2t_hf

    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    selector = learned_selector(student)
    selector.config.trigger_entropy_weight = entropy_weight
    prompts, input_ids, attention_mask = left_padded_batch()
    # a threshold in the middle of the row's values on these prompts
    with selector.adapter_disabled():
        values = torch.cat([hidden_states(selector.base_model, p) @ trigger_weights(selector).detach() for p in prompts])
    threshold = float(values.median()) + entropy_weight * 2.0
    with S2TLogitsProcessor(
        student, selector.config, selector=selector, teacher=teacher, selection="teacher", trigger="learned",
        trigger_threshold=threshold, top_k=4, warmup_tokens=1, adapter_mode="scoring", record_triggers=True,
    ) as s2t:
        earlier = dict(suppress_tokens=RESERVED, prefix_allowed_tokens_fn=rule_out_reserved_rows) if constrained else {}
        if fused:
            output = s2t_hf.generate(
                student, s2t=s2t, input_ids=input_ids, attention_mask=attention_mask, **earlier, **GREEDY
            )
        else:
            output = student.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **earlier, **GREEDY
            )
        assert 0 < s2t.stats["triggers"] < s2t.stats["eligible_steps"]
    got = rows_until_eos(output, input_ids.shape[1])
    for prompt, row in zip(prompts, got):
        assert row == reference_learned_s2t(
            selector, teacher, prompt, threshold, 4, 1, GREEDY["max_new_tokens"], entropy_weight
        )


def test_the_trigger_row_is_never_generated_and_the_cache_stays_the_base_models():
    """With `adapter_mode="scoring"` and a trigger that never fires, `generate` is the base model's, bit for bit: the
    same tokens, logits (but the reserved rows) and cache, even where the trigger row would be the argmax."""
    student = tiny_model("llama", seed=0)
    selector = learned_selector(student)
    with torch.no_grad():  # a trigger row far above every other logit
        trigger_weights(selector).mul_(100.0)
    _, input_ids, attention_mask = left_padded_batch()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, return_dict_in_generate=True, output_logits=True,
                  **GREEDY)
    with selector.adapter_disabled():
        base = student.generate(**kwargs, suppress_tokens=RESERVED)
    with selector.lora_disabled():  # what the row would do unmasked: it is the argmax
        unmasked = student.generate(**kwargs)
    assert (unmasked.sequences[:, input_ids.shape[1]:] == TRIGGER).any()
    with S2TLogitsProcessor(
        student, selector.config, selector=selector, selection="local", trigger="learned", trigger_threshold=1e9,
        adapter_mode="scoring",
    ) as s2t:
        out = student.generate(**kwargs, logits_processor=[s2t])
        assert s2t.stats["triggers"] == 0
    assert torch.equal(out.sequences, base.sequences)
    assert not (out.sequences[:, input_ids.shape[1]:] == TRIGGER).any()
    ordinary = [i for i in range(96) if i not in RESERVED]
    for mine, theirs in zip(out.logits, base.logits):
        assert torch.equal(mine[:, ordinary], theirs[:, ordinary])
    for layer_mine, layer_base in zip(out.past_key_values.layers, base.past_key_values.layers):
        assert torch.equal(layer_mine.keys, layer_base.keys) and torch.equal(layer_mine.values, layer_base.values)


def test_local_selection_with_the_learned_trigger_scores_on_the_live_cache():
    student = tiny_model("llama", seed=0)
    selector = learned_selector(student)
    _, input_ids, attention_mask = left_padded_batch()
    paths = {}
    outputs = {}
    for path in ("cache", "recompute"):
        with S2TLogitsProcessor(
            student, selector.config, selector=selector, selection="local", trigger="learned", trigger_threshold=0.0,
            top_k=4, adapter_mode="scoring", local_path=path,
        ) as s2t:
            outputs[path] = student.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY
            )
            paths[path] = s2t.stats["local_path"]
            assert s2t.stats["triggers"] > 0
    assert paths == {"cache": "cache", "recompute": "recompute"}
    assert torch.equal(outputs["cache"], outputs["recompute"])


def test_the_fused_local_loop_reads_the_row_past_earlier_processors():
    """S2T-Local in the fused loop (`adapter_mode="generate"`: the row is read from the logits of the forward that
    also scored the candidates) fires at the same steps, with the same tokens, when `suppress_tokens` rules the
    trigger row out."""
    import s2t_hf

    student = tiny_model("llama", seed=0)
    selector = learned_selector(student)
    selector.config.trigger_adapter_mode = "generate"
    _, input_ids, attention_mask = left_padded_batch()
    runs = {}
    for suppress in (None, RESERVED):
        with S2TLogitsProcessor(
            student, selector.config, selector=selector, selection="local", trigger="learned", trigger_threshold=0.0,
            top_k=4, adapter_mode="generate",
        ) as s2t:
            output = s2t_hf.generate(
                student, s2t=s2t, input_ids=input_ids, attention_mask=attention_mask, suppress_tokens=suppress,
                **GREEDY,
            )
            assert s2t.stats["local_path"] == "fused"
            runs[suppress is None] = (output, s2t.stats["triggers"], s2t.stats["eligible_steps"])
    (plain, triggers, eligible), (suppressed, triggers_suppressed, _) = runs[True], runs[False]
    assert 0 < triggers < eligible
    assert triggers_suppressed == triggers
    assert torch.equal(suppressed, plain)


def test_learned_trigger_construction_errors(caplog):
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="`trigger='learned'` reads the learned trigger row of a selector"):
        S2TLogitsProcessor(student, teacher=teacher, trigger="learned", trigger_threshold=0.0)
    plain = S2TSelector.create(tiny_model("llama"), bin_token_ids=BINS)
    with pytest.raises(ValueError, match="this one was created without one"):
        S2TLogitsProcessor(plain.base_model, selector=plain, selection="local", trigger="learned")
    unfit = S2TSelector.create(tiny_model("llama"), bin_token_ids=BINS, trigger_token_id=TRIGGER)
    with pytest.raises(ValueError, match="trigger row was never fit"):
        S2TLogitsProcessor(unfit.base_model, selector=unfit, selection="local", trigger="learned")
    selector = learned_selector(student)
    with caplog.at_level(logging.WARNING):
        S2TLogitsProcessor(
            student, selector.config, selector=selector, selection="local", trigger="learned", trigger_threshold=0.0,
            adapter_mode="generate",
        ).remove_hooks()
    assert "was fit on the base model's (LoRA off) hidden states" in caplog.text
    with S2TLogitsProcessor(
        student, selector.config, selector=selector, selection="local", trigger="learned", adapter_mode="scoring"
    ) as s2t:
        with pytest.raises(ValueError, match="The `learned` trigger needs a threshold"):
            student.generate(torch.tensor([[5, 6, 7]]), logits_processor=[s2t], **GREEDY)


# --------------------------------------------------------------------------------------------------------------------
# Fitting, calibration, save / load


@pytest.fixture(scope="module")
def collected():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=3)
    prompts = random_prompts(96, seed=1)
    groups, trajectories = collect_selection_data(
        student, teacher, prompts=prompts, top_k=8, fraction=0.2, max_new_tokens=16, show_progress=False,
        return_trajectories=True, suppress_token_ids=RESERVED,
    )
    return student, teacher, prompts, trajectories


def planted_trajectories(model, trajectories, direction):
    """The trajectories relabelled so that a step is `fixable` exactly where the base model's final hidden state has
    a positive component along `direction` (a signal a linear probe on the right positions can recover)."""
    out = []
    for row in trajectories:
        row = dict(row)
        hidden = hidden_states(model, row["input_ids"])
        positive = [(hidden[row["prompt_length"] + s - 1] @ direction) > 0 for s in row["steps"]]
        row["teacher_top1"] = [c[1] if p else c[0] for c, p in zip(row["cand_ids"], positive)]
        out.append(row)
    return out


@pytest.mark.parametrize("adapter_mode", ["scoring", "generate"])
def test_fit_recovers_a_planted_linear_signal(collected, adapter_mode):
    student, _, _, trajectories = collected
    model = tiny_model("llama", seed=0)
    selector = learned_selector(model, lora_scale=2.0)
    selector.config.trigger_adapter_mode = None
    direction = torch.randn(32, generator=torch.Generator().manual_seed(5))
    # the labels follow the hidden states of the mode the row is fit for
    with (selector.lora_disabled() if adapter_mode == "scoring" else torch.no_grad()):
        relabelled = planted_trajectories(selector.model, trajectories, direction)
    report = fit_trigger_row(selector, relabelled, adapter_mode=adapter_mode, top_k=8, target_rate=0.25)
    assert report["entropy_weight"] == selector.config.trigger_entropy_weight != 0.0
    assert selector.config.trigger == "learned" and selector.config.trigger_adapter_mode == adapter_mode
    assert 0.2 < report["positive_rate"] < 0.8
    assert report["auroc"]["learned"] > 0.97, report
    assert report["auroc"]["learned"] > report["auroc"]["entropy"] + 0.2
    other = "generate" if adapter_mode == "scoring" else "scoring"
    mismatched = trigger_signals(selector, relabelled, adapter_mode=other)
    assert roc_auc(mismatched["learned"], mismatched["labels"]) < report["auroc"]["learned"] - 0.02
    # the threshold is the row's quantile on the fit positions, read as the processor reads it
    signals = trigger_signals(selector, relabelled)
    rate = float((signals["learned"] > report["threshold"]).double().mean())
    assert rate == pytest.approx(0.25, abs=0.05)


def test_fit_train_save_two_line_load_and_generate(collected, tmp_path):
    student, teacher, prompts, trajectories = collected
    model = tiny_model("llama", seed=0)
    selector = learned_selector(model)
    report = fit_trigger_row(selector, trajectories, label="flip", top_k=4, adapter_mode="scoring", target_rate=0.2)
    assert report["positions"]["fit"] > 4 * report["positions"]["validation"] > 0
    assert all(value == value for value in report["auroc"].values())  # the three signals, none NaN
    calibration, held_out = prompts[:48], prompts[48:]
    config = dict(selection="local", top_k=4, adapter_mode="scoring")
    with S2TLogitsProcessor(model, selector.config, selector=selector, **config) as s2t:
        assert s2t.config.trigger == "learned"
        threshold = s2t.calibrate(calibration, target_rate=0.2, max_new_tokens=16, pad_token_id=PAD)
        selector.config = s2t.config
        triggers = eligible = 0
        outputs = []
        for start in range(0, len(held_out), 8):
            batch = held_out[start : start + 8]
            length = max(map(len, batch))
            ids = torch.tensor([[PAD] * (length - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in batch])
            outputs.append(student_generate(model, s2t, ids, mask))
            triggers += s2t.stats["triggers"]
            eligible += s2t.stats["eligible_steps"]
    # the same tolerance as the entropy trigger's calibration test, on ~600 held-out steps
    assert eligible > 500 and abs(triggers / eligible - 0.2) <= 0.05, (triggers, eligible)
    selector.save_pretrained(tmp_path / "selector")

    fresh = tiny_model("llama", seed=0)
    s2t = S2TLogitsProcessor.from_pretrained(tmp_path / "selector", model=fresh)
    with s2t:
        assert s2t.config.trigger == "learned" and s2t.config.trigger_threshold == threshold
        for start, expected in zip(range(0, len(held_out), 8), outputs):
            batch = held_out[start : start + 8]
            length = max(map(len, batch))
            ids = torch.tensor([[PAD] * (length - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in batch])
            assert torch.equal(student_generate(fresh, s2t, ids, mask), expected)


def student_generate(model, s2t, input_ids, attention_mask):
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], max_new_tokens=16,
        do_sample=False, pad_token_id=PAD,
    )


def test_fit_errors(collected):
    student, _, _, trajectories = collected
    plain = S2TSelector.create(tiny_model("llama"), bin_token_ids=BINS)
    with pytest.raises(ValueError, match="has no trigger row"):
        fit_trigger_row(plain, trajectories)
    selector = learned_selector(tiny_model("llama"))
    with pytest.raises(ValueError, match="lacks the columns"):
        fit_trigger_row(selector, trajectories.remove_columns(["steps"]))
    with pytest.raises(ValueError, match="`trajectories` is empty"):
        fit_trigger_row(selector, [])
    with pytest.raises(ValueError, match=r"`top_k=9` must lie in \[2, 8\]"):
        fit_trigger_row(selector, trajectories, top_k=9)
    with pytest.raises(ValueError, match="`adapter_mode` must be one of"):
        fit_trigger_row(selector, trajectories, adapter_mode="both")
    with pytest.raises(ValueError, match="same `fixable` label"):
        fit_trigger_row(selector, [{**row, "teacher_top1": [c[0] for c in row["cand_ids"]]} for row in trajectories])
    with S2TLogitsProcessor(selector.base_model, selector.config, selector=selector, selection="local",
                            trigger="never"):
        with pytest.raises(ValueError, match="outside the processor's `with` block"):
            fit_trigger_row(selector, trajectories, label="flip", top_k=4)
