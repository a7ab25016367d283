"""One mp4 per episode (imageio + imageio-ffmpeg), named by suite / task / episode / outcome."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import VlaBenchError

VIDEO_MODES = ("none", "failed", "all")
FPS = 20  # LIBERO's control rate, so a video plays in real time


def wants_video(mode: str, success: bool) -> bool:
    return mode == "all" or (mode == "failed" and not success)


def video_path(video_dir: Path, checkpoint: str, suite: str, task_id: str, init_index: int, outcome: str) -> Path:
    return Path(video_dir) / checkpoint / suite / task_id / f"episode{init_index:03d}-{outcome}.mp4"


def require_video_writer() -> None:
    """Fail before any episode runs when mp4s cannot be written. Without imageio-ffmpeg, imageio picks another
    plugin for a .mp4 path and silently writes an empty TIFF (seen on a host without it), so check for it."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise VlaBenchError("--video needs imageio-ffmpeg, which is not installed: pip install imageio-ffmpeg, or "
                            "run with --video none") from None


def write_video(path: Path, frames: Sequence[np.ndarray]) -> Path:
    import imageio.v2 as imageio

    require_video_writer()
    path.parent.mkdir(parents=True, exist_ok=True)
    # format FFMPEG: never a fallback plugin; macro_block_size=1: 256x256 frames are not resized to a multiple of
    # 16 (the default would warn and pad)
    with imageio.get_writer(path, format="FFMPEG", fps=FPS, codec="libx264", quality=7,
                            macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame, dtype=np.uint8))
    return path
