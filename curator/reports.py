"""Radiology report text: the section CheXzero trains on.

CheXzero pairs each image with its report's IMPRESSION section. :func:`extract_impression` takes
the text after ``IMPRESSION:`` up to the next section header (or the end), falls back to the
FINDINGS section when there is no non-empty impression, and to the whole report when there is
neither. Whitespace is collapsed to single spaces.

A section header is an all-caps phrase followed by a colon at the start of a line
(``RECOMMENDATION(S):``, ``NOTIFICATION:``), or one of the usual section names anywhere in a line
(``... effusion. COMPARISON: None.``). An all-caps word followed by a colon inside a sentence,
such as ``Right PICC: tip in the SVC``, is not a header.
"""

from __future__ import annotations

import re

# Section names recognised inline as well as at the start of a line.
KNOWN_SECTIONS = (
    "ADDENDUM",
    "CLINICAL HISTORY",
    "CLINICAL INFORMATION",
    "CLINICAL INDICATION",
    "COMPARISON",
    "COMPARISONS",
    "CONCLUSION",
    "CONCLUSIONS",
    "EXAMINATION",
    "EXAM",
    "FINDINGS",
    "FINDING",
    "HISTORY",
    "IMPRESSION",
    "IMPRESSIONS",
    "INDICATION",
    "INDICATIONS",
    "NOTIFICATION",
    "REASON FOR EXAMINATION",
    "REASON FOR EXAM",
    "RECOMMENDATION",
    "RECOMMENDATIONS",
    "RECOMMENDATION(S)",
    "TECHNIQUE",
    "WET READ",
)

_KNOWN = "|".join(re.escape(s) for s in sorted(KNOWN_SECTIONS, key=len, reverse=True))
# Any all-caps phrase + colon at the start of a line, or a known section name + colon anywhere
# (after whitespace or at the start), or a known name in any case at the start of a line.
_BOUNDARY = re.compile(
    r"(?m)^[ \t]*[A-Z][A-Z0-9 /&()\-]*[A-Z)][ \t]*:"
    rf"|(?:(?<=\s)|^)(?:{_KNOWN})[ \t]*:"
    rf"|(?im:^[ \t]*(?:{_KNOWN})[ \t]*:)"
)


def _header(names: str) -> re.Pattern:
    # Upper case anywhere after whitespace, any case at the start of a line.
    return re.compile(rf"(?:(?<=\s)|^)(?:{names})[ \t]*:|(?im:^[ \t]*(?:{names})[ \t]*:)", re.MULTILINE)


_IMPRESSION = _header("IMPRESSIONS?")
_FINDINGS = _header("FINDINGS?")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def _section(text: str, header: re.Pattern) -> str:
    """The first non-empty section that starts with ``header``, or ``""``."""
    for m in header.finditer(text):
        start = m.end()
        nxt = _BOUNDARY.search(text, start)
        body = normalize_whitespace(text[start : nxt.start() if nxt else len(text)])
        if body:
            return body
    return ""


def extract_impression(report: str | None) -> str:
    """The report's IMPRESSION section; else its FINDINGS; else the whole text (whitespace collapsed)."""
    if not report or not isinstance(report, str):
        return ""
    return _section(report, _IMPRESSION) or _section(report, _FINDINGS) or normalize_whitespace(report)


# A sentence ends at ".", "!" or "?" followed by white space and a capital letter or digit;
# "1.5 cm" and "T4." followed by lower case do not end one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
# List numbering of an impression ("1. ... 2. ..."), dropped from the sentences.
# It needs white space (or the end) after it: "2.5 cm mass." is a sentence, not item 2 "5 cm mass.".
_ENUMERATOR = re.compile(r"^\d{1,2}[.)](?:\s+|$)")


def split_sentences(text: str) -> list[str]:
    """The sentences of an impression, in order, without list numbering; never an empty list."""
    parts = [_ENUMERATOR.sub("", p.strip()) for p in _SENTENCE_END.split(normalize_whitespace(text))]
    parts = [p for p in parts if p]
    return parts or [normalize_whitespace(text)]
