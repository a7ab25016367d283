"""The scripted expert's skills beyond pick-and-place (vla_bench/policies/skills): their geometry, their choice from
the goal predicates, LIBERO's open/closed rule against LIBERO's own fixture classes, and closed-loop episodes of
the tasks they newly solve (no cameras, a few init states)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_bench.policies import skills
from vla_bench.policies.scripted import _View
from vla_bench.policies.skills.drawer import _Drawer, hand_frame, is_reached, open_sign
from vla_bench.policies.skills.push import _Push, push_skill


def _fixture_classes():
    from libero.libero.envs.objects.articulated_objects import Microwave, ShortCabinet, WhiteCabinet, WoodenCabinet

    return [WoodenCabinet(), WhiteCabinet(), ShortCabinet(), Microwave()]


FIXTURES = _fixture_classes()


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda f: type(f).__name__)
@settings(max_examples=200, deadline=None)
@given(q=st.floats(-2.5, 2.5, allow_nan=False))
def test_open_and_closed_agree_with_libero_for_every_joint_position(fixture, q):
    """For any joint position, is_reached(q, "open" / "close") says what the LIBERO fixture's own is_open / is_close
    says (the goal predicates Open / Close call these)."""
    ranges = fixture.object_properties["articulation"]
    assert is_reached(q, "open", ranges) == fixture.is_open(q)
    assert is_reached(q, "close", ranges) == fixture.is_close(q)


def test_open_sign_follows_the_ranges():
    assert open_sign({"default_open_ranges": [-0.16, -0.14], "default_close_ranges": [0.0, 0.005]}) == -1.0
    assert open_sign({"default_open_ranges": [0.10, 0.16], "default_close_ranges": [-0.005, 0.0]}) == 1.0


@settings(max_examples=100, deadline=None)
@given(angle=st.floats(-np.pi, np.pi), tilt=st.floats(-1.0, 1.0))
def test_hand_frame_is_a_rotation_pointing_where_asked(angle, tilt):
    """For any horizontal direction and any finger axis not along it, hand_frame is a proper rotation whose approach
    axis (z) is that direction and whose finger axis (y) lies in the plane of the asked finger axis and z."""
    into = np.array([np.cos(angle), np.sin(angle), 0.0])
    fingers = np.array([-np.sin(angle) * tilt, np.cos(angle) * tilt, 1.0])
    R = hand_frame(into, fingers)
    assert np.allclose(R.T @ R, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(R), 1.0)
    assert np.allclose(R[:, 2], into, atol=1e-9)
    assert abs(np.dot(np.cross(into, fingers), R[:, 1])) < 1e-9 and np.dot(R[:, 1], fingers) > 0


# ---- planning from the goal predicates, on a synthetic scene ---------------------------------------------------
def scene(plate_height=0.019, plate_width=0.139, drawer_q=0.0):
    """A plate on a table and a cabinet with one drawer (its region site on the drawer)."""
    names = ["plate_1", "cabinet_1"]
    half = np.array([[plate_width / 2, plate_width / 2, plate_height / 2], [0.1, 0.1, 0.1]])
    pos = np.array([[0.0, 0.0, 0.9 + plate_height / 2], [0.3, 0.0, 1.0]])
    return {
        "names": names, "is_fixture": np.array([False, True]), "pos": pos, "mat": np.stack([np.eye(3)] * 2),
        "geom_owner": np.array([0, 1]), "geom_body": np.array([10, 11]), "geom_pos": pos.copy(),
        "geom_mat": np.stack([np.eye(3)] * 2), "geom_half": half,
        "sites": {"front_region": {"pos": np.array([0.0, 0.2, 0.9]), "half": np.array([0.04, 0.04, 0.007])},
                  "cabinet_1_drawer_region": {"pos": np.array([0.3, 0.0, 1.0]), "half": np.full(3, 0.05)}},
        "site_joints": {"cabinet_1_drawer_region": ["cabinet_1_drawer"]},
        "articulations": {"cabinet_1_drawer": {"qpos": drawer_q, "axis": np.array([0.0, -1.0, 0.0]),
                                               "anchor": np.zeros(3), "body": 11, "type": "slide",
                                               "owner": "cabinet_1", "range": np.array([-0.16, 0.01])}},
        "articulation_ranges": {"cabinet_1": {"default_open_ranges": [-0.16, -0.14],
                                              "default_close_ranges": [0.0, 0.005]}},
    }


def test_open_and_close_predicates_get_the_drawer_skill_in_order():
    view = _View(scene())
    (opening,) = skills.skills_for(["open", "cabinet_1_drawer_region"], view, None)
    (closing,) = skills.skills_for(["close", "cabinet_1_drawer_region"], view, None)
    assert isinstance(opening, _Drawer) and opening.want == "open" and closing.want == "close"
    assert skills.order_key(opening) < skills.order_key(object()) < skills.order_key(closing)
    assert skills.skills_for(["open", "front_region"], view, None) == []  # no joint moves it


def test_putting_something_in_a_closed_drawer_opens_it_first():
    (first,) = skills.prerequisites(["in", "plate_1", "cabinet_1_drawer_region"], _View(scene()), None)
    assert isinstance(first, _Drawer) and first.want == "open"
    assert skills.prerequisites(["in", "plate_1", "cabinet_1_drawer_region"], _View(scene(drawer_q=-0.15)),
                                None) == []  # already open
    assert skills.prerequisites(["on", "plate_1", "front_region"], _View(scene()), None) == []


def test_only_flat_wide_objects_going_to_a_table_region_are_pushed():
    assert isinstance(push_skill(["on", "plate_1", "front_region"], _View(scene()), None), _Push)
    assert push_skill(["on", "plate_1", "front_region"], _View(scene(plate_height=0.05)), None) is None  # a bowl
    assert push_skill(["on", "plate_1", "front_region"], _View(scene(plate_width=0.05)), None) is None  # graspable
    assert push_skill(["on", "plate_1", "cabinet_1_drawer_region"], _View(scene()), None) is None  # not on the table


# ---- closed loop -----------------------------------------------------------------------------------------------
@pytest.mark.sim
@pytest.mark.parametrize("suite, task", [("libero_goal", "task1")])
def test_the_expert_solves_the_newly_solved_tasks(project, tmp_path, suite, task):
    """Two episodes of each task a new skill solves (libero_goal task1: open the middle drawer), no cameras."""
    result = project.run(f"suites/{suite}", "-k", task, "--checkpoint", "expert", "--episodes", "2",
                         "--vla-workers", "1", "--vla-results", str(tmp_path / "r.sqlite"), "-q")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(rf"{suite}\s+│\s+{task}\s+│\s+expert\s+│\s+2/2", output), output


def test_things_go_into_a_drawer_towards_its_open_side():
    view = _View(scene())  # the drawer's slide axis is -y and it opens towards negative joint positions: +y
    assert np.allclose(skills.place_offset("cabinet_1_drawer_region", view), [0.0, skills.DRAWER_FRONT_BIAS])
    assert skills.place_offset("front_region", view) is None
