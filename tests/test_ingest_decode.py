"""Bytes to text on real encoded paragraphs: UTF-8 and byte-order marks as they are, Western European
cp1252 / latin-1 exactly (not as cp1257 or cp1250 mojibake), other code pages as charset_normalizer
already found them, binary skipped."""

from __future__ import annotations

import pytest

from ingest.codepages import plausibility, rank
from ingest.decode import Decoded, decode_text
from ingest.documents import SkipFile

WESTERN = {
    "French": "Le café crème est servi à la terrasse de l'hôtel. Dès que le garçon arrive, il "
    "dépose les croissants sur la table près de la fenêtre. Où est passée la clé du coffre ? Elle "
    "était là hier soir, à côté du rôti et des pâtes. Noël approche et les enfants préparent déjà "
    "leurs lettres avec beaucoup d'enthousiasme.",
    "German": "Die Straße führt über die Brücke zum Bahnhof. Im Frühling blühen die Bäume, und "
    "die Vögel singen fröhlich. Müller hat gestern einen großen Fehler gemacht, als er die Tür "
    "nicht abschloss. Außerdem müssen wir noch die Größe der Räume überprüfen.",
    "Spanish": "El niño pequeño jugaba en el jardín mientras su abuela preparaba la cena. "
    "¿Cuántos años tienes? Preguntó el señor con una sonrisa. La canción que escuchamos ayer fue "
    "muy bonita. Mañana iremos a la montaña para ver la nieve. ¡Qué alegría!",
    "Portuguese": "A população da região aumentou muito nos últimos anos. As informações sobre a "
    "educação e a saúde são importantes para o governo. Não há razão para preocupação, disse o "
    "ministro. As crianças brincam no pátio da escola enquanto os pais esperam à saída.",
    "Italian": "La città è piena di turisti durante l'estate. Perché non andiamo al caffè vicino "
    "alla stazione? Così potremo parlare un po' più tranquillamente. Però lunedì si lavora.",
    # Words of several languages in one text: each spelled in its own, the text in none.
    "mixed": "The naïve café owner in São Paulo read Gödel's proof, then listened to Björk while "
    "eating crème brûlée and jalapeño poppers. His résumé mentions Ångström units and Århus.",
}

# Decoded right by charset_normalizer before this change too (measured with 3.5.3): no regression.
OTHERS = [
    (
        "cp1251",
        "Москва является столицей Российской Федерации и крупнейшим городом страны. В "
        "городе находится множество музеев, театров и парков. Летом жители часто отдыхают на даче.",
    ),
    (
        "koi8_r",
        "Москва является столицей Российской Федерации и крупнейшим городом страны. Летом "
        "жители часто отдыхают на даче, а зимой катаются на лыжах и коньках.",
    ),
    (
        "cp1250",
        "Příliš žluťoučký kůň úpěl ďábelské ódy. Praha je hlavní město České republiky a "
        "leží na řece Vltavě. Čeština má mnoho háčků a čárek, které cizincům dělají potíže.",
    ),
    (
        "cp1250",
        "Praha je hlavní město České republiky a leží na řece Vltavě. V létě se lidé rádi "
        "koupají v rybnících a večer sedí v hospodách.",
    ),
    (
        "cp1250",
        "Zażółć gęślą jaźń. Warszawa jest stolicą Polski i największym miastem w kraju. "
        "Wisła płynie przez środek miasta, a wzdłuż jej brzegów ciągną się parki i ścieżki.",
    ),
    (
        "cp1250",
        "Budapest Magyarország fővárosa és legnagyobb városa. A Duna két partján fekszik, "
        "és számos híres épülete van, például az Országház.",
    ),
    (
        "cp1253",
        "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μία από τις αρχαιότερες πόλεις του "
        "κόσμου. Η Ακρόπολη δεσπόζει πάνω από την πόλη.",
    ),
    ("cp1255", "ירושלים היא עיר הבירה של מדינת ישראל והעיר הגדולה ביותר בה."),
    ("cp1256", "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها. تقع المدينة على ضفاف نهر النيل."),
    ("big5", "台北是台灣的首都，也是全國的政治和文化中心。這座城市有著悠久的歷史。"),
]
# Wrong before (cp1250, iso8859_10, cp1250 and cp1252 were picked), right now.
FIXED = [
    ("iso8859_2", OTHERS[2][1]),
    ("iso8859_2", OTHERS[4][1]),
    ("cp1254", "İstanbul, Türkiye'nin en kalabalık şehridir. Boğaziçi köprüsü iki kıtayı "
     "birbirine bağlar. Çocuklar okuldan sonra parkta oynamayı çok severler."),
    ("cp1257", "Vilnius yra Lietuvos sostinė ir didžiausias šalies miestas. Mieste gausu "
     "bažnyčių, o senamiestis įtrauktas į paveldo sąrašą."),
]  # fmt: skip


@pytest.mark.parametrize("codec", ["cp1252", "latin-1"])
@pytest.mark.parametrize("language", sorted(WESTERN))
def test_western_european_text_decodes_exactly(language: str, codec: str) -> None:
    text = WESTERN[language]
    # latin-1 and cp1252 agree on these letters: the guess is reported as cp1252 for both.
    assert decode_text(text.encode(codec)) == Decoded(text, "cp1252", guessed=True)


def test_a_few_words_decode_exactly() -> None:
    # charset_normalizer alone said cp1006 (Urdu) here, and cp1257 ("crčme") for longer French.
    assert decode_text("Café crème".encode("cp1252")).text == "Café crème"
    assert decode_text("Grüße aus München\n".encode("latin-1")).text == "Grüße aus München\n"


@pytest.mark.parametrize(("codec", "text"), OTHERS + FIXED)
def test_other_code_pages_decode_exactly(codec: str, text: str) -> None:
    decoded = decode_text(text.encode(codec))
    assert decoded.text == text and decoded.guessed


def test_utf8_and_byte_order_marks_are_not_guesses() -> None:
    text = WESTERN["French"] + " Москва 東京"
    assert decode_text(text.encode("utf-8")) == Decoded(text, "utf-8", guessed=False)
    assert decode_text(b"\xef\xbb\xbf" + text.encode()) == Decoded(text, "utf-8-sig")
    assert decode_text(text.encode("utf-16")) == Decoded(text, "utf-16")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4, "binary"),
        (bytes(range(0x80, 0x100)) * 40, "no text encoding"),
    ],
)
def test_binary_is_still_skipped(data: bytes, reason: str) -> None:
    with pytest.raises(SkipFile, match=reason):
        decode_text(data)


def test_a_byte_past_the_sample_that_cp1252_lacks_falls_back_to_latin1() -> None:
    # 0x81 is undefined in cp1252; the sample (256 KiB) ends before it, the file does not.
    data = WESTERN["French"].encode("cp1252") * 1200 + b"\x81"
    decoded = decode_text(data)
    assert decoded.encoding == "iso8859_1" and decoded.text == data.decode("latin-1")


def test_mojibake_costs_more_than_the_real_words() -> None:
    right = plausibility("Le café crème, près de la fenêtre de l'hôtel.")
    wrong = plausibility("Le café crčme, pr\u010ds de la fen\u0119tre de l'hôtel.")  # as cp1250
    assert (right.cost, right.alphabet) == (0, "French") and wrong.cost > right.cost
    assert plausibility("Ìîñêâà ÿâëÿåòñÿ ñòîëèöåé").cost == 6  # Russian read as cp1252
    assert plausibility("Москва является столицей") == (0, 3, "CYRILLIC")


def test_ties_go_to_cp1252() -> None:
    # Czech reads "crème" as "crčme": both are words, and cp1252 is the more common code page.
    ranked = rank("Café crème".encode("cp1252"), ["cp1250", "cp1257"])
    assert ranked[0].encoding == "cp1252" and ranked[0].plausibility.cost == 0
    assert {c.encoding for c in ranked if c.plausibility.cost == 0} >= {"cp1252", "cp1250"}
