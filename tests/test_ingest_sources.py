"""Expanding PATH arguments: folders, globs, excludes, and paths that cannot be walked."""

from __future__ import annotations

import os

from ingest.sources import scan_paths


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
    assert [s.reason for s in scan.skipped] == ["unsupported format .png"]
    assert scan.files[0].source == os.path.abspath(tmp_path / "docs" / "a.md")
    assert scan.covers(str(tmp_path / "docs" / "gone.md"))
    assert not scan.covers(str(tmp_path / "elsewhere.md"))


def test_globs_and_missing_paths(tmp_path):
    _tree(tmp_path)
    pattern = str(tmp_path / "docs" / "**" / "*.txt")
    scan = scan_paths([pattern, str(tmp_path / "nope"), str(tmp_path / "none*.md")])
    assert [f.doc_id for f in scan.files] == ["docs/sub/b.txt"]
    reasons = sorted(s.reason for s in scan.skipped)
    assert reasons == ["does not exist (or is a broken symlink)", "no file matches this pattern"]
    assert scan.covers(str(tmp_path / "docs" / "sub" / "gone.txt"))


def test_symlink_loops_end_with_a_reason(tmp_path):
    _tree(tmp_path)
    (tmp_path / "docs" / "sub" / "up").symlink_to(tmp_path / "docs", target_is_directory=True)
    (tmp_path / "docs" / "me").symlink_to(tmp_path / "docs" / "me")
    scan = scan_paths([str(tmp_path / "docs")])
    assert [f.doc_id for f in scan.files] == ["docs/a.md", "docs/skip.md", "docs/sub/b.txt"]
    loops = [s for s in scan.skipped if "symlink loop" in s.reason]
    assert {os.path.basename(s.path) for s in loops} == {"up", "me"}
