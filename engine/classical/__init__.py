"""The classical pipeline for comparison: a voxel reconstruction (SIRT, FBP) and atom tracing. It
never imports the fit."""
