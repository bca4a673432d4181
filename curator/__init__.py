"""curator: CheXzero zero-shot labelling, search and cohorts over chest radiograph archives."""

__version__ = "0.1.0"
