"""Tests of viewer.raster, the viewer frame's NumPy drawing: bitmap text, the grey and
blue-white-red colour maps, and the small line plot (straight lines, continuity, log-y with zeros)."""

import numpy as np
import pytest

from viewer import raster

WHITE = (255, 255, 255)
SIZE = (200, 560)  # (H, W) of the line plots here, as in the frame

# Hand-drawn expectations, independent of the module's font table.
ONE = ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]
MINUS = [".....", ".....", ".....", "#####", ".....", ".....", "....."]


def _bitmap(rows):
    return np.array([[c == "#" for c in row] for row in rows])


# ---------------------------------------------------------------- text


def test_text_image_sets_pixels_exactly_on_the_glyphs():
    image = raster.text_image("1-", scale=1, colour=(10, 20, 30), background=(200, 201, 202))
    expected = np.zeros((7, 11), bool)
    expected[:, 0:5] = _bitmap(ONE)
    expected[:, 6:11] = _bitmap(MINUS)  # column 5 is the blank gap
    assert image.shape == (7, 11, 3) and image.dtype == np.uint8
    assert ((image == (10, 20, 30)).all(axis=-1) == expected).all()
    assert ((image == (200, 201, 202)).all(axis=-1) == ~expected).all()


def test_text_image_scales_each_font_pixel_to_a_block():
    image = raster.text_image("-", scale=3)
    ink = (image == 0).all(axis=-1)
    assert image.shape == (21, 15, 3)
    assert ink[9:12].all() and not ink[:9].any() and not ink[12:].any()
    assert ((image == WHITE).all(axis=-1) == ~ink).all()


def test_text_image_case_unknown_characters_and_blank():
    assert (raster.text_image("angle") == raster.text_image("ANGLE")).all()
    assert (raster.text_image("~") == raster.text_image("?")).all()
    assert (raster.text_image("   ") == 255).all()
    assert not (raster.text_image("-60.0°") == 255).all()
    with pytest.raises(ValueError):
        raster.text_image("A", scale=0)


# ---------------------------------------------------------------- colour maps


def test_grey_map_is_linear_between_its_ends_and_clipped_beyond():
    values = np.array([[-5.0, 0.0, 1.0], [2.0, 4.0, 9.0]])
    image = raster.grey_map(values, 0.0, 4.0)
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    assert image[..., 0].tolist() == [[0, 0, 64], [128, 255, 255]]
    assert (raster.grey_map(np.full(4, 7.0), 7.0, 7.0) == 0).all()  # lo == hi: all black


def test_diverging_map_runs_blue_white_red():
    image = raster.diverging_map(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]), 1.0)
    assert tuple(image[0]) == tuple(image[1]) == tuple(raster.BLUE)
    assert tuple(image[2]) == WHITE
    assert tuple(image[4]) == tuple(image[5]) == tuple(raster.RED)
    assert image[3, 0] > image[3, 2] and image[3, 1] > raster.RED[1]  # paler red half way
    assert (raster.diverging_map(np.ones(3), 0.0) == 255).all()  # vmax 0: all white


def test_colour_maps_mark_non_finite_values():
    values = np.array([np.nan, np.inf, 1.0])
    for image in (raster.grey_map(values, 0.0, 2.0), raster.diverging_map(values, 2.0)):
        assert tuple(image[0]) == tuple(image[1]) == tuple(raster.NAN_COLOUR)
        assert tuple(image[2]) != tuple(raster.NAN_COLOUR)


# ---------------------------------------------------------------- line plot


def _frame_box(image):
    """(top, bottom, left, right) of the black axes frame: the outermost rows and columns that are
    nearly as black as the blackest (text adds a few black pixels to some frame lines)."""
    black = (image == 0).all(axis=-1)
    rows, cols = black.sum(axis=1), black.sum(axis=0)
    top_bottom = np.flatnonzero(rows > 0.9 * rows.max())
    left_right = np.flatnonzero(cols > 0.9 * cols.max())
    return top_bottom[0], top_bottom[-1], left_right[0], left_right[-1]


def _curve_pixels(image):
    """The curve's pixels strictly inside the axes frame, as a boolean mask."""
    top, bottom, left, right = _frame_box(image)
    inside = np.zeros(image.shape[:2], bool)
    inside[top + 1:bottom, left + 1:right] = True
    return (image == raster.CURVE).all(axis=-1) & inside, (top, bottom, left, right)


def test_straight_line_runs_along_the_diagonal_of_the_axes():
    image = raster.line_plot(np.arange(50.0), np.arange(50.0), "LINE", SIZE)
    assert image.shape == SIZE + (3,) and image.dtype == np.uint8
    curve, (top, bottom, left, right) = _curve_pixels(image)
    assert right - left > 400 and bottom - top > 120
    # Every column inside the axes holds the curve (x spans the data exactly) ...
    cols = np.arange(left + 1, right)
    assert curve[:, cols].any(axis=0).all()
    # ... on a straight rising line ...
    centre = np.array([np.flatnonzero(curve[:, c]).mean() for c in cols])
    slope, offset = np.polyfit(cols, centre, 1)
    assert slope < 0 and np.abs(centre - (slope * cols + offset)).max() < 1.0
    # ... with equal margins above and below (y padded the same on both sides).
    rows = np.flatnonzero(curve.any(axis=1))
    assert rows[0] - top > 3 and abs((rows[0] - top) - (bottom - rows[-1])) <= 2
    # The label's swatch sits above the axes.
    assert (image[:top] == raster.CURVE).all(axis=-1).sum() >= 20


def test_steep_segments_are_continuous():
    image = raster.line_plot(np.array([0.0, 1.0, 20.0]), np.array([0.0, 1.0, 1.0]), "A", SIZE)
    curve, (top, bottom, _, _) = _curve_pixels(image)
    rows = np.flatnonzero(curve.any(axis=1))
    assert rows.size > 0.8 * (bottom - top) and (np.diff(rows) == 1).all()


def test_log_y_leaves_out_non_positive_values():
    x = np.linspace(0.0, 4.0, 41)
    y = 10.0 ** x
    y[[0, 20]] = 0.0
    y[40] = -3.0
    image = raster.line_plot(x, y, "LOSS", SIZE, logy=True)
    no_gaps = y.copy()
    no_gaps[[0, 20, 40]] = np.nan
    assert (image == raster.line_plot(x, no_gaps, "LOSS", SIZE, logy=True)).all()
    # An exponential is a straight line on log axes, broken where the zero was.
    curve, _ = _curve_pixels(image)
    cols = np.flatnonzero(curve.any(axis=0))
    centre = np.array([np.flatnonzero(curve[:, c]).mean() for c in cols])
    slope, offset = np.polyfit(cols, centre, 1)
    assert slope < 0 and np.abs(centre - (slope * cols + offset)).max() < 1.0
    # x runs over 0.1 .. 3.9 (the finite points): the zero at x = 2 sits mid-way, with nothing drawn.
    gap = int(round((cols[0] + cols[-1]) / 2))
    assert not curve[:, gap - 2:gap + 3].any()


def test_log_y_with_nothing_positive_draws_empty_axes():
    image = raster.line_plot(np.arange(10.0), np.zeros(10), "ZEROS", SIZE, logy=True)
    assert not _curve_pixels(image)[0].any()


def test_line_plot_too_small_is_refused():
    with pytest.raises(ValueError):
        raster.line_plot(np.arange(3.0), np.arange(3.0), "A", (40, 560))
