"""The open-loop proxy evaluation engine: recorded frames -> policy -> predicted actions -> proxy figures.

An open-loop suite's record (vla_bench/suites.py) names its data source; `open_loop_source` reads it from the
suite's [datasets.SUITE] table in checkpoints.toml (or --vla-data SUITE=PATH). The metrics themselves are pure
functions in vla_bench/metrics/action_metrics.py; the store of their figures is vla_bench/results.py.

    source = bridge_source(root, split="val")            # or libero_source([... *.hdf5])
    result = evaluate_open_loop(policy, source)           # OpenLoopResult
    result.figures["sign_accuracy"].value, .interval, .passed

Each frame is shown to the policy as one observation dict:

    {"image": (H, W, 3) uint8      Bridge image_0 / LIBERO obs/agentview_rgb, as stored (policies do their own
                                   resizing and flips); only when policy.needs_images
     "wrist_image": (H, W, 3)      LIBERO obs/eye_in_hand_rgb, where stored; only when policy.needs_images
     "state": (k,) float32         Bridge observation/state (xyz, rpy, gripper; 7); LIBERO ee_states +
                                   gripper_states (8)
     "episode_id": str, "step": int
     "ground_truth_action": (7,)   only when policy.needs_privileged (the `replay` control reads it)}

The policy must answer in the source's action convention: Bridge actions in physical units (m, rad per 5 Hz step)
with gripper 1 = open (what OpenVLA's predict_action returns with unnorm_key="bridge_orig"); LIBERO actions in
the env's [-1, 1] units with gripper -1 = open.

Prediction is batched: `batch_size` episodes run side by side, one policy slot each, stepped in time order (so a
policy with history still sees each episode in order); `reset(slot, seed + episode index)` starts each episode.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .data.bridge import BRIDGE_ACTION_STATS, DEFAULT_GROUND_TRUTH, bridge_episodes
from .data.libero_hdf5 import libero_episodes
from .errors import VlaBenchError, choices
from .gripper import OPEN_IS_1, OPEN_IS_MINUS_1
from .metrics import action_metrics as m
from .policies.capabilities import capabilities_of
from .policies.replay import GROUND_TRUTH_KEY
from .suites import OPEN_LOOP, get_suite
from .thresholds import Threshold


# ------------------------------------------------------------------------------------------------ thresholds


#: The ONE home of the proxy thresholds. Defaults come from a published open-loop validation of OpenVLA on Bridge V2
#: (issue 4); a checkpoints.toml entry overrides them per metric through `resolve_thresholds`.
DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    # direction right on more than 55% of (frame, dim) pairs where the ground truth moves (chance is 50%)
    "sign_accuracy": Threshold(0.55, inclusive=False),
    # mean per-dim Pearson r over dims 0-5: a faithful model tracks the ground truth at least weakly
    "correlation": Threshold(0.10, inclusive=False),
    # open/closed right on more than 60% of frames (about 58% of Bridge frames are "open": a constant guess
    # sits near that base rate)
    "gripper_accuracy": Threshold(0.60, inclusive=False),
    # more than 80% of frames get a distinct action: well below means the model collapsed onto a few outputs
    "diversity": Threshold(0.80, inclusive=False),
    # the published validation saw 50-80% of episodes pass the success proxy. Below 50% fails; above 80% is
    # flagged, not failed, because the replay control (100%) must pass every check
    "success_proxy_rate": Threshold(0.50, inclusive=True, warn_above=0.80),
}

#: an episode counts as a proxy success when at least this fraction of its frames is right in direction and gripper
SUCCESS_SCORE_THRESHOLD = 0.5


def resolve_thresholds(overrides: Mapping[str, float | Mapping] | None = None) -> dict[str, Threshold]:
    """DEFAULT_THRESHOLDS with per-checkpoint overrides: {metric: minimum} or {metric: {"minimum": ..,
    "inclusive": .., "warn_above": ..}}."""
    out = dict(DEFAULT_THRESHOLDS)
    for name, value in (overrides or {}).items():
        if name not in DEFAULT_THRESHOLDS:
            raise VlaBenchError(f"unknown proxy metric {name!r} in thresholds; choices: {choices(DEFAULT_THRESHOLDS)}")
        if isinstance(value, Mapping):
            unknown = set(value) - {"minimum", "inclusive", "warn_above"}
            if unknown:
                raise VlaBenchError(f"thresholds.{name}: unknown key(s) {choices(sorted(unknown))}; "
                                    "choices: minimum, inclusive, warn_above")
            out[name] = dataclasses.replace(out[name], **value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = dataclasses.replace(out[name], minimum=float(value))
        else:
            raise VlaBenchError(f"thresholds.{name} must be a number or a table, got {value!r}")
    return out


# ------------------------------------------------------------------------------------------------ sources


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    """How to read one source's actions: normalization bounds, dead zone, gripper conventions, units."""

    name: str
    q01: np.ndarray  # (7,)
    q99: np.ndarray  # (7,)
    norm_mask: np.ndarray  # (7,) bool: dims that BOUNDS_Q99 normalizes (the gripper is not)
    dead_zone: np.ndarray  # (7,): only dims 0-5 are used
    gt_gripper: str
    pred_gripper: str
    units: tuple[str, ...]

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        return m.normalize_bounds_q99(actions, self.q01, self.q99, self.norm_mask)


def bridge_action_space() -> ActionSpace:
    """Bridge with OpenVLA's bridge_orig statistics; dead zone max(|(q01+q99)/2|, 2 bins) per dim."""
    s = BRIDGE_ACTION_STATS
    return ActionSpace("bridge", s["q01"], s["q99"], s["mask"], m.dead_zone_from_stats(s["q01"], s["q99"]),
                       OPEN_IS_1, OPEN_IS_1, ("m",) * 3 + ("rad",) * 3 + ("open=1",))


def libero_action_space(gt_actions: np.ndarray) -> ActionSpace:
    """LIBERO with bounds from the evaluated demos themselves (q01/q99 over their frames, as OpenVLA computes its
    statistics), since a user's demos need not match any published statistics."""
    actions = np.asarray(gt_actions, dtype=np.float64).reshape(-1, 7)
    q01, q99 = np.quantile(actions, 0.01, axis=0), np.quantile(actions, 0.99, axis=0)
    q01[6], q99[6] = -1.0, 1.0
    mask = np.array([True] * 6 + [False])
    return ActionSpace("libero", q01, q99, mask, m.dead_zone_from_stats(q01, q99), OPEN_IS_MINUS_1,
                       OPEN_IS_MINUS_1, ("osc",) * 6 + ("open=-1",))


@dataclasses.dataclass(frozen=True)
class OpenLoopSource:
    """Where the episodes come from: `episodes(images)` streams ground-truth dicts (see vla_bench.data.bridge);
    `action_space(gt_actions)` gives the reading of their actions."""

    description: str
    episodes: Callable[[bool], Iterator[dict]]
    action_space: Callable[[np.ndarray], ActionSpace]


def bridge_source(root: str | os.PathLike, split: str = "val", *, ground_truth: str = DEFAULT_GROUND_TRUTH,
                  max_episodes: int | None = None, allow_missing_shards: bool = False) -> OpenLoopSource:
    """Bridge V2 episodes of an RLDS directory; ground truth "openvla" (default) or "raw"."""
    def episodes(images: bool) -> Iterator[dict]:
        return bridge_episodes(root, split, ground_truth=ground_truth, images=images, max_episodes=max_episodes,
                               allow_missing_shards=allow_missing_shards)
    return OpenLoopSource(f"bridge:{root}:{split}:{ground_truth}", episodes, lambda _gt: bridge_action_space())


def libero_source(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                  max_episodes: int | None = None) -> OpenLoopSource:
    """LIBERO demos from HDF5 files (the released datasets or the scripted expert's)."""
    listed = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)

    def episodes(images: bool) -> Iterator[dict]:
        return libero_episodes(listed, images=images, max_episodes=max_episodes)
    return OpenLoopSource(f"libero:{','.join(map(str, listed))}", episodes, libero_action_space)


def open_loop_source(suite: str, dataset: dict) -> OpenLoopSource:
    """The episodes of an open-loop suite, read by its record's data source from the [datasets.SUITE] table."""
    data_source = get_suite(suite, OPEN_LOOP).data_source
    path = Path(dataset["path"])
    if not path.exists():
        raise VlaBenchError(f"dataset of {suite} not found at {path}: set [datasets.{suite}] path in "
                            f"checkpoints.toml or pass --vla-data {suite}=PATH")
    max_episodes = dataset.get("max_episodes")
    if data_source == "bridge_rlds":
        return bridge_source(path, dataset.get("split", "val"), ground_truth=dataset.get("ground_truth", "openvla"),
                             max_episodes=max_episodes)
    files = sorted(path.glob("*.hdf5")) if path.is_dir() else [path]  # "libero_hdf5"
    if not files:
        raise VlaBenchError(f"{path}: no *.hdf5 demonstration files (vla-bench collect writes them)")
    return libero_source(files, max_episodes=max_episodes)


# ------------------------------------------------------------------------------------------------ prediction


@dataclasses.dataclass
class EpisodePrediction:
    episode_id: str
    instruction: str
    ground_truth: np.ndarray  # (T, 7)
    predicted: np.ndarray  # (T, 7)
    source: str = ""


def _observation(episode: Mapping, t: int, capabilities) -> dict:
    obs = {"state": episode["state"][t] if len(episode["state"]) else np.zeros(0, np.float32),
           "episode_id": episode["episode_id"], "step": t}
    if capabilities.images:
        for key in ("image", "wrist_image"):
            if key in episode:
                obs[key] = episode[key][t]
    if capabilities.ground_truth:
        obs[GROUND_TRUTH_KEY] = episode["action"][t]
    return obs


def predict_episodes(policy, episodes: Iterable[Mapping], *, batch_size: int = 8,
                     seed: int = 0) -> list[EpisodePrediction]:
    """Run `policy` on every frame of `episodes` (see the module docstring for slots, seeds and observations)."""
    if batch_size < 1:
        raise VlaBenchError(f"batch_size must be at least 1, got {batch_size}")
    source = iter(episodes)
    capabilities = capabilities_of(policy)
    slots: dict[int, tuple[Mapping, int, list, int]] = {}  # slot -> (episode, next step, predictions, index)
    done: list[tuple[int, EpisodePrediction]] = []
    next_index = 0

    def fill(slot: int) -> None:
        nonlocal next_index
        for episode in source:
            index, next_index = next_index, next_index + 1
            if len(episode["action"]) == 0:
                continue
            policy.reset(slot, seed + index)
            slots[slot] = (episode, 0, [], index)
            return

    for slot in range(batch_size):
        fill(slot)
    while slots:
        active = sorted(slots)
        observations = [_observation(slots[s][0], slots[s][1], capabilities) for s in active]
        instructions = [slots[s][0]["instruction"] for s in active]
        actions = np.asarray(policy.act(observations, instructions, active), dtype=np.float64)
        if actions.shape != (len(active), 7):
            raise VlaBenchError(f"{type(policy).__name__}.act returned shape {actions.shape} for "
                                f"{len(active)} slots; expected ({len(active)}, 7)")
        for row, s in enumerate(active):
            episode, t, predicted, index = slots[s]
            predicted.append(actions[row])
            if t + 1 < len(episode["action"]):
                slots[s] = (episode, t + 1, predicted, index)
                continue
            done.append((index, EpisodePrediction(episode["episode_id"], episode["instruction"],
                                                  np.asarray(episode["action"], dtype=np.float64),
                                                  np.stack(predicted), str(episode.get("source", "")))))
            del slots[s]
            fill(s)
    return [p for _, p in sorted(done, key=lambda item: item[0])]


# ------------------------------------------------------------------------------------------------ scoring


@dataclasses.dataclass
class ProxyFigure:
    """One metric over all episodes, with its bootstrap 95% interval over episodes."""

    name: str
    value: float
    interval: tuple[float, float]
    n_episodes: int
    n_frames: int
    definition: str
    threshold: Threshold | None = None
    per_dim: tuple[float, ...] | None = None
    per_episode: np.ndarray | None = None  # the figure within each episode (NaN where undefined)
    reference: float | None = None  # the same quantity on the ground truth, where that means something
    error: str | None = None  # why the figure cannot pass whatever its value (non-finite predictions)

    @property
    def passed(self) -> bool | None:
        if self.threshold is None:
            return None
        return self.error is None and self.threshold.passes(self.value)

    @property
    def warning(self) -> str | None:
        return None if self.threshold is None else self.threshold.warning(self.value)


@dataclasses.dataclass
class OpenLoopResult:
    source: str
    action_space: ActionSpace
    predictions: list[EpisodePrediction]
    figures: dict[str, ProxyFigure]
    non_finite_frames: int = 0  # frames whose predicted action held a NaN or an infinity


def _ratio_figure(name, numerators, denominators, definition, n_frames, boot, threshold=None, per_dim=None,
                  reference=None) -> ProxyFigure:
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        per_episode = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return ProxyFigure(name, value, m.bootstrap_ratio_interval(num, den, **boot), len(num), n_frames, definition,
                       threshold, per_dim, per_episode, reference)


def score_predictions(predictions: Sequence[EpisodePrediction], space: ActionSpace, *,
                      thresholds: Mapping[str, Threshold] | None = None, n_resamples: int = 2000, seed: int = 0,
                      success_threshold: float = SUCCESS_SCORE_THRESHOLD) -> dict[str, ProxyFigure]:
    """Every proxy figure of `predictions` (definitions in vla_bench.metrics.action_metrics; each figure's `definition`
    says how it is pooled). Pooled figures weigh episodes by their frames; intervals resample episodes."""
    thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    if not predictions:
        raise VlaBenchError("no episodes to score: the source yielded none (all unlabeled, or max_episodes = 0?)")
    boot = {"n_resamples": n_resamples, "seed": seed}
    zone, move = space.dead_zone[:6], slice(0, 6)
    gts = [p.ground_truth for p in predictions]
    preds = [p.predicted for p in predictions]
    frames = np.array([len(g) for g in gts], dtype=np.float64)
    n_frames = int(frames.sum())
    all_gt, all_pred = np.concatenate(gts), np.concatenate(preds)
    figures: dict[str, ProxyFigure] = {}

    # direction
    agreement = [m.sign_agreement(p[:, move], g[:, move], zone) for p, g in zip(preds, gts)]
    correct = np.array([a[0] for a in agreement]); counted = np.array([a[1] for a in agreement])
    per_dim = tuple(np.where(counted.sum(0) > 0, correct.sum(0) / np.maximum(counted.sum(0), 1), np.nan))
    figures["sign_accuracy"] = _ratio_figure(
        "sign_accuracy", correct.sum(1), counted.sum(1),
        "fraction of (frame, dim 0-5) pairs with |gt| above the dead zone where the prediction moves the same way",
        n_frames, boot, thresholds.get("sign_accuracy"), per_dim)

    # correlation: moments centred on the pooled means, so episode moments add up (bootstrap-ready)
    cx, cy = all_pred[0, move], all_gt[0, move]  # a common centre taken from the data (see correlation_moments)
    moments = np.stack([m.correlation_moments(p[:, move], g[:, move], cx, cy) for p, g in zip(preds, gts)])
    r = m.pearson_from_moments(moments.sum(0))
    per_episode_r = np.array([m.mean_correlation(m.pearson_per_dim(p[:, move], g[:, move]))
                              for p, g in zip(preds, gts)])
    figures["correlation"] = ProxyFigure(
        "correlation", m.mean_correlation(r),
        m.bootstrap_interval(moments, lambda s: np.nan_to_num(m.pearson_from_moments(s), nan=0.0).mean(-1), **boot),
        len(preds), n_frames, "mean over dims 0-5 of Pearson r between predicted and true actions over all frames "
        "(an undefined r, from a constant series, counts as 0)", thresholds.get("correlation"), tuple(r),
        per_episode_r)

    # gripper
    matches = [m.gripper_matches(p[:, 6], g[:, 6], space.pred_gripper, space.gt_gripper) for p, g in zip(preds, gts)]
    figures["gripper_accuracy"] = _ratio_figure(
        "gripper_accuracy", [x.sum() for x in matches], frames,
        f"fraction of frames where open/closed agree (openness > 0.5; prediction read as {space.pred_gripper}, "
        f"ground truth as {space.gt_gripper})", n_frames, boot, thresholds.get("gripper_accuracy"),
        reference=float(m.gripper_open(all_gt[:, 6], space.gt_gripper).mean()))

    # collapse signature
    figures["diversity"] = _ratio_figure(
        "diversity", [m.distinct_rows(p) for p in preds], frames,
        "distinct predicted action vectors per frame, within each episode, pooled over episodes",
        n_frames, boot, thresholds.get("diversity"),
        reference=float(sum(m.distinct_rows(g) for g in gts) / n_frames))
    near_pred = [(m.direction(p[:, move], zone) == 0).sum() for p in preds]
    figures["near_zero_fraction"] = _ratio_figure(
        "near_zero_fraction", near_pred, frames * 6,
        "fraction of predicted values (dims 0-5) inside the dead zone; reference = the same for the ground truth",
        n_frames, boot, reference=m.near_zero_fraction(all_gt[:, move], zone))
    magnitudes = np.stack([np.stack([np.abs(p[:, move]).sum(0), np.abs(g[:, move]).sum(0)]) for p, g in zip(preds, gts)])

    def magnitude_ratio(sums: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(sums[..., 1, :] > 0, sums[..., 0, :] / sums[..., 1, :], np.nan), axis=-1)
    ratio_dims = m.mean_magnitude_ratio(all_pred[:, move], all_gt[:, move])
    figures["magnitude_ratio"] = ProxyFigure(
        "magnitude_ratio", float(np.nanmean(ratio_dims)) if np.isfinite(ratio_dims).any() else float("nan"),
        m.bootstrap_interval(magnitudes, magnitude_ratio, **boot), len(preds), n_frames,
        "mean over dims 0-5 of mean|pred| / mean|gt| (1 = same magnitude; << 1 = collapse toward zero)",
        per_dim=tuple(ratio_dims))

    # success proxy
    scores = np.array([m.episode_success_score(p, g, space.dead_zone, space.pred_gripper, space.gt_gripper)
                       for p, g in zip(preds, gts)])
    successes = m.success_proxy(scores, success_threshold).astype(np.float64)
    ones = np.ones(len(scores))
    figures["success_score"] = _ratio_figure(
        "success_score", scores, ones,
        "mean over episodes of the fraction of frames right in translation direction (dims 0-2, dead-zoned, "
        "positive dot product; 'no motion' must match 'no motion') and in gripper", n_frames, boot)
    figures["success_proxy_rate"] = _ratio_figure(
        "success_proxy_rate", successes, ones,
        f"fraction of episodes whose success score is >= {success_threshold:.2f}", n_frames, boot,
        thresholds.get("success_proxy_rate"))
    figures["success_proxy_rate"].per_episode = scores

    # errors, physical and normalized units (informational)
    for units, transform in (("physical", lambda a: a), ("normalized", space.normalize)):
        for kind, power in (("l1", 1), ("mse", 2)):
            sums = np.stack([(np.abs(transform(p) - transform(g)) ** power).sum(0) for p, g in zip(preds, gts)])
            per_dim_err = tuple(sums.sum(0) / n_frames)
            figures[f"{kind}_{units}"] = ProxyFigure(
                f"{kind}_{units}", float(np.mean(per_dim_err)),
                m.bootstrap_interval(np.concatenate([sums, frames[:, None]], axis=1),
                                     lambda s: (s[:, :7] / s[:, 7:8]).mean(1), **boot),
                len(preds), n_frames,
                f"{'mean absolute' if power == 1 else 'mean squared'} error per dim in {units} units "
                f"({', '.join(space.units) if units == 'physical' else 'BOUNDS_Q99 [-1, 1], gripper as is'}); "
                "value = mean over the 7 dims", per_dim=per_dim_err, per_episode=sums.mean(1) / frames)
    return figures


def evaluate_open_loop(policy, source: OpenLoopSource, *, batch_size: int = 8, seed: int = 0,
                       thresholds: Mapping[str, Threshold] | None = None, n_resamples: int = 2000,
                       success_threshold: float = SUCCESS_SCORE_THRESHOLD) -> OpenLoopResult:
    """Predict every frame of `source` with `policy` and score it: the one call the suite and the CLI make."""
    images = capabilities_of(policy).images
    predictions = predict_episodes(policy, source.episodes(images), batch_size=batch_size, seed=seed)
    if not predictions:
        raise VlaBenchError(f"{source.description}: no labeled episodes to evaluate")
    space = source.action_space(np.concatenate([p.ground_truth for p in predictions]))
    figures = score_predictions(predictions, space, thresholds=thresholds, n_resamples=n_resamples, seed=seed,
                                success_threshold=success_threshold)
    bad = [(p.episode_id, t) for p in predictions for t in np.flatnonzero(~np.isfinite(p.predicted).all(axis=1))]
    if bad:
        # NaN rows count as distinct (diversity 1.0) and drop out of sums: a diverging model must not pass
        frames = sum(len(p.predicted) for p in predictions)
        error = (f"the policy returned non-finite actions on {len(bad)} of {frames} frames (first: episode "
                 f"{bad[0][0]} step {bad[0][1]})")
        for figure in figures.values():
            if figure.threshold is not None:
                figure.error = error
    return OpenLoopResult(source.description, space, predictions, figures, len(bad))


#: the metrics that carry a threshold (one test each per checkpoint), in display order
GATED_METRICS = tuple(DEFAULT_THRESHOLDS)
