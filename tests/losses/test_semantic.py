"""The semantic term: cross-entropy over labelled points, attached to any criterion by a hook that keeps the
criterion itself (class, diagnostics) and adds loss_sem only when outputs and targets carry semantics."""
import pytest
import torch
import torch.nn.functional as F

from influencerformer.losses.registry import build_criterion
from influencerformer.losses.semantic import add_semantic_term, semantic_loss


def test_semantic_loss_is_cross_entropy_over_labelled_points():
    logits = torch.randn(2, 6, 4, requires_grad=True)
    labels = torch.tensor([[0, 1, -1, 3, 3, -1], [2, -1, -1, -1, 0, 1]])
    expected = F.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(semantic_loss(logits, labels), expected)
    none = semantic_loss(logits, torch.full((2, 6), -1))
    assert none == 0
    none.backward()
    assert logits.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="model.num_semantic_classes .*ScanNet: 20.*got class 4"):
        semantic_loss(logits, labels.clamp(min=0) + 1)


def _batch(with_semantics=True):
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 3, 3, generator=g), "pred_masks": torch.randn(1, 3, 5, generator=g)}
    target = {"labels": torch.tensor([0]), "masks": torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)}
    if with_semantics:
        outputs["sem_logits"] = torch.randn(1, 5, 4, generator=g, requires_grad=True)
        target["sem_labels"] = torch.tensor([0, 0, 3, -1, 2])
    return outputs, [target]


@pytest.mark.parametrize("name", ["hungarian", "influencer"])
def test_hook_adds_the_weighted_term_and_keeps_the_criterion(name):
    criterion = build_criterion(name, 2, num_points=None)
    outputs, targets = _batch()
    before = criterion(outputs, targets)
    cls = type(criterion)
    handle = add_semantic_term(criterion, 0.2)
    after = criterion(outputs, targets)
    term = semantic_loss(outputs["sem_logits"], targets[0]["sem_labels"][None])
    torch.testing.assert_close(after["loss_sem"], term)
    torch.testing.assert_close(after["loss"], before["loss"] + 0.2 * term)
    assert type(criterion) is cls and criterion.weight_dict["loss_sem"] == 0.2
    after["loss"].backward()
    assert outputs["sem_logits"].grad.abs().sum() > 0
    # no semantic logits (a model without the head) or no labels: the criterion's own terms only
    plain = criterion(*_batch(with_semantics=False))
    assert "loss_sem" not in plain
    handle.remove()
    assert "loss_sem" not in criterion(outputs, targets)
