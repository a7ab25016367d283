"""vla-bench: evaluation of vision-language-action robot policies as pytest tests."""

__version__ = "0.1.0"
