"""Chest-radiograph phantoms: anatomy, pose, exposure and findings rendered with numpy + Pillow.

:func:`render_study_image` draws one frontal (PA/AP) or lateral (LL) radiograph as a float32
array in [0, 1] in MONOCHROME2 sense (dense = bright), plus an ``info`` dict describing what was
drawn (view, pose, cardiothoracic ratio, pixel geometry of heart and thorax...).

How it is drawn
---------------
The body is described in a *canonical frame*: ``y`` runs from 0 (top of the image) to 1 (bottom) in
units of the image height, ``x`` is centred on the patient's midline in the same units, negative
``x`` being the patient's right (image left, as a PA film is viewed). A per-image pose (scale,
shift, rotation) maps image coordinates into that frame, so every structure moves together.

Smooth anatomy is rendered at a *work resolution* (half the output size for large images) as an
attenuation map ``A``: body soft tissue (thicker in the middle), minus the air of two lungs
(outlined by chest wall, apices, mediastinum and heart, diaphragm domes with sharp costophrenic
angles), plus bone (posterior and anterior ribs as periodic curved bands, clavicles, spine with
disc spaces, humeral heads, scapulae on AP films), hila, branching vessel trees and fine lung
texture (drawn with Pillow), breast shadows, gastric bubble. Findings change the *air fraction* of
the lungs (effusion, edema, consolidation, atelectasis, nodules) or add air (pneumothorax).
Attenuation becomes brightness through ``1 - exp(-mu A)`` with a random exposure, contrast window
and gamma, optional edge enhancement, and is upsampled to the output size. Thin, crisp things are
added at full resolution: support devices, quantum noise, anti-scatter grid lines and burned-in
side markers.

Finding signatures (chosen to survive the model's 224 px input)
---------------------------------------------------------------
* cardiomegaly: the heart silhouette's width over the thoracic width (inner chest wall at its
  widest) equals the drawn ``ctr`` (0.36-0.46 normal, >= 0.53 enlarged); the heart is widest
  above the diaphragm domes so the ratio can be measured on the image.
* pleural effusion: fluid replaces the air of the lung base below a meniscus that rises along the
  lateral chest wall, blunting the costophrenic angle and hiding the hemidiaphragm; height by
  severity; left, right or bilateral.
* edema: bilateral perihilar ("bat-wing") haze that spreads and thickens with severity, basal
  Kerley-B lines, patchy alveolar texture when severe.
* pneumothorax: a visceral pleural line separated from the chest wall (widest at the apex), with
  no lung markings and darker air beyond it; the collapsed lung is denser.
* consolidation: dense lobar opacity (sharp along a fissure where the lobe has one) with patchy
  margins and air bronchograms; RML / lingula hide the heart border.
* atelectasis: plate-like dense bands at the lung base(s), elevated hemidiaphragm and a small
  mediastinal shift toward the side (volume loss); basal patchy opacity for the basilar kind.
* lung lesion: round dense nodules / lobulated masses of the drawn size (1-5.5 cm).
* support devices: endotracheal tube (tip the drawn distance above the carina), enteric tube into
  the stomach, jugular / subclavian / PICC lines to the SVC, pacemaker generator with leads.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from curator.synth.findings import complete_findings, draw_ctr

VIEWS = ("PA", "AP", "LL")

# Thoracic width of an average adult in centimetres: converts lesion sizes and tube distances.
THORAX_CM = 28.0

_CACHE: dict = {}


# --------------------------------------------------------------------------------------------
# cached grids and noise banks (drawn once per process from fixed seeds: deterministic)


def _grid(h: int, w: int):
    key = ("grid", h, w)
    if key not in _CACHE:
        y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
        x = ((np.arange(w, dtype=np.float32) + 0.5 - w / 2) / h)[None, :]
        _CACHE[key] = (np.broadcast_to(y, (h, w)), np.broadcast_to(x, (h, w)))
    return _CACHE[key]


def _bandpass_bank(h: int, w: int, lo: float, hi: float, seed: int) -> np.ndarray:
    """Periodic noise with spatial frequencies between lo and hi cycles per image height, std 1."""
    rng = np.random.default_rng(seed)
    n = rng.standard_normal((h, w)).astype(np.float32)
    spec = np.fft.rfft2(n)
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.rfftfreq(w)[None, :] * w * (h / w)
    r = np.sqrt(fx * fx + fy * fy)
    filt = np.exp(-(((r - (lo + hi) / 2) / ((hi - lo) / 2)) ** 2)) if lo > 0 else np.exp(-((r / hi) ** 2))
    out = np.fft.irfft2(spec * filt, s=(h, w)).astype(np.float32)
    out /= out.std() + 1e-8
    return out


def _texture(h: int, w: int, kind: str) -> np.ndarray:
    key = ("tex", kind, h, w)
    if key not in _CACHE:
        if kind == "fine":
            _CACHE[key] = _bandpass_bank(h, w, 18.0, 60.0, 101)
        else:  # "blob": low-frequency field for patchy margins
            _CACHE[key] = _bandpass_bank(h, w, 0.0, 7.0, 202)
    return _CACHE[key]


def _rolled(bank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = bank.shape
    return np.roll(bank, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))


_NOISE_PAD = 64


def _noise_bank(H: int, W: int) -> np.ndarray:
    key = ("noise", H, W)
    if key not in _CACHE:
        rng = np.random.default_rng(303)
        _CACHE[key] = rng.standard_normal((H + _NOISE_PAD, W + _NOISE_PAD), dtype=np.float32)
    return _CACHE[key]


def _font(px: int):
    key = ("font", px)
    if key not in _CACHE:
        try:
            _CACHE[key] = ImageFont.load_default(size=px)
        except TypeError:  # very old Pillow without scalable default font
            _CACHE[key] = ImageFont.load_default()
    return _CACHE[key]


def _ramp(d, eps):
    """Soft step: 0 below -eps/2, 1 above +eps/2 (linear in between)."""
    out = d * (1.0 / eps)
    out += 0.5
    np.maximum(out, 0.0, out=out)
    np.minimum(out, 1.0, out=out)
    return out


def _catmull_rom(points, n_per_seg: int = 12):
    """Smooth polyline through control points (Catmull-Rom spline)."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 3:
        return [tuple(p) for p in pts]
    p = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    out = []
    ts = np.linspace(0, 1, n_per_seg, endpoint=False)[:, None]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        seg = 0.5 * (
            2 * p1
            + (-p0 + p2) * ts
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * ts**2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * ts**3
        )
        out.extend(map(tuple, seg))
    out.append(tuple(pts[-1]))
    return out


class _Pose:
    """Canonical frame <-> pixel coordinates for one image (scale k, shift, rotation)."""

    def __init__(self, k: float, sx: float, sy: float, rot: float):
        self.k, self.sx, self.sy, self.rot = k, sx, sy, rot
        self.c, self.s = math.cos(rot), math.sin(rot)

    def canonical(self, Y, X):
        Xs = X - self.sx
        Ys = Y - (0.5 + self.sy)
        ik = 1.0 / self.k
        xb = (self.c * ik) * Xs + (self.s * ik) * Ys
        yb = (-self.s * ik) * Xs + (self.c * ik) * Ys
        yb += 0.5
        return xb, yb

    def to_px(self, xb, yb, h: int, w: int):
        """Canonical point(s) -> (column, row) in a h x w raster."""
        xb = np.asarray(xb, dtype=np.float64)
        yb = np.asarray(yb, dtype=np.float64) - 0.5
        X = self.sx + self.k * (self.c * xb - self.s * yb)
        Y = 0.5 + self.sy + self.k * (self.s * xb + self.c * yb)
        return X * h + w / 2.0 - 0.5, Y * h - 0.5


# --------------------------------------------------------------------------------------------
# anatomy


def sample_anatomy(rng: np.random.Generator, view: str = "PA", sex: str = "M", ctr: float = 0.42) -> dict:
    """Draw the body geometry, pose and exposure of one image (all in canonical units)."""
    u = rng.random
    ap = view == "AP"
    an = {
        "view": view,
        "sex": sex,
        "ctr": float(ctr),
        "scale": 0.90 + 0.16 * u(),
        "sx": 0.035 * (2 * u() - 1),
        "sy": 0.03 * (2 * u() - 1),
        "rot": math.radians(float(np.clip(rng.normal(0, 1.8), -5, 5))),
        "hw": 0.285 + 0.04 * u(),
        "asym": 0.012 * (2 * u() - 1),
        "y_top": (0.11 + 0.04 * u()) if ap else (0.075 + 0.04 * u()),
        "lung_h": (0.52 + 0.07 * u()) if ap else (0.58 + 0.07 * u()),
        "cp_drop": 0.004 + 0.016 * u(),
        "dome_r": 0.065 + 0.035 * u(),
        "dome_l": 0.05 + 0.03 * u(),
        "dome_peak": 0.42 + 0.12 * u(),
        "heart_right_frac": 0.30 + 0.10 * u(),
        "heart_lift": 0.035 + 0.03 * u(),
        "med_w": 0.045 + 0.015 * u(),
        "knob": 0.018 + 0.02 * u(),
        "fat": 0.035 + 0.09 * u(),
        "breast": (0.06 + 0.1 * u()) if sex == "F" else 0.0,
        "bubble": u() < 0.5,
        "rib_sp": 0.050 + 0.008 * u(),
        "rib_phase": 0.3 * u(),
        "vessel_seed": int(rng.integers(2**31)),
        # exposure / processing
        "mu": 0.7 + 0.6 * u(),
        "lo": 0.0 + 0.12 * u(),
        "hi": 0.92 + 0.12 * u(),
        "gamma": 0.85 + 0.4 * u(),
        "edge": 0.8 * u() if u() < 0.6 else 0.0,
        "noise": 0.006 + 0.02 * u(),
        "grid": (2.2 + 1.8 * u(), 0.006 + 0.014 * u()) if u() < 0.2 else None,
        "collimate": u() < 0.15,
    }
    return an


def _side_tables(an: dict, lung_h, y_top, ycp_r, ycp_l, hw_r, hw_l):
    """1-D lookup tables (over canonical y) of the mediastinal / heart half-widths per side."""
    ty = np.linspace(-0.3, 1.4, 512)
    heart_w = an["ctr"] * (hw_r + hw_l)
    e_r = an["heart_right_frac"] * heart_w
    e_l = heart_w - e_r
    dome_r_y = ycp_r - an["dome_r"]
    dome_l_y = ycp_l - an["dome_l"]
    y_hw = min(dome_r_y, dome_l_y) - an["heart_lift"]  # widest row of the heart: above the domes
    y_ht = y_top + 0.36 * min(ycp_r - y_top, ycp_l - y_top)
    span = max(y_hw - y_ht, 0.05)

    def heart(e, taper):
        above = e * np.sqrt(np.clip(1 - ((y_hw - ty) / span) ** 2, 0, 1))
        below = e * (1 - taper * np.clip((ty - y_hw) / 0.25, 0, 1) ** 2)
        return np.where(ty < y_hw, above, below)

    med = an["med_w"]
    # upper mediastinum: widens slightly downward; aortic knob on the left
    up_r = med * (0.85 + 0.3 * np.clip((ty - y_top) / 0.3, 0, 1))
    y_knob = y_top + 0.17 * (ycp_l - y_top)
    up_l = up_r + an["knob"] * np.exp(-(((ty - y_knob) / 0.035) ** 2))
    # pulmonary trunk bump below the knob
    up_l = up_l + 0.4 * an["knob"] * np.exp(-(((ty - (y_knob + 0.07)) / 0.025) ** 2))
    m_r = np.maximum(up_r, heart(e_r, 0.05))
    m_l = np.maximum(up_l, heart(e_l, 0.35))
    geo = {"y_hw": y_hw, "y_ht": y_ht, "e_r": e_r, "e_l": e_l, "heart_w": heart_w}
    return ty, m_r.astype(np.float32), m_l.astype(np.float32), geo


def _vessel_trees(draw, pose, h, w, k, rng, hila, sides_hw, y_top, ycp, scale_amp=1.0):
    """Branching, tapering vessel markings from each hilum, drawn into a Pillow 'F' layer."""
    px = k * h  # pixels per canonical unit
    x0s, y0s, x1s, y1s, wds, vals = [], [], [], [], [], []
    rnd = rng.random(6000)
    ri = 0
    for (hx, hy), sign, hw in zip(hila, (-1, 1), sides_hw):
        n_primary = 9
        base = np.linspace(-1.45, 1.3, n_primary) + rng.normal(0, 0.08, n_primary)
        stack = []
        for a in base:
            dx, dy = sign * math.cos(a), math.sin(a)
            r0 = 0.012 + 0.02 * rng.random()
            stack.append((hx + r0 * dx, hy + r0 * dy, math.atan2(dy, dx), 0.035 + 0.025 * rng.random(),
                          0.0065, 0.06, 5))
        while stack:
            x0, y0, ang, ln, wd, val, depth = stack.pop()
            if ri > len(rnd) - 8:
                break
            bend = 0.6 * (rnd[ri] - 0.5)
            xm, ym = x0 + 0.5 * ln * math.cos(ang), y0 + 0.5 * ln * math.sin(ang)
            ang2 = ang + bend
            x1, y1 = xm + 0.5 * ln * math.cos(ang2), ym + 0.5 * ln * math.sin(ang2)
            for (p, q, r_, s_) in ((x0, y0, xm, ym), (xm, ym, x1, y1)):
                x0s.append(p); y0s.append(q); x1s.append(r_); y1s.append(s_)
                wds.append(wd); vals.append(val)
            if depth > 0:
                side = 1.0 if rnd[ri + 1] < 0.5 else -1.0
                spread = 0.45 + 0.4 * rnd[ri + 2]
                ri += 3
                stack.append((x1, y1, ang2 + 0.15 * (rnd[ri] - 0.5), ln * 0.82, wd * 0.78, val * 0.86, depth - 1))
                stack.append((x1, y1, ang2 + side * spread, ln * 0.62, wd * 0.62, val * 0.75, depth - 2))
            ri += 1
    c0, r0 = pose.to_px(x0s, y0s, h, w)
    c1, r1 = pose.to_px(x1s, y1s, h, w)
    widths = np.maximum(1, np.round(np.asarray(wds) * px)).astype(int).tolist()
    vals = (np.asarray(vals) * scale_amp).tolist()
    for a0, b0, a1, b1, wd, v in zip(c0.tolist(), r0.tolist(), c1.tolist(), r1.tolist(), widths, vals):
        draw.line([(a0, b0), (a1, b1)], fill=v, width=wd)


def _segments_layer(h, w, segs, values, widths):
    """Draw line segments / polylines (pixel coordinates) into a new 'F' layer."""
    im = Image.new("F", (w, h), 0.0)
    d = ImageDraw.Draw(im)
    for pts, v, wd in zip(segs, values, widths):
        d.line(pts, fill=float(v), width=max(1, round(wd)), joint="curve")
    return np.asarray(im)


# --------------------------------------------------------------------------------------------
# frontal (PA / AP)


def _box(pose: _Pose, h: int, w: int, x0: float, x1: float, y0: float, y1: float, pad: int = 3):
    """Row / column slices of the raster covering a canonical-frame box (None if off-image)."""
    c, r = pose.to_px([x0, x1, x0, x1], [y0, y0, y1, y1], h, w)
    c0 = max(math.floor(c.min()) - pad, 0)
    c1 = min(math.ceil(c.max()) + pad + 1, w)
    r0 = max(math.floor(r.min()) - pad, 0)
    r1 = min(math.ceil(r.max()) + pad + 1, h)
    if c0 >= c1 or r0 >= r1:
        return None
    return (slice(r0, r1), slice(c0, c1))


def _render_frontal(rng, f: dict, an: dict, h: int, w: int):
    Y, X = _grid(h, w)
    pose = _Pose(an["scale"], an["sx"], an["sy"], an["rot"])
    xb, yb = pose.canonical(Y, X)
    eps = 1.3 / (h * an["scale"])  # ~1.3 work pixels in canonical units
    f32 = np.float32

    hw_r = an["hw"] - an["asym"]
    hw_l = an["hw"] + an["asym"]
    hwmax = max(hw_r, hw_l)
    y_top = an["y_top"]
    ycp_r = y_top + an["lung_h"]
    ycp_l = ycp_r + an["cp_drop"]
    dome_r, dome_l = an["dome_r"], an["dome_l"]
    ms = 0.0  # mediastinal shift (+ = toward the patient's left)

    ate = f.get("atelectasis")
    if ate:
        if ate["side"] in ("right", "bilateral"):
            ycp_r -= 0.02
            dome_r += 0.012
        if ate["side"] in ("left", "bilateral"):
            ycp_l -= 0.02
            dome_l += 0.012
        ms += {"right": -0.012, "left": 0.012, "bilateral": 0.0}[ate["side"]]
    ptx = f.get("pneumothorax")
    if ptx and ptx["severity"] == "large":
        ms += 0.02 if ptx["side"] == "right" else -0.02
    ycp_max = max(ycp_r, ycp_l)
    ty, tab_r, tab_l, geo = _side_tables(an, an["lung_h"], y_top, ycp_r, ycp_l, hw_r, hw_l)
    y_car = y_top + 0.27 * an["lung_h"]
    cm = (hw_r + hw_l) / THORAX_CM
    hila = [(ms - 0.085 - 0.1 * geo["e_r"], y_top + 0.42 * an["lung_h"]),
            (ms + 0.085 + 0.05 * geo["e_l"], y_top + 0.44 * an["lung_h"])]

    # --- body soft tissue: thin chest wall outside the rib cage, full thickness inside it
    bw_fat = hwmax + 0.03 + an["fat"]
    bw_y = np.array([-0.3, y_top - 0.2, y_top - 0.06, y_top + 0.2, 1.4])
    bw_t = np.array([0.085, 0.09, bw_fat + 0.04, bw_fat, bw_fat - 0.01])
    bw = np.interp(yb, bw_y, bw_t).astype(f32)
    rx = xb / bw
    T = np.sqrt(np.clip(1.0 - rx * rx, 0.0, 1.0))
    cq = np.linspace(0.0, 1.0, 12)
    cw_y = np.concatenate([[-0.3, y_top - 0.22, y_top - 0.1], y_top + cq * (ycp_max - y_top), [1.4]])
    cw_lung = hwmax * (1.0 - 0.55 * (1.0 - cq) ** 2)
    cw_lung[: 4] = np.maximum(cw_lung[: 4], 0.75 * hwmax)
    cw_t = np.concatenate([[0.07, 0.07, 0.7 * hwmax], cw_lung, [hwmax]])
    cw = np.interp(yb, cw_y, cw_t).astype(f32)
    # chest wall: ribs and muscles seen tangentially make a bright band along the lungs that
    # fades toward the skin
    A = 0.45 * T + 0.55 * _ramp(cw + 0.03 - np.abs(xb), 0.06)
    A *= _ramp(bw - np.abs(xb), 2 * eps)

    # humeral heads at the upper corners
    for sgn in (-1, 1):
        hx, hy = sgn * (bw_fat + 0.05), y_top - 0.03
        bx = _box(pose, h, w, hx - 0.07, hx + 0.07, hy - 0.07, hy + 0.07)
        if bx is not None:
            dd = np.sqrt((xb[bx] - hx) ** 2 + ((yb[bx] - hy) * 0.9) ** 2)
            A[bx] += 0.2 * _ramp(0.06 - dd, 2 * eps)

    # --- the thorax box: lungs, ribs and findings are computed inside it only
    L = _box(pose, h, w, -hwmax - 0.06, hwmax + 0.06, y_top - 0.06, ycp_max + 0.04)
    xs, ys = xb[L], yb[L]
    right = xs < ms
    rightf = right.astype(f32)
    leftf = 1.0 - rightf
    ax = np.abs(xs)
    hw = np.where(right, f32(hw_r), f32(hw_l))
    ycp = np.where(right, f32(ycp_r), f32(ycp_l))
    u = ax / hw
    t = (ys - y_top) / (ycp - y_top)
    q = 1.0 - np.clip(t, 0.0, 1.0)
    d_lat = hw * (1.0 - 0.55 * q * q) - ax
    d_ap = ys - (y_top + 5.0 * (ax - 0.5 * hw) ** 2)
    tu = np.linspace(0.0, 1.6, 161)
    up = an["dome_peak"]
    bump = np.where(tu >= up, 1 - ((tu - up) / (1 - up)) ** 2, 1 - 0.3 * ((up - tu) / up) ** 2)
    yd = ycp - np.where(right, f32(dome_r), f32(dome_l)) * np.interp(u, tu, bump).astype(f32)
    d_dia = yd - ys
    rel = xs - ms
    m = np.where(right, np.interp(ys, ty, tab_r), np.interp(ys, ty, tab_l)).astype(f32)
    d_med = np.abs(rel) - m
    d_in = np.minimum(np.minimum(d_lat, d_med), np.minimum(d_ap, d_dia))
    lung = _ramp(d_in, eps)

    O = np.zeros_like(lung)  # fraction of lung air replaced by fluid / tissue
    Aadd = np.zeros_like(lung)  # extra attenuation in the thorax box
    fine = _rolled(_texture(h, w, "fine"), rng)[L]
    blob = _rolled(_texture(h, w, "blob"), rng)[L]
    lung_vis = lung  # where lung markings are drawn

    eff = f.get("pleural_effusion")
    if eff:
        for side in ("right", "left"):
            if eff["side"] not in (side, "bilateral"):
                continue
            sm = rightf if side == "right" else leftf
            ycs = ycp_r if side == "right" else ycp_l
            lh = ycs - y_top
            hgt = eff["height"] * (0.85 if eff["side"] == "bilateral" else 1.0)
            y_wall = ycs - hgt * lh
            rise = 0.45 * hgt * lh + 0.03
            uu = np.minimum(u, 1.0)
            depth_f = ys - ((y_wall + rise) - rise * uu * uu * np.sqrt(uu))
            fill = _ramp(depth_f, 0.018) * (0.8 + 0.2 * np.clip(depth_f * 10.0, 0.0, 1.0)) * sm
            O = np.maximum(O, 0.97 * fill)
            Aadd += 0.12 * fill * _ramp(np.minimum(np.minimum(d_lat, d_med), d_dia + 0.03) + 0.01, 0.02)

    ed = f.get("edema")
    if ed:
        si = {"mild": 0, "moderate": 1, "severe": 2}[ed["severity"]]
        amp = (0.42, 0.56, 0.72)[si]
        sxg = 0.12 + 0.05 * si
        yh = y_top + 0.45 * an["lung_h"]
        g = np.exp(-(((np.abs(rel) - 0.05) * (1.0 / sxg)) ** 2 + ((ys - yh) * (1.0 / (0.17 + 0.04 * si))) ** 2))
        patch = np.clip(0.8 + (0.2 + 0.15 * si) * blob, 0.0, 1.4)
        O = np.maximum(O, amp * (0.8 * g + 0.3 * np.clip(t, 0, 1)) * patch)

    con = f.get("consolidation")
    if con:
        lobe = con["lobe"]
        side_r = lobe in ("RUL", "RML", "RLL")
        sm = rightf if side_r else leftf
        if lobe in ("RUL", "LUL"):
            cut = 0.42 if lobe == "RUL" else 0.46
            region = _ramp(cut - t, 0.012 if lobe == "RUL" else 0.1)
        elif lobe in ("RML", "lingula"):
            region = _ramp(t - 0.46, 0.012 if lobe == "RML" else 0.08) * _ramp(0.62 - u, 0.14)
            region = region * _ramp(0.95 - t, 0.08)
        else:
            region = _ramp(t - 0.6, 0.14) * _ramp(u - 0.12, 0.1)
        region = region * np.clip(0.95 + 0.4 * blob, 0.0, 1.0) * sm
        dens = 0.9 + 0.07 * rng.random()
        # air bronchograms: dark branching tubes inside the opacity
        segs, vals, wds = [], [], []
        hx, hy = hila[0] if side_r else hila[1]
        sgn = -1 if side_r else 1
        tgt_t = {"RUL": 0.25, "LUL": 0.25, "RML": 0.7, "lingula": 0.68, "RLL": 0.82, "LLL": 0.82}[lobe]
        base_ang = math.atan2(y_top + tgt_t * an["lung_h"] - hy, sgn * 0.15)
        for _ in range(5):
            a = base_ang + rng.normal(0, 0.35)
            ln = 0.08 + 0.08 * rng.random()
            x0, y0 = hx + sgn * 0.03, hy + 0.02 * math.sin(a)
            pts = [(x0, y0)]
            for _ in range(3):
                a += rng.normal(0, 0.2)
                x0, y0 = x0 + ln / 3 * math.cos(a), y0 + ln / 3 * math.sin(a)
                pts.append((x0, y0))
            c, r = pose.to_px([p[0] for p in pts], [p[1] for p in pts], h, w)
            segs.append(list(zip(c.tolist(), r.tolist())))
            vals.append(1.0)
            wds.append(0.006 * an["scale"] * h)
        air = _segments_layer(h, w, segs, vals, wds)[L]
        O = np.maximum(O, dens * region * (1.0 - 0.5 * air))

    if ate:
        segs, vals, wds = [], [], []
        for side in ("right", "left"):
            if ate["side"] not in (side, "bilateral"):
                continue
            sgn = -1 if side == "right" else 1
            hws = hw_r if side == "right" else hw_l
            ycs = ycp_r if side == "right" else ycp_l
            for _ in range(int(rng.integers(1, 4))):
                tc = 0.62 + 0.22 * rng.random()
                uc = 0.4 + 0.35 * rng.random()
                ln = 0.07 + 0.08 * rng.random()
                ang = math.radians(rng.uniform(-8, 18))
                cx, cy = sgn * uc * hws + ms * 0.5, y_top + tc * (ycs - y_top)
                dx, dy = 0.5 * ln * math.cos(ang), 0.5 * ln * math.sin(ang)
                c, r = pose.to_px([cx - sgn * dx, cx + sgn * dx], [cy + dy, cy - dy], h, w)
                segs.append([(float(c[0]), float(r[0])), (float(c[1]), float(r[1]))])
                vals.append(0.85)
                wds.append((0.009 + 0.006 * rng.random()) * an["scale"] * h)
            if ate["kind"] == "basilar":
                sm = rightf if side == "right" else leftf
                O = np.maximum(O, 0.5 * _ramp(t - 0.8, 0.12) * np.clip(0.6 + 0.5 * blob, 0, 1) * sm)
        O = np.maximum(O, _segments_layer(h, w, segs, vals, wds)[L])

    les = f.get("lung_lesion")
    if les:
        for Ls in les["lesions"]:
            right_side = Ls["side"] == "right"
            hws = hw_r if right_side else hw_l
            ycs = ycp_r if right_side else ycp_l
            yc = y_top + Ls["t"] * (ycs - y_top)
            mm = float(np.interp(yc, ty, tab_r if right_side else tab_l))
            lat = hws * (1 - 0.55 * (1 - Ls["t"]) ** 2)
            xc = (ms - mm - Ls["u"] * (lat - mm)) if right_side else (ms + mm + Ls["u"] * (lat - mm))
            rad = 0.5 * Ls["size_cm"] * cm
            dd = np.sqrt((xs - xc) ** 2 + (ys - yc) ** 2)
            lob = 1.0 + (0.12 if Ls["size_cm"] >= 3 else 0.04) * blob
            O = np.maximum(O, 0.95 * _ramp(rad * lob - dd, 2.0 * eps))

    if ptx:
        right_side = ptx["side"] == "right"
        sm = rightf if right_side else leftf
        hws = hw_r if right_side else hw_l
        D = ptx["depth"] * hws
        if ptx["severity"] == "large":
            coll = D * (0.75 + 0.25 * q)
        else:
            coll = D * (0.3 + 0.7 * np.clip(1.0 - t * (1.0 / 0.85), 0.0, 1.0))
        d_c = np.minimum(d_lat - coll, d_ap - 0.8 * D)
        d_c = np.minimum(d_c, np.minimum(d_med, d_dia))
        lung_c = _ramp(d_c, eps)
        P = np.clip(lung - lung_c, 0.0, 1.0) * sm  # the pleural space, full of air
        lung_vis = lung * (1.0 - P)
        Aadd -= 0.14 * P
        O = np.maximum(O, (0.12 + 0.15 * ptx["depth"]) * lung_c * sm)
        Aadd += 0.12 * np.clip(1.0 - np.abs(d_c) * (1.0 / (1.1 * eps)), 0.0, 1.0) * lung * sm

    # --- lungs: air, markings, texture
    depth = 0.7 + 0.3 * np.clip(np.minimum(d_lat, d_med) * 16.0, 0.0, 1.0)
    np.clip(O, 0.0, 1.0, out=O)
    vimg = Image.new("F", (w, h), 0.0)
    vd = ImageDraw.Draw(vimg)
    vrng = np.random.default_rng(an["vessel_seed"])
    _vessel_trees(vd, pose, h, w, an["scale"], vrng, hila, (hw_r, hw_l), y_top, ycp_r,
                  scale_amp=1.25 if ed else 1.0)
    if ed:  # Kerley B lines at the lateral lung bases
        n = {"mild": 5, "moderate": 8, "severe": 11}[ed["severity"]]
        for sgn, hws, ycs in ((-1, hw_r, ycp_r), (1, hw_l, ycp_l)):
            for _ in range(n):
                yk = ycs - (0.02 + 0.13 * rng.random()) * (ycs - y_top)
                tk = (yk - y_top) / (ycs - y_top)
                xw = hws * (1 - 0.55 * (1 - tk) ** 2) - 0.004
                ln = 0.018 + 0.02 * rng.random()
                c, r = pose.to_px([sgn * xw, sgn * (xw - ln)], [yk, yk], h, w)
                vd.line([(float(c[0]), float(r[0])), (float(c[1]), float(r[1]))], fill=0.16,
                        width=max(1, round(0.0035 * an["scale"] * h)))
    vessels = np.asarray(vimg)[L]
    for (hx, hy) in hila:
        vessels = vessels + 0.1 * np.exp(-((xs - hx) ** 2 + (ys - hy) ** 2) * (1.0 / (2 * 0.026**2)))
    marks = lung_vis * (1.0 - 0.85 * O) * (vessels + 0.022 * fine)
    Aadd -= 0.74 * lung * depth * (1.0 - O)
    Aadd += marks

    # --- ribs (inside the thorax box)
    uu = np.minimum(u, 1.25)
    chest = _ramp(d_lat + 0.03, 0.012) * _ramp(d_ap + 0.035, 0.015) * _ramp(ycp + 0.03 - ys, 0.01)
    sp = an["rib_sp"]
    # posterior ribs arch from the spine and curve down along the lateral chest wall; the
    # spacing widens toward the base
    yy = ys - (-0.03 * uu + 0.15 * uu * uu) - y_top + 0.015 + an["rib_phase"] * sp
    phi = yy / (sp * (1.0 + 0.5 * np.clip(yy, 0.0, 0.7)))
    fr = phi - np.floor(phi)
    wr = 0.4
    epf = 1.6 * eps / sp
    band = np.clip((wr * 0.5 - np.abs(fr - wr * 0.5)) * (1.0 / epf) + 0.5, 0.0, 1.0)
    band *= 0.7 + 0.3 * ((fr - wr * 0.5) * (2.0 / wr)) ** 2  # brighter cortical edges
    post = band * _ramp(uu - 0.1, 0.08) * ((phi > -0.2) & (phi < 10.5))
    # anterior ribs: fainter, running down and medially from the lateral wall
    sp2 = 1.5 * sp
    phi2 = (ys + 0.2 * uu - 0.05 * uu * uu - y_top - 0.06) * (1.0 / sp2)
    fr2 = phi2 - np.floor(phi2)
    band2 = np.clip((0.16 - np.abs(fr2 - 0.16)) * (1.5 / epf) + 0.5, 0.0, 1.0)
    ant = band2 * _ramp(uu - 0.4, 0.2) * ((phi2 > 0.0) & (phi2 < 6.2))
    # ribs project over the mediastinum and abdomen too, but show mostly against the lungs
    Aadd += chest * (0.4 + 0.6 * lung) * (0.11 * post + 0.055 * ant)
    A[L] += Aadd

    # clavicles
    C = _box(pose, h, w, -hwmax - 0.12, hwmax + 0.12, y_top - 0.12, y_top + 0.1)
    if C is not None:
        cu = np.minimum(np.abs(xb[C]) * (1.0 / an["hw"]), 1.3)
        cl_off = -0.04 if an["view"] == "AP" else 0.0
        ycl = y_top + 0.03 + cl_off - 0.075 * (cu - 0.1) + 0.035 * (cu - 0.1) ** 2 + 0.012 * np.sin(cu * 5.0)
        dv = np.abs(yb[C] - ycl)
        A[C] += 0.17 * _ramp(0.011 - dv, 1.5 * eps) * _ramp(cu - 0.06, 0.03) * _ramp(1.25 - cu, 0.05)
    # scapulae: lateral upper zones, over the lungs on AP films
    S = _box(pose, h, w, -hwmax - 0.05, hwmax + 0.05, y_top - 0.1, y_top + 0.4)
    if S is not None:
        su = np.abs(xb[S]) * (1.0 / an["hw"])
        sy_ = yb[S]
        inner = (0.62 if an["view"] == "AP" else 0.93) + 0.25 * np.clip((sy_ - y_top) / 0.35, 0, 1)
        A[S] += 0.07 * _ramp(su - inner, 0.02) * _ramp(y_top + 0.36 - sy_, 0.04) * _ramp(sy_ - y_top + 0.1, 0.02)

    # spine with pedicles and disc spaces (faint through the mediastinum); trachea
    P_ = _box(pose, h, w, -0.05, 0.05, -0.2, 1.2)
    if P_ is not None:
        vx = np.abs(xb[P_]) * (1.0 / 0.03)
        v = yb[P_] * (1.0 / 0.047)
        disc = np.clip(1.0 - np.abs(v - np.floor(v) - 0.5) * 8.0, 0.0, 1.0)
        ped = np.exp(-((vx - 0.75) ** 2) * 18.0) * (0.5 + 0.5 * np.cos(v * 2 * np.pi))
        A[P_] += 0.09 * _ramp(1.0 - vx, 0.08) * (1.0 - 0.4 * disc) + 0.04 * ped
    tx = 0.7 * ms
    Tb = _box(pose, h, w, tx - 0.03, tx + 0.03, -0.2, y_car + 0.02)
    if Tb is not None:
        A[Tb] -= 0.17 * _ramp(0.016 - np.abs(xb[Tb] - tx), 1.5 * eps) * _ramp(y_car - yb[Tb], 0.012)

    # breasts, gastric bubble
    if an["breast"] > 0:
        by = ycp_r - 0.05
        B = _box(pose, h, w, -hwmax - 0.08, hwmax + 0.08, by - 0.14, by + 0.14)
        if B is not None:
            bx = 0.58 * an["hw"]
            e = ((np.abs(xb[B]) - bx) * (1 / 0.19)) ** 2 + ((yb[B] - by) * (1 / 0.13)) ** 2
            A[B] += an["breast"] * np.clip((1.0 - e) * 3.0, 0.0, 1.0)
    if an["bubble"]:
        gx, gy = ms + 0.5 * hw_l, ycp_l - dome_l + 0.055
        G = _box(pose, h, w, gx - 0.06, gx + 0.06, gy - 0.04, gy + 0.04)
        if G is not None:
            e = ((xb[G] - gx) * (1 / 0.05)) ** 2 + ((yb[G] - gy) * (1 / 0.028)) ** 2
            A[G] -= 0.2 * np.clip((1.0 - e) * 4.0, 0.0, 1.0) * _ramp(yb[G] - (ycp_l - dome_l) - 0.01, 0.01)

    info = {
        "ctr": an["ctr"],
        "thoracic_width": hw_r + hw_l,
        "heart_width": geo["heart_w"],
        "heart_row": geo["y_hw"],
        "mediastinal_shift": ms,
        "y_top": y_top,
        "ycp": (ycp_r, ycp_l),
        "carina_y": y_car,
        "trachea_x": tx,
        "hw": (hw_r, hw_l),
        "dome_y": (ycp_r - dome_r, ycp_l - dome_l),
        "e_r": geo["e_r"],
        "e_l": geo["e_l"],
    }
    return A, pose, info


# --------------------------------------------------------------------------------------------
# lateral


def _render_lateral(rng, f: dict, an: dict, h: int, w: int):
    """Left lateral view: anterior to the image left, spine to the right."""
    Y, X = _grid(h, w)
    pose = _Pose(an["scale"], an["sx"], an["sy"], an["rot"])
    xb, yb = pose.canonical(Y, X)
    eps = 1.3 / (h * an["scale"])
    y_top = an["y_top"]
    lh = an["lung_h"]
    ant_x = -0.23 - 0.02 * an["fat"]
    post_x = 0.15
    vb0 = post_x + 0.02

    # body: anterior chest wall and back
    fy = [-0.3, y_top - 0.1, y_top + 0.15, 1.4]
    fx = [-0.1, -0.16, ant_x - 0.04 - an["fat"], ant_x - 0.07 - an["fat"]]
    by_ = [-0.3, y_top - 0.1, y_top + 0.2, 1.4]
    bx_ = [0.14, 0.22, 0.3 + an["fat"] * 0.5, 0.33 + an["fat"]]
    front = np.interp(yb, fy, fx).astype(np.float32)
    back = np.interp(yb, by_, bx_).astype(np.float32)
    mid = 0.5 * (front + back)
    half = 0.5 * (back - front)
    r = (xb - mid) / half
    T = np.sqrt(np.clip(1 - r * r, 0, 1))
    A = (0.45 + 0.55 * T) * _ramp(half - np.abs(xb - mid), 2 * eps)

    # everything else lives in the thorax box
    LB = _box(pose, h, w, ant_x - 0.1, vb0 + 0.16, y_top - 0.06, y_top + 1.15 * lh)
    xs, ys = xb[LB], yb[LB]
    fine = _rolled(_texture(h, w, "fine"), rng)[LB]
    blob = _rolled(_texture(h, w, "blob"), rng)[LB]
    s = np.clip((xs - ant_x) * (1.0 / (post_x - ant_x)), 0.0, 1.2)
    y_ant_d = y_top + 0.86 * lh
    y_post_d = y_top + 1.1 * lh
    base_d = y_ant_d + (y_post_d - y_ant_d) * s ** 1.6 - 0.05 * np.sin(np.pi * np.minimum(s, 1.0))
    d_ant = xs - (ant_x + 0.025 + 0.07 * ((ys - y_top - 0.45 * lh) * (1.0 / (0.6 * lh))) ** 2)
    d_post = post_x + 0.03 * np.sin(np.clip((ys - y_top) * (1.0 / lh), 0, 1) * np.pi) - xs
    d_ap = ys - (y_top + 1.3 * (xs - 0.06) ** 2)
    core = np.minimum(np.minimum(d_ant, d_post), d_ap)
    lung = 0.5 * _ramp(np.minimum(core, base_d - ys), eps) + 0.5 * _ramp(np.minimum(core, base_d + 0.02 - ys), eps)
    t = np.clip((ys - y_top) * (1.0 / lh), 0.0, 1.3)

    # heart: anterior-inferior ovoid, enlarges posteriorly with the CTR
    g = an["ctr"] / 0.42
    hcx, hcy = ant_x + 0.13 + 0.06 * (g - 1), y_top + 0.78 * lh
    hrx, hry = 0.15 * g, 0.16 * (0.8 + 0.2 * g)
    e = ((xs - hcx) * (1.0 / hrx)) ** 2 + ((ys - hcy) * (1.0 / hry)) ** 2
    heart = _ramp(1.0 - e, 0.8)

    O = 0.45 * heart
    lung_vis = lung * (1 - heart)
    eff = f.get("pleural_effusion")
    if eff:
        amt = 1.0 if eff["side"] == "bilateral" else 0.6
        hgt = eff["height"]
        y_f = base_d - (0.08 + 0.6 * hgt) * lh * (0.3 + 0.7 * np.minimum(s, 1.0) ** 2)
        O = np.maximum(O, amt * 0.95 * _ramp(ys - y_f, 0.02))
    ed = f.get("edema")
    if ed:
        si = {"mild": 0, "moderate": 1, "severe": 2}[ed["severity"]]
        gh = np.exp(-(((xs - 0.02) * (1.0 / (0.13 + 0.04 * si))) ** 2 + ((ys - (y_top + 0.45 * lh)) * (1.0 / 0.17)) ** 2))
        O = np.maximum(O, (0.3, 0.45, 0.6)[si] * (0.85 * gh + 0.25 * t) * np.clip(0.85 + 0.3 * blob, 0, 1.3))
    con = f.get("consolidation")
    if con:
        lobe = con["lobe"]
        if lobe in ("RUL", "LUL"):
            reg = _ramp(0.45 - t, 0.08) * _ramp(0.1 - xs, 0.1)
        elif lobe in ("RML", "lingula"):
            reg = _ramp(t - 0.5, 0.05) * _ramp(0.0 - xs, 0.06) * _ramp(0.95 - t, 0.05)
        else:
            reg = _ramp(t - 0.55, 0.1) * _ramp(xs - 0.0, 0.08)
        O = np.maximum(O, 0.65 * reg * np.clip(0.9 + 0.45 * blob, 0, 1))
    ate = f.get("atelectasis")
    if ate:
        amt = 0.9 if ate["side"] == "bilateral" else 0.6
        segs, wds = [], []
        for _ in range(int(rng.integers(1, 3))):
            cy = y_top + (0.65 + 0.2 * rng.random()) * lh
            cx = -0.05 + 0.2 * rng.random()
            ln = 0.08 + 0.08 * rng.random()
            c, rr = pose.to_px([cx - ln / 2, cx + ln / 2], [cy - 0.02, cy + 0.02], h, w)
            segs.append([(float(c[0]), float(rr[0])), (float(c[1]), float(rr[1]))])
            wds.append(0.012 * an["scale"] * h)
        O = np.maximum(O, amt * _segments_layer(h, w, segs, [1.0] * len(segs), wds)[LB])
    les = f.get("lung_lesion")
    if les:
        cm = 2 * an["hw"] / THORAX_CM
        lrng = np.random.default_rng(int(1000 * sum(Ls["u"] + Ls["t"] for Ls in les["lesions"])))
        for Ls in les["lesions"]:
            cy = y_top + Ls["t"] * lh
            cx = -0.12 + 0.3 * lrng.random()
            dd = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
            O = np.maximum(O, 0.75 * _ramp(0.5 * Ls["size_cm"] * cm - dd, 2 * eps))
    ptx = f.get("pneumothorax")
    Aadd = -0.78 * lung * (1.0 - np.clip(O, 0, 1))
    if ptx:
        D = ptx["depth"] * 0.25
        d_c = ys - (y_top + D + 1.3 * (xs - 0.06) ** 2)
        P = np.clip(lung - _ramp(np.minimum(d_c, core), eps), 0, 1)
        lung_vis = lung_vis * (1 - P)
        Aadd -= 0.08 * P - 0.07 * np.clip(1 - np.abs(d_c) * (1.0 / (1.1 * eps)), 0, 1) * lung

    vimg = Image.new("F", (w, h), 0.0)
    vd = ImageDraw.Draw(vimg)
    vrng = np.random.default_rng(an["vessel_seed"])
    hil = (0.03, y_top + 0.42 * lh)
    _vessel_trees(vd, pose, h, w, an["scale"], vrng, [hil, (hil[0] - 0.02, hil[1] + 0.02)], (0.2, 0.2), y_top,
                  y_top + lh, scale_amp=0.7)
    vessels = np.asarray(vimg)[LB] + 0.13 * np.exp(-((xs - hil[0]) ** 2 + (ys - hil[1]) ** 2) * (1.0 / (2 * 0.032**2)))
    Aadd += lung_vis * (1.0 - 0.8 * np.clip(O, 0, 1)) * (vessels + 0.015 * fine)

    # ribs oblique
    phi = (ys + 0.35 * xs) * (1.0 / (an["rib_sp"] * 1.1))
    fr = phi - np.floor(phi)
    Aadd += 0.05 * np.clip(1 - np.abs(fr - 0.2) * 9, 0, 1) * _ramp(xs, 0.1) * _ramp(d_post + 0.05, 0.05)
    if an["breast"] > 0:
        e2 = ((xs - (ant_x - 0.04)) * (1.0 / 0.1)) ** 2 + ((ys - (y_top + 0.78 * lh)) * (1.0 / 0.16)) ** 2
        Aadd += 0.5 * an["breast"] * np.clip(1 - e2, 0, 1)
    A[LB] += Aadd

    # spine: vertebral bodies with disc spaces, posterior elements; the whole image height
    VB = _box(pose, h, w, vb0 - 0.02, vb0 + 0.17, -0.3, 1.3)
    if VB is not None:
        vx = (xb[VB] - vb0) * (1.0 / 0.075)
        v = yb[VB] * (1.0 / 0.05)
        disc = np.clip(1.0 - np.abs(v - np.floor(v) - 0.5) * 7.0, 0, 1)
        vert = _ramp(vx, 0.15) * _ramp(1 - vx, 0.15) * (1 - 0.3 * disc)
        A[VB] += 0.12 * vert * (1.05 - 0.35 * np.clip((yb[VB] - y_top) * (1.0 / lh), 0, 1.2))
        A[VB] += 0.06 * _ramp(vx - 1.1, 0.2) * _ramp(1.9 - vx, 0.3)

    # sternum, trachea
    y_car = y_top + 0.3 * lh
    SB = _box(pose, h, w, ant_x - 0.12, ant_x + 0.05, y_top - 0.03, y_top + 0.6 * lh)
    if SB is not None:
        fs = np.interp(yb[SB], fy, fx).astype(np.float32)
        st = _ramp(0.012 - np.abs(xb[SB] - (fs + 0.035)), 1.5 * eps) * _ramp(yb[SB] - y_top + 0.02, 0.01)
        A[SB] += 0.18 * st * _ramp(y_top + 0.55 * lh - yb[SB], 0.02)
    TB = _box(pose, h, w, -0.08, 0.1, -0.2, y_car + 0.02)
    if TB is not None:
        tr_x = 0.03 + 0.08 * np.clip(yb[TB] * (1.0 / y_car), 0, 1) - 0.04
        A[TB] -= 0.12 * _ramp(0.014 - np.abs(xb[TB] - tr_x), 1.5 * eps) * _ramp(y_car - yb[TB], 0.015)
    info = {
        "ctr": an["ctr"],
        "y_top": y_top,
        "carina_y": y_car,
        "trachea_x": 0.07,
        "lat_heart": (hcx, hcy, hrx, hry),
        "lung_h": lh,
        "ant_x": ant_x,
    }
    return A, pose, info


# --------------------------------------------------------------------------------------------
# support devices (full resolution)


def _devices_layer(f: dict, an: dict, info: dict, pose: _Pose, H: int, W: int, rng) -> np.ndarray | None:
    sd = f.get("support_devices")
    if not sd:
        return None
    im = Image.new("F", (W, H), 0.0)
    d = ImageDraw.Draw(im)
    px = an["scale"] * H

    def line(pts, val, width, smooth=True):
        pts = _catmull_rom(pts) if smooth and len(pts) > 2 else pts
        c, r = pose.to_px([p[0] for p in pts], [p[1] for p in pts], H, W)
        d.line(list(zip(c.tolist(), r.tolist())), fill=float(val), width=max(1, round(width * px)),
               joint="curve")

    lateral = an["view"] == "LL"
    y_top = info["y_top"]
    ycar = info["carina_y"]
    tx = info["trachea_x"]
    cm = 2 * an["hw"] / THORAX_CM
    if lateral:
        for dev in sd["devices"]:
            if dev == "ett":
                tip = ycar - sd.get("ett_cm", 4.0) * cm
                line([(tx - 0.1, -0.1), (tx - 0.04, tip * 0.5), (tx - 0.01, tip)], 0.6, 0.006)
            elif dev == "ngt":
                line([(tx - 0.05, -0.1), (tx + 0.04, ycar), (0.12, y_top + 0.85 * info["lung_h"]),
                      (0.05, y_top + 1.15 * info["lung_h"])], 0.55, 0.005)
            elif dev in ("cvc_rij", "cvc_lsc", "picc"):
                line([(-0.02, -0.05), (0.0, y_top + 0.05), (-0.02, ycar + 0.08)], 0.5, 0.005)
            elif dev == "pacemaker":
                gx, gy = info["ant_x"] - 0.02, y_top + 0.06
                c, r = pose.to_px([gx - 0.015, gx + 0.015], [gy - 0.045, gy + 0.045], H, W)
                d.rectangle([float(min(c)), float(min(r)), float(max(c)), float(max(r))], fill=0.95)
                hcx, hcy, _hrx, _hry = info["lat_heart"]
                line([(gx, gy), (0.0, y_top + 0.1), (hcx + 0.02, hcy - 0.05), (hcx - 0.06, hcy + 0.05)], 0.8, 0.004)
        return np.asarray(im)

    ms = info["mediastinal_shift"]
    hw_r, hw_l = info["hw"]
    _dome_r, dome_l = info["dome_y"]
    for dev in sd["devices"]:
        if dev == "ett":
            tip = ycar - sd.get("ett_cm", 4.0) * cm
            for off in (-0.0085, 0.0085):
                line([(tx + off, -0.2), (tx + off, tip)], 0.22, 0.0022, smooth=False)
            line([(tx - 0.004, -0.2), (tx - 0.004, tip - 0.002)], 0.6, 0.0045, smooth=False)
        elif dev == "ngt":
            line([(tx + 0.012, -0.2), (0.012 + 0.5 * ms, ycar), (0.025, dome_l - 0.01),
                  (0.35 * hw_l, dome_l + 0.06), (0.5 * hw_l, dome_l + 0.09)], 0.55, 0.0045)
        elif dev == "cvc_rij":
            line([(-0.16, -0.1), (-0.08, y_top + 0.03), (ms - 0.045, ycar + 0.01), (ms - 0.04, ycar + 0.085)],
                 0.55, 0.0045)
        elif dev == "cvc_lsc":
            line([(hw_l + 0.06, y_top + 0.0), (0.55 * hw_l, y_top + 0.045), (0.06, y_top + 0.07),
                  (ms - 0.03, ycar + 0.02), (ms - 0.038, ycar + 0.09)], 0.55, 0.0045)
        elif dev == "picc":
            line([(-hw_r - 0.14, y_top + 0.14), (-hw_r + 0.02, y_top + 0.045), (-0.1, y_top + 0.05),
                  (ms - 0.045, ycar + 0.02), (ms - 0.04, ycar + 0.08)], 0.5, 0.0032)
        elif dev == "pacemaker":
            gx, gy = 0.58 * hw_l, y_top + 0.06 + 0.02 * rng.random()
            gw, gh = 0.05, 0.035
            corners = [(gx - gw, gy - gh), (gx + gw, gy - gh), (gx + gw, gy + gh), (gx - gw, gy + gh)]
            c, r = pose.to_px([p[0] for p in corners], [p[1] for p in corners], H, W)
            d.polygon(list(zip(c.tolist(), r.tolist())), fill=0.93)
            inner = [(gx - gw * 0.7, gy - gh * 0.6), (gx + gw * 0.7, gy - gh * 0.6), (gx + gw * 0.7, gy + gh * 0.6),
                     (gx - gw * 0.7, gy + gh * 0.6)]
            c, r = pose.to_px([p[0] for p in inner], [p[1] for p in inner], H, W)
            d.polygon(list(zip(c.tolist(), r.tolist())), fill=0.82)
            y_hw = info["heart_row"]
            line([(gx - gw, gy - 0.01), (0.08, y_top + 0.02), (ms - 0.01, ycar), (ms - 0.04, y_hw - 0.07),
                  (ms - 0.02, y_hw - 0.1)], 0.8, 0.0035)
            line([(gx - gw, gy + 0.01), (0.07, y_top + 0.035), (ms - 0.02, ycar + 0.02), (ms - 0.01, y_hw - 0.02),
                  (ms + 0.1, y_hw + 0.03)], 0.8, 0.0035)
    return np.asarray(im)


# --------------------------------------------------------------------------------------------
# markers


def _stamp_text(img: np.ndarray, text: str, x: int, y: int, height: int, value: float, boxed: bool) -> None:
    font = _font(max(6, height))
    l, t, r, b = font.getbbox(text)
    pad = max(1, height // 6)
    pw, ph = (r - l) + 2 * pad, (b - t) + 2 * pad
    H, W = img.shape
    x = int(min(max(x, 0), max(W - pw, 0)))
    y = int(min(max(y, 0), max(H - ph, 0)))
    pw, ph = min(pw, W - x), min(ph, H - y)
    if pw <= 0 or ph <= 0:
        return
    patch = Image.new("L", (pw, ph), 0)
    ImageDraw.Draw(patch).text((pad - l, pad - t), text, fill=255, font=font)
    glyph = np.asarray(patch, dtype=np.float32) * (1.0 / 255.0)
    region = img[y:y + ph, x:x + pw]
    if boxed:
        region[...] = value * (1.0 - glyph) + 0.05 * glyph
    else:
        np.maximum(region, value * glyph, out=region)


def _markers(img: np.ndarray, view: str, rng) -> list[str]:
    H, W = img.shape
    out = []
    hgt = int(H * (0.035 + 0.02 * rng.random()))
    boxed = rng.random() < 0.3
    mx = int(W * (0.03 + 0.05 * rng.random()))
    my = int(H * (0.03 + 0.06 * rng.random()))
    if view == "LL":
        _stamp_text(img, "L", mx, my, hgt, 0.97, boxed)
        out.append("L")
    else:
        choice = rng.random()
        if choice < 0.45:
            _stamp_text(img, "L", W - mx - hgt, my, hgt, 0.97, boxed)
            out.append("L")
        elif choice < 0.85:
            _stamp_text(img, "R", mx, my, hgt, 0.97, boxed)
            out.append("R")
        if view == "AP" and rng.random() < 0.7:
            words = ["PORTABLE", "AP"] + (["SUPINE"] if rng.random() < 0.4 else ["UPRIGHT"])
            text = " ".join(words[: 1 + int(rng.integers(3))])
            _stamp_text(img, text, int(W * 0.55), int(H * 0.04), int(hgt * 0.6), 0.9, False)
            out.append(text)
    return out


# --------------------------------------------------------------------------------------------
# public entry point


def render_study_image(
    rng: np.random.Generator,
    findings: dict | None = None,
    size: int = 1024,
    view: str = "PA",
    *,
    aspect: float | None = None,
    sex: str | None = None,
    ctr: float | None = None,
    anatomy: dict | None = None,
    clean: bool = False,
) -> tuple[np.ndarray, dict]:
    """Render one chest radiograph phantom.

    Parameters
    ----------
    rng : numpy Generator; every random draw of the image comes from it (deterministic).
    findings : dict of finding -> spec (see :mod:`curator.synth.findings`); ``True`` values get
        their details drawn from ``rng``. ``None`` or ``{}`` renders a normal chest.
    size : image height in pixels (rows); the width is ``round(size * aspect)``.
    view : ``"PA"``, ``"AP"`` or ``"LL"`` (left lateral).
    aspect : width / height; drawn (square or portrait detector) when ``None``.
    sex : ``"M"``/``"F"`` (breast shadows); drawn when ``None``.
    ctr : cardiothoracic ratio; from the cardiomegaly spec or a normal value when ``None``.
    anatomy : a dict from :func:`sample_anatomy` to reuse; drawn when ``None``.
    clean : no noise, grid, edge enhancement, collimation, markers (for measurements).

    Returns
    -------
    image : float32 array (size x width) in [0, 1], MONOCHROME2 (dense = bright).
    info : what was drawn: view, sex, ctr, pose, and pixel geometry for frontal views
        (``heart_width_px``, ``thoracic_width_px``, ``heart_row_px``), markers, findings.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    f = complete_findings(rng, findings)
    if sex is None:
        sex = "F" if rng.random() < 0.5 else "M"
    if ctr is None:
        ctr = draw_ctr(rng, f)
    if aspect is None:
        aspect = float(rng.choice([1.0, 1.0, 0.82, 0.86]))
    an = dict(anatomy) if anatomy is not None else sample_anatomy(rng, view, sex, ctr)
    an["view"], an["ctr"] = view, float(ctr)
    H = int(size)
    W = max(8, round(H * aspect / 2.0) * 2)
    h = H if H <= 400 else max(400, (H * 3) // 8)  # work resolution of the smooth anatomy
    w = max(4, round(W * h / H))

    if view == "LL":
        A, pose, geo = _render_lateral(rng, f, an, h, w)
    else:
        A, pose, geo = _render_frontal(rng, f, an, h, w)

    mu = an["mu"]
    I = 1.0 - np.exp(-mu * np.maximum(A, 0.0))
    I *= 1.0 / (1.0 - math.exp(-mu * 1.5))
    lo, hi = an["lo"], an["hi"]
    I = np.clip((I - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    if an["gamma"] != 1.0:
        I = I ** an["gamma"]
    img = Image.fromarray(I.astype(np.float32, copy=False), mode="F")
    if not clean and an["edge"] > 0:
        small = img.resize((max(2, w // 12), max(2, h // 12)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
        I = I + an["edge"] * (I - np.asarray(small))
        img = Image.fromarray(I.astype(np.float32, copy=False), mode="F")
    if (h, w) != (H, W):
        img = img.resize((W, H), Image.BILINEAR)
    out = np.array(img, dtype=np.float32)

    dev = _devices_layer(f, an, geo, pose, H, W, rng)
    if dev is not None:
        out += dev * (1.0 - np.clip(out, 0.0, 1.0))
    markers: list[str] = []
    if not clean:
        if an["collimate"]:
            m = int(0.02 * H + 0.03 * H * rng.random())
            out[:m, :] = np.maximum(out[:m, :], 0.85)
            out[:, :m] = np.maximum(out[:, :m], 0.85)
            out[:, W - m:] = np.maximum(out[:, W - m:], 0.85)
        bank = _noise_bank(H, W)
        oy, ox = int(rng.integers(_NOISE_PAD)), int(rng.integers(_NOISE_PAD))
        noise = bank[oy:oy + H, ox:ox + W]
        out += (an["noise"] * 0.5) * noise * (1.0 + out)
        if an["grid"] is not None:
            period, amp = an["grid"]
            out += (amp * np.cos(np.arange(W, dtype=np.float32) * (2 * np.pi / period)))[None, :]
        markers = _markers(out, view, rng)
    np.clip(out, 0.0, 1.0, out=out)

    info = {
        "view": view,
        "sex": sex,
        "ctr": float(ctr),
        "rows": H,
        "columns": W,
        "aspect": W / H,
        "pose": {"scale": an["scale"], "shift_x": an["sx"], "shift_y": an["sy"],
                 "rotation_deg": math.degrees(an["rot"])},
        "markers": markers,
        "findings": f,
    }
    if view != "LL":
        px = an["scale"] * H
        info["thoracic_width_px"] = geo["thoracic_width"] * px
        info["heart_width_px"] = geo["heart_width"] * px
        _, r = pose.to_px(0.0, geo["heart_row"], H, W)
        info["heart_row_px"] = float(r)
    return out, info
