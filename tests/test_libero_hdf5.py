"""LIBERO's HDF5 demo layout: writer round trip, language lookup, demo order, ground truth, errors."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from vla_bench.data.libero_hdf5 import (language_from_filename, libero_episodes, read_libero_demos,
                                        write_libero_demos)
from vla_bench.errors import VlaBenchError


def make_demo(rng, steps: int, size: int = 16) -> dict:
    return {
        "actions": np.clip(rng.normal(scale=0.4, size=(steps, 7)), -1, 1),
        "obs": {"agentview_rgb": rng.integers(0, 255, (steps, size, size, 3), dtype=np.uint8),
                "eye_in_hand_rgb": rng.integers(0, 255, (steps, size, size, 3), dtype=np.uint8),
                "ee_states": rng.normal(size=(steps, 6)), "gripper_states": rng.normal(size=(steps, 2)),
                "joint_states": rng.normal(size=(steps, 7))},
        "states": rng.normal(size=(steps, 20)),
        "robot_states": rng.normal(size=(steps, 9)),
        "init_state": rng.normal(size=20),
    }


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    demos = [make_demo(rng, n) for n in (5, 3, 7)]
    path = write_libero_demos(tmp_path / "task_demo.hdf5", demos, "put the bowl on the plate",
                              problem_name="libero_tabletop_manipulation", compress_images=True)
    read = list(read_libero_demos(path))
    assert len(read) == 3
    for demo, episode in zip(demos, read):
        steps, obs = episode["steps"], episode["steps"]["observation"]
        np.testing.assert_allclose(steps["action"], demo["actions"].astype(np.float32))
        for name, value in demo["obs"].items():
            np.testing.assert_array_equal(obs[name], value)
        np.testing.assert_array_equal(steps["sim_state"], demo["states"])
        assert steps["is_last"].tolist() == [False] * (len(demo["actions"]) - 1) + [True]
        assert list(steps["language_instruction"]) == ["put the bowl on the plate"] * len(demo["actions"])
        assert episode["episode_metadata"]["problem_name"] == "libero_tabletop_manipulation"
        np.testing.assert_array_equal(episode["episode_metadata"]["init_state"], demo["init_state"])
    with h5py.File(path) as f:  # the attributes LIBERO's own loaders read
        assert json.loads(f["data"].attrs["problem_info"])["language_instruction"] == "put the bowl on the plate"
        assert f["data"].attrs["num_demos"] == 3 and f["data"].attrs["total"] == 15
        assert f["data/demo_1"].attrs["num_samples"] == 3


def test_images_can_be_left_on_disk(tmp_path):
    path = write_libero_demos(tmp_path / "t.hdf5", [make_demo(np.random.default_rng(1), 4)], "x")
    episode = next(read_libero_demos(path, images=False))
    assert "agentview_rgb" not in episode["steps"]["observation"]
    assert "ee_states" in episode["steps"]["observation"]


def test_demos_in_numeric_order(tmp_path):
    rng = np.random.default_rng(2)
    path = write_libero_demos(tmp_path / "t.hdf5", [make_demo(rng, n) for n in range(1, 13)], "x")
    lengths = [len(ep["steps"]["action"]) for ep in read_libero_demos(path)]
    assert lengths == list(range(1, 13))  # demo_2 before demo_10
    assert [len(ep["action"]) for ep in libero_episodes(path, max_episodes=3)] == [1, 2, 3]


@pytest.mark.parametrize("name, expected", [
    ("KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5", "turn on the stove"),
    ("pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate_demo.hdf5",
     "pick up the black bowl between the plate and the ramekin and place it on the plate"),
    ("LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket_demo.hdf5",
     "put both the alphabet soup and the tomato sauce in the basket"),
])
def test_language_from_filename(name, expected):
    assert language_from_filename(name) == expected


def test_language_falls_back_to_filename_without_problem_info(tmp_path):
    path = write_libero_demos(tmp_path / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5",
                              [make_demo(np.random.default_rng(3), 2)], "")
    assert next(libero_episodes(path))["instruction"] == "open the drawer"
    with h5py.File(path, "a") as f:
        del f["data"].attrs["problem_info"]
    assert next(libero_episodes(path))["instruction"] == "open the drawer"


def test_ground_truth_episode(tmp_path):
    demo = make_demo(np.random.default_rng(4), 6)
    path = write_libero_demos(tmp_path / "task_demo.hdf5", [demo], "stack the cubes")
    gt = next(libero_episodes([path]))
    assert gt["episode_id"] == "task_demo/demo_0" and gt["instruction"] == "stack the cubes"
    np.testing.assert_array_equal(gt["image"], demo["obs"]["agentview_rgb"])
    np.testing.assert_array_equal(gt["wrist_image"], demo["obs"]["eye_in_hand_rgb"])
    np.testing.assert_allclose(gt["state"], np.concatenate([demo["obs"]["ee_states"], demo["obs"]["gripper_states"]],
                                                           axis=1).astype(np.float32))
    assert gt["state"].shape == (6, 8)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(VlaBenchError, match="missing.hdf5 does not exist"):
        next(read_libero_demos(tmp_path / "missing.hdf5"))
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f.create_group("episodes")
    with pytest.raises(VlaBenchError, match="other.hdf5 has no 'data' group.*episodes"):
        next(read_libero_demos(other))
    text = tmp_path / "text.hdf5"
    text.write_text("not hdf5")
    with pytest.raises(VlaBenchError, match="text.hdf5 is not a readable HDF5 file"):
        next(read_libero_demos(text))
    with pytest.raises(VlaBenchError, match="obs/agentview_rgb has 2 steps, actions has 3"):
        write_libero_demos(tmp_path / "bad.hdf5", [{"actions": np.zeros((3, 7)),
                                                    "obs": {"agentview_rgb": np.zeros((2, 4, 4, 3), np.uint8)}}], "x")
