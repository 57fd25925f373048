"""The viewer: the sphere rasteriser's pixels (on every backend), the camera's conventions, frame
PNGs, headless fit movies, the `view` command, mesh export and the viewer options' errors."""

import importlib.util

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from engine.io.atoms import Atoms, write_atoms
from engine.cli import main
from engine.core.errors import InputError
from engine.core.geometry import tilt_rotation
from engine.physics.simulate import simulate_tilt_series
from engine.io.tiltseries import TiltSeries, write_tilt_series
from viewer.frame import FRAME_SHAPE
from viewer.mesh import atoms_to_mesh, export_mesh, sphere_template
from viewer.palette import TRUTH_COLOURS, amplitude_colours, atom_radii, element_colour
from viewer.render import AMBIENT, BACKGROUND, DIFFUSE, LIGHT, OrbitCamera, renderer_for
from viewer.window import check_movie_path, display_available, write_png

SHAPE = (200, 200)  # px
EXTENT = 20.0  # Å across the view: 10 px per Å
BACKGROUND_RGB = np.rint(np.array(BACKGROUND) * 255).astype(int)


def lit_centre(symbol):
    """RGB (0..255) of a sphere's centre pixel: it faces the viewer, so n·l = −LIGHT_z."""
    return np.rint(np.array(element_colour(symbol)) * (AMBIENT + DIFFUSE * -LIGHT[2]) * 255).astype(int)


def render(atoms: Atoms, segments=()):
    camera = OrbitCamera(extent=EXTENT)  # looks along +z: x right, y down
    radii = atom_radii(atoms.species)
    colours = np.array([element_colour(s) for s in atoms.species])
    image = renderer_for(SHAPE).render(camera, atoms.positions, radii, colours, segments).astype(int)
    return image, camera.to_pixels(atoms.positions, SHAPE), radii * SHAPE[0] / EXTENT


def test_known_cloud_lands_where_atoms_project(arch):
    # Centres 0.05 Å off the grid put each disc centre on a pixel centre.
    atoms = Atoms(["Au", "O", "Ni"], np.array([[0.05, 0.05, 0.0], [4.05, -3.95, 1.0], [-5.95, 5.05, -2.0]]))
    image, centres, radii_px = render(atoms)
    assert np.allclose(centres, [[100.5, 100.5], [60.5, 140.5], [150.5, 40.5]])  # (row, col): +x right, +y down
    background = np.all(image == BACKGROUND_RGB, axis=-1)
    rows, cols = np.mgrid[:SHAPE[0], :SHAPE[1]] + 0.5
    inside = np.zeros(SHAPE, bool)
    for (r, c), radius in zip(centres, radii_px):
        inside |= (rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2
    # Non-background exactly on the discs, up to a few rim pixels where rounding decides.
    assert np.count_nonzero(background == inside) <= 12
    assert inside.sum() > 150 and background[:20].all() and background[:, -20:].all()
    for symbol, (r, c) in zip(atoms.species, centres):
        assert np.abs(image[int(r), int(c)] - lit_centre(symbol)).max() <= 1, symbol
    # Shading: the rim facing away from the light (lower right) is darker than the centre.
    r, c = centres[0].astype(int)
    assert image[r + 4, c + 4].sum() < image[r, c].sum()


def test_nearer_atom_and_line_win_the_depth_test(arch):
    near, far = [0.05, 0.05, -1.0], [0.05, 0.05, 1.0]  # the camera looks along +z: smaller z is nearer
    image, centres, _ = render(Atoms(["Au", "Ni"], np.array([near, far])))
    r, c = centres[0].astype(int)
    assert np.abs(image[r, c] - lit_centre("Au")).max() <= 1
    image, _, _ = render(Atoms(["Au", "Ni"], np.array([far, near])))
    assert np.abs(image[r, c] - lit_centre("Ni")).max() <= 1
    # A red line along x at y = 0: hidden behind the atom when behind it, drawn over it when in front.
    line = lambda z: [((-9.0, 0.05, z), (9.0, 0.05, z), (1.0, 0.0, 0.0))]
    behind, _, _ = render(Atoms(["Au"], np.array([near])), line(5.0))
    front, _, _ = render(Atoms(["Au"], np.array([near])), line(-5.0))
    assert np.abs(behind[r, c] - lit_centre("Au")).max() <= 1
    assert tuple(front[r, c]) == (255, 0, 0)
    assert tuple(behind[r, 10]) == (255, 0, 0)  # away from the atom the line shows either way


def test_camera_along_a_projection_sees_its_image_layout():
    camera = OrbitCamera(extent=EXTENT)
    rotation = tilt_rotation(np.array([40.0]))[0]
    camera.align_to(rotation)
    point = np.array([[1.0, 2.0, 3.0]])
    beam = rotation @ point[0]  # (x', y') are (col, row) directions of the projection
    row, col = camera.to_pixels(point, SHAPE)[0]
    assert np.allclose([col - 100, row - 100], beam[:2] * SHAPE[0] / EXTENT)
    camera.set_angles(40.0, 0.0)  # azimuth = turning about the tilt axis, as a tilt does
    assert np.allclose(camera.rotation, rotation)
    camera.orbit(10.0, 0.0)
    assert np.allclose(camera.rotation, tilt_rotation(np.array([50.0]))[0])
    target = camera.target.copy()
    camera.pan(10.0, 0.0, SHAPE[0])  # drag 10 px right: the scene follows the cursor
    assert np.allclose(camera.to_pixels(target[None], SHAPE)[0], [100.0, 110.0])


def test_palette():
    assert element_colour("Au") == pytest.approx((1.0, 209 / 255, 35 / 255))
    assert element_colour("Kr") != element_colour("Xe")  # outside the table: still distinct
    assert atom_radii(["Au", "X"], widths=[0.4, 0.4]) == pytest.approx([0.2 * 4.08 / np.sqrt(2), 1.4 * 0.4])
    ramp = amplitude_colours(np.array([0.0, 0.5, 1.0]), 0.0, 1.0)
    assert np.all(np.diff(ramp.sum(axis=1)) > 0)  # brighter with amplitude
    assert len({tuple(v) for v in TRUTH_COLOURS.values()}) == 3


def test_colour_by_uncertainty_has_its_scale_in_the_legend():
    from viewer.frame import VIEW_BG, ViewSettings, _legend, atom_appearance

    sigma = np.array([0.002, 0.004, 0.006, 0.030])  # Å
    atoms = Atoms(np.array(["Au"] * 4), np.zeros((4, 3)), {"pos_uncertainty": sigma})
    _, _, colours, legend = atom_appearance(atoms, ViewSettings(colour_mode="uncertainty"))
    label, (lo, hi) = legend[0]
    assert label == "SIGMA PM" and lo == pytest.approx(np.percentile(sigma * 100, 2))
    assert np.all(np.diff(colours.sum(axis=1)) > 0)  # brighter with σ
    image = np.full((60, 400, 3), np.rint(np.array(VIEW_BG)).astype(np.uint8), np.uint8)
    _legend(image, legend, bottom=50, left=5)
    assert len({tuple(c) for c in image[40:50, 5:125].reshape(-1, 3)}) > 20  # the colour bar
    # Without the column (a fit still running), atoms keep their element colours.
    _, _, plain, _ = atom_appearance(Atoms(np.array(["Au"]), np.zeros((1, 3))), ViewSettings(colour_mode="uncertainty"))
    assert plain[0] == pytest.approx(element_colour("Au"))


def test_mp4_without_an_encoder_is_a_clear_error(tmp_path):
    if any(importlib.util.find_spec(m) for m in ("imageio_ffmpeg", "av")):
        pytest.skip("an MP4 encoder is installed")
    with pytest.raises(InputError, match="imageio-ffmpeg"):
        check_movie_path(tmp_path / "fit.mp4")


def test_display_detection(monkeypatch):
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    assert not display_available()
    monkeypatch.setenv("DISPLAY", ":987")  # no such local X server
    assert not display_available()
    monkeypatch.setenv("DISPLAY", "remotehost:0")
    assert display_available()


def test_frame_png_round_trip_and_atomic_replace(tmp_path):
    rng = np.random.default_rng(3)
    first = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    second = rng.integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    path = tmp_path / "frame.png"
    assert write_png(first, path) == path
    assert (iio.imread(path) == first).all()
    write_png(second, path)
    assert (iio.imread(path) == second).all()
    assert [p.name for p in tmp_path.iterdir()] == ["frame.png"]


def test_mesh_export_reloads_with_one_sphere_per_atom(tmp_path):
    atoms = Atoms(["Au", "O", "Ni"], np.array([[0.0, 0, 0], [3, 0, 0], [0, 3, 0]]))
    vertices, faces = sphere_template()
    mesh = atoms_to_mesh(atoms)
    assert np.allclose(mesh.vertices[:len(vertices)].mean(axis=0), 0.0, atol=1e-9)  # atom 0's sphere
    for suffix in (".glb", ".ply"):
        path = export_mesh(atoms, tmp_path / f"atoms{suffix}")
        loaded = trimesh.load(path, force="mesh", process=False)
        assert loaded.vertices.shape == (3 * len(vertices), 3) and loaded.faces.shape == (3 * len(faces), 3)
        colours = np.asarray(loaded.visual.vertex_colors)[:, :3]
        assert tuple(colours[0]) == (255, 209, 35) and tuple(colours[len(vertices)]) == (255, 13, 13)


# ---------------------------------------------------------------- command line


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def no_display(monkeypatch):
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)


def write_scene(tmp_path, iters, every):
    scene = tmp_path / "tiny.toml"
    scene.write_text(f"""
[data.simulate]
build = {{ kind = "cuboctahedron", element = "Au", shells = 1 }}
tilts = "-60:60:30"
pixel_size = 0.3
shape = [48, 48]
noise = 0.01
[reconstruct]
iters = {iters}
species = ["Au"]
thermal_refits = 0
[output]
dir = "out"
[viewer]
view = true
every = {every}
""")
    return scene


def test_scene_view_without_display_records_a_movie(arch, tmp_path, capsys, no_display):
    # The scene asks for the live window; with no display the viewer goes headless, says so, and draws
    # every 10 iterations and at the last: 10, 20, 25.
    code, _, err = run_cli(capsys, "run", write_scene(tmp_path, iters=25, every=10), "--arch", arch, "--quiet")
    assert code == 0, err
    assert "no display found" in err
    out = tmp_path / "out"
    frames = sorted(p.name for p in (out / "frames").glob("*.png"))
    assert frames == ["frame_000010.png", "frame_000020.png", "frame_000025.png"]
    assert iio.imread(out / "frames" / frames[-1]).shape == FRAME_SHAPE + (3,)
    movie = iio.imread(out / "fit.gif", index=None)
    assert movie.shape[0] == 3 and movie.shape[1:3] == (FRAME_SHAPE[0] // 2, FRAME_SHAPE[1] // 2)
    # The CLI's --view-every overrides the scene; a new fit clears the earlier frames.
    code, _, err = run_cli(capsys, "run", tmp_path / "tiny.toml", "--arch", arch, "--quiet", "--overwrite",
                           "--headless", "--view-every", "20", "--movie", tmp_path / "fit.gif")
    assert code == 0, err
    assert sorted(p.name for p in (out / "frames").glob("*.png")) == ["frame_000020.png", "frame_000025.png"]
    assert iio.imread(tmp_path / "fit.gif", index=None).shape[0] == 2


def test_view_command_renders_saved_results(arch, tmp_path, capsys, no_display):
    truth = Atoms(["Au", "Au"], np.array([[-1.5, 0.0, 0.0], [1.5, 0.0, 0.0]]))
    series = simulate_tilt_series(truth, np.array([-30.0, 0.0, 30.0]), 0.3, (40, 40), blur_sigma=0.4)
    write_tilt_series(series, tmp_path / "series.npz")
    write_atoms(truth, tmp_path / "truth.xyz")
    fitted = Atoms(["Au", "Au", "Au"], np.array([[-1.5, 0.02, 0.0], [1.5, 0.0, 0.0], [0.0, 3.0, 0.0]]),
                   {"amplitude": np.full(3, 500.0), "width": np.full(3, 0.4)})
    write_atoms(fitted, tmp_path / "atoms.xyz")

    code, _, err = run_cli(capsys, "view", tmp_path / "atoms.xyz", "--data", tmp_path / "series.npz", "--truth",
                           tmp_path / "truth.xyz", "--out", tmp_path / "view.png", "--arch", arch)
    assert code == 0, err
    frame = iio.imread(tmp_path / "view.png")
    assert frame.shape == FRAME_SHAPE + (3,)
    colours = {tuple(c) for c in frame.reshape(-1, 3)}
    lit = lambda name: tuple(np.rint(np.array(TRUTH_COLOURS[name]) * (AMBIENT + DIFFUSE * -LIGHT[2]) * 255).astype(int))
    assert lit("matched") in colours and lit("spurious") in colours  # two found, one made up
    # No display and no --out: the PNG goes beside the atoms, with a notice; never over an existing one.
    code, _, err = run_cli(capsys, "view", tmp_path / "atoms.xyz", "--arch", arch)
    assert code == 0 and "no display found" in err and (tmp_path / "atoms_view.png").exists()
    code, _, err = run_cli(capsys, "view", tmp_path / "atoms.xyz", "--arch", arch)
    assert code == 2 and "atoms_view.png" in err and "--overwrite" in err
    # --mesh alone writes only the mesh.
    code, _, err = run_cli(capsys, "view", tmp_path / "atoms.xyz", "--mesh", tmp_path / "atoms.glb")
    assert code == 0 and len(trimesh.load(tmp_path / "atoms.glb", force="mesh", process=False).faces) == 3 * 320


@pytest.mark.parametrize("argv, words", [
    (["view", "missing.xyz"], ["missing.xyz"]),
    (["view", "atoms.xyz", "--mesh", "atoms.obj"], ["atoms.obj", ".glb"]),
    (["view", "atoms.xyz", "--tilt", "2"], ["--tilt", "--data"]),
    (["reconstruct", "series.npz", "--headless", "--view-every", "0"], ["--view-every", ">= 1"]),
    (["reconstruct", "series.npz", "--view-every", "5"], ["--view-every", "--view or --headless"]),
    (["reconstruct", "series.npz", "--movie", "fit.avi"], ["fit.avi", ".gif or .mp4"]),
])
def test_viewer_options_reject_bad_input(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    write_atoms(Atoms(["Au"], np.zeros((1, 3))), tmp_path / "atoms.xyz")
    write_tilt_series(TiltSeries(np.ones((3, 16, 16)), np.array([-30.0, 0.0, 30.0]), 0.3), tmp_path / "series.npz")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.strip().splitlines()[-1].startswith("atomsplat: error:") and "Traceback" not in err
    for word in words:
        assert word in err


def test_live_window_keeps_its_drawing_within_budget(tmp_path, monkeypatch):
    import viewer.window as window_module

    clock = [100.0]
    monkeypatch.setattr(window_module.time, "perf_counter", lambda: clock[0])
    live = window_module.LiveViewer(tmp_path, every=1)  # no window opens before the first draw
    assert live._within_budget()  # the first frame starts the count
    live.draw_seconds, clock[0] = 0.5, 101.0  # 0.5 s of drawing in 1 s: 0.5 s of fitting
    assert not live._within_budget()
    clock[0] = 106.0  # 5.5 s of fitting: 0.5 s is within 10 %
    assert live._within_budget()


def test_atoms_alone_get_the_whole_frame(arch):
    """Saved atoms with no projections and no fit history: the 3D view fills the frame instead of
    sharing it with empty 'no projections' and 'no fit history' panels."""
    from engine.io.atoms import Atoms
    from viewer.frame import FULL_VIEW_BOX, VIEW_BG, VIEW_BOX, Snapshot, ViewSettings, compose_frame, view_box

    atoms = Atoms(np.array(["Au", "Au"]), np.array([[0.0, 0.0, 0.0], [2.9, 0.0, 0.0]]))
    alone = Snapshot(atoms=atoms, label="atoms.xyz")
    assert view_box(alone) == FULL_VIEW_BOX
    assert view_box(Snapshot(atoms=atoms, history={"iteration": [10], "loss": [1.0], "atoms": [2]})) == VIEW_BOX
    frame = compose_frame(alone, ViewSettings())
    y, x, h, w = FULL_VIEW_BOX
    for row in (y + 10, y + h // 2, y + h - 60):  # where the strip, loss and count panels used to be
        assert tuple(frame[row, x + w - 20]) == VIEW_BG


@pytest.mark.parametrize("screen", [(1400, 900), (1920, 1080), (1280, 720), (1366, 768), (3840, 2160)])
def test_live_window_fits_the_screen_with_the_controls_beside_the_frame(screen):
    """The window lies inside the screen (less its margin for borders and task bars), the controls
    have a column of their own beside the frame (no overlap), the frame keeps its aspect ratio and
    is never enlarged, and the image handed to GGUI stretches onto the window by the frame's scale."""
    from viewer.window import CONTROLS_W, SCREEN_MARGIN, window_layout

    layout = window_layout(screen)
    (width, height), (left, top) = layout.size, layout.position
    assert left >= 0 and top >= 0 and left + width <= screen[0] and top + height <= screen[1]
    assert width <= screen[0] - SCREEN_MARGIN[0] and height <= screen[1] - SCREEN_MARGIN[1]

    def inside(box):
        x, y, w, h = box
        return 0 <= x and 0 <= y and x + w <= width and y + h <= height and w > 0 and h > 0

    frame, controls = layout.frame, layout.controls
    assert inside(frame) and inside(controls)
    overlap_w = min(frame[0] + frame[2], controls[0] + controls[2]) - max(frame[0], controls[0])
    overlap_h = min(frame[1] + frame[3], controls[1] + controls[3]) - max(frame[1], controls[1])
    assert overlap_w <= 0 or overlap_h <= 0
    assert controls[2] == CONTROLS_W and controls[3] == height  # the controls keep their full width
    assert layout.scale <= 1.0 and abs(frame[2] / frame[3] - FRAME_SHAPE[1] / FRAME_SHAPE[0]) < 0.01
    rows, columns = layout.image_shape
    assert rows == FRAME_SHAPE[0] and abs(columns * layout.scale - width) <= 1
    if screen[0] >= FRAME_SHAPE[1] + CONTROLS_W + SCREEN_MARGIN[0] and screen[1] >= FRAME_SHAPE[0] + SCREEN_MARGIN[1]:
        assert layout.scale == 1.0 and layout.size == (FRAME_SHAPE[1] + CONTROLS_W, FRAME_SHAPE[0])


def test_screen_size_falls_back_without_an_x_display(monkeypatch):
    from viewer.window import FALLBACK_SCREEN, screen_size

    monkeypatch.delenv("DISPLAY", raising=False)
    assert screen_size() == FALLBACK_SCREEN
    monkeypatch.setenv("DISPLAY", ":987")  # no X server behind it
    assert screen_size() == FALLBACK_SCREEN
