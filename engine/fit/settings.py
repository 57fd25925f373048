"""The settings of a direct fit, each declared once (type, default, unit, help); the command line,
scene files and the Python API are built from this list. One default for every dataset."""

from __future__ import annotations

from engine.core.settings import (Schema, Setting, SettingError, element_symbols, fraction, name_fractions,
                                  name_list, non_negative, positive)


def _finish(s) -> None:
    """Checks across settings; element symbols normalised."""
    s.species = element_symbols(s.species, "species")
    if s.composition is not None:
        s.composition = dict(zip(element_symbols(s.composition, "composition"), s.composition.values()))
        if any(not 0 < v <= 1 for v in s.composition.values()) or abs(sum(s.composition.values()) - 1) > 1e-3:
            raise SettingError("composition", "fractions must lie in (0, 1] and add up to 1")
        if not s.species:
            s.species = list(s.composition)
        if set(s.composition) != set(s.species):
            raise SettingError("composition", "must give a fraction for each expected species and no other")
    if s.robust and s.noise == "poisson":
        raise SettingError("robust", "the robust (Huber) loss is for Gaussian noise; drop it or use noise gaussian")
    if s.profile == "peng" and not s.species:
        raise SettingError("profile", "the 'peng' atom profile needs the expected species")


FIT_SCHEMA = Schema("FitSettings", [
    Setting("iters", int, 800, "most optimisation steps: the fit stops earlier when converged", check=positive),
    Setting("batch", int, None, "projections per step (not set: all)", check=positive),
    Setting("seed", int, 0, "random seed (mini-batches, splits)", check=non_negative),
    Setting("init", str, None, "start from these atoms (a file: .xyz, .pdb, ...) instead of seeding, e.g. the "
            "previous state of a time series (a warm start; density control still adds and removes atoms)"),
    Setting("species", list, [], "expected elements, e.g. Pt,Ni: sets d_min, labels atoms, estimates B-factors",
            parse=name_list),
    Setting("composition", dict, None, "expected fractions, e.g. Pt:0.6,Ni:0.4 (implies species)",
            parse=name_fractions),
    Setting("noise", str, "auto", "noise model, i.e. the likelihood: auto (whole-number data are counts, "
            "anything else Gaussian), gaussian (least squares) or poisson (counted data)",
            choices=("auto", "gaussian", "poisson")),
    Setting("robust", bool, False, "gaussian noise: Huber loss beyond 3 σ, so outlier pixels (hot pixels, dust) "
            "pull linearly"),
    Setting("gain", float, None, "poisson: counts per data unit (not set: read off whole-count data)",
            check=positive),
    Setting("per_atom_shape", bool, False, "counted data: every atom its own amplitude and width (default: "
            "atoms of one element share them, 3 free parameters per atom)"),
    Setting("profile", str, "gaussian", "atom shape: one Gaussian, or a core and tail from the species' "
            "scattering factors (peng: needs species; more accurate, about 2x slower)", choices=("gaussian", "peng")),
    Setting("profile_correction", bool, True, "correct each position, to first order, for the bias the atom "
            "profile's misfit leaves (the misfit's radial profile fitted to the fit's residual)"),
    Setting("blur", float, None, "microscope blur σ (not set: from the file, else 0)", "Å", check=non_negative),
    Setting("extended", str, "auto", "specimen larger than the field of view (film, support, needle): atoms are "
            "also fitted in the margin the tilted beam sees, and marked outside the always-visible window; auto: "
            "when the image edges across the tilt axis hold specimen", choices=("auto", "on", "off")),
    Setting("refine_alignment", bool, False, "pre-align, then fit per-projection shifts, tilt-angle offsets, "
            "intensity scale and the tilt-axis angle with the atoms"),
    Setting("d_min", float, None, "minimum interatomic distance (not set: 0.7 x the shortest bond of species, "
            "else 1.7 Å)", "Å", check=positive),
    Setting("lr_position", float, 0.02, "Adam learning rate of positions", "Å per step", check=positive),
    Setting("lr_amplitude", float, 0.05, "Adam learning rate of log-amplitudes", check=positive),
    Setting("lr_width", float, 0.02, "Adam learning rate of log-widths", check=positive),
    Setting("lr_shift", float, 0.005, "Adam learning rate of projection shifts", "Å per step", check=positive),
    Setting("lr_angle", float, 0.01, "Adam learning rate of tilt-angle offsets and the axis angle",
            "degrees per step", check=positive),
    Setting("lr_intensity", float, 0.002, "Adam learning rate of log intensity scales", check=positive),
    Setting("lr_final", float, 0.02, "lowest learning rates as a fraction of the first (stepped down ×0.1 whenever the fit settles)",
            check=fraction),
    Setting("align_start", float, 0.1, "the alignment moves once the atom count is final, at the latest after this fraction of --iters", check=fraction),
    Setting("densify_every", int, 100, "most steps between density-control rounds (a round comes sooner when the fit settles)", check=positive),
    Setting("densify_until", float, 0.6, "no atom-count changes after this fraction of --iters (counting ends sooner, at a round that adds no atom)",
            check=fraction),
    Setting("cull_fraction", float, 0.3, "cull atoms fainter than this fraction of the median amplitude",
            check=non_negative),
    Setting("spawn_fraction", float, 0.35, "spawn at residual peaks above this fraction of a typical atom's",
            check=positive),
    Setting("split_width", float, 1.8, "split atoms wider than this multiple of the median width", check=positive),
    Setting("repulsion", float, 0.0, "soft penalty Σ (d_min − d)² on close pairs, in noise-weighted data-term units "
            "(0: off)", check=non_negative),
    Setting("voxel", float, 0.5, "back-projection grid for seeding and spawning", "Å", check=positive),
    Setting("checkpoint_every", int, 200, "steps between checkpoints", check=positive),
    Setting("thermal_refits", int, 150, "most steps of each B-factor calibration refit, which stops when converged (0: no B-factors)",
            check=non_negative),
], finish=_finish)

FitSettings = FIT_SCHEMA.cls


def fit_settings(values: dict | None = None, **overrides) -> FitSettings:
    """Checked fit settings from a dict (a scene's [reconstruct] table) and keyword overrides."""
    return FIT_SCHEMA.make(values, **overrides)


def requested_noise(settings) -> str:
    """The noise model asked for: the robust loss is for Gaussian noise, so it implies 'gaussian'."""
    return "gaussian" if settings.robust and settings.noise == "auto" else settings.noise
