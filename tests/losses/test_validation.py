"""The criteria reject what they cannot score, naming the field (issue 16, group 3)."""
import os

import numpy as np
import pytest
import torch

from influencerformer.losses import build_criterion
from influencerformer.losses.criterion import decoder_layers, validate_inputs

C = 3
NAMES = ["hungarian", "influencer", "ownership", "seed"]


def batch(sizes=(2, 1), q=5, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(len(sizes), q, C + 1, generator=g),
               "pred_masks": torch.randn(len(sizes), q, *hw, generator=g)}
    targets = [{"labels": torch.randint(0, C, (k,), generator=g),
                "masks": torch.rand(k, 16, 16, generator=g) > 0.5} for k in sizes]
    return outputs, targets


def criterion(name):
    return build_criterion(name, num_classes=C, num_points=None)


@pytest.mark.parametrize("name", NAMES)
def test_uint8_masks_of_0_255_are_rejected(name):
    outputs, targets = batch()
    targets[1]["masks"] = targets[1]["masks"].to(torch.uint8) * 255
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\]: torch.uint8 masks must hold only 0 and 1 "
                                         r"\(values in \[0, 255\]\)"):
        criterion(name)(outputs, targets)


@pytest.mark.parametrize("name", NAMES)
def test_float_masks_above_one_or_nan_are_rejected(name):
    outputs, targets = batch()
    targets[0]["masks"] = targets[0]["masks"].float() * 2
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]: torch.float32 masks must hold only 0 and 1"):
        criterion(name)(outputs, targets)
    targets[0]["masks"] = torch.full_like(targets[0]["masks"], float("nan"))
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        criterion(name)(outputs, targets)
    targets[0]["masks"] = torch.full_like(targets[0]["masks"], 0.5)  # soft masks are not a contract here
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        criterion(name)(outputs, targets)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32, torch.float16])
def test_binary_non_bool_masks_score_as_bool(name, dtype):
    outputs, targets = batch()
    torch.manual_seed(0)
    expected = criterion(name)(outputs, targets)["loss"]
    converted = [{"labels": t["labels"], "masks": t["masks"].to(dtype)} for t in targets]
    torch.manual_seed(0)
    assert torch.allclose(criterion(name)(outputs, converted)["loss"], expected)


@pytest.mark.parametrize("name", NAMES)
def test_zero_queries_and_empty_batch_raise_value_errors(name):
    outputs, targets = batch(q=0)
    with pytest.raises(ValueError, match=r"pred_logits: no queries \(Q = 0\)"):
        criterion(name)(outputs, targets)
    empty = {"pred_logits": torch.zeros(0, 5, C + 1), "pred_masks": torch.zeros(0, 5, 8, 8)}
    with pytest.raises(ValueError, match=r"pred_logits: empty batch \(B = 0\)"):
        criterion(name)(empty, [])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key,convert", [("labels", lambda t: t.tolist()), ("labels", lambda t: t.numpy()),
                                         ("masks", lambda t: t.tolist()), ("masks", lambda t: t.numpy())])
def test_lists_and_numpy_targets_name_the_field(name, key, convert):
    outputs, targets = batch()
    targets[1][key] = convert(targets[1][key])
    kind = type(targets[1][key]).__name__
    with pytest.raises(ValueError, match=rf"targets\[1\]\['{key}'\]: expected a torch.Tensor, got {kind}"):
        criterion(name)(outputs, targets)


def test_other_malformed_containers_name_the_field():
    outputs, targets = batch()
    hung = criterion("hungarian")
    with pytest.raises(ValueError, match=r"targets\[0\]: expected a dict with keys 'labels' and 'masks', got tuple"):
        hung(outputs, [(t["labels"], t["masks"]) for t in targets])
    with pytest.raises(ValueError, match=r"targets: expected a list of dicts"):
        hung(outputs, {"labels": targets[0]["labels"]})
    with pytest.raises(ValueError, match=r"outputs\['pred_logits'\]: expected a torch.Tensor, got ndarray"):
        hung({**outputs, "pred_logits": outputs["pred_logits"].numpy()}, targets)
    bad = {**targets[0], "masks": targets[0]["masks"].to(torch.complex64)}
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]: expected bool masks"):
        hung(outputs, [bad, targets[1]])
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\]: empty mask grid"):
        hung(outputs, [targets[0], {**targets[1], "masks": torch.zeros(1, 0, 16, dtype=torch.bool)}])


def test_empty_targets_are_fine():
    outputs, targets = batch(sizes=(0, 0))
    for name in NAMES:
        assert torch.isfinite(criterion(name)(outputs, targets)["loss"])


CUDA = os.environ.get("TEST_DEVICE", "cuda") == "cuda" and torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_validation_of_bool_masks_does_not_sync_on_cuda():
    outputs, targets = batch(sizes=(3, 2, 0))
    outputs = {k: v.cuda() for k, v in outputs.items()}
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    layers = decoder_layers(outputs)
    validate_inputs(layers, targets, C)  # warm-up: first CUDA calls may sync for lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        validate_inputs(layers, targets, C)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_bad_labels_assert_asynchronously_on_cuda():
    """A bad label on CUDA is a device-side assert (the process's CUDA context is lost): run it apart."""
    import subprocess
    import sys

    code = ("import torch; from influencerformer.losses.criterion import validate_inputs;"
            "l=[(torch.zeros(1,2,4,device='cuda'), torch.zeros(1,2,3,device='cuda'))];"
            "t=[{'labels': torch.tensor([7],device='cuda'), 'masks': torch.ones(1,3,dtype=torch.bool,device='cuda')}];"
            "validate_inputs(l, t, 3); torch.cuda.synchronize()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "out of range" in done.stderr or "device-side assert" in done.stderr
