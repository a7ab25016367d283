"""A LIBERO scene's texture data, given back to the OS once nothing will read it again.

A compiled LIBERO scene holds its textures' pixels in the MuJoCo model: 180-210 MB of a 250 MB model (three
4096x4096 and several 2000x2000 RGB textures). The physics never reads them; the renderer reads them once, when
robosuite makes the env's render context (mjr_makeContext copies every texture into GL), and never again unless
something uploads a texture anew (robosuite's TextureModder, for domain randomization: LIBERO does not use it). So
after the env is built, its worker keeps ~200 MB it does not need, the largest share of a simulator worker after
the renderer itself, and the share that decides how many workers (so how large a GPU batch) a host holds.

`release` hands those pages back with madvise(MADV_DONTNEED): the model stays valid, and a read of its texture data
afterwards sees zeros. The env (envs/libero.py) checks at every reset and step that the render context is still
the one made before the release, so a context made later, which would upload zeros, is an error and never a
quietly different picture. VLA_BENCH_KEEP_TEXTURES=1 keeps them.

Python offers madvise only on its own mmap objects, and MuJoCo allocates the model itself, so the call goes through
ctypes to the C library (Linux; elsewhere nothing is released).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import mujoco
import numpy as np

ENV_VAR = "VLA_BENCH_KEEP_TEXTURES"
_MADV_DONTNEED = 4  # Linux's value (mmap.MADV_DONTNEED where Python exposes it)


def texture_data(model: mujoco.MjModel) -> np.ndarray:
    """The model's texture pixels (tex_rgb in MuJoCo 2.x, tex_data from 3.x): a view into the model's memory."""
    return model.tex_data if hasattr(model, "tex_data") else model.tex_rgb


def release(model: mujoco.MjModel) -> int:
    """Give back to the OS every whole page of the model's texture data; returns the bytes given back (0 where
    kept by VLA_BENCH_KEEP_TEXTURES, off Linux, or for a model without textures)."""
    if os.environ.get(ENV_VAR) == "1" or not sys.platform.startswith("linux"):
        return 0
    data = texture_data(model)
    if data.size == 0:
        return 0
    page = mmap.PAGESIZE
    start = -(-data.ctypes.data // page) * page  # the first whole page inside the array
    end = (data.ctypes.data + data.nbytes) // page * page
    if end <= start:
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", _MADV_DONTNEED)) != 0:
        return 0  # nothing was given back; the model is untouched
    return end - start
