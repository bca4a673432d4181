"""curator: CheXzero zero-shot labelling, search and cohorts over chest radiograph archives."""

from curator import forking as _forking  # noqa: F401 - forked children freeze what they inherit

__version__ = "0.1.0"
