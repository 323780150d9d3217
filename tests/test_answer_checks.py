"""Extraction, attribution and the answer policy on real passages: with word evidence alone (the
embedder is optional in EvidenceIndex) and with the bundled embedder."""

from __future__ import annotations

from ragcache.answer_policy import DECLINE_TEXT, AnswerPolicySettings, decide, needs_generation
from ragcache.attribution import attribute
from ragcache.evidence import EvidenceIndex, Passage
from ragcache.extract import extract_answer
from tests.ingest_support import embedder

BISECT = Passage(
    1,
    "bisect#0",
    "git-bisect",
    "git-bisect - Use binary search to find the commit that introduced a bug\n\n"
    "This command uses a binary search algorithm to find which commit in your project's history "
    "introduced a bug. You use it by first telling it a bad commit.",
)
LOG = Passage(
    2,
    "log#3",
    "git-log",
    "OPTIONS\n\n--follow\n    Continue listing the history of a file beyond renames (works only "
    "for a single file).\n\n--no-decorate\n    Print out the ref names of any commits that are "
    "shown.",
)
INDENT = Passage(
    3,
    "faq#1",
    "Design and History FAQ",
    "Guido van Rossum believes that using indentation for grouping is extremely elegant and "
    "contributes a lot to the clarity of the average Python program. Most people learn to love "
    "this feature after a while.",
)


def index(embed=None) -> EvidenceIndex:
    return EvidenceIndex([BISECT, LOG, INDENT], embed)


def test_extract_quotes_the_stating_sentence_with_its_span() -> None:
    question = "Which git command uses binary search to find the commit that introduced a bug?"
    got = extract_answer(question, index(embedder().embed))
    assert got is not None and got.quote.number == 1
    assert "binary search" in got.quote.text
    assert BISECT.text[got.quote.start : got.quote.end] == got.quote.text
    # "This command uses ..." does not say which: the answer names the page it comes from.
    if got.quote.text.startswith("This command"):
        assert got.subject == "git-bisect"
        answer = decide("extract", got, None, AnswerPolicySettings(decline_below=0.0))
        assert answer.text.startswith("git-bisect: This command uses")


def test_extract_brings_the_term_above_a_definition() -> None:
    got = extract_answer(
        "Which option continues listing the history of a file beyond renames?", index()
    )
    assert got is not None and got.quote.number == 2
    assert got.quote.text.startswith("--follow")


def test_attribution_keeps_a_supported_claim_and_fixes_a_wrong_number() -> None:
    answer = (
        "Guido van Rossum thinks indentation for grouping is elegant [1]. "
        "The moon is made of green cheese [3]."
    )
    first, second = attribute(answer, index())
    assert first.quote is not None and first.quote.number == 3  # [1] does not say it; [3] does
    assert second.quote is None  # nothing supports it


def test_policy_modes() -> None:
    ix = index()
    policy = AnswerPolicySettings(decline_below=0.3)
    extraction = extract_answer("Why does Python use indentation for grouping?", ix)
    assert extraction is not None and needs_generation("auto", extraction, policy)
    good = attribute("Guido believes indentation for grouping is extremely elegant.", ix)
    bad = attribute("Python uses braces for grouping statements in C code.", ix)
    auto_good = decide("auto", extraction, good, policy)
    assert auto_good.method == "generated" and auto_good.text.endswith("elegant [3].")
    assert decide("auto", extraction, bad, policy).method == "extracted"
    assert decide("generate", extraction, bad, policy).text == DECLINE_TEXT
    quoted = decide("extract", extraction, None, policy)
    assert quoted.method == "extracted" and quoted.quotes[0].number == 3


def test_weak_evidence_is_declined_without_running_the_model() -> None:
    ix = index()
    policy = AnswerPolicySettings(decline_below=0.5)
    extraction = extract_answer("What is the default of vacuum_freeze_min_age in PostgreSQL?", ix)
    assert extraction is not None and extraction.score < 0.5
    assert not needs_generation("auto", extraction, policy)
    assert decide("auto", extraction, None, policy).text == DECLINE_TEXT


def test_a_model_that_says_it_does_not_know_is_a_decline() -> None:
    ix = index()
    policy = AnswerPolicySettings(decline_below=0.2)
    extraction = extract_answer("Why does Python use indentation for grouping?", ix)
    text = "The documents don't answer this."
    got = decide("generate", extraction, attribute(text, ix), policy, text)
    assert got.declined


def test_a_name_no_source_mentions_is_declined() -> None:
    ix = index()
    policy = AnswerPolicySettings(decline_below=0.0)
    question = "What does the --follow option of git log do with core.autoSquashMerges?"
    got = extract_answer(question, ix)
    assert got is not None and got.unknown_names == ("core.autoSquashMerges",)
    assert decide("extract", got, None, policy).declined
    assert not needs_generation("auto", got, policy)
    known = extract_answer("What does the --follow option of git log do?", ix)
    assert known is not None and known.unknown_names == ()
    assert not decide("extract", known, None, policy).declined


def test_a_heading_is_never_evidence_and_repeating_one_is_no_claim() -> None:
    manual = Passage(
        4,
        "tut#2",
        "Argparse Tutorial",
        "Argparse Tutorial > Introducing Optional arguments\n\nOptional arguments start with "
        "two dashes, like --verbosity.",
        header="Argparse Tutorial > Introducing Optional arguments",
    )
    ix = EvidenceIndex([manual])
    assert [e.sentence.text for e in ix.entries] == [
        "Optional arguments start with two dashes, like --verbosity."
    ]
    (said,) = attribute("Argparse Tutorial > Introducing Optional arguments [4]", ix)
    assert not said.checked and said.quote is None


def test_a_product_the_sources_never_name_is_declined() -> None:
    """A question about another tool's setting is not answered by a close passage of this
    manual; a capitalised word that opens a sentence or a possessive is no name of its own."""
    from ragcache.extract import unknown_names

    sources = "git merge tool settings. Python on Linux."
    assert unknown_names("Which merge tool does Mercurial's merge setting pick?", sources) == (
        "Mercurial",
    )
    assert unknown_names("Which port does the Flask development server use?", sources) == ("Flask",)
    assert unknown_names("I build Python on Linux, but files are missing. Why?", sources) == ()
    assert unknown_names("What is the OS-level file handle of a temporary file?", sources) == ()
    got = extract_answer("Which merge tool does Mercurial's ui setting select?", index())
    assert got is not None and decide("extract", got, None, AnswerPolicySettings()).declined


def test_a_documents_opening_sentence_is_preferred_for_what_it_is_about() -> None:
    """Two passages match the question's words about as well; the one whose document opens
    with its sentence (an FAQ entry, a manual's NAME line) is quoted from its start, not a
    sentence deep in a tutorial page. Without the lead prior the deeper match would win."""
    from dataclasses import replace

    from ragcache.extract import ExtractSettings

    tutorial = Passage(
        1,
        "tut#7",
        "Floating Point Arithmetic",
        "Decimal fractions are stored as binary fractions. So floating-point calculations "
        "show small errors that surprise users.",
    )
    faq = Passage(
        2,
        "faq#2",
        "q002",
        "Floating-point calculations show errors that surprise users, who think it is a bug. "
        "It is not.",
        opens_document=True,
    )
    question = "Why do floating-point calculations show small errors?"
    ix = EvidenceIndex([tutorial, faq])
    plain = extract_answer(question, ix, replace(ExtractSettings(), lead_weight=0.0))
    assert plain is not None and plain.quote.number == 1
    got = extract_answer(question, ix)
    assert got is not None and got.quote.number == 2 and got.quote.start == 0


def test_a_pages_name_line_does_not_outrank_the_option_that_answers() -> None:
    """A manual's NAME line opens its page but is a label, not a sentence: a question about one
    option is answered by that option's entry deeper in the page, with the term above it."""
    grep_name = Passage(
        1,
        "grep#0",
        "git-grep",
        "git-grep - Print lines matching a pattern\n\nLook for specified patterns in the "
        "tracked files in the work tree.",
        opens_document=True,
    )
    grep_options = Passage(
        2,
        "grep#6",
        "git-grep",
        "--break\nPrint an empty line between matches from different files.\n\n--heading\n"
        "Show the filename above the matches in that file instead of at the start of each line.",
    )
    ix = EvidenceIndex([grep_name, grep_options])
    got = extract_answer("Which git grep option prints an empty line between matches?", ix)
    assert got is not None and got.quote.number == 2
    assert got.quote.text.startswith("--break")
    # The NAME line still answers a question about the page as a whole on its own match.
    got = extract_answer("Which git command prints lines matching a pattern?", ix)
    assert got is not None and got.quote.number == 1 and got.quote.start == 0


def test_a_default_stated_at_the_end_of_a_long_definition_is_quoted_too() -> None:
    """The term's description is quoted from its start; a later sentence of the same definition
    that answers too (the default, past the length budget) follows after an ellipsis, with its
    own span and citation, and never one of the next term's."""
    config = Passage(
        1,
        "config#9",
        "git-config",
        "http.followRedirects\n"
        "Whether git should follow HTTP redirects. If set to true, git will transparently "
        "follow any redirect issued by a server it encounters. If set to false, git will treat "
        "all redirects as errors. If set to initial, git will follow redirects only for the "
        "initial request to a remote, but not for subsequent follow-up HTTP requests. Since git "
        "uses the redirected URL as the base for the follow-up requests, this is generally "
        "sufficient. The default is initial.\n\n"
        "http.lowSpeedLimit\n"
        "If the HTTP transfer speed is less than this many bytes per second, abort.",
    )
    got = extract_answer(
        "What is the default value of the http.followRedirects configuration variable?",
        EvidenceIndex([config], embedder().embed),
    )
    assert got is not None and got.quote.text.startswith("http.followRedirects")
    assert got.more is not None and "initial" in got.more.text
    assert got.quote.end < got.more.start < config.text.index("http.lowSpeedLimit")
    assert config.text[got.more.start : got.more.end] == got.more.text
    answer = decide("extract", got, None, AnswerPolicySettings(decline_below=0.0))
    assert " … " in answer.text and answer.text.endswith("[1].")
    assert [q.start for q in answer.quotes] == [got.quote.start, got.more.start]


CONFIG = Passage(
    1,
    "config#40",
    "git-config(1) Manual Page",
    "pack.windowMemory\nThe maximum size of memory used by each thread for pack window memory. "
    "The default value of this configuration variable is unlimited.\n\n"
    "pack.window\nThe size of the window used by git-pack-objects(1). Defaults to 10.\n",
)


def test_the_entry_that_defines_the_asked_name_is_evidence_for_it() -> None:
    """The sentence "Defaults to 10." says nothing by its words; its entry's term is the name
    asked about, so it is evidence for it (pack.windowMemory's entry is not), enough that the
    shipped settings answer where, without it, the confidence is under the decline threshold."""
    from dataclasses import replace

    from ragcache.extract import ExtractSettings, defines_asked_name

    question = "What is the default value of the pack.window configuration variable?"
    ix = EvidenceIndex([CONFIG], embedder().embed)
    defines = defines_asked_name(question, ix)
    said = {
        e.sentence.text.splitlines()[-1]: bool(d) for e, d in zip(ix.entries, defines, strict=True)
    }
    assert said["Defaults to 10."]
    assert not said["The default value of this configuration variable is unlimited."]
    policy = AnswerPolicySettings()
    off = extract_answer(question, ix, replace(ExtractSettings(), defined_name_weight=0.0))
    on = extract_answer(question, ix, policy.extract)
    assert off is not None and on is not None and "Defaults to 10" in on.quote.text
    assert off.score < policy.decline_below <= on.score
    assert decide("extract", off, None, policy).declined
    assert not decide("extract", on, None, policy).declined
