"""Command-line options, declared once for the pytest plugin and the `vla-bench` CLI.

Each group is a function over an `addoption`-like callable: pytest's `parser.getgroup(...).addoption` and argparse's
`add_argument` take the same arguments, so a name, its default and its help text exist in one place. Under pytest
an option shares one namespace with every other plugin, so most names carry the `vla-` prefix there; a `vla-bench`
command passes `prefix=""` (`--vla-alpha` there is `--alpha` here). Names users know without a prefix
(--checkpoint, --episodes, --video) are the same in both.

`OptionValues(get, prefix)` gives the values back by their unprefixed names, whichever front end parsed them.
"""
from __future__ import annotations

from typing import Any, Callable

from .video import VIDEO_FORMATS, VIDEO_MODES

DEFAULT_RESULTS = "results/vla-bench.sqlite"
DEFAULT_BASELINES = "baselines"
DEFAULT_VIDEO_DIR = "videos"
DEFAULT_ALPHA = 0.05  # the gate's significance level
DEFAULT_GROUPS = 2  # lockstep slot groups of the engine (engine/scheduler.py)

AddOption = Callable[..., Any]


def add_checkpoints_file_option(addoption: AddOption) -> None:
    addoption("--checkpoints-file", default=None, metavar="PATH",
              help="checkpoints.toml to use (default: the nearest one in the working directory or above)")


def add_checkpoint_options(addoption: AddOption) -> None:
    addoption("--checkpoint", action="append", default=None, metavar="NAME",
              help="checkpoints.toml entry to evaluate (repeatable; default: the file's `default`)")


def add_protocol_options(addoption: AddOption) -> None:
    addoption("--episodes", type=int, default=None, help="episodes per task (protocol default: 50)")
    addoption("--max-steps", type=int, default=None, help="control steps per episode (default: per suite)")


def add_results_option(addoption: AddOption, prefix: str = "vla-") -> None:
    addoption(f"--{prefix}results", default=DEFAULT_RESULTS, metavar="PATH",
              help=f"SQLite results store; finished episodes in it are not re-run (default {DEFAULT_RESULTS})")


def add_results_sources_option(addoption: AddOption) -> None:
    """The stores a report reads: one, or several written apart (one per host) that it merges."""
    addoption("--results", action="append", default=None, metavar="PATH",
              help=f"results store to read; repeat it to merge stores written on several hosts (default "
                   f"{DEFAULT_RESULTS})")


def add_gate_options(addoption: AddOption, prefix: str = "vla-") -> None:
    """How a candidate is judged against a baseline (the plugin's --vla-compare runs and `vla-bench gate`)."""
    addoption(f"--{prefix}baselines", default=DEFAULT_BASELINES, metavar="DIR",
              help=f"baselines folder (default {DEFAULT_BASELINES}/)")
    addoption(f"--{prefix}compare-fail" if prefix else "--fail", default=None, metavar="drop:5pp",
              help="non-inferiority margin: fail only on a drop beyond it (default: any significant drop)")
    addoption(f"--{prefix}strict", action="store_true", help="an inconclusive gate fails too")
    addoption(f"--{prefix}alpha", type=float, default=DEFAULT_ALPHA,
              help=f"the gate's significance level (default {DEFAULT_ALPHA})")


def add_run_options(addoption: AddOption, prefix: str = "vla-") -> None:
    """How an evaluation runs: workers, datasets, baselines to save or compare against, early stopping."""
    addoption(f"--{prefix}workers", type=int, default=None, metavar="N",
              help="simulator processes of the session, shared by all its tasks (default: the CPU count)")
    addoption(f"--{prefix}groups", type=int, default=DEFAULT_GROUPS, metavar="G",
              help="lockstep slot groups: while one group's batch is on the GPU the others simulate "
                   f"(default {DEFAULT_GROUPS}; 1: every slot in one batch)")
    addoption(f"--{prefix}devices", default=None, metavar="cuda:0,cuda:1|all",
              help="one model replica per device, episodes spread across them (default: the entry's own device)")
    addoption(f"--{prefix}engine-stats", default=None, metavar="PATH",
              help="write the engine's figures as JSON: actions/s, policy (GPU) busy fraction, batch sizes")
    addoption(f"--{prefix}data", action="append", default=[], metavar="SUITE=PATH",
              help="dataset of an open-loop suite (bridge_v2, libero_demos), overriding checkpoints.toml")
    addoption(f"--{prefix}save", default=None, metavar="NAME",
              help="store this run's per-episode outcomes as baselines/NAME.json (commit it to gate against)")
    addoption(f"--{prefix}compare", nargs="?", const="@entry", default=None, metavar="NAME",
              help="gate every checkpoint against baseline NAME (no NAME: each entry's `baseline` key)")
    addoption(f"--{prefix}curtail", action="store_true",
              help="stop a task's episodes once no remaining outcome can change its verdict (exact)")
    addoption(f"--{prefix}sequential", type=int, default=0, metavar="LOOKS",
              help="group-sequential gate with LOOKS equally spaced looks: stops a task once a look decides")
    addoption(f"--{prefix}strict-sim", action="store_true",
              help="a settled scene that differs from the reference stack's fails the task (default: a warning)")
    addoption(f"--{prefix}trajectories", action="store_true",
              help="also store each episode's per-step trajectory (executed action, end-effector pose, gripper) "
                   "beside its row in the results store")


def add_video_options(addoption: AddOption) -> None:
    addoption("--video", choices=VIDEO_MODES, default="none", help="write a video per episode")
    addoption("--video-format", choices=tuple(VIDEO_FORMATS), default="mp4",
              help="mp4 (needs imageio-ffmpeg) or sheet: one PNG of every 6th frame (0.3 s apart) and the last")
    addoption("--video-dir", default=DEFAULT_VIDEO_DIR, metavar="DIR",
              help=f"where videos go (default: {DEFAULT_VIDEO_DIR}/)")


def add_evaluation_options(addoption: AddOption, prefix: str = "vla-") -> None:
    """Everything an evaluation reads: `pytest suites/...` and `vla-bench run` both declare exactly this."""
    add_checkpoint_options(addoption)
    add_protocol_options(addoption)
    add_results_option(addoption, prefix)
    add_run_options(addoption, prefix)
    add_gate_options(addoption, prefix)
    add_video_options(addoption)


class OptionValues:
    """The parsed values by the unprefixed names declared above, whichever front end parsed them: `values("alpha")`
    is --vla-alpha under pytest (get = config.getoption) and --alpha under `vla-bench` (get = getattr on argparse's
    namespace); `values.flag("data")` is how the user spelled that option, for error messages."""

    #: options spelled the same under both front ends
    UNPREFIXED = frozenset({"checkpoint", "checkpoints-file", "episodes", "max-steps", "video", "video-format",
                            "video-dir"})
    #: a `vla-bench` command's own spelling where dropping the prefix alone would read badly
    CLI_NAMES = {"compare-fail": "fail"}

    def __init__(self, get: Callable[[str], Any], prefix: str = "vla-"):
        self.get = get
        self.prefix = prefix

    def flag(self, name: str) -> str:
        if name in self.UNPREFIXED:
            return f"--{name}"
        if not self.prefix:
            name = self.CLI_NAMES.get(name, name)
        return f"--{self.prefix}{name}"

    def __call__(self, name: str) -> Any:
        return self.get(self.flag(name)[2:].replace("-", "_"))


def check_values(values: OptionValues) -> None:
    """Option values that are wrong whatever is evaluated, refused before anything runs (VlaBenchError)."""
    from .errors import VlaBenchError
    from .suites import OPEN_LOOP, suite_names

    for option in ("episodes", "max-steps"):
        value = values(option)
        if value is not None and value < 1:
            raise VlaBenchError(f"{values.flag(option)} must be at least 1, got {value}")
    for option in ("workers", "groups"):
        value = values(option)
        if value is not None and value < 1:
            raise VlaBenchError(f"{values.flag(option)} must be at least 1, got {value}")
    parse_devices(values("devices"), values.flag("devices"))
    for item in values("data"):
        suite, sep, path = item.partition("=")
        if not sep or not path:
            raise VlaBenchError(f"{values.flag('data')} {item!r}: expected SUITE=PATH, e.g. bridge_v2=/data/bridge")
        if suite not in suite_names(OPEN_LOOP):
            raise VlaBenchError(f"{values.flag('data')} {item!r}: unknown suite {suite!r}; suites that read a dataset: "
                                f"{', '.join(suite_names(OPEN_LOOP))}")


def parse_devices(text: str | None, flag: str = "--vla-devices") -> list[str]:
    """--vla-devices: 'cuda:0,cuda:1', 'all' (every CUDA device of the host) or None (the entry's own device)."""
    from .errors import VlaBenchError

    if text is None:
        return []
    if text == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise VlaBenchError(f"{flag} all: this host has no CUDA device")
        return [f"cuda:{i}" for i in range(count)]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    import re

    bad = [d for d in devices if not re.fullmatch(r"cpu|cuda(:\d+)?", d)]
    if bad or not devices:
        raise VlaBenchError(f"{flag} {text!r}: expected a comma-separated list of cpu, cuda or cuda:N, or all")
    if len(set(devices)) != len(devices):
        raise VlaBenchError(f"{flag} {text!r}: a device is named twice (one replica per device)")
    return devices
