"""Answer extraction and matching: the last number in a generation, or a gold phrase in its first line."""

from __future__ import annotations

import math
import re
import unicodedata

# A number is an optional minus sign (not one glued to a preceding digit, so "58-23" reads as 23, not -23),
# then either digits grouped by thousands commas ("2,125", "1,250.5") or a plain digit run, then an optional
# decimal part. EvoLLM's regex read "1,250" as 250; the grouped alternative comes first so it wins here.
_NUMBER = re.compile(r"(?:(?<![0-9])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?")
# Minus-like characters that NFKC leaves alone.
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-"})

Number = int | float


def normalize_text(text: str) -> str:
    """NFKC folds full-width digits, commas and points (２，１２５．５) into ASCII; then unify minus signs."""
    return unicodedata.normalize("NFKC", text).translate(_MINUS_SIGNS)


def _to_number(token: str) -> Number:
    cleaned = token.replace(",", "")
    return float(cleaned) if "." in cleaned else int(cleaned)


def extract_last_number(text: str) -> Number | None:
    """The last number in `text` (int unless it has a decimal part), or None when there is none."""
    matches = _NUMBER.findall(normalize_text(text))
    return _to_number(matches[-1]) if matches else None


def parse_gold_number(gold: str) -> Number:
    """A gold answer such as "2,125" or "１８" as a number; anything else is a data error, so it raises."""
    normalized = normalize_text(gold).strip()
    if not _NUMBER.fullmatch(normalized):
        raise ValueError(f"gold answer {gold!r} is not a number")
    return _to_number(normalized)


def numbers_match(predicted: Number | None, gold: Number) -> bool:
    """Numeric equality (so 8 == 8.0), with a tolerance only for float round-off."""
    return predicted is not None and math.isclose(predicted, gold, rel_tol=1e-9, abs_tol=1e-9)


def first_line(text: str) -> str:
    """The generation up to its first newline, leading whitespace ignored: short answers end at the line."""
    return text.lstrip().split("\n", 1)[0]


def phrase_in_first_line(generation: str, gold_phrase: str) -> bool:
    """True when the gold phrase occurs in the first line (both NFKC-normalized, since tokenizers may fold width)."""
    phrase = normalize_text(gold_phrase).strip()
    if not phrase:
        raise ValueError("gold phrase is empty")
    return phrase in normalize_text(first_line(generation))
