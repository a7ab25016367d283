"""Checkpoint kind "openvla": checkpoints.toml entries for OpenVLA snapshots and LoRA adapters over them.

    [checkpoints.openvla-libero-spatial]
    kind = "openvla"
    source = "~/models/openvla-7b-finetuned-libero-spatial"   # a snapshot dir in the published layout
    center_crop = true            # default per suite: true for LIBERO (its fine-tunes trained with random crops),
                                  # false for Bridge (the reference's Bridge evaluation requires it)
    unnorm_key = "libero_spatial_no_noops"   # optional; default per suite (see policy.py)
    dtype = "auto"                # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    device = "auto"               # auto | cpu | cuda | cuda:N
    prompt = "openvla"            # or "openvla-v01"

    [checkpoints.my-lora]
    kind = "openvla"
    base = "openvla-libero-spatial"   # another openvla entry with a source
    adapter = "runs/my-lora/adapter"  # PEFT adapter dir (adapter_config.json + adapter_model.safetensors)
    action_repeat = 2                 # optional: each prediction is a 2-step window (finetune --action-repeat 2)

`action_repeat = k` (integer >= 1) is the execution rule of a temporally subsampled fine-tune: the model is asked
once every k env steps per environment and [a[0:6] / k, a[6]] is executed for k steps (vla_bench/policies/repeat.py).
`vla-bench finetune --action-repeat k` writes it into the entry. An entry without the key takes the rule recorded by
`vla-bench finetune` with the entry's own weights ("execution" in train_config.json in the adapter's folder or the
run folder above it; for `source` entries, the snapshot's), else 1; the entry's key wins over that file. A LoRA
entry does not inherit its base entry's action_repeat (the adapter's training data decides).

Validation stays cheap and torch-free (it runs whenever checkpoints.toml is read); files are checked when an entry
is used. One base model is cached per (weights identity, dtype, device); adapter entries over it share it.
"""
from __future__ import annotations

import hashlib
import json
import re

from ..errors import VlaBenchError, choices
from ..policies.repeat import check_action_repeat
from .checkpoint import DTYPES as _DTYPES  # checkpoint.py imports torch only inside functions

KEYS = {"source": str, "unnorm_key": str, "center_crop": bool, "dtype": str, "device": str, "base": str,
        "adapter": str, "prompt": str, "action_repeat": int}
REQUIRED = ()

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: options that change what the policy outputs; part of the identity recorded with results
_BEHAVIOUR = ("unnorm_key", "center_crop", "prompt", "dtype")


def validate(spec, registry) -> None:
    from .prompt import TEMPLATES

    o = spec.options
    if ("source" in o) == ("base" in o):
        raise VlaBenchError(f"{spec.where()}set exactly one of 'source' (a snapshot dir) or 'base' (another "
                            "openvla entry, with 'adapter')")
    if ("adapter" in o) != ("base" in o):
        key = "adapter" if "base" in o else "base"
        raise VlaBenchError(f"{spec.where(key)}missing: LoRA entries need both 'base' and 'adapter'")
    if "base" in o:
        others = [n for n, s in registry.checkpoints.items() if s.kind == "openvla" and "source" in s.options]
        if o["base"] not in registry.checkpoints:
            raise VlaBenchError(f"{spec.where('base')}no entry {o['base']!r}; openvla entries with a source: "
                                f"{choices(others) or '(none)'}")
        base = registry.checkpoints[o["base"]]
        if base.kind != "openvla" or "source" not in base.options:
            raise VlaBenchError(f"{spec.where('base')}{o['base']!r} must be an openvla entry with a 'source'; "
                                f"candidates: {choices(others) or '(none)'}")
    if "dtype" in o and o["dtype"] not in _DTYPES:
        raise VlaBenchError(f"{spec.where('dtype')}unknown dtype {o['dtype']!r}; valid: {choices(_DTYPES)}")
    if "device" in o and not _DEVICE.match(o["device"]):
        raise VlaBenchError(f"{spec.where('device')}unknown device {o['device']!r}; valid: auto, cpu, cuda, cuda:N")
    if "prompt" in o and o["prompt"] not in TEMPLATES:
        raise VlaBenchError(f"{spec.where('prompt')}unknown prompt {o['prompt']!r}; valid: {choices(TEMPLATES)}")
    if "action_repeat" in o:
        check_action_repeat(o["action_repeat"], spec.where("action_repeat"))


def _base_spec(spec, registry):
    return registry.checkpoints[spec.options["base"]] if "base" in spec.options else spec


def _option(spec, registry, key, default):
    """An entry's own option, else its base entry's (adapters inherit dtype, device, crop, prompt), else default."""
    if key in spec.options:
        return spec.options[key]
    return _base_spec(spec, registry).options.get(key, default)


def _dir(spec, key):
    path = spec.resolve_path(spec.options[key])
    if not path.is_dir():
        raise VlaBenchError(f"{spec.where(key)}{path}: no such directory")
    return path


def _run_config_repeat(folder) -> int | None:
    """The action_repeat of the train_config.json that `vla-bench finetune` wrote with these weights (in the
    folder, or the run folder above it: runs/NAME/{adapter,model,merged}), or None when there is none."""
    for path in (folder / "train_config.json", folder.parent / "train_config.json"):
        if not path.is_file():
            continue
        try:
            execution = json.loads(path.read_text()).get("execution")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(execution, dict) and "action_repeat" in execution:
            return check_action_repeat(execution["action_repeat"], f"{path}: execution.action_repeat: ")
    return None


def action_repeat(spec, registry) -> int:
    """The entry's execution rule: its own action_repeat key, else its weights' run config, else 1 (see above)."""
    if "action_repeat" in spec.options:
        return check_action_repeat(spec.options["action_repeat"], spec.where("action_repeat"))
    found = _run_config_repeat(_dir(spec, "adapter" if "adapter" in spec.options else "source"))
    return 1 if found is None else found


def weights_identity(spec, registry) -> str:
    from .checkpoint import folder_identity

    base = _base_spec(spec, registry)
    return "openvla:" + folder_identity(_dir(base, "source"))


def identity(spec, registry) -> str:
    from .checkpoint import folder_identity

    ident = weights_identity(spec, registry)
    if "adapter" in spec.options:
        ident += "+lora:" + folder_identity(_dir(spec, "adapter"))
    behaviour = {k: _option(spec, registry, k, None) for k in _BEHAVIOUR}
    repeat = action_repeat(spec, registry)
    if repeat != 1:  # only then, so that identities of entries without action repeat stay as they were
        behaviour["action_repeat"] = repeat
    return ident + "/" + hashlib.sha256(json.dumps(behaviour, sort_keys=True).encode()).hexdigest()[:8]


def build(spec, context):
    from .checkpoint import load_snapshot, read_norm_stats, resolve_device, resolve_dtype
    from .lora import BaseModel
    from .policy import OpenVLAPolicy

    registry = context.registry
    base_spec = _base_spec(spec, registry)
    source = _dir(base_spec, "source")
    dtype_opt = _option(spec, registry, "dtype", "auto")
    # --vla-devices builds one replica per device; the entry's own device otherwise
    device = resolve_device(context.device or _option(spec, registry, "device", "auto"), spec.where("device"))
    dtype = resolve_dtype(dtype_opt, device, spec.where("dtype"))
    key = ("openvla", weights_identity(spec, registry), str(dtype), str(device))
    base = context.cache.get_or_create(key, lambda: BaseModel(load_snapshot(
        source, dtype=dtype_opt, device=str(device), where=base_spec.where("source"))))
    adapter_name = norm_stats = None
    if "adapter" in spec.options:
        folder = _dir(spec, "adapter")
        from .checkpoint import folder_identity

        adapter_name = "a" + folder_identity(folder)  # one PEFT adapter per distinct adapter content
        base.ensure_adapter(adapter_name, folder, spec.where("adapter"))
        if (folder / "dataset_statistics.json").is_file():  # a fine-tune's own action statistics
            norm_stats = read_norm_stats(folder, {}, spec.where("adapter"))
    return OpenVLAPolicy(base, suite=context.suite, adapter=adapter_name,
                         unnorm_key=_option(spec, registry, "unnorm_key", None),
                         center_crop=_option(spec, registry, "center_crop", None),
                         prompt=_option(spec, registry, "prompt", "openvla"), norm_stats=norm_stats,
                         action_repeat=action_repeat(spec, registry), where=spec.where())
