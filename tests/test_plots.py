"""Tests of engine.io.plots, the report figures drawn with matplotlib: the files (PNG, readable,
the figure's size, written atomically), the projection panel's layout and colour scales, the loss
curves' axes, and no trouble with constant, NaN or non-positive data."""

import sys
import warnings

import imageio.v3 as iio
import numpy as np
import pytest

from engine.io import plots


@pytest.fixture(autouse=True)
def warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _stacks(seed=0, shape=(5, 24, 32)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape), rng.normal(size=shape)


def _image_axes(figure):
    """The axes showing projections (the colour bars' axes hold no image of their own data)."""
    return [ax for ax in figure.axes if ax.images and ax.get_title()]


def _figure_pixels(figure):
    width, height = figure.get_size_inches() * plots.DPI
    return int(round(height)), int(round(width))


# ---------------------------------------------------------------- projection panel


def test_panel_file_is_a_png_of_the_figure(tmp_path):
    measured, predicted = _stacks()
    path = tmp_path / "projections.png"
    assert plots.projection_panel(measured, predicted, np.linspace(-60, 60, 5), path=path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = iio.imread(path)
    expected = _figure_pixels(plots.projection_figure(measured, predicted, np.linspace(-60, 60, 5)))
    assert image.dtype == np.uint8 and image.shape[:2] == expected and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 10  # something is drawn
    assert [p.name for p in tmp_path.iterdir()] == ["projections.png"]  # no temporary left


def test_panel_has_three_rows_at_the_lowest_middle_and_highest_tilt():
    measured, predicted = _stacks()
    angles = np.array([0.0, 60.0, -30.0, -60.0, 30.0])
    figure = plots.projection_figure(measured, predicted, angles)
    axes = _image_axes(figure)
    assert len(axes) == 9
    rows = sorted({round(ax.get_position().y0, 3) for ax in axes}, reverse=True)
    columns = sorted({round(ax.get_position().x0, 3) for ax in axes})
    assert len(rows) == 3 and len(columns) == 3
    # Top to bottom -60°, 0°, +60° (indices 3, 0, 1); columns measured, predicted, residual.
    by_place = {(rows.index(round(ax.get_position().y0, 3)), columns.index(round(ax.get_position().x0, 3))): ax
                for ax in axes}
    for r, (tilt, label) in enumerate(((3, "−60.0°"), (0, "+0.0°"), (1, "+60.0°"))):
        for c, name in enumerate(plots.COLUMNS):
            ax = by_place[r, c]
            assert name in ax.get_title() and label in ax.get_title()
            shown = ax.images[0].get_array()
            expected = (measured, predicted, measured - predicted)[c][tilt]
            assert np.allclose(shown, expected)
    # Two colour bars with units: the shared grey scale and the residual's.
    labels = [ax.get_xlabel() for ax in figure.axes if not ax.get_title()]
    assert any("projection (data units)" in t for t in labels) and any("measured − predicted" in t for t in labels)
    assert all("(px)" in ax.get_xlabel() for r, ax in by_place.items() if r[0] == 2)


def test_measured_and_predicted_share_one_scale_and_the_residual_is_centred():
    measured = np.zeros((3, 16, 16))
    predicted = np.zeros((3, 16, 16))
    measured[1, 9, 9] = -1.0      # global min
    predicted[1, 5, 6] = 10.0     # global max
    measured[0, 0, 0] = 99.0      # not a chosen tilt: outside the scale
    figure = plots.projection_figure(measured, predicted, [-45.0, 0.0, 45.0], indices=[1])
    meas, pred, resid = _image_axes(figure)
    assert meas.images[0].get_clim() == pred.images[0].get_clim() == (-1.0, 10.0)
    assert resid.images[0].get_clim() == (-10.0, 10.0)
    assert meas.images[0].cmap.name != resid.images[0].cmap.name


def test_panel_rows_follow_indices_and_pixel_size_gives_angstrom():
    measured, predicted = _stacks(1)
    figure = plots.projection_figure(measured, predicted, np.arange(5.0), indices=[4, 2], pixel_size=0.5)
    axes = _image_axes(figure)
    assert len(axes) == 6
    assert sorted({ax.get_title().split("tilt ")[1] for ax in axes}) == ["+2.0°", "+4.0°"]
    assert any(ax.get_xlabel() == "x′ (Å)" for ax in axes) and any(ax.get_ylabel() == "y′ (Å)" for ax in axes)
    assert axes[0].images[0].get_extent() == [0, 32 * 0.5, 24 * 0.5, 0]


def test_constant_and_non_finite_images_draw_without_warnings(tmp_path):
    constant = np.full((4, 20, 20), 3.0)
    holes = constant.copy()
    holes[:, :5] = np.nan
    holes[:, 5] = np.inf
    plots.projection_panel(holes, constant, np.arange(4.0), path=tmp_path / "holes.png")
    # Nothing finite measured, predicted all zero: a constant scale and no residual range at all.
    figure = plots.projection_figure(np.full((3, 8, 8), np.nan), np.zeros((3, 8, 8)), np.arange(3.0))
    meas, _, resid = _image_axes(figure)[:3]
    assert meas.images[0].get_clim()[0] < 0 < meas.images[0].get_clim()[1]
    assert resid.images[0].get_clim() == (-1.0, 1.0)
    plots.save_figure(figure, tmp_path / "nan.png")
    for name in ("holes", "nan"):
        assert iio.imread(tmp_path / f"{name}.png").ndim == 3


def test_panel_rejects_mismatched_input(tmp_path):
    measured, predicted = _stacks()
    with pytest.raises(ValueError):
        plots.projection_panel(measured, predicted[:, :20], np.arange(5.0), path=tmp_path / "p.png")
    with pytest.raises(ValueError):
        plots.projection_panel(measured, predicted, np.arange(4.0), path=tmp_path / "p.png")
    with pytest.raises(ValueError):
        plots.projection_panel(measured, predicted, np.arange(5.0), path=tmp_path / "p.png", indices=[0, 5])
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- curves


def test_loss_plot_file_and_axes(tmp_path):
    it = np.arange(0.0, 101.0, 10.0)
    path = plots.line_plot({"loss": (it, 1e3 * np.exp(-it / 20))}, path=tmp_path / "loss.png",
                           title="Loss", xlabel="iteration", logy=True)
    image = iio.imread(path)
    assert image.dtype == np.uint8 and image.shape[:2] == (480, 800)
    figure = plots.line_figure({"loss": (it, 1e3 * np.exp(-it / 20))}, title="Loss", xlabel="iteration", logy=True)
    (ax,) = figure.axes
    assert ax.get_yscale() == "log" and ax.get_title() == "Loss" and ax.get_xlabel() == "iteration"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss"]
    x, y = ax.lines[0].get_data()
    assert np.array_equal(x, it) and np.allclose(y, 1e3 * np.exp(-it / 20))


def test_log_y_leaves_out_non_positive_values_and_falls_back_to_linear():
    y = np.array([5.0, 0.0, 2.0, -1.0, np.nan, 1.0])
    (ax,) = plots.line_figure({"loss": y}, logy=True).axes
    shown = ax.lines[0].get_ydata()
    assert np.array_equal(np.isnan(shown), [False, True, False, True, True, False])
    assert ax.get_yscale() == "log"
    (ax,) = plots.line_figure({"zeros": np.zeros(10)}, logy=True).axes  # nothing to show on a log axis
    assert ax.get_yscale() == "linear"


def test_several_series_get_distinct_colours_and_bad_series_are_refused():
    (ax,) = plots.line_figure({"a": np.arange(10.0), "b": (np.arange(3.0), np.ones(3))}).axes
    assert len(ax.lines) == 2 and ax.lines[0].get_color() != ax.lines[1].get_color()
    with pytest.raises(ValueError):
        plots.line_figure({"a": (np.arange(3.0), np.ones(4))})
    with pytest.raises(ValueError):
        plots.line_figure({"a": (np.arange(3.0),)})


# ---------------------------------------------------------------- writing


def test_save_figure_writes_png_whatever_the_name_and_replaces_atomically(tmp_path):
    first = plots.line_figure({"a": np.arange(5.0)})
    path = plots.save_figure(first, tmp_path / "figure")  # no extension: the format is explicit
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots.save_figure(plots.projection_figure(*_stacks(), np.arange(5.0)), path)
    assert iio.imread(path, extension=".png").shape[:2] != (480, 800)
    assert [p.name for p in tmp_path.iterdir()] == ["figure"]


def test_figures_leave_pyplot_alone():
    already = "matplotlib.pyplot" in sys.modules
    plots.line_figure({"a": np.arange(5.0)})
    if not already:
        assert "matplotlib.pyplot" not in sys.modules
