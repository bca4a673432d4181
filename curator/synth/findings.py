"""What a synthetic study shows: finding specifications, their sampling and their labels.

A study's findings are a ``dict`` mapping a finding name (the ground-truth column names of
:data:`FINDINGS`, without ``no_finding``) to a *spec* dict of details. A finding that is absent is
simply missing from the dict. Specs (all keys filled in by :func:`complete_findings`):

``cardiomegaly``      ``{"severity": "mild"|"moderate"|"severe", "ctr": float}``
``pleural_effusion``  ``{"side": "left"|"right"|"bilateral", "severity": "small"|"moderate"|"large",
                      "height": float}`` (fluid height at the chest wall, fraction of lung height)
``edema``             ``{"severity": "mild"|"moderate"|"severe"}``
``pneumothorax``      ``{"side": "left"|"right", "severity": "small"|"moderate"|"large",
                      "depth": float}`` (lung edge to chest wall at the apex, fraction of the
                      hemithorax width)
``consolidation``     ``{"lobe": "RUL"|"RML"|"RLL"|"LUL"|"lingula"|"LLL"}``
``atelectasis``       ``{"side": "left"|"right"|"bilateral", "kind": "plate"|"basilar"}``
``lung_lesion``       ``{"lesions": [{"side", "lobe", "size_cm", "u", "t"}...]}`` (``u``: position
                      from the medial to the lateral lung edge, ``t``: from apex to base, 0..1;
                      nodules 1.5-2.9 cm, masses 3-5.5 cm)
``support_devices``   ``{"devices": [...], "ett_cm": float}`` with devices among
                      :data:`DEVICES`.

Every spec is decided per *study*, so that all images of a study (PA and lateral) show the same
disease. :func:`labels_from_findings` turns a findings dict into the 0/1 ground-truth row.

``no_finding`` follows CheXpert: it is 1 when none of the seven *pathology* columns is positive.
Support devices alone do not make a study abnormal (CheXpert's labeller also leaves "No Finding"
positive for an otherwise normal film with a line or tube), so a study with only a central line
has ``support_devices = 1`` and ``no_finding = 1``.
"""

from __future__ import annotations

import numpy as np

# Ground-truth columns, in the order of the interface contract.
FINDINGS = (
    "cardiomegaly",
    "pleural_effusion",
    "edema",
    "pneumothorax",
    "consolidation",
    "atelectasis",
    "lung_lesion",
    "support_devices",
    "no_finding",
)
# The findings that make a study abnormal (everything but devices and no_finding).
PATHOLOGIES = FINDINGS[:7]

LOBES = ("RUL", "RML", "RLL", "LUL", "lingula", "LLL")
LOBE_SIDE = {"RUL": "right", "RML": "right", "RLL": "right", "LUL": "left", "lingula": "left", "LLL": "left"}
DEVICES = ("ett", "ngt", "cvc_rij", "cvc_lsc", "picc", "pacemaker")

# Cardiothoracic ratio ranges. A normal heart is drawn below NORMAL_CTR_MAX, an enlarged one
# above CARDIOMEGALY_CTR_MIN: the gap keeps the label unambiguous on the image.
NORMAL_CTR = (0.36, 0.46)
CARDIOMEGALY_CTR = {"mild": (0.53, 0.57), "moderate": (0.57, 0.62), "severe": (0.62, 0.68)}
NORMAL_CTR_MAX = NORMAL_CTR[1]
CARDIOMEGALY_CTR_MIN = CARDIOMEGALY_CTR["mild"][0]

EFFUSION_HEIGHT = {"small": (0.14, 0.22), "moderate": (0.28, 0.40), "large": (0.48, 0.66)}
PNEUMOTHORAX_DEPTH = {"small": (0.16, 0.24), "moderate": (0.26, 0.38), "large": (0.40, 0.55)}

# Clinical setting of a study: outpatient PA/lateral, inpatient (ward) portable, ICU portable.
SETTINGS = ("outpatient", "inpatient", "icu")


def _pick(rng: np.random.Generator, options, p=None):
    i = int(rng.choice(len(options), p=p))
    return options[i]


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = lo_hi
    return float(lo + (hi - lo) * rng.random())


def complete_findings(rng: np.random.Generator, findings: dict | None) -> dict:
    """Return a full findings dict: ``True``/``1``/partial dicts get their missing details drawn.

    Falsy values drop the finding. ``no_finding`` keys are ignored (it is derived).
    """
    out: dict = {}
    for name, spec in (findings or {}).items():
        if name == "no_finding" or not spec:
            continue
        if name not in FINDINGS:
            raise ValueError(f"unknown finding {name!r}; expected one of {FINDINGS[:8]}")
        spec = dict(spec) if isinstance(spec, dict) else {}
        if name == "cardiomegaly":
            if "severity" not in spec:
                spec["severity"] = _pick(rng, ("mild", "moderate", "severe"), [0.45, 0.35, 0.2])
            if "ctr" not in spec:
                spec["ctr"] = round(_uniform(rng, CARDIOMEGALY_CTR[spec["severity"]]), 4)
        elif name == "pleural_effusion":
            if "side" not in spec:
                spec["side"] = _pick(rng, ("left", "right", "bilateral"), [0.3, 0.35, 0.35])
            if "severity" not in spec:
                spec["severity"] = _pick(rng, ("small", "moderate", "large"), [0.45, 0.38, 0.17])
            if "height" not in spec:
                spec["height"] = round(_uniform(rng, EFFUSION_HEIGHT[spec["severity"]]), 4)
        elif name == "edema":
            if "severity" not in spec:
                spec["severity"] = _pick(rng, ("mild", "moderate", "severe"), [0.4, 0.4, 0.2])
        elif name == "pneumothorax":
            if "side" not in spec:
                spec["side"] = _pick(rng, ("left", "right"))
            if "severity" not in spec:
                spec["severity"] = _pick(rng, ("small", "moderate", "large"), [0.35, 0.4, 0.25])
            if "depth" not in spec:
                spec["depth"] = round(_uniform(rng, PNEUMOTHORAX_DEPTH[spec["severity"]]), 4)
        elif name == "consolidation":
            if "lobe" not in spec:
                spec["lobe"] = _pick(rng, LOBES, [0.12, 0.14, 0.27, 0.12, 0.1, 0.25])
        elif name == "atelectasis":
            if "side" not in spec:
                spec["side"] = _pick(rng, ("left", "right", "bilateral"), [0.35, 0.3, 0.35])
            if "kind" not in spec:
                spec["kind"] = _pick(rng, ("plate", "basilar"), [0.55, 0.45])
        elif name == "lung_lesion":
            if "lesions" not in spec:
                n = int(_pick(rng, (1, 1, 1, 1, 2, 3)))
                mass = rng.random() < 0.35
                lesions = []
                for _ in range(n):
                    lobe = _pick(rng, LOBES, [0.24, 0.08, 0.2, 0.22, 0.06, 0.2])
                    size = _uniform(rng, (3.0, 5.5) if mass and not lesions else (1.5, 2.9))
                    upper = lobe in ("RUL", "LUL")
                    lesions.append({
                        "side": LOBE_SIDE[lobe],
                        "lobe": lobe,
                        "size_cm": round(size, 1),
                        "u": round(_uniform(rng, (0.3, 0.75)), 3),
                        "t": round(_uniform(rng, (0.18, 0.45) if upper else (0.5, 0.75)), 3),
                    })
                spec["lesions"] = lesions
        elif name == "support_devices":
            if "devices" not in spec:
                kind = _pick(rng, ("icu", "line", "pacer"), [0.3, 0.4, 0.3])
                if kind == "icu":
                    devs = ["ett"]
                    if rng.random() < 0.8:
                        devs.append("ngt")
                    if rng.random() < 0.6:
                        devs.append(_pick(rng, ("cvc_rij", "cvc_lsc", "picc")))
                elif kind == "line":
                    devs = [_pick(rng, ("cvc_rij", "cvc_lsc", "picc"), [0.5, 0.2, 0.3])]
                    if rng.random() < 0.3:
                        devs.append("ngt")
                else:
                    devs = ["pacemaker"]
                    if rng.random() < 0.2:
                        devs.append(_pick(rng, ("cvc_rij", "picc")))
                spec["devices"] = devs
            if "ett" in spec["devices"] and "ett_cm" not in spec:
                spec["ett_cm"] = round(_uniform(rng, (2.5, 6.5)), 1)
        out[name] = spec
    return out


def sample_findings(
    rng: np.random.Generator,
    setting: str = "outpatient",
    age: int = 60,
    prior: dict | None = None,
) -> dict:
    """Draw a study's findings with realistic prevalence, co-occurrence and severity.

    A latent "heart failure" state raises cardiomegaly, edema and effusion together; ICU studies
    carry more devices, pneumothorax and atelectasis; chronic findings of a ``prior`` study of the
    same patient (cardiomegaly, lung lesions, pacemaker) tend to persist. Overall (mix of settings
    used by the archive generator) each finding has a prevalence of roughly 8-25 % and about a
    third of studies have no pathology.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}")
    s = SETTINGS.index(setting)
    old = min(max((age - 30) / 50.0, 0.0), 1.0)
    prior = prior or {}
    r = rng.random
    hf = r() < (0.07 + 0.06 * old, 0.18 + 0.08 * old, 0.24)[s]
    f: dict = {}
    if "cardiomegaly" in prior and r() < 0.7:
        f["cardiomegaly"] = {"severity": prior["cardiomegaly"]["severity"], "ctr": prior["cardiomegaly"]["ctr"]}
    elif r() < (0.5 if hf else 0.035 + 0.03 * old):
        f["cardiomegaly"] = True
    if r() < (0.65 if hf else 0.035):
        f["edema"] = True
    if r() < (0.55 if hf else (0.07, 0.14, 0.2)[s]):
        f["pleural_effusion"] = True
    if r() < (0.035, 0.11, 0.2)[s]:
        f["pneumothorax"] = True
    if r() < (0.09, 0.17, 0.22)[s]:
        f["consolidation"] = True
    if r() < (0.06, 0.14, 0.24)[s] + (0.12 if "pleural_effusion" in f else 0.0):
        f["atelectasis"] = True
    if "lung_lesion" in prior and r() < 0.75:
        f["lung_lesion"] = {"lesions": [dict(x) for x in prior["lung_lesion"]["lesions"]]}
    elif r() < (0.06 + 0.05 * old, 0.07, 0.04)[s]:
        f["lung_lesion"] = True
    prior_dev = prior.get("support_devices", {}).get("devices", [])
    if "pacemaker" in prior_dev and r() < 0.9:
        f["support_devices"] = {"devices": ["pacemaker"]}
    elif r() < (0.02, 0.12, 0.75)[s]:
        if setting == "icu":
            devs = ["ett"] if r() < 0.75 else []
            if r() < 0.7:
                devs.append("ngt")
            if r() < 0.65 or not devs:
                devs.append(_pick(rng, ("cvc_rij", "cvc_lsc", "picc"), [0.5, 0.25, 0.25]))
            f["support_devices"] = {"devices": devs}
        else:
            f["support_devices"] = True
    return complete_findings(rng, f)


def labels_from_findings(findings: dict) -> dict:
    """The 0/1 ground-truth row (all :data:`FINDINGS` columns) of a findings dict."""
    row = {name: int(bool(findings.get(name))) for name in FINDINGS[:8]}
    row["no_finding"] = int(not any(row[name] for name in PATHOLOGIES))
    return row


def draw_ctr(rng: np.random.Generator, findings: dict) -> float:
    """The cardiothoracic ratio to draw: the cardiomegaly spec's, else a normal one."""
    if findings.get("cardiomegaly"):
        return float(findings["cardiomegaly"]["ctr"])
    return round(_uniform(rng, NORMAL_CTR), 4)
