"""A model's shape, what `qlora plan` counts memory from: read from its config.json (a local folder, a
built-in model, the hub's cache) without loading weights, or, for the recipes' models, known here."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from qlora.errors import UserError


@dataclass
class Shape:
    """A decoder's sizes, as the planner counts them (a vision tower's and a mixture's experts too)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    window: Optional[int] = None  # the sliding window of layers that have one
    softcap: bool = False  # attention logits soft-capped (Gemma 2)
    beside: int = 0  # weights of the linear layers beside the decoder (a vision tower): 4-bit, no LoRA
    experts: int = 0  # a mixture of experts: experts a layer (intermediate is then the dense MLP's, 0 for none)
    expert_size: int = 0  # each expert's intermediate size
    experts_per_token: int = 0
    expert_lora_per_rank: int = 0  # a layer's LoRA weights on its experts and router, per unit of lora.r
    head_dim: int = 0  # where it is not hidden / heads (Qwen3: 128 at hidden 1024 and 16 heads)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def checkpointed(self, first: Optional[int]) -> int:
        """Layers checkpointed with train.checkpoint_layers=first (None = all)."""
        return min(self.layers, first or self.layers)

    def linears(self) -> List[Tuple[int, int]]:
        """(in, out) of the adapted linear layers of one decoder layer (a mixture of experts' dense MLP,
        its shared expert, only where it has one)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return [(h, q), (h, kv), (h, kv), (q, h)] + ([(h, i), (h, i), (i, h)] if i else [])

    def expert_weights(self) -> int:
        """A layer's expert weights: transformers holds each layer's experts as 3-D tensors (gate and
        up, down), which bitsandbytes' loading leaves in the compute dtype (see plan.experts_parts)."""
        return self.experts * 3 * self.hidden * self.expert_size

    def expert_lora(self, r: int) -> int:
        """A layer's LoRA weights on its experts and router, where PEFT's all-linear puts them."""
        return r * self.expert_lora_per_rank


# Published shapes of the recipes' models, for planning without downloading their config.json.
KNOWN: Dict[str, Shape] = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": Shape(2048, 5632, 22, 32, 4, 32000, False),
    "meta-llama/Llama-3.1-8B-Instruct": Shape(4096, 14336, 32, 32, 8, 128256, False),
    "meta-llama/Llama-3.1-70B-Instruct": Shape(8192, 28672, 80, 64, 8, 128256, False),
    "mistralai/Mistral-7B-Instruct-v0.3": Shape(4096, 14336, 32, 32, 8, 32768, False),
    "Qwen/Qwen2.5-7B-Instruct": Shape(3584, 18944, 28, 28, 4, 152064, False),
}


def model_shape(name_or_path: str) -> Tuple[Shape, Optional[Path]]:
    """The model's shape from its config.json (local, built-in or cached), else from KNOWN."""
    from qlora.models import BUILTIN, resolve_model

    if name_or_path in BUILTIN or Path(name_or_path).expanduser().is_dir():
        folder = Path(resolve_model(name_or_path, weights=False))
    elif name_or_path in KNOWN:
        return KNOWN[name_or_path], None
    else:
        try:
            # a hub id: its config.json in the cache or fetched, else why not
            resolve_model(name_or_path, weights=False)
        except UserError as e:
            raise UserError(f"{e}; plan knows the shapes of {', '.join(KNOWN)} without their files") from None
        from huggingface_hub import try_to_load_from_cache

        folder = Path(try_to_load_from_cache(name_or_path, "config.json")).parent  # no second request
    c = json.loads((folder / "config.json").read_text())
    v = c.get("vision_config") or {}
    c = c.get("text_config", c)
    experts = next((c[k] for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(c.get(k), int) and c[k] > 1), 0)
    expert_size = (c.get("moe_intermediate_size") or c["intermediate_size"]) if experts else 0
    # beside the experts, a dense MLP only where a shared expert is (Qwen2-MoE, DeepSeek)
    dense = c["intermediate_size"] if not experts else \
        c.get("shared_expert_intermediate_size") or (c.get("n_shared_experts") or 0) * expert_size
    vision = ("hidden_size", "intermediate_size", "num_hidden_layers")
    # a ViT layer's q, k, v and output projections and its two MLP matrices
    beside = v["num_hidden_layers"] * (4 * v["hidden_size"] ** 2 + 2 * v["hidden_size"] * v["intermediate_size"]) \
        if all(isinstance(v.get(k), int) for k in vision) else 0
    sliding = c.get("use_sliding_window", True) and "sliding_attention" in c.get("layer_types", ["sliding_attention"])
    heads, head_dim = c["num_attention_heads"], c.get("head_dim") or 0
    shape = Shape(c["hidden_size"], dense, c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads,
                  c["vocab_size"], bool(c.get("tie_word_embeddings", False)),
                  window=c.get("sliding_window") if sliding else None,
                  softcap=c.get("attn_logit_softcapping") is not None, beside=beside, experts=experts,
                  expert_size=expert_size, experts_per_token=c.get("num_experts_per_tok") or 0,
                  head_dim=head_dim if head_dim != c["hidden_size"] // heads else 0)
    if experts:
        shape.expert_lora_per_rank = expert_lora_per_rank(folder, shape)
    return shape, folder


def expert_lora_per_rank(folder: Path, shape: Shape) -> int:
    """A layer's LoRA weights on its experts and router per unit of rank, as PEFT's all-linear places them
    on this model (on each expert and the router of Qwen3-MoE and Mixtral, rank 2r on the fused gate and
    up; on none of gpt-oss's): counted on an empty copy of the model (no weights, a few seconds)."""
    import warnings

    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.adapters import exclusion, outside_the_decoder

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        model = get_peft_model(model, LoraConfig(r=1, target_modules="all-linear",  # as adapters.attach_lora
                                                 exclude_modules=exclusion(outside_the_decoder(model))))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return lora // shape.layers - sum(i + o for i, o in shape.linears())
