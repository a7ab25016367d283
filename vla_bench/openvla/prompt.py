"""The prompt templates: the one home of how an instruction becomes the model's text input.

"openvla" is the Llama-2 "pure" prompt of OpenVLA-7B and its fine-tunes; "openvla-v01" is the Vicuna v1.5 chat
prompt of the SigLIP-only v0.1 model. Both lowercase the instruction, as training did. The text has no trailing
space: the model code appends the tokenizer's standalone "▁" token, which is how "Out: " tokenized in training.
"""
from __future__ import annotations

_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")

TEMPLATES = {
    "openvla": "In: What action should the robot take to {instruction}?\nOut:",
    "openvla-v01": _VICUNA_SYSTEM + " USER: What action should the robot take to {instruction}? ASSISTANT:",
}
DEFAULT = "openvla"


def build_prompt(instruction: str, variant: str = DEFAULT) -> str:
    """The model input text for one task instruction."""
    if variant not in TEMPLATES:
        raise ValueError(f"unknown prompt variant {variant!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[variant].format(instruction=instruction.lower())
