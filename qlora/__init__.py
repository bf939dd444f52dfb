"""qlora: QLoRA fine-tuning on one GPU. `qlora --help` for the verbs."""
import logging

__version__ = "0.1.0"

# bitsandbytes on CPUs with bf16 units warns at import that it cannot fetch a Hub kernel (package
# `kernels`) for its one-token 4-bit product; qlora's generation multiplies by its own kernel's
# weights there (gen.fast_dequant), so the warning asks for nothing qlora needs. Here, so that the
# command line and the Python API (notebooks) both keep it from the user.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
