"""Expanding PATH arguments: folders, globs, excludes, and paths that cannot be walked."""

from __future__ import annotations

import os

import pytest

from ingest.sources import SourceNotFoundError, require_found, scan_paths


def _tree(root):
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "a.md").write_text("a")
    (root / "docs" / "sub" / "b.txt").write_text("b")
    (root / "docs" / ".hidden.md").write_text("h")
    (root / "docs" / "img.png").write_bytes(b"\x89PNG")
    (root / "docs" / "skip.md").write_text("s")


def test_folder_ids_are_relative_to_its_parent_and_sorted(tmp_path):
    _tree(tmp_path)
    scan = scan_paths([str(tmp_path / "docs")], excludes=(".*", "skip.md"))
    assert [f.doc_id for f in scan.files] == ["docs/a.md", "docs/sub/b.txt"]
    assert scan.skipped == [] and scan.missing == []
    assert [s.reason for s in scan.ignored] == ["unsupported format .png"]
    assert scan.files[0].source == os.path.abspath(tmp_path / "docs" / "a.md")
    assert scan.covers(str(tmp_path / "docs" / "gone.md"))
    assert not scan.covers(str(tmp_path / "elsewhere.md"))


def test_globs_and_missing_paths(tmp_path):
    _tree(tmp_path)
    pattern = str(tmp_path / "docs" / "**" / "*.txt")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    paths = [
        pattern,
        str(tmp_path / "nope"),
        str(tmp_path / "none*.md"),
        str(tmp_path / "dangling"),
    ]
    scan = scan_paths(paths)
    assert [f.doc_id for f in scan.files] == ["docs/sub/b.txt"]
    # An empty glob stays a skip: with --sync it says that what it covered is gone.
    assert [s.reason for s in scan.skipped] == ["no file matches this pattern"]
    assert [s.path for s in scan.missing] == [str(tmp_path / "nope"), str(tmp_path / "dangling")]
    assert scan.covers(str(tmp_path / "docs" / "sub" / "gone.txt"))
    with pytest.raises(SourceNotFoundError) as info:
        require_found(scan)
    assert info.value.exit_code == 66 and str(tmp_path / "nope") in str(info.value)
    assert f"{tmp_path / 'dangling'}, a broken symlink" in str(info.value)
    require_found(scan_paths([pattern]))  # nothing missing: no error


def test_unsupported_files_are_ignored_in_folders_and_globs_but_skipped_when_named(tmp_path):
    _tree(tmp_path)
    (tmp_path / "docs" / "site.css").write_text("body {}")
    png = str(tmp_path / "docs" / "img.png")
    in_folder = scan_paths([str(tmp_path / "docs")])
    assert sorted(os.path.basename(i.path) for i in in_folder.ignored) == ["img.png", "site.css"]
    assert in_folder.skipped == []
    by_glob = scan_paths([str(tmp_path / "docs" / "*")])
    assert len(by_glob.ignored) == 2 and by_glob.skipped == []
    named = scan_paths([png])  # asked for by name: a file the job cannot read is a skip
    assert [s.reason for s in named.skipped] == ["unsupported format .png"] and not named.ignored


def test_symlink_loops_end_with_a_reason(tmp_path):
    _tree(tmp_path)
    (tmp_path / "docs" / "sub" / "up").symlink_to(tmp_path / "docs", target_is_directory=True)
    (tmp_path / "docs" / "me").symlink_to(tmp_path / "docs" / "me")
    scan = scan_paths([str(tmp_path / "docs")])
    assert [f.doc_id for f in scan.files] == ["docs/a.md", "docs/skip.md", "docs/sub/b.txt"]
    loops = [s for s in scan.skipped if "symlink loop" in s.reason]
    assert {os.path.basename(s.path) for s in loops} == {"up", "me"}
