"""The GGML type each GGUF tensor is written in, and the K-quant types, which llama.cpp's own quantizer makes
from an f16 file (the `gguf` package has no K-quantizer; llama-cpp-python runs llama.cpp's)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from qlora.config import GgufType
from qlora.errors import WorkError

# the K-quant types by llama.cpp's name; its quantizer mixes types by tensor (q4_k_m keeps some of the
# attention's v and the MLP's down products q6_k, and takes other types for rows of no whole 256-blocks)
K_QUANTS = {GgufType.q6_k: "Q6_K", GgufType.q5_k_m: "Q5_K_M", GgufType.q4_k_m: "Q4_K_M"}


def tensor_type(name: str, data, kind: GgufType):
    """The GGML type a tensor is written in: f32 for vectors (norms, biases), for biases a row an expert
    (gpt-oss's, which llama.cpp adds in f32 only) and for a mixture's routers; for the 4- and 5-bit kinds,
    q8_0 for the token embeddings and the LM head (llama.cpp's own quantizer keeps the output layer at more
    bits too, and a tied head is the embeddings); f16 where a row is not a whole number of the type's
    blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or kind is GgufType.f32 or ".ffn_gate_inp." in name or name.endswith(".bias"):
        return Q.F32
    qtype = Q[kind.value.upper()]
    if kind.value.startswith(("q4", "q5")) and name.split(".")[0] in ("token_embd", "output"):
        qtype = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if data.shape[-1] % block == 0 else Q.F16


def k_quant_problem(kind: GgufType) -> Optional[str]:
    """Why a GGUF type cannot be written here (a K-quant without llama-cpp-python), or None."""
    import importlib.util

    if kind in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
        return (f"export.gguf_type={kind.value}: llama.cpp quantizes the K-quant types; pip install "
                "'qlora[llama-cpp]' (it builds llama.cpp: about 5 minutes on 2 cores), or take f16, q8_0, q5_0 or q4_0")
    return None


def llama_cpp_quantize(source: Path, path: Path, kind: GgufType) -> None:
    """llama.cpp's quantizer (through llama-cpp-python) from an f16 GGUF file to a K-quant one."""
    import ctypes
    import os

    import llama_cpp

    from qlora.models import say

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{K_QUANTS[kind]}")
    params.nthread = os.cpu_count() or 1
    say(f"export: llama.cpp quantizes the GGUF to {kind.value}")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)) != 0:
        raise WorkError(f"GGUF export: llama.cpp could not quantize {source.name} to {kind.value} (its log above)")
