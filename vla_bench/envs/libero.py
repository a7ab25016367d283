"""One LIBERO task environment, built once and reused across episodes (reset + set_init_state).

Runs inside an env worker process (vla_bench/engine/pool.py), never in the main process: importing robosuite
before torchvision makes triton segfault at import in the reference stack, and the policy lives in the main process.
"""
from __future__ import annotations

import time

import numpy as np

from ..protocol import WAIT_ACTION, Protocol
from . import compiled_scenes, rendering, texture_memory
from .fingerprint import SceneCheck, scene_check
from .tasks import init_states, suite_tasks


#: The version of reset_random's scene semantics, stored in collected demo files so that demos from an older,
#: different placement are not mixed with new ones on resume. 2: fixtures are homed before each soft reset (in 1,
#: objects on stove/cabinet regions started 0.28-0.44 m off their region, many off the table).
RANDOM_RESET_VERSION = 2


class LiberoTaskEnv:
    def __init__(self, protocol: Protocol, task_index: int, cameras: tuple[str, ...] = (),
                 privileged: bool = False):
        self.backend = rendering.configure()
        if cameras:
            rendering.check_available(self.backend)
        from libero.libero.envs.env_wrapper import ControlEnv  # not exported from libero.libero.envs

        self.protocol = protocol
        self.task_index = task_index
        self.task = suite_tasks(protocol.suite)[task_index]
        self.init_states = init_states(protocol.suite, task_index)
        self.cameras = tuple(cameras)
        self.privileged = privileged
        # named before the env's own GL context exists: probing makes a context current and frees it, which would
        # leave the env's context not current on drivers that do not restore it
        self.renderer = rendering.renderer_name(self.backend) if cameras else f"{self.backend} (no cameras)"
        kwargs = dict(bddl_file_name=self.task.bddl_path, has_renderer=False, hard_reset=False,
                      has_offscreen_renderer=bool(cameras), use_camera_obs=bool(cameras))
        if cameras:
            kwargs.update(camera_names=list(cameras), camera_heights=protocol.camera_size,
                          camera_widths=protocol.camera_size)
        with compiled_scenes.loading_compiled_scenes():  # 0.4 s and 250 MiB a build instead of 2.5 s and 582
            self.env = ControlEnv(**kwargs)
        self.env.seed(protocol.env_seed)
        # the render context (made in the constructor) holds the textures in GL now: the model's ~200 MB copy goes
        self._render_context = self.env.sim._render_context_offscreen
        texture_memory.release(self.env.sim.model._model)
        self._fixture_homes: list | None = None  # (body id, pos, quat) of each fixture in the model file
        #: the verdict on the last evaluation reset's settled scene against the reference stack's fingerprint
        self.scene_check: SceneCheck | None = None
        #: seconds spent inside the simulator's camera renders since the env was built (the engine's step timing)
        self.render_s = 0.0

    def reset(self, init_index: int, seed: int) -> dict:
        """Start the episode on init state `init_index` and step the protocol's wait steps."""
        if not 0 <= init_index < len(self.init_states):
            raise IndexError(f"{self.task.suite} {self.task.task_id} has {len(self.init_states)} init states, "
                             f"asked for {init_index}")
        self._check_render_context()
        self._reset_scene(seed)
        obs = self._wait(self.env.set_init_state(self.init_states[init_index]))
        # a few body poses against the shipped fingerprint, no extra simulation: every episode carries its verdict
        self.scene_check = scene_check(self, self.protocol, self.task_index, init_index)
        return obs

    def reset_random(self, seed: int) -> tuple[dict, np.ndarray]:
        """Start from LIBERO's own random placement (for demonstrations, never the evaluation init states);
        returns the observation after the wait steps and the flattened sim state right after the reset."""
        self._check_render_context()
        obs = self._reset_scene(seed)
        return self._wait(obs), np.asarray(self.env.get_sim_state(), dtype=np.float64).copy()

    def _reset_scene(self, seed: int) -> dict:
        """LIBERO re-places fixtures (cabinet, stove) and, without an init state, the objects too, from the global
        NumPy RNG on every reset, and set_init_state restores only qpos/qvel; seeding NumPy with the episode's seed
        right before the reset makes the scene a function of (task, init state, seed) alone."""
        np.random.seed(seed)
        self._home_fixtures()
        obs = self.env.reset()
        # robosuite's soft reset (hard_reset=False) keeps the gripper's integrated command (`current_action`,
        # +-0.25 per step), so an episode that ended closed would start the next one half-closed. A hard reset
        # builds new gripper objects with it at zero: set that here so soft resets match the reference.
        for robot in self.env.env.robots:
            if getattr(robot, "gripper", None) is not None:
                robot.gripper.current_action = np.zeros_like(robot.gripper.current_action)
        return obs

    def _home_fixtures(self) -> None:
        """Put the fixtures back where the model file has them (origin, no turn) before a soft reset.

        LIBERO places an object that starts on or in a fixture's region (a bowl on the stove, in a drawer, on the
        cabinet) at the fixture's sampled pose plus the region site's `site_xpos`, as if that were the site's
        offset in the fixture's frame. That holds only while the fixture sits at the origin, as it does in a model
        freshly loaded from XML (LIBERO's default hard reset). With hard_reset=False the model keeps the fixture
        where the previous reset (the one in the env's constructor included) moved it, so the offset counts the
        fixture's position twice: the bowl "on the stove" started 0.26 m left of it, off the table's edge, and fell
        to the floor. Homing the fixtures makes the random reset place objects as LIBERO's hard reset does; the
        fixtures are sampled before the sites are read, so their poses (and the evaluation episodes, whose object
        poses come from the init state) do not change.
        """
        env = self.env.env
        model = env.sim.model
        if self._fixture_homes is None:  # read from the model's XML tree (compiling it again would cost seconds)
            self._fixture_homes = []
            for obj in env.fixtures_dict.values():
                body = env.model.worldbody.find(f".//body[@name='{obj.root_body}']")
                pos = np.array((body.get("pos") or "0 0 0").split(), dtype=np.float64)
                quat = np.array((body.get("quat") or "1 0 0 0").split(), dtype=np.float64)
                self._fixture_homes.append((model.body_name2id(obj.root_body), pos, quat))
        for body, pos, quat in self._fixture_homes:
            model.body_pos[body] = pos
            model.body_quat[body] = quat

    def _wait(self, obs: dict) -> dict:
        for _ in range(self.protocol.wait_steps):  # objects start ~7 cm up and settle during these
            obs, _, _, _ = self.env.step(list(WAIT_ACTION))
        return self._observe(obs)

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        self._check_render_context()
        self._time_renders()
        obs, _reward, done, _info = self.env.step(np.asarray(action, dtype=np.float64).tolist())
        return self._observe(obs), bool(done)

    def _check_render_context(self) -> None:
        """The model's textures were released after the env's render context took them (envs/texture_memory.py);
        a context made since would have uploaded zeros."""
        if self.env.sim._render_context_offscreen is not self._render_context:
            raise RuntimeError(f"{self.task.suite} task {self.task_index}: robosuite made a new render context after "
                               f"the scene's textures were released, so its camera frames would be wrong; set "
                               f"{texture_memory.ENV_VAR}=1 to keep the textures")

    def _time_renders(self) -> None:
        """Count the time of robosuite's camera renders into render_s (wrapped once per simulator object; robosuite
        renders through sim.render inside env.step and offers no timing of its own)."""
        sim = self.env.sim
        if getattr(sim.render, "vla_bench_timed", False):
            return
        render = sim.render

        def timed_render(*args, **kwargs):
            started = time.perf_counter()
            try:
                return render(*args, **kwargs)
            finally:
                self.render_s += time.perf_counter() - started

        timed_render.vla_bench_timed = True
        sim.render = timed_render

    def _observe(self, obs: dict) -> dict:
        if self.privileged:
            from .scene import describe_scene

            obs["scene"] = describe_scene(self.env)
        return obs

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()
