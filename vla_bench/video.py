"""One video per episode, named by suite / task / episode / outcome: an mp4 (imageio + imageio-ffmpeg), or a
contact sheet (one PNG of every SHEET_EVERY-th frame and the last one, through Pillow) that needs no encoder, for
hosts without imageio-ffmpeg and for a failure mode seen at a glance."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import VlaBenchError

VIDEO_MODES = ("none", "failed", "all")
VIDEO_FORMATS = {"mp4": ".mp4", "sheet": ".png"}  # format -> file suffix
FPS = 20  # LIBERO's control rate, so a video plays in real time
SHEET_EVERY = 6  # 0.3 s apart at 20 Hz: a 220-step episode fits in 38 tiles
SHEET_COLUMNS = 10
SHEET_TILE = 128  # pixels; objects stay recognisable at half LIBERO's 256


def wants_video(mode: str, success: bool) -> bool:
    return mode == "all" or (mode == "failed" and not success)


def video_path(video_dir: Path, checkpoint: str, suite: str, task_id: str, init_index: int, outcome: str,
               video_format: str = "mp4") -> Path:
    return (Path(video_dir) / checkpoint / suite / task_id
            / f"episode{init_index:03d}-{outcome}{VIDEO_FORMATS[video_format]}")


def require_video_writer(video_format: str = "mp4") -> None:
    """Fail before any episode runs when mp4s cannot be written. Without imageio-ffmpeg, imageio picks another
    plugin for a .mp4 path and silently writes an empty TIFF (seen on a host without it), so check for it. Contact
    sheets need only Pillow, a dependency."""
    if video_format not in VIDEO_FORMATS:
        raise VlaBenchError(f"video format {video_format!r}: expected one of {', '.join(VIDEO_FORMATS)}")
    if video_format != "mp4":
        return
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise VlaBenchError("--video needs imageio-ffmpeg, which is not installed: pip install imageio-ffmpeg, or "
                            "run with --video-format sheet (PNG contact sheets) or --video none") from None


def write_video(path: Path, frames: Sequence[np.ndarray], video_format: str = "mp4") -> Path:
    if video_format == "sheet":
        return write_contact_sheet(path, frames)
    import imageio.v2 as imageio

    require_video_writer(video_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    # format FFMPEG: never a fallback plugin; macro_block_size=1: 256x256 frames are not resized to a multiple of
    # 16 (the default would warn and pad)
    with imageio.get_writer(path, format="FFMPEG", fps=FPS, codec="libx264", quality=7,
                            macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame, dtype=np.uint8))
    return path


def sheet_frame_indices(n_frames: int, every: int = SHEET_EVERY) -> list[int]:
    """The frames a contact sheet shows: every `every`-th from the first, and the last (the outcome) once."""
    picked = list(range(0, n_frames, every))
    if n_frames and picked[-1] != n_frames - 1:
        picked.append(n_frames - 1)
    return picked


def write_contact_sheet(path: Path, frames: Sequence[np.ndarray], every: int = SHEET_EVERY,
                        columns: int = SHEET_COLUMNS, tile: int = SHEET_TILE) -> Path:
    """One PNG: the picked frames (sheet_frame_indices) as tile x tile thumbnails, row by row."""
    from PIL import Image

    if not len(frames):
        raise VlaBenchError(f"{path}: no frames to write")
    picked = sheet_frame_indices(len(frames), every)
    rows = -(-len(picked) // columns)
    sheet = Image.new("RGB", (min(columns, len(picked)) * tile, rows * tile))
    for k, index in enumerate(picked):
        thumb = Image.fromarray(np.asarray(frames[index], dtype=np.uint8)).convert("RGB")
        thumb = thumb.resize((tile, tile), Image.Resampling.BILINEAR)
        sheet.paste(thumb, ((k % columns) * tile, (k // columns) * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
