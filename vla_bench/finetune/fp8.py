"""FP8 frozen base for LoRA (`vla-bench finetune --fp8-base`): the frozen nn.Linear under every LoRA layer runs its
two GEMMs (the forward, and the gradient of its input) in FP8 e4m3 with row-wise scales through torch._scaled_mm,
and its bf16 weight is dropped.

Why a layer of our own and not torchao's Float8Linear: the base weight is frozen, so it is quantized once here (not
on every pass), and there is no weight-gradient GEMM at all (Float8Linear computes one); torchao is also not
installed on the GPU host.

Layouts. Hopper's FP8 GEMM (cuBLASLt / CUTLASS behind torch._scaled_mm) takes its first operand row-major and its
second column-major only. The forward is x @ W^T and needs W (N, K) row-major (whose .t() is the column-major
(K, N) operand); the input gradient is dY @ W and needs W^T (K, N) row-major (whose .t() is the column-major (N, K)
operand). So both copies are kept: two 1-byte copies take the memory of the one bf16 weight they replace.

Scales. The weight has one scale per output row (N): in the forward that is the second operand's per-column scale,
which _scaled_mm takes as scale_b (1, N). In the input-gradient GEMM the same N is the contraction dimension, where
_scaled_mm takes no scale, so it is folded into dY first (dY * s, column by column) and the product is quantized per
row, against a unit scale_b. Activations and gradients are quantized per row (token) on the fly: scale_a (M, 1).
All scales are float32 and multiply (dequantize): x ~= x8 * scale_x.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import VlaBenchError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value
# the smallest scale used: an all-zero row (amax 0) would otherwise divide by zero; float32's smallest normal keeps
# every scale a normal number (a subnormal scale would lose the precision the quantization is bounded by)
MIN_SCALE = torch.finfo(torch.float32).tiny
# _scaled_mm's FP8 kernels need K and N (and so both dims of the weight) to be multiples of 16
ALIGN = 16
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor (M, K) -> (e4m3 values (M, K), float32 scales (M, 1)) with x ~= values * scale row by row: each
    row's largest magnitude maps to e4m3's largest value, 448. Values are clamped to +-448 before the cast (a
    rounding of x / scale can exceed it by an ulp, and the cast does not saturate on every device)."""
    amax = x.detach().abs().amax(dim=1, keepdim=True).float()
    scale = (amax / E4M3_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (values.float() * scale).to(dtype)


def fp8_matmul(a8: torch.Tensor, b8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """(a8 * scale_a) @ (b8 * scale_b) -> out_dtype: a8 (M, K) row-major, b8 (K, N) column-major, scale_a (M, 1),
    scale_b (1, N). On CUDA the row-wise kernel writes bf16 (the one output type every torch version's row-wise
    path accepts), cast after; the CPU kernel writes the asked type directly."""
    mm_dtype = torch.bfloat16 if a8.is_cuda else out_dtype
    out = torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=mm_dtype, use_fast_accum=fast_accum)
    return out if out.dtype == out_dtype else out.to(out_dtype)


class _FrozenFP8Matmul(torch.autograd.Function):
    """y = x @ W^T for a frozen W held as FP8; the backward computes the input's gradient only."""

    @staticmethod
    def forward(ctx, x, weight8, weight8_t, weight_scale, unit_scale, out_dtype):
        n, k = weight8.shape
        lead = x.shape[:-1]
        # autocast off inside: the casts are explicit, and nothing here may be re-cast (the FP8 operands least)
        with torch.autocast(x.device.type, enabled=False):
            x8, x_scale = quantize_rows(x.reshape(-1, k))
            # fast accumulation in the forward GEMM, exact in the gradient's: torchao's float8 recipe does the same
            y = fp8_matmul(x8, weight8.t(), x_scale, weight_scale, out_dtype, fast_accum=True)
        ctx.save_for_backward(weight8_t, weight_scale, unit_scale)  # not x: there is no weight gradient to compute
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(*lead, n)

    @staticmethod
    def backward(ctx, grad_out):
        weight8_t, weight_scale, unit_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        k, n = weight8_t.shape
        with torch.autocast(grad_out.device.type, enabled=False):
            # the weight's row scales lie along this GEMM's contraction dim: fold them into dY, then quantize per row
            g8, g_scale = quantize_rows(grad_out.reshape(-1, n).float() * weight_scale)
            grad_x = fp8_matmul(g8, weight8_t.t(), g_scale, unit_scale, ctx.x_dtype, fast_accum=False)
        return grad_x.view(ctx.x_shape), None, None, None, None, None


class FP8FrozenLinear(nn.Module):
    """A frozen nn.Linear whose weight is held in FP8 e4m3 (row-wise scales, two layouts: see the module docstring)
    and whose GEMMs run in FP8. The bias, if any, is the original frozen parameter.

    `weight` keeps what peft and the model read of a base layer's weight (shape, dtype, device: e.g. OpenVLA.dtype
    reads projector.fc1.weight.dtype through peft) at no memory: a NaN broadcast to (out, in). Anything that computes
    with it gets NaNs, and any write to it fails (a broadcast view cannot be written), rather than silently using a
    wrong weight; `dequantized_weight()` gives the values back."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        n, k = weight.shape
        if n % ALIGN or k % ALIGN:
            raise ValueError(f"FP8 GEMMs need both weight dims to be multiples of {ALIGN}, got ({n}, {k})")
        self.in_features, self.out_features = k, n
        weight8, scale = quantize_rows(weight)
        # non-persistent: not in any state dict (a state dict never carries FP8 copies under a bf16 weight's name)
        self.register_buffer("weight8", weight8, persistent=False)  # (N, K) row-major: the forward's operand
        self.register_buffer("weight8_t", weight8.t().contiguous(), persistent=False)  # (K, N): the input gradient's
        self.register_buffer("weight_scale", scale.view(1, n).contiguous(), persistent=False)  # (1, N) float32
        self.register_buffer("unit_scale", torch.ones(1, k, device=weight.device), persistent=False)
        self.register_buffer("weight_stub", torch.full((), float("nan"), dtype=weight.dtype, device=weight.device),
                             persistent=False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self.register_parameter("bias", linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_stub.expand(self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the FP8 copy holds it, in `dtype` (default: the original weight's dtype)."""
        return dequantize_rows(self.weight8, self.weight_scale.view(-1, 1), dtype or self.weight_stub.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        # under autocast the output has autocast's dtype, as nn.Linear's would; otherwise the input's
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = _FrozenFP8Matmul.apply(x, self.weight8, self.weight8_t, self.weight_scale, self.unit_scale, dtype)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


# ---- converting a peft model --------------------------------------------------------------------------------------
def _lora_layers(model: nn.Module):
    """(name, layer) of every peft LoRA layer (BaseTunerLayer) in `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _frozen_linear(layer) -> nn.Linear | None:
    base = getattr(layer, "base_layer", None)
    if type(base) is nn.Linear and not base.weight.requires_grad:
        return base
    return None


def check_fp8_device(device: torch.device) -> None:
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise VlaBenchError(f"--fp8-base needs a GPU with FP8 tensor cores (compute capability "
                            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer: Ada, Hopper, Blackwell); "
                            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: drop --fp8-base")


def convert_frozen_linears_to_fp8(model: nn.Module) -> int:
    """Swap the frozen nn.Linear base layer of every peft LoRA layer in `model` for an FP8FrozenLinear, freeing the
    bf16 weights as it goes (one layer's FP8 copies exist next to its bf16 weight at a time). Layers whose dims are
    not multiples of 16 stay as they are (skipped_fp8_layers lists them). Returns the number converted."""
    converted = 0
    for _, layer in _lora_layers(model):
        base = _frozen_linear(layer)
        if base is None or base.in_features % ALIGN or base.out_features % ALIGN:
            continue
        check_fp8_device(base.weight.device)
        layer.base_layer = FP8FrozenLinear(base)  # the old nn.Linear, and its bf16 weight, are no longer referenced
        converted += 1
    return converted


def skipped_fp8_layers(model: nn.Module) -> list[str]:
    """Names of the LoRA layers whose frozen nn.Linear stays in its own dtype (dims not multiples of 16)."""
    return [name for name, layer in _lora_layers(model) if _frozen_linear(layer) is not None]


def fp8_buffer_names(model: nn.Module) -> list[str]:
    """Names (as model.named_buffers gives them) of the FP8 layers' buffers: what DDP must not broadcast."""
    return [f"{prefix}.{name}" if prefix else name for prefix, m in model.named_modules()
            if isinstance(m, FP8FrozenLinear) for name, _ in m.named_buffers(recurse=False)]


def restore_frozen_linears(model: nn.Module, snapshot: str | Path | None = None) -> int:
    """The inverse of convert_frozen_linears_to_fp8, for what needs the real weights (merging an adapter): every
    FP8FrozenLinear becomes an nn.Linear again, its weight read back from the snapshot it was loaded from (exact),
    or without a snapshot dequantized from the FP8 copy (approximate). `model` is the module the snapshot's key
    names are relative to (the OpenVLA module, peft layers inside). Returns the number restored."""
    from safetensors import safe_open

    from ..openvla.checkpoint import published_key, weight_map

    wmap = weight_map(Path(snapshot)) if snapshot is not None else None
    restored = 0
    for name, layer in _lora_layers(model):
        fp8 = getattr(layer, "base_layer", None)
        if not isinstance(fp8, FP8FrozenLinear):
            continue
        dtype, device = fp8.weight_stub.dtype, fp8.weight_stub.device
        if wmap is None:
            weight = fp8.dequantized_weight(dtype)
        else:
            key = published_key(f"{name}.weight")  # a LoRA layer sits where the wrapped nn.Linear sat
            with safe_open(str(wmap[key]), framework="pt", device=str(device)) as f:
                weight = f.get_tensor(key).to(dtype)
        with torch.device("meta"):
            linear = nn.Linear(fp8.in_features, fp8.out_features, bias=False)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.register_parameter("bias", fp8.bias)
        layer.base_layer = linear
        restored += 1
    return restored
