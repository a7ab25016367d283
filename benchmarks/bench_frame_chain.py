"""OpenVLA's frame chain per LIBERO frame (flip, JPEG round trip, lanczos3 resize, centre crop), as simulator workers
run it: openvla/frames.py (NumPy) against the torch resize and crop it replaced (the baseline, kept here only to be
measured), in the same run, one thread each, on the real LIBERO renders of tests/data/tf_image_chain.npz.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_frame_chain.py --benchmark-only \
        --benchmark-group-by=group
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vla_bench.openvla import frames

FIXTURES = Path(__file__).parents[1] / "tests" / "data" / "tf_image_chain.npz"


def torch_resize(image: np.ndarray) -> np.ndarray:
    """The resize as it was computed with torch (same weights, einsum in float32)."""
    import torch

    x = torch.from_numpy(np.array(image, dtype=np.float32))
    wh = torch.from_numpy(frames._resize_weights(x.shape[-3], frames.IMAGE_SIZE).copy())
    ww = torch.from_numpy(frames._resize_weights(x.shape[-2], frames.IMAGE_SIZE).copy())
    x = torch.einsum("pw,...owc->...opc", ww, torch.einsum("oh,...hwc->...owc", wh, x))
    return np.clip(np.round(x.numpy()), 0, 255).astype(np.uint8)


def torch_center_crop(image: np.ndarray) -> np.ndarray:
    """The centre crop as it was computed with torch (broadcast lerp weights, gathers per corner)."""
    import torch

    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32) * torch.tensor(1.0 / 255.0)
    side = np.float32(np.sqrt(np.float32(frames.CROP_AREA)))
    lo = (np.float32(1.0) - side) / np.float32(2.0)
    top, bottom, ylerp = map(torch.from_numpy, frames._lerp_indices(frames._crop_coords(lo, lo + side, h, h)))
    left, right, xlerp = map(torch.from_numpy, frames._lerp_indices(frames._crop_coords(lo, lo + side, w, w)))
    ylerp, xlerp = ylerp[:, None, None], xlerp[None, :, None]
    tl, tr, bl, br = x[top][:, left], x[top][:, right], x[bottom][:, left], x[bottom][:, right]
    t = tl + (tr - tl) * xlerp
    b = bl + (br - bl) * xlerp
    out = (t + (b - t) * ylerp).clamp(0.0, 1.0)
    return torch.clamp(out * 255.5, 0, 255).to(torch.uint8).numpy()


def torch_chain(image: np.ndarray) -> np.ndarray:
    return torch_center_crop(torch_resize(frames.jpeg_roundtrip(frames.flip_180(image))))


def numpy_chain(image: np.ndarray) -> np.ndarray:
    return frames.reference_chain(image, flip=True, crop=True)


@pytest.fixture(scope="module")
def libero_frames():
    import torch

    torch.set_num_threads(1)  # as in a worker
    with np.load(FIXTURES) as data:
        return list(data["libero_frames"])


@pytest.mark.parametrize("chain", [numpy_chain, torch_chain], ids=["numpy-now", "torch-baseline"])
def test_frame_chain(benchmark, chain, libero_frames):
    benchmark.group = "OpenVLA frame chain, 10 LIBERO frames, crop"
    out = benchmark(lambda: [chain(f) for f in libero_frames])
    same = [numpy_chain(f) for f in libero_frames]
    # the two chains agree: the crop bit for bit, the resize in a handful of values at rounding boundaries
    assert sum(int((a != b).sum()) for a, b in zip(out, same)) <= 10
