"""Cohorts: a spec (TOML) -> SQL over the workspace views -> an exported, de-identified table.

A spec::

    name = "edema-frontal"
    where = "edema >= 0.6 AND view_position IN ('PA', 'AP')"   # predicate over the images view
    one_per = "study"          # or "patient"; optional
    keep = "edema DESC"        # which row of a study / patient to keep (default "image_id": the first catalogued)
    limit = 5000               # optional
    order_by = "edema DESC"    # optional; rows are always ordered by image_id last
    deidentify = true          # the default
    copy_images = "none"       # "copy" or "symlink" (symlink: identified exports only)
    seed = 0
    findings = ["edema"]       # optional: whose estimated precision to report (default: calibrated findings named in `where`)
    patient_key = "patient_id"             # SQL expression naming a patient (e.g. from the path for PNG archives)
    study_key = "study_instance_uid"       # SQL expression naming a study

    [sample]                   # optional, seeded: n = N uniformly, or arms
    n_positive = 5000
    positive_where = "edema_label = 1"
    n_negative = 5000
    negative_where = "edema_label = 0"

    [split]                    # optional, patient-disjoint
    train = 0.8
    val = 0.1
    test = 0.1

    [text]                     # optional: images whose similarity to a text query is above a threshold
    query = "small apical pneumothorax"
    above = 0.25               # the similarity `curator search` prints (exact range search over the index)
    contrast = false           # true: the text against "no <text>" (or a template with {}), as `curator search --contrast`

The rule, step by step (:func:`cohort_sql` writes it as one SQL statement anyone can rerun; with
``[text]``, beside a ``text_hits`` relation, as the statement's comment says):

1. ``images`` (catalog + one probability column per finding), joined with the ``labels`` view
   (``<finding>_label`` = 1 / 0 / -1) when the workspace is calibrated, and with ``[text]``, with
   the images above the text query's similarity (a ``text_hits`` relation, image_id and
   ``text_similarity``, that :func:`text_hits` computes by a range search over the index and
   registers beside the SQL); rows where ``where`` holds (which may use ``text_similarity``).
2. ``one_per``: one row per study (``study_key``) or patient (``patient_key``): the first row by
   ``keep, image_id``. Rows without a study (patient) identifier each count as their own.
3. ``sample``: ``n`` rows, or ``n_positive`` rows where ``positive_where`` holds and
   ``n_negative`` of the others where ``negative_where`` holds (column ``cohort_arm``), taking
   the rows with the smallest ``md5(image_id || ':' || seed)``: a seeded, reproducible draw.
4. ``split``: every patient goes to train / val / test by the hash fraction
   ``u = int(md5(seed || ':' || patient)[:13], 16) / 2**52`` (train if ``u < train``, val if
   ``u < train + val``, else test), so no patient is in two splits and a patient keeps their
   split when the archive grows. Fractions are therefore met approximately (binomially).
5. ``order_by`` then ``image_id``; ``limit``.

Re-running a spec on a grown archive gives a superset of the earlier rows when the spec has no
``limit`` and no ``sample`` and ``keep`` is the default (new images get larger image_ids, so a
study's kept row does not change). A file that changed on disk gets a new image_id and replaces
its old row.

User SQL fragments run on the sandboxed connection (:func:`curator.query.connect`): they cannot
read or write files outside the workspace.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tomllib
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from curator.fileutil import file_sha256
from curator.workspace import open_workspace

log = logging.getLogger(__name__)

COPY_MODES = ("none", "copy", "symlink")
ONE_PER = {"study": "study", "patient": "patient"}
INTERNAL = ("_patient", "_study")


# ----------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------
@dataclass
class SampleSpec:
    """Seeded sampling: ``n`` rows uniformly, or positive / negative arms."""

    n: int | None = None
    n_positive: int | None = None
    n_negative: int | None = None
    positive_where: str | None = None
    negative_where: str | None = None
    seed: int | None = None  # default: the spec's seed

    @property
    def arms(self) -> bool:
        return self.positive_where is not None or self.negative_where is not None


@dataclass
class SplitSpec:
    """Patient-disjoint train / val / test fractions (summing to 1)."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int | None = None  # default: the spec's seed


@dataclass
class TextSpec:
    """Images whose similarity to a text query is above ``above`` (range search over the index)."""

    query: str = ""
    above: float = 0.0
    contrast: bool | str = False  # True: against "no {}"; a template with {}: against it


@dataclass
class CohortSpec:
    name: str
    where: str = "true"
    one_per: str | None = None
    keep: str = "image_id"
    limit: int | None = None
    order_by: str | None = None
    sample: SampleSpec | None = None
    split: SplitSpec | None = None
    deidentify: bool = True
    copy_images: str = "none"
    seed: int = 0
    findings: list[str] | None = None
    patient_key: str = "patient_id"
    study_key: str = "study_instance_uid"
    description: str | None = None
    text: TextSpec | None = None

    def __post_init__(self):
        validate_spec(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# the inside of an SQL string constant: '...' ('' for a quote), E'...' (backslash escapes too)
_PLAIN_BODY = r"(?:[^']|'')*"
_E_BODY = r"(?:[^'\\]|''|\\.)*"


def _open_string(rest: str) -> bool:
    """``rest``, a string constant token to the end of the text, does not close: '...', E'...'
    (backslash escapes), $tag$...$tag$."""
    m = re.match(r"[A-Za-z]*'", rest)
    if m:
        body = _E_BODY if m.group(0)[:-1].lower() == "e" else _PLAIN_BODY
        return not re.fullmatch(r"[A-Za-z]*'" + body + r"'\s*", rest, flags=re.DOTALL)
    m = re.match(r"\$(\w*)\$", rest)
    if m:
        return rest.find(m.group(0), m.end()) < 0
    return False


def unbalanced_parentheses(text: str) -> str | None:
    """Why an SQL fragment does not stand on its own, or None: its parentheses do not balance
    (outside its strings and comments), or it leaves a quoted string or a ``/*`` comment open, or
    it holds nothing but comments. A fragment that closes a parenthesis it did not open would reach
    out of the place the rule gives it (``1=1) OR (1=1`` in a where clause overrides the conditions
    beside it); one that leaves a string or a comment open would swallow the SQL after it."""
    import duckdb

    from curator.query import sql_tokens

    depth = 0
    try:
        tokens = sql_tokens(text)
    except Exception:  # noqa: BLE001 - left to the query's own error
        return None
    if tokens:
        pos, kind = tokens[-1]
        rest = text[pos:]
        if kind == duckdb.token_type.string_const and _open_string(rest):
            return "leaves a quoted string open (no closing quote)"
        if kind == duckdb.token_type.comment and rest.startswith("/*"):
            opened = 0
            for m in re.finditer(r"/\*|\*/", rest):
                opened += 1 if m.group(0) == "/*" else -1
                if opened == 0:
                    break
            if opened > 0:
                return "leaves a /* comment open (no closing */)"
        if all(k == duckdb.token_type.comment for _, k in tokens):
            return "holds nothing but a comment"
    for j, (pos, kind) in enumerate(tokens):
        if kind != duckdb.token_type.operator:
            continue
        end = tokens[j + 1][0] if j + 1 < len(tokens) else len(text)
        for ch in text[pos:end]:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth < 0:
                return "closes a parenthesis it did not open"
    return "leaves a parenthesis open" if depth > 0 else None


def validate_spec(spec: CohortSpec) -> None:
    """Raise ValueError (one line) for a spec that cannot run."""
    where = f"cohort spec {spec.name!r}" if isinstance(spec.name, str) else "cohort spec"
    if not isinstance(spec.name, str) or not spec.name.strip():
        raise ValueError("cohort spec: 'name' must be a non-empty string")
    for key in ("where", "keep", "patient_key", "study_key"):
        v = getattr(spec, key)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: '{key}' must be a non-empty SQL string")
    if spec.order_by is not None and (not isinstance(spec.order_by, str) or not spec.order_by.strip()):
        raise ValueError(f"{where}: 'order_by' must be a non-empty SQL string")
    texts = {k: getattr(spec, k) for k in ("where", "keep", "patient_key", "study_key", "order_by")}
    if isinstance(spec.sample, SampleSpec):
        texts.update(positive_where=spec.sample.positive_where, negative_where=spec.sample.negative_where)
    for key, text in texts.items():
        if isinstance(text, str) and (why := unbalanced_parentheses(text)):
            raise ValueError(f"{where}: '{key}' {why}: each piece of SQL must stand on its own inside the rule")
    if spec.one_per is not None and spec.one_per not in ONE_PER:
        raise ValueError(f"{where}: 'one_per' must be \"study\" or \"patient\", got {spec.one_per!r}")
    if spec.limit is not None and (not _is_int(spec.limit) or spec.limit < 0):
        raise ValueError(f"{where}: 'limit' must be a whole number >= 0")
    if not isinstance(spec.deidentify, bool):
        raise ValueError(f"{where}: 'deidentify' must be true or false")
    if spec.copy_images not in COPY_MODES:
        raise ValueError(f"{where}: 'copy_images' must be one of {', '.join(COPY_MODES)}")
    if spec.copy_images == "symlink" and spec.deidentify:
        raise ValueError(f"{where}: copy_images = \"symlink\" would expose the source paths of a de-identified export; "
                         "use \"copy\" (writes de-identified PNGs) or deidentify = false")
    if not _is_int(spec.seed):
        raise ValueError(f"{where}: 'seed' must be a whole number")
    if spec.findings is not None:
        if isinstance(spec.findings, str):
            spec.findings = [spec.findings]
        if not isinstance(spec.findings, list) or not all(isinstance(f, str) and f for f in spec.findings):
            raise ValueError(f"{where}: 'findings' must be a list of finding column names")
    s = spec.sample
    if s is not None:
        for k in ("n", "n_positive", "n_negative", "seed"):
            v = getattr(s, k)
            if v is not None and (not _is_int(v) or (k != "seed" and v < 0)):
                raise ValueError(f"{where}: [sample] '{k}' must be a whole number >= 0")
        for k in ("positive_where", "negative_where"):
            v = getattr(s, k)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{where}: [sample] '{k}' must be a non-empty SQL string")
        if s.arms and s.n is not None:
            raise ValueError(f"{where}: [sample] takes either 'n' or positive/negative arms, not both")
        if not s.arms and s.n is None:
            raise ValueError(f"{where}: [sample] needs 'n', or 'positive_where' / 'negative_where' with 'n_positive' / 'n_negative'")
        if s.n_positive is not None and s.positive_where is None:
            raise ValueError(f"{where}: [sample] 'n_positive' needs 'positive_where'")
        if s.n_negative is not None and s.negative_where is None:
            raise ValueError(f"{where}: [sample] 'n_negative' needs 'negative_where'")
    t = spec.text
    if t is not None:
        if not isinstance(t.query, str) or not t.query.strip():
            raise ValueError(f"{where}: [text] 'query' must be a non-empty string")
        if isinstance(t.above, bool) or not isinstance(t.above, (int, float)) or not -1 <= t.above <= 1:
            raise ValueError(f"{where}: [text] 'above' must be a similarity from -1 to 1")
        bad = f"{where}: [text] 'contrast' must be true, false or a template with one {{}} for the text (e.g. \"no {{}}\")"
        if not isinstance(t.contrast, bool):
            if not isinstance(t.contrast, str) or "{}" not in t.contrast:
                raise ValueError(bad)
            try:
                t.contrast.format("x")
            except (IndexError, KeyError, ValueError):
                raise ValueError(bad) from None
    p = spec.split
    if p is not None:
        vals = (p.train, p.val, p.test)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in vals):
            raise ValueError(f"{where}: [split] fractions must be numbers in [0, 1]")
        if abs(sum(vals) - 1) > 1e-6:
            raise ValueError(f"{where}: [split] train + val + test must be 1, got {sum(vals):g}")
        if p.seed is not None and not _is_int(p.seed):
            raise ValueError(f"{where}: [split] 'seed' must be a whole number")


def spec_from_dict(d: dict) -> CohortSpec:
    """A spec from a dict (parsed TOML or JSON); unknown keys are an error."""
    if not isinstance(d, dict):
        raise ValueError("cohort spec must be a table")
    d = dict(d)
    known = {f.name for f in fields(CohortSpec)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"cohort spec: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "name" not in d:
        raise ValueError("cohort spec: 'name' is required")
    for key, cls in (("sample", SampleSpec), ("split", SplitSpec), ("text", TextSpec)):
        v = d.get(key)
        if v is None or isinstance(v, cls):
            continue
        if not isinstance(v, dict):
            raise ValueError(f"cohort spec: [{key}] must be a table")
        sub_known = {f.name for f in fields(cls)}
        bad = sorted(set(v) - sub_known)
        if bad:
            raise ValueError(f"cohort spec: unknown key(s) in [{key}]: {', '.join(bad)} (known: {', '.join(sorted(sub_known))})")
        d[key] = cls(**v)
    return CohortSpec(**d)


def spec_to_dict(spec: CohortSpec) -> dict:
    """The spec as a plain dict (None values left out), suitable for TOML or JSON."""
    out = {}
    for k, v in asdict(spec).items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = {a: b for a, b in v.items() if b is not None}
        out[k] = v
    return out


def load_spec(path: str | Path) -> CohortSpec:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such cohort spec")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML ({exc})") from None
    if "name" not in data:
        data["name"] = p.stem
    try:
        return spec_from_dict(data)
    except TypeError as exc:  # pragma: no cover - dataclass argument errors
        raise ValueError(f"{p}: {exc}") from None


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(s: str) -> str:
    """A TOML basic string: UTF-8 text as it is (also beyond the BMP, which JSON would write as a
    surrogate pair TOML rejects), escapes for quotes, backslashes and control characters."""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def spec_to_toml(spec: CohortSpec) -> str:
    """TOML text of a spec (the inverse of :func:`load_spec`)."""

    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return _toml_string(str(v))

    d = spec_to_dict(spec)
    lines = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *[f"{a} = {val(b)}" for a, b in v.items()]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# SQL
# ----------------------------------------------------------------------------------------------
def _lit(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _frag(text: str) -> str:
    """A user SQL fragment on lines of its own (a trailing -- comment cannot swallow our SQL)."""
    return "\n        " + text.strip().replace("\n", "\n        ") + "\n    "


def _has_labels(ws) -> bool:
    if ws is None:
        return False
    from curator.calibrate import active_calibration

    return bool(active_calibration(ws))


def cohort_sql(spec: CohortSpec, ws=None, labels: bool | None = None) -> str:
    """The whole selection rule as one DuckDB statement over the workspace views.

    With ``ws`` (or ``labels=True``) the rows come from ``images`` joined with the ``labels``
    view, so that ``where`` may use ``<finding>_label``. The result has the columns of
    ``images`` (and ``labels``), ``_patient`` and ``_study`` (the group keys), ``cohort_arm`` with
    arm sampling and ``split`` with a split.
    """
    validate_spec(spec)
    if labels is None:
        labels = _has_labels(ws)
    src = ("SELECT i.*, l.* EXCLUDE (image_id) FROM images AS i LEFT JOIN labels AS l USING (image_id)"
           if labels else "SELECT * FROM images")
    if spec.text is not None:  # text_hits: registered beside the SQL by text_hits() (a range search over the index)
        src = f"SELECT s.*, h.text_similarity FROM ({src}) AS s JOIN text_hits AS h USING (image_id)"
    ctes = [f"src AS (\n    {src}\n)"]
    ctes.append(
        "selected AS (\n    SELECT *,\n"
        # an empty key (regexp_extract's answer when nothing matches) names no one, as NULL does
        f"        coalesce(nullif(CAST(({_frag(spec.patient_key)}) AS VARCHAR), ''), 'image:' || CAST(image_id AS VARCHAR)) AS _patient,\n"
        f"        coalesce(nullif(CAST(({_frag(spec.study_key)}) AS VARCHAR), ''), 'image:' || CAST(image_id AS VARCHAR)) AS _study\n"
        f"    FROM src\n    WHERE ({_frag(spec.where)})\n)"
    )
    last = "selected"
    if spec.one_per:
        group = "_study" if spec.one_per == "study" else "_patient"
        keep = "image_id" if spec.keep.strip() == "image_id" else f"{_frag(spec.keep)}, image_id"
        ctes.append(
            f"one_per AS (\n    SELECT * FROM {last}\n"
            f"    QUALIFY row_number() OVER (PARTITION BY {group} ORDER BY {keep}) = 1\n)"
        )
        last = "one_per"
    s = spec.sample
    if s is not None:
        seed = spec.seed if s.seed is None else s.seed
        draw = f"md5(CAST(image_id AS VARCHAR) || ':' || {_lit(str(seed))})"
        if s.arms:
            pos = f"({_frag(s.positive_where)})" if s.positive_where else "false"
            neg = f"({_frag(s.negative_where)})" if s.negative_where else "false"
            big = 2**62
            n_pos = s.n_positive if s.n_positive is not None else big
            n_neg = s.n_negative if s.n_negative is not None else big
            ctes.append(
                f"arms AS (\n    SELECT *, CASE WHEN coalesce({pos}, false) THEN 'positive' "
                f"WHEN coalesce({neg}, false) THEN 'negative' END AS cohort_arm\n    FROM {last}\n)"
            )
            ctes.append(
                "sampled AS (\n    SELECT * FROM arms WHERE cohort_arm IS NOT NULL\n"
                f"    QUALIFY row_number() OVER (PARTITION BY cohort_arm ORDER BY {draw}, image_id)\n"
                f"        <= CASE cohort_arm WHEN 'positive' THEN {n_pos} ELSE {n_neg} END\n)"
            )
        else:
            ctes.append(
                f"sampled AS (\n    SELECT * FROM {last}\n"
                f"    QUALIFY row_number() OVER (ORDER BY {draw}, image_id) <= {int(s.n)}\n)"
            )
        last = "sampled"
    if spec.split is not None:
        p = spec.split
        seed = spec.seed if p.seed is None else p.seed
        u = f"CAST('0x' || substr(md5({_lit(str(seed))} || ':' || _patient), 1, 13) AS BIGINT) / 4503599627370496.0"
        ctes.append(
            f"with_split AS (\n    SELECT *, CASE WHEN {u} < {float(p.train)!r} THEN 'train' "
            f"WHEN {u} < {float(p.train + p.val)!r} THEN 'val' ELSE 'test' END AS split\n    FROM {last}\n)"
        )
        last = "with_split"
    order = f"{_frag(spec.order_by)}, image_id" if spec.order_by else "image_id"
    sql = f"-- cohort {spec.name!r}: curator cohort rule over the workspace views (images, labels)\n"
    if spec.text is not None:
        sql += ("-- text_hits(image_id, text_similarity): every image above the text query's similarity, which curator computes "
                "by a range search over the index\n-- and registers beside this SQL; `curator search -w W --above S --json "
                "QUERY` (with --contrast for a contrast) lists the same images\n")
    sql += "WITH " + ",\n".join(ctes)
    sql += f"\nSELECT * FROM {last}\nORDER BY {order}"
    if spec.limit is not None:
        sql += f"\nLIMIT {int(spec.limit)}"
    return sql


def _check_single_statement(sql: str, name: str) -> None:
    import duckdb

    try:
        n = len(duckdb.extract_statements(sql))
    except duckdb.Error as exc:
        from curator.query import QueryError

        raise QueryError(f"cohort {name!r}: the spec's SQL does not parse: {str(exc).strip().splitlines()[0]}") from None
    if n != 1:
        from curator.query import QueryError

        raise QueryError(f"cohort {name!r}: the spec's SQL fragments must not contain ';' (one statement only)")


_TEXT_HITS: dict = {}  # (workspace, index file and version, query, threshold, contrast) -> frame: a few, for repeated calls


def text_hits(ws, spec: CohortSpec):
    """The ``text_hits`` relation of a spec with ``[text]``: a DataFrame of ``image_id`` and
    ``text_similarity`` for every indexed image above the threshold (exact range search,
    :func:`curator.search.above`'s), computed with the index's checkpoint on the CPU; None
    without ``[text]``. Warns (when it computes them) that the index does not hold the current
    images."""
    import numpy as np
    import pandas as pd

    from curator import index as faiss_index
    from curator.search import load_index_checkpoint, text_query_vector

    t = spec.text
    if t is None:
        return None
    ws = open_workspace(ws)
    info = faiss_index.read_index_info(ws)
    if info is None:
        from curator.workspace import WorkspaceError

        raise WorkspaceError(f"cohort {spec.name!r}: [text] needs the index; run `curator index --workspace {ws.root}` first")
    contrast = _contrast(t)
    try:
        st = os.stat(ws.root / info.file)
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = None  # (load_index below says what is wrong)
    key = (str(ws.root), info.file, version, info.source_key, t.query.strip(), float(t.above), contrast)
    hits = _TEXT_HITS.get(key)
    if hits is None:  # (the export and the app page say again, where users look, what an out-of-date index lacks)
        stale = text_index_staleness(ws)
        if stale:
            log.warning("cohort %r: %s", spec.name, stale)
        index, info = faiss_index.load_index(ws)
        vector = text_query_vector(load_index_checkpoint(ws, "cpu"), t.query, contrast)
        ids, sims = faiss_index.range_search(index, vector, float(t.above))
        hits = pd.DataFrame({"image_id": np.asarray(ids, np.int64), "text_similarity": np.asarray(sims, np.float64)})
        if len(_TEXT_HITS) >= 4:
            _TEXT_HITS.clear()
        _TEXT_HITS[key] = hits
    return hits


def _contrast(t: TextSpec) -> str | None:
    from curator import constants as C

    return C.NEGATIVE_TEMPLATE if t.contrast is True else (t.contrast or None)


def text_index_staleness(ws) -> str | None:
    """What the index lacks (``curator.index.index_staleness``'s sentence), or None: a cohort
    with ``[text]`` misses the images an out-of-date index does not hold."""
    from curator import index as faiss_index

    ws = open_workspace(ws)
    info = faiss_index.read_index_info(ws)
    return None if info is None else faiss_index.index_staleness(ws, info)  # (cheap when current)


def relations(ws, spec: CohortSpec) -> dict:
    """What :func:`cohort_sql`'s statement reads besides the workspace views, to register on the
    connection that runs it: ``{"text_hits": frame}`` for a spec with ``[text]``, else ``{}``."""
    hits = text_hits(ws, spec)
    return {} if hits is None else {"text_hits": hits}


@contextlib.contextmanager
def _connection(ws, sql: str, name: str, tables: dict | None = None):
    """A sandboxed connection to the workspace with ``tables`` registered, for running ``sql``
    (one statement); DuckDB's errors, raised in the block, become a :class:`QueryError` with a hint."""
    import duckdb

    from curator.query import QueryError, connect

    _check_single_statement(sql, name)
    con = connect(ws, sandbox=True)
    try:
        for rel, frame in (tables or {}).items():
            con.register(rel, frame)
        yield con
    except duckdb.Error as exc:
        msg = str(exc).strip()
        if "text_similarity" in msg and "text_hits" not in sql:
            msg += " (text_similarity exists in a spec with a [text] table: query, above)"
        elif "_label" in msg:
            from curator.calibrate import active_calibration

            have = sorted(active_calibration(ws))
            msg += (f" (weak-label columns exist for the calibrated findings: {', '.join(c + '_label' for c in have)})" if have
                    else " (<finding>_label columns exist once `curator calibrate` has stored thresholds)")
        raise QueryError(f"cohort {name!r}: {msg}") from None
    finally:
        con.close()


def _run(ws, sql: str, name: str, params: list | None = None, tables: dict | None = None):
    with _connection(ws, sql, name, tables) as con:
        return con.execute(sql, params or []).df()


def _select(ws, spec: CohortSpec):
    ws = open_workspace(ws)
    return _run(ws, cohort_sql(spec, ws), spec.name, tables=relations(ws, spec))


def select_cohort(ws, spec: CohortSpec):
    """The cohort's rows (raw, identified: for the app and the library) as a pandas DataFrame."""
    df = _select(ws, spec)
    return df.drop(columns=[c for c in INTERNAL if c in df.columns])


def count_cohort(ws, spec: CohortSpec) -> int:
    """Number of rows the spec selects (runs ``count(*)`` over :func:`cohort_sql`)."""
    ws = open_workspace(ws)
    df = _run(ws, f"SELECT count(*) AS n FROM (\n{cohort_sql(spec, ws)}\n)", spec.name, tables=relations(ws, spec))
    return int(df["n"].iloc[0])


# ----------------------------------------------------------------------------------------------
# estimated precision from the labelled set
# ----------------------------------------------------------------------------------------------
def _mentioned(text: str | None, col: str) -> bool:
    return bool(text) and re.search(rf"(?<![A-Za-z0-9_]){re.escape(col)}(_label)?(?![A-Za-z0-9_])", text) is not None


def cohort_estimates(ws, spec: CohortSpec, level: float = 0.95) -> dict:
    """Estimated precision (and recall) of the spec's rule per finding, from the calibration's labelled set.

    For a finding with a stored labelled set (``curator calibrate``): among the labelled images
    that satisfy ``where`` (and ``positive_where`` for arm sampling), the fraction truly positive
    (precision, Wilson 95% interval), and among the labelled positives, the fraction the rule
    selects (recall). With a negative arm, also the fraction truly negative among labelled
    images of that arm (negative predictive value). The estimate is of the selection rule;
    ``one_per``, sampling counts and ``limit`` are not modelled. Findings: ``spec.findings``, or
    the calibrated findings named in ``where`` / the arm predicates.
    """
    from curator.calibrate import active_calibration
    from curator.metrics import wilson_interval

    ws = open_workspace(ws)
    if spec.findings:  # (a misspelt name would otherwise just be missing from the estimates)
        known = ws.manifest.get("finding_columns", {})
        unknown = [f for f in spec.findings if f not in known]
        if unknown:
            raise ValueError(f"cohort spec {spec.name!r}: 'findings' names no finding of this workspace: {', '.join(unknown)} "
                             f"(findings: {', '.join(sorted(known))})")
    cal = active_calibration(ws)
    if not cal:
        return {}
    if spec.findings:
        cols = [c for c in spec.findings if c in cal]
    else:
        texts = [spec.where] + ([spec.sample.positive_where, spec.sample.negative_where] if spec.sample else [])
        cols = [c for c in sorted(cal) if any(_mentioned(t, c) for t in texts)]
    out = {}
    labels = True
    tables = relations(ws, spec)
    for col in cols:
        entry = cal[col]
        truth_file = entry.get("truth_file")
        if not truth_file or not (ws.root / truth_file).is_file():
            continue
        base = cohort_sql(CohortSpec(name=spec.name, where=spec.where, patient_key=spec.patient_key, study_key=spec.study_key,
                                     text=spec.text), labels=labels)
        arms = []
        if spec.sample is not None and spec.sample.arms:
            if spec.sample.positive_where:
                arms.append(("positive", f"({_frag(spec.sample.positive_where)})", 1))
            if spec.sample.negative_where:
                neg = f"({_frag(spec.sample.negative_where)})"
                if spec.sample.positive_where:
                    neg = f"{neg} AND NOT coalesce(({_frag(spec.sample.positive_where)}), false)"
                arms.append(("negative", neg, 0))
        else:
            arms.append(("all", "true", 1))
        res = {"truth": entry.get("truth"), "n_labelled": None}
        q_truth = f"SELECT image_id, \"{col}\" AS y FROM read_parquet({_lit(str(ws.root / truth_file))}) WHERE \"{col}\" IS NOT NULL"
        for arm, pred, want in arms:
            sql = (
                f"WITH rule AS (\n{base}\n), chosen AS (SELECT image_id FROM rule WHERE {pred}), t AS ({q_truth})\n"
                "SELECT count(*) AS n_labelled, count(*) FILTER (WHERE y = 1) AS n_pos,\n"
                "       count(c.image_id) AS n_selected, count(c.image_id) FILTER (WHERE y = 1) AS selected_pos\n"
                "FROM t LEFT JOIN chosen AS c USING (image_id)"
            )
            r = _run(ws, sql, spec.name, tables=tables).iloc[0]
            n_lab, n_pos, n_sel, sel_pos = (int(r[k]) for k in ("n_labelled", "n_pos", "n_selected", "selected_pos"))
            res["n_labelled"] = n_lab
            if want == 1:
                k, n = sel_pos, n_sel
                lo, hi = wilson_interval(k, n, level)
                rk, rn = sel_pos, n_pos
                rlo, rhi = wilson_interval(rk, rn, level)
                key = "precision" if arm == "all" else "positive_arm"
                res[key] = {
                    "precision": k / n if n else None, "precision_ci_low": lo if n else None, "precision_ci_high": hi if n else None,
                    "recall": rk / rn if rn else None, "recall_ci_low": rlo if rn else None, "recall_ci_high": rhi if rn else None,
                    "n_labelled_selected": n, "n_labelled_positive": rn,
                }
            else:
                k, n = n_sel - sel_pos, n_sel
                lo, hi = wilson_interval(k, n, level)
                res["negative_arm"] = {"npv": k / n if n else None, "npv_ci_low": lo if n else None, "npv_ci_high": hi if n else None,
                                       "n_labelled_selected": n}
        if "precision" in res:
            res.update(res.pop("precision"))
        res["method"] = "labelled images satisfying the rule; Wilson 95% intervals"
        out[col] = res
    return out


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z0-9^._\-]{3,}")  # a bare word or number, a DICOM name (DOE^JOHN), a UID
_PIECE = re.compile(r"[A-Za-z0-9^.]{3,}")  # ... and its pieces between _ and - (MRN778899_followup)
_IDENTIFIERS = ("patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid")
# Catalog columns that identify a patient, a study or a place (a de-identified export leaves them
# out): in a de-identified manifest, the literals of the spec's SQL that are compared with them,
# or passed with them to a function, are blanked (curator/deid.py keeps the other columns).
IDENTIFYING_COLUMNS = frozenset({"path", "patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "study_date",
                                 "study_time", "institution_name"})
# a full date in free text (dates other than years identify: HIPAA's Safe Harbor)
_DATE = re.compile(r"(?<!\d)(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|(?:19|20)\d{2}[01]\d[0-3]\d)(?!\d)")
# how each SQL field of a spec is parsed: the text goes where {} is
_SQL_FIELDS = {"where": "SELECT * FROM t WHERE {}", "keep": "SELECT * FROM t ORDER BY {}", "order_by": "SELECT * FROM t ORDER BY {}",
               "patient_key": "SELECT {} FROM t", "study_key": "SELECT {} FROM t"}


# One SQL string constant as DuckDB reads it: 'it''s', E'it\'s' (backslash escapes), a typed string
# (DATE '2019-01-02'), each followed by the pieces that continue it ('DOE^JO' <line break> 'HN1' is
# the one string 'DOE^JOHN1'), or a dollar-quoted $tag$...$tag$.
_STRING_PIECE = f"(?:[Ee]'{_E_BODY}'|'{_PLAIN_BODY}')"
_STRING_CONSTANT = re.compile(rf"(?:[Ee]'{_E_BODY}'|(?:[A-Za-z_]+\s*)?'{_PLAIN_BODY}')(?:[ \t\f\r]*\n\s*{_STRING_PIECE})*"
                              r"|\$(\w*)\$.*?\$\1\$", re.DOTALL)


def _string_bodies(text: str) -> list[str]:
    """The contents of the string constants in ``text`` (quotes undone): '...', E'...', $tag$...$tag$."""
    out = [m.replace("''", "'") for m in re.findall(rf"(?<![A-Za-z0-9_])'({_PLAIN_BODY})'", text)]
    out += [re.sub(r"\\(.)", r"\1", m).replace("''", "'") for m in re.findall(rf"(?<![A-Za-z0-9_])[Ee]'({_E_BODY})'", text)]
    out += [body for _, body in re.findall(r"\$(\w*)\$(.*?)\$\1\$", text, flags=re.DOTALL)]
    return out


def _literal_end(text: str, start: int) -> int | None:
    """End of the literal starting at ``start``: a string constant (:data:`_STRING_CONSTANT`), a
    number; None for other constants (TRUE, NULL)."""
    m = _STRING_CONSTANT.match(text, start)
    if m:
        return m.end()
    m = re.compile(r"[0-9.][0-9_.]*(?:[eE][+-]?[0-9]+)?").match(text, start)
    return m.end() if m else None


def _reads_identifier(node) -> bool:
    """Some column reference in the parsed expression ``node`` is an identifying column."""
    if isinstance(node, dict):
        if node.get("class") == "COLUMN_REF" and str((node.get("column_names") or [""])[-1]).lower() in IDENTIFYING_COLUMNS:
            return True
        return any(_reads_identifier(v) for v in node.values())
    if isinstance(node, list):
        return any(_reads_identifier(v) for v in node)
    return False


def identifying_literal_spans(text: str, wrap: str = _SQL_FIELDS["where"]) -> list[tuple[int, int]]:
    """Spans of the literals in the SQL expression ``text`` that stand with an identifying column
    (:data:`IDENTIFYING_COLUMNS`) in one expression: ``lower(patient_id) = 'mrn1'``,
    ``contains(path, 778899::VARCHAR)``, ``year(study_date) = 2019``; not those of other
    conditions joined to them by AND / OR (``edema > 0.5``). Parsed by DuckDB
    (``json_serialize_sql``, which gives each constant's position); if it cannot parse the text,
    every literal of a text that names such a column."""
    import json as _json

    import duckdb

    from curator.query import char_offsets, sql_tokens

    prefix = wrap.split("{}")[0]
    con = duckdb.connect(":memory:")  # (its own: the module's default connection is shared by threads)
    try:
        tree = _json.loads(con.execute("SELECT json_serialize_sql(?)", [wrap.format(text)]).fetchone()[0])
    except duckdb.Error:
        tree = {"error": True}
    finally:
        con.close()
    spans: list[tuple[int, int]] = []
    if tree.get("error"):
        bare = re.sub(r"'(?:[^']|'')*'", " ", text)
        if re.search(r"(?i)\b(" + "|".join(sorted(IDENTIFYING_COLUMNS)) + r")\b", bare):
            for pos, kind in sql_tokens(text):
                if kind in (duckdb.token_type.string_const, duckdb.token_type.numeric_const) and (end := _literal_end(text, pos)):
                    spans.append((pos, end))
        return spans

    def visit(node, chain: list) -> None:
        if isinstance(node, dict):
            cls = node.get("class")
            if cls == "CONJUNCTION":  # AND / OR: its operands are judged on their own
                chain = []
            elif cls is not None:
                chain = chain + [node]
            if cls == "CONSTANT" and node.get("query_location") is not None and any(_reads_identifier(a) for a in chain):
                start = char_offsets(text, [int(node["query_location"]) - len(prefix)])[0]  # (prefix: ASCII)
                end = _literal_end(text, start) if 0 <= start < len(text) else None
                if end:
                    spans.append((start, end))
            for v in node.values():
                visit(v, chain)
        elif isinstance(node, list):
            for v in node:
                visit(v, chain)

    visit(tree, [])
    return sorted(set(spans))


def strip_sql_comments(text: str) -> str:
    """``text`` without its SQL comments (``-- ...``, ``/* ... */``, nested too), each replaced by
    a space (a line break if it held one), as DuckDB's tokenizer finds them (not inside string literals); unchanged if it has none.
    A comment does nothing to a query, and may say anything ("requested for DOE^JOHN")."""
    import duckdb

    from curator.query import sql_tokens

    toks = sql_tokens(text)
    if not any(kind == duckdb.token_type.comment for _, kind in toks):
        return text
    out, last = [], 0
    for j, (pos, kind) in enumerate(toks):
        if kind == duckdb.token_type.comment:  # (it runs to the next token, or to the end)
            end = toks[j + 1][0] if j + 1 < len(toks) else len(text)
            # a line break stays one: 'P' -- note \n 'A' is the string 'PA' (literals joined across lines)
            out += [text[last:pos], "\n" if "\n" in text[pos:end] else " "]
            last = end
    out.append(text[last:])
    return "".join(out).strip()


def _blank_identifying_literals(spec: CohortSpec) -> tuple[CohortSpec, set[str]]:
    """A copy of ``spec`` whose SQL has no comments and ``'[redacted]'`` / ``[redacted]`` for
    every literal that stands with an identifying column, and those literals' values (4+
    characters, to redact in the rest of the manifest too)."""
    from dataclasses import replace as dc_replace

    values: set[str] = set()

    def blank(text: str | None, wrap: str) -> str | None:
        if not text:
            return text
        text = strip_sql_comments(text)
        out = text
        for start, end in reversed(identifying_literal_spans(text, wrap)):
            lit = text[start:end]
            quoted = re.search(r"'((?:[^']|'')*)'$", lit)
            value = quoted.group(1).replace("''", "'") if quoted else lit
            if len(value.strip("%_^$.* ")) >= 4:
                values.add(value)
            out = out[:start] + ("'[redacted]'" if quoted else "[redacted]") + out[end:]
        return out

    changes = {f: blank(getattr(spec, f), wrap) for f, wrap in _SQL_FIELDS.items()}
    shown = dc_replace(spec, **changes)
    if spec.sample:
        shown = dc_replace(shown, sample=dc_replace(spec.sample, positive_where=blank(spec.sample.positive_where, _SQL_FIELDS["where"]),
                                                    negative_where=blank(spec.sample.negative_where, _SQL_FIELDS["where"])))
    return shown, values


def _redactions(ws, spec: CohortSpec) -> set[str]:
    """The pieces of the spec's text that would identify patients in a de-identified manifest.

    Candidates: every quoted literal of the spec's SQL and text, every bare word or number of its
    SQL (``patient_id = 17708425`` needs no quotes), and every word of its name and description.
    A candidate is a secret when it is (or, quoted, contains or is a 4+ character part of) a patient
    ID or UID in the catalog, a quoted date on which some study was made, or when it is part of
    some source paths but not of all of them
    (a folder named after a patient: ``path LIKE '%DOE^JOHN%'``, "cases of DOE^JOHN"); a folder
    every path shares (``/data/archive``) identifies no one. SQL keywords and column names are
    candidates too, but match neither. Comparisons ignore case; the free texts' words are also
    taken apart at ``_`` and ``-`` (``MRN778899_followup``). Besides: any full date written in the
    free texts, and any institution name of the catalog written in the spec. (The literals that
    stand with an identifying column in the SQL are blanked by :func:`_blank_identifying_literals`.)
    """
    from curator.query import connect

    sql_texts = [spec.where, spec.keep, spec.order_by, spec.patient_key, spec.study_key]
    if spec.sample:
        sql_texts += [spec.sample.positive_where, spec.sample.negative_where]
    free_texts = [spec.name, spec.description, spec.text.query if spec.text else None]
    quoted, bare = set(), set()
    for t in filter(None, sql_texts + free_texts):
        quoted.update(re.findall(r"'((?:[^']|'')*)'", t))  # (as written: a piece of an E'' string too)
        quoted.update(_string_bodies(t))
        quoted.update(re.findall(r'"([^"]*)"', t))
    for t in filter(None, sql_texts):
        bare.update(w.strip("._-") for w in _WORD.findall(re.sub(r"'(?:[^']|'')*'|\"[^\"]*\"", " ", t)))
    words = {w.strip("._-") for t in filter(None, free_texts) for w in _WORD.findall(t)}
    words |= {w.strip(".") for t in filter(None, free_texts) for w in _PIECE.findall(t)}
    quoted = {x for x in quoted if len(x.strip("%_ ")) >= 3}
    bare, words = {w for w in bare if len(w) >= 3}, {w for w in words if len(w) >= 3}
    dates = {m.group(0) for t in filter(None, free_texts) for m in _DATE.finditer(t)}
    all_texts = [t for t in sql_texts + free_texts if t]
    bare = {w for w in bare if any(ch.isdigit() for ch in w)}  # identifiers hold digits; keywords, columns do not
    cores = {c: c.strip("%_ ") for c in quoted} | {c: c for c in bare | words}
    con = connect(ws, sandbox=False)
    try:
        ident = ", ".join(_IDENTIFIERS)
        # exact identifiers, whatever their case: one pass over the catalog
        exact = {r[0] for r in con.execute(
            f"SELECT DISTINCT lower(v) FROM (SELECT unnest([{ident}]) AS v FROM catalog) WHERE lower(v) IN (SELECT unnest($c))",
            {"c": sorted({v.lower() for v in cores.values()})}).fetchall()}
        found = {c for c, core in cores.items() if core.lower() in exact} | dates
        # quoted literals (few): containing an identifier, or a 4+ character part of one
        for c in quoted - found:
            core = cores[c].lower()
            parts = " OR ".join(f"({k} IS NOT NULL AND ((length({k}) >= 3 AND contains($core, lower({k}))) OR "
                                f"(length($core) >= 4 AND contains(lower({k}), $core))))" for k in _IDENTIFIERS)
            if con.execute(f"SELECT EXISTS (SELECT 1 FROM catalog WHERE {parts})", {"core": core}).fetchone()[0]:
                found.add(c)
        # a quoted full date that is some study's date (dates other than years are identifiers)
        for c in quoted - found:
            core = cores[c]
            if re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", core) and con.execute(
                    "SELECT EXISTS (SELECT 1 FROM catalog WHERE study_date = TRY_CAST(TRY_STRPTIME($d, ['%Y-%m-%d', '%Y%m%d']) AS DATE))",
                    {"d": core}).fetchone()[0]:
                found.add(c)
        # a patient's folder: part of some source paths but not all (one pass, all candidates)
        folder = sorted({cores[c].lower() for c in (quoted | words) - found if len(cores[c]) >= 3})
        if folder:
            hits = {r[0] for r in con.execute(
                "SELECT cand FROM catalog CROSS JOIN (SELECT unnest($c) AS cand) GROUP BY cand "
                "HAVING bool_or(contains(lower(path), cand)) AND NOT bool_and(contains(lower(path), cand))", {"c": folder}).fetchall()}
            found |= {c for c in (quoted | words) if cores[c].lower() in hits}
        # an institution's name written anywhere in the spec
        for (name,) in con.execute("SELECT DISTINCT institution_name FROM catalog WHERE length(trim(institution_name)) >= 4").fetchall():
            for t in all_texts:
                found |= {m.group(0) for m in re.finditer(re.escape(name.strip()), t, flags=re.IGNORECASE)}
        return found
    finally:
        con.close()


def _redact(obj, secrets: set[str]):
    """``obj`` with every secret replaced by ``[redacted]``, whatever its case, where it stands as
    a whole word (so a secret "100" does not change "0.1005"; ``_`` and ``-`` end a word:
    "MRN778899_followup")."""
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in sorted(secrets, key=len, reverse=True):
            obj = re.sub(rf"(?<![A-Za-z0-9^.]){re.escape(s)}(?![A-Za-z0-9^])", "[redacted]", obj, flags=re.IGNORECASE)
        return obj
    if isinstance(obj, dict):
        return {k: _redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, secrets) for v in obj]
    return obj


def _copy_one(row: dict, images_dir: Path, mode: str, deidentify: bool) -> tuple[int, str | None, str | None]:
    """Copy / convert / link one image; returns (image_id, relative file, error)."""
    import numpy as np
    from PIL import Image

    from curator.readers import RASTER_CONVERSION, ReadError, ReadOptions, read_image

    image_id = int(row["image_id"])
    src = row.get("path")
    try:
        if mode == "symlink":
            name = f"{image_id}{Path(src).suffix.lower()}"
            os.symlink(os.path.abspath(src), images_dir / name)
            return image_id, f"images/{name}", None
        with open(src, "rb") as f:
            data = f.read()
        want = row.get("content_hash")
        if want and hashlib.blake2b(data, digest_size=16).hexdigest() != want:
            return image_id, None, "file changed since it was embedded"
        if not deidentify:
            name = f"{image_id}{Path(src).suffix.lower()}"
            tmp = images_dir / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, images_dir / name)
            return image_id, f"images/{name}", None
        conv = row.get("conversion")
        opts = ReadOptions(dicom_conversion=conv if conv in ("mimic", "voi") else "mimic", modalities=None)
        res = read_image(src, opts, data=data)
        arr = np.asarray(res.image)
        if res.conversion == RASTER_CONVERSION and arr.ndim == 3:
            # read_image hands colour rasters over in CheXzero's BGR order; store them as they
            # were so that reading the PNG back gives the same model input
            arr = arr[..., ::-1]
        name = f"{image_id}.png"
        tmp = images_dir / f".{name}.tmp"
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")  # pixels only, no metadata
        os.replace(tmp, images_dir / name)
        return image_id, f"images/{name}", None
    except ReadError as exc:
        return image_id, None, f"{exc.kind}: {exc}"
    except OSError as exc:
        return image_id, None, f"{type(exc).__name__}: {exc.strerror or exc}"


def _copy_images(df, images_dir: Path, mode: str, deidentify: bool, workers: int | None) -> tuple[dict[int, str], dict[int, str]]:
    from concurrent.futures import ThreadPoolExecutor

    images_dir.mkdir(parents=True, exist_ok=True)
    rows = df[[c for c in ("image_id", "path", "content_hash", "conversion") if c in df.columns]].to_dict("records")
    workers = workers or min(8, os.cpu_count() or 1)
    files, errors = {}, {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for image_id, rel, err in ex.map(lambda r: _copy_one(r, images_dir, mode, deidentify), rows):
            if rel:
                files[image_id] = rel
            else:
                errors[image_id] = err
    return files, errors


def _provenance(ws, columns: list[str], identified: bool) -> dict:
    m = ws.manifest
    ens = m.get("ensemble") or []
    cks = []
    for sha in ens:
        info = m.get("checkpoints", {}).get(sha, {})
        entry = {"sha256": sha, "file": Path(info.get("path", "")).name or None, "embed_dim": info.get("embed_dim")}
        if identified:
            entry["path"] = info.get("path")
        cks.append(entry)
    fc = {c: ps for c, ps in m.get("finding_columns", {}).items() if c in columns}
    sets = {}
    for ps_id in sorted(set(fc.values())):
        ps = m.get("prompt_sets", {}).get(ps_id, {})
        sets[ps_id] = {k: ps.get(k) for k in ("name", "positive", "negative", "findings", "columns", "labelled_at")}
    return {"checkpoints": cks, "ensemble": list(ens), "prompt_sets": sets, "finding_columns": fc}


def _text_provenance(ws, spec: CohortSpec) -> dict:
    """How ``text_hits`` was computed: the query and the index it searched."""
    from curator import index as faiss_index

    info = faiss_index.read_index_info(ws)
    return {"query": spec.text.query, "above": spec.text.above, "contrast": _contrast(spec.text),
            "relation": "text_hits(image_id, text_similarity): every indexed image above the threshold (exact range search)",
            "index": None if info is None else {"type": info.index_type, "description": info.description, "checkpoint": info.checkpoint,
                                                "count": info.count, "built_at": info.built_at}}


EXPORT_ENTRIES = frozenset({"cohort.csv", "cohort.parquet", "manifest.json", "images"})


def _not_an_export(folder: Path) -> str | None:
    """Why ``folder`` is not an earlier cohort export that may be replaced (None when it is one).

    An export holds exactly what :func:`export_cohort` writes, with its manifest; any other file
    (a thesis, an archive, a workspace) means the folder is someone else's and is not deleted.
    """
    try:
        fmt = json.loads((folder / "manifest.json").read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        return "has no cohort manifest.json"
    if not str(fmt).startswith("curator-cohort/"):
        return "has a manifest.json that is not a cohort export's"
    others = sorted(e.name for e in folder.iterdir() if e.name not in EXPORT_ENTRIES)
    if others:
        return f"also holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
    return None


# rows of a cohort export handled at a time (copied, de-identified, written)
EXPORT_BATCH_ROWS = 65536


@dataclass
class _ExportTally:
    """Counts of a cohort export's rows, added up batch by batch."""

    rows: int = 0
    alone: int = 0  # rows without a patient key (each its own patient)
    alone_study: int = 0  # rows without a study key (each its own study)
    ages_capped: int = 0  # de-identified rows whose age was capped
    split: Counter = field(default_factory=Counter)
    arms: Counter = field(default_factory=Counter)
    labels: dict = field(default_factory=dict)  # label column -> Counter of "1" / "0" / "-1" / "missing"

    def add(self, df, label_cols: list[str]) -> None:
        self.rows += len(df)
        if "_patient" in df.columns:
            self.alone += int(df["_patient"].astype(str).str.startswith("image:").sum())
        if "_study" in df.columns:
            self.alone_study += int(df["_study"].astype(str).str.startswith("image:").sum())
        if "split" in df.columns:
            self.split.update({str(k): int(v) for k, v in df["split"].value_counts().items()})
        if "cohort_arm" in df.columns:
            self.arms.update({str(k): int(v) for k, v in df["cohort_arm"].value_counts().items()})
        for lc in label_cols:
            tally = self.labels.setdefault(lc, Counter())
            for k, v in df[lc].value_counts(dropna=False).items():
                tally[str(int(k)) if k == k else "missing"] += int(v)


def _export_schema(frame, source, deidentified: bool):
    """The Arrow schema of an export's table: a column taken from the query keeps its type there
    (every batch gets the same schema, whatever pandas makes of a batch's nulls); the columns the
    de-identification makes (:data:`curator.deid.DERIVED_TYPES`) have theirs; keys and image
    files are strings."""
    import pyarrow as pa

    from curator.deid import DERIVED_TYPES

    out = []
    for c in frame.columns:
        if deidentified and c in DERIVED_TYPES:
            t = DERIVED_TYPES[c]
        elif c in source.names:
            t = source.field(c).type
        else:
            t = pa.string()
        out.append(pa.field(c, t))
    return pa.schema(out)


def _distinct_counts(con, sql: str, names: list[str]) -> dict:
    """Distinct patients and studies of the cohort (and patients per split), counted by DuckDB."""
    got: dict = {}
    cols = [(k, c) for k, c in (("patients", "_patient"), ("studies", "_study")) if c in names]
    if cols:
        row = con.execute(f"WITH c AS (\n{sql}\n) SELECT {', '.join(f'count(DISTINCT {c})' for _, c in cols)} FROM c").fetchone()
        got = {k: int(v) for (k, _), v in zip(cols, row)}
    if "split" in names and "_patient" in names:
        got["split"] = dict(con.execute(f"WITH c AS (\n{sql}\n) SELECT split, count(DISTINCT _patient) FROM c GROUP BY split").fetchall())
    return got


def export_cohort(ws, spec: CohortSpec, out_dir: str | Path, overwrite: bool = False, workers: int | None = None) -> dict:
    """Write ``cohort.csv``, ``cohort.parquet``, ``manifest.json`` (and ``images/``) into ``out_dir``.

    The folder is written under a temporary name next to ``out_dir`` and renamed into place, so a
    reader sees a whole export or none. An existing non-empty ``out_dir`` is refused unless
    ``overwrite``, and even then unless it is an earlier export (its manifest and files, nothing
    else). Returns the manifest (a dict).

    De-identified (the default; see :mod:`curator.deid`): identifiers replaced by salted keys, no
    source paths, no dates but the study year; copied images are PNGs of the 8-bit image the model
    saw, without any header. Identified (``deidentify = false``): every column of the rows as
    selected, and copies are the original files (or symlinks to them).
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    from curator import __version__
    from curator.calibrate import active_calibration
    from curator.deid import ages_note, deidentify_frame, workspace_salt

    ws = open_workspace(ws)
    validate_spec(spec)
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir == ws.root or ws.root in out_dir.parents:
        raise ValueError(f"{out_dir}: export outside the workspace folder")
    if out_dir == Path(out_dir.anchor) or out_dir in ws.root.parents:
        raise ValueError(f"{out_dir}: holds the workspace; choose a new folder for the export")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; choose a new folder for the export (nothing was changed)")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} exists and is not empty; choose a new folder or overwrite")
        why = _not_an_export(out_dir)
        if why:
            raise ValueError(f"{out_dir}: --overwrite replaces only an earlier cohort export, and this folder {why}; "
                             "choose a new folder (nothing was changed)")
    created = dt.datetime.now(dt.UTC)
    sql = cohort_sql(spec, ws)
    tables = relations(ws, spec)
    n_candidates = int(_run(ws, f"WITH rule AS (\n{cohort_sql(CohortSpec(name=spec.name, where=spec.where, text=spec.text), ws)}\n) "
                            "SELECT count(*) AS n FROM rule", spec.name, tables=tables)["n"].iloc[0])
    cal = active_calibration(ws)
    salt = workspace_salt(ws.root) if spec.deidentify else None
    secrets = _redactions(ws, spec) if spec.deidentify else set()
    shown, blanked = _blank_identifying_literals(spec) if spec.deidentify else (spec, set())
    secrets |= blanked

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # The rows stream from DuckDB in batches, each copied, de-identified and appended to
        # cohort.parquet and cohort.csv, so memory does not grow with the cohort; the counts that
        # need the whole cohort (distinct patients and studies) are DuckDB aggregates.
        acc = _ExportTally()
        image_info: dict = {"mode": spec.copy_images}
        copy_errors: dict[int, str] = {}
        with _connection(ws, sql, spec.name, tables) as con:
            reader = con.sql(sql).to_arrow_reader(EXPORT_BATCH_ROWS)
            source = reader.schema
            finding_cols = [c for c in sorted(ws.manifest.get("finding_columns", {})) if c in source.names]
            label_cols = [f"{c}_label" for c in sorted(cal) if f"{c}_label" in source.names]
            cohort_cols = [c for c in ("text_similarity", "cohort_arm", "split") if c in source.names]
            keep = [*finding_cols, *label_cols, *cohort_cols] + (["image_file"] if spec.copy_images != "none" else [])

            def shape(df):
                """One batch as exported (image copies made), and the de-identification's report."""
                if spec.copy_images != "none":
                    files = {}
                    if len(df):
                        files, errors = _copy_images(df, tmp / "images", spec.copy_images, spec.deidentify, workers)
                        copy_errors.update(errors)
                    df["image_file"] = pd.Series([files.get(int(i)) for i in df["image_id"]], index=df.index, dtype="object")
                if spec.deidentify:
                    out, deid = deidentify_frame(df.drop(columns=list(INTERNAL)), salt, keep=keep,
                                                 overrides={"patient": df["_patient"], "study": df["_study"]})
                    acc.ages_capped += deid["ages_capped"]
                else:
                    out = df.drop(columns=list(INTERNAL))
                    deid = {"deidentified": False, "note": "identified export: source paths, identifiers and dates as catalogued"}
                # column order: identity, cohort columns, metadata, findings, labels
                lead = [c for c in ("image_id", "image_file", "patient_key", "study_key", "split", "cohort_arm", "text_similarity") if c in out.columns]
                tail = [c for c in (*finding_cols, *label_cols) if c in out.columns]
                return out[lead + [c for c in out.columns if c not in lead and c not in tail] + tail], deid

            empty, deid = shape(source.empty_table().to_pandas())
            target = _export_schema(empty, source, spec.deidentify)
            with pq.ParquetWriter(tmp / "cohort.parquet", target) as pw, pa_csv.CSVWriter(tmp / "cohort.csv", target) as cw:
                for batch in reader:
                    df = batch.to_pandas()
                    acc.add(df, label_cols)
                    out, _ = shape(df)
                    table = pa.Table.from_pandas(out, schema=target, preserve_index=False)
                    pw.write_table(table)
                    cw.write_table(table)
                if acc.rows == 0:
                    cw.write_table(target.empty_table())  # (the header)
            distinct = _distinct_counts(con, sql, source.names)
        columns = list(target.names)
        if spec.copy_images != "none" and acc.rows:
            image_info.update(
                written=acc.rows - len(copy_errors), failed=len(copy_errors),
                format=("PNG of the 8-bit image the model saw (DICOM converted as catalogued), no header or metadata"
                        if spec.deidentify else ("original files" if spec.copy_images == "copy" else "symbolic links to the source files")),
                errors=[{"image_id": i, "error": e} for i, e in sorted(copy_errors.items())][:100],
            )
        if spec.deidentify:
            deid.update(ages=ages_note(acc.ages_capped), ages_capped=acc.ages_capped)
            deid["salt"] = "per-workspace secret file .deid_salt in the workspace folder; never exported"
            deid["redacted_spec_literals"] = len(secrets - blanked) + json.dumps(spec_to_dict(shown)).count("[redacted]")
        warnings = []
        if spec.text is not None and (stale := text_index_staleness(ws)):
            warnings.append(f"[text]: {stale} The cohort holds only the images the index holds.")
        if "_patient" in source.names and (spec.one_per == "patient" or spec.split is not None) and acc.alone:
            warnings.append(
                f"{acc.alone} of {acc.rows} rows have no patient key ({spec.patient_key} is empty: PNG and JPEG files carry no "
                "patient ID), so each counts as a patient of its own for one_per = \"patient\" and the split; set "
                "patient_key to an SQL expression that names the patient, e.g. regexp_extract(path, '/(p[0-9]+)/', 1)")
            log.warning("cohort %r: %s", spec.name, warnings[-1])
        if "_study" in source.names and spec.one_per == "study" and acc.alone_study:
            warnings.append(
                f"{acc.alone_study} of {acc.rows} rows have no study key ({spec.study_key} is empty: PNG and JPEG files carry no "
                "study UID), so each counts as a study of its own for one_per = \"study\"; set study_key to an SQL expression "
                "that names the study, e.g. regexp_extract(path, '/(s[0-9]+)/', 1)")
            log.warning("cohort %r: %s", spec.name, warnings[-1])
        counts = {"rows": acc.rows, "candidates": n_candidates, "patients": distinct.get("patients"), "studies": distinct.get("studies")}
        if "split" in source.names:
            counts["split"] = {s: {"rows": acc.split.get(s, 0), "patients": distinct["split"].get(s, 0)} for s in ("train", "val", "test")}
        if "cohort_arm" in source.names:
            counts["arms"] = {a: acc.arms.get(a, 0) for a in ("positive", "negative")}
        for lc in label_cols:
            counts.setdefault("labels", {})[lc] = dict(acc.labels.get(lc, {}))  # (none when no row matched)
        prov = _provenance(ws, columns, identified=not spec.deidentify)
        thresholds = {c: {k: e.get(k) for k in ("threshold", "lower", "upper", "rule", "lower_rule", "upper_rule", "threshold_ci_low",
                                                   "threshold_ci_high", "prompt_set", "calibrated_at", "level", "n_pos", "n_neg")}
                      for c, e in cal.items() if c in finding_cols}
        manifest = {
            "format": "curator-cohort/1",
            "name": spec.name,
            "description": spec.description,
            "created": created.isoformat(),
            "tool": {"name": "curator", "version": __version__},
            "deidentified": spec.deidentify,
            "deidentification": deid,
            "spec": spec_to_dict(shown),
            "sql": sql if shown is spec else cohort_sql(shown, ws),
            **({"text_search": _text_provenance(ws, spec)} if spec.text is not None else {}),
            "counts": counts,
            "warnings": warnings,
            "estimates": cohort_estimates(ws, spec),
            "thresholds": thresholds,
            **prov,
            "columns": {"all": columns, "findings": [c for c in finding_cols if c in columns],
                        "labels": [c for c in label_cols if c in columns]},
            "label_values": {"1": "positive", "0": "negative", "-1": "uncertain (between the two thresholds)"} if label_cols else None,
            "images": image_info,
            "workspace": {"generation": ws.manifest.get("generation"), **({"root": str(ws.root)} if not spec.deidentify else {})},
            "files": {n: file_sha256(tmp / n) for n in ("cohort.csv", "cohort.parquet")},
        }
        manifest = _redact(manifest, secrets)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "cohort",
        help="select and export a cohort from a spec (CSV + Parquet + manifest, de-identified by default)",
        description="Select images with a cohort spec (TOML: name, where, one_per, keep, limit, order_by, [sample], [split], "
        "[text] (images above a text query's similarity, from the index), deidentify, copy_images, seed) and export them to OUT: cohort.csv, cohort.parquet, manifest.json (checkpoints, "
        "prompt sets, thresholds, the SQL, counts, estimated precision) and optionally images/. De-identified by default: "
        "salted keys instead of patient / study / series / SOP identifiers, no source paths, study year instead of dates.",
    )
    p.add_argument("--workspace", "-w", required=True, metavar="W", help="workspace folder")
    p.add_argument("--spec", required=True, metavar="SPEC.toml", help="cohort spec (TOML)")
    p.add_argument("--out", metavar="DIR", default=None, help="export folder (required unless --count or --sql)")
    p.add_argument("--copy-images", choices=COPY_MODES, default=None, help="override the spec's copy_images")
    p.add_argument("--no-deidentify", action="store_true", help="identified export (source paths, raw identifiers, dates)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR (only a folder holding a cohort export and nothing else)")
    p.add_argument("--count", action="store_true", help="print the number of rows (and estimated precision) and stop")
    p.add_argument("--sql", action="store_true", help="print the SQL of the spec and stop")
    p.add_argument("--workers", type=int, default=None, help="threads copying images (default: CPU cores, at most 8)")
    p.set_defaults(func=_cli_cohort)


def _cli_cohort(args) -> int:
    from curator.cli import CliError

    spec = load_spec(args.spec)
    if args.copy_images:
        spec.copy_images = args.copy_images
    if args.no_deidentify:
        spec.deidentify = False
    validate_spec(spec)
    ws = open_workspace(args.workspace)
    if args.sql:
        print(cohort_sql(spec, ws))
        return 0
    if args.count:
        print(f"{spec.name}: {count_cohort(ws, spec)} rows")
        _print_estimates(cohort_estimates(ws, spec))
        return 0
    if not args.out:
        raise CliError("give --out DIR (or --count / --sql)")
    if not spec.deidentify:
        why = "--no-deidentify" if args.no_deidentify else f"deidentify = false in {args.spec}"
        log.warning("cohort %r: identified export (%s): source paths, patient and study identifiers and dates go into %s%s; "
                    "share it only where identified data may go", spec.name, why, args.out,
                    " (the copies keep the files' full headers)" if spec.copy_images == "copy" else "")
    m = export_cohort(ws, spec, args.out, overwrite=args.overwrite, workers=args.workers)
    c = m["counts"]
    print(f"{spec.name}: {c['rows']} rows ({c['patients']} patients, {c['studies']} studies) of {c['candidates']} matching images"
          f" -> {Path(args.out).resolve()}" + (" (de-identified)" if m["deidentified"] else " (identified)"))
    if "split" in c:
        print("split: " + ", ".join(f"{k} {v['rows']} rows / {v['patients']} patients" for k, v in c["split"].items()))
    if "arms" in c:
        print("arms: " + ", ".join(f"{k} {v}" for k, v in c["arms"].items()))
    if m["images"].get("failed"):
        print(f"images: {m['images']['written']} written, {m['images']['failed']} could not be copied (see manifest.json)")
    _print_estimates(m["estimates"])
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _print_estimates(est: dict) -> None:
    for col, e in est.items():
        parts = []
        if "precision" in e or "recall" in e:
            parts.append(f"precision {_fmt(e.get('precision'))} [{_fmt(e.get('precision_ci_low'))}, {_fmt(e.get('precision_ci_high'))}]"
                         f" recall {_fmt(e.get('recall'))} (n={e.get('n_labelled_selected')} labelled selected)")
        if "positive_arm" in e:
            a = e["positive_arm"]
            parts.append(f"positive arm precision {_fmt(a['precision'])} [{_fmt(a['precision_ci_low'])}, {_fmt(a['precision_ci_high'])}]")
        if "negative_arm" in e:
            a = e["negative_arm"]
            parts.append(f"negative arm NPV {_fmt(a['npv'])} [{_fmt(a['npv_ci_low'])}, {_fmt(a['npv_ci_high'])}]")
        print(f"estimated {col}: " + "; ".join(parts) + f" from {e.get('n_labelled')} labelled images")

