"""Watching a fit: `LiveViewer` (a Taichi GGUI window with controls) and `HeadlessRecorder` (frames
to PNG, then a movie). Both are `observer(rec)` callables for `Reconstruction.run`: they draw every
`every` iterations, read the fit without changing it, and have a `finish()` for after the fit.

The frame itself is `viewer.frame.compose_frame`, the same in both.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import taichi as ti
from taichi.ui.utils import get_field_info

from engine.core.errors import InputError
from engine.core.files import write_atomically

from .cli import DEFAULT_EVERY
from .frame import COLOUR_MODES, DEFAULT_ANGLES, FRAME_SHAPE, ViewSettings, compose_frame, view_box
from .sources import fit_snapshot, nearest_zero_tilt

LIVE_BUDGET = 0.1
"""The live window skips a due frame while its drawing has taken more than this share of the fit's
time since the last pause: on a slow display (software rendering) the fit still comes first."""
MOVIE_FPS = 5
MOVIE_FORMATS = (".gif", ".mp4")
FRAME_PATTERN = "frame_*.png"


def display_available() -> bool:
    """Whether a window can open: an X11 or Wayland display on Linux (its socket present for a local
    X display), always elsewhere. GGUI ends the process when it cannot reach a display, so this is
    checked before opening one."""
    if not sys.platform.startswith("linux"):
        return True
    wayland = os.environ.get("WAYLAND_DISPLAY")
    if wayland and Path(os.environ.get("XDG_RUNTIME_DIR", "/run/user"), wayland).exists():
        return True
    display = os.environ.get("DISPLAY", "")
    if not display:
        return False
    host, _, number = display.rpartition(":")
    if host and host != "unix":
        return True  # a remote or forwarded display: nothing local to check
    return Path(f"/tmp/.X11-unix/X{number.split('.')[0]}").exists()


def write_png(image: np.ndarray, path) -> Path:
    """Write an RGB frame as a PNG at ``path`` through imageio, atomically. zlib level 1: half the
    CPU time of the default level for files 25 % larger (README, "Cost")."""
    return write_atomically(path, lambda tmp: iio.imwrite(tmp, image, extension=".png", compress_level=1))


def write_image(image: np.ndarray, path) -> Path:
    """Write an RGB frame as PNG or JPEG, by the suffix of ``path``, atomically."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        return write_atomically(path, lambda tmp: iio.imwrite(tmp, image, extension=".jpeg", quality=92))
    return write_png(image, path)


def check_every(every, source: str = "--view-every") -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InputError(source, f"the viewer draws every K iterations; K must be a whole number >= 1, got {every!r}")
    return every


def check_movie_path(path) -> Path:
    """A movie path whose format can be written here: .gif (Pillow) or .mp4 (needs imageio-ffmpeg or PyAV)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MOVIE_FORMATS:
        raise InputError(path, f"unknown movie format {path.suffix!r} (use {' or '.join(MOVIE_FORMATS)})")
    if suffix == ".mp4" and not any(importlib.util.find_spec(m) for m in ("imageio_ffmpeg", "av")):
        raise InputError(path, "writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg) or PyAV; "
                               "a .gif needs nothing more")
    return path


def write_movie(frames: list, path) -> Path:
    """Assemble PNG ``frames`` (in order) into a movie at ``path`` at MOVIE_FPS: a GIF at half size
    (2 x 2 pixel means; keeps the file small) or a full-size MP4."""
    path = check_movie_path(path)
    images = [iio.imread(f) for f in frames]
    if path.suffix.lower() == ".gif":
        h, w = images[0].shape[0] // 2 * 2, images[0].shape[1] // 2 * 2
        images = [np.rint(im[:h, :w, :3].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
                  for im in images]
        return write_atomically(path, lambda tmp: iio.imwrite(tmp, images, extension=".gif",
                                                              duration=1000 / MOVIE_FPS, loop=0))
    return write_atomically(path, lambda tmp: iio.imwrite(tmp, np.stack(images), extension=".mp4", fps=MOVIE_FPS))


class _PngWriter:
    """Encodes PNGs on a background thread, so the fit does not wait for zlib (a full queue does
    hold it up, which bounds the frames in memory)."""

    def __init__(self):
        self.jobs = queue.Queue(maxsize=4)  # bounds the frames held in memory
        self.error = None
        self.cpu_seconds = 0.0  # this thread's CPU time, s: what encoding took from the fit
        self.thread = threading.Thread(target=self._run, name="atomsplat-png", daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            try:
                write_png(*job)
            except Exception as err:  # reported to the fit's thread at the next put or close
                self.error = err
            self.cpu_seconds = time.thread_time()

    def put(self, image: np.ndarray, path: Path) -> None:
        self._raise()
        self.jobs.put((image, path))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error


class _FitWatcher:
    """What both observers share: when to draw, the fit's speed between draws, the view settings."""

    def __init__(self, every: int, settings: ViewSettings | None = None):
        self.every = check_every(every)
        self.settings = settings if settings is not None else ViewSettings()
        self.tilt = None
        self.rec = None
        self.drawn_iteration = None
        self.mark = None  # (iteration, time) when the fit last resumed after a draw
        self.rate = None  # fit iterations per second between draws
        self.draw_seconds = 0.0  # time spent drawing, s
        self.frames_drawn = 0

    def due(self, rec) -> bool:
        """Every `every` iterations and at the last one, once per iteration."""
        return rec.iteration != self.drawn_iteration and (rec.iteration % self.every == 0
                                                          or rec.iteration >= rec.settings.iters)

    def _begin(self, rec) -> None:
        now = time.perf_counter()
        if self.rec is None:
            self.rec = rec
            self.tilt = nearest_zero_tilt(rec.series.angles)
            self.settings.colour_mode = "species" if rec.settings.species else "amplitude"
        elif self.mark is not None and rec.iteration > self.mark[0]:
            self.rate = (rec.iteration - self.mark[0]) / (now - self.mark[1])
        self.drawn_iteration = rec.iteration
        self._draw_start = now

    def cost_seconds(self) -> float:
        """Time the viewer took from the fit so far, s."""
        return self.draw_seconds

    def _end(self, rec) -> None:
        now = time.perf_counter()
        self.draw_seconds += now - self._draw_start
        self.frames_drawn += 1
        self.mark = (rec.iteration, now)


class HeadlessRecorder(_FitWatcher):
    """Renders a frame every ``every`` iterations (and at the last) to OUT/frames/frame_NNNNNN.png
    (NNNNNN the iteration) and, in `finish`, assembles every frame there into ``movie`` (default
    OUT/fit.gif). ``fresh``: a new fit, so frames left in OUT/frames by an earlier one are removed
    first; a resumed fit keeps them and adds its own."""

    def __init__(self, out_dir, every: int = DEFAULT_EVERY, movie=None, fresh: bool = True,
                 settings: ViewSettings | None = None):
        super().__init__(every, settings)
        self.frames_dir = Path(out_dir) / "frames"
        self.movie = check_movie_path(movie if movie is not None else Path(out_dir) / "fit.gif")
        self.fresh = fresh
        self.writer = None

    def __call__(self, rec) -> None:
        if not self.due(rec):
            return
        self._begin(rec)
        if self.writer is None:
            self.frames_dir.mkdir(parents=True, exist_ok=True)
            if self.fresh:
                for old in self.frames_dir.glob(FRAME_PATTERN):
                    old.unlink()
            self.writer = _PngWriter()
        frame = compose_frame(fit_snapshot(rec, self.tilt, self.rate), self.settings)
        self.writer.put(frame, self.frames_dir / f"frame_{rec.iteration:06d}.png")
        self._end(rec)

    def cost_seconds(self) -> float:
        """Drawing, plus the CPU time of PNG encoding on the writer thread (it shares the CPU with the fit), s."""
        return self.draw_seconds + (self.writer.cpu_seconds if self.writer is not None else 0.0)

    def finish(self) -> Path | None:
        """Wait for the PNGs, write the movie; returns its path (None when no frame was drawn)."""
        if self.writer is None:
            return None
        self.writer.close()
        frames = sorted(self.frames_dir.glob(FRAME_PATTERN))
        write_movie(frames, self.movie)
        print(f"viewer: {len(frames)} frames in {self.frames_dir}, movie {self.movie} "
              f"(drawing and encoding took {self.cost_seconds():.1f} s)")
        return self.movie


CONTROLS_W = 320  # px right of the frame in the live window, for the controls
SCREEN_MARGIN = (40, 100)
"""Screen px (across, down) the live window leaves free for its border, title bar and task bars."""
FALLBACK_SCREEN = (1366, 768)
"""Screen size (px) assumed when no X display answers (e.g. Wayland without XWayland): the smallest
common laptop screen, so the window fits on most screens."""


@dataclass(frozen=True)
class WindowLayout:
    """The live window on a screen, in window pixels (x right, y down): the frame, shown at `scale`
    (at most 1: a frame pixel never becomes larger than a screen pixel), and right of it the
    controls in a column of their own. Rectangles are (x, y, width, height)."""

    size: tuple  # (width, height) of the window, px
    position: tuple  # its top-left corner on the screen, px
    scale: float
    frame: tuple
    controls: tuple

    @property
    def image_shape(self) -> tuple:
        """(rows, columns) of the image handed to GGUI, in frame pixels: the frame, then the controls'
        column at the frame's scale. GGUI stretches it onto the window."""
        return FRAME_SHAPE[0], FRAME_SHAPE[1] + round(self.controls[2] / self.scale)


def window_layout(screen, frame_shape=FRAME_SHAPE, controls_width: int = CONTROLS_W,
                  margin=SCREEN_MARGIN) -> WindowLayout:
    """Fit the window to a ``screen`` (width, height) px: the frame scaled down (never up) so that
    it and the controls' column fit within the screen less ``margin``; the window centred across
    and placed below the top margin."""
    usable_w, usable_h = screen[0] - margin[0], screen[1] - margin[1]
    frame_h, frame_w = frame_shape
    # below a quarter the frame is unreadable: a screen that small gets a window larger than it
    scale = max(0.25, min(1.0, (usable_w - controls_width) / frame_w, usable_h / frame_h))
    shown_w, shown_h = int(frame_w * scale), int(frame_h * scale)
    size = (shown_w + controls_width, shown_h)
    position = (max(0, (screen[0] - size[0]) // 2), max(0, min(margin[1] // 2, screen[1] - size[1])))
    return WindowLayout(size, position, scale, (0, 0, shown_w, shown_h), (shown_w, 0, controls_width, shown_h))


def screen_size() -> tuple:
    """The X screen's size (width, height) px, read with libX11 through ctypes (GGUI does not say
    it); FALLBACK_SCREEN when there is no X display or no libX11."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("X11")
    if not os.environ.get("DISPLAY") or library is None:
        return FALLBACK_SCREEN
    try:
        x11 = ctypes.CDLL(library)
    except OSError:
        return FALLBACK_SCREEN
    x11.XOpenDisplay.argtypes, x11.XOpenDisplay.restype = [ctypes.c_char_p], ctypes.c_void_p
    x11.XDefaultScreen.argtypes = [ctypes.c_void_p]
    x11.XDisplayWidth.argtypes = x11.XDisplayHeight.argtypes = [ctypes.c_void_p, ctypes.c_int]
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    display = x11.XOpenDisplay(None)
    if not display:
        return FALLBACK_SCREEN
    try:
        screen = x11.XDefaultScreen(display)
        size = (int(x11.XDisplayWidth(display, screen)), int(x11.XDisplayHeight(display, screen)))
    finally:
        x11.XCloseDisplay(display)
    return size if min(size) > 0 else FALLBACK_SCREEN


KEY_HELP = ("Mouse in the 3D view: left drag orbits,", "right drag pans, middle or shift+left",
            "drag zooms. Keys: space pause, n step,", "c colour, t truth, left/right tilt,",
            "b beam view, r reset, +/- zoom, p shot.")


class LiveViewer(_FitWatcher):
    """A GGUI window showing the frame, with controls to its right. As a fit observer it draws every
    ``every`` iterations; paused, it keeps the fit waiting inside the call and redraws until resumed
    or stepped. Closing the window lets the fit go on without it. Screenshots go to ``out_dir``;
    ``settings`` (e.g. with a truth to show) start the view."""

    def __init__(self, out_dir, every: int = DEFAULT_EVERY, settings: ViewSettings | None = None):
        super().__init__(every, settings)
        self.out_dir = Path(out_dir)
        self.window = None
        self.layout = None  # WindowLayout, once the window is open
        self.paused = False
        self.step = False
        self.cursor = None  # last cursor position, frame pixels (row, col)
        self.cached = None  # (key, snapshot): recomputed when the fit moved or the tilt changed
        self.frame = None
        self.shot = False  # a screenshot was asked for: taken once the frame is drawn
        self.budget = None  # (time, drawing seconds) when the LIVE_BUDGET accounting last started

    # ------------------------------------------------------------------ fit observer
    def __call__(self, rec) -> None:
        if self.rec is not None and self.window is None:
            return  # closed: the fit goes on alone
        if not (self.paused or self.due(rec) and self._within_budget()):
            return
        paused = self.paused
        self._begin(rec)
        self.step = False
        self._run(lambda tilt: fit_snapshot(rec, tilt, self.rate, "PAUSED" if self.paused else ""),
                  rec.geometry.rotations, fitting=True)
        self._end(rec)
        if paused or self.paused:
            self.budget = None  # time spent paused is nobody's drawing: start counting afresh

    def _within_budget(self) -> bool:
        """Whether drawing has taken at most LIVE_BUDGET of the fit's time since counting started."""
        now = time.perf_counter()
        if self.budget is None:
            self.budget = (now, self.draw_seconds)
            return True
        start, spent_before = self.budget
        spent = self.draw_seconds - spent_before
        return spent <= LIVE_BUDGET * (now - start - spent)

    def finish(self) -> None:
        """After the fit: keep showing the result until the window is closed."""
        if self.window is None:
            return
        print("viewer: the fit is done; close the window (or press Esc) to finish", file=sys.stderr)
        rec = self.rec
        self.paused = False
        self.cached = None
        self._run(lambda tilt: fit_snapshot(rec, tilt, self.rate, "DONE"), rec.geometry.rotations, fitting=False)

    # ------------------------------------------------------------------ saved results
    def show_states(self, snapshots: list) -> None:
        """Step through the states of a time series (one `Snapshot` each) with ← → until closed."""
        self.tilt = 0
        self._run(lambda k: snapshots[k], np.tile(np.eye(3), (len(snapshots), 1, 1)), fitting=False)

    def show_result(self, result, tilt: int) -> None:
        """Show a `viewer.sources.SavedResult`, starting at projection ``tilt``, until the window is closed."""
        self.tilt = tilt
        rotations = result.model.geometry.rotations if result.series is not None else None
        self._run(result.snapshot, rotations, fitting=False)

    # ------------------------------------------------------------------ window
    def _open(self) -> None:
        self.layout = window_layout(screen_size())
        self.window = ti.ui.Window("atomsplat", self.layout.size, vsync=False, pos=self.layout.position)
        self.canvas = self.window.get_canvas()
        self.gui = self.window.get_gui()
        self.rgba = np.full(self.layout.image_shape + (4,), 48, np.uint8)  # the frame, then the controls' backdrop
        self.rgba[..., 3] = 255

    def _run(self, source, rotations, fitting: bool) -> None:
        """Draw and handle input until the fit may go on (``fitting``: not paused, or one step asked
        for) or, otherwise, until the window closes."""
        if self.window is None:
            self._open()
        n_tilts = 0 if rotations is None else len(rotations)
        while self.window.running:
            changed = self._controls(n_tilts, rotations, fitting) | self._input(n_tilts, rotations)
            key = (self.drawn_iteration, self.tilt, self.paused)
            if self.cached is None or self.cached[0] != key:
                self.cached = (key, source(self.tilt))
                changed = True
            if changed or self.frame is None:
                self.frame = compose_frame(self.cached[1], self.settings)
            if self.shot:
                self._screenshot()
                self.shot = False
            self._show()
            if fitting and (not self.paused or self.step):
                return
            time.sleep(1 / 60)  # idle: no need to spin faster than a screen refreshes
        self.close()
        if fitting:
            print("viewer: window closed; the fit goes on without it", file=sys.stderr)

    def close(self) -> None:
        """Close the window now; a fit being watched goes on without it."""
        if self.window is not None:
            self.window.destroy()
            self.window = None

    def _show(self) -> None:
        self.rgba[:, :FRAME_SHAPE[1], :3] = self.frame
        # GGUI shows (x, y)-indexed images, y up, as packed RGBA8. Handing it that directly (Taichi
        # 1.7's internal canvas call) skips `Canvas.set_image`'s conversion kernel: 28 ms a frame on the CPU.
        packed = np.ascontiguousarray(self.rgba.view(np.uint32)[..., 0].T[:, ::-1])
        self.canvas.canvas.set_image(get_field_info(packed))
        self.window.show()

    def _controls(self, n_tilts: int, rotations, fitting: bool) -> bool:
        """The control panel; returns whether the view changed."""
        window_w, window_h = self.layout.size
        x, y, w, h = self.layout.controls
        settings, before = self.settings, (self.settings.colour_mode, self.settings.show_truth, self.tilt)
        with self.gui.sub_window("Controls", x / window_w, y / window_h, w / window_w, h / window_h) as g:
            if fitting:
                if g.button("Resume" if self.paused else "Pause"):
                    self.paused = not self.paused
                if self.paused and g.button("Single step"):
                    self.step = True
                self.every = g.slider_int("Draw every k", self.every, 1, 200)
            by_amplitude = g.checkbox("Colour by amplitude", settings.colour_mode == "amplitude")
            by_sigma = g.checkbox("Colour by uncertainty", settings.colour_mode == "uncertainty")
            chosen = {mode for mode, on in (("amplitude", by_amplitude), ("uncertainty", by_sigma)) if on}
            # Ticking one box unticks the other: the newly ticked mode wins.
            settings.colour_mode = (chosen - {settings.colour_mode} or chosen or {"species"}).pop()
            if settings.truth is not None:
                settings.show_truth = g.checkbox("Show truth", settings.show_truth)
            if n_tilts > 1:
                self.tilt = g.slider_int("Tilt", self.tilt, 0, n_tilts - 1)
            camera_moved = False
            if rotations is not None and g.button("View along the beam"):
                settings.camera.align_to(rotations[self.tilt])
                camera_moved = True
            if g.button("Reset camera"):
                self._reset_camera()
                camera_moved = True
            if g.button("Screenshot"):
                self.shot = True
            for line in KEY_HELP:
                g.text(line)
        return camera_moved or before != (settings.colour_mode, settings.show_truth, self.tilt)

    def _reset_camera(self) -> None:
        self.settings.camera.set_angles(*DEFAULT_ANGLES)
        self.settings.framed = False

    def _input(self, n_tilts: int, rotations) -> bool:
        """Keys and mouse drags in the 3D view; returns whether the view changed."""
        window, settings, camera = self.window, self.settings, self.settings.camera
        changed = False
        for event in window.get_events(ti.ui.PRESS):
            key = event.key
            changed = True
            if key == ti.ui.ESCAPE:
                window.running = False
            elif key == ti.ui.SPACE:
                self.paused = not self.paused
            elif key == "n":
                self.paused, self.step = True, True
            elif key == "c":
                settings.colour_mode = COLOUR_MODES[(COLOUR_MODES.index(settings.colour_mode) + 1) % len(COLOUR_MODES)]
            elif key == "t":
                settings.show_truth = not settings.show_truth and settings.truth is not None
            elif key in (ti.ui.LEFT, ti.ui.RIGHT) and n_tilts:
                self.tilt = (self.tilt + (1 if key == ti.ui.RIGHT else -1)) % n_tilts
            elif key == "b" and rotations is not None:
                camera.align_to(rotations[self.tilt])
            elif key == "r":
                self._reset_camera()
            elif key in ("=", "+", "-"):
                camera.zoom(1.25 if key != "-" else 0.8)
            elif key == "p":
                self.shot = True
            else:
                changed = False
        x, y = window.get_cursor_pos()
        rows, columns = self.layout.image_shape
        cursor = ((1.0 - y) * rows, x * columns)  # frame pixels (row, col)
        y0, x0, vh, vw = view_box(self.cached[1] if self.cached else None)
        inside = y0 <= cursor[0] < y0 + vh and x0 <= cursor[1] < x0 + vw
        if inside and self.cursor is not None:
            d_row, d_col = cursor[0] - self.cursor[0], cursor[1] - self.cursor[1]
            if d_row or d_col:
                if window.is_pressed(ti.ui.MMB) or (window.is_pressed(ti.ui.LMB) and window.is_pressed(ti.ui.SHIFT)):
                    camera.zoom(float(np.exp(-d_row / 200)))
                    changed = True
                elif window.is_pressed(ti.ui.LMB):
                    camera.orbit(0.4 * d_col, -0.4 * d_row)  # degrees per pixel dragged
                    changed = True
                elif window.is_pressed(ti.ui.RMB):
                    camera.pan(d_col, d_row, vh)
                    changed = True
        self.cursor = cursor if inside else None
        return changed

    def _screenshot(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"screenshot_{self.drawn_iteration:06d}" if self.drawn_iteration is not None else "screenshot"
        path, n = self.out_dir / f"{stem}.png", 1
        while path.exists():  # never replace an earlier screenshot
            path, n = self.out_dir / f"{stem}_{n}.png", n + 1
        write_png(self.frame, path)
        print(f"viewer: screenshot {path}", file=sys.stderr)
        return path
