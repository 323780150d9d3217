"""Turn an embedded GGUF into an MLX model folder, once.

`prepare_model` is idempotent (a complete folder returns at once), atomic (the folder is built under a
temporary name and renamed into place, and `ragcache-model.json` is written last, so an interrupted
run never leaves a folder that looks complete) and verified (the GGUF's sha256 is checked against the
pinned value and recorded). Concurrent callers serialise on a lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ragcache.embedded_models import EMBEDDED_MODELS, EmbeddedModel
from ragcache.errors import ModelNotFoundError, ModelPackageError, UnsupportedQuantError

log = logging.getLogger(__name__)

MANIFEST = "ragcache-model.json"
# Bumped when the conversion changes, so folders made by an older ragcache are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantMode:
    name: str
    mode: str | None  # mlx-lm q_mode; None keeps float32
    bits: int | None
    group_size: int | None


QUANT_MODES: dict[str, QuantMode] = {
    q.name: q
    for q in (
        QuantMode("none", None, None, None),
        # Group 32 matches the 32-weight blocks of the Q4_1 / Q4_K GGUF sources, whose weights
        # already sit on a 4-bit grid: ppl 11.8 vs 12.1 with group 64 (float 10.2, SmolLM2).
        QuantMode("affine4", "affine", 4, 32),
        QuantMode("affine8", "affine", 8, 64),
        QuantMode("mxfp4", "mxfp4", 4, 32),
        QuantMode("nvfp4", "nvfp4", 4, 16),
    )
}


@dataclass(frozen=True)
class PreparedModel:
    name: str
    quant: str
    path: Path
    source_sha256: str
    seconds: float  # 0.0 when the folder was already there


def quant_mode(name: str) -> QuantMode:
    if name not in QUANT_MODES:
        raise UnsupportedQuantError(
            f"unknown quantization {name!r}", hint="choose one of: " + ", ".join(QUANT_MODES)
        )
    return QUANT_MODES[name]


def embedded_model(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(
            f"{name!r} is not an embedded model",
            hint="embedded models: " + ", ".join(EMBEDDED_MODELS),
        )
    return EMBEDDED_MODELS[name]


def prepared_path(home: Path, name: str, quant: str = "none") -> Path:
    return home / "models" / (name if quant == "none" else f"{name}-{quant}")


def recipe(q: QuantMode) -> str:
    """What a folder's weights were made with; a folder made by another recipe is rebuilt."""
    if q.mode is None:
        return "float32"
    embed = "-embed8" if q.bits == 4 else ""
    return f"{q.mode}-{q.bits}bit-g{q.group_size}{embed}"


def is_complete(folder: Path, quant: str | None = None) -> bool:
    """A finished folder of this format version (and, given `quant`, of its current recipe)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION:
        return False
    return quant is None or manifest.get("recipe", "float32") == recipe(QUANT_MODES[quant])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def prepare_model(name: str, home: Path, quant: str = "none") -> PreparedModel:
    """Make sure `$home/models/<name>[-quant]` holds a complete MLX model folder; return it.

    Raises ModelNotFoundError (unknown name), UnsupportedQuantError, ModelPackageError (package
    missing, or the GGUF fails its checksum). Leaves no partial folder behind on any error.
    """
    spec = embedded_model(name)
    q = quant_mode(quant)
    target = prepared_path(home, name, quant)
    if is_complete(target, quant):
        return PreparedModel(name, quant, target, _manifest(target)["source_sha256"], 0.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.with_name(target.name + ".lock")):
        if is_complete(target, quant):  # another process finished it while we waited
            return PreparedModel(name, quant, target, _manifest(target)["source_sha256"], 0.0)
        start = time.perf_counter()
        if q.mode is None:
            sha = _convert_gguf(spec, home, target)
        else:
            base = prepare_model(name, home, "none")
            sha = base.source_sha256
            _quantize(base.path, target, q, sha)
        return PreparedModel(name, quant, target, sha, time.perf_counter() - start)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


class _lock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fh = self.path.open("w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _build_into(target: Path, build) -> None:
    """Run `build(tmp)` in a sibling temp folder, then swap it into place."""
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder from a crashed run
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(spec: EmbeddedModel, home: Path, target: Path) -> str:
    sources = home / "sources"
    gguf = spec.locate(sources)
    if not gguf.exists():
        raise ModelPackageError(
            f"{gguf} is missing from the {spec.package} package", hint=spec.reinstall_hint()
        )
    log.info("verifying %s", gguf)
    sha = sha256_file(gguf)
    if sha != spec.sha256:
        if gguf.parent == sources:  # assembled by us from the package: rebuilt on the next run
            gguf.unlink(missing_ok=True)
        raise ModelPackageError(
            f"{gguf} has sha256 {sha}, expected {spec.sha256}: the package is corrupt or another version",
            hint=spec.reinstall_hint(),
        )

    def build(tmp: Path) -> None:
        # transformers dequantizes GGUF tensors to float32; imported here as it is slow to import.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s (about a minute)", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype="float32"
        )
        # The GGUF quantizer stays attached; without clearing it save_pretrained refuses or
        # re-declares the weights as quantized.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _make_config_mlx_compatible(tmp / "config.json")
        _write_manifest(tmp, spec.name, "none", sha)

    _build_into(target, build)
    return sha


def _make_config_mlx_compatible(config_path: Path) -> None:
    """Lift transformers-5 `rope_parameters` into the flat keys mlx-lm's model classes read.

    Without this mlx-lm silently falls back to rope_theta=10000 (SmolLM2 uses 100000) and the
    model answers in garbled text.
    """
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", rope)
        else:  # per layer type, as in Gemma 3
            if "full_attention" in rope:
                config.setdefault("rope_theta", rope["full_attention"]["rope_theta"])
            if "sliding_attention" in rope:
                config.setdefault("rope_local_base_freq", rope["sliding_attention"]["rope_theta"])
    layer_types = config.get("layer_types")
    if layer_types and "full_attention" in layer_types and "sliding_window_pattern" not in config:
        config["sliding_window_pattern"] = layer_types.index("full_attention") + 1
    config_path.write_text(json.dumps(config, indent=2))


def _keep_embeddings_8bit(path: str, module: object, *_: object) -> bool | dict:
    """Quantize transformer linears as asked, but embeddings (tied to the output layer) to 8 bits.

    The embedding table is the output layer too in both embedded models; at 4 bits it alone cost
    SmolLM2 3.3 perplexity points with nvfp4 (17.6 -> 14.3 when kept at 8 bits).
    """
    if "embed" in path or "lm_head" in path:
        return {"group_size": 64, "bits": 8, "mode": "affine"}
    return True


def _quantize(source: Path, target: Path, q: QuantMode, sha: str) -> None:
    from mlx_lm import convert

    def build(tmp: Path) -> None:
        log.info("quantizing to %s", q.name)
        convert(
            str(source),
            str(tmp),
            quantize=True,
            q_mode=q.mode or "affine",
            q_bits=q.bits,
            q_group_size=q.group_size,
            dtype="float32",
            quant_predicate=_keep_embeddings_8bit if q.bits == 4 else None,
        )
        (tmp / MANIFEST).unlink(missing_ok=True)  # copied from the source folder by convert
        _write_manifest(tmp, target.name, q.name, sha)

    _build_into(target, build)


def _write_manifest(folder: Path, name: str, quant: str, sha: str) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "quant": quant,
        "recipe": recipe(QUANT_MODES[quant]),
        "source_sha256": sha,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
