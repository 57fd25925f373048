"""One viewer frame: the 3D atom cloud, the current tilt's measured | predicted | residual images,
the loss and atom-count curves and a status line, composed into one RGB image.

The live window and headless recording draw the very same frame (`compose_frame`); what it shows
comes in a `Snapshot` (read from a running fit or from saved files, see `viewer.sources`) and how
in `ViewSettings` (camera, colour mode, truth overlay).

Layout (pixels, FRAME_SHAPE = 720 x 1280): a status bar across the top, the 3D view on the left,
and on the right, top to bottom, the projection strip, the loss curve and the atom count. Saved
atoms without projections or a fit history get the whole frame for the 3D view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from engine.io.atoms import UNKNOWN_SPECIES, Atoms

from .palette import (TRUTH_COLOURS, amplitude_colours, amplitude_range, atom_radii, element_colour,
                      species_colours)
from .raster import diverging_map, grey_map, line_plot, text_image
from .render import BACKGROUND, OrbitCamera, renderer_for

FRAME_SHAPE = (720, 1280)
STATUS_H = 32
GAP = 8
VIEW_BOX = (STATUS_H + GAP, GAP, 672, 672)  # y, x, height, width
FULL_VIEW_BOX = (STATUS_H + GAP, GAP, FRAME_SHAPE[0] - STATUS_H - 2 * GAP, FRAME_SHAPE[1] - 2 * GAP)
RIGHT_X = VIEW_BOX[1] + VIEW_BOX[3] + GAP + 4
RIGHT_W = FRAME_SHAPE[1] - RIGHT_X - GAP
PANEL = 184  # px, each projection image is resampled to fit a PANEL x PANEL square
TEXT_H = 14  # px, the bitmap font at scale 2
STRIP_BOX = (STATUS_H + GAP, RIGHT_X, 3 * TEXT_H + PANEL + 12, RIGHT_W)
LOSS_BOX = (STRIP_BOX[0] + STRIP_BOX[2] + GAP, RIGHT_X, 200, RIGHT_W)
COUNT_BOX = (LOSS_BOX[0] + LOSS_BOX[2] + GAP, RIGHT_X, FRAME_SHAPE[0] - LOSS_BOX[0] - LOSS_BOX[2] - 2 * GAP, RIGHT_W)

PAGE = 236  # grey level of the frame's background (a scalar: np.full with a tuple is 60x slower)
STATUS_BG = (40, 44, 52)
VIEW_BG = tuple(int(round(255 * c)) for c in BACKGROUND)
TEXT_LIGHT = (235, 235, 235)
AXIS_COLOUR = (1.0, 0.35, 0.85)
"""The tilt axis of the current projection."""
BEAM_COLOUR = (0.2, 0.85, 0.95)
"""The beam direction of the current projection, arrow head at the detector side."""
COLOUR_MODES = ("species", "amplitude", "uncertainty")
DEFAULT_ANGLES = (35.0, -25.0)
"""Starting camera azimuth and elevation (degrees): turned about the tilt axis, seen from a little above."""


@dataclass
class Snapshot:
    """What a frame shows. Positions in Å, angles in degrees, images in data units.

    atoms      : the fitted atoms (species, positions; columns 'amplitude', 'width' when known).
    rotations  : (n, 3, 3) world → beam rotation of each projection, or None (then tilt 0 about y).
    tilt_axes  : (n, 2) tilt axis of each projection in its image plane (x', y'), or None.
    angles     : (n,) nominal tilt angles, or None.
    tilt       : index of the projection shown.
    measured, predicted : (H, W) images of projection ``tilt`` on one scale, or None.
    history    : {"iteration": [...], "loss": [...], "atoms": [...]} of the fit so far.
    iteration, iterations : the fit's step and total steps (None for saved results).
    rate       : fit steps per second, drawing excluded (None when unknown).
    label      : what is shown (e.g. a file name) when there is no fit.
    status     : a word for the status bar, e.g. "PAUSED".
    """

    atoms: Atoms
    rotations: np.ndarray | None = None
    tilt_axes: np.ndarray | None = None
    angles: np.ndarray | None = None
    tilt: int = 0
    measured: np.ndarray | None = None
    predicted: np.ndarray | None = None
    history: dict = field(default_factory=dict)
    iteration: int | None = None
    iterations: int | None = None
    rate: float | None = None
    label: str = ""
    status: str = ""


def default_camera() -> OrbitCamera:
    camera = OrbitCamera()
    camera.set_angles(*DEFAULT_ANGLES)
    return camera


@dataclass
class ViewSettings:
    """How a frame is drawn: camera, colour mode ('species', 'amplitude', 'uncertainty': the position's
    σ, or 'displacement': the atoms' ``displacement_pm`` column over 0..``colour_max`` pm, a time
    series' states), truth overlay (atoms matched within ``match_radius`` Å, missed and spurious in
    `palette.TRUTH_COLOURS`)."""

    camera: OrbitCamera = field(default_factory=default_camera)
    colour_mode: str = "species"
    colour_max: float | None = None
    truth: Atoms | None = None
    show_truth: bool = False
    match_radius: float = 1.0
    framed: bool = False  # the camera has been fitted to the atoms once

    def frame_once(self, atoms: Atoms) -> None:
        """Fit the camera to ``atoms`` the first time there are any (later frames keep the user's view)."""
        if not self.framed and len(atoms):
            self.camera.frame(atoms.positions, atom_radii(atoms.species, atoms.columns.get("width")))
            self.framed = True


# ---------------------------------------------------------------- 3D view


def atom_appearance(atoms: Atoms, settings: ViewSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Spheres to draw and their legend: centres (N, 3) Å, radii (N,) Å, colours (N, 3), and legend
    rows [(label, RGB 0..1)] or, for amplitudes and uncertainties, [(label, (lo, hi))] (a colour bar)."""
    radii = atom_radii(atoms.species, atoms.columns.get("width"))
    if settings.show_truth and settings.truth is not None:
        from engine.evaluate.metrics import match_atoms

        truth = settings.truth
        match = match_atoms(atoms.positions, truth.positions, settings.match_radius)
        matched = np.zeros(len(atoms), bool)
        matched[match.pairs[:, 0]] = True
        missed = np.ones(len(truth), bool)
        missed[match.pairs[:, 1]] = False
        colours = np.where(matched[:, None], TRUTH_COLOURS["matched"], TRUTH_COLOURS["spurious"])
        centres = np.concatenate([atoms.positions, truth.positions[missed]])
        radii = np.concatenate([radii, atom_radii(truth.species[missed])])
        colours = np.concatenate([colours, np.tile(TRUTH_COLOURS["missed"], (int(missed.sum()), 1))])
        legend = [(f"MATCHED {int(matched.sum())}", TRUTH_COLOURS["matched"]),
                  (f"MISSED {int(missed.sum())}", TRUTH_COLOURS["missed"]),
                  (f"SPURIOUS {int((~matched).sum())}", TRUTH_COLOURS["spurious"])]
        return centres, radii, colours.reshape(-1, 3), legend
    if settings.colour_mode == "amplitude" and "amplitude" in atoms.columns:
        lo, hi = amplitude_range(atoms.columns["amplitude"])
        return atoms.positions, radii, amplitude_colours(atoms.columns["amplitude"], lo, hi), [("AMPLITUDE", (lo, hi))]
    if settings.colour_mode == "displacement" and "displacement_pm" in atoms.columns:
        moved = atoms.columns["displacement_pm"]
        hi = settings.colour_max or max(float(moved.max(initial=0.0)), 1.0)
        return atoms.positions, radii, amplitude_colours(moved, 0.0, hi), [("DISPLACEMENT PM", (0.0, hi))]
    if settings.colour_mode == "uncertainty" and "pos_uncertainty" in atoms.columns:
        sigma_pm = atoms.columns["pos_uncertainty"] * 100  # RMS over x, y, z of the position's σ
        lo, hi = amplitude_range(sigma_pm[np.isfinite(sigma_pm)])
        return atoms.positions, radii, amplitude_colours(sigma_pm, lo, hi), [("SIGMA PM", (lo, hi))]
    names = sorted(set(atoms.species.tolist()))
    legend = [("UNKNOWN" if s == UNKNOWN_SPECIES else s, element_colour(s)) for s in names]
    return atoms.positions, radii, species_colours(atoms.species), legend


def axis_segments(snapshot: Snapshot, length: float) -> list:
    """The current projection's tilt axis and beam direction through the rotation centre (the world
    origin), ``length`` Å from it each way; the beam gets an arrow head where it leaves."""
    if snapshot.rotations is None:
        rotation, axis_image = np.eye(3), np.array([0.0, 1.0])
    else:
        rotation = snapshot.rotations[snapshot.tilt]
        axis_image = snapshot.tilt_axes[snapshot.tilt] if snapshot.tilt_axes is not None else np.array([0.0, 1.0])
    beam = rotation.T @ np.array([0.0, 0.0, 1.0])
    axis = rotation.T @ np.array([axis_image[0], axis_image[1], 0.0])
    tip = length * beam
    back = tip - 0.15 * length * beam
    return [(-length * axis, length * axis, AXIS_COLOUR),
            (-tip, tip, BEAM_COLOUR),
            (tip, back + 0.08 * length * axis, BEAM_COLOUR),
            (tip, back - 0.08 * length * axis, BEAM_COLOUR)]


def render_view(snapshot: Snapshot, settings: ViewSettings, shape=VIEW_BOX[2:]) -> np.ndarray:
    """The 3D view (H, W, 3) uint8: shaded atoms, tilt axis and beam, the colour legend bottom left
    and the line key bottom right."""
    settings.frame_once(snapshot.atoms)
    centres, radii, colours, legend = atom_appearance(snapshot.atoms, settings)
    reach = float(np.max(np.linalg.norm(centres, axis=1))) + 2.0 if len(centres) else 10.0
    image = renderer_for(shape).render(settings.camera, centres, radii, colours,
                                       axis_segments(snapshot, reach))
    _legend(image, legend, bottom=shape[0] - GAP, left=GAP)
    _legend(image, [("TILT AXIS", AXIS_COLOUR), ("BEAM", BEAM_COLOUR)], bottom=shape[0] - GAP,
            left=shape[1] - GAP - 18 - _text("TILT AXIS").shape[1])
    return image


def _legend(image, rows, bottom: int, left: int) -> None:
    """Swatch + label rows stacked upwards from ``bottom``; a (label, (lo, hi)) row (amplitude, or
    the position's σ in pm) is a colour bar with its ends."""
    y = bottom
    for label, colour in reversed(rows):
        y -= TEXT_H + 4
        if len(colour) == 2:
            lo, hi = colour
            bar = np.rint(amplitude_colours(np.linspace(lo, hi, 120), lo, hi) * 255).astype(np.uint8)
            _paste(image, np.repeat(bar[None], TEXT_H, axis=0), y, left)
            _paste(image, _text(f"{label} {lo:.3g} TO {hi:.3g}".upper(), TEXT_LIGHT, VIEW_BG), y, left + 128)
        else:
            image[y:y + 12, left:left + 12] = np.rint(np.asarray(colour) * 255)
            _paste(image, _text(label, TEXT_LIGHT, VIEW_BG), y, left + 18)


# ---------------------------------------------------------------- 2D panels


@lru_cache(maxsize=256)
def _text(text: str, colour=(0, 0, 0), background=(PAGE,) * 3, scale: int = 2) -> np.ndarray:
    """A text image, cached: most labels repeat from frame to frame. Read only (`_paste` copies it)."""
    image = text_image(text, scale=scale, colour=colour, background=background)
    image.flags.writeable = False
    return image


def _paste(canvas: np.ndarray, image: np.ndarray, y: int, x: int) -> None:
    """Copy ``image`` into ``canvas`` with its top-left at (y, x), clipped to the canvas."""
    h = min(image.shape[0], canvas.shape[0] - y)
    w = min(image.shape[1], canvas.shape[1] - x)
    if h > 0 and w > 0:
        canvas[y:y + h, x:x + w] = image[:h, :w]


def _fit_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resample so the longer side is ``size`` px (aspect kept)."""
    h, w = rgb.shape[:2]
    zoom = size / max(h, w)
    rows = np.minimum((np.arange(max(1, round(h * zoom))) / zoom).astype(int), h - 1)
    cols = np.minimum((np.arange(max(1, round(w * zoom))) / zoom).astype(int), w - 1)
    return rgb[rows][:, cols]


def projection_strip(snapshot: Snapshot, shape=STRIP_BOX[2:]) -> np.ndarray:
    """Measured | predicted | residual of the current tilt (H, W, 3) uint8. All three share one
    scale: measured and predicted in grey over lo..hi (both images' range), the residual
    blue-white-red over ±(hi − lo)/2, the same span."""
    canvas = np.full(tuple(shape) + (3,), PAGE, np.uint8)
    if snapshot.measured is None:
        _paste(canvas, _text("NO PROJECTIONS (VIEW --DATA SERIES)"), TEXT_H, 0)
        return canvas
    measured, predicted = snapshot.measured, snapshot.predicted
    n = len(snapshot.angles) if snapshot.angles is not None else 1
    angle = f", {snapshot.angles[snapshot.tilt]:+.1f}°" if snapshot.angles is not None else ""
    # Numbered from 0, as `--tilt` and every error message count projections.
    _paste(canvas, _text(f"PROJECTION {snapshot.tilt} OF 0-{n - 1}{angle}"), 0, 0)
    lo = float(min(np.nanmin(measured), np.nanmin(predicted)))
    hi = float(max(np.nanmax(measured), np.nanmax(predicted)))
    half_span = 0.5 * (hi - lo)
    images = (grey_map(measured, lo, hi), grey_map(predicted, lo, hi), diverging_map(measured - predicted, half_span))
    step = (shape[1] - PANEL) // 2
    for i, (title, rgb) in enumerate(zip(("MEASURED", "PREDICTED", "RESIDUAL"), images)):
        x = i * step
        _paste(canvas, _text(title), TEXT_H + 4, x)
        _paste(canvas, _fit_square(rgb, PANEL), 2 * TEXT_H + 8, x)
    _paste(canvas, _text(f"SCALE {lo:.3g} TO {hi:.3g}, RESIDUAL +-{half_span:.3g}".upper()),
           2 * TEXT_H + PANEL + 12, 0)
    return canvas


def history_plot(history: dict, key: str, title: str, shape, logy: bool) -> np.ndarray:
    """``history[key]`` against iteration as a `raster.line_plot` of ``shape`` (H, W); a note when
    there is no history."""
    x = np.asarray(history.get("iteration", []), float)
    y = np.asarray(history.get(key, []), float)
    if len(x) == 0:
        canvas = np.full(tuple(shape) + (3,), PAGE, np.uint8)
        _paste(canvas, _text(f"{title}: NO FIT HISTORY"), TEXT_H, 0)
        return canvas
    return line_plot(x, y, title, tuple(shape), logy=logy)


def status_line(snapshot: Snapshot) -> str:
    parts = ["ATOMSPLAT"]
    if snapshot.iteration is not None:
        parts.append(f"ITERATION {snapshot.iteration} OF {snapshot.iterations}")
    elif snapshot.label:
        parts.append(snapshot.label)
    parts.append(f"ATOMS {len(snapshot.atoms)}")
    if snapshot.rate is not None:
        parts.append(f"{snapshot.rate:.1f} IT/S")
    losses = snapshot.history.get("loss", [])
    if len(losses):
        parts.append(f"LOSS {losses[-1]:.4g}")
    if snapshot.status:
        parts.append(snapshot.status)
    return "   ".join(parts).upper()


def view_box(snapshot: Snapshot | None) -> tuple:
    """Where the 3D view goes (y, x, height, width): the whole frame below the status bar when there
    is nothing else to show (saved atoms without projections or a fit history), else VIEW_BOX."""
    if snapshot is not None and snapshot.measured is None and not (snapshot.history or {}).get("iteration"):
        return FULL_VIEW_BOX
    return VIEW_BOX


def compose_frame(snapshot: Snapshot, settings: ViewSettings) -> np.ndarray:
    """The full frame (FRAME_SHAPE + (3,)) uint8 RGB."""
    frame = np.full(FRAME_SHAPE + (3,), PAGE, np.uint8)
    frame[:STATUS_H] = STATUS_BG
    _paste(frame, _text(status_line(snapshot), TEXT_LIGHT, STATUS_BG), (STATUS_H - TEXT_H) // 2, GAP)
    if view_box(snapshot) == FULL_VIEW_BOX:
        y, x, h, w = FULL_VIEW_BOX
        frame[y:y + h, x:x + w] = render_view(snapshot, settings, (h, w))
        return frame
    for (y, x, h, w), image in (
            (VIEW_BOX, render_view(snapshot, settings)),
            (STRIP_BOX, projection_strip(snapshot)),
            (LOSS_BOX, history_plot(snapshot.history, "loss", "LOSS", LOSS_BOX[2:], logy=True)),
            (COUNT_BOX, history_plot(snapshot.history, "atoms", "ATOMS", COUNT_BOX[2:], logy=False))):
        frame[y:y + h, x:x + w] = image
    return frame
