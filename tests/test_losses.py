"""Property tests of the selection-distillation losses and statistics (pure functions, no model)."""

from __future__ import annotations

import pytest
import torch

from s2t_hf.losses import lm_kl_divergence, selection_loss, selection_metrics, spearman_correlation


def random_groups(batch: int = 6, k: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, generator=generator) * 2
    teacher = torch.rand(batch, k, generator=generator) ** 3 * 0.2  # absolute probabilities, far from summing to 1
    return logits, teacher


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_cross_entropy_matches_torch(temperature):
    logits, teacher = random_groups()
    out = selection_loss(logits, teacher, temperature=temperature)
    target = teacher.argmax(-1)
    expected = torch.nn.functional.cross_entropy(logits / temperature, target, reduction="none")
    torch.testing.assert_close(out.cross_entropy, expected)
    assert torch.equal(out.teacher_choice, target)


def test_teacher_kl_is_zero_for_identical_distributions_and_matches_torch():
    logits, _ = random_groups()
    for temperature in (1.0, 0.7):
        teacher = torch.softmax(logits / temperature, -1) * 0.3  # absolute, renormalised inside
        out = selection_loss(logits, teacher, temperature=temperature)
        assert out.teacher_kl.abs().max() < 1e-6
    logits, teacher = random_groups(seed=1)
    out = selection_loss(logits, teacher)
    target = teacher / teacher.sum(-1, keepdim=True)
    expected = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target, reduction="none").sum(-1)
    torch.testing.assert_close(out.teacher_kl, expected)
    torch.testing.assert_close(out.loss, out.cross_entropy + out.hinge + 0.1 * out.teacher_kl)


def test_hinge_is_zero_when_the_margin_is_met_and_linear_otherwise():
    teacher = torch.tensor([[0.1, 0.5, 0.2], [0.1, 0.5, 0.2]])
    logits = torch.tensor([[0.0, 2.5, 1.0], [0.0, 1.2, 1.0]])  # gaps 1.5 and 0.2 over the runner-up
    out = selection_loss(logits, teacher, margin=1.0)
    torch.testing.assert_close(out.hinge, torch.tensor([0.0, 0.8]))
    assert selection_loss(logits, teacher, margin=0.0).hinge.abs().max() == 0


def test_renormalisation_and_padding_candidates():
    logits, teacher = random_groups(batch=3, k=5)
    out = selection_loss(logits, teacher)
    scaled = selection_loss(logits, teacher * 7.0)
    torch.testing.assert_close(out.loss, scaled.loss)
    # a padded candidate (mask False) changes nothing, whatever its logit and probability
    padded_logits = torch.cat([logits, torch.full((3, 1), 50.0)], dim=1)
    padded_teacher = torch.cat([teacher, torch.ones(3, 1)], dim=1)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, -1] = False
    padded = selection_loss(padded_logits, padded_teacher, mask)
    torch.testing.assert_close(padded.loss, out.loss)
    assert torch.equal(padded.teacher_choice, out.teacher_choice)


def test_gradients_are_finite_in_edge_cases():
    logits = torch.tensor(
        [[80.0, -80.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 0.0, 0.0]],
        requires_grad=True,
    )
    teacher = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1e-30], [0.3, 0, 0, 0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True, False, False, False]])  # last: one candidate
    out = selection_loss(logits, teacher, mask, temperature=0.5)
    assert torch.isfinite(out.loss).all()
    assert out.loss[3] == 0  # a single candidate leaves nothing to choose
    assert out.teacher_choice[1] == 0  # ties go to the student's higher rank
    out.loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[3].abs().sum() == 0


def test_lm_kl_zero_for_identical_logits_with_zero_gradient():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2, 7, 13, generator=generator)
    adapted = base.clone().requires_grad_(True)
    kl = lm_kl_divergence(base, adapted)
    assert kl.abs().max() < 1e-6
    kl.sum().backward()
    assert adapted.grad.abs().max() < 1e-6


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_lm_kl_matches_autograd_reference(chunk_size):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(3, 6, 11, generator=generator)
    adapted = torch.randn(3, 6, 11, generator=generator, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]])
    ignore = [4, 9]
    kl = lm_kl_divergence(base, adapted, mask, ignore_token_ids=ignore, chunk_size=chunk_size)
    keep = torch.ones(11, dtype=torch.bool)
    keep[ignore] = False
    log_p, log_q = torch.log_softmax(base[..., keep], -1), torch.log_softmax(adapted[..., keep], -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    expected = (per_position * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(kl, expected)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (grad,) = torch.autograd.grad((kl * weights).sum(), adapted)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), adapted)
    torch.testing.assert_close(grad, expected_grad)
    assert grad[..., ignore].abs().max() == 0 and grad[0, :2].abs().max() == 0  # ignored rows, padding


def test_lm_kl_works_on_a_sliced_view_and_low_precision():
    base = torch.randn(2, 9, 10)
    logits = torch.randn(2, 12, 10, dtype=torch.bfloat16, requires_grad=True)
    kl = lm_kl_divergence(base.bfloat16(), logits[:, :9])
    kl.sum().backward()
    assert kl.dtype == torch.float32 and torch.isfinite(logits.grad).all()
    assert logits.grad[:, 9:].abs().max() == 0


def test_spearman_correlation():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 0.0]])
    y = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.3, 0.1, 0.3, 9.0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True, True, True, False]])
    rho = spearman_correlation(x, y, mask)
    torch.testing.assert_close(rho[:3], torch.tensor([1.0, -1.0, 0.0]))  # constant side gives 0
    # row 4: x ranks (3, 1, 2), y ranks with a tie (2.5, 1, 2.5): Pearson of the ranks
    rx, ry = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([2.5, 1.0, 2.5])
    expected = torch.corrcoef(torch.stack([rx, ry]))[0, 1]
    torch.testing.assert_close(rho[3], expected)


def test_selection_metrics():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.1, 0.0]])
    teacher = torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]])
    student = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    metrics = selection_metrics(logits, teacher, student)
    assert metrics["agreement"].tolist() == [1.0, 0.0]
    assert metrics["student_agreement"].tolist() == [0.0, 0.0]
    assert metrics["spearman"][0] == pytest.approx(0.5)
    assert "student_agreement" not in selection_metrics(logits, teacher)


def test_errors_name_the_argument():
    logits, teacher = random_groups()
    with pytest.raises(ValueError, match="temperature"):
        selection_loss(logits, teacher, temperature=0)
    with pytest.raises(ValueError, match="teacher_probs"):
        selection_loss(logits, teacher[:, :3])
    with pytest.raises(ValueError, match="candidate_mask"):
        selection_loss(logits, teacher, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="adapted_logits"):
        lm_kl_divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_every_loss_argument_is_checked():
    logits, teacher = random_groups()
    with pytest.raises(ValueError, match="`margin` must be non-negative, got -1.0"):
        selection_loss(logits, teacher, margin=-1.0)
    with pytest.raises(ValueError, match=r"must both have shape \(batch, K\); got \(1, 6, 8\)"):
        selection_loss(logits[None], teacher[None])
    with pytest.raises(ValueError, match=r"`adapted_logits` must both have shape \(batch, length, vocab"):
        lm_kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3))
