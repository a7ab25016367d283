"""Training batches for the OpenVLA family: (frame, instruction, raw action) -> pixel values, input ids, labels.

Text: BOS + prompt + "▁" (exactly what the policy feeds at inference: prompt.py + tokenizer.py), then the 7 action
tokens (normalization.py's BOUNDS_Q99, action_tokenizer.py's bins), then EOS. Labels are IGNORE (-100) everywhere
except the action tokens and EOS, as in the reference (its loss is HF's mean cross-entropy over those 8 tokens per
sample; `eos_loss=False` drops EOS from the loss). Rows are right-padded with the pad id, as the reference's
collator does: with causal attention a real token never attends to a later pad, so no attention mask is needed.
Rows are padded to the batch's longest, or to `pad_to` when it is set (a captured CUDA-graph step needs one shape
for every batch; the extra pads change nothing for the real tokens, by the same causality).

Images: frames come at the model's size after the training-side chain (flip where the data needs it, JPEG, lanczos
resize: frames.reference_chain with crop=False). The optional augmentation (augment.py) runs on the batch's device,
then each backbone's mean/std (image.backbone_norms, the one home of those numbers) makes the stacked pixel values.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import torch

from ..openvla import action_tokenizer, normalization
from ..openvla.image import backbone_norms
from ..openvla.prompt import build_prompt
from . import augment as aug

IGNORE_INDEX = -100


@dataclasses.dataclass
class ActionBatch:
    pixel_values: torch.Tensor  # (B, 3 * towers, S, S) float32
    input_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX except the target tokens
    n_action: int  # action tokens per row (7): the first n_action targets of each row are actions, then EOS
    n_target: int | None = None  # labelled positions per row, the same in every row: n_action (+ 1 with EOS loss)

    def to(self, device) -> "ActionBatch":
        return dataclasses.replace(self, pixel_values=self.pixel_values.to(device, non_blocking=True),
                                   input_ids=self.input_ids.to(device, non_blocking=True),
                                   labels=self.labels.to(device, non_blocking=True))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class Collator:
    def __init__(self, tokenizer, arch, stats: Mapping[str, np.ndarray], prompt: str = "openvla",
                 eos_loss: bool = True, augment: aug.AugmentConfig | None = None, pad_to: int | None = None):
        self.tokenizer = tokenizer  # openvla.tokenizer.PromptTokenizer
        self.arch = arch
        self.stats = stats  # {"q01", "q99", "mask"} of the unnorm key (normalization.action_stats)
        self.prompt = prompt
        self.eos_loss = eos_loss
        self.augment = augment
        self.pad_to = pad_to  # fixed row length (None: the batch's longest row)
        self.vocab = arch.action_vocab_size
        self.pad_id = int(arch.text_config.get("pad_token_id", self.vocab))
        self.eos_id = tokenizer.tokenizer.token_to_id("</s>")
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token '</s>'")
        self._prompts: dict[str, list[int]] = {}
        norms = backbone_norms(tuple(arch.timm_model_ids))
        self.mean = torch.tensor([m for mean, _ in norms for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor([s for _, std in norms for s in std], dtype=torch.float32).view(1, -1, 1, 1)

    def action_ids(self, actions) -> np.ndarray:
        """Raw actions (B, D) -> action token ids (B, D)."""
        s = self.stats
        return action_tokenizer.encode(normalization.normalize(actions, s["q01"], s["q99"], s["mask"]), self.vocab)

    def prompt_ids(self, instruction: str) -> list[int]:
        if instruction not in self._prompts:  # a dataset has a handful of instructions and many frames
            self._prompts[instruction] = self.tokenizer.encode(build_prompt(instruction, self.prompt))
        return self._prompts[instruction]

    def text(self, instructions: Sequence[str], actions) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = self.action_ids(actions)
        n_action = ids.shape[1]
        rows = [self.prompt_ids(t) + row.tolist() + [self.eos_id] for t, row in zip(instructions, ids)]
        width = max(len(r) for r in rows)
        if self.pad_to is not None:
            if width > self.pad_to:
                raise ValueError(f"a row of {width} tokens does not fit the fixed length {self.pad_to} (pad_to)")
            width = self.pad_to
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        n_target = self.n_target(n_action)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            start = len(r) - n_action - 1
            labels[i, start: start + n_target] = input_ids[i, start: start + n_target]
        return input_ids, labels, n_action

    def pixels(self, frames, aug_params: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """uint8 (B, S, S, 3) frames -> normalized pixel values on `device`, augmented when params are given."""
        x = torch.as_tensor(np.ascontiguousarray(frames)).to(device)
        size = self.arch.image_size
        if tuple(x.shape[1:]) != (size, size, 3) or x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames of shape (B, {size}, {size}, 3), got {x.dtype} {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
        if aug_params is not None and self.augment is not None:
            x = aug.to_uint8_levels(aug.apply(x, aug_params, self.augment)).div(255.0)
        towers = len(self.arch.timm_model_ids)
        x = x.repeat(1, towers, 1, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def row_length(self, instruction: str, n_action: int) -> int:
        """Tokens of a row for `instruction`: the prompt, the action tokens and EOS (the unpadded length)."""
        return len(self.prompt_ids(instruction)) + n_action + 1

    def n_target(self, n_action: int) -> int:
        return n_action + (1 if self.eos_loss else 0)

    def __call__(self, frames, instructions: Sequence[str], actions, aug_params: torch.Tensor | None = None,
                 device=None) -> ActionBatch:
        input_ids, labels, n_action = self.text(instructions, actions)
        return ActionBatch(self.pixels(frames, aug_params, device), input_ids.to(device), labels.to(device),
                           n_action, self.n_target(n_action))
