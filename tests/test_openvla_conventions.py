"""Property tests of OpenVLA's conventions: action bins, normalization, gripper, prompt, image chain.

Each test's docstring states the invariant it checks as a plain sentence.
"""
from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vla_bench.errors import VlaBenchError
from vla_bench.openvla import action_tokenizer as at
from vla_bench import gripper
from vla_bench.openvla import frames, image, normalization, prompt

LLAMA_VOCAB = 32000
HALF_BIN = 1.0 / 255.0
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
unit = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False)
vocab = st.integers(min_value=300, max_value=200_000)


# ---- action tokenizer ---------------------------------------------------------------------------------------------
@given(hnp.arrays(np.float64, st.integers(1, 16), elements=unit), vocab)
def test_round_trip_error_is_at_most_half_a_bin(actions, vocab_size):
    """Encoding then decoding any action in [-1, 1] moves it by at most half a bin width (1/255)."""
    back = at.decode(at.encode(actions, vocab_size), vocab_size)
    assert np.all(np.abs(back - actions) <= HALF_BIN + 1e-12)


@given(hnp.arrays(np.float64, st.integers(1, 16), elements=finite), vocab)
def test_ids_fall_in_the_last_256_of_the_vocabulary(actions, vocab_size):
    """Any finite action, inside [-1, 1] or not, encodes to one of the last 256 ids of the base vocabulary."""
    ids = at.encode(actions, vocab_size)
    assert np.all((ids >= vocab_size - 256) & (ids <= vocab_size - 1))
    assert np.all(at.is_action_token(ids, vocab_size))


@given(st.lists(st.integers(min_value=-300, max_value=300), min_size=2, max_size=20), vocab)
def test_decode_is_monotone_and_bounded(offsets, vocab_size):
    """A larger token id never decodes to a larger value, and every id, action or not, decodes inside [-1, 1]."""
    ids = np.sort(vocab_size - 1 - np.asarray(offsets) + 128)
    values = at.decode(ids, vocab_size)
    assert np.all(np.diff(values) <= 0)
    assert np.all(np.abs(values) < 1.0)


@given(unit, unit)
def test_encode_is_monotone(a, b):
    """A larger action never gets a larger token id (ids count down from the end of the vocabulary)."""
    lo, hi = min(a, b), max(a, b)
    assert at.encode(lo, LLAMA_VOCAB) >= at.encode(hi, LLAMA_VOCAB)


def test_worked_values_of_the_reference():
    """The reference's worked table: -1 -> 31999, 0 -> 31872, 0.5 -> 31808, 0.99 -> 31746, 0.999 -> 31745 and
    1.0 -> 31744, with 31744 and 31745 both decoding to the top centre 0.996078."""
    a = np.array([-1.0, 0.0, 0.5, 0.99, 0.999, 1.0])
    ids = at.encode(a, LLAMA_VOCAB)
    assert ids.tolist() == [31999, 31872, 31808, 31746, 31745, 31744]
    np.testing.assert_allclose(at.decode(ids, LLAMA_VOCAB),
                               [-0.996078, 0.0, 0.501961, 0.988235, 0.996078, 0.996078], atol=1e-6)
    assert len(at.BIN_CENTERS) == 255 and not at.is_action_token(31743, LLAMA_VOCAB)


# ---- normalization ------------------------------------------------------------------------------------------------
@st.composite
def stats_and_actions(draw):
    d = draw(st.integers(1, 8))
    q01 = np.array(draw(st.lists(st.floats(-10, 10), min_size=d, max_size=d)))
    width = np.array(draw(st.lists(st.floats(1e-2, 10), min_size=d, max_size=d)))
    mask = np.array(draw(st.lists(st.booleans(), min_size=d, max_size=d)))
    x = np.array(draw(st.lists(st.floats(-30, 30), min_size=d, max_size=d)))
    return q01, q01 + width, mask, x


@given(stats_and_actions())
def test_unnormalize_inverts_normalize_inside_bounds_clips_outside_and_passes_unmasked(case):
    """unnormalize(normalize(x)) is x on masked dims inside [q01, q99], clip(x, q01, q99) outside, and unmasked
    dims pass through both directions untouched."""
    q01, q99, mask, x = case
    n = normalization.normalize(x, q01, q99, mask)
    back = normalization.unnormalize(n, q01, q99, mask)
    expected = np.where(mask, np.clip(x, q01, q99), x)
    assert np.all(np.abs(back - expected) <= 1e-6 * (1 + np.abs(q99 - q01)))
    assert np.all(np.abs(n[mask]) <= 1.0)
    assert np.array_equal(n[~mask], x[~mask]) and np.array_equal(back[~mask], n[~mask])


def test_unknown_unnorm_key_lists_the_present_ones():
    """An unnorm_key that the stats lack is refused with the keys that are present; no key needs exactly one."""
    one = {"action": {"q01": [0], "q99": [1]}}
    stats = {"bridge_orig": one, "libero_spatial": one}
    with pytest.raises(VlaBenchError, match="bridge_orig, libero_spatial"):
        normalization.action_stats(stats, "nope")
    with pytest.raises(VlaBenchError, match="set unnorm_key"):
        normalization.action_stats(stats, None)
    assert normalization.action_stats({"only": stats["bridge_orig"]}, None)["mask"].tolist() == [True]


# ---- gripper ------------------------------------------------------------------------------------------------------
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.just(7)), elements=finite))
def test_libero_gripper_maps_to_plus_minus_one_open_is_minus_one(actions):
    """The LIBERO gripper transform sends any value to -1 or +1: dataset-open (above 0.5) becomes -1 (LIBERO open),
    dataset-closed (below 0.5) becomes +1 (close); the arm dims are untouched."""
    out = gripper.postprocess(actions, gripper.OPEN_IS_MINUS_1)
    g = actions[:, -1]
    assert set(np.unique(out[:, -1])) <= {-1.0, 1.0}
    assert np.all(out[g > 0.5, -1] == -1.0) and np.all(out[g < 0.5, -1] == 1.0)
    assert np.array_equal(out[:, :6], actions[:, :6])


def test_libero_gripper_on_decoded_bin_centres():
    """The decoded open label (0.996) gives -1 and the decoded closed label (0.0) gives +1, as in the reference."""
    g = at.decode(at.encode(np.array([1.0, 0.0]), LLAMA_VOCAB), LLAMA_VOCAB)
    out = gripper.postprocess(np.c_[np.zeros((2, 6)), g], gripper.OPEN_IS_MINUS_1)
    assert out[:, -1].tolist() == [-1.0, 1.0]


@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.just(7)), elements=finite))
def test_bridge_gripper_is_unchanged(actions):
    """Bridge actions go to the robot as predicted."""
    assert np.array_equal(gripper.postprocess(actions, gripper.OPEN_IS_1), actions)


# ---- prompt -------------------------------------------------------------------------------------------------------
def test_prompt_templates():
    """The OpenVLA prompt lowercases the instruction and ends at "Out:" with no trailing space; v0.1 is Vicuna's."""
    assert prompt.build_prompt("Put the Bowl on the Stove") == (
        "In: What action should the robot take to put the bowl on the stove?\nOut:")
    v01 = prompt.build_prompt("Open the drawer", "openvla-v01")
    assert v01.startswith("A chat between a curious user") and v01.endswith(
        "USER: What action should the robot take to open the drawer? ASSISTANT:")
    with pytest.raises(ValueError, match="openvla, openvla-v01"):
        prompt.build_prompt("x", "llava")


# ---- image chain --------------------------------------------------------------------------------------------------
images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)))


@settings(deadline=None)
@given(images)
def test_flip_twice_is_identity(img):
    """Rotating a frame by 180 degrees twice gives the frame back, and once moves pixel (0, 0) to (H-1, W-1)."""
    once = frames.flip_180(img)
    assert np.array_equal(frames.flip_180(once), img)
    assert np.array_equal(once[-1, -1], img[0, 0])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 320), st.integers(1, 320), st.integers(0, 255), st.integers(0, 2**31 - 1))
def test_resize_shape_dtype_range_for_any_size(h, w, level, seed):
    """Resizing any HxWx3 uint8 frame gives a 224x224x3 uint8 frame, and a constant frame stays exactly constant
    (the lanczos weights of every output pixel sum to one)."""
    rng = np.random.default_rng(seed)
    noisy = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = frames.resize(noisy)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    flat = frames.resize(np.full((h, w, 3), level, np.uint8))
    assert np.all(flat == level)


@settings(max_examples=20, deadline=None)
@given(st.integers(64, 256), st.integers(64, 256), st.integers(0, 2**31 - 1))
def test_jpeg_round_trip_error_is_bounded_on_smooth_frames(h, w, seed):
    """A smooth frame survives the JPEG round trip with mean error under 4 levels, and its size and dtype are
    kept; a constant colour comes back within 2 levels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    out = frames.jpeg_roundtrip(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 4.0
    flat = np.broadcast_to(small[0, 0], (h, w, 3)).copy()
    assert np.abs(frames.jpeg_roundtrip(flat).astype(int) - flat).max() <= 2


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 255))
def test_center_crop_keeps_size_and_constant_frames(level):
    """The 90%-area center crop returns a frame of the same size, and a constant frame keeps its exact level
    through TF's uint8 -> float -> uint8 (x 255.5, truncate) conversions."""
    out = frames.center_crop(np.full((224, 224, 3), level, np.uint8))
    assert out.shape == (224, 224, 3) and np.all(out == level)


def test_center_crop_samples_the_central_box():
    """The crop's corners sample the box edges at (1 - sqrt(0.9)) / 2 of the side: a horizontal ramp 0..223 maps
    to a ramp from about 5.7 to 217.3."""
    ramp = np.broadcast_to(np.arange(224, dtype=np.uint8)[None, :, None], (224, 224, 3)).copy()
    out = frames.center_crop(ramp)[0, :, 0].astype(float)
    off = (1 - math.sqrt(0.9)) / 2 * 223
    assert abs(out[0] - off) <= 1 and abs(out[-1] - (223 - off)) <= 1
    assert np.all(np.diff(out) >= 0)


def test_the_frame_chain_runs_without_torch():
    """A process that receives an OpenVLA frame chain (as every simulator worker does) and prepares a frame with it
    never imports torch: torch would cost each worker ~0.27 GB of private memory (benchmarks/bench_worker_memory.py)."""
    code = textwrap.dedent("""
        import pickle, sys
        import numpy as np
        chain = pickle.loads(CHAIN)
        obs = chain({"agentview_image": np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)})
        assert chain.frame(obs).shape == (224, 224, 3)
        assert "torch" not in sys.modules, "torch was imported"
        print("OK")
    """).replace("CHAIN", repr(pickle.dumps(frames.FrameChain("agentview_image", flip=True, crop=True))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _tf_lanczos3_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """A float64, loop-by-loop transcription of TensorFlow's scale_and_translate (lanczos3, antialias, no
    translation): per output sample, the span of source pixels within the stretched kernel, kernel weights
    renormalized over the span, rows first and then columns."""
    def weights(n_in, n_out):
        scale = n_out / n_in
        kscale = max(1.0 / scale, 1.0)
        m = np.zeros((n_out, n_in))
        for x in range(n_out):
            centre = (x + 0.5) / scale
            start = min(max(math.ceil(centre - 3 * kscale - 0.5), 0), n_in - 1)
            end = min(max(math.floor(centre + 3 * kscale - 0.5), 0), n_in - 1) + 1
            for j in range(start, end):
                t = abs((j + 0.5 - centre) / kscale)
                if t <= 1e-3:
                    m[x, j] = 1.0
                elif t <= 3:
                    m[x, j] = 3 * math.sin(math.pi * t) * math.sin(math.pi * t / 3) / (math.pi * t) ** 2
            m[x] /= m[x].sum()
        return m

    rows = np.einsum("oh,hwc->owc", weights(img.shape[0], out_h), img.astype(np.float64))
    return np.einsum("pw,owc->opc", weights(img.shape[1], out_w), rows)


@pytest.mark.parametrize("size", [(256, 256), (180, 320), (100, 100)])
def test_resize_matches_the_tensorflow_reference(size):
    """Against a float64 transcription of TF's lanczos3 kernel, the float output is within 0.02 levels and the
    uint8 output differs on under 0.2% of values, by one level at most (float32 rounding near a .5 boundary)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ref = _tf_lanczos3_reference(img, 224, 224)
    got = frames.resize_float(img)
    assert np.abs(got - ref).max() < 0.02
    ref_u8 = np.clip(np.round(ref), 0, 255).astype(np.int64)
    diff = np.abs(frames.resize(img).astype(np.int64) - ref_u8)
    assert diff.max() <= 1 and diff.mean() < 0.002


def test_pixel_values_layout_and_ranges():
    """Fused pixel values are [B, 6, 224, 224]: channels 0-2 DINOv2-normalized (ImageNet mean/std, so white is
    (1 - 0.485) / 0.229 = 2.249 in red), channels 3-5 SigLIP-normalized to [-1, 1]."""
    ids = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")
    white, black = np.full((224, 224, 3), 255, np.uint8), np.zeros((224, 224, 3), np.uint8)
    pv = image.to_pixel_values([white, black], ids).numpy()
    assert pv.shape == (2, 6, 224, 224)
    np.testing.assert_allclose(pv[0, :3, 0, 0], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
                               rtol=1e-6)
    np.testing.assert_allclose(pv[1, :3, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    assert np.all(pv[0, 3:] == 1.0) and np.all(pv[1, 3:] == -1.0)
    with pytest.raises(ValueError, match="224"):
        image.to_pixel_values([np.zeros((256, 256, 3), np.uint8)], ids)
