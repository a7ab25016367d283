"""Tiny OpenVLA configurations for CI: the same timm model ids, image size (224, 256 patches), projector, Llama
class, tokenizer rules and published file layout as OpenVLA-7B, with narrow, shallow towers, a 2-layer Llama and a
small Llama-style BPE tokenizer trained offline. Everything downstream (loading, batching, policy, LoRA) runs the
identical code path on a CPU in well under a second per action.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from .model import Arch

#: tiny towers: timm constructor overrides of the published model ids (widths must divide by the head count)
TINY_TIMM_KWARGS = (
    {"embed_dim": 32, "depth": 3, "num_heads": 2},
    {"embed_dim": 48, "depth": 3, "num_heads": 2},
)
PAD_TO = 64

_CORPUS = [
    "In: What action should the robot take to {}?\nOut:",
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the alphabet soup and place it in the basket", "open the middle drawer of the cabinet",
    "put the bowl on the stove", "put the wine bottle on top of the cabinet", "turn on the stove",
    "put both the alphabet soup and the tomato sauce in the basket", "push the plate to the front of the stove",
    "put the cream cheese in the bowl", "stack the black bowl at the front on the black bowl in the middle",
    "move the pot to the left side of the table", "close the microwave", "wipe the table with the towel",
]


def build_tokenizer(folder: str | Path, merges: int = 200, corpus: Sequence[str] = (), base_vocab: int | None = None
                    ) -> Path:
    """Train and save a small Llama-style tokenizer: ids 0/1/2 = <unk>/<s>/</s>, ids 3..258 the byte-fallback
    pieces <0x00>..<0xFF>, then BPE pieces over SentencePiece-style "▁" words, BOS added by the post-processor and
    <PAD> added after the base vocabulary, as OpenVLA's Llama-2 tokenizer is laid out.

    `corpus`: more instructions to learn pieces from (so that their prompts are about as long as Llama-2 makes
    them). `base_vocab`: pad the base vocabulary to exactly this size with filler pieces that no text can produce
    (multi-character pieces no merge builds), e.g. 32000 for the OpenVLA-7B config's 32064-row embedding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + merges, special_tokens=specials,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz?:\n\u2581"),
                                  show_progress=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    texts = [_CORPUS[0].format(t) for t in list(_CORPUS[1:]) + [c.lower() for c in corpus]]
    learner.train_from_iterator(texts * 4, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    # renumber: specials, then the 256 byte pieces (the trainer does not make them), then the learned pieces
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
    names = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    if base_vocab is not None:
        if base_vocab < len(names):
            raise ValueError(f"base_vocab {base_vocab} is smaller than the {len(names)} pieces learned")
        names += [f"<filler{i}>" for i in range(base_vocab - len(names))]
    vocab = {p: i for i, p in enumerate(names)}
    merges_list = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_list, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581",
                                                                                  prepend_scheme="first")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.add_special_tokens(["<PAD>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<PAD>"}\n')
    return folder


def base_vocab_size(tokenizer_dir: str | Path) -> int:
    from .tokenizer import PromptTokenizer

    return PromptTokenizer.from_dir(tokenizer_dir).base_vocab_size


def tiny_arch(base_vocab: int, fused: bool = True, hidden: int = 64, layers: int = 2) -> Arch:
    ids = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")
    n = 2 if fused else 1
    return Arch(
        timm_model_ids=ids[:n] if fused else ids[1:],
        image_size=224,
        arch_specifier="no-align+fused-gelu-mlp" if fused else "no-align+gelu-mlp",
        text_config={"model_type": "llama", "vocab_size": base_vocab + PAD_TO, "pad_token_id": base_vocab,
                     "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "torch_dtype": "bfloat16"},
        pad_to_multiple_of=PAD_TO,
        timm_override_act_layers=(None,) * n,
        timm_model_kwargs=TINY_TIMM_KWARGS[:n] if fused else TINY_TIMM_KWARGS[1:],
    )


def tiny_norm_stats(keys=("libero_spatial_no_noops", "bridge_orig"), seed: int = 0) -> dict:
    """Plausible BOUNDS_Q99 statistics (gripper unmasked, as for EEF_POS datasets) for the given dataset keys."""
    import numpy as np

    rng = np.random.default_rng(seed)
    stats = {}
    for key in keys:
        lo = -rng.uniform(0.2, 1.0, 7)
        hi = rng.uniform(0.2, 1.0, 7)
        lo[-1], hi[-1] = 0.0, 1.0
        stats[key] = {"action": {"q01": lo.tolist(), "q99": hi.tolist(), "mean": ((lo + hi) / 2).tolist(),
                                 "std": ((hi - lo) / 4).tolist(), "min": (lo * 1.1).tolist(),
                                 "max": (hi * 1.1).tolist(), "mask": [True] * 6 + [False]},
                      "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
                      "num_transitions": 1000, "num_trajectories": 10}
    return stats


def random_model(arch: Arch, seed: int = 0, init_std: float = 0.5):
    """An OpenVLA with seeded random weights. The Llama init is widened from 0.02 so that a 2-layer, 64-wide model
    still reacts visibly to its image and prompt (tests compare outputs across inputs)."""
    import torch

    from .model import OpenVLA

    torch.manual_seed(seed)
    model = OpenVLA(arch)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, init_std / p.shape[1] ** 0.5 * 8)
        for p in model.projector.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return model.eval()


def write_tiny_snapshot(folder: str | Path, tokenizer_dir: str | Path, seed: int = 0, fused: bool = True,
                        norm_stats: Mapping | None = None, max_shard_size: int | str = "200KB", hidden: int = 64
                        ) -> Path:
    """A tiny random OpenVLA written in the published layout (sharded, so the index path is exercised)."""
    from .checkpoint import write_snapshot

    model = random_model(tiny_arch(base_vocab_size(tokenizer_dir), fused=fused, hidden=hidden), seed=seed)
    return write_snapshot(folder, model, norm_stats if norm_stats is not None else tiny_norm_stats(), tokenizer_dir,
                          max_shard_size=max_shard_size)


def write_tiny_adapter(snapshot_dir: str | Path, folder: str | Path, seed: int = 0, rank: int = 4,
                       target_modules=("q_proj", "v_proj", "fc3")) -> Path:
    """A LoRA adapter in PEFT's standard layout over the snapshot's model, with random (non-zero) A and B so that it
    visibly changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .checkpoint import load_snapshot

    model = load_snapshot(snapshot_dir, device="cpu").model
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(folder))
    return Path(folder)
