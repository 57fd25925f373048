"""Direct atom fitting against the classical pipeline (SIRT + atom tracing), side by side.

For every NAME.npz in DIR that has a NAME_truth.xyz beside it, runs `atomsplat reconstruct` and
`atomsplat baseline` with default settings (the expected species, which a user knows, come from
scenes/NAME.toml when it exists), then — only after both have written their atoms — reads the truth
and scores both. Prints one Markdown table and writes it as JSON.

    python scripts/benchmark.py ../shared/data [--out out/benchmark] [--arch cpu] [--json FILE]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from engine.io.atoms import read_atoms
from engine.evaluate.metrics import evaluate_atoms
from engine.scene import load_scene

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["dataset", "method", "n_pred", "n_true", "precision", "recall", "f1@1.0", "f1@0.5", "rmsd_pm",
           "z_rmsd_pm", "species_accuracy", "wall_s"]


def run(command: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine.cli", *command], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


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
        scene = REPO / "scenes" / f"{series.stem}.toml"
        species = load_scene(scene).reconstruct.get("species", []) if scene.exists() else []
        extra = ["--species", ",".join(species)] if species else []
        outputs = {}
        for method, command in [
            ("direct fit", ["reconstruct", str(series.resolve()), "--quiet"]),
            ("SIRT + tracing", ["baseline", str(series.resolve())]),
        ]:
            out = args.out / series.stem / method.split()[0].lower()
            seconds = run(command + extra + ["--out", str(out), "--overwrite", "--arch", args.arch])
            outputs[method] = (out / "atoms.xyz", seconds)
        truth = read_atoms(truth_path)  # only now: both methods are done
        for method, (atoms_path, seconds) in outputs.items():
            m = evaluate_atoms(read_atoms(atoms_path), truth, radius=1.0, radii_extra=(0.5,))
            rows.append({"dataset": series.stem, "method": method, "n_pred": m["n_pred"], "n_true": m["n_true"],
                         "precision": m["precision"], "recall": m["recall"], "f1@1.0": m["f1_at"]["1.0"],
                         "f1@0.5": m["f1_at"]["0.5"], "rmsd_pm": m["rmsd_pm"],
                         "z_rmsd_pm": None if m["rmsd_axis_pm"] is None else m["rmsd_axis_pm"]["z"],
                         "species_accuracy": m["species_accuracy"], "wall_s": seconds})
            print(f"{series.stem}: {method} done", file=sys.stderr, flush=True)

    def cell(value):
        return "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))

    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |")
    path = args.json or args.out / "benchmark.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
