"""The RLDS/TFDS reader and writer, and Bridge V2 ground truth, on the real debug shard and on written fixtures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vla_bench.data.bridge import (GROUND_TRUTHS, binarize_gripper, bridge_episodes, openvla_ground_truth,
                                   raw_ground_truth)
from vla_bench.data.rlds import RLDSDataset, parse_features_json, write_rlds
from vla_bench.errors import VlaBenchError

from tests.conftest import BRIDGE_DEBUG


@pytest.fixture(scope="module")
def bridge_dir() -> Path:
    return BRIDGE_DEBUG


@pytest.fixture(scope="module")
def episodes(bridge_dir) -> list[dict]:
    return list(RLDSDataset(bridge_dir).episodes("train"))


def test_discovery(bridge_dir):
    ds = RLDSDataset(bridge_dir)  # the parent of 1.0.0 is resolved to its one version directory
    assert (ds.name, ds.version, ds.dir.name) == ("bridge_dataset", "1.0.0", "1.0.0")
    assert set(ds.splits) == {"train", "val"}
    assert ds.split("train").num_episodes == 25
    assert ds.split("train").shards_summary() == "1 of 1 shards present"
    assert ds.split("val").shards_summary() == "0 of 1 shards present"


def test_real_episodes_keys_dtypes_shapes(episodes):
    assert len(episodes) == 25
    for ep in episodes:
        steps, obs = ep["steps"], ep["steps"]["observation"]
        assert set(steps) == {"action", "discount", "is_first", "is_last", "is_terminal", "language_embedding",
                              "language_instruction", "observation", "reward"}
        assert set(obs) == {"image_0", "image_1", "image_2", "image_3", "state"}
        assert set(ep["episode_metadata"]) == {"episode_id", "file_path", "has_image_0", "has_image_1",
                                               "has_image_2", "has_image_3", "has_language"}
        assert steps["action"].shape == (10, 7) and steps["action"].dtype == np.float32
        assert obs["state"].shape == (10, 7) and obs["state"].dtype == np.float32
        assert steps["language_embedding"].shape == (10, 512)
        for name in ("image_0", "image_1", "image_2", "image_3"):
            assert obs[name].shape == (10, 64, 64, 3) and obs[name].dtype == np.uint8
        assert steps["is_first"].dtype == bool and steps["is_first"].tolist() == [True] + [False] * 9
        assert not steps["is_last"].any()  # the debug copy is truncated to 10 steps
        assert steps["discount"].tolist() == [1.0] * 10
        assert obs["image_3"].max() <= 3  # the missing wrist camera is an all-black JPEG
        assert obs["image_0"].std() > 10  # the main camera is a real picture
        assert np.abs(steps["action"][0, :6]).max() < 1e-6 and steps["action"][0, 6] == 1.0
        texts = steps["language_instruction"]
        assert texts.shape == (10,) and all(isinstance(t, str) and t == texts[0] and t for t in texts)
        assert ep["episode_metadata"]["file_path"].startswith("/nfs/kun2/users/homer/datasets/bridge_data_all/")
        assert ep["episode_metadata"]["episode_id"].dtype == np.int32


def test_real_language_strings(episodes):
    texts = [ep["steps"]["language_instruction"][0] for ep in episodes]
    assert texts[0] == "put cup from counter or drying rack into sink"
    assert all(t == t.strip() and len(t) > 5 for t in texts)


def test_feature_selection_decodes_only_what_is_asked(bridge_dir):
    ds = RLDSDataset(bridge_dir)
    ep = next(ds.episodes("train", features=["steps/action", "episode_metadata/file_path"]))
    assert ep["steps"].keys() == {"action"} and ep["episode_metadata"].keys() == {"file_path"}
    with pytest.raises(VlaBenchError, match="unknown feature.*steps/actions.*features: .*steps/action"):
        next(ds.episodes("train", features=["steps/actions"]))


def test_missing_split_says_k_of_n_shards(bridge_dir):
    with pytest.raises(VlaBenchError, match=r"split 'val' .*0 of 1 shards present.*complete splits here: train"):
        next(RLDSDataset(bridge_dir).episodes("val"))


def test_unknown_split_lists_choices(bridge_dir):
    with pytest.raises(VlaBenchError, match=r"split 'test' is not in .*dataset_info.json; splits: train, val"):
        RLDSDataset(bridge_dir).split("test")


def test_not_a_dataset_dir(tmp_path):
    with pytest.raises(VlaBenchError, match="no dataset_info.json"):
        RLDSDataset(tmp_path)


def _copy_debug(bridge_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bridge_dataset" / "1.0.0"
    shutil.copytree(bridge_dir / "1.0.0", target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_truncated_shard_at_record_boundary_is_caught_by_count(bridge_dir, tmp_path):
    target = _copy_debug(bridge_dir, tmp_path)
    shard = next(target.glob("*train.tfrecord*"))
    ds = RLDSDataset(target)
    offsets = [offset for _path, offset, _data in ds.serialized("train")]
    shard.write_bytes(shard.read_bytes()[: offsets[20]])  # 20 whole records: the framing alone cannot tell
    with pytest.raises(VlaBenchError, match="holds 20 episodes, dataset_info.json says 25"):
        list(ds.episodes("train", features=["steps/action"]))


def test_truncated_shard_mid_record_names_offset(bridge_dir, tmp_path):
    target = _copy_debug(bridge_dir, tmp_path)
    shard = next(target.glob("*train.tfrecord*"))
    offsets = [offset for _path, offset, _data in RLDSDataset(target).serialized("train")]
    shard.write_bytes(shard.read_bytes()[: offsets[7] + 5000])
    with pytest.raises(VlaBenchError, match=f"byte offset {offsets[7]}: truncated record data"):
        list(RLDSDataset(target).episodes("train", features=["steps/action"]))


# ------------------------------------------------------------------------------------------------ writer


def _synthetic_episode(rng, steps: int, language: str) -> dict:
    return {
        "steps": {
            "observation": {"image_0": rng.integers(0, 255, (steps, 8, 8, 3), dtype=np.uint8),
                            "state": rng.normal(size=(steps, 7)).astype(np.float32)},
            "action": rng.normal(size=(steps, 7)).astype(np.float32),
            "is_first": np.arange(steps) == 0,
            "language_instruction": np.array([language] * steps, dtype=object),
        },
        "episode_metadata": {"file_path": f"/data/{language}.npy", "episode_id": np.int64(steps)},
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        elif isinstance(a[key], str):
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
            assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype


def test_writer_round_trip_lossless_png_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    train = [_synthetic_episode(rng, steps, f"task {i}") for i, steps in enumerate([3, 5, 1, 4, 2])]
    val = [_synthetic_episode(rng, 6, "held out")]
    root = write_rlds(tmp_path, {"train": train, "val": val}, name="toy", episodes_per_shard=2, image_format="png")
    ds = RLDSDataset(root)
    assert ds.split("train").shard_lengths == (2, 2, 1)
    assert ds.split("train").shards_summary() == "3 of 3 shards present"
    for original, read in zip(train + val, list(ds.episodes("train")) + list(ds.episodes("val"))):
        _assert_same(original, read)
    assert ds.features["steps/observation/image_0"].encoding == "png"


def test_missing_shard_reported_and_partial_read_allowed(tmp_path):
    rng = np.random.default_rng(1)
    train = [_synthetic_episode(rng, 2, f"t{i}") for i in range(4)]
    root = write_rlds(tmp_path, {"train": train}, name="toy", episodes_per_shard=2)
    (root / "toy-train.tfrecord-00001-of-00002").unlink()
    ds = RLDSDataset(root)
    with pytest.raises(VlaBenchError, match=r"1 of 2 shards present \(missing: toy-train.tfrecord-00001-of-00002\)"):
        list(ds.episodes("train"))
    partial = list(ds.episodes("train", allow_missing_shards=True))
    assert [ep["episode_metadata"]["file_path"] for ep in partial] == ["/data/t0.npy", "/data/t1.npy"]


def test_writer_with_real_features_json_mimics_bridge(episodes, bridge_dir, tmp_path):
    features = json.loads((bridge_dir / "1.0.0" / "features.json").read_text())
    root = write_rlds(tmp_path, {"train": episodes[:3]}, name="bridge_dataset", features=features)
    again = list(RLDSDataset(root).episodes("train"))
    assert RLDSDataset(root).features == parse_features_json(features)
    for original, read in zip(episodes[:3], again):
        for key in ("action", "language_embedding", "is_first", "language_instruction"):
            np.testing.assert_array_equal(original["steps"][key], read["steps"][key])
        # images are re-encoded as JPEG: close, not identical
        diff = np.abs(original["steps"]["observation"]["image_0"].astype(int)
                      - read["steps"]["observation"]["image_0"].astype(int))
        assert diff.mean() < 3


# ------------------------------------------------------------------------------------------------ ground truth


@pytest.mark.parametrize("raw, expected", [
    ([1.0, 0.99, 0.5, 0.02, 0.6, 1.0], [1, 1, 0, 0, 1, 1]),  # in-between takes the next decided value
    ([0.0, 0.3, 0.4], [0, 0.4, 0.4]),  # trailing in-between run: the last raw value (OpenVLA's scan carry)
    ([0.96, 0.04, 0.95, 0.05], [1, 0, 0.05, 0.05]),  # 0.95 and 0.05 are in between (strict thresholds)
])
def test_binarize_gripper_hand_cases(raw, expected):
    np.testing.assert_allclose(binarize_gripper(np.array(raw)), expected, atol=1e-7)


def test_openvla_ground_truth_on_real_shard(bridge_dir, episodes):
    gts = list(bridge_episodes(bridge_dir, "train"))
    assert len(gts) == 25 and [g["episode_id"] for g in gts[:2]] == ["train-000000", "train-000001"]
    for gt, ep in zip(gts, episodes):
        state, action = ep["steps"]["observation"]["state"], ep["steps"]["action"]
        assert gt["action"].shape == (8, 7) and gt["image"].shape == (8, 64, 64, 3) and gt["state"].shape == (8, 7)
        # dims 0-5: reached-state deltas of steps 1..8; gripper: binarized recorded command of steps 1..8
        np.testing.assert_allclose(gt["action"][:, :6], state[2:, :6] - state[1:-1, :6], rtol=0, atol=1e-7)
        np.testing.assert_array_equal(gt["action"][:, 6], binarize_gripper(action[1:, 6])[:-1])
        np.testing.assert_array_equal(gt["image"], ep["steps"]["observation"]["image_0"][1:-1])
        assert gt["instruction"] == ep["steps"]["language_instruction"][0]
    grippers = np.concatenate([g["action"][:, 6] for g in gts])
    raw_grippers = np.concatenate([ep["steps"]["action"][1:-1, 6] for ep in episodes])
    assert set(np.unique(grippers)) <= {0.0, 1.0}  # no trailing in-between run in this shard
    assert not set(np.unique(raw_grippers)) <= {0.0, 1.0}  # ... while the recorded command is continuous


def test_raw_ground_truth_is_the_recorded_actions(bridge_dir, episodes):
    gts = list(bridge_episodes(bridge_dir, "train", ground_truth="raw", images=False, max_episodes=4))
    assert len(gts) == 4 and "image" not in gts[0]
    for gt, ep in zip(gts, episodes):
        np.testing.assert_array_equal(gt["action"], ep["steps"]["action"])


def test_unknown_ground_truth_lists_choices(bridge_dir):
    with pytest.raises(VlaBenchError, match="unknown Bridge ground truth 'bridge'; choices: openvla, raw"):
        next(bridge_episodes(bridge_dir, "train", ground_truth="bridge"))


def test_unlabeled_and_short_episodes_are_skipped(tmp_path):
    rng = np.random.default_rng(2)
    eps = [_synthetic_episode(rng, 5, "pick it"), _synthetic_episode(rng, 5, ""), _synthetic_episode(rng, 2, "x"),
           _synthetic_episode(rng, 4, "place it")]
    root = write_rlds(tmp_path, {"val": eps}, name="bridge_dataset", image_format="png")
    gts = list(bridge_episodes(root, "val"))
    assert [(g["episode_id"], g["instruction"], len(g["action"])) for g in gts] == [
        ("val-000000", "pick it", 3), ("val-000003", "place it", 2)]
    assert openvla_ground_truth(eps[1]) is None and raw_ground_truth(eps[1]) is None
    assert set(GROUND_TRUTHS) == {"openvla", "raw"}
