"""qlora: QLoRA fine-tuning on one GPU. `qlora --help` for the verbs."""
import logging
import warnings

__version__ = "0.1.0"


def quiet_libraries() -> None:
    """Keeps from the user what the libraries say that asks nothing of them; run when qlora is imported,
    so that the command line and the Python API (notebooks) both have it."""
    # bitsandbytes on CPUs with bf16 units warns at import that it cannot fetch a Hub kernel (package
    # `kernels`) for its one-token 4-bit product; qlora's generation multiplies by its own kernel's
    # weights there (gen.fast_dequant), so the warning asks for nothing qlora needs.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # PEFT asks every model it wraps `is_gradient_checkpointing`, which transformers 5 renamed with a
    # FutureWarning at each ask (shown in notebooks; qlora's command line hides FutureWarnings anyway).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # PEFT, at each save of a run whose embeddings grew for a chat template's tokens, says it saves them
    # too: qlora trains and saves them in full (lora.modules_to_save) and says so when training starts.
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True` as the embedding layer has "
                            "been resized", category=UserWarning)
    # bitsandbytes, at a paged optimizer's first step on CPU, says it runs unpaged: qlora says so when
    # training starts (validation.optimizer_note).
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
    # PEFT, putting LoRA on a mixture of experts' fused gate-and-up tensors (all-linear), says its own rank and
    # alpha patterns for them matched no module: they apply to the tensor (its LoRA has rank 2r, measured).
    warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match any "
                            r"targeted module and were ignored: \['[^']*gate_up_proj'\]", category=RuntimeWarning)


quiet_libraries()
