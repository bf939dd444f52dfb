"""bitsandbytes' 4-bit weights dequantized by a small C kernel of ours on CPU (train.fast_dequant).

On a CPU the base's 4-bit layers are dequantized to fp32 at every forward and backward pass: 9% of
a SmolLM2 training step's CPU time in a profile, with bitsandbytes' CPU kernel. Ours
(qlora/csrc/dequant_4bit.c) looks the 16 code values up sixteen at a time with AVX-512, eight with
AVX2, where the CPU has them, and folds in double quantization's scales, with bitsandbytes' own
arithmetic, so the weights are bit for bit theirs (tests/unit/test_dequant.py). `python
bench/dequant.py`: 2.5-3.4x on all of SmolLM2's layers on a 2-core AVX2 CPU, 1.09x its decoder's
forward and backward; 2.1x and 1.05x on an AVX-512 one. Under train.bf16_base_products it writes the
bf16 weights straight (those torch would round the fp32 ones to), with no fp32 copy to cast: all of
SmolLM2's layers 4.0x bitsandbytes' dequantization and cast, and the decoder pass 1.03x faster than
with our fp32 weights cast (`--bf16`).

Training takes it within `fast_dequant()`. Generation and evaluation (no gradient) go through
bitsandbytes' 4-bit matmul, whose CPU code dequantizes with its own kernel and then multiplies;
`use_for_inference()` routes those calls through ours for the rest of the process (gen.fast_dequant):
the same product of the same weights, so the same tokens, about 1.5x faster on SmolLM2. On CPUs with
AVX512-BF16 it multiplies in bf16 too (gen.bf16_base_products, and train.bf16_base_products for a
run's own evaluation), the weights written straight in bf16: batched greedy generation 1.36-1.78x
faster again, half the bytes written and read at each new token.

The kernel is compiled for this CPU at first use with the system's C compiler (under a second)
and kept in the qlora cache (`$QLORA_CACHE/kernels`). Where none can build it, bitsandbytes' code
runs, and the run says why once.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache, partial
from math import prod
from pathlib import Path
from typing import Optional, Tuple

import torch

SOURCE = Path(__file__).parent / "csrc" / "dequant_4bit.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]  # no fused multiply-add: bnb's roundings
_lib: Optional[ctypes.CDLL] = None  # the kernel, once kernel() has loaded it
_in_use = False  # within fast_dequant(), with the kernel loaded: weight_and_rows() may run
_bf16_products = False  # use_for_inference(bf16=True): products without gradient in bf16
_told = False  # why the kernel could not be built has been said


def _cpu_identity() -> str:
    """What -march=native compiles for: the kernel is rebuilt on another CPU sharing this cache."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str, target: Path) -> None:
    """Compiles the kernel into target (written aside, then renamed); OpenMP threads where the compiler has them."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for extra in (["-fopenmp"], []):
            done = subprocess.run([compiler, *FLAGS, *extra, str(SOURCE), "-o", str(built)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, target)
                return
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"{compiler} failed: {lines[0] if lines else 'no output'}")


def _available(key: str) -> bool:
    """Whether the kernel is loaded (building it if need be); if not, says why, once per process."""
    global _told
    from qlora.models import say

    lib, problem = kernel()
    if lib is None and not _told:
        say(f"{key}: the dequantization kernel could not be built ({problem}); bitsandbytes' own "
            "dequantization runs")
        _told = True
    return lib is not None


@lru_cache(maxsize=1)
def kernel() -> Tuple[Optional[ctypes.CDLL], Optional[str]]:
    """The loaded kernel, built first if this CPU has none in the cache; or None and the reason."""
    from qlora.models import cache_dir

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_identity()]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"dequant_4bit-{key[:16]}.so"
    try:
        if not target.is_file():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        return None, str(e)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qlora_dequantize_4bit.argtypes = [p, i64, i64, p, p, p, p, p, i64, ctypes.c_float, p, ctypes.c_int, ctypes.c_int]
    lib.qlora_dequantize_4bit.restype = None
    global _lib
    _lib = lib
    return lib, None


def _handled(A: torch.Tensor, state) -> bool:
    """Whether the kernel computes exactly what bitsandbytes would for this weight."""
    absmax = state.absmax
    tensors = [A, absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    return (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and not getattr(state, "packing_format_for_cpu", False)  # bitsandbytes' AVX-512 inference layout
            and state.dtype == torch.float32 and state.quant_type in ("nf4", "fp4") and state.code.numel() == 16
            and state.blocksize <= 4096  # the kernel's MAX_BLOCK
            and state.code.dtype == torch.float32 and 2 * A.numel() * A.element_size() == prod(state.shape)
            and (absmax.dtype == torch.uint8 and state.state2.absmax.dtype == torch.float32
                 and state.state2.code.dtype == torch.float32 if state.nested else absmax.dtype == torch.float32))


def _run(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, absmax2: Optional[torch.Tensor],
         code8: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, blocksize2: int,
         shape: list[int], bf16: bool = False) -> torch.Tensor:
    """One call of the kernel (absmax2, code8 and offset: double quantization's, or None): fp32
    weights, or bf16 ones."""
    out = torch.empty(shape, dtype=torch.bfloat16 if bf16 else torch.float32)
    return _fill(out, packed, absmax, code, absmax2, code8, offset, blocksize, blocksize2)


def _fill(out, packed, absmax, code, absmax2, code8, offset, blocksize, blocksize2) -> torch.Tensor:
    """The kernel's weights written to the start of `out` (contiguous fp32 or bf16, room for them); returns out."""
    nested = absmax2 is not None
    _lib.qlora_dequantize_4bit(packed.data_ptr(), packed.numel(), blocksize, code.data_ptr(),
                              None if nested else absmax.data_ptr(), absmax.data_ptr() if nested else None,
                              code8.data_ptr() if nested else None, absmax2.data_ptr() if nested else None,
                              blocksize2, float(offset) if nested else 0.0, out.data_ptr(),
                              int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return out


# the same as an op, so that torch.compile (train.compile) keeps it whole in its graphs; outside them
# the op's dispatch would cost more than the kernel on small layers (40 us)
_op = torch.library.custom_op("qlora::dequantize_4bit", _run, mutates_args=())
_op.register_fake(lambda packed, absmax, code, absmax2, code8, offset, blocksize, blocksize2, shape, bf16=False:
                  packed.new_empty(shape, dtype=torch.bfloat16 if bf16 else torch.float32))


def dequantize_4bit(A: torch.Tensor, quant_state, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """The weight of a 4-bit one in fp32, as bitsandbytes.functional.dequantize_4bit gives it, or in
    bf16, that rounded as torch rounds; None where the kernel does not apply (not CPU, not fp32
    scales, not loaded by kernel()) and bitsandbytes must."""
    if _lib is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    bf16 = dtype == torch.bfloat16
    if torch.compiler.is_compiling():  # traced once into the graph: no cache (nor data_ptr) there
        args, one_row = _arguments(A, quant_state)
        return None if args is None else _shaped(_op(*args, bf16), one_row)
    args, one_row = _cached_arguments(A, quant_state)
    return None if args is None else _shaped(_run(*args, bf16), one_row)


def dequantized(A: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit weight in dtype: within fast_dequant() our kernel's, bf16 straight from it (on an
    AVX-512 CPU about 1.5x ours to fp32 and a cast, 2.5-4x bitsandbytes' dequantization and cast);
    otherwise bitsandbytes' dequantization, cast to dtype."""
    ours = dequantize_4bit(A, quant_state, dtype) if _in_use else None
    if ours is not None:
        return ours
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(A, quant_state).to(dtype)


def weight_and_rows(A: torch.Tensor, quant_state, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """The fp32 weight of a 4-bit one (N x K) with `rows` (r x K, fp32) below it, one (N + r) x K
    tensor, the weight dequantized straight into place (train.fused_lora's one product for the base
    and LoRA A); None outside fast_dequant(), in a graph being compiled, or where the kernel does not apply."""
    if not _in_use or torch.compiler.is_compiling():
        return None
    args, one_row = _cached_arguments(A, quant_state)
    if args is None or one_row or rows.dtype != torch.float32 or rows.shape[-1] != args[-1][-1]:
        return None
    n, k = args[-1]
    out = torch.empty(n + rows.shape[0], k, dtype=torch.float32)
    out[n:].copy_(rows)
    return _fill(out, *args[:-1])  # all of _run's arguments but the shape


def _cached_arguments(A: torch.Tensor, quant_state) -> Tuple[Optional[tuple], bool]:
    """_arguments(), worked out once per weight and layout. In eager runs the checks, read through
    bitsandbytes' tensor subclass, cost about as much as the kernel (a decoder pass of SmolLM2 is
    1.07-1.10x faster without them); bitsandbytes passes the weight and its transpose; new data or
    scales redo them."""
    scales, cache = quant_state.__dict__.get("_qlora_kernel_arguments", (None, None))
    if scales is not quant_state.absmax:  # new scales (or a move to another device): start afresh
        cache = {}
        quant_state._qlora_kernel_arguments = (quant_state.absmax, cache)
    key = (A.data_ptr(), A.shape[0] == 1)
    if key not in cache:
        cache[key] = _arguments(A, quant_state)
    return cache[key]


def _arguments(A: torch.Tensor, s) -> Tuple[Optional[tuple], bool]:
    """_run's arguments for this weight (None where the kernel does not compute what bitsandbytes
    would), and whether the weight is packed as one row."""
    if not _handled(A, s):
        return None, False
    packed = A.view(torch.uint8) if A.dtype != torch.uint8 else A
    nested = (s.state2.absmax, s.state2.code, s.offset) if s.nested else (None, None, None)
    return (packed.detach(), s.absmax, s.code, *nested, s.blocksize, s.state2.blocksize if s.nested else 1,
            list(s.shape)), A.shape[0] == 1


def _shaped(out: torch.Tensor, one_row: bool) -> torch.Tensor:
    return out.t() if one_row else out  # bitsandbytes' shim for weights packed as one row


@contextmanager
def fast_dequant(enabled: bool = True):
    """Within the block, bitsandbytes dequantizes CPU fp32 weights with our kernel (its own code for
    anything else); yields whether it does. Where the kernel cannot be built, says why."""
    from qlora.speed import _optional_module, _swapped

    functional = _optional_module("bitsandbytes.functional") if enabled else None
    if functional is not None and not _available("train.fast_dequant"):
        functional = None
    original = getattr(functional, "dequantize_4bit", None)

    def dequantize(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        if quant_state is not None and absmax is None and out is None:
            ours = dequantize_4bit(A, quant_state)
            if ours is not None:
                return ours
        return original(A, quant_state, absmax, out, blocksize, quant_type)

    global _in_use
    with _swapped(functional, dequantize_4bit=dequantize):
        _in_use, before = functional is not None, _in_use
        try:
            yield functional is not None
        finally:
            _in_use = before


def _matmul_4bit(original, A, B, quant_state, out=None, bias=None):
    """bitsandbytes.matmul_4bit, with our kernel's weights for CPU calls that need no gradient (where
    bitsandbytes dequantizes and multiplies by F.linear just so); in bf16 under use_for_inference(bf16=True)."""
    needs_grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
    if out is None and not needs_grad and A.dtype == torch.float32 and len(quant_state.shape) == 2 \
            and A.shape[-1] == quant_state.shape[1]:  # bitsandbytes' [out, in] layout, not its deprecated [in, out]
        if _bf16_products:
            weight = dequantize_4bit(B.view(-1, 1), quant_state, torch.bfloat16)
            if weight is not None:
                y = torch.nn.functional.linear(A.to(torch.bfloat16), weight).float()
                return y if bias is None else y.add_(bias)
        weight = dequantize_4bit(B.view(-1, 1), quant_state)
        if weight is not None:
            return torch.nn.functional.linear(A, weight, bias)
    return original(A, B, quant_state, out=out, bias=bias)


def use_for_inference(enabled: bool = True, key: str = "gen.fast_dequant", bf16: bool = False) -> bool:
    """From now on in this process (until called with False), bitsandbytes' 4-bit layers multiply by
    our kernel's weights when no gradient is needed (generation, evaluation) on CPU, in bf16 where
    `bf16` is set (gen.bf16_base_products: the products of bf16 copies of the input and the weight,
    turned back to fp32); returns whether they do. Where the kernel cannot be built, says why."""
    import bitsandbytes

    global _bf16_products
    ours = isinstance(bitsandbytes.matmul_4bit, partial) and bitsandbytes.matmul_4bit.func is _matmul_4bit
    enabled = enabled and _available(key)
    _bf16_products = enabled and bf16
    if enabled and not ours:
        bitsandbytes.matmul_4bit = partial(_matmul_4bit, bitsandbytes.matmul_4bit)
    elif ours and not enabled:  # a later load with gen.fast_dequant=false
        bitsandbytes.matmul_4bit = bitsandbytes.matmul_4bit.args[0]
    return enabled
