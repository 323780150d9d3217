"""Tiny randomly initialised models, written to disk as real mlx-lm model folders.

Tests load them through `ragcache.model_loader.load_model`, so the loader, mlx-lm's model classes and
their cache classes are the real ones; only the weights are random. Everything is seeded, so a folder
built twice holds the same weights and tokenizer (and the same model identity up to file mtimes).

- `llama`: plain attention (every layer a trimmable `KVCache`).
- `gemma`: gemma3_text with a sliding window smaller than test prompts, so its `RotatingKVCache`
  layers wrap and can only be restored from snapshots.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A fixed text to train the byte-level BPE on: varied enough that merges form real sub-words.
_CORPUS = [
    "The cache keeps the keys and values of every prefix it has seen, so a prompt that shares a "
    "prefix with an earlier one only computes the rest.",
    "Retrieval finds the chunks of documents that answer a question; the model reads them and "
    "writes an answer with citations.",
    "A radix tree stores token sequences with compressed edges; each node covers a span of tokens.",
    "Sliding window attention keeps only the last few hundred positions, so its state cannot be "
    "cut back to an arbitrary length and is saved at checkpoints instead.",
    "Question: what is the capital of France? Answer: Paris is the capital of France.",
    "System: you are a helpful assistant. Use the context below to answer the user's question.",
    "0123456789 alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron.",
]

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model; `extra` lands in config.json as is."""

    model_type: str
    hidden_size: int = 64
    num_hidden_layers: int = 4
    intermediate_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    vocab_size: int = 384
    seed: int = 0
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

LLAMA = TinySpec(
    model_type="llama",
    num_hidden_layers=3,
    chat_template=_CHAT_TEMPLATE,
    extra={"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
)
# Window 24 with pattern 3: layers 0, 1, 3, 4 slide (RotatingKVCache), layers 2, 5 are global.
GEMMA = TinySpec(
    model_type="gemma3_text",
    num_hidden_layers=6,
    seed=1,
    extra={
        "sliding_window": 24,
        "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 64,
        "rope_theta": 10000.0,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
    },
)


def _config(spec: TinySpec) -> dict[str, Any]:
    return {
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "torch_dtype": "float32",
        **spec.extra,
    }


def _write_tokenizer(folder: Path, spec: TinySpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if spec.chat_template:
        fast.chat_template = spec.chat_template
    fast.save_pretrained(str(folder))


def _write_weights(folder: Path, spec: TinySpec, config: dict[str, Any]) -> None:
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    arch = importlib.import_module(f"mlx_lm.models.{spec.model_type}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    key = mx.random.key(spec.seed)
    weights: dict[str, mx.array] = {}
    for name, param in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if "norm" in name:
            # Small random norm gains keep layers distinct without exploding activations.
            value = 0.1 * mx.random.normal(param.shape, key=sub)
            value = value if spec.model_type == "gemma3_text" else 1.0 + value
        elif "embed_tokens" in name:
            # Unit-RMS input rows (gemma multiplies embeddings by sqrt(hidden_size) itself).
            scale = 1.0 if spec.model_type == "llama" else 1.0 / math.sqrt(spec.hidden_size)
            value = scale * mx.random.normal(param.shape, key=sub)
        elif name == "lm_head.weight":
            # An untied random head: a tied one scores the input token highest and greedy decoding
            # just repeats it, which would make exactness tests meaningless.
            value = 4.0 * mx.random.normal(param.shape, key=sub) / math.sqrt(param.shape[-1])
        else:
            value = mx.random.normal(param.shape, key=sub) / math.sqrt(param.shape[-1])
        weights[name] = value.astype(mx.float32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})


def build_tiny_model(folder: Path, spec: TinySpec) -> Path:
    """Write config.json, tokenizer files and random float32 weights into `folder`; return it.

    Imports mlx: call after `import ragcache`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(spec)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder, spec)
    _write_weights(folder, spec, config)
    return folder


def step_logit_bits(model: Any) -> list[Any]:
    """The bits of a model's logits over a fresh cache: a prefill, four decode steps and a
    4-token verify (what a numerics change routed into a model must leave as they were)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([list(range(3, 40))]), cache=cache)]
    for token in (5, 9, 11, 2):
        out.append(model(mx.array([[token]]), cache=cache))
    out.append(model(mx.array([[4, 6, 8, 10]]), cache=cache))
    return [np.array(o).view(np.uint32) for o in out]
