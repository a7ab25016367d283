"""One loaded base model serving any number of LoRA adapters (PEFT's standard adapter layout).

A `BaseModel` is what the session's model cache holds: the snapshot (model, tokenizer, norm stats) and, once the
first adapter is asked for, a PeftModel wrapped around it in place. Every adapter is loaded once under its own name
and switched with `set_adapter`; running the base means running with adapters disabled, so the base's outputs are
bit-identical to a model that never saw an adapter (PEFT's disabled LoRA layers call the original layer only).
Adapters are never merged into the weights, because merging changes the base for everyone who shares it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..errors import VlaBenchError, choices

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class BaseModel:
    def __init__(self, snapshot):
        self.snapshot = snapshot
        self.peft = None  # peft.PeftModel once an adapter is loaded
        self.adapters: dict[str, Path] = {}  # PEFT adapter name -> folder
        from .fast_generator import FastGenerator

        self.generator = FastGenerator(snapshot.model)

    @property
    def model(self):
        return self.snapshot.model

    def ensure_adapter(self, name: str, folder: Path, where: str = "") -> None:
        """Load the adapter in `folder` under `name` unless it is loaded already."""
        if name in self.adapters:
            return
        check_adapter(folder, self.model, where)
        try:
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
            else:
                self.peft.load_adapter(str(folder), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:  # PEFT's size mismatches and config errors
            raise VlaBenchError(f"{where}{folder}: the adapter does not fit the base model ({e})") from None
        self.peft.eval()
        self.adapters[name] = folder

    @contextlib.contextmanager
    def active(self, adapter: str | None):
        """Run the block with exactly `adapter` active, or the bare base model when adapter is None."""
        if self.peft is None:
            if adapter is not None:
                raise KeyError(f"adapter {adapter!r} is not loaded")
            yield
            return
        if adapter is None:
            with self.peft.disable_adapter():
                yield
            return
        self.peft.set_adapter(adapter)
        yield


def check_adapter(folder: Path, model, where: str = "") -> None:
    """Refuse an adapter whose files are missing or whose LoRA matrices do not fit the base's layers, naming a few
    of the offending modules (PEFT itself would either fail with a bare size mismatch or silently skip modules)."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise VlaBenchError(f"{where}{folder}: no such adapter directory")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            extra = " (only safetensors adapters are loaded)" if name == ADAPTER_WEIGHTS else ""
            raise VlaBenchError(f"{where}{folder / name}: missing; expected PEFT's adapter layout{extra}")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise VlaBenchError(f"{where}{folder / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}; only LORA adapters "
                            "are supported")
    modules = dict(model.named_modules())
    problems = []
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            path, part = (key.split(".lora_A.")[0], "A") if ".lora_A." in key else (key.split(".lora_B.")[0], "B")
            path = path[len(_PEFT_PREFIX):] if path.startswith(_PEFT_PREFIX) else path
            target = modules.get(path)
            if target is None:
                problems.append(f"{path} (no such layer)")
                continue
            shape = f.get_slice(key).get_shape()
            n_in = getattr(target, "in_features", getattr(target, "in_channels", None))
            n_out = getattr(target, "out_features", getattr(target, "out_channels", None))
            if part == "A" and len(shape) >= 2 and n_in is not None and shape[1] != n_in and len(shape) == 2:
                problems.append(f"{path} (input {n_in}, adapter {shape[1]})")
            if part == "B" and n_out is not None and shape[0] != n_out:
                problems.append(f"{path} (output {n_out}, adapter {shape[0]})")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        base = cfg.get("base_model_name_or_path")
        raise VlaBenchError(f"{where}{folder}: adapter does not match the base model"
                            + (f" (it was trained on {base!r})" if base else "")
                            + f": {choices(problems[:5])}{more}")
