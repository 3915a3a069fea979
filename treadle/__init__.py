"""treadle: an open, self-hosted post-training platform (Tinker protocol + OpenAI API over multi-adapter LoRA)."""

__version__ = "0.1.0"
