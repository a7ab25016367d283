"""A full-size OpenVLA-7B snapshot with random weights, for speed measurements on a host with no network.

The model is the published architecture (model.OPENVLA_7B_CONFIG: 7,541,237,184 parameters) built in bf16 straight
on the GPU with its constructors' random init, written in the published layout (checkpoint.write_snapshot). The
tokenizer is tiny.py's small Llama-style BPE, trained on the LIBERO instructions (so prompts are about as long as
Llama-2 makes them) and padded with filler pieces that no text produces to exactly the 32000 base pieces the 7B
config's 32064-row embedding and lm_head imply (Arch.action_vocab_size = vocab_size - pad_to_multiple_of). Norm
stats are tiny.py's plausible ones for the LIBERO suites. With random weights no episode succeeds, so every episode
runs to the suite's max steps: the worst case of a run's time.

`tiny=True` writes the same files around a tiny architecture (CPU, seconds): the tests use it to run the same flow.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

#: the LIBERO suites whose instructions train the tokenizer and whose norm-stats keys the snapshot carries
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
BASE_VOCAB = 32000  # Llama-2's base vocabulary, which the 7B config's 32064 rows (padded to 64) imply
MERGES = 1000  # more pieces than the LIBERO instructions have words: each of their words becomes one piece
MARKER = "random_weights.json"  # written last: a snapshot folder with it is complete


def libero_instructions(suites=SUITES) -> list[str]:
    """The task instructions of the LIBERO suites (read from the installed LIBERO files, no simulator)."""
    from ..envs.tasks import suite_tasks

    return [task.language for suite in suites for task in suite_tasks(suite)]


def build_tokenizer_7b(folder: str | Path, instructions=None) -> Path:
    """The 32000-piece tokenizer of the random snapshot (see the module docstring)."""
    from . import tiny

    texts = libero_instructions() if instructions is None else list(instructions)
    return tiny.build_tokenizer(folder, merges=MERGES, corpus=texts, base_vocab=BASE_VOCAB)


def norm_stats(seed: int = 0) -> dict:
    from . import tiny

    return tiny.tiny_norm_stats(tuple(f"{suite}_no_noops" for suite in SUITES), seed=seed)


def random_openvla_7b(device: str = "cuda", seed: int = 0):
    """OpenVLA-7B with random bf16 weights, built on `device` (benchmarks/bench_openvla.py's model)."""
    import torch

    from .model import OPENVLA_7B_CONFIG, Arch, OpenVLA

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = OpenVLA(Arch.from_config(OPENVLA_7B_CONFIG), attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def is_complete(folder: str | Path, tiny: bool, seed: int) -> bool:
    """True when `folder` holds a finished random snapshot of this architecture and seed."""
    marker = Path(folder) / MARKER
    try:
        return json.loads(marker.read_text()) == _marker(tiny, seed)
    except (OSError, ValueError):
        return False


def _marker(tiny: bool, seed: int) -> dict:
    return {"architecture": "tiny" if tiny else "openvla-7b", "seed": seed, "base_vocab": BASE_VOCAB}


def write_random_snapshot(folder: str | Path, device: str = "cuda", seed: int = 0, tiny: bool = False,
                          reuse: bool = True, instructions=None) -> tuple[Path, bool]:
    """Write the snapshot into `folder` (made in a sibling `.partial` folder and renamed into place when finished,
    so a killed write leaves no half snapshot behind). Returns (folder, reused): with `reuse`, a finished snapshot
    of the same architecture and seed already there is kept."""
    import torch

    from . import tiny as tiny_module
    from .checkpoint import write_snapshot

    folder = Path(folder)
    if reuse and is_complete(folder, tiny, seed):
        return folder, True
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = build_tokenizer_7b(partial / "tokenizer", instructions)
    if tiny:
        model = tiny_module.random_model(tiny_module.tiny_arch(BASE_VOCAB), seed=seed)
    else:
        model = random_openvla_7b(device, seed)
    write_snapshot(partial, model, norm_stats(seed), tokenizer, max_shard_size="5GB" if not tiny else "200KB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shutil.rmtree(tokenizer)
    (partial / MARKER).write_text(json.dumps(_marker(tiny, seed)) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder, False


def write_checkpoints_entry(file: str | Path, name: str, snapshot: str | Path, suites=SUITES) -> Path:
    """Add (or replace) `[checkpoints.NAME]`, an openvla entry over `snapshot` with a threshold of 0 on the given
    suites (random weights never succeed: the run measures speed, and its tests should not fail), to the
    checkpoints.toml `file`, keeping the rest of an existing file; a new file gets `default = NAME`. Written
    atomically."""
    import tomlkit

    file = Path(file)
    snapshot = Path(snapshot).resolve()
    try:
        source = str(snapshot.relative_to(file.parent.resolve()))
    except ValueError:
        source = str(snapshot)
    doc = tomlkit.parse(file.read_text()) if file.is_file() else tomlkit.document()
    if "default" not in doc:
        doc.add(tomlkit.comment("written by vla_bench/openvla/random_snapshot.py (tools/gpu/write_random_openvla.py)"))
        doc["default"] = name
    entry = tomlkit.table()
    entry["kind"] = "openvla"
    entry["source"] = source
    entry["description"] = "OpenVLA-7B architecture with random weights: for speed measurements only"
    thresholds = tomlkit.table(is_super_table=True)
    for suite in suites:
        table = tomlkit.table()
        table["default"] = 0.0
        thresholds[suite] = table
    entry["thresholds"] = thresholds
    if "checkpoints" not in doc:
        doc["checkpoints"] = tomlkit.table(is_super_table=True)
    doc["checkpoints"][name] = entry
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(tomlkit.dumps(doc))
    os.replace(tmp, file)
    return file
