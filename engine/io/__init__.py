"""Files: tilt series in (npz, MRC, TIFF), atoms in and out (through ASE), report figures."""
