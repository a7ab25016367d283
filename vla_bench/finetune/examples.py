"""Training examples and their order: the cached example arrays, the endless seeded stream of positions over them,
and the batches (with their per-example augmentation) the loop consumes."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from .collate import ActionBatch, Collator

@dataclasses.dataclass
class Examples:
    """Training examples held as arrays: frames at the model's size after the training-side image chain, the
    instruction of each example (an index into `instructions`) and its raw action (training convention)."""
    frames: np.ndarray  # (N, S, S, 3) uint8, may be a np.memmap
    instruction_index: np.ndarray  # (N,) int
    instructions: list[str]
    actions: np.ndarray  # (N, 7) float32

    def __len__(self) -> int:
        return len(self.actions)

    def batch(self, indices) -> tuple[np.ndarray, list[str], np.ndarray]:
        idx = np.asarray(indices)
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to a memmap; results go back in order
        frames = np.empty((len(idx),) + self.frames.shape[1:], np.uint8)
        frames[order] = self.frames[idx[order]]
        return frames, [self.instructions[i] for i in self.instruction_index[idx]], self.actions[idx]


def _prepare_range(data, start: int, stop: int, path: str, shape: tuple, size: int) -> None:
    """Worker: frames [start, stop) of `data` through the training-side image chain into the memmap at `path`."""
    from ..openvla.frames import reference_chain

    # one thread per worker: the resize is a torch einsum, and torch's default of one thread per core in each of
    # N workers oversubscribes the CPU N-fold (measured on a 16-core GPU host: 40 frames/s in all, ~5 ms per frame
    # per worker alone)
    torch.set_num_threads(1)
    frames = np.lib.format.open_memmap(path, mode="r+")
    for i in range(start, stop):
        # upright frames (data.py rotates LIBERO's renders); JPEG + lanczos as the RLDS frames were made; no crop:
        # the random crop is the augmentation's, and evaluation center-crops
        frames[i] = reference_chain(data[i]["image"], flip=False, crop=False, size=size)
    frames.flush()


def prepare_examples(data, size: int, cache: str | os.PathLike, workers: int = 0) -> Examples:
    """A finetune.data.TrainingData -> Examples, its frames prepared once into a .npy memmap at `cache` (reused
    when complete: a resumed run does not redo it). `workers` > 0 spreads the JPEG + resize work over spawned
    processes (spawn, not fork: the parent has torch's thread pools running)."""
    cache = Path(cache)
    n = len(data)
    shape = (n, size, size, 3)
    done = cache.with_suffix(".done")
    if not (done.is_file() and done.read_text().strip() == str(n)):
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(cache, mode="w+", dtype=np.uint8, shape=shape).flush()
        if workers > 0 and n > 64:
            import multiprocessing as mp

            bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
            with mp.get_context("spawn").Pool(workers) as pool:
                pool.starmap(_prepare_range, [(data, int(a), int(b), str(cache), shape, size)
                                              for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
        else:
            _prepare_range(data, 0, n, str(cache), shape, size)
        done.write_text(f"{n}\n")
    instructions = sorted({t.instruction for t in data.trajectories})
    lookup = {t: i for i, t in enumerate(instructions)}
    index = np.concatenate([np.full(len(t), lookup[t.instruction], np.int64) for t in data.trajectories])
    return Examples(np.load(cache, mmap_mode="r"), index, instructions, data.actions().astype(np.float32))


class Stream:
    """An endless, seeded stream of example indices: epoch e is a permutation seeded by (seed, e). Stream position
    p of micro-step m on rank r is m * global + r * batch + i, so any step's batch is known without replaying."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, np.int64)
        for k, p in enumerate(range(start, start + count)):
            epoch = p // self.n
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
                self._perm, self._epoch = torch.randperm(self.n, generator=gen).numpy(), epoch
            out[k] = self._perm[p % self.n]
        return out


def augment_params(cfg_aug, seed: int, positions) -> torch.Tensor:
    from .augment import sample_params

    gens = (torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1, int(p)]).generate_state(1)[0]))
            for p in positions)
    return torch.stack([sample_params(cfg_aug, g) for g in gens])


def make_batch(collator: Collator, examples: Examples, indices, device, aug_seed: int | None = None,
               positions=None) -> ActionBatch:
    frames, instructions, actions = examples.batch(indices)
    params = None
    if aug_seed is not None and collator.augment is not None:
        params = augment_params(collator.augment, aug_seed, positions)
    return collator(frames, instructions, actions, params, device)
