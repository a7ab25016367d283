"""OpenVLA's frame chain: every step between a camera frame and the model's 224x224 uint8 input frame, in NumPy.

The reference trained on RLDS frames that were JPEG-compressed, resized with TensorFlow's lanczos3 (antialias) to
224 and, for LIBERO, rotated by 180 degrees; its evaluation repeats those steps with TensorFlow, then optionally
center-crops 90% of the area and resizes back with `tf.image.crop_and_resize`. Re-doing them with another library's
resampler (PIL, OpenCV) shifts pixels by several levels, so the resize and the crop here re-implement TensorFlow's
arithmetic (weights, spans, float32, rounding) on NumPy arrays, and the JPEG decode uses the fast integer IDCT as
TensorFlow's does; tests/test_image_chain_tf.py compares the whole chain with TensorFlow's own output.

The chain runs in the simulator workers (FrameChain), which therefore never import torch; the model's side of the
image (per-backbone normalization to pixel values) is openvla/image.py.

Steps, each a function:
  flip_180        LIBERO's camera renders upside down; training frames were rotated, so evaluation rotates too
  jpeg_roundtrip  encode/decode as TF does (quality 95, 4:2:0 chroma, fast integer IDCT): data/jpeg.py
  resize          lanczos3 + antialias to 224, float32, then round-half-even, clip, uint8
  center_crop     sqrt(0.9) of each side, bilinear back to 224, TF's float <-> uint8 conversions
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ..data import jpeg

#: the reference's LIBERO and Bridge image size and its center-crop area fraction
IMAGE_SIZE = 224
CROP_AREA = 0.9
_LANCZOS_RADIUS = 3.0


def flip_180(image: np.ndarray) -> np.ndarray:
    """Rotate an HxWxC frame by 180 degrees (flip both axes), as OpenVLA's LIBERO data and evaluation do."""
    return np.ascontiguousarray(image[::-1, ::-1])


def jpeg_roundtrip(image: np.ndarray, quality: int = jpeg.QUALITY) -> np.ndarray:
    """Encode an HxWx3 uint8 frame as JPEG and decode it back as TensorFlow does (see data/jpeg.py), mimicking the
    RLDS storage of training frames and the reference evaluation's round trip."""
    return jpeg.roundtrip(image, quality)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """TensorFlow's lanczos3 kernel in float32: 3 sin(pi x) sin(pi x / 3) / (pi x)^2, 1 near 0, 0 beyond 3."""
    x = np.abs(x).astype(np.float32)
    pi = np.float32(3.14159265359)  # TF's constant, not math.pi, so float32 weights round the same way
    r = np.float32(_LANCZOS_RADIUS)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = r * np.sin(pi * x) * np.sin(pi * x / r) / (pi * pi * x * x)
    w = np.where(x <= np.float32(1e-3), np.float32(1.0), w)
    return np.where(x > r, np.float32(0.0), w).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float32 weight matrix of TF's scale_and_translate for lanczos3 with antialias and no
    translation: the kernel is stretched by 1/scale when downsampling, truncated at the borders and renormalized."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv_scale = np.float32(1.0) / scale
    kernel_scale = max(inv_scale, np.float32(1.0))
    one_over_kernel_scale = np.float32(1.0) / kernel_scale
    reach = np.float32(_LANCZOS_RADIUS) * kernel_scale
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    for x in range(out_size):
        sample = (np.float32(x) + np.float32(0.5)) * inv_scale
        if sample < 0 or sample > in_size:  # TF leaves such rows empty; cannot happen without translation
            continue
        start = min(max(int(math.ceil(sample - reach - np.float32(0.5))), 0), in_size - 1)
        end = min(max(int(math.floor(sample + reach - np.float32(0.5))), 0), in_size - 1) + 1
        src = np.arange(start, end, dtype=np.float32)
        w = _lanczos3((src + np.float32(0.5) - sample) * one_over_kernel_scale)
        total = np.float32(w.sum(dtype=np.float32))
        if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
            weights[x, start:end] = w * (np.float32(1.0) / total)
    weights.setflags(write=False)  # cached and shared by every call
    return weights


def resize_float(images: np.ndarray, size: int | tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """tf.image.resize(images, size, method="lanczos3", antialias=True): (..., H, W, C) -> float32 (..., h, w, C).

    Like TF, rows are resampled before columns, in float32 matrix products; values may overshoot [0, 255] (lanczos
    rings)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = np.asarray(images, dtype=np.float32)
    *batch, h, w, c = x.shape
    rows = np.matmul(_resize_weights(h, out_h), x.reshape(*batch, h, w * c))  # (..., o, w * c)
    # the columns as one matrix product too: (p, w) @ (..., w, o * c); a product per output row is 3x slower
    columns = np.swapaxes(rows.reshape(*batch, out_h, w, c), -3, -2).reshape(*batch, w, out_h * c)
    out = np.matmul(_resize_weights(w, out_w), columns).reshape(*batch, out_w, out_h, c)
    return np.ascontiguousarray(np.swapaxes(out, -3, -2))


def resize(images: np.ndarray, size: int | tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """The reference's resize_image: lanczos3 resize, round (half to even, like tf.round), clip, uint8."""
    return np.clip(np.round(resize_float(images, size)), 0, 255).astype(np.uint8)


def center_crop(image: np.ndarray, area: float = CROP_AREA) -> np.ndarray:
    """The reference's evaluation center crop for checkpoints trained with random crops: keep the central
    sqrt(area) of each side and resize back to the input size with tf.image.crop_and_resize's bilinear rule.

    uint8 -> float via x * (1/255) and float -> uint8 via saturate_cast(x * 255.5) (TF's convert_image_dtype)."""
    h, w, c = image.shape
    top, bottom, left, right, ylerp, xlerp = _crop_plan(h, w, c, area)
    x = np.asarray(image).reshape(h, w * c).astype(np.float32) * np.float32(1.0 / 255.0)
    x_top, x_bottom = x[top], x[bottom]
    tl, tr = x_top[:, left], x_top[:, right]
    bl, br = x_bottom[:, left], x_bottom[:, right]
    t = tl + (tr - tl) * xlerp
    b = bl + (br - bl) * xlerp
    out = np.clip(t + (b - t) * ylerp, np.float32(0.0), np.float32(1.0))
    return np.clip(out * np.float32(255.5), np.float32(0), np.float32(255)).astype(np.uint8).reshape(h, w, c)


@functools.lru_cache(maxsize=8)
def _crop_plan(h: int, w: int, c: int, area: float):
    """The crop's source rows, source columns (of the frame seen as h x (w * c)) and lerp weights at full size:
    the same per frame, and NumPy is ~10x slower on weights broadcast along a middle axis than on full ones."""
    side = np.float32(min(max(np.sqrt(np.float32(area)), 0.0), 1.0))
    offset = (np.float32(1.0) - side) / np.float32(2.0)
    lo, hi = offset, offset + side  # normalized box, as float32 like TF's tensors; square: same on both axes
    top, bottom, ylerp = _lerp_indices(_crop_coords(lo, hi, h, h))
    left, right, xlerp = _lerp_indices(_crop_coords(lo, hi, w, w))
    channels = np.arange(c)

    def columns(x):
        return (x[:, None] * c + channels).ravel()

    plan = (top, bottom, columns(left), columns(right),
            np.ascontiguousarray(np.broadcast_to(ylerp[:, None], (h, w * c))),
            np.ascontiguousarray(np.broadcast_to(np.repeat(xlerp, c)[None, :], (h, w * c))))
    for array in plan:
        array.setflags(write=False)
    return plan


def _crop_coords(lo: np.float32, hi: np.float32, in_size: int, out_size: int) -> np.ndarray:
    """Source coordinates of crop_and_resize's output samples: lo*(n-1) + i * (hi-lo)*(n-1)/(m-1), in float32."""
    n1 = np.float32(in_size - 1)
    step = (hi - lo) * n1 / np.float32(out_size - 1)
    return (lo * n1 + np.arange(out_size, dtype=np.float32) * step).astype(np.float32)


def _lerp_indices(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.floor(coords)
    return lo.astype(np.int64), np.ceil(coords).astype(np.int64), (coords - lo).astype(np.float32)


def reference_chain(image: np.ndarray, flip: bool, crop: bool, size: int = IMAGE_SIZE) -> np.ndarray:
    """The whole evaluation chain of one HxWx3 uint8 frame -> size x size x 3 uint8, in the reference's order."""
    if flip:
        image = flip_180(image)
    image = resize(jpeg_roundtrip(image), size)
    if crop:
        image = center_crop(image)
    return image


@dataclasses.dataclass(frozen=True)
class FrameChain:
    """reference_chain bound to one policy's settings, as an observation transform that env workers run (see
    policies/capabilities.py, `frame_transform`): each worker prepares its own frame in parallel with the others,
    instead of the policy's process doing every env's JPEG + lanczos one after another (~7-9 ms per frame with the
    crop, benchmarks/bench_frame_chain.py: over 100 ms of every lockstep step with 16 envs). The prepared frame is stored next to the raw one under PREPARED, tagged
    with the chain that made it, so a policy only uses a frame made by its own settings.

    This module imports no torch, so a worker that unpickles a chain stays without it: 268 MiB less private and
    475 MiB less resident memory per simulator worker (benchmarks/bench_worker_memory.py, LIBERO env with one
    camera, same run)."""

    image_key: str
    flip: bool
    crop: bool
    size: int = IMAGE_SIZE

    PREPARED = "vla_bench_prepared_frame"

    def frame(self, observation: dict) -> np.ndarray:
        """The prepared frame of an observation: the worker's when it was made by this chain, else made here."""
        prepared = observation.get(self.PREPARED)
        if prepared is not None and prepared[0] == self:
            return prepared[1]
        return self._prepare(observation)

    def __call__(self, observation: dict) -> dict:
        observation[self.PREPARED] = (self, self._prepare(observation))
        return observation

    def _prepare(self, observation: dict) -> np.ndarray:
        return reference_chain(observation[self.image_key], flip=self.flip, crop=self.crop, size=self.size)
