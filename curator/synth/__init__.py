"""Synthetic chest-radiograph archives with known ground truth (``curator synth``).

Real CheXzero weights and patient archives cannot ship with the project, so this package makes a
realistic stand-in: a hospital-like DICOM (or PNG/JPEG) archive of chest radiograph phantoms whose
findings are known, with a report per study.

Public API
----------
:func:`generate_archive` (``curator.synth.archive``)
    Write ``OUT/`` (PACS-like DICOM tree or PNG/JPEG tree), ``OUT/ground_truth.csv`` and
    ``OUT/reports.csv``; returns a summary dict. Deterministic for a seed.
:func:`render_study_image` (``curator.synth.phantom``)
    One radiograph phantom as a float32 image in [0, 1] (dense = bright) plus an info dict, for
    on-the-fly generation in a training pipeline.
:func:`sample_findings`, :func:`complete_findings`, :func:`labels_from_findings`
    (``curator.synth.findings``) draw a study's findings with realistic prevalence and
    co-occurrence, fill in the details of a partial findings dict, and turn findings into the
    ground-truth 0/1 row.
:func:`make_report`, :func:`impression` (``curator.synth.reports``)
    Report text (FINDINGS + IMPRESSION) consistent with a findings dict.
:data:`FINDINGS`
    The ground-truth columns after ``path``, in the contract's order.

On-the-fly example::

    import numpy as np
    from curator.synth import render_study_image, sample_findings, labels_from_findings, impression

    rng = np.random.default_rng(0)
    findings = sample_findings(rng, setting="inpatient")
    image, info = render_study_image(rng, findings, size=512, view="PA")
    labels = labels_from_findings(findings)
    text = impression(rng, findings)

``no_finding`` follows CheXpert: 1 when none of the seven pathology columns is positive; support
devices alone leave it at 1.
"""

from curator.synth.archive import GROUND_TRUTH_COLUMNS, generate_archive, plan_archive
from curator.synth.findings import (
    FINDINGS,
    PATHOLOGIES,
    complete_findings,
    labels_from_findings,
    sample_findings,
)
from curator.synth.phantom import render_study_image, sample_anatomy
from curator.synth.reports import impression, make_report

__all__ = [
    "FINDINGS",
    "GROUND_TRUTH_COLUMNS",
    "PATHOLOGIES",
    "complete_findings",
    "generate_archive",
    "impression",
    "labels_from_findings",
    "make_report",
    "plan_archive",
    "render_study_image",
    "sample_anatomy",
    "sample_findings",
]
