"""The viewer's 2D drawing, straight into RGB uint8 arrays with NumPy: one line of text in a 5x7
bitmap font, a grey and a blue-white-red colour map, and a small line plot.

The frame is redrawn while a fit runs, so this is kept fast: the frame's 2D panels (status line,
projection strip, two curves) take about 5 ms this way against 90 ms with matplotlib reusing one
figure (README, "Cost"). The report figures a fit writes are matplotlib's (`engine.io.plots`).
"""

from __future__ import annotations

import math

import numpy as np

# 5x7 font: per glyph 7 rows top to bottom, two hex digits each; bit 4 is the leftmost pixel.
_FONT_HEX = {
    "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f", "3": "1f02040201110e",
    "4": "02060a121f0202", "5": "1f101e0101110e", "6": "0608101e11110e", "7": "1f010204080808",
    "8": "0e11110e11110e", "9": "0e11110f01020c",
    "A": "0e1111111f1111", "B": "1e11111e11111e", "C": "0e11101010110e", "D": "1c12111111121c",
    "E": "1f10101e10101f", "F": "1f10101e101010", "G": "0e11101711110f", "H": "1111111f111111",
    "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211", "L": "1010101010101f",
    "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e", "P": "1e11111e101010",
    "Q": "0e11111115120d", "R": "1e11111e141211", "S": "0f10100e01011e", "T": "1f040404040404",
    "U": "1111111111110e", "V": "11111111110a04", "W": "1111111515150a", "X": "11110a040a1111",
    "Y": "1111110a040404", "Z": "1f01020408101f",
    " ": "00000000000000", ".": "00000000000c0c", "-": "0000001f000000", "+": "0004041f040400",
    ":": "000c0c000c0c00", "=": "00001f001f0000", "|": "04040404040404", "/": "00010204081000",
    "(": "02040808080402", ")": "08040202020408", "°": "0c12120c000000", "?": "0e110102040004",
    ",": "000000000c0408", "_": "0000000000001f",
}
GLYPH_H, GLYPH_W = 7, 5
ADVANCE = GLYPH_W + 1  # one blank column between glyphs
_FONT = {ch: ((np.array([int(h[i:i + 2], 16) for i in range(0, 14, 2)])[:, None] >> np.arange(4, -1, -1)) & 1)
         .astype(bool) for ch, h in _FONT_HEX.items()}
TEXT_SCALE = 2  # font scale of the line plot's labels

WHITE = np.array([255, 255, 255])
BLUE = np.array([33, 102, 172])
RED = np.array([178, 24, 43])
NAN_COLOUR = np.array([255, 0, 255])
"""Pixels whose value is NaN or infinite."""
CURVE = (31, 119, 180)
"""Colour of the line plot's curve."""
GRID = 230  # grey level of the line plot's grid lines
PAD = 8     # margins of the line plot, px
TICK = 5    # tick length, px


# ---------------------------------------------------------------- text


def _text_mask(text: str, scale: int) -> np.ndarray:
    """Boolean bitmap (7·scale, (6·len(text) − 1)·scale) of ``text``; lower case is drawn as upper
    case, characters outside the font as '?'."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"text scale must be a positive integer, got {scale!r}")
    mask = np.zeros((GLYPH_H, max(ADVANCE * len(text) - 1, 0)), bool)
    for i, ch in enumerate(text):
        mask[:, ADVANCE * i:ADVANCE * i + GLYPH_W] = _FONT.get(ch.upper(), _FONT["?"])
    return np.kron(mask, np.ones((int(scale), int(scale)), bool))


def text_image(text: str, scale: int = 2, colour=(0, 0, 0), background=(255, 255, 255)) -> np.ndarray:
    """One line of ``text`` in the 5x7 bitmap font, each font pixel a ``scale`` x ``scale`` block:
    an RGB uint8 image (7·scale, (6·len(text) − 1)·scale, 3) with no margin around the glyphs."""
    mask = _text_mask(text, scale)
    image = np.empty(mask.shape + (3,), np.uint8)
    image[:] = background
    image[mask] = colour
    return image


def _text(canvas, text: str, y: int, x: int, align: str = "left") -> None:
    """Draw ``text`` in black with its top at ``y``, starting at (left), centred on or ending at
    (right) ``x``; clipped to the canvas."""
    mask = _text_mask(text, TEXT_SCALE)
    x -= {"left": 0, "centre": mask.shape[1] // 2, "right": mask.shape[1]}[align]
    h, w = canvas.shape[:2]
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + mask.shape[0], h), min(x + mask.shape[1], w)
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = 0


def _text_width(text: str) -> int:
    return max(ADVANCE * len(text) - 1, 0) * TEXT_SCALE


def _fmt(value: float) -> str:
    """Compact tick label with at most 6 significant digits: '0.25', '1500', '1E-5'."""
    text = f"{value + 0.0:.6g}"  # + 0.0 turns -0.0 into 0.0
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}E{int(exponent)}"
    return text


# ---------------------------------------------------------------- colour maps


def _finish(rgb: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values)[..., None], rgb, NAN_COLOUR).astype(np.uint8)


def grey_map(values, lo: float, hi: float) -> np.ndarray:
    """Sequential scale: ``lo`` and below black, ``hi`` and above white, linear in between (all
    black when lo == hi); non-finite values get NAN_COLOUR."""
    values = np.asarray(values, float)
    with np.errstate(invalid="ignore"):
        t = np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros(values.shape)
    return _finish(np.repeat(np.rint(t * 255)[..., None], 3, axis=-1), values)


def diverging_map(values, vmax: float) -> np.ndarray:
    """Diverging scale: −vmax blue, 0 white, +vmax red, linear in between and clipped beyond (all
    white when vmax is 0); non-finite values get NAN_COLOUR."""
    values = np.asarray(values, float)
    with np.errstate(invalid="ignore"):
        t = np.clip(values / vmax, -1, 1) if vmax > 0 else np.zeros(values.shape)
    end = np.where(t[..., None] < 0, BLUE, RED)
    return _finish(np.rint(WHITE + np.abs(t)[..., None] * (end - WHITE)), values)


# ---------------------------------------------------------------- line plot


def _nice_ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
    """Ticks inside [lo, hi] spaced 1, 2 or 5 × 10^k apart, the spacing whose count is nearest ``target``."""
    e = math.floor(math.log10((hi - lo) / target))
    candidates = []
    for step in (m * 10.0 ** k for k in (e - 1, e, e + 1) for m in (1, 2, 5)):
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        candidates.append(np.arange(first, last + 1) * step)
    return min(candidates, key=lambda t: abs(len(t) - target))


def _log_ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
    """Ticks (data values) for a log axis spanning log10 values [lo, hi]: whole decades, every k-th
    so that about ``target`` remain, or round numbers when fewer than two decades fall inside."""
    first, last = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    if last > first:
        return 10.0 ** np.arange(first, last + 1, math.ceil((last - first + 1) / target))
    return _nice_ticks(10.0 ** lo, 10.0 ** hi, target)


def _axis_range(values: np.ndarray, margin: float) -> tuple[float, float]:
    """min..max of ``values`` widened by ``margin`` × span each side; a single value gets ±5 % of
    itself (±0.5 at 0), no values give 0..1."""
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        half = abs(lo) * 0.05 or 0.5
        return lo - half, hi + half
    return lo - margin * (hi - lo), hi + margin * (hi - lo)


def _polyline(canvas, xs, ys, box) -> None:
    """Draw the polyline through pixel coordinates (xs, ys) in CURVE about 2 px wide, breaking at
    non-finite points, clipped to ``box`` = (y0, y1, x0, x1). Each segment is sampled at least once
    per pixel along its longer side, so the rounded samples form a connected line."""
    ok = np.isfinite(xs) & np.isfinite(ys)
    seg = np.flatnonzero(ok[:-1] & ok[1:])
    dx, dy = xs[seg + 1] - xs[seg], ys[seg + 1] - ys[seg]
    n = np.ceil(np.maximum(np.abs(dx), np.abs(dy))).astype(int) + 1
    owner = np.repeat(np.arange(seg.size), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(np.maximum(n - 1, 1), n)
    # The points themselves too, so that a point with no valid neighbour still shows.
    px = np.rint(np.concatenate([xs[seg][owner] + t * dx[owner], xs[ok]])).astype(int)
    py = np.rint(np.concatenate([ys[seg][owner] + t * dy[owner], ys[ok]])).astype(int)
    y0, y1, x0, x1 = box
    for oy, ox in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        r, c = py + oy, px + ox
        inside = (r >= y0) & (r < y1) & (c >= x0) & (c < x1)
        canvas[r[inside], c[inside]] = CURVE


def line_plot(x, y, label: str, size: tuple[int, int], logy: bool = False) -> np.ndarray:
    """The curve ``y`` against ``x`` (1-D, one length) as an RGB uint8 image of ``size`` (H, W):
    ``label`` with a swatch above the axes, the curve in CURVE, broken at non-finite points; with
    ``logy`` the y axis is logarithmic and non-positive values are left out. The x axis spans the
    data exactly, the y axis the data plus 5 % each side; both get about five round-numbered ticks
    with labels and light grid lines."""
    height, width = size
    x, y = np.asarray(x, float), np.asarray(y, float)
    if logy:
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
    ok = np.isfinite(x) & np.isfinite(y)
    xlo, xhi = _axis_range(x[ok], 0.0)
    ylo, yhi = _axis_range(y[ok], 0.05)
    xticks = _nice_ticks(xlo, xhi)
    yticks = _log_ticks(ylo, yhi) if logy else _nice_ticks(ylo, yhi)
    ytick_pos = np.log10(yticks) if logy else yticks
    xlabels, ylabels = [_fmt(v) for v in xticks], [_fmt(v) for v in yticks]

    # Plot area: rows py0..py1-1, columns px0..px1-1, inside a 1-px frame; the label above it, tick
    # labels left of and below it.
    text_h = GLYPH_H * TEXT_SCALE
    py0 = PAD + text_h + PAD + 1
    px0 = PAD + max(map(_text_width, ylabels)) + TICK + 3 + 1
    py1 = height - PAD - text_h - 3 - TICK - 1
    px1 = width - PAD - _text_width(xlabels[-1]) // 2 - 1
    if py1 - py0 < 16 or px1 - px0 < 16:
        raise ValueError(f"plot size {size} leaves no room for the axes")

    canvas = np.full((height, width, 3), 255, np.uint8)
    xt = np.rint(px0 + (xticks - xlo) / (xhi - xlo) * (px1 - px0 - 1)).astype(int)
    yt = np.rint(py0 + (yhi - ytick_pos) / (yhi - ylo) * (py1 - py0 - 1)).astype(int)
    canvas[py0:py1, xt[(xt >= px0) & (xt < px1)]] = GRID
    canvas[yt[(yt >= py0) & (yt < py1)], px0:px1] = GRID
    _polyline(canvas, px0 + (x - xlo) / (xhi - xlo) * (px1 - px0 - 1),
              py0 + (yhi - y) / (yhi - ylo) * (py1 - py0 - 1), (py0, py1, px0, px1))
    canvas[[py0 - 1, py1], px0 - 1:px1 + 1] = 0  # the frame
    canvas[py0 - 1:py1 + 1, [px0 - 1, px1]] = 0
    for px, text in zip(xt, xlabels):
        canvas[py1 + 1:py1 + 1 + TICK, px] = 0
        _text(canvas, text, py1 + 1 + TICK + 3, px, align="centre")
    for py, text in zip(yt, ylabels):
        canvas[py, px0 - 1 - TICK:px0 - 1] = 0
        _text(canvas, text, py - text_h // 2, px0 - 1 - TICK - 3, align="right")
    canvas[PAD + text_h // 2 - 1:PAD + text_h // 2 + 2, px0:px0 + 20] = CURVE
    _text(canvas, label, PAD, px0 + 26)
    return canvas
