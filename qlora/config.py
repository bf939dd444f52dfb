"""Structured configs: every setting is a typed field with a default and a docstring.

Hydra composes conf/ and recipes/ onto these dataclasses, so an unknown key or a wrong type fails
at composition; qlora/validation.py then checks values and combinations. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional


PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """conf/ and recipes/: inside the package when installed from a wheel, at the repo root otherwise."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _resource_dir("conf")
RECIPES_DIR = _resource_dir("recipes")
DEMO_DIR = PACKAGE_DIR / "demo"


class ComputeDtype(Enum):
    auto = "auto"  # bf16 on GPUs that have it, fp16 on those that do not, fp32 on CPU
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class StorageDtype(Enum):
    uint8 = "uint8"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class QuantType(Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class AttnImplementation(Enum):
    auto = "auto"
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class LoraBias(Enum):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class LoraInit(Enum):
    default = "default"
    loftq = "loftq"


class DataFormat(Enum):
    auto = "auto"
    messages = "messages"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    prompt_completion = "prompt_completion"
    text = "text"


class LossOn(Enum):
    assistant = "assistant"  # every assistant turn, with its end-of-turn token
    completion = "completion"  # the completion of prompt/completion data
    all = "all"  # every token


class OnBadRow(Enum):
    fail = "fail"
    drop = "drop"


class Switch(Enum):
    auto = "auto"
    true = "true"
    false = "false"


class MergeInto(Enum):
    dequantized = "dequantized"  # the NF4-rounded weights the adapter was trained against
    original = "original"  # the 16/32-bit weights before quantization


class SaveDtype(Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class ExportFormat(Enum):
    safetensors = "safetensors"
    gguf = "gguf"
    ollama = "ollama"
    nf4 = "nf4"


class GgufType(Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    q5_1 = "q5_1"
    q5_0 = "q5_0"
    q4_1 = "q4_1"
    q4_0 = "q4_0"
    # K-quants (blocks of 256 with scales of their own; Ollama's q4_k_m default), quantized by llama.cpp
    q6_k = "q6_k"
    q5_k_m = "q5_k_m"
    q4_k_m = "q4_k_m"


class NanPolicy(Enum):
    stop = "stop"  # stop the run, keep the last good checkpoint
    skip = "skip"  # drop the step's gradients and go on


class DistStrategy(Enum):
    auto = "auto"  # one process; DDP when started by torchrun / accelerate launch with several
    fsdp_qlora = "fsdp_qlora"  # shard the 4-bit model across GPUs (FSDP), for models one GPU cannot hold


class Resume(Enum):
    none = "none"
    auto = "auto"


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """Base model: a hub id, a local HF folder, a .gguf file, or a built-in name (smollm2-135m-instruct)."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust its authors."""
    attn_implementation: AttnImplementation = AttnImplementation.auto
    """Attention kernel: auto picks sdpa where available."""
    chat_template: Optional[str] = None
    """Chat template for base models that lack one: chatml (adds its tokens), a .jinja file, or inline Jinja."""


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    """Load the base weights in 4-bit through bitsandbytes (QLoRA). false = plain LoRA on a 16/32-bit base."""
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    """4-bit data type: nf4 (normal float, the QLoRA default) or fp4."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the per-block scales too (saves ~0.37 bits per parameter)."""
    bnb_4bit_compute_dtype: ComputeDtype = ComputeDtype.auto
    """Dtype of the matmuls: auto = bf16 on GPUs with bf16, fp16 on older GPUs (T4), fp32 on CPU."""
    bnb_4bit_quant_storage: StorageDtype = StorageDtype.uint8
    """Storage dtype of the packed 4-bit weights (set it to the compute dtype for FSDP)."""
    experts_in_4bit: bool = True
    """A mixture's 3-D expert tensors in 4 bits too, each layer's dequantized as it runs (false: compute dtype)."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator: updates are scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by lora_alpha / sqrt(r), so that higher ranks keep learning as fast."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or [all-linear] for every linear layer but the output head."""
    bias: LoraBias = LoraBias.none
    """Which biases train: none, all, lora_only."""
    modules_to_save: Optional[List[str]] = None
    """Modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head] after adding tokens)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    init: LoraInit = LoraInit.default
    """Start: default (B = 0, from the 4-bit model) or loftq (LoRA = the best rank-r fix of the 4-bit error)."""


@dataclass
class SourceConfig:
    path: str = ""
    """A file, folder or glob (.jsonl, .json, .csv, .parquet), or a Hugging Face dataset name."""
    format: DataFormat = DataFormat.auto
    """Row format of this source (see data.format)."""
    weight: float = 1.0
    """How much of this source to use: 1 = every row once, 0.5 = a seeded half, 2 = every row twice."""
    subset: Optional[str] = None
    """Hugging Face datasets: the configuration (subset) name."""
    split: str = "train"
    """Hugging Face datasets: the split."""


def _default_columns() -> Dict[str, str]:
    return {k: k for k in ("messages", "conversations", "instruction", "input", "output", "prompt",
                           "completion", "text")}


@dataclass
class DataConfig:
    path: str = "${demo_file:people_train.jsonl}"
    """Training data: a file, folder or glob (.jsonl, .json, .csv, .parquet), or a Hugging Face dataset name."""
    format: DataFormat = DataFormat.auto
    """Row format: auto (detected per row), messages, sharegpt, alpaca, prompt_completion, text."""
    subset: Optional[str] = None
    """Hugging Face datasets: the configuration (subset) name of data.path."""
    split: str = "train"
    """Hugging Face datasets: the split of data.path."""
    sources: List[SourceConfig] = field(default_factory=list)
    """A mixture: [{path: a.jsonl, weight: 1}, {path: b.csv, format: alpaca, weight: 0.5}]; replaces data.path."""
    columns: Dict[str, str] = field(default_factory=_default_columns)
    """Column names in your data for each field we read, e.g. data.columns.prompt=question."""
    eval_path: Optional[str] = "${demo_file:people_eval.jsonl}"
    """Held-out data (file, folder, glob or dataset name); null for none (see eval_fraction); the demo's only with its path."""
    eval_split: str = "test"
    """Hugging Face datasets: the split of data.eval_path."""
    eval_fraction: float = 0.0
    """Share of the training rows held out for evaluation, in [0, 1); instead of eval_path (the demo's yields)."""
    loss_on: LossOn = LossOn.assistant
    """Trained tokens: assistant (every assistant turn + end-of-turn), completion (the last one / the completion), all."""
    packing: bool = False
    """Pack several examples per row of train.max_length, each attending only to itself (positions restart)."""
    padding_free: Switch = Switch.auto
    """Lay each micro-batch's examples end to end in one row, no padding, each attending to itself: auto = on CPU, without packing (compiled: with 10%+ padding)."""
    on_bad_row: OnBadRow = OnBadRow.fail
    """A malformed row: fail (stop with file:line) or drop (count by reason, see max_bad_fraction)."""
    max_bad_fraction: float = 0.01
    """With on_bad_row=drop: fail when more than this share of rows is dropped."""
    show_examples: int = 3
    """data check: how many rendered examples to show."""


@dataclass
class TrainConfig:
    max_steps: int = -1
    """Optimizer steps; -1 = run num_train_epochs."""
    num_train_epochs: float = 1.0
    """Passes over the training data (when max_steps is -1)."""
    per_device_train_batch_size: int = 4
    """Examples per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 2e-4
    """Peak learning rate of the LoRA parameters."""
    lr_scheduler_type: str = "cosine"
    """Schedule: linear, cosine, constant, constant_with_warmup, cosine_with_min_lr, ... (transformers' names)."""
    lr_scheduler_kwargs: Dict[str, Any] = field(default_factory=dict)
    """The schedule's own arguments, as transformers names them: train.lr_scheduler_kwargs.min_lr_rate=0.1, ..."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optim: str = "auto"
    """Optimizer: auto (paged_adamw_8bit on one GPU, else adamw_torch_fused), or any transformers name."""
    max_grad_norm: float = 0.3
    """Gradient clipping norm (QLoRA paper: 0.3)."""
    neftune_noise_alpha: float = 0.0
    """NEFTune: uniform noise on the input embeddings while training, at most alpha / sqrt(length x hidden) per example (5 in the paper); 0 = off."""
    max_length: int = 512
    """Tokens per example; longer examples are truncated (and counted)."""
    seed: int = 42
    """Seed for LoRA init, data order and dropout."""
    logging_steps: int = 5
    """Steps between log lines (metrics.jsonl, progress, tensorboard)."""
    save_steps: int = 100
    """Steps between resumable checkpoints."""
    save_total_limit: int = 2
    """Checkpoints kept on disk (oldest removed first)."""
    eval_steps: Optional[int] = None
    """Steps between evaluations of the held-out split; null = only at the end."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations in a row without a lower held-out loss; the adapter is then the best one's."""
    early_stopping_threshold: float = 0.0
    """With early_stopping_patience: how much lower the held-out loss must be to count as lower."""
    gradient_checkpointing: Switch = Switch.auto
    """Recompute activations in backward: auto = on for GPUs, off on CPU (where it costs ~25%)."""
    checkpoint_layers: Optional[int] = None
    """With checkpointing: checkpoint only the first n decoder layers (null = all); fewer is faster, holds more memory."""
    checkpoint_attention: bool = False
    """With checkpointing: keep each layer's attention output rather than recompute it (selective checkpointing)."""
    offload_checkpoints: bool = False
    """GPU, with checkpointing: hold the checkpointed layers' inputs in CPU memory (less GPU memory, slower steps)."""
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers: tensorboard, wandb, mlflow, or [none]."""
    score_trained_only: bool = True
    """CPU: compute the head's logits only where the next token is trained (same loss; GPUs always do)."""
    small_head_tiles: bool = True
    """CPU: the LM head's loss in 1024 x 8192 tiles instead of 4096 x 32768 (same loss, less memory)."""
    head_tiles_in_place: bool = True
    """CPU: the LM head's loss works each tile in place, not through a dozen temporaries (same loss, faster)."""
    head_one_pass: bool = True
    """CPU, with head_tiles_in_place: the LM head's loss and input gradient in one pass over the vocabulary, not two."""
    fused_lora: Switch = Switch.auto
    """Each 4-bit layer and its LoRA as one autograd function (same numbers to float rounding; no dropout/DoRA): auto = on CPU, where it is measured faster; true = on GPUs too."""
    bf16_base_products: Switch = Switch.auto
    """CPU, with fused_lora, fp32 compute: the frozen base's products (4-bit layers, LM head) in bf16, all else fp32: auto = on CPUs with AVX512-BF16."""
    fast_dequant: bool = True
    """CPU: dequantize 4-bit weights with our C kernel, bit for bit bitsandbytes' and ~2.5x faster (built at first use)."""
    compile: Switch = Switch.auto
    """torch.compile the decoder layers: auto = on CPU for runs of 200+ steps (7-30 s to compile, then 1.04-1.2x)."""
    liger_kernels: bool = False
    """GPU: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (pip install 'qlora[liger]'); same loss."""
    nan_policy: NanPolicy = NanPolicy.stop
    """A non-finite loss or gradient: stop (keeping the last good checkpoint) or skip that step."""


@dataclass
class EvalConfig:
    exact_match: bool = False
    """After training, generate greedily on the eval split and report the share of exact answers."""
    max_new_tokens: int = 64
    """Generation budget per eval example."""
    max_examples: Optional[int] = None
    """Score at most this many eval examples (null = all)."""
    batch_size: int = 16
    """Prompts generated together."""


@dataclass
class GenConfig:
    max_new_tokens: int = 256
    """Most tokens generated per answer."""
    do_sample: bool = False
    """Sample (true) or take the most likely token (false, reproducible)."""
    temperature: float = 0.7
    """Sampling temperature (with do_sample)."""
    top_p: float = 0.9
    """Nucleus sampling mass (with do_sample)."""
    top_k: int = 50
    """Sample among the k most likely tokens (with do_sample)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating tokens."""
    prompt: Optional[str] = None
    """One prompt to answer."""
    prompts: Optional[str] = None
    """A JSONL file of prompts: {"prompt": ...} or {"messages": [...]} per line."""
    system: Optional[str] = None
    """A system message put before every prompt."""
    show_speed: bool = True
    """chat: print tokens and tokens/s after each answer."""
    fast_dequant: bool = True
    """CPU: 4-bit layers multiply by weights from our dequantization kernel (the same tokens, ~1.5x faster)."""
    bf16_base_products: Switch = Switch.auto
    """CPU, with fast_dequant: the 4-bit layers' products in bf16 (generation, eval): auto = on CPUs with AVX512-BF16."""


@dataclass
class MergeConfig:
    into: MergeInto = MergeInto.dequantized
    """Base weights to add the adapter to: dequantized (what it was trained against) or original."""
    dtype: SaveDtype = SaveDtype.float16
    """Dtype of the saved weights (the merge itself is done in fp32)."""
    min_top1_agreement: float = 0.99
    """Fail (exit 1) when the merged model's top-1 tokens agree with the adapter model's less often."""
    min_top1_agreement_nf4: float = 0.9
    """The same for export.format=nf4, which re-quantizes and so agrees less by nature."""
    max_shard_size: str = "2GB"
    """Largest output shard (safetensors), e.g. 500MB, 2GB."""
    check_prompts: int = 16
    """Prompts of the self-check (from the run's held-out data, else built-in ones)."""
    check_max_tokens: int = 256
    """Tokens of each self-check text at most (longer conversations are cut there)."""


@dataclass
class ExportConfig:
    format: ExportFormat = ExportFormat.safetensors
    """safetensors (HF folder), gguf (llama.cpp), ollama (GGUF + Modelfile), nf4 (4-bit bitsandbytes)."""
    gguf_type: GgufType = GgufType.f16
    """GGUF weights: f32 to q4_0 (norms f32; q5/q4 keep embeddings, head q8_0), or q6_k/q5_k_m/q4_k_m (llama.cpp's)."""


@dataclass
class DistConfig:
    strategy: DistStrategy = DistStrategy.auto
    """auto: DDP when launched with several processes; fsdp_qlora: FSDP over the 4-bit model (GPUs only)."""
    cpu_ram_efficient_loading: bool = True
    """fsdp_qlora: rank 0 reads the weights and broadcasts them, so CPU RAM holds one copy, not one per GPU."""
    offload_params: bool = False
    """fsdp_qlora: keep the sharded parameters in CPU RAM between uses (slower; for the tightest fits)."""


@dataclass
class QLoraConfig:
    recipe: Optional[str] = None
    """The preset this config started from: a name from recipes/, or a YAML file's path (`recipe=FILE`)."""
    output_dir: Optional[str] = None
    """Where results go; train defaults to outputs/<recipe>/<YYYYmmdd-HHMMSS>."""
    resume: str = "none"
    """train: none, auto (the last checkpoint in output_dir) or a checkpoint path."""
    overwrite: bool = False
    """Replace a non-empty output_dir."""
    adapter: Optional[str] = None
    """A run directory or its adapter/ folder (merge, export, chat, generate, eval)."""
    gpu: Optional[str] = None
    """plan: the GPU to plan for (T4, A10G, L4, A100-40, A100-80, H100); null = this machine."""
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def register() -> None:
    """Put the schema in Hydra's ConfigStore and add the resolvers that conf/ uses."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="qlora_schema", node=QLoraConfig)
    if not OmegaConf.has_resolver("demo_file"):
        OmegaConf.register_new_resolver("demo_file", lambda name: str(DEMO_DIR / name))


def on_demo_data(d: DataConfig) -> bool:
    """Whether the data is the demo's training file, as the defaults give it (no data.sources)."""
    return not d.sources and d.path == str(DEMO_DIR / "people_train.jsonl")


def held_out_follows_data(cfg: QLoraConfig) -> QLoraConfig:
    """The demo's held-out file goes with the demo's training file only, and only where no share is held
    out instead: a config that trains on other data (data.path or data.sources), or asks for
    data.eval_fraction, and leaves data.eval_path at the demo's, holds out what it says (the share, or
    nothing)."""
    d = cfg.data
    if d.eval_path == str(DEMO_DIR / "people_eval.jsonl") and (not on_demo_data(d) or d.eval_fraction > 0):
        d.eval_path = None
    return cfg
