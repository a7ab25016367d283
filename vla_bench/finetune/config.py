"""The fine-tune's configuration: every knob of a run, with the published recipe's defaults (OPENVLA.md §5), and
the learning-rate schedule it implies."""
from __future__ import annotations

import dataclasses
import math



@dataclasses.dataclass
class TrainConfig:
    base: str  # snapshot dir in the published layout
    out: str  # run folder
    unnorm_key: str
    # LoRA or full fine-tune
    lora: bool = True
    lora_rank: int = 32
    lora_alpha: float | None = None  # None: min(rank, 16), the published rule
    lora_dropout: float = 0.0
    lora_target: str = "published"  # published | all-linear | llm | comma-separated module names
    lora_init: str = "gaussian"
    # optimisation
    max_steps: int = 1000
    batch_size: int = 16  # per process (micro-batch); global = batch_size * world * grad_accum
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01  # torch's AdamW default, which the reference keeps
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    max_grad_norm: float | None = None  # the reference does not clip
    # precision and memory
    device: str = "auto"
    bf16: bool | None = None  # None: bf16 autocast (and bf16 frozen base weights for LoRA) on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (compile_blocks)
    fp8_base: bool = False  # frozen base linears of the LoRA layers in FP8 (fp8.py; LoRA on an FP8 GPU or the CPU)
    cuda_graph: bool = False  # capture the whole training step as one CUDA graph (cuda_graph.py)
    # data
    image_aug: bool = True
    eos_loss: bool = True
    prompt: str = "openvla"
    # loop
    seed: int = 7
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 1
    progress: bool = True
    merge: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
