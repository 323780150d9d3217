"""`ragcache ingest` through its plugin parser: flags, the JSON report, exit codes, bad input."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import lancedb
import pytest

from ingest.cli import EXIT_PARTIAL, register
from ingest.tokens import tokenizer_folder
from ragcache.errors import ConfigError
from ragcache.settings import load_settings
from ragcache.store import SchemaMismatchError, chunk_schema
from tests.ingest_support import minimal_pdf, write_markdown_corpus

REPO = Path(__file__).resolve().parent.parent


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ragcache")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["ingest", *argv])


def _ingest(argv: list[str], capsys) -> tuple[int, dict]:
    args = _parse([*argv, "--json"])
    code = args.func(args, load_settings())
    return code, json.loads(capsys.readouterr().out)


def test_bad_inputs_are_skipped_with_reasons_and_the_job_is_partial(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_markdown_corpus(corpus, 2)
    db = tmp_path / "db"
    code, first = _ingest([str(corpus), "--db", str(db)], capsys)
    assert code == 0 and len(first["added"]) == 2
    stored = first["total_chunks"]

    (corpus / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj garbage")
    (corpus / "good.pdf").write_bytes(minimal_pdf(["Portable documents work too"]))
    (corpus / "latin1.txt").write_bytes(
        "Café au lait, déjà vu, façade naïve.\n".encode("cp1252") * 30
    )
    (corpus / "noise.txt").write_bytes(bytes(range(0x80, 0x100)) * 40)
    with open(corpus / "huge.txt", "wb") as f:  # 50 MB on one line
        f.write(b"x" * (50 * 2**20))
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)
    (corpus / "self").symlink_to(corpus / "self")
    (corpus / "empty.md").write_text("")
    missing = tmp_path / "does-not-exist"

    code, report = _ingest([str(corpus), str(missing), "--db", str(db)], capsys)
    assert code == EXIT_PARTIAL and report["partial"]
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert "corrupt PDF" in reasons["corrupt.pdf"]
    assert "no text encoding" in reasons["noise.txt"]
    assert "over the 16 MB limit" in reasons["huge.txt"]
    assert "symlink loop" in reasons["loop"] and "symlink loop" in reasons["self"]
    assert reasons["empty.md"] == "empty file"
    assert "does not exist" in reasons["does-not-exist"]
    assert sorted(report["added"]) == ["corpus/good.pdf", "corpus/latin1.txt"]
    assert report["unchanged"] == 2 and report["total_chunks"] > stored  # nothing lost

    code, again = _ingest([str(corpus), "--db", str(db), "--sync"], capsys)
    assert code == EXIT_PARTIAL and again["deleted"] == [] and again["chunks_written"] == 0


def test_latin1_text_is_decoded_not_dropped(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    text = "Le café est prêt. Voilà une façade très naïve, à côté de l'hôtel.\n" * 20
    (corpus / "fr.txt").write_bytes(text.encode("cp1252"))
    code, report = _ingest([str(corpus), "--db", str(tmp_path / "db")], capsys)
    assert code == 0 and report["added"] == ["c/fr.txt"]
    row = lancedb.connect(str(tmp_path / "db")).open_table("chunks").search().limit(1).to_list()[0]
    assert "Le caf" in row["text"] and "\ufffd" not in row["text"]


def test_table_of_another_schema_version_fails_cleanly_and_is_kept(tmp_path):
    corpus = tmp_path / "c"
    write_markdown_corpus(corpus, 1)
    db = lancedb.connect(str(tmp_path / "db"))
    old = chunk_schema(384, "old").with_metadata({b"ragcache.schema_version": b"0"})
    table = db.create_table("chunks", schema=old)
    version = table.version
    args = _parse([str(corpus), "--db", str(tmp_path / "db")])
    with pytest.raises(SchemaMismatchError) as info:
        args.func(args, load_settings())
    assert "schema version 0" in str(info.value) and info.value.exit_code == 6
    assert db.open_table("chunks").version == version
    # The same through a real process: the exit status tells a script what happened.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "ingest", str(corpus), "--db", str(tmp_path / "db")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 6 and "schema version 0" in done.stderr


def test_flags_are_checked(tmp_path):
    args = _parse([str(tmp_path), "--chunk-tokens", "20", "--overlap-tokens", "15"])
    with pytest.raises(ConfigError):
        args.func(args, load_settings())


def test_default_db_is_under_home_and_text_report(tmp_path, capsys):
    corpus = tmp_path / "c"
    write_markdown_corpus(corpus, 1)
    # A model folder as --generator: its tokenizer is used as is, nothing is prepared in home.
    folder = tokenizer_folder("smollm2-135m-instruct", load_settings().home)
    home = tmp_path / "home"
    args = _parse([str(corpus), "--table", "notes", "--generator", str(folder)])
    code = args.func(args, load_settings({"RAGCACHE_HOME": str(home)}))
    out = capsys.readouterr().out
    assert code == 0 and "1 added" in out and (home / "db" / "notes.lance").is_dir()
