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
