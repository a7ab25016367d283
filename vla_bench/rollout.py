"""The closed-loop episode runner: one batched policy call per control step over every running env slot.

For each episode: the env resets to init state i with the episode's seed and steps the protocol's wait steps;
then loop { observations of running slots -> policy.act -> env.step } until the env's done flag (success) or
max_steps control steps (failure). A slot whose episode ends starts the next queued episode at once, so the
workers stay busy. Each finished episode is handed to `on_done` right away (the caller commits it); `on_done`
returns True to stop scheduling further episodes (curtailment), and the episodes in flight still finish.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from .envs.vector import VectorLiberoEnv
from .policies.base import Policy, SlotErrors
from .protocol import Protocol


@dataclasses.dataclass
class EpisodeOutcome:
    init_index: int
    seed: int
    success: bool
    steps: int  # control steps after the wait steps
    error: str | None
    wall_s: float
    frames: list[np.ndarray] | None = None  # upright agentview frames, when recording
    scene_check: str | None = None  # the settled scene's verdict against the reference stack


@dataclasses.dataclass
class _Running:
    init_index: int
    seed: int
    started: float
    obs: dict
    steps: int = 0
    frames: list | None = None
    scene_check: str | None = None


#: LIBERO's OSC_POSE actions lie in [-1, 1]; robosuite's controller clips to that range, as the reference protocol
#: does, so values a little beyond it are executed clipped. Beyond FAR_OUT_OF_RANGE they are no policy's intent but a
#: convention bug (unnormalized units, degrees for radians): the episode ends as an error rather than a failure.
ACTION_LOW, ACTION_HIGH = -1.0, 1.0
FAR_OUT_OF_RANGE = 2.0


def action_error(action: np.ndarray, step: int) -> str | None:
    """Why one slot's action cannot be executed at control step `step` (1-based), or None when it can."""
    action = np.asarray(action)
    if action.shape != (7,):
        return f"policy returned actions of shape {action.shape} at step {step}, expected (7,) per environment"
    if not np.isfinite(action).all():
        return f"policy returned non-finite actions at step {step}: {np.array2string(action, precision=3, max_line_width=200)}"
    if np.abs(action).max() > FAR_OUT_OF_RANGE:
        return (f"policy returned an action outside the action space at step {step}: "
                f"{np.array2string(action, precision=3, max_line_width=200)} (LIBERO actions lie in [{ACTION_LOW:g}, {ACTION_HIGH:g}]; "
                f"beyond {FAR_OUT_OF_RANGE:g} is an error, not clipped)")
    return None


def upright_frame(obs: dict) -> np.ndarray:
    """LIBERO renders the agentview upside down (OpenGL's origin); a person expects it upright."""
    return np.ascontiguousarray(obs["agentview_image"][::-1, ::-1])


def rollout_episodes(policy: Policy, env: VectorLiberoEnv, protocol: Protocol, task_index: int, instruction: str,
                     init_indices: Sequence[int], on_done: Callable[[EpisodeOutcome], bool | None],
                     record_frames: bool = False) -> None:
    queue = collections.deque(init_indices)
    running: dict[int, _Running] = {}
    stopped = False

    def finish(slot: int, ep: _Running, success: bool, error: str | None = None) -> None:
        nonlocal stopped
        outcome = EpisodeOutcome(ep.init_index, ep.seed, success, ep.steps, error, time.perf_counter() - ep.started,
                                 ep.frames, ep.scene_check)
        if on_done(outcome):
            stopped = True

    def start(slots: Sequence[int]) -> None:
        slots = list(slots)
        while slots and queue and not stopped:
            requests, starts = {}, {}
            for slot in slots:
                if not queue:
                    break
                init_index = queue.popleft()
                seed = protocol.episode_seed(task_index, init_index)
                requests[slot] = (init_index, seed)
                starts[slot] = time.perf_counter()
                policy.reset(slot, seed)
            slots = []
            for slot, result in env.reset(requests).items():
                init_index, seed = requests[slot]
                ep = _Running(init_index, seed, starts[slot], result.obs, frames=[] if record_frames else None,
                              scene_check=result.scene_check)
                if result.error:  # the episode could not even start: record it, give the slot the next one
                    finish(slot, ep, False, result.error)
                    slots.append(slot)
                    continue
                if record_frames:
                    ep.frames.append(upright_frame(result.obs))
                running[slot] = ep

    start(range(env.n))
    while running:
        slots = sorted(running)
        freed = []
        try:
            actions = np.asarray(policy.act([running[s].obs for s in slots], [instruction] * len(slots), slots))
            failed: dict = {}
        except SlotErrors as e:  # e.g. a remote server lost mid-episode: those episodes are errors, not failures
            actions, failed = None, dict(e.errors)
            planned = {slot: a for slot, a in e.actions.items() if slot not in failed}
        if actions is not None:
            if actions.shape != (len(slots), 7):  # no row can be trusted to belong to its slot
                for slot in slots:
                    ep = running.pop(slot)
                    finish(slot, ep, False, f"policy returned actions of shape {actions.shape} at step "
                           f"{ep.steps + 1} for {len(slots)} environments, expected ({len(slots)}, 7)")
                start(slots)
                continue
            planned = {slot: actions[k] for k, slot in enumerate(slots)}
        for slot, message in failed.items():
            finish(slot, running.pop(slot), False, message)
            freed.append(slot)
        valid = {}
        for slot, action in planned.items():
            error = action_error(action, running[slot].steps + 1)
            if error is None:
                valid[slot] = action
            else:
                finish(slot, running.pop(slot), False, error)
                freed.append(slot)
        results = env.step(valid) if valid else {}
        for slot, result in results.items():
            ep = running[slot]
            ep.steps += 1
            if record_frames and result.obs is not None:
                ep.frames.append(upright_frame(result.obs))
            if result.error:
                finish(slot, ep, False, result.error)
            elif result.done:
                finish(slot, ep, True)
            elif ep.steps >= protocol.max_steps:
                finish(slot, ep, False)
            else:
                ep.obs = result.obs
                continue
            del running[slot]
            freed.append(slot)
        if freed:
            start(freed)


def rollout_in_workers(env: VectorLiberoEnv, protocol: Protocol, task_index: int, instruction: str,
                       init_indices: Sequence[int], on_done: Callable[[EpisodeOutcome], bool | None],
                       record_frames: bool = False) -> None:
    """The same episodes as rollout_episodes, run whole inside the env workers by their own copies of the policy
    (`env` built with local_policy): for cheap CPU policies, where batching gains nothing and the main process
    would serialize every slot's act. Same seeds, same outcomes."""
    requests = [(i, protocol.episode_seed(task_index, i), instruction, record_frames) for i in init_indices]

    def on_result(request, result) -> bool:
        init_index, seed = request[0], request[1]
        if isinstance(result, str):
            outcome = EpisodeOutcome(init_index, seed, False, 0, result, 0.0)
        else:
            outcome = EpisodeOutcome(init_index, seed, result["success"], result["steps"], None, result["wall_s"],
                                     result["frames"], result["scene_check"])
        return bool(on_done(outcome))

    env.run_episodes(requests, on_result)
