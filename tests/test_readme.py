"""The README's commands are real: the three commands run, and every subcommand it shows exists."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def three_commands() -> list[str]:
    return [line for line in blocks()[0].splitlines() if line.strip()]


def test_the_three_commands_are_set_up_main_job_and_tests() -> None:
    setup, main_job, tests = three_commands()
    assert setup == "bash scripts/setup.sh" and (ROOT / "scripts" / "setup.sh").exists()
    assert tests == "bash scripts/check.sh" and (ROOT / "scripts" / "check.sh").exists()
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup in ci and tests in ci  # CI runs exactly what the README says
    assert "ragcache ingest" in main_job and "ragcache ask" in main_job


def test_every_subcommand_in_the_readme_exists() -> None:
    shown = set(re.findall(r"\.venv/bin/ragcache ([a-z]+)", README))
    out = subprocess.run(
        [sys.executable, "-m", "ragcache.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in shown:
        assert re.search(rf"^\s+{name}\s", out, flags=re.M), f"README shows unknown command {name}"


@pytest.mark.slow
def test_main_job_runs_on_the_embedded_defaults() -> None:
    """The README's main job, as written: ingest the bundled corpus, answer with sources."""
    main_job = three_commands()[1]
    ingest, ask = (part.strip() for part in main_job.split("&&"))
    done = subprocess.run(
        shlex.split(ingest), cwd=ROOT, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = subprocess.run(
        [*shlex.split(ask), "--json", "--max-tokens", "32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    result = json.loads(answer.stdout.strip().splitlines()[-1])
    assert any(s["doc_id"].endswith("faq/design/q001.rst") for s in result["sources"])
    # What the user reads: an answer about indentation, cited, each citation with its quote.
    text = result["answer"]
    assert result["method"] != "declined" and "indentation" in text.lower(), text
    assert result["citations"] and all(f"[{n}]" in text for n in result["citations"]), text
    for quote in result["quotes"]:
        assert quote["number"] in result["citations"] and quote["quote"].strip()
    said = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    assert len(said) == len(set(said)), text  # never a loop
    # ... and the right one: the labelled gold answer (faq-design-001), cited to its FAQ entry.
    gold = "Guido van Rossum believes that using indentation for grouping is extremely elegant"
    assert gold in " ".join(text.split()), text
    by_number = {s["number"]: s["doc_id"] for s in result["sources"]}
    assert all(by_number[n].endswith("faq/design/q001.rst") for n in result["citations"]), text
