"""The one episode loop: what happens between a reset and an outcome, whoever computes the actions.

An episode starts from a reset (an evaluation init state, or LIBERO's random placement for `vla-bench collect`)
after the protocol's wait steps; then, each control step, the policy's action is checked, recorded and executed,
until LIBERO's done flag (success) or max_steps control steps (failure). An action that cannot be executed
(non-finite, misshapen, far out of range) ends the episode as an error naming the step.

`Episode` holds that logic as a state machine, so the scheduler (engine/scheduler.py), which batches the actions of
many episodes in the main process, and `run_in_worker`, which runs a whole episode inside a simulator worker with
the worker's own copy of a cheap policy, share it. Evaluation and collection differ only in what they record:
evaluation keeps frames for videos when asked; collection (request.demo) keeps the LIBERO demo arrays.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from .trace import EpisodeSummary, EpisodeTrace, last_phase

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


@dataclasses.dataclass(frozen=True)
class EpisodeRequest:
    """One episode to run. init_index None: LIBERO's random placement (collect), never an evaluation init state."""
    init_index: int | None
    seed: int
    instruction: str
    max_steps: int
    record_frames: bool = False
    demo: bool = False  # collect: record the LIBERO demo arrays
    action_noise: float = 0.0  # collect: sigma of the noise on the executed arm actions (collect/episode.py)
    trajectory: bool = False  # keep the per-step trajectory (--vla-trajectories); the figures are always kept


@dataclasses.dataclass
class EpisodeOutcome:
    init_index: int | None
    seed: int
    success: bool
    steps: int  # control steps after the wait steps
    error: str | None
    wall_s: float
    frames: list[np.ndarray] | None = None  # upright agentview frames, when recording
    scene_check: str | None = None  # the settled scene's verdict against the reference stack
    demo: dict | None = None  # collect: a `write_libero_demos` mapping
    renderer: str | None = None  # the worker's renderer, e.g. 'egl: NVIDIA Corporation NVIDIA H200/PCIe/SSE2'
    slot: int | None = None  # the pool slot that ran it
    replica: int = 0  # which of the job's policy replicas (devices) acted for it
    summary: EpisodeSummary | None = None  # action figures and why it stopped (engine/trace.py)
    trajectory: bytes | None = None  # the per-step trajectory when requested (EpisodeTrace.to_blob)


class Episode:
    """One running episode's state: begin with the first observation, then `check` and `executed` each action and
    `advance` with what the simulator answered, until `outcome` is set."""

    def __init__(self, request: EpisodeRequest, phase_of: Callable[[], str | None] = lambda: None):
        """phase_of: the acting policy's phase when the episode ends (the scripted expert's; None for others)."""
        self.request = request
        self.phase_of = phase_of
        self.trace = EpisodeTrace(keep_steps=request.trajectory)
        self.started = time.perf_counter()
        self.steps = 0
        self.obs: dict | None = None
        self.frames: list | None = [] if request.record_frames else None
        self.scene_check: str | None = None
        self.renderer: str | None = None
        self.outcome: EpisodeOutcome | None = None
        self._demo = None
        self._rng = np.random.default_rng(request.seed) if request.action_noise > 0 else None

    def begin(self, obs: dict, scene_check: str | None = None, init_state=None, renderer: str | None = None) -> None:
        self.obs, self.scene_check, self.renderer = obs, scene_check, renderer
        if self.frames is not None:
            self.frames.append(upright_frame(obs))
        if self.request.demo:
            from ..collect.episode import DemoRecorder

            self._demo = DemoRecorder(init_state, self.request)

    def check(self, action) -> bool:
        """False (and the episode ended as an error naming the step) when the action cannot be executed."""
        error = action_error(action, self.steps + 1)
        if error is not None:
            self.end(False, error)
        return error is None

    def executed(self, action: np.ndarray, sim_state=None) -> np.ndarray:
        """The action the simulator executes (under collect's action noise: perturbed), recorded as the episode
        records actions. sim_state: the flattened simulator state before the step (collect records it)."""
        action = np.asarray(action, dtype=np.float64)
        run = action
        if self._rng is not None:
            from ..collect.episode import perturb

            run = perturb(action, self.request.action_noise, self._rng)
        if self._demo is not None:
            self._demo.add(self.obs, action, run, sim_state)
        self.trace.add(run, self.obs)
        return run

    def advance(self, obs: dict | None, done: bool, error: str | None = None) -> bool:
        """After one executed step: True when the episode has ended (success, max steps or a simulator error)."""
        self.steps += 1
        if error is not None:
            self.end(False, error)
            return True
        if self.frames is not None and obs is not None:
            self.frames.append(upright_frame(obs))
        self.obs = obs
        if done:
            self.end(True)
        elif self.steps >= self.request.max_steps:
            self.end(False)
        return self.outcome is not None

    def end(self, success: bool, error: str | None = None) -> EpisodeOutcome:
        if self.outcome is None:
            summary = self.trace.finish(success, self.steps, self.request.max_steps, error, self.phase_of())
            self.outcome = EpisodeOutcome(
                self.request.init_index, self.request.seed, success, self.steps, error,
                time.perf_counter() - self.started, self.frames, self.scene_check,
                self._demo.result() if self._demo is not None and error is None else None, self.renderer,
                summary=summary, trajectory=self.trace.to_blob())
        return self.outcome


def run_in_worker(env, policy, request: EpisodeRequest, transform=None) -> EpisodeOutcome:
    """A whole episode inside a simulator worker, with the worker's own copy of an in-worker policy (see pool.py)."""
    episode = Episode(request, lambda: last_phase(policy, 0))
    policy.reset(0, request.seed)
    if request.init_index is None:
        obs, init_state = env.reset_random(request.seed)
    else:
        obs, init_state = env.reset(request.init_index, request.seed), None
    episode.begin(obs, str(env.scene_check) if request.init_index is not None else None, init_state, env.renderer)
    view = transform or (lambda o: o)
    while episode.outcome is None:
        actions = np.asarray(policy.act([view(episode.obs)], [request.instruction], [0]))
        action = actions[0] if actions.shape[:1] == (1,) else actions
        if not episode.check(action):
            break
        sim_state = np.asarray(env.env.get_sim_state(), dtype=np.float64).copy() if request.demo else None
        obs, done = env.step(episode.executed(action, sim_state))
        episode.advance(obs, done)
    return episode.outcome
