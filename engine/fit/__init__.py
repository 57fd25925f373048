"""The direct fit: seeding, the density-control strategy, the trainer, B-factor calibration, joint
alignment refinement and the reconstruction that wires them together."""
