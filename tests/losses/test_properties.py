"""Property suite ("The matching-free loss at scale", part 1): the perfect prediction must score strictly
below every corruption of it, for every form, query count, instance count and documented eps / temperature.

Perfect prediction: query i < K has instance i's mask and class, confidently; every other query is confidently
"no object" with an empty mask.  16 x 16 masks, instances in disjoint chunks over 3/4 of the image.
"""

import functools
import itertools

import pytest
import torch

from influencerformer.losses.influencer_criterion import MaskInfluencerCriterion

C, SIDE, BIG = 5, 16, 10.0
P = SIDE * SIDE
CORRUPTIONS = ("duplicated", "merged", "all_covering", "all_empty", "leak", "wrong_class")
SETTINGS = (
    [("transport", "epsilon", e) for e in (0.05, 0.1, 0.5)]
    + [("ownership", "temperature", t) for t in (0.1, 0.5, 1.0)]
    + [("seed", "temperature", t) for t in (0.5, 1.0, 2.0)]
)

SEED_REASON = ("seed form: logsumexp over queries rewards every extra query covering an instance, so duplicated "
               "and all-covering predictions score below the perfect one (its degenerate minimum)")
OWNERSHIP_REASON = ("ownership form: softmax over queries spreads each instance's unit mass over every query "
                    "covering it, so duplicates cost nothing extra, and with many queries or a soft temperature the "
                    "empty queries dilute the owner's weight, making the perfect answer expensive")
TRANSPORT_REASON = ("transport with K = 1: every covering query is a correct copy labelled 'no object'; like "
                    "Hungarian, masks of queries sent to the no-object column are unsupervised, so only "
                    "exp(-2 / eps) of plan mass separates it from perfect (a tie in float32 at eps = 0.05)")


def instance_masks(k: int) -> torch.Tensor:
    """(K, P) bool: disjoint contiguous chunks covering 3/4 of the image; the rest is background."""
    chunk = (3 * P // 4) // k
    owner = torch.arange(P) // chunk
    owner[k * chunk:] = -1
    return owner.unsqueeze(0) == torch.arange(k).unsqueeze(1)


def perfect(q: int, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = masks.shape[0]
    mask_logits = torch.full((q, P), -BIG)
    mask_logits[:k] = torch.where(masks, BIG, -BIG)
    cls = torch.zeros(q, C + 1)
    cls[torch.arange(k), labels] = BIG
    cls[k:, C] = BIG
    return cls, mask_logits


def corrupted(name: str, q: int, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cls, m = perfect(q, masks, labels)
    k = masks.shape[0]
    if name == "duplicated":  # spare queries copy instances (mask and class)
        n = min(k, q - k)
        m[k:k + n], cls[k:k + n] = m[:n], cls[:n]
    elif name == "merged":  # query 0 covers instances 0 and 1; query 1 becomes "no object"
        m[0] = torch.where(masks[0] | masks[1], BIG, -BIG)
        m[1], cls[1] = -BIG, torch.nn.functional.one_hot(torch.tensor(C), C + 1) * BIG
    elif name == "all_covering":
        m[:] = torch.where(masks.any(0), BIG, -BIG)
    elif name == "all_empty":
        m[:] = -BIG
    elif name == "leak":  # query 0 also covers the whole background
        m[0] = torch.where(masks[0] | ~masks.any(0), BIG, -BIG)
    elif name == "wrong_class":
        cls[0] = torch.nn.functional.one_hot((labels[0] + 1) % C, C + 1) * BIG
    return cls, m


@functools.lru_cache(maxsize=None)
def criterion(form: str, option: str, value: float) -> MaskInfluencerCriterion:
    return MaskInfluencerCriterion(C, form=form, num_points=None, **{option: value})


def total_loss(crit, prediction, masks, labels) -> float:
    cls, m = prediction
    outputs = {"pred_logits": cls[None], "pred_masks": m.view(1, -1, SIDE, SIDE)}
    with torch.no_grad():
        return float(crit(outputs, [{"labels": labels, "masks": masks.view(-1, SIDE, SIDE)}])["loss"])


@functools.lru_cache(maxsize=None)
def perfect_loss(setting, q, k) -> float:
    masks, labels = instance_masks(k), torch.arange(k) % C
    return total_loss(criterion(*setting), perfect(q, masks, labels), masks, labels)


# Cases where the property fails today, each marked ``xfail(strict=True)``: a known flaw that goes away (XPASS) or
# a new failure is an error, not noise.  Measured with this file (CPU, float32); ids are value-Q-K-corruption.
# Every seed-form "duplicated" case fails (its degenerate minimum) and transport fails only at K = 1
# "all_covering" with epsilon 0.05 (the float32 tie of TRANSPORT_REASON; 0.1 and 0.5 keep perfect strictly below).
SEED_ALL_COVERING_FAILS = set("""
    1.0-Q400-K1-all_covering 1.0-Q400-K30-all_covering 2.0-Q16-K1-all_covering 2.0-Q100-K1-all_covering
    2.0-Q100-K3-all_covering 2.0-Q100-K30-all_covering 2.0-Q400-K1-all_covering 2.0-Q400-K3-all_covering
    2.0-Q400-K30-all_covering
""".split())  # near-ties: at T 0.5 the perfect answer still wins everywhere, at T 2.0 the covering one nearly always
OWNERSHIP_FAILS = set("""
    0.1-Q400-K1-all_covering 0.1-Q400-K1-duplicated 0.1-Q400-K3-duplicated 0.5-Q16-K1-all_covering
    0.5-Q16-K1-duplicated 0.5-Q16-K3-duplicated 0.5-Q100-K1-all_covering 0.5-Q100-K1-duplicated
    0.5-Q100-K3-duplicated 0.5-Q100-K30-duplicated 0.5-Q400-K1-all_covering 0.5-Q400-K1-duplicated
    0.5-Q400-K3-duplicated 0.5-Q400-K30-merged 1.0-Q16-K1-all_covering 1.0-Q16-K1-duplicated 1.0-Q16-K3-duplicated
    1.0-Q100-K1-all_covering 1.0-Q100-K1-duplicated 1.0-Q100-K30-all_empty 1.0-Q400-K1-all_covering
    1.0-Q400-K1-duplicated 1.0-Q400-K30-all_empty 1.0-Q400-K30-merged
""".split())


def _xfail_reason(form, value, q, k, corruption):
    case = f"{value}-Q{q}-K{k}-{corruption}"
    if form == "seed" and (corruption == "duplicated" or case in SEED_ALL_COVERING_FAILS):
        return SEED_REASON
    if form == "ownership" and case in OWNERSHIP_FAILS:
        return OWNERSHIP_REASON
    if form == "transport" and value == 0.05 and k == 1 and corruption == "all_covering":
        return TRANSPORT_REASON
    return None


def _cases():
    for setting, q, k, corruption in itertools.product(SETTINGS, (16, 100, 400), (1, 3, 30), CORRUPTIONS):
        if k > q or (corruption == "merged" and k < 2):
            continue  # more instances than queries, or nothing to merge: the property is meaningless
        reason = _xfail_reason(setting[0], setting[2], q, k, corruption)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(setting, q, k, corruption, marks=marks,
                           id=f"{setting[0]}-{setting[1]}{setting[2]}-Q{q}-K{k}-{corruption}")


@pytest.mark.parametrize("setting,q,k,corruption", list(_cases()))
def test_perfect_prediction_scores_strictly_below_corruption(setting, q, k, corruption):
    masks, labels = instance_masks(k), torch.arange(k) % C
    bad = total_loss(criterion(*setting), corrupted(corruption, q, masks, labels), masks, labels)
    assert perfect_loss(setting, q, k) < bad
