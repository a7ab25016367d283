"""The image chains against TensorFlow's own output (tests/data/tf_image_chain.npz, made by
tools/fixtures/tf_image_chain.py in a throwaway venv: TensorFlow is never a dependency).

The fixtures hold 10 real LIBERO agentview renders (two tasks of each suite) and 10 real Bridge V2 JPEG frames
(the debug shard), with TensorFlow's result of each step of OpenVLA's chains."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vla_bench.data import jpeg
from vla_bench.data.rlds import FeatureSpec, _decode_image
from vla_bench.openvla import frames

FIXTURES = Path(__file__).parent / "data" / "tf_image_chain.npz"
#: the target: within one level of TensorFlow on at least 99.9% of values
WITHIN_ONE_LEVEL = 0.999


@pytest.fixture(scope="module")
def tf_out():
    with np.load(FIXTURES, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def bridge_blobs(tf_out) -> list[bytes]:
    data, offsets = tf_out["bridge_jpeg"], tf_out["bridge_jpeg_offsets"]
    return [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def level_differences(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    return np.abs(ours.astype(np.int16) - theirs.astype(np.int16))


@pytest.mark.parametrize("crop,key", [(False, "libero_resized"), (True, "libero_cropped")])
def test_libero_evaluation_chain_matches_tensorflow(tf_out, crop, key):
    """Flip, JPEG round trip, lanczos3 resize (and the centre crop) of real LIBERO frames land within one level of
    TensorFlow's output on at least 99.9% of values, and never further than one level."""
    ours = np.stack([frames.reference_chain(f, flip=True, crop=crop) for f in tf_out["libero_frames"]])
    diff = level_differences(ours, tf_out[key])
    assert (diff <= 1).mean() >= WITHIN_ONE_LEVEL
    assert diff.max() <= 1


def test_accurate_idct_decode_misses_the_target(tf_out):
    """The yardstick can fail: the same chain decoding with PIL's accurate IDCT (the chain before this fix) is
    further than one level from TensorFlow on far more than 0.1% of LIBERO values."""
    def pil_chain(frame):
        decoded = Image.open(io.BytesIO(jpeg.encode(frames.flip_180(frame)))).convert("RGB")
        return frames.resize(np.asarray(decoded))

    ours = np.stack([pil_chain(f) for f in tf_out["libero_frames"]])
    diff = level_differences(ours, tf_out["libero_resized"])
    assert (diff > 1).mean() > 0.05


def test_bridge_jpeg_decode_equals_tensorflows(tf_out):
    """Stored Bridge V2 JPEGs decode to exactly TensorFlow's pixels, through the RLDS reader's image decoding."""
    spec = FeatureSpec("steps/observation/image_0", "image", "uint8", (256, 256, 3), True, "jpeg")
    decoded = np.stack([_decode_image(blob, spec, "fixture") for blob in bridge_blobs(tf_out)])
    assert np.array_equal(decoded, tf_out["bridge_decoded"])


@pytest.mark.parametrize("crop,key", [(False, "bridge_resized"), (True, "bridge_cropped")])
def test_bridge_chain_matches_tensorflow(tf_out, crop, key):
    """Bridge frames decoded, resized to 224 (and centre-cropped) land within one level of TensorFlow on at least
    99.9% of values."""
    ours = frames.resize(np.stack([jpeg.decode(b) for b in bridge_blobs(tf_out)]))
    if crop:
        ours = np.stack([frames.center_crop(f) for f in ours])
    diff = level_differences(ours, tf_out[key])
    assert (diff <= 1).mean() >= WITHIN_ONE_LEVEL
    assert diff.max() <= 1


def test_decode_refuses_data_that_is_not_jpeg():
    """Bytes that are not a JPEG raise ValueError (the RLDS reader turns it into an error naming the feature)."""
    with pytest.raises(ValueError):
        jpeg.decode(b"\xff\xd8 not really a jpeg")
