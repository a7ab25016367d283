"""Headless rendering set-up: pick the MuJoCo GL backend and explain a missing system library.

MuJoCo reads MUJOCO_GL when it is first imported, so `configure()` must run before robosuite/libero imports
(the env worker calls it first thing).
"""
from __future__ import annotations

import ctypes.util
import logging
import os
import tempfile

from ..errors import VlaBenchError

#: backend -> (shared library it loads, Debian package that provides it)
GL_LIBRARIES = {"egl": ("EGL", "libegl1 (and libgl1; on NVIDIA hosts the driver's libEGL_nvidia)"),
                "osmesa": ("OSMesa", "libosmesa6")}


def _not_macro_advice(record: logging.LogRecord) -> bool:
    return "macro file" not in record.getMessage() and "setup_macros" not in record.getMessage()


def configure() -> str:
    """Set MUJOCO_GL / PYOPENGL_PLATFORM to a headless backend (default egl) and return its name.

    Also silences robosuite's three-line "no private macro file" advice, which every env worker would print at
    import (it concerns robosuite's own settings, which vla-bench does not use); a filter on its logger set before
    the import keeps every other robosuite message."""
    logging.getLogger("robosuite_logs").addFilter(_not_macro_advice)
    backend = os.environ.setdefault("MUJOCO_GL", "egl")
    if backend in GL_LIBRARIES:
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def check_available(backend: str) -> None:
    """Raise a VlaBenchError naming the system package when the backend's library cannot be found."""
    if backend not in GL_LIBRARIES:
        return
    library, package = GL_LIBRARIES[backend]
    if ctypes.util.find_library(library) is None:
        raise VlaBenchError(f"MUJOCO_GL={backend} needs lib{library}, which is not installed: "
                            f"apt-get install {package}  (or set MUJOCO_GL to another backend: egl, osmesa)")


def renderer_name(backend: str) -> str:
    """'egl: Mesa/X.org llvmpipe (LLVM 15.0.6, 256 bits)', 'egl: NVIDIA Corporation NVIDIA H200/PCIe/SSE2', ...:
    the GL backend and the driver that really draws, so that a CPU rasterizer and a GPU's EGL are told apart in
    result rows and in `vla-bench doctor` (they draw the same scene with slightly different pixels)."""
    try:
        import mujoco
        from OpenGL import GL

        context = mujoco.GLContext(8, 8)
        try:
            context.make_current()
            vendor, renderer = (GL.glGetString(k).decode(errors="replace") for k in (GL.GL_VENDOR, GL.GL_RENDERER))
        finally:
            context.free()
        return f"{backend}: {vendor} {renderer}"
    except Exception as e:  # no display, no GL library: name the backend alone, and why
        return f"{backend} (renderer unknown: {type(e).__name__})"


def private_workdir() -> tempfile.TemporaryDirectory:
    """Move this simulator process into a temporary working directory of its own and return it (`.cleanup()` it
    when the process is done). MuJoCo appends every simulator warning to MUJOCO_LOG.TXT in the working directory
    (it prints them too); the user's folder is no place for it. Simulator processes open no relative paths."""
    workdir = tempfile.TemporaryDirectory(prefix="vla-bench-sim-")
    os.chdir(workdir.name)
    return workdir
