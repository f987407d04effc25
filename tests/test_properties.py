"""Property-based tests (hypothesis) of the pure functions: trigger signals and thresholds, candidates and selection,
the losses and the attention masks, each against a slow float64 / python-loop reference.

Settings come from the profiles in `conftest.py` (`HYPOTHESIS_PROFILE=thorough` for a deeper search). Falsifying
examples that found bugs are kept as explicit regression tests at the end.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from s2t_hf.kv import candidate_attention_mask, positions_from_attention_mask, scoring_masks
from s2t_hf.losses import (
    SelectionLossOutput,
    lm_kl_divergence,
    selection_loss,
    selection_metrics,
    spearman_correlation,
)
from s2t_hf.selection import (
    expected_bin_value,
    local_candidate_logits,
    selector_log_probs,
    takeover_selection,
    teacher_selection,
    top_k_candidates,
)
from s2t_hf.triggers import entropy_signal, kl_signal, threshold_for_rate


INF, NAN = float("inf"), float("nan")
FINITE = st.floats(-30, 30, width=32)
TOL = 1e-4


@st.composite
def logit_rows(draw, max_batch=4, min_vocab=1, max_vocab=40, masked=True, special=False):
    """`(batch, vocab)` float32 logits: finite values (hypothesis makes many ties), `-inf` (masked tokens) and, with
    `special`, NaN and `+inf`."""
    batch = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(min_vocab, max_vocab))
    elements = st.one_of(FINITE, st.just(-INF)) if masked else FINITE
    scores = draw(hnp.arrays(np.float32, (batch, vocab), elements=elements))
    if special:  # a few NaN / +inf entries in otherwise ordinary rows
        entry = st.tuples(st.integers(0, batch - 1), st.integers(0, vocab - 1), st.sampled_from([NAN, INF]))
        for row, column, value in draw(st.lists(entry, max_size=3)):
            scores[row, column] = value
    return torch.from_numpy(scores)


@st.composite
def distinct_logits(draw, batch, vocab):
    """Logits with gaps of at least 0.25 between any two values of a row (|x| <= 30), not exactly representable in
    bfloat16: bfloat16 rounding (relative error 2**-9) cannot reorder them."""
    rows = []
    for _ in range(batch):
        levels = draw(st.permutations(range(-60, 61)))[:vocab]
        jitter = draw(hnp.arrays(np.float32, (vocab,), elements=st.floats(-0.125, 0.125, width=32)))
        rows.append(np.float32(0.5) * np.asarray(levels, dtype=np.float32) + jitter)
    return torch.from_numpy(np.stack(rows))


def reference_log_probs(row: list[float]) -> list[float] | None:
    """float64 log-probabilities of one row, NaN as `-inf`, `+inf` tokens sharing probability one; None if the row has
    no usable token."""
    if any(v == INF for v in row):
        count = sum(v == INF for v in row)
        return [-math.log(count) if v == INF else -INF for v in row]
    finite = [v for v in row if math.isfinite(v)]
    if not finite:
        return None
    top = max(finite)
    total = math.log(sum(math.exp(v - top) for v in finite)) + top
    return [v - total if math.isfinite(v) else -INF for v in row]


def reference_entropy(row: list[float], k: int) -> float:
    values = sorted(row, reverse=True)[: min(k, len(row))]
    top = values[0]
    weights = [math.exp(v - top) for v in values]
    probs = [w / sum(weights) for w in weights]
    return -sum(p * math.log(p) for p in probs if p > 0)


# ------------------------------------------------------------------ triggers


@given(scores=logit_rows(special=True), k=st.integers(1, 50))
def test_entropy_signal_is_bounded_matches_a_reference_and_is_nan_on_bad_rows(scores, k):
    signal = entropy_signal(scores, k)
    assert signal.shape == (scores.shape[0],) and signal.dtype == torch.float32
    for row, value in zip(scores.tolist(), signal.tolist()):
        if any(math.isnan(v) or v == INF for v in row) or not any(math.isfinite(v) for v in row):
            assert math.isnan(value)  # never crosses a threshold
            continue
        support = min(k, sum(math.isfinite(v) for v in row))
        assert -1e-6 <= value <= math.log(support) + 1e-5
        assert value == pytest.approx(reference_entropy(row, k), abs=TOL)


@given(data=st.data(), k=st.integers(1, 50))
def test_kl_signal_is_non_negative_zero_on_itself_and_ignores_extra_teacher_rows(data, k):
    scores = data.draw(logit_rows())
    teacher = data.draw(hnp.arrays(np.float32, tuple(scores.shape), elements=st.one_of(FINITE, st.just(-INF))))
    teacher = torch.from_numpy(teacher)
    kl = kl_signal(scores, teacher, k)
    floor = math.log(1e-30)  # teacher probabilities are clamped there
    for row, teacher_row, value in zip(scores.tolist(), teacher.tolist(), kl.tolist()):
        ranked = sorted(range(len(row)), key=lambda i: -row[i])
        support = ranked[: min(k, len(row))]
        if len(support) < len(row) and row[ranked[len(support) - 1]] == row[ranked[len(support)]]:
            continue  # a tie at the support's boundary: which of the tied tokens the support holds is arbitrary
        student = reference_log_probs([row[i] for i in support])
        teacher_lp = reference_log_probs([teacher_row[i] for i in support])
        if student is None or teacher_lp is None:
            assert math.isnan(value)  # no finite student (or teacher) value on the support: never triggers
            continue
        expected = sum(math.exp(s) * (s - max(t, floor)) for s, t in zip(student, teacher_lp) if s > -INF)
        assert value >= -1e-5
        assert value == pytest.approx(expected, abs=1e-3, rel=1e-4)
    finite = torch.where(torch.isfinite(scores), scores, 0.0)
    assert kl_signal(finite, finite, k).abs().max() <= 1e-5
    assert kl_signal(finite, finite + 3.0, k).abs().max() <= 1e-5
    wider = torch.cat([teacher, torch.full((scores.shape[0], 5), 100.0)], dim=-1)
    torch.testing.assert_close(kl_signal(scores, wider, k), kl, rtol=0, atol=0, equal_nan=True)


@given(
    signals=st.lists(st.one_of(st.floats(0, 5, width=32), st.sampled_from([0.0, 0.5, 1.0])), min_size=1, max_size=200),
    rate=st.floats(0.001, 0.999),
    nans=st.integers(0, 5),
)
def test_threshold_hits_the_rate_within_the_samples_quantisation(signals, rate, nans):
    values = torch.tensor(signals + [NAN] * nans, dtype=torch.float32)
    threshold = threshold_for_rate(values, rate)
    assert math.isfinite(threshold)
    finite = values[~values.isnan()]
    count = finite.numel()
    # compared as the processor compares: a float32 signal against the Python float
    above = float((finite > threshold).float().mean())
    at_or_above = float((finite >= threshold).float().mean())
    assert above <= rate + 1.0 / count + 1e-9
    assert at_or_above >= rate - 1.0 / count - 1e-9
    if len(set(finite.tolist())) == count:  # no ties: the rate itself, up to one sample
        assert abs(above - rate) <= 1.0 / count + 1e-9
    assert not (values[values.isnan()] > threshold).any()  # NaN signals never trigger


# ------------------------------------------------------------------ candidates and selection


@given(scores=logit_rows(special=True), k=st.integers(1, 48), ratio=st.none() | st.floats(0.01, 1.0))
def test_candidates_are_the_sorted_top_k_valid_ones_finite_and_the_top_1_always_valid(scores, k, ratio):
    ids, log_probs, valid = top_k_candidates(scores, k, ratio)
    vocab = scores.shape[1]
    assert ids.shape == log_probs.shape == valid.shape == (scores.shape[0], min(k, vocab))
    assert valid[:, 0].all()
    for row, row_ids, row_values, row_valid in zip(scores.tolist(), ids.tolist(), log_probs.tolist(), valid.tolist()):
        assert len(set(row_ids)) == len(row_ids) and all(0 <= i < vocab for i in row_ids)
        reference = reference_log_probs(row)
        if reference is None:  # no usable token: nothing is valid but the (arbitrary) top-1
            assert not any(row_valid[1:])
            continue
        chosen = [reference[i] for i in row_ids]
        assert chosen[0] == pytest.approx(max(reference), abs=TOL)  # the top-1 is the best token
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(chosen))  # best first
        others = [reference[i] for i in range(vocab) if i not in row_ids]
        assert not others or min(chosen) >= max(others) - 1e-5  # the K best
        for value, expected in zip(row_values, chosen):
            assert value == pytest.approx(expected, abs=TOL) or value == expected == -INF
        for position, (value, is_valid) in enumerate(zip(chosen, row_valid)):
            if is_valid:
                assert value > -INF  # a masked (or NaN) token is never a valid candidate
            if position == 0 or value == -INF:
                continue
            bound = chosen[0] + math.log(ratio) if ratio is not None else -INF
            if abs(value - bound) > 1e-4:
                assert is_valid == (value >= bound)


@given(data=st.data(), k=st.integers(1, 12))
def test_candidates_of_bfloat16_scores_equal_float32_ones_when_margins_allow(data, k):
    batch, vocab = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 40))
    scores = data.draw(distinct_logits(batch, vocab))
    ids, _, valid = top_k_candidates(scores, k)
    ids_bf16, log_probs_bf16, valid_bf16 = top_k_candidates(scores.bfloat16(), k)
    assert torch.equal(ids, ids_bf16) and torch.equal(valid, valid_bf16)
    assert log_probs_bf16.dtype == torch.float32
    teacher = data.draw(distinct_logits(batch, vocab))
    # a teacher's logits in bfloat16 (the processor converts them to float32 before its log-softmax)
    assert torch.equal(teacher_selection(ids, valid, teacher), teacher_selection(ids, valid, teacher.bfloat16()))


@given(data=st.data(), k=st.integers(1, 20), ratio=st.none() | st.floats(0.01, 1.0))
def test_teacher_selection_picks_the_first_best_valid_candidate(data, k, ratio):
    scores = data.draw(logit_rows(special=True))
    elements = st.one_of(FINITE, st.sampled_from([-INF, NAN]))
    teacher = torch.from_numpy(data.draw(hnp.arrays(np.float32, tuple(scores.shape), elements=elements)))
    ids, _, valid = top_k_candidates(scores, k, ratio)
    positions = teacher_selection(ids, valid, teacher)
    assert positions.shape == (scores.shape[0],)
    rows = zip(ids.tolist(), valid.tolist(), teacher.tolist(), positions.tolist())
    for row_ids, row_valid, teacher_row, position in rows:
        assert row_valid[position]
        values = [teacher_row[i] if ok else -INF for i, ok in zip(row_ids, row_valid)]
        values = [-INF if math.isnan(v) else v for v in values]
        assert position == values.index(max(values))  # the best, ties (and no finite value: 0) to the student's rank


@given(data=st.data())
def test_takeover_never_selects_a_blocked_row(data):
    teacher = data.draw(logit_rows(min_vocab=2))
    vocab = teacher.shape[1]
    blocked = data.draw(st.lists(st.integers(0, vocab - 1), max_size=vocab - 1, unique=True))
    # the teacher's log-probabilities have a finite value outside the blocked rows
    free = [i for i in range(vocab) if i not in blocked]
    teacher[:, free[0]] = torch.where(torch.isfinite(teacher[:, free[0]]), teacher[:, free[0]], 0.0)
    chosen = takeover_selection(teacher, torch.tensor(blocked, dtype=torch.long))
    for row, token in zip(teacher.tolist(), chosen.tolist()):
        values = [-INF if i in blocked else v for i, v in enumerate(row)]
        assert token not in blocked and token == values.index(max(values))


@given(data=st.data(), bf16=st.booleans())
def test_selector_log_probs_leave_the_blocked_rows_out(data, bf16):
    logits = data.draw(logit_rows(min_vocab=2, masked=False))
    logits = logits.bfloat16() if bf16 else logits
    vocab = logits.shape[1]
    blocked = data.draw(st.lists(st.integers(0, vocab - 1), max_size=vocab - 1, unique=True))
    k = data.draw(st.integers(1, vocab))
    candidates = torch.tensor([data.draw(st.permutations(range(vocab)))[:k] for _ in range(logits.shape[0])])
    result = selector_log_probs(logits, candidates, torch.tensor(blocked, dtype=torch.long))
    assert result.dtype == torch.float32 and result.shape == candidates.shape
    kept = [i for i in range(vocab) if i not in blocked]
    for row, row_ids, values in zip(logits.float().tolist(), candidates.tolist(), result.tolist()):
        reference = reference_log_probs([row[i] for i in kept])
        for token, value in zip(row_ids, values):
            if token in blocked:
                assert value == -INF
            else:
                assert value == pytest.approx(reference[kept.index(token)], abs=TOL)


@given(data=st.data(), bf16=st.booleans())
def test_expected_bin_value_is_a_convex_combination_of_the_bin_values(data, bf16):
    bins = data.draw(st.integers(1, 16))
    shape = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2))) + (bins,)
    logits = torch.from_numpy(data.draw(hnp.arrays(np.float32, shape, elements=FINITE)))
    values = torch.from_numpy(data.draw(hnp.arrays(np.float32, (bins,), elements=st.floats(-2, 2, width=32))))
    given_logits = logits.bfloat16() if bf16 else logits
    score = expected_bin_value(given_logits, values)
    assert score.shape == shape[:-1] and score.dtype == torch.float32
    assert (score >= values.min() - 1e-5).all() and (score <= values.max() + 1e-5).all()
    flat_logits, flat_score = given_logits.float().reshape(-1, bins).tolist(), score.reshape(-1).tolist()
    for row, value in zip(flat_logits, flat_score):
        probs = [math.exp(lp) for lp in reference_log_probs(row)]
        assert value == pytest.approx(sum(p * v for p, v in zip(probs, values.tolist())), abs=TOL)
    if bf16:  # rounding the logits by at most `delta` moves the probabilities by a total variation of ~2 * delta
        delta = float((logits - given_logits.float()).abs().max())
        spread = float(values.max() - values.min())
        exact = expected_bin_value(logits, values)
        assert (score - exact).abs().max() <= 2.5 * delta * spread + 1e-5
    pure = local_candidate_logits(given_logits, values, "pure")
    assert torch.equal(pure, score)
    student = torch.from_numpy(data.draw(hnp.arrays(np.float32, shape[:-1], elements=st.floats(-20, 0, width=32))))
    tau = data.draw(st.floats(0.01, 10.0))
    residual = local_candidate_logits(given_logits, values, "residual", tau, student)
    torch.testing.assert_close(residual, student + score / tau)


# ------------------------------------------------------------------ losses


@st.composite
def selection_groups(draw, max_batch=4, max_k=8):
    """Candidate logits, teacher probabilities and a candidate mask with at least one candidate per group."""
    batch, k = draw(st.integers(1, max_batch)), draw(st.integers(1, max_k))
    logits = draw(hnp.arrays(np.float32, (batch, k), elements=st.floats(-50, 50, width=32)))
    teacher = draw(hnp.arrays(np.float32, (batch, k), elements=st.floats(0, 1, width=32)))
    mask = draw(hnp.arrays(np.bool_, (batch, k)))
    mask[np.arange(batch), draw(st.lists(st.integers(0, k - 1), min_size=batch, max_size=batch))] = True
    return torch.from_numpy(logits), torch.from_numpy(teacher), torch.from_numpy(mask)


def reference_selection_loss(logits, teacher, mask, temperature, margin, weight):
    """One group, float64, python: CE + hinge + weight * KL over the valid candidates."""
    valid = [i for i, ok in enumerate(mask) if ok]
    total = sum(teacher[i] for i in valid)
    target = {i: teacher[i] / total if total > 0 else 0.0 for i in valid}
    choice = max(valid, key=lambda i: (teacher[i], -i))  # the first best
    log_q = dict(zip(valid, reference_log_probs([logits[i] / temperature for i in valid])))
    cross_entropy = -log_q[choice]
    runner_up = max((logits[i] for i in valid if i != choice), default=None)
    hinge = max(0.0, margin - (logits[choice] - runner_up)) if runner_up is not None else 0.0
    kl = sum(p * (math.log(p) - log_q[i]) for i, p in target.items() if p > 0)
    return choice, cross_entropy, hinge, kl, cross_entropy + hinge + weight * kl


@given(
    groups=selection_groups(),
    temperature=st.floats(0.1, 10.0),
    margin=st.floats(0.0, 5.0),
    weight=st.floats(0.0, 2.0),
    filler=st.sampled_from([0.0, -1e4, 1e4, NAN]),
)
def test_selection_loss_is_finite_non_negative_matches_a_reference_and_ignores_padding(
    groups, temperature, margin, weight, filler
):
    logits, teacher, mask = groups
    logits.requires_grad_(True)
    out = selection_loss(logits, teacher, mask, temperature=temperature, margin=margin, teacher_kl_weight=weight)
    out.loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()
    out = SelectionLossOutput(**{name: value.detach() for name, value in vars(out).items()})
    for term in (out.loss, out.cross_entropy, out.hinge, out.teacher_kl):
        assert torch.isfinite(term).all() and (term >= -1e-5).all()
    for i in range(logits.shape[0]):
        choice, ce, hinge, kl, loss = reference_selection_loss(
            logits[i].tolist(), teacher[i].tolist(), mask[i].tolist(), temperature, margin, weight
        )
        assert int(out.teacher_choice[i]) == choice
        for value, expected in ((out.cross_entropy, ce), (out.hinge, hinge), (out.teacher_kl, kl), (out.loss, loss)):
            assert float(value[i]) == pytest.approx(expected, abs=1e-3, rel=1e-4)
    # padding candidates may hold anything
    padded_logits = logits.detach().masked_fill(~mask, filler)
    padded_teacher = teacher.masked_fill(~mask, abs(filler))
    padded = selection_loss(padded_logits, padded_teacher, mask, temperature=temperature, margin=margin,
                            teacher_kl_weight=weight)
    for name in ("loss", "cross_entropy", "hinge", "teacher_kl", "teacher_choice"):
        assert torch.equal(getattr(padded, name), getattr(out, name))


@given(data=st.data(), chunk=st.integers(1, 8), bf16=st.booleans())
def test_lm_kl_is_non_negative_matches_a_reference_and_its_gradient(data, chunk, bf16):
    batch, length, vocab = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), data.draw(st.integers(2, 12))
    draw_logits = hnp.arrays(np.float32, (batch, length, vocab), elements=st.floats(-20, 20, width=32))
    base, adapted = torch.from_numpy(data.draw(draw_logits)), torch.from_numpy(data.draw(draw_logits))
    if bf16:
        base, adapted = base.bfloat16(), adapted.bfloat16()
    attention_mask = torch.from_numpy(data.draw(hnp.arrays(np.int64, (batch, length), elements=st.integers(0, 1))))
    ignore = data.draw(st.lists(st.integers(0, vocab - 1), max_size=vocab - 1, unique=True))
    adapted.requires_grad_(True)
    kl = lm_kl_divergence(base, adapted, attention_mask, ignore_token_ids=ignore, chunk_size=chunk)
    assert kl.shape == (batch,) and kl.dtype == torch.float32
    assert torch.isfinite(kl).all() and (kl >= -1e-6).all()
    # float64 autograd reference over the kept columns, averaged over the real positions
    keep = [i for i in range(vocab) if i not in ignore]
    reference_adapted = adapted.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(base.double()[..., keep], -1)
    log_q = torch.log_softmax(reference_adapted[..., keep], -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    weights = attention_mask.double()
    expected = (per_position * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
    torch.testing.assert_close(kl.double(), expected, atol=1e-4, rtol=1e-4)
    upstream = torch.arange(1, batch + 1, dtype=torch.float32)
    (kl * upstream).sum().backward()
    (expected * upstream.double()).sum().backward()
    tolerance = 2e-2 if bf16 else 1e-5  # the gradient is kept in the logits' dtype
    torch.testing.assert_close(adapted.grad.double(), reference_adapted.grad, atol=tolerance, rtol=tolerance)
    same = lm_kl_divergence(base, base.clone(), attention_mask, ignore_token_ids=ignore)
    assert torch.equal(same, torch.zeros(batch))


def reference_ranks(values):
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


@given(data=st.data())
def test_spearman_matches_a_reference_and_metrics_agree_with_the_argmax(data):
    logits, teacher, mask = data.draw(selection_groups())
    levels = st.sampled_from([0.0, 0.1, 0.2, 0.3])  # many ties
    other = torch.from_numpy(data.draw(hnp.arrays(np.float32, tuple(logits.shape), elements=levels)))
    correlation = spearman_correlation(logits, other, mask)
    assert torch.equal(correlation, spearman_correlation(other, logits, mask))
    for i in range(logits.shape[0]):
        x = [v for v, ok in zip(logits[i].tolist(), mask[i].tolist()) if ok]
        y = [v for v, ok in zip(other[i].tolist(), mask[i].tolist()) if ok]
        rx, ry = reference_ranks(x), reference_ranks(y)
        mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
        sx, sy = sum((r - mx) ** 2 for r in rx), sum((r - my) ** 2 for r in ry)
        expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(sx * sy) if sx * sy > 0 else 0.0
        assert float(correlation[i]) == pytest.approx(expected, abs=1e-5)
    metrics = selection_metrics(logits, teacher, other, mask)
    chosen = logits.masked_fill(~mask, -INF).argmax(-1)
    target = teacher.masked_fill(~mask, -INF).argmax(-1)
    assert torch.equal(metrics["agreement"], (chosen == target).float())
    assert torch.equal(metrics["student_agreement"], (other.masked_fill(~mask, -INF).argmax(-1) == target).float())


# ------------------------------------------------------------------ masks


def left_padded_mask(draw, batch, length):
    pads = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    return torch.tensor([[0] * pad + [1] * (length - pad) for pad in pads])


@given(mask=hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(0, 10)), elements=st.integers(0, 1)))
def test_positions_count_the_real_tokens_before_each_one(mask):
    positions = positions_from_attention_mask(torch.from_numpy(mask))
    for row, row_positions in zip(mask.tolist(), positions.tolist()):
        expected = [sum(row[:j]) if real else 0 for j, real in enumerate(row)]
        assert row_positions == expected


@given(data=st.data(), num_candidates=st.integers(1, 4), causal=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_candidate_mask_equals_a_loop(data, num_candidates, causal, dtype):
    batch, length = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 8))
    prefix = left_padded_mask(data.draw, batch, length)
    mask = candidate_attention_mask(prefix, num_candidates, dtype, causal_prefix=causal)
    queries = length + num_candidates if causal else num_candidates
    assert mask.shape == (batch, 1, queries, length + num_candidates) and mask.dtype == dtype
    for b in range(batch):
        real = prefix[b].tolist()
        for q in range(queries):
            for key in range(length + num_candidates):
                if causal and q < length:  # a prefix token: causal on the real tokens, a padding query sees itself
                    allowed = (key <= q and key < length and real[key] == 1) or key == q
                else:  # a candidate: the real prefix and itself
                    candidate = q - length if causal else q
                    allowed = (key < length and real[key] == 1) or key == length + candidate
                assert float(mask[b, 0, q, key]) == (0.0 if allowed else float(torch.finfo(dtype).min))


def fake_layer(stored: int, window: int | None):
    keys = torch.zeros(1, 1, stored, 1)
    return SimpleNamespace(keys=keys, is_initialized=stored > 0, is_sliding=window is not None, sliding_window=window)


@given(data=st.data(), num_candidates=st.integers(1, 4), with_last=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_scoring_masks_equal_the_window_rule_and_left_padding_in_a_loop(data, num_candidates, with_last, dtype):
    batch, prefix = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 12))
    real = left_padded_mask(data.draw, batch, prefix)
    layer_types = data.draw(st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=1,
                                     max_size=4))
    window = data.draw(st.integers(2, 8))
    stored_sliding = data.draw(st.integers(0, prefix))  # a sliding layer holds the last tokens only
    layers = [fake_layer(prefix, None) if kind == "full_attention" else fake_layer(stored_sliding, window)
              for kind in layer_types]
    model = SimpleNamespace(config=SimpleNamespace(layer_types=layer_types))
    masks = scoring_masks(model, SimpleNamespace(layers=layers), real, num_candidates, with_last, dtype)
    if not isinstance(masks, dict):
        masks = dict.fromkeys(layer_types, masks)
    extra = 1 if with_last else 0
    queries = extra + num_candidates
    for kind, layer in zip(layer_types, layers):
        mask = masks[kind]
        stored = int(layer.keys.shape[-2]) if layer.is_initialized else 0
        assert mask.shape == (batch, 1, queries, stored + queries) and mask.dtype == dtype
        for b in range(batch):
            for q in range(queries):
                index = prefix if q < extra else prefix + extra  # the re-encoded last token, then the candidates
                for column in range(stored + queries):
                    if column < stored:  # cached sequence index `key`
                        key = prefix - stored + column
                        allowed = real[b, key] == 1 and (layer.sliding_window is None or index - key < window)
                    else:  # the new tokens: everyone sees the last token, a candidate sees itself
                        new = column - stored
                        allowed = new < extra or new == q
                    assert float(mask[b, 0, q, column]) == (0.0 if allowed else float(torch.finfo(dtype).min))


# ------------------------------------------------------------------ falsifying examples, kept as regressions


def test_a_nan_logit_never_puts_a_masked_token_first():
    # a NaN made the whole log-softmax NaN, and topk then ranked the row arbitrarily (here a -inf token first)
    ids, log_probs, valid = top_k_candidates(torch.tensor([[NAN, 0.0]]), 1)
    assert ids.tolist() == [[1]] and log_probs.tolist() == [[0.0]] and valid.tolist() == [[True]]
    ids, _, valid = top_k_candidates(torch.tensor([[NAN, NAN, -INF, 1.0, 2.0]]), 2)
    assert ids.tolist() == [[4, 3]] and valid.tolist() == [[True, True]]
    # a +inf logit is certain: the other tokens have probability zero and are not valid candidates
    ids, log_probs, valid = top_k_candidates(torch.tensor([[INF, 0.0]]), 2)
    assert ids.tolist() == [[0, 1]] and log_probs.tolist() == [[0.0, -INF]] and valid.tolist() == [[True, False]]


def test_k_beyond_the_vocabulary_takes_the_whole_vocabulary():
    # was `RuntimeError: selected index k out of range` from inside `generate`
    ids, log_probs, valid = top_k_candidates(torch.tensor([[-30.0]]), 2)
    assert ids.tolist() == [[0]] and log_probs.tolist() == [[0.0]] and valid.tolist() == [[True]]


def test_a_nan_teacher_value_never_wins():
    positions = teacher_selection(torch.tensor([[0, 1]]), torch.tensor([[True, True]]), torch.tensor([[0.0, NAN]]))
    assert positions.tolist() == [0]


def test_nan_signals_are_left_out_of_calibration():
    # a NaN made `torch.quantile` return NaN: a threshold no signal ever exceeds
    assert threshold_for_rate(torch.tensor([0.0, NAN]), 0.5) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        threshold_for_rate(torch.tensor([NAN, NAN]), 0.5)


def test_a_group_with_subnormal_teacher_mass_is_renormalised_exactly():
    # the renormalisation's floor (float32 `tiny`) left the target summing to 0.85: a negative KL
    out = selection_loss(torch.tensor([[0.0]]), torch.tensor([[1e-38]]), torch.tensor([[True]]))
    assert out.teacher_kl.tolist() == [0.0]
    out = selection_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1e-38, 1e-39]]))
    _, _, _, kl, _ = reference_selection_loss([0.0, 1.0], [1e-38, 1e-39], [True, True], 1.0, 1.0, 0.1)
    assert float(out.teacher_kl[0]) == pytest.approx(kl, rel=1e-4)


def test_bad_loss_inputs_name_the_argument():
    with pytest.raises(ValueError, match="`candidate_mask` leaves groups \\[1\\] without any candidate"):
        selection_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        lm_kl_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), chunk_size=0)
