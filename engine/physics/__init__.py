"""Physics on top of the kernels: atom profiles, the one forward model, the simulator, structure
builders and chemistry (species and B-factors)."""
