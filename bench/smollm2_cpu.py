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


def decoder_pass(model, batch) -> float:
    """Seconds of one forward and backward through the decoder stack (the LM head left out), with a
    loss on its last hidden states: what the CPU benches of the layers' levers time."""
    import time

    start = time.perf_counter()
    hidden = model.get_base_model().model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                          use_cache=False).last_hidden_state
    hidden.square().mean().backward()
    return time.perf_counter() - start
