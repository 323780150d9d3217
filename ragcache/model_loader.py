"""Load a generator: an embedded model name, an mlx-lm model folder, or a hub id."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcache.embedded_models import EMBEDDED_MODELS
from ragcache.errors import ModelNotFoundError
from ragcache.model_prepare import MANIFEST, prepare_model

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and tokenizer ready for generation, with what the cache needs to key on."""

    name: str
    path: Path | None  # None for a hub id resolved by mlx-lm
    model: Any  # mlx.nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    identity: str  # changes whenever weights, dtype, quantization or tokenizer change
    chat: bool  # has a chat template: prompts go through it
    context_length: int
    quantization: str
    # What the decode kernel holds of its weights: a ragcache.packed_weights.PackedWeights, or None
    # when nothing is packed. Typed Any because the server resolves these hints at run time and
    # packed_weights imports mlx, which this module loads only in load_model.
    packed: Any = None

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    @property
    def family(self) -> str:
        """The architecture name mlx-lm gives the model ("llama", "qwen2", "gemma3_text")."""
        return str(getattr(self.model, "model_type", "") or "")


def resolve_model_path(spec: str, home: Path, quant: str = "none") -> Path | str:
    """Map a spec to a folder (embedded names are prepared on first use) or return a hub id as is."""
    if spec in EMBEDDED_MODELS:
        return prepare_model(spec, home, quant).path
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} has no config.json, so it is not an mlx-lm or Hugging Face model folder",
                hint="point at the folder that holds config.json and the *.safetensors weights",
            )
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id: mlx-lm downloads it where a network is available
    raise ModelNotFoundError(
        f"no model named {spec!r}: it is neither an embedded model, a folder, nor a hub id",
        hint="embedded models: " + ", ".join(EMBEDDED_MODELS) + "; or give a folder or org/name",
    )


def model_identity(path: Path | None, spec: str, numerics: str = "") -> str:
    """A short stable hash of what determines a model's KV values (`numerics`: how they are
    computed, where that differs from MLX's own kernels)."""
    digest = hashlib.sha256(spec.encode())
    if numerics:
        digest.update(numerics.encode())
    if path is not None:
        for name in ("config.json", MANIFEST, "tokenizer.json", "tokenizer_config.json"):
            f = path / name
            if f.exists():
                digest.update(name.encode())
                digest.update(f.read_bytes())
        for weights in sorted(path.glob("*.safetensors")):
            stat = weights.stat()
            digest.update(f"{weights.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def _quantization_of(config: dict) -> str:
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return str(config.get("torch_dtype") or config.get("dtype") or "float")
    return f"{q.get('mode', 'affine')}{q.get('bits', '')}"


def load_model(spec: str, home: Path, quant: str = "none", lazy: bool = False) -> LoadedModel:
    """Load model and tokenizer. Raises ModelNotFoundError with a hint when nothing loads.

    `lazy`: map the weights without reading them (MLX reads an array when it is first used): for
    a process that needs the tokenizer, template and context length but runs no forward pass,
    such as the HTTP front of Ray Serve replicas."""
    from mlx_lm import load

    from ragcache import attention, compiled_norm, output_screen, rope_table
    from ragcache.blas import skinny_kernel
    from ragcache.packed_weights import pack_model
    from ragcache.settings import read_blas_settings

    target = resolve_model_path(spec, home, quant)
    try:
        model, tokenizer, config = load(str(target), return_config=True, lazy=lazy)  # type: ignore[misc]
    except Exception as exc:  # mlx-lm raises many kinds here: say what was tried
        raise ModelNotFoundError(
            f"could not load model {spec!r} from {target}: {exc}",
            hint="check the folder or hub id, or use an embedded model such as smollm2-135m-instruct",
        ) from exc
    path = target if isinstance(target, Path) else None
    # Cached KV computed with one attention must not be restored under another.
    blas = read_blas_settings()
    kernel = skinny_kernel()
    attention.configure(blas.fast_softmax, kernel if blas.decode_attention else None)
    attention.install(model)
    numerics = attention.tag() if attention.routes(model) else ""
    context_length = int(
        config.get("max_position_embeddings")
        or config.get("text_config", {}).get("max_position_embeddings", 4096)
    )
    if blas.rope_tables and not lazy:
        rope_table.install(model, context_length)  # same bits, so the identity does not change
    if blas.compiled_norms and not lazy:
        compiled_norm.install(model)  # same bits, so the identity does not change
    packed = None
    if kernel is not None and not lazy and blas.packed_weights:
        packed = pack_model(model, kernel, blas.q4_weights)  # same bits: the same identity
        if blas.output_screen:  # the same greedy tokens; K/V never depends on it
            output_screen.install(model, kernel)
    return LoadedModel(
        name=spec,
        path=path,
        model=model,
        tokenizer=tokenizer,
        identity=model_identity(path, spec, numerics),
        chat=bool(getattr(tokenizer, "chat_template", None)),
        context_length=context_length,
        quantization=_quantization_of(config),
        packed=packed,
    )


def load_tokenizer(spec: str, home: Path, quant: str = "none") -> Any:
    """The model's tokenizer alone (mlx-lm TokenizerWrapper), for ingest-time chunk tokenization."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer_from

    target = resolve_model_path(spec, home, quant)
    if isinstance(target, str):
        from huggingface_hub import snapshot_download

        target = Path(snapshot_download(target, allow_patterns=["*.json", "*.model", "*.txt"]))
    return load_tokenizer_from(target)


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
