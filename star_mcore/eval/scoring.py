"""RULER's scores: a reference counts as found when it is a case-insensitive substring of the prediction."""

from __future__ import annotations

from typing import List


def string_match_all(prediction: str, references: List[str]) -> float:
    """The share of references found (every one must be there for full marks): NIAH, vt, cwe, fwe, BABILong."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: List[str]) -> float:
    """1 if any reference is found (references are alternative answers): the QA tasks."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
