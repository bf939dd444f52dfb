#!/usr/bin/env bash
# Issue 7's GPU checks in one call of a lent GPU machine (the device tool), and what they need there.
#
#   bash bench/gpu_session.sh prepare PATH/TO/plain_stack_gpu.py   # here, once: builds gpu_carry/
#   bash bench/gpu_session.sh run [PART ...]                        # there: writes logs and JSON to $OUT
#
# The GPU image has torch, transformers, peft, accelerate, pyarrow and xxhash, but not the packages
# below, and it reaches no package registry: `prepare` fetches them at the versions CI pins
# (.ci/constraints.txt), for that machine's Python 3.12, and unpacks them into gpu_carry/site
# (ignored by git). bitsandbytes keeps only its CUDA 13.0 and CPU libraries, 7 MB of its 43.
# The shared plain-stack script is copied beside them, since ../shared does not travel.
#
# Call the device tool with carry ["gpu_carry"] and the command `bash bench/gpu_session.sh run`.
# PARTs (each under its own time limit, its output in $OUT/PART.log and PART.json); without any,
# the first three, for one 10-minute call (their limits add up to 630 s; each should end well inside its own):
#   tests     tests/gpu: fp16 and bf16 runs, compile, the checkpointing levers, Liger, fused LoRA,
#             packed and padding-free rows
#   varied-free  varied lengths: the plain stack TRL-packed, qlora with data.padding_free=true as well
#             as data.packing: a micro-batch's packed rows end to end in one row, attention through
#             torch's varlen flash kernel (one call a layer; the log says if it fell back to SDPA
#             example by example), where TRL's packing attends over the whole row through a mask
#   profile   the TinyLlama case below under torch's profiler, two steps of each side: where qlora's step
#             differs from the plain stack's
#   tinyllama TinyLlama-1.1B 2048 x 8: the plain stack, the plain stack with Liger, qlora
#   varied    varied lengths: the plain stack padded and TRL-packed, qlora's data.packing
#   fused     qlora alone with train.fused_lora=true on the TinyLlama case (compare with tinyllama)
#   liger     qlora alone with train.liger_kernels=true on the TinyLlama case (compare with tinyllama)
#   offload   qlora alone with train.offload_checkpoints=true on it (the checkpointed inputs in host memory)
#   attention qlora alone with train.checkpoint_attention=true on it (attention outputs kept, not recomputed)
#   llama8b   the Llama-3-8B shape, 2048 x 4: the plain stack, with Liger, qlora
#   moe       a random Qwen3-MoE (2.4B expert weights) with its experts in 4 bits and in full, with and
#             without checkpointing: CUDA peaks, tokens/s, the planner's estimates; then decoding, and
#             LoRA on the 4-bit experts in place against PEFT's way (bench/moe_experts.py)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu_carry
PACKAGES="bitsandbytes trl datasets dill multiprocess hydra-core omegaconf antlr4-python3-runtime"

pin() {  # NAME==VERSION as CI pins it
    grep -i "^$1==" .ci/constraints.txt || { echo "$1 is not pinned in .ci/constraints.txt" >&2; exit 2; }
}

prepare() {
    local plain=${1:?give the path of shared/bench/plain_stack_gpu.py}
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/site"
    local liger
    liger=$(grep -o 'liger-kernel==[0-9.]*' pyproject.toml)
    for name in $PACKAGES; do
        if [ "$name" = antlr4-python3-runtime ]; then  # a source distribution only: built here, pure Python
            python3 -m pip wheel -q --no-deps -w "$CARRY/wheels" "$(pin "$name")"
        else
            python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 -d "$CARRY/wheels" "$(pin "$name")"
        fi
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$CARRY/wheels" "$liger"
    for wheel in "$CARRY"/wheels/*.whl; do
        python3 -m zipfile -e "$wheel" "$CARRY/site"
    done
    find "$CARRY/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*cpu*' -delete
    rm -rf "$CARRY/wheels"
    cp "$plain" "$CARRY/plain_stack_gpu.py"
    du -sh "$CARRY"
}

part() {  # NAME SECONDS COMMAND...: one check under a time limit, its output in $OUT/NAME.log; goes on after a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), at most ${limit} s)"
    set +e
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
    set -e
}

run() {
    : "${OUT:?run on the device machine, where \$OUT is set}"
    export PYTHONPATH="$PWD/$CARRY/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
    python3 -c "import torch, transformers, peft, trl, bitsandbytes; print(torch.__version__, torch.version.cuda,
transformers.__version__, peft.__version__, trl.__version__, bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
    local plain="$CARRY/plain_stack_gpu.py"
    local parts=("$@")
    [ ${#parts[@]} -gt 0 ] || parts=(tests varied-free profile)
    for name in "${parts[@]}"; do
        case $name in
            tests) part tests 240 python3 -m pytest tests/gpu -q -p no:cacheprovider ;;
            tinyllama) part tinyllama 210 python3 bench/gpu_speed.py --plain "$plain" --only tl-bf16-ckpt \
                --out "$OUT/tinyllama.json" ;;
            profile) part profile 180 python3 bench/gpu_profile.py --plain "$plain" --case tl-bf16-ckpt \
                --out "$OUT/profile.json" ;;
            varied) part varied 180 python3 bench/gpu_speed.py --plain "$plain" --only tl-bf16-var \
                --out "$OUT/varied.json" ;;
            varied-free) part varied-free 180 python3 bench/gpu_speed.py --plain "$plain" --only tl-bf16-var \
                --plain-cases tl-bf16-var-packed --set data.padding_free=true --out "$OUT/varied-free.json" ;;
            fused) part fused 150 python3 bench/gpu_speed.py --plain "$plain" --only tl-bf16-ckpt \
                --plain-cases none --set train.fused_lora=true --out "$OUT/fused.json" ;;
            liger) part liger 150 python3 bench/gpu_speed.py --plain "$plain" --only tl-bf16-ckpt \
                --plain-cases none --set train.liger_kernels=true --out "$OUT/liger.json" ;;
            offload) part offload 150 python3 bench/gpu_speed.py --plain "$plain" --only tl-bf16-ckpt \
                --plain-cases none --set train.offload_checkpoints=true --out "$OUT/offload.json" ;;
            attention) part attention 150 python3 bench/gpu_speed.py --plain "$plain" --only tl-bf16-ckpt \
                --plain-cases none --set train.checkpoint_attention=true --out "$OUT/attention.json" ;;
            llama8b) part llama8b 420 python3 bench/gpu_speed.py --plain "$plain" --only l8b-bf16-ckpt \
                --out "$OUT/llama8b.json" ;;
            moe) part moe 420 python3 bench/moe_experts.py --size gpu --reps 1 --steps 4 --out "$OUT/moe.json" ;;
            *) echo "unknown part $name (tests, tinyllama, profile, fused, varied, varied-free, liger, offload, attention, llama8b, moe)" >&2; exit 2 ;;
        esac
    done
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,5p' "$0"; exit 2 ;;
esac
