"""The published fine-tuning image augmentation (OpenVLA `image_aug=True`, dlimp's augment ops), batched in torch.

Order and parameters (OPENVLA.md §5, dlimp/augmentations.py):
    random_resized_crop  area scale 0.9, aspect ratio 1: a square of side sqrt(0.9) at a uniform random offset,
                         resized back with tf.image.crop_and_resize's bilinear sampling
    random_brightness    + delta, delta ~ U[-0.2, 0.2]
    random_contrast      (x - mean) * f + mean per image and channel, f ~ U[0.8, 1.2]
    random_saturation    HSV saturation * f (clipped to [0, 1]), f ~ U[0.8, 1.2]
    random_hue           HSV hue + delta (mod 1), delta ~ U[-0.05, 0.05]
Work is in float [0, 1] with a clip after every op, and the result goes back to uint8 with TF's
convert_image_dtype rule (x * 255.5, saturate, truncate), as dlimp does before the processor normalizes.

The random parameters are drawn on the CPU from a torch.Generator the caller seeds per sample, so a sample's
augmentation depends only on (seed, epoch, index): a resumed run augments exactly as an uninterrupted one, and the
pixel work itself runs batched on whatever device the frames are on (the GPU during training).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_area: float = 0.9  # fraction of the image area kept by the random crop (1.0: no crop)
    brightness: float = 0.2  # max |delta|
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05  # max |delta| in turns of the colour wheel


PUBLISHED = AugmentConfig()


def sample_params(config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One sample's parameters as a float64 vector [offset_y, offset_x, brightness, contrast, saturation, hue],
    drawn in the reference's order from `generator`."""
    side = min(math.sqrt(config.crop_area), 1.0)
    u = torch.rand(6, generator=generator, dtype=torch.float64)
    return torch.stack([u[0] * (1.0 - side), u[1] * (1.0 - side),
                        (2 * u[2] - 1) * config.brightness,
                        config.contrast[0] + u[3] * (config.contrast[1] - config.contrast[0]),
                        config.saturation[0] + u[4] * (config.saturation[1] - config.saturation[0]),
                        (2 * u[5] - 1) * config.hue])


def crop_and_resize(x: torch.Tensor, offsets: torch.Tensor, side: float) -> torch.Tensor:
    """(B, C, H, W) -> same shape: the normalized square box [oy, ox, oy + side, ox + side] of each image sampled
    bilinearly on an HxW grid. tf.image.crop_and_resize samples row i at y1 (H-1) + i (y2-y1)(H-1)/(H-1); with
    align_corners=True grid_sample maps g in [-1, 1] to pixel (g+1)(H-1)/2, so g = 2 y - 1 is the same point."""
    b, _, h, w = x.shape
    steps_y = torch.linspace(0.0, 1.0, h, device=x.device, dtype=torch.float32)
    steps_x = torch.linspace(0.0, 1.0, w, device=x.device, dtype=torch.float32)
    off = offsets.to(x.device, torch.float32)
    ys = off[:, :1] + side * steps_y.unsqueeze(0)  # (B, H) normalized source rows
    xs = off[:, 1:] + side * steps_x.unsqueeze(0)  # (B, W)
    grid = torch.stack([(2 * xs - 1).unsqueeze(1).expand(b, h, w), (2 * ys - 1).unsqueeze(2).expand(b, h, w)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 1) (TF's rgb_to_hsv)."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    mn, _ = x.min(1)
    delta = v - mn
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    safe = delta.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack([torch.remainder(h, 1.0), s, v], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    # the standard piecewise-linear form: channel k = v - v s clamp(min(t, 4 - t), 0, 1), t = (k + h6) mod 6
    out = []
    for k in (5.0, 3.0, 1.0):
        t = torch.remainder(k + h6, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(t, 4.0 - t), 0.0, 1.0))
    return torch.stack(out, 1)


def apply(x: torch.Tensor, params: torch.Tensor, config: AugmentConfig = PUBLISHED) -> torch.Tensor:
    """Augment a float (B, 3, H, W) batch in [0, 1] with per-sample params (B, 6) from sample_params."""
    p = params.to(x.device, torch.float32)
    if config.crop_area < 1.0:
        x = crop_and_resize(x, p[:, :2], min(math.sqrt(config.crop_area), 1.0)).clamp(0.0, 1.0)
    x = (x + p[:, 2].view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * p[:, 3].view(-1, 1, 1, 1) + mean).clamp(0.0, 1.0)
    # saturation then hue in one HSV round trip: the RGB clip between them is a no-op for in-range HSV values
    hsv = rgb_to_hsv(x)
    hsv = torch.stack([torch.remainder(hsv[:, 0] + p[:, 5].view(-1, 1, 1), 1.0),
                       (hsv[:, 1] * p[:, 4].view(-1, 1, 1)).clamp(0.0, 1.0), hsv[:, 2]], 1)
    return hsv_to_rgb(hsv).clamp(0.0, 1.0)


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> the float levels of TF's convert_image_dtype to uint8 (x * 255.5, saturate, truncate), kept
    as floats so the batch stays on its device."""
    return torch.clamp(x * 255.5, 0.0, 255.0).floor()
