"""Which legacy code page a non-UTF-8 file is in: the candidate whose words real alphabets spell.

charset_normalizer proposes candidates but ranks Latin code pages badly: on French, Portuguese,
Italian and Turkish paragraphs its first pick was cp1257, cp1250, cp1258 and cp1250 (3.5.3),
because its chaos and coherence figures barely differ between them. Those code pages decode ASCII
alike and differ only in what bytes 0x80-0xFF become, so "decodes without error" proves nothing
(cp1252 decodes nearly any byte). What does differ is whether the words come out spelled in one
language: French read as cp1250 turns "crème" into "crčme" (Czech) next to "fenętre" (Polish);
Czech read as cp1252 spells "pøíliš", with Danish ø and Spanish í in one word; Russian read as
cp1252 spells "Ìîñêâà". So each decoding is charged per word (see Plausibility) and the cheapest
wins. Ties go to cp1252: when both decodings read as real words ("Café crème" is French in cp1252
and Czech in cp1250), the base rate decides, and cp1252 is by far the most common legacy code page
(WHATWG decodes even pages labelled latin-1 as windows-1252).
"""

from __future__ import annotations

import codecs
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

# Tried before charset_normalizer's own order, so they win ties. latin-1 differs from cp1252 only
# in 0x80-0x9F (C1 controls, never in real text): it matters only where cp1252 cannot decode a
# byte (0x81 0x8D 0x8F 0x90 0x9D).
PREFERRED = ("cp1252", "latin_1")

# Non-ASCII letters of the languages written in legacy Latin code pages (cp125x, ISO 8859-x);
# capitals are added below. A letter missing here makes its right decoding look worse, never a
# wrong one better, so the lists err on the side of completeness.
_LATIN_LETTERS = {
    "French": "àâæçéèêëîïôœùûüÿ",
    "German": "äöüß",
    "Spanish": "áéíñóúü¿¡ºª",
    "Portuguese": "áâãàçéêíóôõúºª",
    "Italian": "àèéìíîòóùúºª",
    "Catalan": "àçèéíïòóúü",
    "Dutch": "áéíóúàèëïöü",
    "Danish/Norwegian": "æøåéóèòô",
    "Swedish/Finnish": "åäöéšž",
    "Icelandic": "áðéíóúýþæö",
    "Czech": "áčďéěíňóřšťúůýž",
    "Slovak": "áäčďéíĺľňóôŕšťúýž",
    "Polish": "ąćęłńóśźż",
    "Hungarian": "áéíóöőúüű",
    "Romanian": "ăâîșțşţ",
    "Croatian/Slovene": "čćđšž",
    "Lithuanian": "ąčęėįšųūž",
    "Latvian": "āčēģīķļņšūž",
    "Estonian": "äöõüšž",
    "Turkish": "çğıöşüâîûİ",
    "Maltese": "àċèġħìòùż",
    "Esperanto": "ĉĝĥĵŝŭ",
    # cp1258 writes most tones as combining marks after the letter.
    "Vietnamese": "àáâãèéêìíòóôõùúýăđơư\u0300\u0301\u0303\u0309\u0323",
}
ALPHABETS: dict[str, frozenset[str]] = {
    name: frozenset(letters) | {u for c in letters if len(u := c.upper()) == 1}
    for name, letters in _LATIN_LETTERS.items()
}
# Vietnamese shares most accented vowels with the West: it only spells a word holding a letter or
# tone mark of its own, else it would spell any mix of Western letters ("háèkù").
_VIETNAMESE_OWN = frozenset("ăđơưĂĐƠƯ\u0300\u0301\u0303\u0309\u0323")
# Punctuation and signs most code pages have: free at a word's edges (“so”, «so», 20€), while
# inside a word only an apostrophe or a middle dot is (l’hôtel, col·legi): "jalape°o" is no word.
_EDGES = "\u00a0«»“”‘’„‚‹›–—…•·°€£¥¢§¶©®™µ±†‡‰" + string.punctuation
_INNER = frozenset("’‘·")
# CJK ideographs, kana, hangul and their punctuation are one script: Japanese mixes three.
_EAST_ASIAN = ((0x1100, 0x11FF), (0x2E80, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
               (0xFE30, 0xFE4F), (0xFF00, 0xFFEF))  # fmt: skip


class Plausibility(NamedTuple):
    """What a decoding's words with non-ASCII letters cost: 0 each in the text's main `alphabet`,
    1 in another alphabet (a quoted name: a French text may cite Gödel), 2 in no alphabet
    (mojibake). An alphabet is a language's letters, or one whole non-Latin script such as
    CYRILLIC. Lower `cost` is more plausible; `words` counts those words, repeats included."""

    cost: int
    words: int
    alphabet: str


def plausibility(text: str) -> Plausibility:
    """Charge a decoded text word by word (words split at whitespace)."""
    fitting = misfits = 0
    by_alphabet: Counter[str] = Counter()
    for word, n in Counter(text.split()).items():
        if word.isascii():
            continue
        inner = word.strip(_EDGES)
        letters = {c for c in inner if c >= "\x80" and c not in _INNER}
        if not letters:
            continue
        fits = _alphabets_of(inner, letters)
        if fits:
            fitting += n
            by_alphabet.update(dict.fromkeys(fits, n))
        else:
            misfits += n
    alphabet, n_main = by_alphabet.most_common(1)[0] if by_alphabet else ("none", 0)
    return Plausibility(fitting - n_main + 2 * misfits, fitting + misfits, alphabet)


def _alphabets_of(word: str, letters: set[str]) -> list[str]:
    """The alphabets that hold every one of a word's non-ASCII `letters`."""
    latin = [name for name, alphabet in ALPHABETS.items() if letters <= alphabet]
    if "Vietnamese" in latin and not letters & _VIETNAMESE_OWN:
        latin.remove("Vietnamese")
    if latin:
        return latin
    scripts = {_script(c) for c in letters}
    # One non-Latin script and no ASCII letter: "Москва" is a word, "geنnspecteerd" is not.
    has_ascii_letter = any(c.isascii() and c.isalpha() for c in word)
    if len(scripts) == 1 and None not in scripts and not has_ascii_letter:
        return [str(scripts.pop())]
    return []


def _script(char: str) -> str | None:
    """The script of a non-Latin letter or mark (GREEK, CYRILLIC, ...); None for anything else."""
    if any(lo <= ord(char) <= hi for lo, hi in _EAST_ASIAN):
        return "EAST ASIAN"
    if unicodedata.category(char)[0] not in "LM":
        return None  # digits, symbols, controls: ¹ ³ × ÷ and the C1 controls of latin-1
    script = unicodedata.name(char, "?").split()[0]
    # MODIFIER letters (ˆ ˜ ʼ) are spacing accents, not a script.
    return None if script in ("LATIN", "COMBINING", "MODIFIER", "?") else script


class Candidate(NamedTuple):
    """A code page (Python codec name) that decodes the sample, and how plausible its text is."""

    encoding: str
    plausibility: Plausibility


def rank(sample: bytes, proposed: Iterable[str]) -> list[Candidate]:
    """The code pages among PREFERRED and `proposed` that decode `sample` (which may end inside a
    character), most plausible first; ties keep PREFERRED, then `proposed`, order."""
    names: list[str] = []
    for name in (*PREFERRED, *proposed):
        canonical = _canonical(name)
        if canonical is not None and canonical not in names:
            names.append(canonical)
    scored: list[Candidate] = []
    for name in names:
        try:
            # An incremental decoder keeps a character cut at the sample's end for later.
            text = codecs.getincrementaldecoder(name)().decode(sample, final=False)
        except UnicodeDecodeError:
            continue
        scored.append(Candidate(name, plausibility(text)))
    return sorted(scored, key=lambda c: c.plausibility.cost)  # sorted() is stable


def _canonical(name: str) -> str | None:
    try:
        return codecs.lookup(name).name.replace("-", "_")
    except LookupError:
        return None
