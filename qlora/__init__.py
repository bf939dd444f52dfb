"""qlora: QLoRA fine-tuning on one GPU. `qlora --help` for the verbs."""

__version__ = "0.1.0"
