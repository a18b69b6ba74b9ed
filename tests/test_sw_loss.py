import math

import torch

from model.sw_loss import bidirectional_kl, matching_kl, sw_loss, teacher_targets


def test_teacher_targets_are_clamped_cosines():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    image = torch.tensor([[3.0, 0.0], [-1.0, -1.0]])
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # cos = [[1, -0.707], [0, -0.707]]
    assert torch.allclose(teacher_targets(text, image), expected)


def test_matching_kl_equals_hand_computed_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p rows: [1/4, 3/4], [1/2, 1/2]
    teacher = torch.tensor([[1.0, 1.0], [1.0, 3.0]])  # q rows: [1/2, 1/2], [1/4, 3/4]
    row0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    expected = (row0 + row1) / 2
    assert math.isclose(matching_kl(logits, teacher).item(), expected, rel_tol=1e-5)


def test_loss_is_zero_when_student_matches_teacher():
    teacher = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.1, 0.2, 0.7]])
    logits = torch.log(teacher / teacher.sum(-1, keepdim=True))
    assert abs(matching_kl(logits, teacher).item()) < 1e-6
    assert matching_kl(logits + 1.0, teacher).item() < 1e-6  # softmax is shift invariant


def test_v2t_direction_uses_the_transposed_matrices():
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    teacher = torch.rand(3, 3, generator=torch.Generator().manual_seed(1))
    expected = 0.5 * (matching_kl(logits, teacher) + matching_kl(logits.T, teacher.T))
    assert torch.allclose(bidirectional_kl(logits, teacher), expected)
    assert not torch.allclose(matching_kl(logits, teacher), matching_kl(logits.T, teacher.T))


def test_rows_without_teacher_mass_are_skipped():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    p0 = torch.softmax(logits[0], -1)
    expected = (p0 * (p0.log() - torch.log(torch.tensor([1.0, 0.0]) + 1e-8))).sum()
    assert torch.allclose(matching_kl(logits, teacher), expected)
    assert matching_kl(logits, torch.zeros(2, 2)).item() == 0.0


def test_sw_loss_combines_levels_with_alpha_and_beta():
    g = torch.Generator().manual_seed(0)
    ts, vs, tw, vw = (torch.randn(4, 8, generator=g) for _ in range(4))
    teacher = teacher_targets(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g))
    out = sw_loss(ts, vs, tw, vw, teacher, alpha=0.3, beta=2.0, temperature=0.5)
    assert torch.allclose(out.total, 0.3 * out.sentence + 2.0 * out.word)
    raw = sw_loss(ts, vs, tw, vw, teacher, temperature=None)
    assert torch.allclose(raw.sentence, bidirectional_kl(ts @ vs.T, teacher))
