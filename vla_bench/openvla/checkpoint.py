"""Snapshot directories in the published `openvla/openvla-7b` layout: load, write, fingerprint.

Layout (what this module reads and writes):
    config.json                      architecture (see model.Arch) and `norm_stats`
    model.safetensors.index.json     {"weight_map": {key: shard file}} over sharded model-*.safetensors
      (or a single model.safetensors)
    tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, ...)
    dataset_statistics.json          optional; fine-tuning runs write it and it overrides config.json's norm_stats

Safetensors only: no pickle, no remote code. Weights are read straight into their final dtype and device onto a
model skeleton built on the meta device, so a 7.5B model never exists twice in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..errors import VlaBenchError, choices

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")
DTYPES = ("auto", "float32", "bfloat16")


# ---- published key names ------------------------------------------------------------------------------------------
def published_key(key: str) -> str:
    """Module key -> published key: the reference renamed timm LayerScale's `gamma` to `scale_factor` because HF's
    loader rewrote parameter names containing "gamma"."""
    if key.endswith(".gamma") and (".ls1." in key or ".ls2." in key):
        return key[: -len("gamma")] + "scale_factor"
    return key


def module_key(key: str) -> str:
    if key.endswith(".scale_factor") and (".ls1." in key or ".ls2." in key):
        return key[: -len("scale_factor")] + "gamma"
    return key


# ---- device and dtype ---------------------------------------------------------------------------------------------
def resolve_device(device: str, where: str = ""):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VlaBenchError(f"{where}unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VlaBenchError(f"{where}device {device!r} requested but CUDA is not available on this machine; "
                            "use device = \"cpu\" or \"auto\"")
    if dev.type not in ("cpu", "cuda"):
        raise VlaBenchError(f"{where}unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str, device, where: str = ""):
    """bf16 on GPU, fp32 on CPU: bf16 matmuls on CPU are slow and not what the tests' exactness claims are about."""
    import torch

    if dtype not in DTYPES:
        raise VlaBenchError(f"{where}unknown dtype {dtype!r}; valid: {choices(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "bfloat16" and device.type == "cpu":
        raise VlaBenchError(f"{where}dtype bfloat16 on the CPU is not supported (slow, and not the reference's "
                            "numerics); use dtype = \"float32\" or \"auto\", or a CUDA device")
    return getattr(torch, dtype)


# ---- loading ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Snapshot:
    model: Any  # model.OpenVLA
    tokenizer: Any  # tokenizer.PromptTokenizer
    norm_stats: dict
    path: Path
    config: dict


def read_config(folder: Path, where: str = "") -> dict:
    f = folder / "config.json"
    if not folder.is_dir():
        raise VlaBenchError(f"{where}{folder}: no such snapshot directory")
    if not f.is_file():
        raise VlaBenchError(f"{where}{f}: missing (a snapshot needs config.json, model safetensors and tokenizer.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise VlaBenchError(f"{where}{f}: not valid JSON: {e}") from None


def read_norm_stats(folder: Path, config: Mapping, where: str = "") -> dict:
    """dataset_statistics.json when present (fine-tuned runs), else config.json's norm_stats."""
    f = folder / "dataset_statistics.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise VlaBenchError(f"{where}{f}: not valid JSON: {e}") from None
    return dict(config.get("norm_stats") or {})


def weight_map(folder: Path, where: str = "") -> dict[str, Path]:
    """Published key -> shard path, with every shard checked to exist."""
    index = folder / INDEX
    if index.is_file():
        entries = json.loads(index.read_text()).get("weight_map", {})
        shards = {name: folder / name for name in set(entries.values())}
        missing = sorted(name for name, p in shards.items() if not p.is_file())
        if missing:
            raise VlaBenchError(f"{where}{folder}: weight shard(s) {choices(missing)} listed in {INDEX} are missing")
        return {k: shards[v] for k, v in entries.items()}
    single = folder / SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise VlaBenchError(f"{where}{folder}: no {INDEX} or {SINGLE} (only safetensors weights are loaded)")


def _few(keys) -> str:
    keys = sorted(keys)
    return choices(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def load_snapshot(path: str | Path, dtype: str = "auto", device: str = "auto", attn_implementation: str = "sdpa",
                  where: str = "") -> Snapshot:
    import torch
    from safetensors import safe_open

    from .model import Arch, OpenVLA
    from .tokenizer import PromptTokenizer

    folder = Path(path)
    dev = resolve_device(device, where)
    dt = resolve_dtype(dtype, dev, where)
    config = read_config(folder, where)
    if not (folder / "tokenizer.json").is_file():
        raise VlaBenchError(f"{where}{folder / 'tokenizer.json'}: missing (the snapshot's tokenizer)")
    wmap = weight_map(folder, where)
    try:
        arch = Arch.from_config(config)
    except (KeyError, ValueError) as e:
        raise VlaBenchError(f"{where}{folder / 'config.json'}: not an OpenVLA config ({e})") from None

    with torch.device("meta"):
        model = OpenVLA(arch, attn_implementation=attn_implementation)
    expected = {published_key(k) for k in model.state_dict()}
    missing, unexpected = expected - set(wmap), set(wmap) - expected
    if missing or unexpected:
        parts = ([f"missing keys: {_few(missing)}"] if missing else []) + (
            [f"unexpected keys: {_few(unexpected)}"] if unexpected else [])
        raise VlaBenchError(f"{where}{folder}: weights do not match the architecture in config.json; "
                            + "; ".join(parts))

    state = {}
    by_shard: dict[Path, list[str]] = {}
    for key, shard in wmap.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        with safe_open(str(shard), framework="pt", device=str(dev)) as f:
            for key in keys:
                state[module_key(key)] = f.get_tensor(key).to(dt)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    _materialize_buffers(model, dev)
    model.eval()

    tokenizer = PromptTokenizer.from_dir(folder)
    if tokenizer.base_vocab_size != arch.action_vocab_size:
        raise VlaBenchError(f"{where}{folder}: tokenizer.json has {tokenizer.base_vocab_size} base tokens but "
                            f"config.json's text_config implies {arch.action_vocab_size}; the files do not belong "
                            "together")
    return Snapshot(model=model, tokenizer=tokenizer, norm_stats=read_norm_stats(folder, config, where),
                    path=folder, config=config)


def _materialize_buffers(model, device) -> None:
    """Non-persistent buffers are not in any checkpoint, so after building on the meta device they must be
    recomputed; Llama's rotary frequencies are the only ones in this architecture."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(device):
        model.language_model.model.rotary_emb = LlamaRotaryEmbedding(config=model.language_model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a new library version added state that this loader does not know about: fail loudly, not later
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")


# ---- writing ------------------------------------------------------------------------------------------------------
def write_snapshot(folder: str | Path, model, norm_stats: Mapping, tokenizer_dir: str | Path,
                   max_shard_size: int | str = "5GB", dtype=None) -> Path:
    """Write `model` (an OpenVLA) in the published layout: config.json with norm_stats, sharded safetensors with an
    index under the published key names, and the tokenizer files copied from tokenizer_dir."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {published_key(k): (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = model.arch.to_config()
    config["norm_stats"] = dict(norm_stats)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    src = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != folder.resolve():
            shutil.copyfile(src / name, folder / name)
    return folder


def write_dataset_statistics(folder: str | Path, norm_stats: Mapping) -> Path:
    f = Path(folder) / "dataset_statistics.json"
    f.write_text(json.dumps(norm_stats, indent=2) + "\n")
    return f


# ---- identity -----------------------------------------------------------------------------------------------------
_FINGERPRINTS: dict[tuple, str] = {}
_SAMPLE = 1 << 20  # bytes read from each end of a large file


def file_digest(path: Path) -> str:
    """sha256 of a file; files over 64 MiB are fingerprinted by size, header and head/tail/middle samples instead,
    because hashing 15 GB of weights on every session would cost a minute. Any fine-tune changes the sampled
    bytes; a deliberate single-byte edit in the middle of a shard would not be seen."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo in _FINGERPRINTS:
        return _FINGERPRINTS[memo]
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= 64 * _SAMPLE:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        else:
            h.update(str(st.st_size).encode())
            for i in range(17):  # 17 evenly spaced 1 MiB windows, first and last included
                f.seek(min(i * (st.st_size - _SAMPLE) // 16, st.st_size - _SAMPLE))
                h.update(f.read(_SAMPLE))
    _FINGERPRINTS[memo] = h.hexdigest()
    return _FINGERPRINTS[memo]


def folder_identity(folder: Path, names=None) -> str:
    """A digest of a snapshot's or adapter's files (all regular files, or the given names), by name and content."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if names is None else [folder / n for n in names]
    for p in files:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()[:16]
