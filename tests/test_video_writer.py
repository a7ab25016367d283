"""--video without an mp4 encoder: a usage error before any episode, never a silently empty file."""
import sys

import pytest

from tests.conftest import run_pytest, sim_env
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


def test_pytest_video_option_is_a_usage_error_without_imageio_ffmpeg(tmp_path):
    result = run_pytest("suites/libero_spatial", "-k", "task1", "--checkpoint", "noop", "--video", "failed",
                        "--vla-results", str(tmp_path / "r.sqlite"),
                        env=sim_env(PYTHONPATH=_hide_imageio_ffmpeg(tmp_path)))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--video needs imageio-ffmpeg" in result.stderr
