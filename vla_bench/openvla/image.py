"""OpenVLA's pixel values: the model's side of the image chain, from 224x224 uint8 frames (openvla/frames.py makes
them the reference's way) to each vision backbone's normalized input.

  to_pixel_values  per-backbone mean/std, channels stacked as [DINOv2 RGB, SigLIP RGB] for fused models;
  pixel_values_on  the same on the model's device from uint8 frames (the policy's path)
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from .frames import IMAGE_SIZE


@functools.lru_cache(maxsize=8)
def backbone_norms(timm_model_ids: tuple[str, ...]) -> tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]:
    """(mean, std) per vision backbone, from timm's pretrained configs as the reference's processor takes them."""
    import timm

    return tuple((tuple(cfg.mean), tuple(cfg.std)) for cfg in map(timm.models.get_pretrained_cfg, timm_model_ids))


def stack_frames(images: Sequence[np.ndarray], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """B HxWx3 uint8 frames -> one (B, S, S, 3) uint8 array, refusing any other size or dtype.

    The reference processor first bicubic-resizes to the model size; every chain here has resized already and a
    same-size bicubic resize is the identity, so a frame of another size is a caller bug and is refused."""
    batch = np.stack([np.asarray(im) for im in images])
    if batch.shape[1:] != (image_size, image_size, 3) or batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape ({image_size}, {image_size}, 3), got "
                         f"{batch.dtype} {batch.shape[1:]}")
    return batch


def normalize(frames: torch.Tensor, timm_model_ids: Sequence[str], dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """(B, S, S, 3) uint8 frames on any device -> [B, 3 * n_backbones, S, S] pixel values on that device: x / 255,
    then each backbone's (x - mean) / std in float32, channels stacked as [DINOv2 RGB, SigLIP RGB]; cast to `dtype`
    last, as the model's input buffer would cast float32 values."""
    x = frames.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
    parts = []
    for mean, std in backbone_norms(tuple(timm_model_ids)):
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        parts.append((x - m) / s)
    return torch.cat(parts, dim=1).to(dtype)


def to_pixel_values(images: Sequence[np.ndarray], timm_model_ids: Sequence[str], image_size: int = IMAGE_SIZE,
                    ) -> torch.Tensor:
    """B HxWx3 uint8 images (already image_size square) -> float32 [B, 3 * n_backbones, S, S] on the CPU."""
    return normalize(torch.from_numpy(stack_frames(images, image_size)), timm_model_ids)


def pixel_values_on(images: Sequence[np.ndarray], timm_model_ids: Sequence[str], device, dtype: torch.dtype,
                    image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """to_pixel_values computed on `device` in `dtype`: the frames cross to the device as uint8 and are normalized
    there (the same float32 arithmetic, so the values equal the CPU path's cast to dtype)."""
    return normalize(torch.from_numpy(stack_frames(images, image_size)).to(device), timm_model_ids, dtype)
