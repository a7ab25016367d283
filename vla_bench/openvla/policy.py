"""The OpenVLA Policy: camera frames and instructions in, environment actions out, batched over env slots.

Per suite, its record (vla_bench/suites.py) says which observation key holds the frame, whether it needs LIBERO's
180-degree rotation and OpenVLA's center crop, which gripper convention the actions go out in, and the default
norm-stats keys. The chain per step is the
reference's: frame chain (frames.py, run by the env workers) -> uint8 frames to the model's device, normalized
there (image.pixel_values_on) -> prompt (prompt.py) -> greedy 7 tokens (fast_generator.py) -> bin centres
(action_tokenizer.py) -> unnormalize (normalization.py) -> gripper (vla_bench/gripper.py).

`prepare(max_batch)` builds the generator's graphs for every batch and prompt bucket a run can use, before its
first episode, so that no step waits for a graph capture.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .. import gripper
from ..errors import VlaBenchError, choices
from ..policies.capabilities import Capabilities
from ..policies.repeat import ActionRepeater
from ..suites import Suite, get_suite
from . import action_tokenizer, frames, image, normalization
from .prompt import build_prompt


def resolve_unnorm_key(norm_stats: dict, requested: str | None, suite: Suite, where: str = "") -> str:
    present = sorted(norm_stats)
    if not present:
        raise VlaBenchError(f"{where}the checkpoint has no norm stats (config.json norm_stats or "
                            "dataset_statistics.json)")
    if requested is not None:
        if requested not in norm_stats:
            raise VlaBenchError(f"{where}unnorm_key {requested!r} is not in the checkpoint's norm stats; "
                                f"present: {choices(present)}")
        return requested
    for key in suite.unnorm_keys:
        if key in norm_stats:
            return key
    if len(present) == 1:
        return present[0]
    tried = f" (tried {choices(suite.unnorm_keys)})" if suite.unnorm_keys else ""
    raise VlaBenchError(f"{where}set unnorm_key: no default norm stats for this suite{tried}; "
                        f"present: {choices(present)}")


@dataclasses.dataclass
class Inference:
    actions: np.ndarray  # (B, 7) in the environment's convention
    tokens: np.ndarray  # (B, 7) generated ids
    frames: list[np.ndarray]  # the 224x224 frames the model saw (the reference records these as videos)
    logits: object = None  # (B, 7, V) torch tensor when asked for


class OpenVLAPolicy:

    def __init__(self, base, suite: str, adapter: str | None = None, unnorm_key: str | None = None,
                 center_crop: bool | None = None, prompt: str = "openvla", norm_stats: dict | None = None,
                 action_repeat: int = 1, where: str = ""):
        self.base = base
        self.adapter = adapter
        self.suite = get_suite(suite)
        self.center_crop = self.suite.center_crop if center_crop is None else center_crop
        self.prompt = prompt
        stats = base.snapshot.norm_stats if norm_stats is None else norm_stats
        self.unnorm_key = resolve_unnorm_key(stats, unnorm_key, self.suite, where)
        self.stats = normalization.action_stats(stats, self.unnorm_key, where)
        self.repeater = ActionRepeater(action_repeat)  # the execution rule of a subsampled fine-tune (k = 1: none)
        self.action_repeat = self.repeater.action_repeat
        # env workers run the image chain on their own frames, in parallel (policies/base.py)
        self.observation_transform = frames.FrameChain(self.suite.image_key, self.suite.flip,
                                                      self.center_crop, base.model.arch.image_size)
        self._prompt_ids: dict[str, tuple[int, ...]] = {}
        self.capabilities = Capabilities(images=True, frame_transform=self.observation_transform,
                                         chunk_length=self.action_repeat)

    @property
    def device(self):
        """The device the model's weights are on (recorded with every result row)."""
        return next(self.base.model.parameters()).device

    def reset(self, slot: int, seed: int) -> None:
        """A new episode in `slot`: its action-repeat phase restarts (greedy decoding itself keeps no state)."""
        self.repeater.reset(slot)

    def frame(self, observation: dict) -> np.ndarray:
        return self.observation_transform.frame(observation)

    def prompt_ids(self, instruction: str) -> tuple[int, ...]:
        """The token ids of an instruction's prompt, tokenized once per instruction (a run repeats a few of them at
        every step of every episode)."""
        ids = self._prompt_ids.get(instruction)
        if ids is None:
            ids = tuple(self.base.snapshot.tokenizer.encode(build_prompt(instruction, self.prompt)))
            self._prompt_ids[instruction] = ids
        return ids

    def instructions(self) -> list[str]:
        """The instructions of the suite's tasks (closed-loop suites; an open-loop suite's come with its data)."""
        if not self.suite.closed_loop:
            raise VlaBenchError(f"{self.suite.name} is an open-loop suite: its instructions come with its episodes; "
                                "pass them to prepare(max_batch, instructions)")
        from ..envs.tasks import suite_tasks

        return [task.language for task in suite_tasks(self.suite.name)]

    def prepare(self, max_batch: int, instructions: Sequence[str] | None = None) -> int:
        """Build (on CUDA: capture) every graph that calls of at most `max_batch` observations with these
        instructions (default: the suite's tasks') can replay, so that no call of the run captures one. Returns the
        number built now (0 when an earlier prepare covered them)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        texts = self.instructions() if instructions is None else list(instructions)
        if not texts:
            raise ValueError("prepare needs at least one instruction")
        model = self.base.model
        lengths = [len(self.prompt_ids(text)) for text in texts]
        shape = (3 * len(model.arch.timm_model_ids), model.arch.image_size, model.arch.image_size)
        with self.base.active(self.adapter):
            return self.base.generator.warm_up(max_batch, lengths, shape, max_new_tokens=len(self.stats["q01"]),
                                               variant=self.adapter)

    def infer(self, observations: Sequence[dict], instructions: Sequence[str], return_logits: bool = False
              ) -> Inference:
        """One model prediction per observation, as the model means it (under action_repeat k: one k-step window);
        `act` applies the execution rule."""
        model = self.base.model
        frames = [self.frame(o) for o in observations]
        # the frames go to the device as uint8 (3 bytes a pixel; the two towers' float32 pixel values are 24) and
        # are normalized there, in the model's dtype
        pixels = image.pixel_values_on(frames, model.arch.timm_model_ids, model.device, model.dtype,
                                       model.arch.image_size)
        prompts = [self.prompt_ids(text) for text in instructions]
        with self.base.active(self.adapter):
            out = self.base.generator.generate(pixels, prompts, max_new_tokens=len(self.stats["q01"]),
                                               variant=self.adapter, return_logits=return_logits)
        ids, logits = out if return_logits else (out, None)
        ids = ids.cpu().numpy()
        normalized = action_tokenizer.decode(ids, model.arch.action_vocab_size)
        actions = normalization.unnormalize(normalized, self.stats["q01"], self.stats["q99"], self.stats["mask"])
        return Inference(actions=gripper.postprocess(actions, self.suite.gripper), tokens=ids, frames=frames,
                         logits=logits)

    def act(self, observations: Sequence[dict], instructions: Sequence[str], slots: Sequence[int]) -> np.ndarray:
        if not (len(observations) == len(instructions) == len(slots)):
            raise ValueError("observations, instructions and slots must have the same length")
        # the model runs only for the slots whose repeated action has run out (all of them when action_repeat = 1)
        return self.repeater.act(slots, lambda rows: self.infer([observations[r] for r in rows],
                                                                [instructions[r] for r in rows]).actions)
