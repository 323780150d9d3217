"""Regenerate the bundled `git_docs` corpus and its labelled question set.

Source: the HTML manual pages of Git 2.39 as Debian ships them (`apt-get install git-doc`, under
/usr/share/doc/git/html). License: GPL-2.0 (the corpus keeps `COPYING.txt`, which carries it).

Every page of the manual (`git-*.html` for the commands, `git*.html` for the concept guides such as
gitglossary or gitattributes) becomes one Markdown file: headings stay headings, a paragraph is one
line, an option or configuration variable is its term line directly followed by its description,
and code is fenced. The HTML is used rather than the AsciiDoc sources because the package lacks the
`config/` and shared include files that the sources pull in; the HTML has them inlined.

The questions are made from the pages' structure, each with a short gold answer and the verbatim
sentence of the gold page that states it (`evidence`):
- `git-cmd-*`: a command's purpose, from its NAME line ("Which git command ...?" -> "git bisect");
- `git-opt-*`: an option from a command's OPTIONS section with a short, distinctive description
  ("Which git fsck option prints out objects that exist but that aren't reachable ...?" ->
  "--unreachable");
- `git-def-*`: a default stated as "defaults to X" / "The default is X" in the description of an
  option or configuration variable ("What is the default value of the pack.window configuration
  variable?" -> "10").
A question is kept only when its evidence sentence occurs in one corpus file alone, so the gold page
is never ambiguous (the shared option and configuration texts that many pages include are skipped).
Hand-checked drops are listed in DROPPED, hand-added answer forms in EXTRA_ALIASES.
`unanswerable_questions.jsonl` is written by hand, not by this script.

Usage: python datasets/build_git_docs.py [--src DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

SOURCE = Path("/usr/share/doc/git/html")
LICENSE = Path("/usr/share/common-licenses/GPL-2")
COPYRIGHT = Path("/usr/share/doc/git/copyright")
NAME = "git_docs"

_BLOCK_TAGS = {"p", "div", "dl", "dd", "ul", "ol", "table", "tr", "td", "br", "blockquote"}
_SKIP_TAGS = {"head", "script", "style", "title"}
_TYPOGRAPHY = str.maketrans(
    {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2009": " "}
)


class _PageToMarkdown(HTMLParser):
    """AsciiDoc's HTML manual page -> Markdown blocks (headings, paragraphs, terms, code)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []  # (kind, text): kind in h1..h4, p, dt, li, pre
        self._inline: list[str] = []
        self._skip = 0  # depth inside head/script/style or the page footer
        self._pre: list[str] | None = None
        self._heading = ""
        self._in_dt = False
        self._lists: list[list[int]] = []  # one entry per open ul/ol: [next number] or [] for ul
        self._prefix = ""  # the marker of the list item (or admonition) whose text comes next
        self._icon = False
        self._div_depth = 0
        self._footer_depth = -1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "div":
            self._div_depth += 1
            if attr.get("id") in ("footer", "footnotes") and self._footer_depth < 0:
                self._footer_depth = self._div_depth
                self._skip += 1
        if tag in _SKIP_TAGS:
            self._skip += 1
        if self._skip:
            return
        if tag == "pre":
            self._flush()
            self._pre = []
        elif tag in ("h1", "h2", "h3", "h4", "h5"):
            self._flush()
            self._heading = tag
        elif tag == "dt":
            self._flush()
            self._in_dt = True
        elif tag in ("ul", "ol"):
            self._flush()
            self._lists.append([1] if tag == "ol" else [])
        elif tag == "li":
            self._flush()
            depth = "  " * max(len(self._lists) - 1, 0)
            if self._lists and self._lists[-1]:
                self._prefix = f"{depth}{self._lists[-1][0]}. "
                self._lists[-1][0] += 1
            else:
                self._prefix = f"{depth}- "
        elif tag == "td" and attr.get("class") == "icon":
            self._flush()
            self._icon = True
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            if self._div_depth == self._footer_depth:
                self._footer_depth = -1
                self._skip -= 1
            self._div_depth -= 1
            if self._skip:
                return
        if tag in _SKIP_TAGS:
            self._skip -= 1
            return
        if self._skip:
            return
        if tag == "pre" and self._pre is not None:
            text = "".join(self._pre).translate(_TYPOGRAPHY).strip("\n")
            self._pre = None
            if text.strip():
                self.blocks.append(("pre", text))
        elif tag == self._heading:
            self.blocks.append((self._heading, self._take()))
            self._heading = ""
        elif tag == "dt":
            text = self._take()
            if text:
                self.blocks.append(("dt", text))
            self._in_dt = False
        elif tag in ("ul", "ol"):
            self._flush()
            if self._lists:
                self._lists.pop()
        elif tag == "td" and self._icon:
            label = self._take()
            self._prefix = f"{label}: " if label else ""
            self._icon = False
        elif tag in _BLOCK_TAGS or tag == "li":
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._pre is not None:
            self._pre.append(data)
        else:
            self._inline.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _take(self) -> str:
        text = " ".join("".join(self._inline).translate(_TYPOGRAPHY).split())
        self._inline = []
        return text

    def _flush(self) -> None:
        text = self._take()
        if text:
            kind = "li" if self._prefix and not self._prefix.endswith(": ") else "p"
            self.blocks.append((kind, self._prefix + text))
            self._prefix = ""


def parse_page(html: str) -> list[tuple[str, str]]:
    """One manual page's blocks: (kind, text), kind one of h1..h5, p, dt, li, pre."""
    parser = _PageToMarkdown()
    parser.feed(html)
    parser.close()
    return parser.blocks


def to_markdown(blocks: list[tuple[str, str]]) -> str:
    """The Markdown text of a page's blocks."""
    out: list[str] = []
    prev = ""
    for kind, text in blocks:
        if kind.startswith("h"):
            level = int(kind[1])
            out += ["", "#" * level + " " + text, ""]
        elif kind == "pre":
            out += ["", "```", text, "```", ""]
        elif kind == "dt":
            out += [text] if prev == "dt" else ["", text]
        elif kind == "li":
            out += [text] if prev == "li" else ["", text]
        else:  # a paragraph: right under its term, or after a blank line
            out += [text] if prev == "dt" else ["", text]
        prev = kind
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    return text


@dataclass(frozen=True)
class Page:
    doc_id: str
    name: str  # "git-bisect"
    blocks: list[tuple[str, str]]
    text: str  # the Markdown written to the corpus


def build_corpus(src: Path, corpus: Path) -> dict[str, Page]:
    """Write one Markdown file per manual page; returns {doc_id: page}."""
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir(parents=True)
    docs: dict[str, Page] = {}
    for page in sorted(src.glob("git*.html")):
        html = page.read_text(encoding="utf-8")
        if '<body class="manpage">' not in html:
            continue  # articles such as git-bisect-lk2009 are not manual pages
        blocks = parse_page(html)
        text = to_markdown(blocks)
        target = corpus / f"{page.stem}.md"
        target.write_text(text, encoding="utf-8")
        doc_id = f"{NAME}/{target.name}"
        docs[doc_id] = Page(doc_id, page.stem, blocks, text)
    license_text = (
        "Git's documentation, like Git, is distributed under the GNU General Public License,\n"
        "version 2 (GPL-2.0). Debian's copyright statement for the package:\n\n"
        + COPYRIGHT.read_text(encoding="utf-8").split("\n\n")[1]
        + "\n\nThe text of the license follows.\n\n"
        + LICENSE.read_text(encoding="utf-8")
    )
    (corpus / "COPYING.txt").write_text(license_text, encoding="utf-8")
    return docs


@dataclass(frozen=True)
class Entry:
    """A term group of a page (option, configuration variable, ...) and its description."""

    path: tuple[str, ...]  # the heading titles above it, outermost first
    terms: tuple[str, ...]
    paragraphs: tuple[str, ...]  # the description's prose paragraphs, up to the next term


def entries(blocks: list[tuple[str, str]]) -> list[Entry]:
    """The term groups of a page, in order."""
    out: list[Entry] = []
    path: list[tuple[int, str]] = []
    i = 0
    while i < len(blocks):
        kind, text = blocks[i]
        if kind[0] == "h":
            level = int(kind[1])
            path = [p for p in path if p[0] < level] + [(level, text)]
        if kind != "dt":
            i += 1
            continue
        terms = []
        while i < len(blocks) and blocks[i][0] == "dt":
            terms.append(blocks[i][1])
            i += 1
        paragraphs = []
        while i < len(blocks) and blocks[i][0] in ("p", "li", "pre"):
            if blocks[i][0] == "p":
                paragraphs.append(blocks[i][1])
            i += 1
        out.append(Entry(tuple(t for _, t in path), tuple(terms), tuple(paragraphs)))
    return out


def sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences: a new one starts after .!? and a capital letter or a "--option"."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z]|--)", paragraph)


def third_person(verb: str) -> str:
    """'use' -> 'uses', 'apply' -> 'applies', 'push' -> 'pushes'."""
    low = verb.lower()
    if low in ("do", "go"):
        return low + "es"
    if low == "be":
        return "is"
    if re.search(r"(s|sh|ch|x|z)$", low):
        return low + "es"
    if re.search(r"[^aeiou]y$", low):
        return low[:-1] + "ies"
    return low + "s"


def _rank(key: str) -> str:
    """A stable pseudo-random order (the same on every run and machine)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def _pick(cands: list[dict], n: int, per_page: int) -> list[dict]:
    """n candidates in a stable pseudo-random order, at most per_page from one page."""
    out: list[dict] = []
    used: dict[str, int] = {}
    for c in sorted(cands, key=lambda c: _rank(c["gold_doc_id"] + "\0" + c["question"])):
        if used.get(c["gold_doc_id"], 0) >= per_page or c["question"] in DROPPED:
            continue
        used[c["gold_doc_id"]] = used.get(c["gold_doc_id"], 0) + 1
        out.append(c)
        if len(out) == n:
            break
    return sorted(out, key=lambda c: (c["gold_doc_id"], c["question"]))


class Corpus:
    """The corpus's texts, to check that a sentence or term belongs to one page alone."""

    def __init__(self, docs: dict[str, Page]) -> None:
        self.docs = docs
        self.term_pages: dict[str, set[str]] = {}
        for doc_id, page in docs.items():
            for kind, text in page.blocks:
                if kind == "dt":
                    self.term_pages.setdefault(text, set()).add(doc_id)

    def unique(self, sentence: str, doc_id: str) -> bool:
        """True when the sentence occurs once in the corpus, in doc_id."""
        if self.docs[doc_id].text.count(sentence) != 1:
            return False
        return not any(sentence in p.text for d, p in self.docs.items() if d != doc_id)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# --- (a) command purpose, from the NAME line -------------------------------------------------

# Base verbs that open the NAME lines of the command pages.
VERBS = _words(
    """add annotate apply bridge build check clone collect compare compute copy count create
    debug delete display download export extract fetch find generate get give import initialize
    inspect join list manage map modify move output pack perform pick prepare print produce
    provide prune push read reapply record reduce reflect register remove reset restore retrieve
    reuse revert rewrite run salvage send show stash summarize switch unpack update use validate
    verify write browse store ensure receive set rename parse reinitialize massage optimize
    integrate"""
)
ADVERBS = frozenset({"temporarily", "instantly", "interactively"})
# NAME lines that are noun phrases read badly with a bare "is a": phrased by hand.
PREDICATES = {
    "git-fast-import": "is the backend for fast Git data importers",
    "git-http-backend": "is the server side implementation of Git over HTTP",
    "git-sh-setup": "provides common Git shell script setup code",
    "git-sh-i18n": "provides Git's i18n setup code for shell scripts",
    "git-svn": "provides bidirectional operation between a Subversion repository and Git",
    "git-mergetool--lib": "provides common Git merge tool shell scriptlets",
    "git-fast-export": "is the Git data exporter",
    "git-gc": "cleans up unnecessary files and optimizes the local repository",
}
# Old names and synonyms of other commands (git-stage is git-add), and commands whose NAME line
# fits another command as well (git checkout switches branches too; git-credential-cache is the
# credential helper that temporarily stores credentials in memory, not its daemon).
SKIP_COMMANDS = frozenset(
    {"git-fsck-objects", "git-init-db", "git-stage", "git-switch", "git-credential-cache--daemon"}
)


# Old names of a command that its pages still document: also right answers.
SYNONYMS = {"git-fsck": ["git fsck-objects"], "git-init": ["git init-db"], "git-add": ["git stage"]}


def command_predicate(name: str, description: str) -> str:
    """'Use binary search to find ...' -> 'uses binary search to find ...'."""
    if name in PREDICATES:
        return PREDICATES[name]
    words = description.rstrip(".").split()
    low = words[0].lower()
    verbs_3rd = {third_person(v) for v in VERBS}
    if low in ADVERBS:
        return " ".join([low, third_person(words[1])] + words[2:])
    if low in verbs_3rd:
        return " ".join([low] + words[1:])
    if low.rstrip(",") in VERBS:
        # "List, create, or delete branches": every verb of the opening series is conjugated,
        # and so is a verb after "and"/"or" ("Switch branches or restore working tree files").
        out = []
        verb_next = True
        for i, w in enumerate(words):
            bare = w.rstrip(",")
            after_conjunction = i > 0 and words[i - 1] in ("or", "and")
            if (verb_next or after_conjunction) and bare.lower() in VERBS:
                out.append(third_person(bare) + ("," if w.endswith(",") else ""))
                nxt = words[i + 1] if i + 1 < len(words) else ""
                verb_next = w.endswith(",") or nxt in ("or", "and")
            elif w in ("or", "and") and verb_next:
                out.append(w)
            else:
                verb_next = False
                out.append(w)
        return " ".join(out)
    # A noun phrase: "A CVS server emulator for Git", "Graphical alternative to git-commit".
    first = words[0]
    if first in ("A", "An", "The"):
        return "is " + " ".join([low] + words[1:])
    if first == "Git's":
        return "is " + " ".join(words)
    if first.startswith("Git"):
        rest = words
    else:
        rest = [first if first.isupper() else first.lower()] + words[1:]
    article = "an" if rest[0][0].lower() in "aeiou" else "a"
    return f"is {article} " + " ".join(rest)


def command_questions(docs: dict[str, Page], corpus: Corpus) -> list[dict]:
    names: dict[str, str] = {}
    for page in docs.values():
        if page.name.startswith("git-") and page.name not in SKIP_COMMANDS:
            line = next((t for k, t in page.blocks if k == "p"), "")
            if line.startswith(page.name + " - "):
                names[page.doc_id] = line
    descriptions = [line.split(" - ", 1)[1] for line in names.values()]
    out = []
    for doc_id, line in names.items():
        page = docs[doc_id]
        description = line.split(" - ", 1)[1]
        if descriptions.count(description) > 1 or not corpus.unique(line, doc_id):
            continue
        command = "git " + page.name.removeprefix("git-")
        out.append(
            {
                "question": f"Which git command {command_predicate(page.name, description)}?",
                "gold_doc_id": doc_id,
                "answer": command,
                "aliases": [page.name, page.name.removeprefix("git-")]
                + SYNONYMS.get(page.name, []),
                "section": "command",
                "evidence": line,
            }
        )
    return out


# --- (b) options, from OPTIONS sections --------------------------------------------------------

OPTION_VERBS = _words(
    """abort add allow append apply attempt check continue copy create delete disable display
    edit emit enable exit force generate ignore include keep limit list make omit open output
    override pass perform prepend print process prune read record remove report reset restrict
    run send show skip start stop suppress take terminate treat turn update use verify write
    fetch let switch store"""
)
_OPTION_NAME = re.compile(r"^(--?[A-Za-z0-9][\w-]*)")


def option_predicate(sentence: str) -> str | None:
    """'Continue listing ...' -> 'continues listing ...'; None when it does not read well.

    Parenthetical remarks and a trailing "; see ..." are left out of the question."""
    text = sentence.rstrip(".")
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\s*\([^()]*\)", "", text)
    text = re.sub(r";\s*see\b.*$", "", text)
    words = text.split()
    if len(words) < 3 or re.search(r"\.\s", text) or "respectively" in text:
        return None  # too short, two sentences run together, or two options described at once
    if words[1] in ("this", "these"):
        return None  # "Use this to specify ...": reads badly as a question
    if words[0] == "Do" and words[1] == "not" or words[0] == "Don't":
        rest = words[2:] if words[0] == "Do" else words[1:]
        return "tells it not to " + " ".join(rest)
    if words[0] == "Only" and words[1] in OPTION_VERBS:
        return "makes it only " + " ".join(words[1:])
    if words[0].lower() in OPTION_VERBS:
        # "List or delete ...", "Abort ... but keep ...": the later verbs agree with the first.
        later = [
            third_person(w) if words[i - 1] in ("and", "or", "but") and w in OPTION_VERBS else w
            for i, w in enumerate(words[1:], 1)
        ]
        return " ".join([third_person(words[0])] + later)
    return None


def option_names(terms: tuple[str, ...]) -> list[str]:
    """The option names of a term group: ("-q, --quiet",) -> ["-q", "--quiet"]."""
    names = []
    for term in terms:
        for part in term.split(", "):
            m = _OPTION_NAME.match(part.strip())
            if m:
                names.append(m.group(1))
    return list(dict.fromkeys(names))


def option_questions(docs: dict[str, Page], corpus: Corpus) -> list[dict]:
    out = []
    for doc_id, page in docs.items():
        if not page.name.startswith("git-") or page.name in SKIP_COMMANDS:
            continue
        command = "git " + page.name.removeprefix("git-")
        for e in entries(page.blocks):
            if len(e.path) < 2 or e.path[1] != "OPTIONS" or not e.paragraphs:
                continue
            if not all(t.startswith("-") for t in e.terms) or any("[no-]" in t for t in e.terms):
                continue
            names = option_names(e.terms)
            longs = [n for n in names if n.startswith("--")]
            # A long name is a clearer answer than "-x"; "--foo" with "--no-foo" is two answers.
            if not longs or any("--no-" + n[2:] in names for n in longs):
                continue
            answer = longs[0]
            sentence = sentences(e.paragraphs[0])[0]
            predicate = option_predicate(sentence)
            if (
                predicate is None
                or not 25 <= len(sentence) <= 160
                or any(re.search(re.escape(n) + r"\b", sentence) for n in names)
                or not corpus.unique(sentence, doc_id)
            ):
                continue
            aliases = [n for n in names if n != answer]
            aliases += [t for t in e.terms if t not in names and t != answer]
            out.append(
                {
                    "question": f"Which {command} option {predicate}?",
                    "gold_doc_id": doc_id,
                    "answer": answer,
                    "aliases": list(dict.fromkeys(aliases)),
                    "section": "option",
                    "evidence": sentence,
                }
            )
    return out


# --- (c) defaults -------------------------------------------------------------------------------

_DEFAULT = re.compile(
    r"\b(?:[Dd]efaults to|[Tt]he default is|[Dd]efault is|[Tt]he default value is|"
    r"[Dd]efault value is)\s+"
    r"(.+?)(?=[,;()]|\.(?:\s|$)|$|\s+(?:if|when|unless|and|but|which|on|for|in|since|or|"
    r"otherwise|as|to|with|from|except|instead|because)\b)"
)
# "If unset, the default is 2" states the default; "If feature.manyFiles is enabled, ..." does not.
_UNSET = re.compile(r"^(?:If|When)\b[^,]*\b(?:unset|not specified|not set|omitted|unspecified)\b")
_BORING = frozenset(
    {"true", "false", "yes", "no", "on", "off", "0", "1", "none", "unset", "empty", "not"}
)
_VAGUE_START = ("the ", "to ", "using ", "either ", "option ", "a ", "an ", "not ", "no ", "off ")
_CONFIG_VAR = re.compile(r"^[A-Za-z][\w-]*(\.[^\s.]+)+$")
_ENV_VAR = re.compile(r"^GIT_[A-Z0-9_]+$")


def default_subject(page: Page, term: str) -> str | None:
    """How a question names the term whose default it asks for; None for other kinds of term."""
    if term.startswith("-") and page.name.startswith("git-") and "[no-]" not in term:
        m = _OPTION_NAME.match(term)
        if m:
            return f"the {m.group(1)} option of git {page.name.removeprefix('git-')}"
    if _ENV_VAR.match(term):
        return f"the {term} environment variable"
    if page.name == "gitweb.conf" and re.match(r"^[$@%]\w+$", term):
        return f"the gitweb.conf variable {term}"
    if _CONFIG_VAR.match(term) and page.name != "gitweb.conf":
        return f"the {term} configuration variable"
    return None


def default_questions(docs: dict[str, Page], corpus: Corpus) -> list[dict]:
    out = []
    for doc_id, page in docs.items():
        for e in entries(page.blocks):
            hits = [
                (s, m) for p in e.paragraphs for s in sentences(p) for m in _DEFAULT.finditer(s)
            ]
            options = all(t.startswith("-") for t in e.terms)
            if len(hits) != 1 or (len(e.terms) != 1 and not options):
                continue
            sentence, m = hits[0]
            value = m.group(1).strip().rstrip(".")
            terms = sorted(e.terms, key=lambda t: not t.startswith("--"))  # a long option first
            subject = default_subject(page, terms[0])
            bare = value.strip("\"'")
            after = sentence[m.end(1) : m.end(1) + 2]
            if (
                subject is None
                or "otherwise" in sentence
                or (sentence.startswith(("If ", "When ")) and not _UNSET.match(sentence))
                or re.match(r",\S", after)  # "blue,12 month ago,...": a list, cut short
                or not re.search(r"[A-Za-z0-9]", bare)
                or re.search(r"[()\[\]]", bare)
                or bare.split()[0].lower() in _BORING
                or bare.lower().startswith(_VAGUE_START)
                or len(bare.split()) > 3
                or not corpus.unique(sentence, doc_id)
                or (not options and len(corpus.term_pages[e.terms[0]]) > 1)
            ):
                continue
            aliases = [value] if value != bare else []
            number = re.match(r"^(\d+)\s+\w+$", bare)
            if number:
                aliases.append(number.group(1))
            if bare.startswith("--"):
                aliases.append(bare[2:])
            out.append(
                {
                    "question": f"What is the default value of {subject}?",
                    "gold_doc_id": doc_id,
                    "answer": bare,
                    "aliases": aliases,
                    "section": "default",
                    "evidence": sentence,
                }
            )
    return out


# Questions read by hand against their evidence and dropped (see datasets/README.md).
DROPPED = frozenset(
    {
        # "Default is 256 MiB on 32 bit platforms and 32 TiB ... on 64 bit platforms": no one value.
        "What is the default value of the core.packedGitLimit configuration variable?",
        # "If <commit-ish> is omitted, it defaults to HEAD": the default of <commit-ish>, not of -b.
        "What is the default value of the -b option of git worktree?",
    }
)
# Other forms of a gold answer that its evidence states (added by hand after reading).
EXTRA_ALIASES = {
    "What is the default value of the core.filesRefLockTimeout configuration variable?": [
        "100ms",
        "100 milliseconds",
    ],
    "What is the default value of the core.packedRefsTimeout configuration variable?": [
        "1 second",
        "1000 milliseconds",
    ],
    "What is the default value of the credentialStore.lockTimeoutMS configuration variable?": [
        "1s",
        "1 second",
    ],
    "What is the default value of the --overlay option of git restore?": [
        "no-overlay",
        "--no-overlay",
    ],
    "What is the default value of the -z option of git cvsimport?": ["300", "300 seconds"],
    "What is the default value of the --diff-merges option of git show?": ["cc"],
    "What is the default value of the --big-file-threshold option of git fast-import?": ["512 MiB"],
    "What is the default value of the gitweb.conf variable $fallback_encoding?": ["iso-8859-1"],
}
N_COMMAND, N_OPTION, N_DEFAULT = 80, 60, 100


def build(src: Path, out: Path) -> None:
    docs = build_corpus(src, out / NAME)
    corpus = Corpus(docs)
    kinds = [
        ("cmd", command_questions(docs, corpus), N_COMMAND, 1),
        ("opt", option_questions(docs, corpus), N_OPTION, 2),
        ("def", default_questions(docs, corpus), N_DEFAULT, 100),
    ]
    questions = []
    for prefix, cands, n, per_page in kinds:
        print(f"{prefix}: {len(cands)} candidates")
        for i, q in enumerate(_pick(cands, n, per_page), 1):
            q["aliases"] = list(dict.fromkeys(q["aliases"] + EXTRA_ALIASES.get(q["question"], [])))
            questions.append({"id": f"git-{prefix}-{i:03d}", **q})
    missing = set(EXTRA_ALIASES) - {q["question"] for q in questions}
    assert not missing, f"EXTRA_ALIASES for questions no longer made: {missing}"
    for q in questions:
        assert q["evidence"] in docs[q["gold_doc_id"]].text, q
    with open(out / f"{NAME}_questions.jsonl", "w", encoding="utf-8") as f:
        for q in questions:
            row = {k: q[k] for k in ("id", "question", "gold_doc_id", "answer", "aliases")}
            row.update(section=q["section"], evidence=q["evidence"])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in (out / NAME).iterdir())
    print(f"{len(docs) + 1} files ({size / 1e6:.2f} MB), {len(questions)} questions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    build(args.src, args.out)


if __name__ == "__main__":
    main()
