"""--video without an mp4 encoder: a usage error before any episode, never a silently empty file."""
import sys

import pytest

from tests.conftest import sim_env
from vla_bench.errors import VlaBenchError


def _hide_imageio_ffmpeg(folder):
    (folder / "imageio_ffmpeg.py").write_text("raise ImportError('hidden by a test')\n")
    return str(folder)


def test_write_video_refuses_without_imageio_ffmpeg(tmp_path, monkeypatch):
    from vla_bench.video import write_video

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` fail
    with pytest.raises(VlaBenchError, match="pip install imageio-ffmpeg"):
        write_video(tmp_path / "e.mp4", [])
    assert not (tmp_path / "e.mp4").exists()


def test_pytest_video_option_is_a_usage_error_without_imageio_ffmpeg(project, tmp_path):
    result = project.run("suites/libero_spatial", "-k", "task1", "--checkpoint", "noop", "--video", "failed",
                         "--vla-results", str(tmp_path / "r.sqlite"),
                         env=sim_env(PYTHONPATH=_hide_imageio_ffmpeg(tmp_path)))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--video needs imageio-ffmpeg" in result.stderr


# ---- contact sheets: --video-format sheet (Pillow only, no encoder) ------------------------------------------------
from hypothesis import given, strategies as st  # noqa: E402
import numpy as np  # noqa: E402


@given(n=st.integers(1, 400), every=st.integers(1, 12))
def test_sheet_frames_start_first_step_evenly_and_end_on_the_outcome(n, every):
    """A contact sheet shows the first frame, then one every `every` frames, and the last frame exactly once."""
    from vla_bench.video import sheet_frame_indices

    picked = sheet_frame_indices(n, every)
    assert picked[0] == 0 and picked[-1] == n - 1
    assert picked.count(n - 1) == 1
    assert all(b - a == every for a, b in zip(picked[:-2], picked[1:-1]))
    assert 0 < picked[-1] - picked[-2] <= every if len(picked) > 1 else n == 1


def test_contact_sheet_tiles_are_the_picked_frames_in_reading_order(tmp_path):
    from PIL import Image

    from vla_bench.video import sheet_frame_indices, write_contact_sheet

    # 23 solid frames, each its own colour: every tile must show the colour of the frame it claims to be
    colours = [(10 * i, 255 - 10 * i, (37 * i) % 256) for i in range(23)]
    frames = [np.full((256, 256, 3), c, dtype=np.uint8) for c in colours]
    path = write_contact_sheet(tmp_path / "sheet.png", frames, every=4, columns=3, tile=16)
    picked = sheet_frame_indices(23, 4)  # 0 4 8 12 16 20 22
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape == (3 * 16, 3 * 16, 3)  # 7 tiles in rows of 3
    for k, index in enumerate(picked):
        row, col = divmod(k, 3)
        assert tuple(sheet[row * 16 + 8, col * 16 + 8]) == colours[index], (k, index)
    assert not sheet[2 * 16 + 8, 1 * 16 + 8].any()  # the slots after the last tile stay black


def test_contact_sheet_of_no_frames_is_an_error(tmp_path):
    from vla_bench.video import write_contact_sheet

    with pytest.raises(VlaBenchError, match="no frames"):
        write_contact_sheet(tmp_path / "empty.png", [])


@pytest.mark.sim
def test_video_format_sheet_writes_a_png_per_episode_without_imageio_ffmpeg(project, tmp_path):
    from PIL import Image

    from vla_bench.results import ResultsStore

    results = tmp_path / "r.sqlite"
    result = project.run("suites/libero_spatial", "-k", "task1", "--checkpoint", "noop", "--episodes", "1",
                         "--max-steps", "14", "--video", "all", "--video-format", "sheet", "--video-dir",
                         str(tmp_path / "videos"), "--vla-results", str(results),
                         env=sim_env(PYTHONPATH=_hide_imageio_ffmpeg(tmp_path)))
    assert result.returncode == 1, result.stdout + result.stderr  # noop fails the task; no usage error
    [record] = ResultsStore(results).episodes(checkpoint="noop")
    assert record.video and record.video.endswith("episode000-failure.png")
    sheet = Image.open(record.video)
    assert sheet.format == "PNG" and sheet.size[1] % 128 == 0 and sheet.size[0] >= 2 * 128
