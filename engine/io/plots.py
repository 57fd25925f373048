"""Small raster plots for result images, drawn with numpy alone.

`projection_panel` lays measured, predicted and residual projections side by side for a few tilts;
`line_plot` draws loss curves and atom counts over iterations. Both return RGB uint8 arrays (H, W, 3)
and write PNGs through `save_png` (imageio). Text uses a built-in 5x7 bitmap font (`text_image`).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from engine.core.files import write_atomically

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

WHITE = np.array([255, 255, 255])
BLACK = np.array([0, 0, 0])
BLUE = np.array([33, 102, 172])
RED = np.array([178, 24, 43])
NAN_COLOUR = np.array([255, 0, 255])
"""Pixels whose value is NaN or infinite."""
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""Curve colours of `line_plot`, in order (repeating after ten series)."""

GUTTER = 4          # white space between panels, px
MIN_PANEL = 192     # projections are upscaled until their longer side reaches this, px
TEXT_SCALE = 2      # font scale for titles, labels and ticks
LABEL_CHARS = 7     # room left of the rows for labels such as "-180.0°"
BAR_H = 12          # colour bar height, px
BAR_INSET = 8       # colour bars stop this far short of their columns' edges, px
TICK = 5            # tick length, px
PAD = 8             # margins of line plots, px


# ---------------------------------------------------------------- text


def _text_mask(text: str) -> np.ndarray:
    """Boolean 7 x (6n - 1) bitmap of ``text``; lower case is drawn as upper case, characters
    outside the font as '?'."""
    mask = np.zeros((GLYPH_H, max(ADVANCE * len(text) - 1, 0)), bool)
    for i, ch in enumerate(text):
        mask[:, ADVANCE * i:ADVANCE * i + GLYPH_W] = _FONT.get(ch.upper(), _FONT["?"])
    return mask


def _scaled_mask(text: str, scale: int) -> np.ndarray:
    if int(scale) != scale or scale < 1:
        raise ValueError(f"text scale must be a positive integer, got {scale!r}")
    return np.kron(_text_mask(text), np.ones((int(scale), int(scale)), bool))


def text_image(text: str, scale: int = 2, colour=(0, 0, 0), background=(255, 255, 255)) -> np.ndarray:
    """One line of ``text`` in the 5x7 bitmap font, each font pixel a ``scale`` x ``scale`` block:
    an RGB uint8 image (7·scale, (6·len(text) − 1)·scale, 3) with no margin around the glyphs."""
    mask = _scaled_mask(text, scale)
    image = np.empty(mask.shape + (3,), np.uint8)
    image[:] = background
    image[mask] = colour
    return image


def _stamp(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, colour) -> None:
    """Paint ``colour`` where ``mask`` is set, with the mask's top-left at (y, x); clipped to the canvas."""
    h, w = canvas.shape[:2]
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + mask.shape[0], h), min(x + mask.shape[1], w)
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = colour


def _text(canvas, text, y, x, colour=BLACK, scale=TEXT_SCALE, align="left") -> None:
    """Draw ``text`` with its top at ``y``, starting at (left), centred on or ending at (right) ``x``."""
    mask = _scaled_mask(text, scale)
    x -= {"left": 0, "centre": mask.shape[1] // 2, "right": mask.shape[1]}[align]
    _stamp(canvas, mask, y, x, colour)


def _text_width(text: str, scale: int = TEXT_SCALE) -> int:
    return max(ADVANCE * len(text) - 1, 0) * scale


def _fmt(value: float, digits: int) -> str:
    """Compact number with at most ``digits`` significant digits: '0.25', '1500', '1.5E-5'."""
    text = f"{value + 0.0:.{digits}g}"  # + 0.0 turns -0.0 into 0.0
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}E{int(exponent)}"
    return text


def _frame(canvas, y, x, h, w, colour=BLACK) -> None:
    """1-px rectangle just outside the box of size (h, w) at (y, x)."""
    canvas[y - 1, x - 1:x + w + 1] = colour
    canvas[y + h, x - 1:x + w + 1] = colour
    canvas[y - 1:y + h + 1, x - 1] = colour
    canvas[y - 1:y + h + 1, x + w] = colour


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


def _finite_range(*arrays) -> tuple[float, float]:
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


# ---------------------------------------------------------------- projection panel


@dataclass(frozen=True)
class PanelLayout:
    """Where `projection_panel` draws each piece, in pixels of the figure."""

    shape: tuple[int, int]
    """(height, width) of the figure."""
    zoom: int
    """Nearest-neighbour upscale factor of the projections."""
    panel: tuple[int, int]
    """(height, width) of one upscaled projection."""
    origins: tuple[tuple[tuple[int, int], ...], ...]
    """origins[row][col]: (y, x) of the top-left pixel of a projection; columns are measured,
    predicted, residual."""
    column_x: tuple[int, int, int]
    """Left edge of each column; a column is `column_width` wide and its projection centred in it."""
    column_width: int
    bars: tuple[tuple[int, int, int], tuple[int, int, int]]
    """(y, x, width) of the shared measured/predicted colour bar (under the first two columns) and of
    the residual one (under the third); each is BAR_H high."""


def panel_layout(image_shape: tuple[int, int], n_rows: int) -> PanelLayout:
    """Layout of a `projection_panel` figure for projections of ``image_shape`` (H, W) and
    ``n_rows`` tilts: a title strip, then one row per tilt (label | measured | predicted | residual)
    with GUTTER-px white gutters, then the colour bars and their min/max labels."""
    h, w = image_shape
    zoom = max(1, math.ceil(MIN_PANEL / max(h, w)))
    ph, pw = h * zoom, w * zoom
    text_h = GLYPH_H * TEXT_SCALE
    col_w = max(pw, MIN_PANEL)
    grid_x = GUTTER + _text_width("X" * LABEL_CHARS) + GUTTER
    grid_y = GUTTER + text_h + GUTTER
    column_x = tuple(grid_x + c * (col_w + GUTTER) for c in range(3))
    origins = tuple(tuple((grid_y + r * (ph + GUTTER), cx + (col_w - pw) // 2) for cx in column_x)
                    for r in range(n_rows))
    bar_y = grid_y + n_rows * (ph + GUTTER) + GUTTER
    height = bar_y + BAR_H + GUTTER + text_h + GUTTER
    width = column_x[2] + col_w + GUTTER
    return PanelLayout((height, width), zoom, (ph, pw), origins, column_x, col_w,
                       ((bar_y, column_x[0] + BAR_INSET, 2 * col_w + GUTTER - 2 * BAR_INSET),
                        (bar_y, column_x[2] + BAR_INSET, col_w - 2 * BAR_INSET)))


def _colour_bar(canvas, bar, rgb_of, lo, hi, labels) -> None:
    """Gradient from ``lo`` to ``hi`` in the box ``bar`` with ``labels`` under its left end, centre
    (when three) and right end; the labels shrink to scale 1 when they would not fit side by side."""
    y, x, width = bar
    canvas[y:y + BAR_H, x:x + width] = rgb_of(np.linspace(lo, hi, width))[None]
    _frame(canvas, y, x, BAR_H, width, BLACK)
    fits = sum(_text_width(t) for t in labels) + GUTTER * (len(labels) - 1) <= width
    scale = TEXT_SCALE if fits else 1
    ty = y + BAR_H + GUTTER
    _text(canvas, labels[0], ty, x, scale=scale)
    _text(canvas, labels[-1], ty, x + width, scale=scale, align="right")
    if len(labels) == 3:
        _text(canvas, labels[1], ty, x + width // 2, scale=scale, align="centre")


def _default_tilts(angles: np.ndarray) -> list[int]:
    """Indices of the lowest, middle and highest angle, without repeats."""
    order = np.argsort(angles, kind="stable")
    return list(dict.fromkeys(int(i) for i in (order[0], order[(len(order) - 1) // 2], order[-1])))


def projection_panel(measured, predicted, angles_deg, indices=None, path=None) -> np.ndarray:
    """Measured | predicted | residual (measured − predicted) for a few tilts, one row per tilt.

    ``measured`` and ``predicted`` are (n, H, W) stacks and ``angles_deg`` their n tilt angles; the
    rows are ``indices`` (default: the lowest, middle and highest angle). Measured and predicted
    share one grey scale spanning both stacks' min..max over the chosen tilts; the residual has a
    blue-white-red scale centred at 0 reaching ±max|residual|. Each scale gets a colour bar with
    its ends printed. Layout: see `panel_layout`. Returns the RGB uint8 figure and writes it as a
    PNG to ``path`` when given.
    """
    measured = np.asarray(measured, float)
    predicted = np.asarray(predicted, float)
    angles = np.asarray(angles_deg, float).ravel()
    if measured.ndim != 3 or measured.shape != predicted.shape:
        raise ValueError(f"measured and predicted must be (n, H, W) stacks of one shape, "
                         f"got {measured.shape} and {predicted.shape}")
    n = measured.shape[0]
    if n == 0 or angles.size != n:
        raise ValueError(f"need one angle per projection: {n} projections, {angles.size} angles")
    rows = _default_tilts(angles) if indices is None else [int(i) for i in indices]
    if not rows or any(not 0 <= i < n for i in rows):
        raise ValueError(f"indices must be a non-empty list within 0..{n - 1}, got {indices!r}")

    meas, pred = measured[rows], predicted[rows]
    with np.errstate(invalid="ignore"):
        resid = meas - pred
    lo, hi = _finite_range(meas, pred)
    vmax = max(abs(v) for v in _finite_range(resid))

    layout = panel_layout(measured.shape[1:], len(rows))
    canvas = np.full(layout.shape + (3,), 255, np.uint8)
    zoom, (ph, pw) = layout.zoom, layout.panel
    for col, title in enumerate(("MEASURED", "PREDICTED", "RESIDUAL")):
        _text(canvas, title, GUTTER, layout.column_x[col] + layout.column_width // 2, align="centre")
    label_y = (ph - GLYPH_H * TEXT_SCALE) // 2
    for r, tilt in enumerate(rows):
        y0 = layout.origins[r][0][0]
        _text(canvas, f"{angles[tilt]:.1f}°", y0 + label_y, layout.column_x[0] - GUTTER, align="right")
        for col, rgb in enumerate((grey_map(meas[r], lo, hi), grey_map(pred[r], lo, hi),
                                   diverging_map(resid[r], vmax))):
            y, x = layout.origins[r][col]
            canvas[y:y + ph, x:x + pw] = rgb.repeat(zoom, axis=0).repeat(zoom, axis=1)
    _colour_bar(canvas, layout.bars[0], lambda v: grey_map(v, lo, hi), lo, hi, [_fmt(lo, 3), _fmt(hi, 3)])
    _colour_bar(canvas, layout.bars[1], lambda v: diverging_map(v, vmax), -vmax, vmax,
                [_fmt(-vmax, 3), "0", "+" + _fmt(vmax, 3)])
    if path is not None:
        save_png(canvas, path)
    return canvas


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


def _series_xy(name, value) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one series: a tuple (x, y), or y alone with x = 0, 1, 2, ..."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"series {name!r}: expected (x, y), got a tuple of {len(value)}")
        x, y = (np.asarray(v, float) for v in value)
    else:
        y = np.asarray(value, float)
        x = np.arange(y.size, dtype=float)
    if y.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"series {name!r}: x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    return x, y


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


def _polyline(canvas, xs, ys, colour, box) -> None:
    """Draw the polyline through pixel coordinates (xs, ys) about 2 px wide, breaking at non-finite
    points, clipped to ``box`` = (y0, y1, x0, x1). Each segment is sampled at least once per pixel
    along its longer side, so the rounded samples form a connected line."""
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
        canvas[r[inside], c[inside]] = colour


def _legend_rows(names: list[str], width: int) -> list[list[tuple[int, str, int]]]:
    """Legend entries (series index, name, entry width) wrapped greedily into rows of ``width`` px."""
    rows, used = [], 0
    for i, name in enumerate(names):
        w = 20 + 6 + _text_width(name)
        if not rows or used + 16 + w > width:
            rows.append([])
            used = -16
        used += 16 + w
        rows[-1].append((i, name, w))
    return rows


def line_plot(series: dict, path=None, title: str = "", xlabel: str = "", ylabel: str = "",
              logy: bool = False, size: tuple[int, int] = (480, 800)) -> np.ndarray:
    """Curves on shared axes, e.g. loss or atom count against iteration.

    ``series`` maps a name to y values (x = 0, 1, 2, ...) or to an (x, y) tuple. Curves take the
    PALETTE colours in order and break at non-finite points; with ``logy`` the y axis is
    logarithmic and non-positive values are left out. The x axis spans the data exactly, the y
    axis the data plus 5 % each side; both get about five round-numbered ticks with labels and
    light grid lines. A legend row (wrapped as needed) sits under ``title``. ``size`` is the
    figure's (height, width). Returns the RGB uint8 image and writes it as a PNG to ``path`` when given.
    """
    height, width = size
    curves = []
    for name, value in series.items():
        x, y = _series_xy(name, value)
        if logy:
            with np.errstate(divide="ignore", invalid="ignore"):
                y = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
        curves.append((str(name), x, y))
    ok = [np.isfinite(x) & np.isfinite(y) for _, x, y in curves]
    xlo, xhi = _axis_range(np.concatenate([x[m] for (_, x, _), m in zip(curves, ok)] or [np.empty(0)]), 0.0)
    ylo, yhi = _axis_range(np.concatenate([y[m] for (_, _, y), m in zip(curves, ok)] or [np.empty(0)]), 0.05)
    xticks = _nice_ticks(xlo, xhi)
    yticks = _log_ticks(ylo, yhi) if logy else _nice_ticks(ylo, yhi)
    ytick_pos = np.log10(yticks) if logy else yticks
    xlabels, ylabels = [_fmt(v, 6) for v in xticks], [_fmt(v, 6) for v in yticks]

    # Margins: title and legend above, y label and tick labels left, tick labels and x label below.
    text_h = GLYPH_H * TEXT_SCALE
    top = PAD + (text_h + PAD if title else 0)
    legend = _legend_rows([name for name, _, _ in curves], width - 2 * PAD)
    legend_top = top
    top += len(legend) * (text_h + 4) + PAD if legend else 0
    left = PAD + (text_h + PAD if ylabel else 0) + max(map(_text_width, ylabels)) + TICK + 3
    bottom = height - PAD - (text_h + PAD if xlabel else 0) - text_h - 3 - TICK
    right = width - PAD - _text_width(xlabels[-1]) // 2
    # Plot area: rows py0..py1-1, columns px0..px1-1, inside a 1-px frame.
    py0, py1, px0, px1 = top + 1, bottom - 1, left + 1, right - 1
    if py1 - py0 < 16 or px1 - px0 < 16:
        raise ValueError(f"figure size {size} leaves no room for the axes")

    def to_px(x):
        return px0 + (x - xlo) / (xhi - xlo) * (px1 - px0 - 1)

    def to_py(y):
        return py0 + (yhi - y) / (yhi - ylo) * (py1 - py0 - 1)

    canvas = np.full((height, width, 3), 255, np.uint8)
    xt, yt = np.rint(to_px(xticks)).astype(int), np.rint(to_py(ytick_pos)).astype(int)
    canvas[py0:py1, xt[(xt >= px0) & (xt < px1)]] = 230
    canvas[yt[(yt >= py0) & (yt < py1)], px0:px1] = 230
    for i, (_, x, y) in enumerate(curves):
        _polyline(canvas, to_px(x), to_py(y), PALETTE[i % len(PALETTE)], (py0, py1, px0, px1))
    _frame(canvas, py0, px0, py1 - py0, px1 - px0)
    for px, label in zip(xt, xlabels):
        canvas[py1 + 1:py1 + 1 + TICK, px] = 0
        _text(canvas, label, py1 + 1 + TICK + 3, px, align="centre")
    for py, label in zip(yt, ylabels):
        canvas[py, px0 - 1 - TICK:px0 - 1] = 0
        _text(canvas, label, py - text_h // 2, px0 - 1 - TICK - 3, align="right")

    if title:
        _text(canvas, title, PAD, width // 2, align="centre")
    for r, row in enumerate(legend):
        y = legend_top + r * (text_h + 4)
        x = (width - sum(w for _, _, w in row) - 16 * (len(row) - 1)) // 2
        for i, name, w in row:
            canvas[y + text_h // 2 - 1:y + text_h // 2 + 2, x:x + 20] = PALETTE[i % len(PALETTE)]
            _text(canvas, name, y, x + 26)
            x += w + 16
    if xlabel:
        _text(canvas, xlabel, height - PAD - text_h, (px0 + px1) // 2, align="centre")
    if ylabel:
        mask = np.rot90(_scaled_mask(ylabel, TEXT_SCALE))  # reads bottom to top
        _stamp(canvas, mask, (py0 + py1 - mask.shape[0]) // 2, PAD, BLACK)
    if path is not None:
        save_png(canvas, path)
    return canvas


# ---------------------------------------------------------------- output


def _png_unfiltered(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3|4) uint8 image with no row filters and zlib level 1: about
    4x faster to encode than Pillow's adaptive filtering, files about 15 % larger."""
    h, w = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * channels)], axis=1)  # filter byte 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + chunk(b"IEND", b""))


def save_png(image, path, fast: bool = False) -> Path:
    """Write ``image`` (H, W) or (H, W, 3|4) as a PNG at ``path``, replacing any file there.

    The PNG goes to a temporary file in the same directory first and is then renamed over
    ``path``, so readers never see a half-written file. ``fast`` (uint8 images): skip row filters
    and compress lightly (`_png_unfiltered`), for frames written while a fit runs. Returns the path.
    """
    image = np.asarray(image)
    if fast and image.dtype == np.uint8:
        return write_atomically(path, lambda tmp: Path(tmp).write_bytes(_png_unfiltered(np.ascontiguousarray(image))))
    return write_atomically(path, lambda tmp: iio.imwrite(tmp, image, extension=".png"))
