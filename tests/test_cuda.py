"""CUDA checks (``pytest -m cuda``; skipped without a GPU): every criterion on CUDA equals its CPU result, bf16
autocast stays finite, and the transport loss never waits for the host.

Run by ``scripts/gpu_check.sh``. Inputs are built on the CPU from a fixed seed and copied, so both devices see
the same numbers; every location is used (``num_points=None``) because point sampling draws from each device's
own random generator.
"""
import pytest
import torch

from influencerformer.losses import build_criterion
from influencerformer.losses.transport import sinkhorn

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUM_CLASSES = 5
CRITERIA = ["hungarian", "transport", "ownership", "seed"]


def make_inputs(kind="image", b=3, q=12, size=16, aux=2, seed=0):
    """CPU float32 leaves: final layer + ``aux`` aux layers; instances 4, 0 (an empty image) and 2 per item."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (size, size) if kind == "image" else (size * size,)
    layers = [(torch.randn(b, q, NUM_CLASSES + 1, generator=gen), 3 * torch.randn(b, q, *spatial, generator=gen))
              for _ in range(aux + 1)]
    targets = [{"labels": torch.randint(0, NUM_CLASSES, (k,), generator=gen),
                "masks": torch.rand(k, *spatial, generator=gen) > 0.6} for k in (4, 0, 2)[:b]]
    return layers, targets


def on(device, layers, targets, dtype=torch.float32):
    """Leaves on ``device`` (requires_grad) in the contract's dict form, and the targets there."""
    leaves = [(lg.to(device, dtype).requires_grad_(), mk.to(device, dtype).requires_grad_()) for lg, mk in layers]
    outputs = {"pred_logits": leaves[-1][0], "pred_masks": leaves[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in leaves[:-1]]}
    return outputs, [{k: v.to(device) for k, v in t.items()} for t in targets], leaves


@pytest.mark.parametrize("kind", ["image", "points"])
@pytest.mark.parametrize("name", CRITERIA)
def test_criterion_on_cuda_equals_cpu(name, kind):
    layers, targets = make_inputs(kind)
    results = {}
    for device in ("cpu", "cuda"):
        outputs, tgts, leaves = on(device, layers, targets)
        losses = build_criterion(name, NUM_CLASSES, num_points=None)(outputs, tgts)
        losses["loss"].backward()
        results[device] = ({k: v.detach().cpu() for k, v in losses.items()},
                           [(lg.grad.cpu(), mk.grad.cpu()) for lg, mk in leaves])
    (cpu_terms, cpu_grads), (gpu_terms, gpu_grads) = results["cpu"], results["cuda"]
    assert cpu_terms.keys() == gpu_terms.keys()
    for key in cpu_terms:
        torch.testing.assert_close(gpu_terms[key], cpu_terms[key], rtol=1e-4, atol=1e-5, msg=key)
    for (g_lg, g_mk), (c_lg, c_mk) in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g_lg, c_lg, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(g_mk, c_mk, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", CRITERIA)
def test_bf16_autocast_is_finite_and_close_to_float32(name):
    """Model outputs produced under bf16 autocast (bf16 tensors), loss computed under autocast: finite loss and
    gradients, and the loss within a few percent of the float32 one (the criteria upcast internally)."""
    layers, targets = make_inputs("image", size=32)
    criterion = build_criterion(name, NUM_CLASSES, num_points=None)
    outputs32, tgts, _ = on("cuda", layers, targets)
    want = criterion(outputs32, tgts)["loss"].detach()
    outputs, tgts, leaves = on("cuda", layers, targets)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eye = torch.eye(outputs["pred_masks"].shape[-1], device="cuda")
        bf16 = {"pred_logits": outputs["pred_logits"] @ torch.eye(NUM_CLASSES + 1, device="cuda"),
                "pred_masks": outputs["pred_masks"] @ eye,  # matmuls under autocast: bf16 outputs
                "aux_outputs": [{"pred_logits": a["pred_logits"] @ torch.eye(NUM_CLASSES + 1, device="cuda"),
                                 "pred_masks": a["pred_masks"] @ eye} for a in outputs["aux_outputs"]]}
        assert bf16["pred_masks"].dtype == torch.bfloat16
        losses = criterion(bf16, tgts)
    losses["loss"].backward()
    assert all(torch.isfinite(v).all() for v in losses.values())
    for lg, mk in leaves:
        assert torch.isfinite(lg.grad).all() and torch.isfinite(mk.grad).all()
    torch.testing.assert_close(losses["loss"].float(), want, rtol=5e-2, atol=1e-2)


def test_sinkhorn_makes_no_host_sync():
    cost = torch.rand(6, 50, 11, device="cuda") * 12
    row = torch.ones(6, 50, device="cuda")
    col = torch.cat([torch.ones(6, 10, device="cuda"), torch.full((6, 1), 40.0, device="cuda")], 1)
    sinkhorn(cost, row, col)  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = sinkhorn(cost, row, col)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert plan.shape == cost.shape


@pytest.mark.parametrize("kind, num_points", [("image", 64), ("image", None), ("points", None)])
def test_transport_criterion_makes_no_host_sync(kind, num_points):
    """Forward and backward of the transport criterion under ``set_sync_debug_mode("error")``: any host sync
    (``.item()``, ``.tolist()``, ``.cpu()``, a data-dependent shape, a blocking copy) raises."""
    layers, targets = make_inputs(kind)
    criterion = build_criterion("transport", NUM_CLASSES, num_points=num_points).cuda()
    outputs, tgts, _ = on("cuda", layers, targets)
    criterion(outputs, tgts)["loss"].backward()  # warm-up (lazy initialisation, cuBLAS handles)
    outputs, tgts, _ = on("cuda", layers, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = criterion(outputs, tgts)["loss"]
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()
