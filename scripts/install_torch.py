"""Install torch without dragging a multi-GB CUDA build onto a machine that has no NVIDIA GPU.

PyPI's default Linux x86_64 torch wheel bundles CUDA (several GB). Where there is no GPU, take a
CPU build: a local `torch-*+cpu-*.whl` from pip's find-links folders first, else PyTorch's CPU index.
Elsewhere (macOS, aarch64 Linux, or a machine with a GPU) PyPI's default wheel is the right one.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip(*args: str) -> int:
    return subprocess.call(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-q", *args]
    )


def find_links_dirs() -> list[Path]:
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            if "find-links" in line:
                dirs += line.split("=", 1)[1].strip().strip("'\"").split()
    except OSError:
        pass
    return [Path(d.removeprefix("file://")) for d in dict.fromkeys(dirs) if d]


def local_cpu_wheel() -> Path | None:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in find_links_dirs():
        wheels = sorted(folder.glob(f"torch-*+cpu-{tag}-{tag}-*linux*_{platform.machine()}.whl"))
        if wheels:
            return wheels[-1]
    return None


def main() -> int:
    wants_cpu_build = (
        sys.platform.startswith("linux")
        and platform.machine() == "x86_64"
        and shutil.which("nvidia-smi") is None
    )
    if not wants_cpu_build:
        return pip("torch")
    wheel = local_cpu_wheel()
    if wheel is not None:
        print(f"using the local CPU build {wheel.name}")
        return pip(str(wheel))
    if pip("torch", "--index-url", CPU_INDEX) == 0:
        return 0
    print(
        "error: could not get a CPU build of torch (no local torch-*+cpu wheel, and "
        f"{CPU_INDEX} did not answer). Install one yourself, e.g. "
        f"pip install torch --index-url {CPU_INDEX}, then rerun scripts/setup.sh.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
