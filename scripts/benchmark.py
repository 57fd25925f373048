"""Direct atom fitting against the classical pipeline (SIRT + atom tracing), side by side.

For every NAME.npz in DIR that has a NAME_truth.xyz beside it, runs `atomsplat reconstruct` and
`atomsplat baseline` with default settings (the expected species, which a user knows, come from
scenes/NAME.toml when it exists), then — only after both have written their atoms — reads the truth
and scores both. Counted series (whole counts, or counts times one quantum) get the classical
pipeline the low-dose field uses: each projection denoised first (`baseline --denoise bm3d`:
Anscombe transform, BM3D, exact unbiased inverse), then SIRT and tracing; other series plain SIRT.
A method that fails on a dataset gets a row with its error (scores n/a) and the benchmark goes on.
Prints one Markdown table and writes it as JSON.

    python scripts/benchmark.py ../shared/data [--out out/benchmark] [--arch cpu] [--json FILE]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from engine.io.atoms import read_atoms
from engine.io.tiltseries import read_tilt_series
from engine.evaluate.metrics import evaluate_atoms
from engine.measure.alignment import counts_gain_or_none
from engine.scene import load_scene

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["dataset", "method", "n_pred", "n_true", "precision", "recall", "f1@1.0", "f1@0.5", "rmsd_pm",
           "z_rmsd_pm", "species_accuracy", "wall_s", "error"]


def run(command: list[str]) -> float:
    """Run an atomsplat command; its wall time in seconds. Raises RuntimeError with the command's last
    error line when it fails."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "engine.cli", *command], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
    return time.perf_counter() - t0


def methods_for(series_path: Path) -> list[tuple[str, list[str]]]:
    """(label, command) of every method to run on a series."""
    data = str(series_path.resolve())
    counted = counts_gain_or_none(read_tilt_series(series_path).projections) is not None
    classical = (("BM3D + SIRT + tracing", ["baseline", data, "--denoise", "bm3d"]) if counted
                 else ("SIRT + tracing", ["baseline", data]))
    return [("direct fit", ["reconstruct", data, "--quiet"]), classical]


def empty_row(dataset: str, method: str, error: str) -> dict:
    return {**{c: None for c in COLUMNS}, "dataset": dataset, "method": method, "error": error}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "benchmark")
    parser.add_argument("--arch", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="where to write the table (default OUT/benchmark.json)")
    args = parser.parse_args()
    rows = []
    for series in sorted(args.data_dir.glob("*.npz")):
        truth_path = series.with_name(series.stem + "_truth.xyz")
        if not truth_path.exists():
            continue
        try:
            scene = REPO / "scenes" / f"{series.stem}.toml"
            species = load_scene(scene).reconstruct.get("species", []) if scene.exists() else []
            methods = methods_for(series)
        except Exception as err:  # an unreadable series or scene: one row, then the next dataset
            rows.append(empty_row(series.stem, "(all)", f"{type(err).__name__}: {err}"))
            continue
        extra = ["--species", ",".join(species)] if species else []
        outputs = {}
        for method, command in methods:
            out = args.out / series.stem / ("fit" if method == "direct fit" else "baseline")
            try:
                seconds = run(command + extra + ["--out", str(out), "--overwrite", "--arch", args.arch])
                outputs[method] = (out / "atoms.xyz", seconds, None)
            except Exception as err:
                outputs[method] = (None, None, str(err))
            print(f"{series.stem}: {method} {'done' if outputs[method][2] is None else 'failed'}", file=sys.stderr,
                  flush=True)
        truth = read_atoms(truth_path)  # only now: every method is done
        for method, (atoms_path, seconds, error) in outputs.items():
            if error is None:
                try:
                    m = evaluate_atoms(read_atoms(atoms_path), truth, radius=1.0, radii_extra=(0.5,))
                except Exception as err:
                    error = f"scoring: {err}"
            if error is not None:
                rows.append({**empty_row(series.stem, method, error), "wall_s": seconds})
                continue
            rows.append({"dataset": series.stem, "method": method, "n_pred": m["n_pred"], "n_true": m["n_true"],
                         "precision": m["precision"], "recall": m["recall"], "f1@1.0": m["f1_at"]["1.0"],
                         "f1@0.5": m["f1_at"]["0.5"], "rmsd_pm": m["rmsd_pm"],
                         "z_rmsd_pm": None if m["rmsd_axis_pm"] is None else m["rmsd_axis_pm"]["z"],
                         "species_accuracy": m["species_accuracy"], "wall_s": seconds, "error": None})

    def cell(value):
        return "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))

    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(cell(row[c]).replace("|", "/") if c != "error" or row[c] else ""
                                for c in COLUMNS) + " |")
    path = args.json or args.out / "benchmark.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
