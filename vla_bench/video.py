"""One mp4 per episode (imageio + imageio-ffmpeg), named by suite / task / episode / outcome."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

VIDEO_MODES = ("none", "failed", "all")
FPS = 20  # LIBERO's control rate, so a video plays in real time


def wants_video(mode: str, success: bool) -> bool:
    return mode == "all" or (mode == "failed" and not success)


def video_path(video_dir: Path, checkpoint: str, suite: str, task_id: str, init_index: int, outcome: str) -> Path:
    return Path(video_dir) / checkpoint / suite / task_id / f"episode{init_index:03d}-{outcome}.mp4"


def write_video(path: Path, frames: Sequence[np.ndarray]) -> Path:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1: 256x256 frames are not resized to a multiple of 16 (the default would warn and pad)
    with imageio.get_writer(path, fps=FPS, codec="libx264", quality=7, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame, dtype=np.uint8))
    return path
