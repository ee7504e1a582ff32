"""How sharp is the transport plan on real model outputs? Cost gaps and plan concentration per instance, by epsilon.

    OMP_NUM_THREADS=1 python benchmarks/plan_sharpness.py --checkpoint runs/rooms3d_bench          # a trained model
    OMP_NUM_THREADS=1 python benchmarks/plan_sharpness.py --config configs/rooms3d_bench.yaml      # the model at init
    ... --epsilons 0.1 0.02 --batches 4 --iters 50 --epsilon-start 1.0   # Sinkhorn with epsilon scaling

For each instance ``k`` of ``--batches`` training batches, on the final decoder layer, with the matching cost of the
``influencer`` criterion (``2·(1 - p(c_k)) + 5·BCE + 5·(1 - dice)``, every location):
- ``gap``: cost of the second-best query minus the best one (a plan is sharp only where ``gap`` is several ε);
- ``top share``: the share of the instance's unit of mass that its heaviest query gets in the ε plan (1 = hard);
- ``agrees``: the heaviest query is the one the Hungarian assignment gives it;
- ``off``: the instance's column of the plan sums to less than 0.9 or more than 1.1 (Sinkhorn not converged at
  ``--iters``: plain iterations need O(cost range / ε) of them; ``--epsilon-start`` scales ε down from there).
Medians over instances (and the fraction of instances whose gap is below ε). The transport plan is exactly the
criterion's (``transport_weights``, one-to-one on the final layer, Sinkhorn iterations as configured).
"""
from __future__ import annotations

import argparse
import random
import statistics

import torch
from scipy.optimize import linear_sum_assignment

from influencerformer.engine.build import build_dataset, build_model, load_trained, modality
from influencerformer.engine.config import load_config
from influencerformer.engine.train import seed_everything, to_device
from influencerformer.losses.influencer_criterion import MaskInfluencerCriterion
from influencerformer.losses.weighted_terms import matching_cost
from influencerformer.losses.weights import instance_mass, transport_weights


def final_layer_costs(model: torch.nn.Module, batch: dict, criterion: MaskInfluencerCriterion) -> list[torch.Tensor]:
    """Per scene, the matching cost ``(Q, K)`` of the final layer's predictions against the scene's instances,
    as ``criterion`` computes it (its target reading and ``matching_cost``)."""
    inputs, targets = to_device(batch, torch.device("cpu"))
    with torch.no_grad():
        out = model(*inputs)
        context = criterion.layer_context([(out["pred_logits"], out["pred_masks"])], targets)[0]
    pairs = context["pairs"]
    cost = matching_cost(pairs["prob"], pairs["bce"], pairs["one_minus_dice"], criterion.cost_weights)
    return [c[:, :k] for c, k in zip(cost, context["point_targets"].sizes)]


def sharpness(costs: list[torch.Tensor], epsilon: float, iters: int,
              epsilon_start: float | None = None) -> dict[str, float]:
    """Median cost gap, median top share, fraction of gaps below epsilon, agreement with Hungarian and the
    fraction of instance columns whose plan mass is off by more than 0.1."""
    gaps, shares, agree, off = [], [], [], []
    for cost in costs:
        q, k = cost.shape
        if k == 0 or q < 2:
            continue
        plan = transport_weights(cost[None, None].double(), torch.ones(1, k, dtype=torch.bool),
                                 instance_mass(torch.tensor([k]), q)[None].double(), epsilon, iters,
                                 epsilon_start)[0, 0, :, :k]
        share = plan.max(0).values / plan.sum(0).clamp_min(1e-12)
        two = cost.topk(2, dim=0, largest=False).values
        rows, cols = linear_sum_assignment(cost.numpy())
        hungarian = torch.full((k,), -1)
        hungarian[torch.as_tensor(cols)] = torch.as_tensor(rows)
        gaps += (two[1] - two[0]).tolist()
        shares += share.tolist()
        agree += (plan.argmax(0) == hungarian).tolist()
        off += ((plan.sum(0) - 1).abs() > 0.1).tolist()
    return {"instances": len(gaps), "gap": statistics.median(gaps), "gap<eps": sum(g < epsilon for g in gaps) / len(gaps),
            "top share": statistics.median(shares), "agrees": sum(agree) / len(agree), "off": sum(off) / len(off)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory or checkpoint file of a trained model")
    src.add_argument("--config", help="YAML config: the model at its initialisation (train.seed)")
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    p.add_argument("--iters", type=int, default=30, help="Sinkhorn iterations (the criterion's default: 30)")
    p.add_argument("--epsilon-start", type=float, default=None,
                   help="Sinkhorn epsilon scaling from this value (the criterion's sinkhorn_epsilon_start); none = off")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.checkpoint:
        model, cfg, _, step = load_trained(args.checkpoint)
        where = f"{args.checkpoint} (step {step})"
    else:
        cfg = load_config(args.config)
        seed_everything(cfg.train.seed)
        model, where = None, f"{args.config} at init"
    dataset, info = build_dataset(cfg.data, "train")
    if model is None:
        model = build_model(cfg, info.num_classes).eval()
    criterion = MaskInfluencerCriterion(info.num_classes, num_points=None)  # the default cost weights, every location
    collate = modality(cfg.data).make_collate(dataset, cfg.data)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    costs = []
    for _ in range(args.batches):
        batch = collate([dataset[rng.randrange(len(dataset))] for _ in range(cfg.data.batch_size)])
        costs += final_layer_costs(model, batch, criterion)
    print(f"{where}: {len(costs)} scenes, {cfg.data.name}")
    print(f"Sinkhorn: {args.iters} iterations, epsilon scaling {'from ' + str(args.epsilon_start) if args.epsilon_start else 'off'}")
    print(f"{'epsilon':>8} {'instances':>9} {'median gap':>10} {'gap < eps':>9} {'top share':>9} {'agrees':>7} {'off':>5}")
    for eps in args.epsilons:
        s = sharpness(costs, eps, args.iters, args.epsilon_start)
        print(f"{eps:8.3f} {s['instances']:9d} {s['gap']:10.3f} {s['gap<eps']:9.2f} {s['top share']:9.2f} "
              f"{s['agrees']:7.2f} {s['off']:5.2f}")


if __name__ == "__main__":
    main()
