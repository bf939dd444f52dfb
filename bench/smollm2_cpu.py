"""SmolLM2-135M as the in-process CPU benches train it: 4-bit weights, LoRA r=8 on every linear layer,
fp32 compute, every token trained (bench/cpu_speed.py's same-loss case), with the demo's rows."""


def lora_model():
    """(tokenizer, tokenized demo rows, the PEFT model in training mode)."""
    import torch

    from qlora.adapters import attach_lora
    from qlora.cli import compose
    from qlora.data import DataStats, read_examples, tokenize_examples
    from qlora.models import load_base_model, load_tokenizer, resolve_model

    cfg = compose("train", ["lora.r=8", "lora.lora_alpha=16", "data.loss_on=all"])
    path = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path, cfg.model)
    rows = tokenize_examples(tokenizer, read_examples(cfg.data.path, cfg.data), cfg.data, 256, DataStats())
    model = attach_lora(load_base_model(path, cfg.model, cfg.quant, "cpu", torch.float32), cfg.lora, False)
    model.train()
    return tokenizer, rows, model
