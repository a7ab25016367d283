"""Open-loop proxy metrics: pure functions over arrays of predicted and ground-truth actions.

Conventions: `pred` and `gt` are (N, D) float arrays of N frames (D = 7 for full actions: 0-2 translation,
3-5 rotation, 6 gripper; most functions also take the 6 movement dims alone). A `dead_zone` is a (D,) array of
per-dim magnitudes below which a value means "no motion". Gripper conventions name how a side encodes the gripper
(vla_bench/gripper.py: "open_is_1" for Bridge and OpenVLA's output, "open_is_minus_1" for LIBERO).

Episode-level statistics (the success score) take one episode's arrays; pooled figures over many episodes, and
their bootstrap intervals, are built from per-episode sufficient statistics (see `bootstrap_interval`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..gripper import is_open
from ..openvla.action_tokenizer import N_BINS

#: OpenVLA's action tokenizer has N_BINS edges over [-1, 1] of the normalized range; one bin spans (q99 - q01) / 255
_BIN_WIDTHS = N_BINS - 1


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    return pred, gt


# ------------------------------------------------------------------------------------------------- units


def normalize_bounds_q99(actions, q01, q99, mask=None) -> np.ndarray:
    """OpenVLA's BOUNDS_Q99 normalization: clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) on the dims where
    `mask` is True (default: all); other dims pass through unchanged."""
    x = np.asarray(actions, dtype=np.float64)
    q01, q99 = np.asarray(q01, dtype=np.float64), np.asarray(q99, dtype=np.float64)
    normalized = np.clip(2.0 * (x - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0)
    if mask is None:
        return normalized
    return np.where(np.asarray(mask, dtype=bool), normalized, x)


def dead_zone_from_stats(q01, q99, grid_steps: float = 2.0) -> np.ndarray:
    """Per-dim dead zone: max(|(q01 + q99) / 2|, grid_steps * (q99 - q01) / 255).

    The first term is where OpenVLA's "no motion" bin (normalized 0, bin 127) lands after un-normalization: a
    model that predicts no motion outputs this value, so a smaller dead zone would read it as a direction. The
    second keeps the zone at least a couple of decodable bins wide where the range is symmetric."""
    q01, q99 = np.asarray(q01, dtype=np.float64), np.asarray(q99, dtype=np.float64)
    return np.maximum(np.abs((q01 + q99) / 2.0), grid_steps * (q99 - q01) / _BIN_WIDTHS)


# ------------------------------------------------------------------------------------------------- error


def l1_per_dim(pred, gt) -> np.ndarray:
    """Mean absolute error per dim: mean_n |pred[n, d] - gt[n, d]|. Zero iff pred == gt (for finite inputs)."""
    pred, gt = _pair(pred, gt)
    return np.abs(pred - gt).mean(axis=0)


def mse_per_dim(pred, gt) -> np.ndarray:
    """Mean squared error per dim: mean_n (pred[n, d] - gt[n, d])^2."""
    pred, gt = _pair(pred, gt)
    return ((pred - gt) ** 2).mean(axis=0)


# ------------------------------------------------------------------------------------------------- direction


def direction(x, dead_zone) -> np.ndarray:
    """Per-value direction: +1 / -1 where |x| > dead_zone (per dim), else 0 ("no motion")."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.abs(x) > np.asarray(dead_zone, dtype=np.float64), np.sign(x), 0.0).astype(np.int8)


def sign_agreement(pred, gt, dead_zone) -> tuple[np.ndarray, np.ndarray]:
    """(correct, counted) per dim: `counted` = frames where the ground truth moves (|gt| > dead zone); `correct`
    = those where the prediction moves in the same direction (a prediction inside the dead zone is wrong)."""
    pred, gt = _pair(pred, gt)
    gt_dir, pred_dir = direction(gt, dead_zone), direction(pred, dead_zone)
    moving = gt_dir != 0
    return (moving & (pred_dir == gt_dir)).sum(axis=0), moving.sum(axis=0)


def sign_accuracy(pred, gt, dead_zone) -> float:
    """Sign (direction) accuracy, pooled over dims: sum_d correct_d / sum_d counted_d of `sign_agreement`, i.e.
    the fraction of (frame, dim) pairs with a moving ground truth whose predicted direction matches. NaN when the
    ground truth never moves."""
    correct, counted = sign_agreement(pred, gt, dead_zone)
    return float(correct.sum() / counted.sum()) if counted.sum() else float("nan")


def sign_accuracy_per_dim(pred, gt, dead_zone) -> np.ndarray:
    """`sign_accuracy` for each dim separately (NaN for a dim whose ground truth never moves)."""
    correct, counted = sign_agreement(pred, gt, dead_zone)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted > 0, correct / np.maximum(counted, 1), np.nan)


# ------------------------------------------------------------------------------------------------- correlation


def correlation_moments(pred, gt, center_pred=None, center_gt=None) -> np.ndarray:
    """Sufficient statistics of Pearson's r per dim, shape (D, 6): n, Sx, Sy, Sxx, Syy, Sxy of x = pred - cx and
    y = gt - cy. Centering on a common value keeps the sums well conditioned; the moments of several episodes
    centered on the same values add up to the moments of their concatenation. The default centre is the first
    frame, a value of the data itself, so a constant series gives exactly zero sums (a mean could be off by
    rounding and leave noise that looks like variance)."""
    pred, gt = _pair(pred, gt)
    if len(pred) == 0:
        return np.zeros((pred.shape[1], 6))
    cx = pred[0] if center_pred is None else np.asarray(center_pred, dtype=np.float64)
    cy = gt[0] if center_gt is None else np.asarray(center_gt, dtype=np.float64)
    x, y = pred - cx, gt - cy
    n = np.full(pred.shape[1], float(len(pred)))
    return np.stack([n, x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)], axis=1)


def pearson_from_moments(moments) -> np.ndarray:
    """Pearson's r per dim from `correlation_moments` (any leading batch dims, last dim 6); clipped to [-1, 1];
    NaN where either side is constant (zero variance: r is undefined) or fewer than 2 frames."""
    m = np.asarray(moments, dtype=np.float64)
    n, sx, sy, sxx, syy, sxy = (m[..., i] for i in range(6))
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        # zero variance, or only rounding noise left by the subtraction (relative to the spread about the centre)
        flat_x = vx <= 1e-12 * sxx
        flat_y = vy <= 1e-12 * syy
        r = cov / np.sqrt(vx * vy)
    r = np.where(flat_x | flat_y | (n < 2) | (sxx <= 0) | (syy <= 0), np.nan, r)
    return np.clip(r, -1.0, 1.0)


def pearson_per_dim(pred, gt) -> np.ndarray:
    """Pearson correlation per dim between pred[:, d] and gt[:, d] over all frames; in [-1, 1], NaN where either
    series is constant."""
    return pearson_from_moments(correlation_moments(pred, gt))


def mean_correlation(r) -> float:
    """The headline correlation: the mean of per-dim r with undefined (NaN) dims counted as 0, since a constant
    output carries no information about the ground truth."""
    r = np.asarray(r, dtype=np.float64)
    return float(np.nan_to_num(r, nan=0.0).mean()) if r.size else float("nan")


# ------------------------------------------------------------------------------------------------- gripper


def gripper_open(values, convention: str) -> np.ndarray:
    """True where the gripper value means "open" under `convention` (vla_bench.gripper.is_open)."""
    return is_open(values, convention)


def gripper_matches(pred_gripper, gt_gripper, pred_convention: str, gt_convention: str) -> np.ndarray:
    """Per frame: whether prediction and ground truth agree on open vs closed, each read in its own convention."""
    return gripper_open(pred_gripper, pred_convention) == gripper_open(gt_gripper, gt_convention)


def gripper_accuracy(pred_gripper, gt_gripper, pred_convention: str, gt_convention: str) -> float:
    """Fraction of frames where `gripper_matches` (open/closed at openness 0.5 after each side's convention)."""
    match = gripper_matches(pred_gripper, gt_gripper, pred_convention, gt_convention)
    return float(match.mean()) if match.size else float("nan")


# ------------------------------------------------------------------------------------------------- collapse


def distinct_rows(pred) -> int:
    """Number of distinct predicted action vectors (rows compared exactly)."""
    pred = np.asarray(pred)
    return int(len(np.unique(pred.reshape(len(pred), -1), axis=0))) if len(pred) else 0


def output_diversity(pred) -> float:
    """Fraction of distinct predicted action vectors: distinct rows / rows, in (0, 1] for a non-empty input.
    1 = every frame got a different action; 1/N = one action for everything (collapse). Exact comparison: a
    tokenizing model repeats the same bin centres exactly when it repeats itself."""
    n = len(np.asarray(pred))
    return distinct_rows(pred) / n if n else float("nan")


def near_zero_fraction(x, dead_zone) -> float:
    """Fraction of values inside the dead zone (|x| <= dead_zone per dim), over all frames and dims. Compare
    predictions with ground truth: a collapsing model shows far more near-zero outputs than the data has."""
    x = np.asarray(x, dtype=np.float64)
    return float((direction(x, dead_zone) == 0).mean()) if x.size else float("nan")


def mean_magnitude_ratio(pred, gt) -> np.ndarray:
    """Per dim: mean |pred| / mean |gt| (NaN where the ground truth is all zero). Well below 1 = the model
    under-moves (collapse toward zero); well above = it over-shoots."""
    pred, gt = _pair(pred, gt)
    with np.errstate(invalid="ignore", divide="ignore"):
        denominator = np.abs(gt).mean(axis=0)
        return np.where(denominator > 0, np.abs(pred).mean(axis=0) / np.where(denominator > 0, denominator, 1), np.nan)


# ------------------------------------------------------------------------------------------------- success proxy


def direction_matches(pred_move, gt_move, dead_zone) -> np.ndarray:
    """Per frame: whether the predicted movement vector points the ground truth's way. Both (N, k) vectors (for
    the success score, the translation dims 0-2) are first zeroed inside the dead zone per dim. A frame whose
    ground truth is all inside the zone ("no motion") matches when the prediction is too; otherwise it matches
    when the dot product of the two is positive (less than 90 degrees apart)."""
    pred, gt = _pair(pred_move, gt_move)
    zone = np.asarray(dead_zone, dtype=np.float64)
    pred_z = np.where(np.abs(pred) > zone, pred, 0.0)
    gt_z = np.where(np.abs(gt) > zone, gt, 0.0)
    gt_still = ~gt_z.any(axis=1)
    pred_still = ~pred_z.any(axis=1)
    return np.where(gt_still, pred_still, (pred_z * gt_z).sum(axis=1) > 0)


def step_correct(pred, gt, dead_zone, pred_convention: str, gt_convention: str,
                 direction_dims=(0, 1, 2), gripper_dim: int = 6) -> np.ndarray:
    """Per frame: right in direction (`direction_matches` on `direction_dims`) and right in gripper
    (`gripper_matches` on `gripper_dim`). `dead_zone` is indexed by dim (at least up to max(direction_dims))."""
    pred, gt = _pair(pred, gt)
    dims = list(direction_dims)
    zone = np.asarray(dead_zone, dtype=np.float64)[dims]
    return direction_matches(pred[:, dims], gt[:, dims], zone) & gripper_matches(
        pred[:, gripper_dim], gt[:, gripper_dim], pred_convention, gt_convention)


def episode_success_score(pred, gt, dead_zone, pred_convention: str, gt_convention: str, **kwargs) -> float:
    """One episode's success score: the fraction of its frames that are `step_correct` (right in direction and
    gripper). NaN for an empty episode."""
    correct = step_correct(pred, gt, dead_zone, pred_convention, gt_convention, **kwargs)
    return float(correct.mean()) if correct.size else float("nan")


def success_proxy(scores, threshold: float) -> np.ndarray:
    """Binary success proxy per episode: score >= threshold. The success proxy rate is its mean over episodes."""
    return np.asarray(scores, dtype=np.float64) >= threshold


# ------------------------------------------------------------------------------------------------- intervals


def bootstrap_interval(per_episode, statistic: Callable[[np.ndarray], np.ndarray], *, n_resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval over episodes.

    `per_episode` is an (E, ...) array of additive per-episode sufficient statistics (counts, sums, moments).
    Each resample draws E episodes with replacement, sums their rows, and `statistic` maps the (R, ...) batch of
    sums to R figures; the interval is the central `level` quantile range of the finite figures. Seeded, so the
    same data give the same interval. (nan, nan) with no episodes or no finite resample."""
    stats = np.asarray(per_episode, dtype=np.float64)
    episodes = len(stats)
    if episodes == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    flat = stats.reshape(episodes, -1)
    block = max(1, 4_000_000 // episodes)  # bound the (block, E) count matrix to a few tens of MB
    figures = []
    for start in range(0, n_resamples, block):
        size = min(block, n_resamples - start)
        counts = rng.multinomial(episodes, np.full(episodes, 1.0 / episodes), size=size)
        sums = (counts @ flat).reshape(size, *stats.shape[1:])
        figures.append(np.asarray(statistic(sums), dtype=np.float64).reshape(size))
    values = np.concatenate(figures)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ratio_interval(numerators, denominators, **kwargs) -> tuple[float, float]:
    """Bootstrap interval of a pooled ratio sum(numerators) / sum(denominators) over episodes (e.g. correct
    frames / counted frames; a per-episode mean is the case denominators = 1)."""
    pairs = np.stack([np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return bootstrap_interval(pairs, lambda s: s[:, 0] / s[:, 1], **kwargs)
