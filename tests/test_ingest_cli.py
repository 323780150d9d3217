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

from ingest.cli import EXIT_NO_INPUT, EXIT_PARTIAL, register
from ingest.sources import SourceNotFoundError
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
    (corpus / "style.css").write_text("body { color: red }")
    missing = tmp_path / "does-not-exist"

    # A PATH that is not there stops the job before the store is touched.
    version = lancedb.connect(str(db)).open_table("chunks").version
    with pytest.raises(SourceNotFoundError, match="does-not-exist"):
        _ingest([str(corpus), str(missing), "--db", str(db)], capsys)
    assert lancedb.connect(str(db)).open_table("chunks").version == version

    code, report = _ingest([str(corpus), "--db", str(db)], capsys)
    assert code == EXIT_PARTIAL and report["partial"]
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert "corrupt PDF" in reasons["corrupt.pdf"]
    assert "no text encoding" in reasons["noise.txt"]
    assert "over the 16 MB limit" in reasons["huge.txt"]
    assert "symlink loop" in reasons["loop"] and "symlink loop" in reasons["self"]
    assert reasons["empty.md"] == "empty file"
    assert [Path(i["path"]).name for i in report["ignored"]] == ["style.css"]
    assert sorted(report["added"]) == ["corpus/good.pdf", "corpus/latin1.txt"]
    assert report["guessed_encodings"] == [
        {"path": str(corpus / "latin1.txt"), "encoding": "cp1252"}
    ]
    assert report["unchanged"] == 2 and report["total_chunks"] > stored  # nothing lost

    code, again = _ingest([str(corpus), "--db", str(db), "--sync"], capsys)
    assert code == EXIT_PARTIAL and again["deleted"] == [] and again["chunks_written"] == 0


def test_latin1_text_is_decoded_exactly_and_reported_as_a_guess(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    # Before, this paragraph was stored as cp1257: "crčme", "Pčre".
    text = (
        "Le café crème est servi à la terrasse de l'hôtel. Dès que le garçon arrive, il dépose "
        "les croissants près de la fenêtre. Noël approche, le Père Noël aussi.\n"
    )
    (corpus / "fr.txt").write_bytes(text.encode("latin-1"))
    (corpus / "utf8.md").write_text("# Déjà vu\n\nDéjà vu, en UTF-8.\n", encoding="utf-8")
    code, report = _ingest([str(corpus), "--db", str(tmp_path / "db")], capsys)
    assert code == 0 and sorted(report["added"]) == ["c/fr.txt", "c/utf8.md"]
    assert report["guessed_encodings"] == [{"path": str(corpus / "fr.txt"), "encoding": "cp1252"}]
    table = lancedb.connect(str(tmp_path / "db")).open_table("chunks")
    rows = table.search().where("doc_id = 'c/fr.txt'").limit(None).to_list()
    assert [r["text"] for r in rows] == [text.strip()]
    # The text summary names the file whose encoding was guessed.
    (corpus / "fr.txt").write_bytes((text + "Encore.\n").encode("cp1252"))
    args = _parse([str(corpus), "--db", str(tmp_path / "db")])
    assert args.func(args, load_settings()) == 0
    assert f"guessed encoding cp1252 for {corpus / 'fr.txt'}" in capsys.readouterr().out


def test_files_of_kinds_ingest_never_reads_are_ignored_not_partial(tmp_path, capsys):
    site = tmp_path / "site"
    write_markdown_corpus(site, 1)
    (site / "assets").mkdir()
    (site / "assets" / "style.css").write_text("body { margin: 0 }")
    (site / "assets" / "app.js").write_text("console.log(1)")
    (site / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    db = str(tmp_path / "db")
    code, report = _ingest([str(site), "--db", db], capsys)
    assert code == 0 and not report["partial"] and report["skipped"] == []
    assert sorted(Path(i["path"]).name for i in report["ignored"]) == [
        "app.js",
        "logo.png",
        "style.css",
    ]
    assert all(i["reason"].startswith("unsupported format .") for i in report["ignored"])
    args = _parse([str(site), "--db", db])
    assert args.func(args, load_settings()) == 0
    out = capsys.readouterr().out
    assert "0 skipped, 3 ignored" in out
    assert "ignored 3 files of kinds ingest does not read: .css (1), .js (1), .png (1)" in out

    # A file of a kind ingest reads that cannot be read still makes the run partial...
    (site / "notes.txt").write_bytes(bytes(range(0x80, 0x100)) * 40)
    code, report = _ingest([str(site), "--db", db], capsys)
    assert code == EXIT_PARTIAL and report["partial"] and len(report["ignored"]) == 3
    assert [Path(s["path"]).name for s in report["skipped"]] == ["notes.txt"]
    # ...and so does a file named on the command line that ingest cannot read at all.
    code, report = _ingest([str(site / "logo.png"), "--db", db], capsys)
    assert code == EXIT_PARTIAL and report["skipped"][0]["reason"] == "unsupported format .png"


def test_a_path_that_does_not_exist_exits_66_and_creates_no_table(tmp_path):
    db = tmp_path / "db"
    db.mkdir()  # a fresh store folder: it must stay empty
    missing = tmp_path / "typo" / "docs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "ingest", str(missing), "--db", str(db), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == EXIT_NO_INPUT == 66, done.stderr
    assert f"PATH does not exist: {missing}" in done.stderr
    assert list(db.iterdir()) == []  # no chunks.lance table, not even the job's lock file


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
