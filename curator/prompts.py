"""Prompt sets: which findings to score and with which template pair.

A prompt set is a small TOML file::

    positive = "{}"          # optional, default "{}"
    negative = "no {}"       # optional, default "no {}"
    [[finding]]
    name = "Pneumoperitoneum"                                        # column: pneumoperitoneum
    phrases = ["pneumoperitoneum", "free air under the diaphragm"]   # optional, default [name]

Other keys are an error (as in cohort specs), and so is ``phrases`` given as a single string.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from curator import constants as C


class PromptSetError(ValueError):
    """A prompt-set file that does not follow the format."""


def snake_case(name: str) -> str:
    """Column name of a finding: ``"Pleural Effusion"`` -> ``"pleural_effusion"``."""
    s = re.sub(r"[^0-9a-zA-Z]+", "_", name.strip()).strip("_").lower()
    if not s:
        raise PromptSetError(f"finding name {name!r} has no letters or digits")
    if s[0].isdigit():
        s = "f_" + s
    return s


@dataclass(frozen=True)
class Finding:
    name: str
    phrases: tuple[str, ...]

    @property
    def column(self) -> str:
        return snake_case(self.name)


@dataclass(frozen=True)
class PromptSet:
    findings: tuple[Finding, ...]
    positive: str = C.POSITIVE_TEMPLATE
    negative: str = C.NEGATIVE_TEMPLATE
    name: str = "custom"
    source: str | None = field(default=None, compare=False)

    @property
    def columns(self) -> list[str]:
        return [f.column for f in self.findings]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "positive": self.positive,
            "negative": self.negative,
            "findings": [{"name": f.name, "phrases": list(f.phrases)} for f in self.findings],
        }

    @property
    def id(self) -> str:
        """Content hash: the same findings, phrases and templates give the same id."""
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _check_template(t: object, key: str, where: str) -> str:
    if not isinstance(t, str) or t.count("{}") != 1:
        raise PromptSetError(f"{where}: '{key}' must be a string with exactly one '{{}}', got {t!r}")
    return t


TOP_LEVEL_KEYS = ("name", "positive", "negative", "finding")
FINDING_KEYS = ("name", "phrases")


def _unknown_keys(table: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PromptSetError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def parse_prompt_set(data: dict, where: str = "prompt set") -> PromptSet:
    """A prompt set from a parsed TOML table; unknown keys (a typo such as ``phrase``) are an error."""
    if not isinstance(data, dict):
        raise PromptSetError(f"{where}: a prompt set must be a table")
    _unknown_keys(data, TOP_LEVEL_KEYS, where)
    positive = _check_template(data.get("positive", C.POSITIVE_TEMPLATE), "positive", where)
    negative = _check_template(data.get("negative", C.NEGATIVE_TEMPLATE), "negative", where)
    raw = data.get("finding")
    if not isinstance(raw, list) or not raw:
        raise PromptSetError(f"{where}: needs at least one [[finding]] table with a 'name'")
    findings: list[Finding] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise PromptSetError(f"{where}: finding #{i + 1} needs a non-empty string 'name'")
        name = item["name"].strip()
        _unknown_keys(item, FINDING_KEYS, f"{where}: finding {name!r}")
        phrases = item.get("phrases", [name])
        if isinstance(phrases, str):
            raise PromptSetError(f"{where}: finding {name!r}: 'phrases' must be a list of strings, "
                                 f"e.g. phrases = [{json.dumps(phrases)}], not a string")
        if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise PromptSetError(f"{where}: finding {name!r}: 'phrases' must be a non-empty list of strings")
        col = snake_case(name)
        if col in seen:
            raise PromptSetError(f"{where}: findings {seen[col]!r} and {name!r} share the column {col!r}")
        seen[col] = name
        findings.append(Finding(name=name, phrases=tuple(p.strip() for p in phrases)))
    name = data.get("name", "custom")
    return PromptSet(findings=tuple(findings), positive=positive, negative=negative, name=str(name))


def load_prompt_set(path: str | Path | None = None) -> PromptSet:
    """Read a prompt-set TOML file; ``None`` gives the default (CheXpert's 14, ("{}", "no {}"))."""
    if path is None:
        text = resources.files("curator").joinpath("prompts/chexpert.toml").read_text()
        where = "default prompt set"
    else:
        p = Path(path)
        if not p.is_file():
            raise PromptSetError(f"{p}: no such prompt-set file")
        text = p.read_text()
        where = str(p)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PromptSetError(f"{where}: not valid TOML ({exc})") from None
    ps = parse_prompt_set(data, where)
    if path is not None and "name" not in data:
        ps = PromptSet(ps.findings, ps.positive, ps.negative, name=Path(path).stem)
    return PromptSet(ps.findings, ps.positive, ps.negative, ps.name, source=where)


def default_prompt_set() -> PromptSet:
    return load_prompt_set(None)
