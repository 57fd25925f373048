"""The report figures a fit writes, drawn with matplotlib: `projection_panel` (measured, predicted
and residual projections at a few tilts) and `line_plot` (loss curves against iteration).

Figures are `matplotlib.figure.Figure` objects on the Agg canvas, never pyplot's: nothing here
touches pyplot's global state or the backend of a user's interactive session. Each PNG is written
atomically (`engine.core.files.write_atomically`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.core.files import write_atomically

DPI = 100
PANEL_INCHES = 2.6
"""Size of one projection image's longer side in the figure, in."""
BAD_COLOUR = "magenta"
"""Pixels whose value is NaN or infinite."""
GREY = colormaps["gray"].with_extremes(bad=BAD_COLOUR)
RESIDUAL = colormaps["RdBu_r"].with_extremes(bad=BAD_COLOUR)
COLUMNS = ("measured", "predicted", "residual")


def save_figure(figure: Figure, path) -> Path:
    """Write ``figure`` as a PNG at ``path``, atomically. The format is given explicitly: the
    temporary file's name need not tell it."""
    FigureCanvasAgg(figure)
    return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))


# ---------------------------------------------------------------- projections


def _default_tilts(angles: np.ndarray) -> list[int]:
    """Indices of the lowest, middle and highest angle, without repeats."""
    order = np.argsort(angles, kind="stable")
    return list(dict.fromkeys(int(i) for i in (order[0], order[(len(order) - 1) // 2], order[-1])))


def _finite_range(*arrays) -> tuple[float, float]:
    """min..max of the finite values (0..0 when there are none)."""
    finite = np.concatenate([np.ravel(a)[np.isfinite(np.ravel(a))] for a in arrays])
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def _widen(lo: float, hi: float) -> tuple[float, float]:
    """``lo``..``hi``, or a small range around them when they are equal (a constant image)."""
    if hi > lo:
        return lo, hi
    half = abs(lo) * 0.05 or 0.5
    return lo - half, hi + half


def projection_figure(measured, predicted, angles_deg, indices=None, pixel_size: float | None = None) -> Figure:
    """Measured | predicted | residual (measured − predicted) for a few tilts, one row per tilt.

    ``measured`` and ``predicted`` are (n, H, W) stacks in the data's units and ``angles_deg``
    their n tilt angles; the rows are ``indices`` (default: the lowest, middle and highest angle).
    Measured and predicted share one grey scale over both stacks' finite min..max at the chosen
    tilts; the residual has a blue-white-red scale centred at 0 reaching ±max|residual|; one colour
    bar each, under the columns. Each image's title names its column and tilt angle; the axes are
    in Å when ``pixel_size`` (Å) is given, else in pixels. Non-finite pixels show in BAD_COLOUR.
    """
    measured = np.asarray(measured, float)
    predicted = np.asarray(predicted, float)
    angles = np.asarray(angles_deg, float).ravel()
    if measured.ndim != 3 or measured.shape != predicted.shape:
        raise ValueError(f"measured and predicted must be (n, H, W) stacks of one shape, "
                         f"got {measured.shape} and {predicted.shape}")
    n, h, w = measured.shape
    if n == 0 or angles.size != n:
        raise ValueError(f"need one angle per projection: {n} projections, {angles.size} angles")
    rows = _default_tilts(angles) if indices is None else [int(i) for i in indices]
    if not rows or any(not 0 <= i < n for i in rows):
        raise ValueError(f"indices must be a non-empty list within 0..{n - 1}, got {indices!r}")

    meas, pred = measured[rows], predicted[rows]
    with np.errstate(invalid="ignore"):
        resid = meas - pred
    lo, hi = _widen(*_finite_range(meas, pred))
    vmax = max(abs(v) for v in _finite_range(resid)) or 1.0
    scale, length = (pixel_size, "Å") if pixel_size else (1.0, "px")
    extent = (0, w * scale, h * scale, 0)  # rows downwards, as the images are stored

    # A fixed layout in inches: matplotlib's constrained layout measures every tick label of every
    # axes, several times, and took two thirds of the time a fit spends writing its outputs.
    panel_w, panel_h = PANEL_INCHES * w / max(h, w), PANEL_INCHES * h / max(h, w)
    left, gap, title, bottom, bar_h = 0.75, 0.15, 0.3, 0.5, 0.12  # in
    bar_space = 0.75  # in: a colour bar under the columns, with its ticks and label
    width = left + 3 * panel_w + 2 * gap + 0.25
    height = len(rows) * (panel_h + title) + bottom + bar_space + 0.1
    figure = Figure(figsize=(width, height), dpi=DPI)

    def box(x_in, y_in, w_in, h_in):  # inches from the bottom left → figure fractions
        return [x_in / width, y_in / height, w_in / width, h_in / height]

    axes = np.empty((len(rows), 3), dtype=object)
    for r in range(len(rows)):
        y0 = height - (r + 1) * (panel_h + title)
        for c in range(3):
            share = {} if r == c == 0 else {"sharex": axes[0, 0], "sharey": axes[0, 0]}
            axes[r, c] = figure.add_axes(box(left + c * (panel_w + gap), y0, panel_w, panel_h), **share)
    for r, tilt in enumerate(rows):
        for c, image in enumerate((meas[r], pred[r], resid[r])):
            ax = axes[r, c]
            shown = ax.imshow(np.ma.masked_invalid(image), extent=extent, interpolation="nearest",
                              **({"cmap": GREY, "vmin": lo, "vmax": hi} if c < 2 else
                                 {"cmap": RESIDUAL, "vmin": -vmax, "vmax": vmax}))
            ax.set_title(f"{COLUMNS[c]}, tilt {angles[tilt]:+.1f}°".replace("-", "−"), fontsize="medium")
            ax.tick_params(labelleft=c == 0, labelbottom=r == len(rows) - 1)
        axes[r, 0].set_ylabel(f"y′ ({length})")
    for ax in axes[-1]:
        ax.set_xlabel(f"x′ ({length})")
    bar_y = height - len(rows) * (panel_h + title) - bottom - bar_h
    grey_bar = figure.add_axes(box(left + 0.1 * panel_w, bar_y, 1.8 * panel_w + gap, bar_h))
    residual_bar = figure.add_axes(box(left + 2 * (panel_w + gap) + 0.1 * panel_w, bar_y, 0.8 * panel_w, bar_h))
    figure.colorbar(axes[0, 0].images[0], cax=grey_bar, orientation="horizontal", label="projection (data units)")
    figure.colorbar(shown, cax=residual_bar, orientation="horizontal", label="measured − predicted (data units)")
    return figure


def projection_panel(measured, predicted, angles_deg, path, indices=None, pixel_size: float | None = None) -> Path:
    """Write `projection_figure` of the arguments as a PNG at ``path``; returns the path."""
    return save_figure(projection_figure(measured, predicted, angles_deg, indices, pixel_size), path)


# ---------------------------------------------------------------- curves


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


def line_figure(series: dict, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False) -> Figure:
    """Curves on shared axes, e.g. loss against iteration.

    ``series`` maps a name (the legend's label) to y values (x = 0, 1, 2, ...) or to an (x, y)
    tuple. Curves break at non-finite points. With ``logy`` the y axis is logarithmic and
    non-positive values are left out (the axis stays linear when no value is positive).
    """
    figure = Figure(figsize=(8.0, 4.8), dpi=DPI)
    ax = figure.add_axes((0.1, 0.11, 0.87, 0.82))  # fixed margins: see `projection_figure`
    positive = False
    for name, value in series.items():
        x, y = _series_xy(name, value)
        if logy:
            y = np.where(y > 0, y, np.nan)
            positive |= bool(np.isfinite(y).any())
        ax.plot(x, y, label=str(name), linewidth=1.5)
    if logy and positive:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if series:
        ax.legend()
    return figure


def line_plot(series: dict, path, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False) -> Path:
    """Write `line_figure` of the arguments as a PNG at ``path``; returns the path."""
    return save_figure(line_figure(series, title, xlabel, ylabel, logy), path)
