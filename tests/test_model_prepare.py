"""Embedded model preparation: idempotent, atomic, verified; loader errors say what to do."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from ragcache.embedded_models import EMBEDDED_MODELS
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
