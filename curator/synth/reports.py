"""Radiology reports for synthetic studies: FINDINGS and IMPRESSION consistent with what was drawn.

:func:`make_report` writes a MIMIC-style report (EXAMINATION, INDICATION, COMPARISON, FINDINGS,
IMPRESSION). The IMPRESSION states every drawn finding with its severity, side or lobe in varied
phrasing ("Small left pleural effusion with adjacent atelectasis.", "Moderate pulmonary edema.",
"Endotracheal tube terminates 4 cm above the carina.", "Stable cardiomegaly." when a prior study
of the patient showed it) and negates some absent ones ("No pleural effusion or pneumothorax.").
Normal studies get varied normal impressions ("No acute cardiopulmonary process."). Negations never
contradict the drawn findings: a finding that is present is never negated.
"""

from __future__ import annotations

import numpy as np

_SIDE = {"left": "left", "right": "right", "bilateral": "bilateral"}
_LOBE_NAME = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "lingula": "lingula",
    "LLL": "left lower lobe",
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _cardiomegaly(rng, spec, stable: bool) -> str:
    sev = spec["severity"]
    if stable and rng.random() < 0.6:
        return _pick(rng, ["Stable cardiomegaly.", f"Stable {sev} cardiomegaly.",
                           "Cardiomegaly is unchanged from the prior study."])
    return _pick(rng, {
        "mild": ["Mild cardiomegaly.", "The heart is mildly enlarged.", "Mildly enlarged cardiac silhouette.",
                 "Mild enlargement of the cardiac silhouette."],
        "moderate": ["Moderate cardiomegaly.", "The heart is moderately enlarged.",
                     "Moderately enlarged cardiac silhouette."],
        "severe": ["Severe cardiomegaly.", "Marked cardiomegaly.", "Marked enlargement of the cardiac silhouette.",
                   "The heart is severely enlarged."],
    }[sev])


def _effusion(rng, spec, with_atelectasis: bool) -> str:
    sev, side = spec["severity"], spec["side"]
    if side == "bilateral":
        base = _pick(rng, [f"{sev} bilateral pleural effusions", f"bilateral {sev} pleural effusions",
                           f"{sev} pleural effusions bilaterally"])
    else:
        base = _pick(rng, [f"{sev} {side} pleural effusion", f"{sev} {side}-sided pleural effusion"])
        if sev == "small" and rng.random() < 0.25:
            base = f"blunting of the {side} costophrenic angle consistent with a small pleural effusion"
    if with_atelectasis:
        base += _pick(rng, [" with adjacent atelectasis", " with adjacent compressive atelectasis",
                            " and adjacent basilar atelectasis"])
    return _cap(base) + "."


def _edema(rng, spec) -> str:
    return _pick(rng, {
        "mild": ["Mild pulmonary edema.", "Mild interstitial pulmonary edema.",
                 "Mild pulmonary vascular congestion and interstitial edema.", "Mild pulmonary edema is present."],
        "moderate": ["Moderate pulmonary edema.", "Moderate interstitial and alveolar pulmonary edema.",
                     "Findings consistent with moderate pulmonary edema."],
        "severe": ["Severe pulmonary edema.", "Severe bilateral alveolar pulmonary edema.",
                   "Diffuse severe pulmonary edema."],
    }[spec["severity"]])


def _pneumothorax(rng, spec) -> str:
    sev, side = spec["severity"], spec["side"]
    apical = "apical " if sev == "small" and rng.random() < 0.5 else ""
    s = _pick(rng, [f"{sev} {side} {apical}pneumothorax", f"there is a {sev} {side} {apical}pneumothorax",
                    f"{sev} {side}-sided pneumothorax"])
    if sev == "large" and rng.random() < 0.5:
        other = "leftward" if side == "right" else "rightward"
        s += f" with {other} mediastinal shift"
    return _cap(s.replace("  ", " ")) + "."


def _consolidation(rng, spec) -> str:
    lobe = _LOBE_NAME[spec["lobe"]]
    return _pick(rng, [f"{_cap(lobe)} consolidation, concerning for pneumonia.",
                       f"Focal consolidation in the {lobe}.",
                       f"Airspace consolidation in the {lobe} compatible with pneumonia in the appropriate clinical setting.",
                       f"Consolidation of the {lobe}."])


def _atelectasis(rng, spec) -> str:
    side = spec["side"]
    if spec["kind"] == "plate":
        where = "at both lung bases" if side == "bilateral" else f"at the {side} lung base"
        return _pick(rng, [f"Plate-like atelectasis {where}.", f"Linear atelectasis {where}.",
                           f"Subsegmental atelectasis {where}."])
    where = "Bibasilar" if side == "bilateral" else f"{_cap(side)} basilar"
    return _pick(rng, [f"{where} atelectasis.", f"{where} opacity, likely atelectasis.",
                       f"{where} atelectasis with mild volume loss."])


def _lesion(rng, spec) -> str:
    les = spec["lesions"]
    if len(les) > 1:
        big = max(les, key=lambda x: x["size_cm"])
        return _pick(rng, [(f"Multiple pulmonary nodules, the largest measuring {big['size_cm']:.1f} cm in the "
                           f"{_LOBE_NAME[big['lobe']]}. Recommend CT for further evaluation."),
                           (f"Multiple pulmonary nodules, the largest {big['size_cm']:.1f} cm in the "
                           f"{_LOBE_NAME[big['lobe']]}.")])
    L = les[0]
    kind = "mass" if L["size_cm"] >= 3.0 else "nodule"
    lobe = _LOBE_NAME[L["lobe"]]
    s = _pick(rng, [f"{L['size_cm']:.1f} cm {kind} in the {lobe}.",
                    f"{_cap(kind)} measuring {L['size_cm']:.1f} cm in the {lobe}.",
                    f"{L['size_cm']:.1f} cm rounded opacity in the {lobe}, likely a pulmonary {kind}."])
    if kind == "mass" or rng.random() < 0.4:
        s += " Recommend chest CT for further evaluation."
    return s


def _devices(rng, spec) -> list[str]:
    out = []
    for d in spec["devices"]:
        if d == "ett":
            cm = spec.get("ett_cm", 4.0)
            n = round(cm)
            out.append(_pick(rng, [f"Endotracheal tube terminates {n} cm above the carina.",
                                   f"Endotracheal tube tip is {n} cm above the carina.",
                                   f"The endotracheal tube is in standard position, {n} cm above the carina."]))
        elif d == "ngt":
            out.append(_pick(rng, ["Enteric tube courses below the diaphragm with tip in the stomach.",
                                   "Nasogastric tube tip is in the stomach.",
                                   "Orogastric tube terminates in the stomach."]))
        elif d == "cvc_rij":
            out.append(_pick(rng, ["Right internal jugular central venous catheter terminates in the SVC.",
                                   "Right IJ central line tip in the mid SVC."]))
        elif d == "cvc_lsc":
            out.append(_pick(rng, ["Left subclavian central venous catheter with tip in the SVC.",
                                   "Left subclavian line terminates at the cavoatrial junction."]))
        elif d == "picc":
            out.append(_pick(rng, ["Right upper extremity PICC terminates in the SVC.",
                                   "Right PICC line tip projects over the lower SVC."]))
        elif d == "pacemaker":
            out.append(_pick(rng, ["Left chest wall pacemaker with leads in the right atrium and right ventricle.",
                                   "Dual-chamber pacemaker in place with leads in standard position.",
                                   "Left-sided pacemaker device with intact leads."]))
    return out


_NORMAL_IMPRESSIONS = [
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
    "No radiographic evidence of acute cardiopulmonary disease.",
    "Clear lungs. No pleural effusion or pneumothorax.",
    "No acute intrathoracic process.",
    "Lungs are clear. Heart size is normal. No acute findings.",
]


def _negations(rng, present: set) -> list[str]:
    """A few negative statements about absent findings (never about present ones)."""
    out = []
    eff, ptx = "pleural_effusion" in present, "pneumothorax" in present
    if not eff and not ptx:
        out.append(_pick(rng, ["No pleural effusion or pneumothorax.", "No pneumothorax or pleural effusion.",
                               "There is no pleural effusion or pneumothorax."]))
    elif not eff:
        out.append(_pick(rng, ["No pleural effusion.", "No pleural effusions."]))
    elif not ptx:
        out.append(_pick(rng, ["No pneumothorax.", "There is no pneumothorax."]))
    if "consolidation" not in present and rng.random() < 0.7:
        out.append(_pick(rng, ["No focal consolidation.", "No focal consolidation to suggest pneumonia.",
                               "No consolidation."]))
    if "edema" not in present and rng.random() < 0.5:
        out.append(_pick(rng, ["No pulmonary edema.", "No evidence of pulmonary edema."]))
    if "cardiomegaly" not in present and rng.random() < 0.5:
        out.append(_pick(rng, ["Heart size is normal.", "No cardiomegaly.", "Normal heart size."]))
    if "lung_lesion" not in present and rng.random() < 0.15:
        out.append("No suspicious pulmonary nodule.")
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def impression(rng: np.random.Generator, findings: dict, prior: dict | None = None) -> str:
    """The IMPRESSION text for a findings dict (``prior``: the patient's previous study's findings)."""
    prior = prior or {}
    present = set(findings)
    lines: list[str] = []
    pathologic = [k for k in findings if k != "support_devices"]
    eff = findings.get("pleural_effusion")
    ate = findings.get("atelectasis")
    adjacent = bool(eff and ate and (ate["side"] == eff["side"] or ate["side"] == "bilateral")
                    and rng.random() < 0.6)
    if findings.get("edema"):
        lines.append(_edema(rng, findings["edema"]))
    if findings.get("pneumothorax"):
        lines.append(_pneumothorax(rng, findings["pneumothorax"]))
    if findings.get("consolidation"):
        lines.append(_consolidation(rng, findings["consolidation"]))
    if eff:
        lines.append(_effusion(rng, eff, adjacent))
    if ate and not adjacent:
        lines.append(_atelectasis(rng, ate))
    if findings.get("cardiomegaly"):
        lines.append(_cardiomegaly(rng, findings["cardiomegaly"], "cardiomegaly" in prior))
    if findings.get("lung_lesion"):
        lines.append(_lesion(rng, findings["lung_lesion"]))
    if len(lines) > 1:
        first = lines[:2]
        order = rng.permutation(len(first))
        lines[:2] = [first[i] for i in order]
    if findings.get("support_devices"):
        dev = _devices(rng, findings["support_devices"])
        lines = (dev + lines) if rng.random() < 0.5 else (lines + dev)
    if not pathologic:
        if findings.get("support_devices"):
            lines.append(_pick(rng, ["Otherwise no acute cardiopulmonary process.",
                                     "No acute cardiopulmonary abnormality."]))
        else:
            lines = [_pick(rng, _NORMAL_IMPRESSIONS)]
        if rng.random() < 0.5:
            lines += [n for n in _negations(rng, present) if n not in " ".join(lines)][:1]
    else:
        lines += _negations(rng, present)[: int(rng.integers(1, 3))]
    if len(lines) > 2 and rng.random() < 0.35:
        return "\n".join(f"{i + 1}. {ln}" for i, ln in enumerate(lines))
    return " ".join(lines)


def _findings_section(rng, findings: dict, views: list[str]) -> str:
    parts = []
    if findings.get("support_devices"):
        parts.append(" ".join(_devices(rng, findings["support_devices"])))
    lungs = []
    if findings.get("edema"):
        sev = findings["edema"]["severity"]
        lungs.append(f"There is {sev} bilateral perihilar haziness with interstitial thickening and "
                     f"Kerley B lines, consistent with {sev} pulmonary edema.")
    if findings.get("consolidation"):
        lungs.append(f"Dense airspace opacity with air bronchograms in the "
                     f"{_LOBE_NAME[findings['consolidation']['lobe']]}.")
    if findings.get("atelectasis"):
        side = findings["atelectasis"]["side"]
        where = "both lung bases" if side == "bilateral" else f"the {side} lung base"
        lungs.append(f"Linear opacities at {where} with mild volume loss, compatible with atelectasis.")
    if findings.get("lung_lesion"):
        for L in findings["lung_lesion"]["lesions"]:
            lungs.append(f"A {L['size_cm']:.1f} cm rounded opacity projects over the {_LOBE_NAME[L['lobe']]}.")
    if not lungs:
        lungs.append(_pick(rng, ["The lungs are clear.", "Lungs are well expanded and clear.",
                                 "The lungs are clear without focal consolidation."]))
    parts.append(" ".join(lungs))
    pl = []
    if findings.get("pleural_effusion"):
        e = findings["pleural_effusion"]
        side = "bilateral" if e["side"] == "bilateral" else e["side"]
        pl.append(f"{_cap(e['severity'])} {side} pleural effusion with a meniscus, blunting the costophrenic angle.")
    if findings.get("pneumothorax"):
        p = findings["pneumothorax"]
        pl.append(f"A visceral pleural line is seen in the {p['side']} hemithorax with absent lung markings "
                  f"peripheral to it, compatible with a {p['severity']} pneumothorax.")
    if not pl:
        pl.append(_pick(rng, ["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."]))
    parts.append(" ".join(pl))
    if findings.get("cardiomegaly"):
        parts.append(f"The cardiac silhouette is {findings['cardiomegaly']['severity'].replace('severe', 'markedly')}"
                     f"{'' if findings['cardiomegaly']['severity'] == 'severe' else 'ly'} enlarged.")
    else:
        parts.append(_pick(rng, ["Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
                                 "Normal cardiomediastinal contours."]))
    if rng.random() < 0.4:
        parts.append(_pick(rng, ["Degenerative changes of the thoracic spine.", "No acute osseous abnormality.",
                                 "The visualized osseous structures are unremarkable."]))
    return " ".join(parts)


_INDICATIONS = {
    "outpatient": ["Cough.", "Shortness of breath.", "Chest pain.", "Preoperative evaluation.", "Fever and cough.",
                   "Follow-up.", "Dyspnea on exertion."],
    "inpatient": ["Shortness of breath.", "Evaluate for pneumonia.", "Hypoxia.", "Chest pain.", "Fever.",
                  "Evaluate for effusion."],
    "icu": ["Intubated patient, evaluate tube placement.", "Line placement.", "Hypoxia.",
            "Evaluate for interval change.", "Respiratory failure."],
}


def _indication(rng, findings: dict, setting: str) -> str:
    options = list(_INDICATIONS[setting])
    if "ett" not in findings.get("support_devices", {}).get("devices", []):
        options = [o for o in options if "Intubated" not in o]
    return _pick(rng, options)


def make_report(
    rng: np.random.Generator,
    findings: dict,
    views: list[str],
    setting: str = "outpatient",
    prior: dict | None = None,
    prior_date: str | None = None,
) -> str:
    """Full report text with FINDINGS and IMPRESSION sections."""
    if views == ["PA", "LL"] or views == ["PA", "LL", "LL"]:
        exam = "CHEST (PA AND LAT)"
    elif "AP" in views:
        exam = "CHEST (PORTABLE AP)"
    else:
        exam = "CHEST (PA)"
    comparison = "None." if not prior_date else f"Chest radiograph from {prior_date[:4]}-{prior_date[4:6]}-{prior_date[6:]}."
    return (
        f"EXAMINATION: {exam}\n"
        f"INDICATION: {_indication(rng, findings, setting)}\n"
        f"COMPARISON: {comparison}\n"
        f"FINDINGS:\n{_findings_section(rng, findings, views)}\n"
        f"IMPRESSION:\n{impression(rng, findings, prior)}\n"
    )
