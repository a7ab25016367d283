"""Unit tests of the scripted expert's parts that can break: grasp-side geometry, the yaw-sign choice, the phase
machine on synthetic observations, and the degraded options' reproducibility. The closed-loop rollout tests (the
expert passes a real LIBERO task, a negative control fails it) live with the rollout tests."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from vla_bench.errors import VlaBenchError
from vla_bench.policies import expert_geometry, expert_phases, scripted
from vla_bench.policies.expert_geometry import (
    R_DOWN, axis_angle, choose_grasp, choose_yaw, gripper_clearance, hand_yaw, rot_z, wrap, yaw_for_axis,
)
from vla_bench.policies.expert_phases import _PickPlace
from vla_bench.policies.scripted import ScriptedExpert

ROBOT_BASE = np.array([-0.66, 0.0, 0.912])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subprocess_env():
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---- a synthetic scene in describe_scene's format -------------------------------------------------------------
def _rot_about(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def bowl_boxes(centre):
    """A bowl like LIBERO's akita_black_bowl: a 16-box wall ring at r = 0.047 (top 0.0525 above the base) and a
    floor box."""
    boxes = []
    for k in range(16):
        a = 2 * math.pi * k / 16
        c = np.asarray(centre, float) + [0.047 * math.cos(a), 0.047 * math.sin(a), 0.0335]
        boxes.append((c, rot_z(a), np.array([0.001, 0.009, 0.019])))
    boxes.append((np.asarray(centre, float) + [0, 0, 0.005], np.eye(3), np.array([0.02, 0.02, 0.004])))
    return boxes


def make_scene(entities, goal):
    """entities: list of (name, is_fixture, origin, boxes)."""
    names, fixture, pos, owner, gpos, gmat, ghalf = [], [], [], [], [], [], []
    for idx, (name, is_fix, origin, boxes) in enumerate(entities):
        names.append(name)
        fixture.append(is_fix)
        pos.append(np.asarray(origin, float))
        for c, m, h in boxes:
            owner.append(idx)
            gpos.append(c)
            gmat.append(m)
            ghalf.append(h)
    n = len(names)
    return {
        "goal": goal, "goal_done": [False] * len(goal), "names": names,
        "is_fixture": np.array(fixture), "classes": ["X"] * n,
        "pos": np.array(pos), "mat": np.repeat(np.eye(3)[None], n, axis=0),
        "geom_owner": np.array(owner), "geom_body": np.array(owner) + 1,  # one body per entity
        "geom_pos": np.array(gpos), "geom_mat": np.array(gmat),
        "geom_half": np.array(ghalf), "geom_type": np.full(len(owner), 6),
        "robot_base": ROBOT_BASE.copy(), "sites": {}, "joints": {}, "site_joints": {}, "articulations": {},
        "articulation_ranges": {},
    }


def spatial_scene(bowl=(-0.05, 0.1, 0.898), plate=(0.06, 0.2, 0.902), extra=()):
    ents = [("akita_black_bowl_1", False, bowl, bowl_boxes(bowl)),
            ("plate_1", False, plate, [(np.asarray(plate, float) + [0, 0, 0.004], np.eye(3),
                                        np.array([0.07, 0.07, 0.008]))])]
    ents += list(extra)
    return make_scene(ents, [["on", "akita_black_bowl_1", "plate_1"]])


def obs_at(eef, scene, yaw=0.0, width=0.08, q7=0.77):
    R = rot_z(yaw) @ R_DOWN
    w, x, y, z = _mat_to_wxyz(R)
    return {"robot0_eef_pos": np.asarray(eef, float), "robot0_eef_quat": np.array([x, y, z, w]),
            "robot0_gripper_qpos": np.array([width / 2, -width / 2]),
            "robot0_joint_pos": np.array([0, 0, 0, -2.4, 0, 2.2, q7]), "scene": scene}


def _mat_to_wxyz(R):
    """Shepperd's method: divide by the largest of the four quaternion components, so a half turn is exact."""
    t = np.trace(R)
    if t > 0:
        w = math.sqrt(1 + t) / 2
        return w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w)
    i = int(np.argmax(np.diag(R)))
    j, k = (i + 1) % 3, (i + 2) % 3
    q = np.zeros(4)
    q[i + 1] = math.sqrt(max(0.0, 1 + R[i, i] - R[j, j] - R[k, k])) / 2
    q[0] = (R[k, j] - R[j, k]) / (4 * q[i + 1])
    q[j + 1] = (R[j, i] + R[i, j]) / (4 * q[i + 1])
    q[k + 1] = (R[k, i] + R[i, k]) / (4 * q[i + 1])
    return tuple(q)


def test_synthetic_quaternions_round_trip():
    for yaw in np.linspace(-3, 3, 7):
        R = rot_z(yaw) @ R_DOWN
        w, x, y, z = _mat_to_wxyz(R)
        assert np.allclose(expert_geometry.quat_xyzw_to_mat([x, y, z, w]), R, atol=1e-9)


# ---- rotations ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("angle", [0.0, 1e-4, 0.3, 1.5, 3.0, math.pi - 1e-4])
def test_axis_angle_inverts_rodrigues_for_any_axis(angle):
    rng = np.random.default_rng(0)
    for _ in range(5):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        got = axis_angle(_rot_about(axis, angle))
        assert np.allclose(got, axis * angle, atol=1e-5)


def test_yaw_for_axis_puts_the_finger_axis_along_the_direction():
    for ang in np.linspace(-math.pi, math.pi, 17):
        u = np.array([math.cos(ang), math.sin(ang)])
        yaw = yaw_for_axis(u)
        finger_axis = (rot_z(yaw) @ R_DOWN)[:2, 1]
        assert abs(abs(float(finger_axis @ u)) - 1.0) < 1e-9
        assert abs(wrap(hand_yaw(rot_z(yaw) @ R_DOWN) - yaw)) < 1e-9


def test_choose_yaw_takes_the_smaller_turn_when_joint7_is_far_from_its_limits():
    eef = np.array([-0.2, 0.0])
    yaw = choose_yaw(0.3, 0.0, q7=0.77, base_xy=ROBOT_BASE[:2], eef_xy=eef, target_xy=eef)
    assert abs(wrap(yaw - 0.3)) < 1e-9
    yaw = choose_yaw(0.3 + math.pi, 0.0, q7=0.77, base_xy=ROBOT_BASE[:2], eef_xy=eef, target_xy=eef)
    assert abs(wrap(yaw - 0.3)) < 1e-9


def test_choose_yaw_keeps_joint7_inside_its_limit_for_a_far_left_target():
    # the base turns ~+35 deg to reach far left; with q7 already high, the yaw that also turns q7 up must lose
    eef, target = np.array([-0.2, 0.0]), np.array([-0.2, 0.33])
    b = math.atan2(0.33, 0.46)
    for axis_yaw in (-math.pi / 2 + 0.2, math.pi / 2 + 0.2):
        yaw = choose_yaw(axis_yaw, 0.0, q7=2.3, base_xy=ROBOT_BASE[:2], eef_xy=eef, target_xy=target)
        q7_pred = 2.3 + b - wrap(yaw - 0.0)
        assert abs(q7_pred) < expert_geometry.Q7_LIMIT - 0.35


# ---- grasp-side geometry --------------------------------------------------------------------------------------
def _rim_candidates(centre, z):
    out = []
    for k in range(8):
        a = k * math.pi / 4
        u = np.array([math.cos(a), math.sin(a), 0.0])
        out.append((np.array([centre[0], centre[1], z]) + 0.047 * u, u, u))
    return out


def _boxes(*specs):
    c = np.array([s[0] for s in specs], float)
    m = np.repeat(np.eye(3)[None], len(specs), axis=0)
    h = np.array([s[1] for s in specs], float)
    return c, m, h


def test_gripper_clearance_is_zero_in_contact_and_grows_with_distance():
    point, axis = np.array([0.0, 0.0, 0.95]), np.array([1.0, 0.0, 0.0])
    touching = _boxes(((0.05, 0.0, 0.95), (0.01, 0.01, 0.02)))
    assert gripper_clearance(point, axis, *touching) == 0.0
    near = gripper_clearance(point, axis, *_boxes(((0.15, 0.0, 0.95), (0.01, 0.01, 0.02))))
    far = gripper_clearance(point, axis, *_boxes(((0.30, 0.0, 0.95), (0.01, 0.01, 0.02))))
    assert 0.0 < near < far


def test_free_bowl_is_grasped_on_the_side_facing_the_robot():
    cands = _rim_candidates((0.0, 0.1), 0.93)
    toward = np.array([-1.0, 0.0, 0.0])
    k = choose_grasp(cands, _boxes(), toward)
    assert np.allclose(cands[k][2][:2], [-1.0, 0.0])


def test_grasp_side_avoids_a_neighbour():
    # a ramekin-sized block right next to the bowl on the robot side: that side (and its diagonals) must lose
    cands = _rim_candidates((0.0, 0.1), 0.93)
    obstacle = _boxes(((-0.12, 0.1, 0.92), (0.04, 0.04, 0.025)))
    k = choose_grasp(cands, obstacle, np.array([-1.0, 0.0, 0.0]))
    assert cands[k][2][0] > -0.5


def test_grasp_side_in_a_drawer_is_along_its_open_axis():
    # drawer side walls close on +-y: only the +-x sides leave room for the outer finger
    cands = _rim_candidates((0.0, 0.0), 1.08)
    walls = _boxes(((0.0, 0.075, 1.08), (0.12, 0.005, 0.04)), ((0.0, -0.075, 1.08), (0.12, 0.005, 0.04)))
    k = choose_grasp(cands, walls, np.array([-1.0, 0.0, 0.0]))
    assert abs(cands[k][2][1]) < 1e-9
    assert choose_grasp(cands, walls, np.array([-1.0, 0.0, 0.0]), exclude={k}) is not None


# ---- the phase machine on synthetic observations ------------------------------------------------------------
def _run_until(policy, make_obs, phase, limit=200):
    for _ in range(limit):
        if policy.phase(0) == phase:
            return True
        policy.act([make_obs()], ["task"], [0])
    return policy.phase(0) == phase


def test_phase_machine_goes_approach_descend_close_lift_on_a_cooperative_world():
    scene = spatial_scene()
    expert = ScriptedExpert()
    expert.reset(0, 123)
    state = {"eef": np.array([-0.21, 0.0, 1.17]), "width": 0.08}

    def obs():
        return obs_at(state["eef"], scene, width=state["width"])

    a = expert.act([obs()], ["pick"], [0])[0]
    assert expert.phase(0) == "approach" and a[6] == -1.0 and a.shape == (7,)
    # an ideal arm: it goes where it is asked (the action is 20 x the error), and turns to the asked yaw
    task = expert._episodes[0].tasks[0]
    local, yaw, _ = task.grasp
    grasp_point = scene["pos"][0] + local
    assert abs(np.linalg.norm(grasp_point[:2] - scene["pos"][0][:2]) - 0.047) < 0.003

    def ideal():
        o = obs_at(state["eef"], scene, yaw=yaw, width=state["width"])
        return o

    for _ in range(80):
        a = expert.act([ideal()], ["pick"], [0])[0]
        state["eef"] = state["eef"] + a[:3] / expert_phases.POS_GAIN
        if expert.phase(0) == "close":
            break
    assert expert.phase(0) == "close"
    assert np.linalg.norm(state["eef"] - grasp_point) < 0.01
    state["width"] = 0.005  # the fingers stop on the bowl wall
    for _ in range(12):
        a = expert.act([ideal()], ["pick"], [0])[0]
    assert a[6] == 1.0 and expert.phase(0) == "lift"
    assert a[2] > 0.5  # it lifts


def test_a_closed_gripper_means_a_miss_and_another_side_is_tried():
    scene = spatial_scene()
    expert = ScriptedExpert()
    expert.reset(0, 1)
    expert.act([obs_at([-0.21, 0.0, 1.17], scene)], ["pick"], [0])
    task = expert._episodes[0].tasks[0]
    first = task.grasp[2]
    task._go("close")
    for _ in range(11):
        expert.act([obs_at([-0.1, 0.1, 0.93], scene, width=0.001)], ["pick"], [0])
    assert expert.phase(0) == "regrasp"
    for _ in range(10):
        expert.act([obs_at([-0.1, 0.1, 1.0], scene)], ["pick"], [0])
    assert expert.phase(0) == "approach"
    assert task.grasp[2] != first and first in task.failed


def test_the_lift_is_abandoned_when_the_object_stays_down():
    scene = spatial_scene()
    expert = ScriptedExpert()
    expert.reset(0, 1)
    expert.act([obs_at([-0.21, 0.0, 1.17], scene)], ["pick"], [0])
    task = expert._episodes[0].tasks[0]
    task._go("close")
    for _ in range(11):
        expert.act([obs_at([-0.1, 0.1, 0.93], scene, width=0.005)], ["pick"], [0])
    assert expert.phase(0) == "lift"
    for _ in range(12):  # the bowl's z never changes
        expert.act([obs_at([-0.1, 0.1, 0.95], scene, width=0.005)], ["pick"], [0])
    assert expert.phase(0) == "regrasp"


def test_unknown_goals_make_the_expert_hold_still_with_the_gripper_open():
    scene = spatial_scene()
    scene["goal"] = [["turnoff", "plate_1"]]
    expert = ScriptedExpert()
    expert.reset(0, 0)
    a = expert.act([obs_at([-0.21, 0.0, 1.17], scene)], ["?"], [0])[0]
    assert expert.phase(0) == "done" and a[6] == -1.0 and np.all(np.abs(a[:3]) <= 1.0)


def test_act_is_batched_over_slots_and_needs_the_scene():
    scene = spatial_scene()
    expert = ScriptedExpert()
    for s in (0, 3):
        expert.reset(s, s)
    out = expert.act([obs_at([-0.21, 0.0, 1.17], scene), obs_at([-0.2, 0.1, 1.1], scene)], ["a", "b"], [3, 0])
    assert out.shape == (2, 7) and np.all(np.abs(out) <= 1.0)
    with pytest.raises(ValueError, match="scene"):
        expert.act([{"robot0_eef_pos": np.zeros(3)}], ["a"], [0])
    assert expert.capabilities.privileged and not expert.capabilities.images


# ---- degraded options -----------------------------------------------------------------------------------------
def test_fumbles_are_decided_by_the_episode_seed():
    picks = [scripted._Episode(seed, 0.3, 0.0).fumble for seed in range(2000)]
    assert picks == [scripted._Episode(seed, 0.3, 0.0).fumble for seed in range(2000)]
    assert 0.25 < np.mean(picks) < 0.35
    assert not any(scripted._Episode(s, 0.0, 0.0).fumble for s in range(200))
    assert all(scripted._Episode(s, 1.0, 0.0).fumble for s in range(200))


def test_a_fumbled_episode_opens_at_the_lift_and_gives_up():
    scene = spatial_scene()
    expert = ScriptedExpert(fumble_probability=1.0)
    expert.reset(0, 5)
    expert.act([obs_at([-0.21, 0.0, 1.17], scene)], ["pick"], [0])
    expert._episodes[0].tasks[0]._go("close")
    for _ in range(11):
        expert.act([obs_at([-0.1, 0.1, 0.93], scene, width=0.005)], ["pick"], [0])
    for _ in range(4):
        a = expert.act([obs_at([-0.1, 0.1, 0.95], scene, width=0.005)], ["pick"], [0])[0]
    assert expert.phase(0) == "gave_up" and a[6] == -1.0


def test_action_noise_is_reproducible_by_seed_and_only_on_the_arm():
    scene = spatial_scene()
    obs = obs_at([-0.21, 0.0, 1.17], scene)

    def actions(noise, seed):
        e = ScriptedExpert(action_noise=noise)
        e.reset(0, seed)
        return np.stack([e.act([obs], ["pick"], [0])[0] for _ in range(5)])

    clean = actions(0.0, 7)
    assert np.array_equal(actions(0.2, 7), actions(0.2, 7))
    assert not np.array_equal(actions(0.2, 7), actions(0.2, 8))
    assert not np.allclose(actions(0.2, 7)[:, :6], clean[:, :6])
    assert np.array_equal(actions(0.2, 7)[:, 6], clean[:, 6])


def test_options_are_validated_and_change_the_identity(tmp_path):
    def spec(**options):
        return SimpleNamespace(kind="scripted", options=options, name="e",
                               where=lambda key=None: f"checkpoints.toml: [checkpoints.e] {key}: ")

    assert scripted.identity(spec(), None) == scripted.identity(spec(), None)
    assert scripted.identity(spec(), None) != scripted.identity(spec(fumble_probability=0.2), None)
    assert scripted.identity(spec(action_noise=0.1), None) != scripted.identity(spec(action_noise=0.2), None)
    scripted.validate(spec(fumble_probability=0.5, action_noise=0.1), None)
    with pytest.raises(VlaBenchError, match="fumble_probability"):
        scripted.validate(spec(fumble_probability=1.5), None)
    with pytest.raises(VlaBenchError, match="action_noise"):
        scripted.validate(spec(action_noise=-0.1), None)
    policy = scripted.build(spec(fumble_probability=0.25, action_noise=0.05), None)
    assert policy.fumble_probability == 0.25 and policy.action_noise == 0.05


def test_the_expert_never_imports_torch():
    code = "import sys, vla_bench.policies.scripted; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env(), cwd=REPO)


# ---- describe_scene on a real LIBERO env (in a subprocess: robosuite must not share a process with torch) ------
def test_describe_scene_returns_plain_picklable_facts():
    pytest.importorskip("libero")
    code = textwrap.dedent("""
        import os, pickle, numpy as np
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs.env_wrapper import ControlEnv
        from vla_bench.envs.scene import describe_scene
        suite = benchmark.get_benchmark_dict()["libero_spatial"]()
        task = suite.get_task(0)
        env = ControlEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                         task.bddl_file), has_renderer=False, has_offscreen_renderer=False,
                         use_camera_obs=False, hard_reset=False)
        env.seed(0); np.random.seed(0); env.reset(); env.set_init_state(suite.get_task_init_states(0)[0])
        s = describe_scene(env)
        s2 = pickle.loads(pickle.dumps(s))
        assert s["goal"] == [["on", "akita_black_bowl_1", "plate_1"]] and s["goal_done"] == [False]
        assert "akita_black_bowl_1" in s["names"] and "wooden_cabinet_1" in s["names"]
        n = len(s["geom_owner"])
        assert n > 50 and s["geom_pos"].shape == (n, 3) and s["geom_mat"].shape == (n, 3, 3)
        assert s["pos"].shape == (len(s["names"]), 3) and s["robot_base"].shape == (3,)
        assert "flat_stove_1_cook_region" in s["sites"]
        knob = [j for j, a in s["articulations"].items() if a["owner"] == "flat_stove_1"]
        assert knob and s["articulations"][knob[0]]["type"] == "hinge"
        assert "default_turnon_ranges" in s["articulation_ranges"]["flat_stove_1"]
        assert s["site_joints"]["wooden_cabinet_1_top_region"]
        assert describe_scene(env)["geom_owner"] is s["geom_owner"]  # static part cached
        env.close()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_subprocess_env(),
                         cwd=REPO, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---- motion "funnel": heights that are continuous functions of the horizontal error -----------------------------
from hypothesis import given, strategies as st  # noqa: E402

errors = st.floats(0.0, 0.5, allow_nan=False)


@given(a=errors, b=errors)
def test_funnel_approach_height_grows_with_the_error_from_the_grasp_point_to_hover(a, b):
    """Under "funnel" the approach height is 0 at the grasp point, HOVER from FUNNEL_GRASP_XY on, never decreasing in
    the horizontal error and Lipschitz in it (nearby states ask for nearby heights); under "gated" it is HOVER."""
    h = expert_phases.approach_height
    assert h(0.0, True) == 0.0 and h(expert_phases.FUNNEL_GRASP_XY, True) == pytest.approx(expert_phases.HOVER)
    lo, hi = sorted((a, b))
    assert h(lo, True) <= h(hi, True) <= expert_phases.HOVER
    assert h(hi, True) - h(lo, True) <= expert_phases.HOVER / expert_phases.FUNNEL_GRASP_XY * (hi - lo) + 1e-12
    assert h(a, False) == expert_phases.HOVER


@given(a=errors, b=errors, floor=st.floats(0.8, 1.0), lift=st.floats(0.02, 0.3))
def test_funnel_carry_height_descends_with_the_error_to_just_above_the_floor(a, b, floor, lift):
    """Under "funnel" the carried object's target height is the carry height from FUNNEL_PLACE_XY on, just above
    the floor (PLACE_CLEARANCE) at 0 error, and never decreasing in the error; under "gated" it is the carry
    height."""
    carry = floor + lift
    c = expert_phases.carry_height
    assert c(carry, floor, 0.0, True) == pytest.approx(floor + expert_phases.PLACE_CLEARANCE)
    assert c(carry, floor, expert_phases.FUNNEL_PLACE_XY, True) == pytest.approx(carry)
    lo, hi = sorted((a, b))
    assert c(carry, floor, lo, True) <= c(carry, floor, hi, True) + 1e-12
    assert c(carry, floor, a, False) == carry


def _planned_pick(motion):
    """The expert (seed 123) after its first step on the synthetic scene, the hand at its start pose: (scene,
    expert, hand position, grasp yaw, grasp point)."""
    scene = spatial_scene()
    expert = ScriptedExpert(motion=motion)
    expert.reset(0, 123)
    eef = np.array([-0.21, 0.0, 1.17])
    expert.act([obs_at(eef, scene)], ["pick"], [0])
    local, yaw, _ = expert._episodes[0].tasks[0].grasp
    return scene, expert, eef, yaw, scene["pos"][0] + local


def _approach_on_an_ideal_arm(motion, blocked_above=None):
    """The expert's approach on the synthetic scene with an arm that goes where it is asked (but never lower than
    `blocked_above` m over the grasp point, when given: a finger on something): [(phase, horizontal error to the
    grasp point, height above it)] per step, until the gripper closes."""
    scene, expert, eef, yaw, grasp_point = _planned_pick(motion)
    trace = []
    for _ in range(120):
        a = expert.act([obs_at(eef, scene, yaw=yaw)], ["pick"], [0])[0]
        eef = eef + a[:3] / expert_phases.POS_GAIN
        if blocked_above is not None:
            eef[2] = max(eef[2], grasp_point[2] + blocked_above)
        trace.append((expert.phase(0), float(np.linalg.norm(eef[:2] - grasp_point[:2])),
                      float(eef[2] - grasp_point[2])))
        if expert.phase(0) == "close":
            break
    return trace


def test_funnel_never_holds_a_height_over_the_grasp_point_where_gated_does():
    """Gated: right over the grasp point at HOVER the expert once holds still, then descends from the very same
    state (two actions for one image). Funnel: every step over the grasp point goes down until it is there."""
    gated, funnel = _approach_on_an_ideal_arm("gated"), _approach_on_an_ideal_arm("funnel")
    assert gated[-1][0] == funnel[-1][0] == "close"
    assert funnel[-1][1] < 0.006 and abs(funnel[-1][2]) < 0.006
    over = [z for _, xy, z in gated if xy < 0.006]
    assert any(a == pytest.approx(b) and a > 0.8 * expert_phases.HOVER for a, b in zip(over, over[1:]))
    over = [z for _, xy, z in funnel if xy < 0.006]
    assert all(b < a - 1e-6 for a, b in zip(over, over[1:]) if a > 0.006)


@pytest.mark.parametrize("motion", scripted.MOTIONS)
def test_a_hand_stalled_over_the_grasp_point_still_closes_there(motion):
    """In the drawer and on the stove the hand stalls ~1 cm above the grasp point: the descent's timeout closes the
    gripper there (a grasp that holds) instead of giving up on the side, under either motion."""
    stall = 0.01 if motion != "decisive" else expert_phases.CLOSE_WITHIN[True] + 0.005  # above "decisive"'s own band
    trace = _approach_on_an_ideal_arm(motion, blocked_above=stall)
    phases = [phase for phase, _, _ in trace]
    assert phases[-1] == "close" and "plan" not in phases
    assert phases.count("descend") == _PickPlace.DESCEND_TIMEOUT + 1
    assert trace[-1][1] < 0.006 and trace[-1][2] == pytest.approx(stall)


def _distance_when_the_gripper_closes(motion, follow=0.3):
    """On the synthetic scene with a sluggish arm (it covers `follow` of the asked move per step, as the OSC
    controller roughly does): the hand's distance to the grasp point in the observation on which the expert first
    commands the gripper closed."""
    scene, expert, eef, yaw, grasp_point = _planned_pick(motion)
    for _ in range(300):
        a = expert.act([obs_at(eef, scene, yaw=yaw)], ["pick"], [0])[0]
        if a[6] == expert_phases.CLOSE:
            return float(np.linalg.norm(eef - grasp_point))
        eef = eef + follow * a[:3] / expert_phases.POS_GAIN
    raise AssertionError(f"{motion}: the gripper never closed")


def test_decisive_closes_while_still_descending_where_the_others_wait_for_millimetres():
    """"decisive" commands the gripper closed 6-15 mm from the grasp point (the fingers are slower than the hand);
    gated and funnel wait until the hand is within 6 mm, after a decelerating approach of near-still frames."""
    assert 0.006 <= _distance_when_the_gripper_closes("decisive") < expert_phases.CLOSE_WITHIN[True]
    for motion in ("gated", "funnel"):
        assert _distance_when_the_gripper_closes(motion) < expert_phases.CLOSE_WITHIN[False]


def _lowering_step(motion, bottom_above_rest, width=0.01):
    """One step of the lowering phase with the bowl held centred over the plate, its bottom `bottom_above_rest` m
    over the plate's top: (phase after the step, gripper command)."""
    scene = spatial_scene()
    expert = ScriptedExpert(motion=motion)
    expert.reset(0, 5)
    expert.act([obs_at([-0.21, 0.0, 1.17], scene)], ["pick"], [0])
    task = expert._episodes[0].tasks[0]
    plate_top = scene["pos"][1][2] + 0.012
    bowl_bottom_offset = 0.001  # the bowl's floor box bottom sits 1 mm over its origin (bowl_boxes)
    z = plate_top + bottom_above_rest - bowl_bottom_offset
    shift = np.array([scene["pos"][1][0], scene["pos"][1][1], z]) - scene["pos"][0]
    scene["pos"][0] += shift
    scene["geom_pos"][scene["geom_owner"] == 0] += shift
    task._go("lower")
    task.z_hist = []
    eef = scene["pos"][0] + np.array([0.047, 0.0, 0.03])
    a = expert.act([obs_at(eef, scene, width=width)], ["place"], [0])[0]
    return expert.phase(0), a[6]


@pytest.mark.parametrize("motion", scripted.MOTIONS)
def test_the_gripper_opens_within_the_release_height_and_not_above_it(motion):
    """Every motion lowers a held object until its bottom is RELEASE_ABOVE over where it will rest, then opens:
    3 cm for "decisive" (a short drop, reached at speed), 1.2 cm otherwise."""
    above = expert_phases.RELEASE_ABOVE[motion == "decisive"]
    assert _lowering_step(motion, above - 0.004)[0] == "release"
    assert _lowering_step(motion, above + 0.006) == ("lower", expert_phases.CLOSE)


def test_motion_option_is_validated_and_changes_the_identity():
    def spec(**options):
        return SimpleNamespace(kind="scripted", options=options, name="e",
                               where=lambda key=None: f"checkpoints.toml: [checkpoints.e] {key}: ")

    assert scripted.identity(spec(motion="funnel"), None) != scripted.identity(spec(), None)
    with pytest.raises(VlaBenchError, match=r"\[checkpoints.e\] motion: must be one of gated, funnel, decisive, got 'smooth'"):
        scripted.validate(spec(motion="smooth"), None)
    assert scripted.build(spec(motion="funnel"), None).motion == "funnel"
    assert scripted.build(spec(), None).motion == "gated"


@pytest.mark.parametrize("motion, steps", [("decisive", 3), ("funnel", 10), ("gated", 10)])
def test_the_lift_starts_once_the_fingers_stop_under_decisive_and_after_ten_steps_otherwise(motion, steps):
    """Closing on the bowl wall, the finger gap stops changing: "decisive" lifts from then on (after the 3 steps
    the gripper needs to start moving), the others after a fixed 10 steps of holding still."""
    scene = spatial_scene()
    expert = ScriptedExpert(motion=motion)
    expert.reset(0, 1)
    expert.act([obs_at([-0.21, 0.0, 1.17], scene)], ["pick"], [0])
    task = expert._episodes[0].tasks[0]
    task._go("close")  # entered directly: no finger gap recorded before closing
    taken = 0
    while expert.phase(0) == "close" and taken < 20:
        expert.act([obs_at([-0.1, 0.1, 0.93], scene, width=0.005)], ["pick"], [0])
        taken += 1
    assert expert.phase(0) == "lift" and taken == steps


# ---- handles and shared regions --------------------------------------------------------------------------------
def moka_boxes(origin):
    """A closed pot 8 cm square and 13 cm tall (too wide for the fingers, no rim: its lid is a 1 cm knob), with a
    handle 1.3 cm across sticking out 3 cm behind it (y), from 5.6 to 12.2 cm up."""
    o = np.asarray(origin, float)
    return [(o + [0, 0, 0.0665], np.eye(3), np.array([0.04, 0.04, 0.0665])),
            (o + [0, 0, 0.14], np.eye(3), np.array([0.006, 0.006, 0.007])),  # the knob
            (o + [0, -0.055, 0.089], np.eye(3), np.array([0.0065, 0.015, 0.033]))]  # the handle


def test_a_wide_pot_with_a_closed_lid_is_grasped_across_its_handle_with_the_palm_above_it():
    origin = (0.0, 0.1, 0.9)
    scene = make_scene([("moka_pot_1", False, origin, moka_boxes(origin))], [["on", "moka_pot_1", "stove_1"]])
    pick = _PickPlace("moka_pot_1", "stove_1", "on", scripted._Episode(0, 0.0, 0.0))
    candidates = pick._candidates(scripted._View(scene))
    assert candidates, "no grasp"
    for point, axis, _ in candidates:
        assert point[:2] == pytest.approx([0.0, 0.045])  # the handle's centre, not the lid
        assert abs(axis[0]) == pytest.approx(1.0)  # the fingers close across its 1.3 cm
        handle_top = 0.9 + 0.089 + 0.033
        assert point[2] == pytest.approx(handle_top - expert_phases.PALM_ABOVE)
    bowl = make_scene([("bowl_1", False, origin, bowl_boxes(origin))], [["on", "bowl_1", "stove_1"]])
    rim = _PickPlace("bowl_1", "stove_1", "on", scripted._Episode(0, 0.0, 0.0))._candidates(scripted._View(bowl))
    assert len(rim) == 8 and all(np.linalg.norm(p[:2] - np.asarray(origin)[:2]) > 0.04 for p, _, _ in rim)


def test_objects_put_on_one_region_each_get_their_own_part_of_it():
    a, b = (0.0, 0.1, 0.9), (0.1, 0.1, 0.9)
    scene = make_scene([("moka_pot_1", False, a, moka_boxes(a)), ("moka_pot_2", False, b, moka_boxes(b))],
                       [["on", "moka_pot_1", "cook_region"], ["on", "moka_pot_2", "cook_region"]])
    scene["sites"] = {"cook_region": {"pos": np.array([0.0, -0.2, 0.905]),
                                      "half": np.array([0.075, 0.075, 0.0025])}}
    tasks = scripted.plan_tasks(scene, scripted._Episode(0, 0.0, 0.0))
    assert [t.share for t in tasks] == [(0, 2), (1, 2)]
    view = scripted._View(scene)
    spots = [t._dest_xy_and_floor(view, 0.9)[0] for t in tasks]
    offset = expert_phases.SHARED_SPREAD * 0.075
    assert spots[0] == pytest.approx([-offset, -0.2 - offset]) and spots[1] == pytest.approx([offset, -0.2 + offset])
    alone = make_scene([("moka_pot_1", False, a, moka_boxes(a))], [["on", "moka_pot_1", "cook_region"]])
    alone["sites"] = scene["sites"]
    (task,) = scripted.plan_tasks(alone, scripted._Episode(0, 0.0, 0.0))
    assert task.share is None and task._dest_xy_and_floor(scripted._View(alone), 0.9)[0] == pytest.approx([0, -0.2])


def test_an_objects_bottom_is_its_lowest_point_in_the_world_whatever_its_body_axes():
    """A carton 13 cm tall whose body z lies horizontal (LIBERO's milk): its bottom is the lowest point of its
    geoms, not its origin less its extent along its own z (3 cm off: the carried carton then met the basket)."""
    origin = np.array([0.0, 0.0, 0.065])
    R = _rot_about([1, 0, 0], math.pi / 2)  # body z along world -y; body y up
    scene = make_scene([("milk_1", False, origin, [(origin, R, np.array([0.03, 0.065, 0.03]))])],
                       [["on", "milk_1", "basket_1"]])
    scene["mat"] = R[None]
    view = scripted._View(scene)
    assert _PickPlace._bottom(view, 0) == pytest.approx(0.0)
    lo, _ = view.local_extent(0)
    assert origin[2] + lo[2] == pytest.approx(0.035)  # what the lift used to aim from


def test_grasps_whose_hand_would_run_into_a_fixture_at_the_destination_are_left_out():
    """A bowl going onto a plate that stands 10 cm in front of a cabinet (a fixture 20 cm tall): the rim pinches
    whose hand (21 cm along the fingers) would reach into the cabinet once the bowl is on the plate are left out, the
    others stay; with no cabinet, none is left out."""
    plate = (0.06, 0.2, 0.902)
    cabinet = ("cabinet_1", True, (0.06, 0.40, 1.0), [(np.array([0.06, 0.40, 1.0]), np.eye(3),
                                                       np.array([0.15, 0.1, 0.1]))])
    pick = _PickPlace("akita_black_bowl_1", "plate_1", "on", scripted._Episode(0, 0.0, 0.0))
    view = scripted._View(spatial_scene(plate=plate, extra=[cabinet]))
    cands = pick._candidates(view)
    blocked = pick._blocked_at_destination(view, cands)
    # the pinches on the cabinet's side (straight towards it and the two diagonals) put the hand's far end into it
    assert blocked == {k for k, (_, _, side) in enumerate(cands) if side[1] > 0.5}
    assert choose_grasp(cands, view.obstacles(0, 0.9), np.array([-1.0, 0.0, 0.0]), exclude=blocked) not in blocked
    assert pick._blocked_at_destination(scripted._View(spatial_scene(plate=plate)), cands) == set()


def _box_scene(neighbour_x=None):
    """A cream-cheese box (8 x 4 x 1.8 cm, long side along x) on the table, and maybe a carton 13 cm tall standing
    7 cm off its long side (+y), its centre at x = neighbour_x."""
    origin = np.array([0.0, 0.0, 0.9])
    ents = [("cream_cheese_1", False, origin, [(origin + [0, 0, 0.009], np.eye(3), np.array([0.04, 0.02, 0.009]))])]
    if neighbour_x is not None:
        carton = np.array([neighbour_x, 0.07 + 0.026, 0.9])
        ents.append(("milk_1", False, carton, [(carton + [0, 0, 0.065], np.eye(3), np.array([0.026, 0.026, 0.065]))]))
    return make_scene(ents, [["on", "cream_cheese_1", "plate_1"]])


def test_a_blocked_grasp_across_the_body_is_also_offered_moved_along_the_object():
    """The box's only grasp across its body puts the hand's 21 cm length (along y) into a carton beside its -x half:
    the same grasp moved along the box's long side (up to 2.8 cm: 3 cm, less 1.2 cm of its 4 cm half length) and 1 cm
    along the fingers is offered too, and the grasp chosen is one moved away from the carton with more clearance.
    A free box is offered only the centred grasp."""
    pick = _PickPlace("cream_cheese_1", "plate_1", "on", scripted._Episode(0, 0.0, 0.0))
    free = pick._candidates(scripted._View(_box_scene()))
    assert len(free) == 1 and np.allclose(free[0][0][:2], 0.0)
    view = scripted._View(_box_scene(neighbour_x=-0.04))
    cands = pick._candidates(view)
    points = np.array([p for p, _, _ in cands])
    assert len(cands) == 7 and np.allclose(points[0][:2], 0.0)
    assert np.isclose(points[:, 0].max(), 0.028) and np.isclose(points[:, 0].min(), -0.028)
    assert {round(y, 3) for y in points[:, 1]} == {0.0, 0.01, -0.01}
    obstacles = view.obstacles(0, 0.905)
    k = choose_grasp(cands, obstacles, np.array([-1.0, 0.0, 0.0]))
    assert points[k][0] > 0  # away from the carton
    assert gripper_clearance(points[k], cands[k][1], *obstacles) > gripper_clearance(points[0], cands[0][1], *obstacles)


def test_when_every_grasp_free_at_the_destination_has_failed_the_others_are_tried():
    """The destination check only ranks grasps: with every grasp it left free already failed, the next plan takes
    one it had left out instead of finding none (libero_90 task42 raised on that)."""
    plate = (0.06, 0.2, 0.902)
    cabinet = ("cabinet_1", True, (0.06, 0.40, 1.0), [(np.array([0.06, 0.40, 1.0]), np.eye(3),
                                                       np.array([0.15, 0.1, 0.1]))])
    scene = spatial_scene(plate=plate, extra=[cabinet])
    pick = _PickPlace("akita_black_bowl_1", "plate_1", "on", scripted._Episode(0, 0.0, 0.0))
    view = scripted._View(scene)
    cands = pick._candidates(view)
    blocked = pick._blocked_at_destination(view, cands)
    pick.failed = set(range(len(cands))) - blocked
    assert pick.step(obs_at([-0.2, 0.0, 1.17], scene), view) is not None
    assert pick.grasp[2] in blocked and pick.phase == "approach"
