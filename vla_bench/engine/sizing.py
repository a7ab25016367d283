"""How many simulator workers a host can hold: its cores, and its memory.

A LIBERO worker holds its own MuJoCo model (250 MB, loaded from the compiled-scene cache, envs/compiled_scenes.py;
its ~180 MB of texture data given back once rendered, envs/texture_memory.py), robosuite and, with a camera, a GL
context and its uploaded scene (~520 MB with llvmpipe): measured 767 MiB unique and 963 MiB resident per worker
with one 256x256 camera preparing OpenVLA frames (llvmpipe; Python 3.11, mujoco 2.3.7;
benchmarks/bench_worker_memory.py). On the GPU host a worker took 1.9 GB resident while it still compiled its
scene, kept its textures and imported torch for its frames (1.9 GB here too).

A default that counts only cores can ask for more than the host has: a 128 GiB GPU host stopped answering while
starting 96 workers beside a 7B model (2026-12-04; 96 x 1.9 GB is more than it has), 48 ran. So automatic worker
counts are also capped by the memory available when the pool is sized.
"""
from __future__ import annotations


#: planning figure per simulator worker (measured 1.9 GB resident on the GPU host, rounded up; kept until the
#: smaller worker is measured there)
WORKER_MEMORY_BYTES = 2 * 2**30
#: share of the available memory the workers may plan on (the model process and the page cache need the rest)
MEMORY_SHARE = 0.8


def available_memory() -> int | None:
    """Bytes the kernel reports as available (/proc/meminfo MemAvailable), None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_cap(available: int | None = None) -> int | None:
    """The most workers the available memory holds (at least 1), None where memory is not known."""
    available = available_memory() if available is None else available
    if available is None:
        return None
    return max(1, int(available * MEMORY_SHARE // WORKER_MEMORY_BYTES))


def auto_workers(wanted: int, available: int | None = None) -> int:
    """`wanted` workers (a count from cores), or fewer where the memory would not hold them."""
    cap = memory_cap(available)
    return max(1, wanted if cap is None else min(wanted, cap))


def memory_warning(workers: int, available: int | None = None) -> str | None:
    """A sentence when an explicit worker count plans on more memory than is available, else None."""
    cap = memory_cap(available)
    if cap is None or workers <= cap:
        return None
    available = available_memory() if available is None else available
    return (f"--vla-workers {workers}: each simulator worker needs about {WORKER_MEMORY_BYTES / 2**30:.0f} GiB "
            f"and {available / 2**30:.0f} GiB is available, enough for about {cap}; the host may run out of memory")
