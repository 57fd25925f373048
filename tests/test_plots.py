"""Tests of engine.plots: bitmap text, the projection panel's layout and colour scales, line plots
(straight lines, continuity, log-y with zeros) and PNG writing."""

import imageio.v3 as iio
import numpy as np
import pytest

from engine import plots

WHITE = (255, 255, 255)

# Hand-drawn expectations, independent of the module's font table.
ONE = ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]
MINUS = [".....", ".....", ".....", "#####", ".....", ".....", "....."]


def _bitmap(rows):
    return np.array([[c == "#" for c in row] for row in rows])


def _grey(values, lo, hi):
    """The expected grey level of each value, computed here rather than by the module."""
    level = np.rint(255 * (values - lo) / (hi - lo)).astype(np.uint8)
    return np.repeat(level[..., None], 3, axis=-1)


def _block(image, origin, shape):
    (y, x), (h, w) = origin, shape
    return image[y:y + h, x:x + w]


def _frame_box(image):
    """(top, bottom, left, right) of the black axes frame: the outermost rows and columns that are
    nearly as black as the blackest (text adds a few black pixels to some frame lines)."""
    black = (image == 0).all(axis=-1)
    rows, cols = black.sum(axis=1), black.sum(axis=0)
    top_bottom = np.flatnonzero(rows > 0.9 * rows.max())
    left_right = np.flatnonzero(cols > 0.9 * cols.max())
    return top_bottom[0], top_bottom[-1], left_right[0], left_right[-1]


def _curve_pixels(image, colour):
    """Rows and columns of ``colour`` pixels strictly inside the axes frame, as a boolean mask."""
    top, bottom, left, right = _frame_box(image)
    inside = np.zeros(image.shape[:2], bool)
    inside[top + 1:bottom, left + 1:right] = True
    return (image == colour).all(axis=-1) & inside, (top, bottom, left, right)


# ---------------------------------------------------------------- text


def test_text_image_sets_pixels_exactly_on_the_glyphs():
    image = plots.text_image("1-", scale=1, colour=(10, 20, 30), background=(200, 201, 202))
    expected = np.zeros((7, 11), bool)
    expected[:, 0:5] = _bitmap(ONE)
    expected[:, 6:11] = _bitmap(MINUS)  # column 5 is the blank gap
    assert image.shape == (7, 11, 3) and image.dtype == np.uint8
    assert ((image == (10, 20, 30)).all(axis=-1) == expected).all()
    assert ((image == (200, 201, 202)).all(axis=-1) == ~expected).all()


def test_text_image_scales_each_font_pixel_to_a_block():
    image = plots.text_image("-", scale=3)
    ink = (image == 0).all(axis=-1)
    assert image.shape == (21, 15, 3)
    assert ink[9:12].all() and not ink[:9].any() and not ink[12:].any()
    assert ((image == WHITE).all(axis=-1) == ~ink).all()


def test_text_image_case_unknown_characters_and_blank():
    assert (plots.text_image("angle") == plots.text_image("ANGLE")).all()
    assert (plots.text_image("~") == plots.text_image("?")).all()
    assert (plots.text_image("   ") == 255).all()
    assert not (plots.text_image("-60.0°") == 255).all()
    with pytest.raises(ValueError):
        plots.text_image("A", scale=0)


# ---------------------------------------------------------------- projection panel


def _stacks(seed=0, shape=(5, 24, 24)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape), rng.normal(size=shape)


def test_panel_grid_layout_and_measured_values():
    measured, predicted = _stacks()
    angles = np.array([0.0, 60.0, -30.0, -60.0, 30.0])
    image = plots.projection_panel(measured, predicted, angles)
    layout = plots.panel_layout((24, 24), 3)

    assert image.shape == layout.shape + (3,) and image.dtype == np.uint8
    assert layout.zoom == 8 and layout.panel == (192, 192)
    # 4-px gutters between columns and rows.
    for r in range(3):
        xs = [layout.origins[r][c][1] for c in range(3)]
        assert np.diff(xs).tolist() == [196, 196]
    assert [layout.origins[r][0][0] for r in range(3)] == [layout.origins[0][0][0] + 196 * r for r in range(3)]
    y, x = layout.origins[0][1]
    assert (image[y:y + 192, x - 4:x] == 255).all()
    assert (image[y + 192:y + 196, x:x + 192] == 255).all()

    # Rows are the lowest, middle and highest angle: indices 3, 0, 1.
    rows = [3, 0, 1]
    lo = min(measured[rows].min(), predicted[rows].min())
    hi = max(measured[rows].max(), predicted[rows].max())
    for r, tilt in enumerate(rows):
        expected = _grey(measured[tilt], lo, hi).repeat(8, axis=0).repeat(8, axis=1)
        assert (_block(image, layout.origins[r][0], layout.panel) == expected).all()
        assert (_block(image, layout.origins[r][1], layout.panel)[5 * 8 + 3, 7 * 8 + 4]
                == _grey(predicted[tilt][5, 7], lo, hi)).all()


def test_panel_layout_upscales_to_the_minimum_size():
    assert plots.panel_layout((40, 50), 3).zoom == 4          # 50 * 3 = 150 would be too small
    assert plots.panel_layout((40, 50), 3).panel == (160, 200)
    assert plots.panel_layout((300, 100), 1).zoom == 1        # never shrunk
    wide = plots.panel_layout((10, 10), 2)
    assert wide.panel == (200, 200) and wide.column_width == 200


def test_panel_rows_follow_indices():
    measured, predicted = _stacks(1)
    image = plots.projection_panel(measured, predicted, np.arange(5.0), indices=[4, 2])
    layout = plots.panel_layout((24, 24), 2)
    lo = min(measured[[4, 2]].min(), predicted[[4, 2]].min())
    hi = max(measured[[4, 2]].max(), predicted[[4, 2]].max())
    assert image.shape == layout.shape + (3,)
    expected = _grey(measured[2], lo, hi).repeat(8, axis=0).repeat(8, axis=1)
    assert (_block(image, layout.origins[1][0], layout.panel) == expected).all()


def test_residual_of_identical_stacks_is_white():
    measured, _ = _stacks(2)
    image = plots.projection_panel(measured, measured.copy(), np.linspace(-60, 60, 5))
    layout = plots.panel_layout((24, 24), 3)
    for r in range(3):
        assert (_block(image, layout.origins[r][2], layout.panel) == 255).all()
        assert not (_block(image, layout.origins[r][0], layout.panel) == 255).all()


def test_measured_and_predicted_share_one_scale():
    measured = np.zeros((3, 16, 16))
    predicted = np.zeros((3, 16, 16))
    measured[1, 2, 3] = 4.0       # measured's own max is not the global one
    measured[1, 9, 9] = -1.0      # global min
    predicted[1, 5, 6] = 10.0     # global max
    image = plots.projection_panel(measured, predicted, [-45.0, 0.0, 45.0], indices=[1])
    layout = plots.panel_layout((16, 16), 1)
    zoom = layout.zoom
    meas = _block(image, layout.origins[0][0], layout.panel)
    pred = _block(image, layout.origins[0][1], layout.panel)

    def pixel(panel, i, j):
        return tuple(panel[i * zoom + zoom // 2, j * zoom + zoom // 2])

    assert pixel(pred, 5, 6) == WHITE                                  # global max: top colour
    assert pixel(meas, 9, 9) == (0, 0, 0)                              # global min: bottom colour
    assert pixel(meas, 2, 3) == tuple(_grey(np.array(4.0), -1.0, 10.0))  # not stretched to white
    assert pixel(meas, 0, 0) == pixel(pred, 0, 0) == tuple(_grey(np.array(0.0), -1.0, 10.0))

    # Residual: the largest |residual| (−10, at the predicted peak) takes the blue end of the bar;
    # zero is white (the bar's whitest part is its centre) and the smaller +4 is a paler red than
    # the bar's red end.
    resid = _block(image, layout.origins[0][2], layout.panel)
    y, x, width = layout.bars[1]
    bar = image[y + plots.BAR_H // 2, x:x + width]
    assert pixel(resid, 5, 6) == tuple(bar[0])
    assert pixel(resid, 0, 0) == WHITE
    assert abs(bar.astype(int).sum(axis=1).argmax() - width / 2) <= 1
    red = np.array(pixel(resid, 2, 3), int)
    assert red[0] > red[2] and (red[1:] > bar[-1][1:]).all()


def test_panel_rejects_mismatched_input():
    measured, predicted = _stacks()
    with pytest.raises(ValueError):
        plots.projection_panel(measured, predicted[:, :20], np.arange(5.0))
    with pytest.raises(ValueError):
        plots.projection_panel(measured, predicted, np.arange(4.0))
    with pytest.raises(ValueError):
        plots.projection_panel(measured, predicted, np.arange(5.0), indices=[0, 5])


# ---------------------------------------------------------------- line plot


def test_straight_line_runs_along_the_diagonal_of_the_axes():
    image = plots.line_plot({"line": np.arange(50.0)}, title="test", xlabel="iteration", ylabel="value")
    assert image.shape == (480, 800, 3)
    curve, (top, bottom, left, right) = _curve_pixels(image, plots.PALETTE[0])
    assert right - left > 500 and bottom - top > 250

    # Every column inside the axes holds the curve (x spans the data exactly) ...
    cols = np.arange(left + 1, right)
    assert curve[:, cols].any(axis=0).all()
    # ... on a straight rising line ...
    centre = np.array([np.flatnonzero(curve[:, c]).mean() for c in cols])
    slope, offset = np.polyfit(cols, centre, 1)
    assert slope < 0 and np.abs(centre - (slope * cols + offset)).max() < 1.0
    # ... with equal margins above and below (y padded the same on both sides).
    rows = np.flatnonzero(curve.any(axis=1))
    assert rows[0] - top > 5 and abs((rows[0] - top) - (bottom - rows[-1])) <= 2


def test_steep_segments_are_continuous():
    image = plots.line_plot({"a": (np.array([0.0, 1.0, 20.0]), np.array([0.0, 1.0, 1.0]))})
    curve, _ = _curve_pixels(image, plots.PALETTE[0])
    rows = np.flatnonzero(curve.any(axis=1))
    assert rows.size > 300 and (np.diff(rows) == 1).all()


def test_series_get_distinct_colours():
    image = plots.line_plot({"a": np.arange(10.0), "b": np.arange(10.0)[::-1], "c": (np.arange(3.0), np.ones(3))})
    for colour in plots.PALETTE[:3]:
        assert _curve_pixels(image, colour)[0].sum() > 100


def test_log_y_leaves_out_non_positive_values():
    x = np.linspace(0.0, 4.0, 41)
    y = 10.0 ** x
    y[[0, 20]] = 0.0
    y[40] = -3.0
    image = plots.line_plot({"loss": (x, y)}, logy=True)
    no_gaps = y.copy()
    no_gaps[[0, 20, 40]] = np.nan
    assert (image == plots.line_plot({"loss": (x, no_gaps)}, logy=True)).all()

    # An exponential is a straight line on log axes, broken where the zero was.
    curve, (top, bottom, left, right) = _curve_pixels(image, plots.PALETTE[0])
    cols = np.flatnonzero(curve.any(axis=0))
    centre = np.array([np.flatnonzero(curve[:, c]).mean() for c in cols])
    slope, offset = np.polyfit(cols, centre, 1)
    assert slope < 0 and np.abs(centre - (slope * cols + offset)).max() < 1.0
    # x runs over 0.1 .. 3.9 (the finite points): the zero at x = 2 sits mid-way, with nothing drawn.
    gap = int(round((cols[0] + cols[-1]) / 2))
    assert not curve[:, gap - 2:gap + 3].any()


def test_log_y_with_nothing_positive_draws_empty_axes():
    image = plots.line_plot({"zeros": np.zeros(10)}, logy=True)
    curve, _ = _curve_pixels(image, plots.PALETTE[0])
    assert not curve.any()


# ---------------------------------------------------------------- PNG


def test_png_round_trip_and_atomic_replace(tmp_path):
    rng = np.random.default_rng(3)
    first = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    second = rng.integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    path = tmp_path / "figure.png"
    assert plots.save_png(first, path) == path
    assert (iio.imread(path) == first).all()
    plots.save_png(second, path)
    assert (iio.imread(path) == second).all()
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


@pytest.mark.parametrize("shape", [(30, 40), (30, 40, 3), (30, 40, 4)])
def test_fast_png_reads_back_exactly(tmp_path, shape):
    image = np.random.default_rng(4).integers(0, 256, size=shape, dtype=np.uint8)
    plots.save_png(image, tmp_path / "fast.png", fast=True)
    assert np.array_equal(iio.imread(tmp_path / "fast.png"), image)


def test_plots_write_what_they_return(tmp_path):
    measured, predicted = _stacks()
    panel = plots.projection_panel(measured, predicted, np.arange(5.0), path=tmp_path / "panel.png")
    curve = plots.line_plot({"loss": np.arange(1.0, 9.0)}, path=tmp_path / "loss.png", logy=True)
    assert (iio.imread(tmp_path / "panel.png") == panel).all()
    assert (iio.imread(tmp_path / "loss.png") == curve).all()
