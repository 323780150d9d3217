"""Build sections from a stream of headings and text lines (shared by Markdown, rST and HTML)."""

from __future__ import annotations

from ingest.documents import Section


class SectionBuilder:
    """Collects lines under the current heading path; a heading closes the running section."""

    def __init__(self) -> None:
        self._path: list[tuple[int, str]] = []  # (level, title) from the outermost heading in
        self._lines: list[str] = []
        self.sections: list[Section] = []
        self.first_heading = ""

    def heading(self, level: int, title: str) -> None:
        self._flush()
        title = " ".join(title.split())
        self.first_heading = self.first_heading or title
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        self._path.append((level, title))

    def line(self, line: str) -> None:
        self._lines.append(line)

    def finish(self) -> tuple[Section, ...]:
        self._flush()
        return tuple(self.sections)

    def _flush(self) -> None:
        body = "\n".join(self._lines).strip()
        self._lines = []
        if body:
            self.sections.append(Section(tuple(t for _, t in self._path), body))
