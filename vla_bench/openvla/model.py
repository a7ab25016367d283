"""The native Prismatic/OpenVLA model on current libraries: timm 1.x vision towers, transformers 5.x Llama.

Architecture (OpenVLA-7B): DINOv2-reg4 ViT-L/14 and SigLIP SO400M/14 at 224 px, each read after its second-to-last
block with prefix tokens dropped and no final norm; their 256 patch features are concatenated (1024 + 1152 = 2176)
and projected by a 3-layer GELU MLP into Llama-2's 4096-dim embedding space; the 256 patch embeddings are spliced
into the prompt right after BOS. Module names equal the published checkpoint's key prefixes (`vision_backbone.
featurizer`, `vision_backbone.fused_featurizer`, `projector.fc1..3`, `language_model`), so a state dict maps 1:1
apart from timm's LayerScale `gamma`, which the published files call `scale_factor` (see checkpoint.py).

Batched greedy decoding: rows are left-padded so that every row's last prompt token sits in the same column and the
decode steps are one column each. Padding never reaches the real tokens: a 4-D additive mask hides pad keys from
every query (each pad query sees only itself, so no softmax row is empty), and position ids count from 0 at each
row's BOS, so a row's numbers do not depend on its neighbours.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

#: Llama hyper-parameters the published config.json leaves out: the conversion script built text_config from
#: transformers 4.40's LlamaConfig() defaults (note rms_norm_eps 1e-6 and 2048 positions, not Llama-2-hf's 1e-5 and
#: 4096). Pinned here so that a change of transformers' defaults cannot change the model.
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}
#: keys of text_config that describe the architecture; the rest (torch_dtype, model_type, ...) are bookkeeping
_LLAMA_ARCH_KEYS = set(LLAMA_DEFAULTS) | {"head_dim", "rope_scaling", "rope_parameters", "attention_dropout"}

#: the architecture fields of openvla/openvla-7b's config.json (reconstructed from the conversion script; the
#: published file adds norm_stats, architectures and auto_map)
OPENVLA_7B_CONFIG: dict[str, Any] = {
    "model_type": "openvla", "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
    "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
    "hf_llm_id": "meta-llama/Llama-2-7b-hf", "image_resize_strategy": "resize-naive", "image_sizes": [224, 224],
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None], "llm_max_length": 2048, "n_action_bins": 256,
    "output_projector_states": False, "pad_to_multiple_of": 64, "pad_token_id": 32000, "torch_dtype": "bfloat16",
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
}

FUSED_ARCH = "no-align+fused-gelu-mlp"
SINGLE_ARCH = "no-align+gelu-mlp"


@dataclasses.dataclass(frozen=True)
class Arch:
    """Everything that shapes the network, parsed from (and written back to) the published config.json."""
    timm_model_ids: tuple[str, ...]
    image_size: int
    arch_specifier: str
    text_config: Mapping[str, Any]
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    timm_override_act_layers: tuple[str | None, ...] = (None, None)
    # vla-bench extension, absent from published files: timm constructor overrides for tiny test towers
    timm_model_kwargs: tuple[Mapping[str, Any], ...] = ()

    @property
    def fused(self) -> bool:
        return len(self.timm_model_ids) == 2

    @property
    def llama_kwargs(self) -> dict[str, Any]:
        kw = dict(LLAMA_DEFAULTS)
        kw.update({k: v for k, v in self.text_config.items() if k in _LLAMA_ARCH_KEYS})
        return kw

    @property
    def action_vocab_size(self) -> int:
        """The base vocabulary size that action ids count down from (32000: the padded 32064 rows minus 64)."""
        return int(self.llama_kwargs["vocab_size"]) - self.pad_to_multiple_of

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Arch":
        ids = tuple(cfg["timm_model_ids"])
        fused = cfg.get("use_fused_vision_backbone")
        fused = len(ids) == 2 if fused is None else bool(fused)
        if not fused:
            ids = ids[:1]
        sizes = cfg.get("image_sizes", [224, 224])
        if len(set(sizes[: len(ids)])) != 1:
            raise ValueError(f"towers with different image sizes are not supported: {sizes}")
        arch = cfg.get("arch_specifier", FUSED_ARCH if fused else SINGLE_ARCH)
        if arch != (FUSED_ARCH if fused else SINGLE_ARCH):
            raise ValueError(f"unsupported arch_specifier {arch!r} for {'fused' if fused else 'single'} towers")
        acts = tuple(cfg.get("timm_override_act_layers") or [None] * len(ids))[: len(ids)]
        return cls(timm_model_ids=ids, image_size=int(sizes[0]), arch_specifier=arch,
                   text_config=dict(cfg.get("text_config") or {}),
                   pad_to_multiple_of=int(cfg.get("pad_to_multiple_of", 64)),
                   n_action_bins=int(cfg.get("n_action_bins", 256)), timm_override_act_layers=acts,
                   timm_model_kwargs=tuple(cfg.get("vla_bench_timm_kwargs") or ()))

    def to_config(self) -> dict[str, Any]:
        """The config.json fields of the published layout (norm_stats are added by the writer)."""
        cfg = {
            "model_type": "openvla",
            "arch_specifier": self.arch_specifier,
            "use_fused_vision_backbone": self.fused,
            "timm_model_ids": list(self.timm_model_ids),
            "timm_override_act_layers": list(self.timm_override_act_layers),
            "image_sizes": [self.image_size] * len(self.timm_model_ids),
            "image_resize_strategy": "resize-naive",
            "text_config": dict(self.text_config),
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "pad_token_id": self.text_config.get("pad_token_id", 32000),
            "n_action_bins": self.n_action_bins,
            "llm_max_length": 2048,
            "output_projector_states": False,
            "torch_dtype": "bfloat16",
        }
        if self.timm_model_kwargs:
            cfg["vla_bench_timm_kwargs"] = [dict(k) for k in self.timm_model_kwargs]
        return cfg


def _tower(model_id: str, image_size: int, act_layer: str | None, kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    extra = dict(kwargs)
    if act_layer is not None:
        extra["act_layer"] = act_layer
    return timm.create_model(model_id, pretrained=False, num_classes=0, img_size=image_size, **extra)


def _patch_features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens after the second-to-last block, prefix (cls/register) tokens dropped, no final norm; the last
    block is skipped because its output is never used."""
    (feats,) = vit.forward_intermediates(x, indices=[len(vit.blocks) - 2], stop_early=True, norm=False,
                                         output_fmt="NLC", intermediates_only=True)
    return feats


class VisionBackbone(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        kw = list(arch.timm_model_kwargs) + [{}] * (len(arch.timm_model_ids) - len(arch.timm_model_kwargs))
        self.featurizer = _tower(arch.timm_model_ids[0], arch.image_size, arch.timm_override_act_layers[0], kw[0])
        self.embed_dim = self.featurizer.embed_dim
        if arch.fused:
            self.fused_featurizer = _tower(arch.timm_model_ids[1], arch.image_size, arch.timm_override_act_layers[1],
                                           kw[1])
            self.embed_dim += self.fused_featurizer.embed_dim

    @property
    def num_patches(self) -> int:
        return self.featurizer.patch_embed.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "fused_featurizer"):
            return _patch_features(self.featurizer, pixel_values)
        first, second = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([_patch_features(self.featurizer, first),
                          _patch_features(self.fused_featurizer, second)], dim=2)


class Projector(nn.Module):
    """Patch features -> LLM embeddings: fc1 (4x width) - GELU - fc2 - GELU - fc3 when fused, fc1 - GELU - fc2 when
    not. GELU is the exact (erf) form, as in the reference."""

    def __init__(self, vision_dim: int, llm_dim: int, fused: bool):
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act_fn1(self.fc1(x)))
        return self.fc3(self.act_fn2(x)) if self.fused else x


@dataclasses.dataclass
class PrefixBatch:
    """A left-padded multimodal prompt batch: [pads][BOS][patches][text tokens] per row."""
    embeds: torch.Tensor  # (B, L, D)
    key_valid: torch.Tensor  # (B, L) bool: False on pads
    positions: torch.Tensor  # (B, L) long: 0 at BOS, counting up; pads 0
    next_position: torch.Tensor  # (B,) long: position of the first generated token


class OpenVLA(nn.Module):
    def __init__(self, arch: Arch, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.arch = arch
        self.vision_backbone = VisionBackbone(arch)
        llama_cfg = LlamaConfig(**arch.llama_kwargs)
        llama_cfg._attn_implementation = attn_implementation
        self.projector = Projector(self.vision_backbone.embed_dim, llama_cfg.hidden_size, arch.fused)
        self.language_model = LlamaForCausalLM(llama_cfg)

    @property
    def num_patches(self) -> int:
        return self.vision_backbone.num_patches

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.fc1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    def set_attn_implementation(self, name: str) -> None:
        """Switch the Llama attention kernel ("sdpa", "eager") without reloading weights."""
        self.language_model.config._attn_implementation = name

    # ---- inputs ---------------------------------------------------------------------------------------------
    def build_prefix(self, pixel_values: torch.Tensor, prompts: Sequence[Sequence[int]]) -> PrefixBatch:
        """Embed B images and B token-id prompts (each starting with BOS) into one left-padded batch."""
        if len(prompts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(prompts)} prompts")
        if any(len(p) < 1 for p in prompts):
            raise ValueError("every prompt needs at least its BOS token")
        dev = self.device
        patches = self.projector(self.vision_backbone(pixel_values.to(dev, self.dtype)))  # (B, P, D)
        b, n_patch, dim = patches.shape
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        t_max = int(lengths.max())
        ids = torch.zeros(b, t_max, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        text = self.language_model.get_input_embeddings()(ids)  # (B, T, D), right-padded
        # one gather puts every row together: source slot 0 is a zero vector (pads), 1..T the text, then patches
        source = torch.cat([patches.new_zeros(b, 1, dim), text, patches], dim=1)
        total = lengths + n_patch
        seq = int(total.max())
        col = torch.arange(seq, device=dev).unsqueeze(0)  # (1, L)
        pad = (seq - total).unsqueeze(1)  # (B, 1)
        rel = col - pad  # index within the row's real tokens; negative on pads
        index = torch.where(rel < 0, 0,
                            torch.where(rel == 0, 1,
                                        torch.where(rel <= n_patch, 1 + t_max + rel - 1, 1 + rel - n_patch)))
        embeds = torch.gather(source, 1, index.unsqueeze(-1).expand(b, seq, dim))
        return PrefixBatch(embeds=embeds, key_valid=rel >= 0, positions=rel.clamp(min=0), next_position=total)

    def _mask(self, key_valid: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
        """Additive (B, 1, q_len, kv_len) mask for queries at the last q_len of the first key_valid.shape[1] columns:
        causal, pad keys hidden, each query always sees itself, columns beyond the keys (static cache) hidden."""
        b, n = key_valid.shape
        dev = key_valid.device
        q_cols = torch.arange(n - q_len, n, device=dev).view(1, q_len, 1)
        k_cols = torch.arange(kv_len, device=dev).view(1, 1, kv_len)
        valid = torch.zeros(b, kv_len, dtype=torch.bool, device=dev)
        valid[:, :n] = key_valid
        allowed = ((k_cols <= q_cols) & valid.unsqueeze(1)) | (k_cols == q_cols)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask.unsqueeze(1)

    # ---- decoding -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, prompts: Sequence[Sequence[int]], max_new_tokens: int = 7,
                 cache: str = "dynamic", return_logits: bool = False):
        """Greedy decoding of max_new_tokens ids after each prompt: (B, n) long, and optionally the (B, n, V)
        logits of each step. cache="static" preallocates the KV cache (the layout the CUDA-graph path uses)."""
        from transformers import DynamicCache, StaticCache

        prefix = self.build_prefix(pixel_values, prompts)
        lm = self.language_model
        b, seq = prefix.key_valid.shape
        if cache == "static":
            kv = StaticCache(config=lm.config, max_cache_len=seq + max_new_tokens)
            kv_len = seq + max_new_tokens
        elif cache == "dynamic":
            kv, kv_len = DynamicCache(config=lm.config), seq
        else:
            raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
        key_valid = prefix.key_valid
        out = lm(inputs_embeds=prefix.embeds, attention_mask=self._mask(key_valid, seq, kv_len),
                 position_ids=prefix.positions, past_key_values=kv, use_cache=True, logits_to_keep=1)
        step_logits = [out.logits[:, -1]]
        tokens = [step_logits[-1].argmax(-1)]
        position = prefix.next_position
        ones = key_valid.new_ones(b, 1)
        for _ in range(max_new_tokens - 1):
            key_valid = torch.cat([key_valid, ones], dim=1)
            if cache == "dynamic":
                kv_len = key_valid.shape[1]
            out = lm(input_ids=tokens[-1].unsqueeze(1), attention_mask=self._mask(key_valid, 1, kv_len),
                     position_ids=position.unsqueeze(1), past_key_values=kv, use_cache=True)
            step_logits.append(out.logits[:, -1])
            tokens.append(step_logits[-1].argmax(-1))
            position = position + 1
        ids = torch.stack(tokens, dim=1)
        return (ids, torch.stack(step_logits, dim=1)) if return_logits else ids
