"""The ground every stage stands on: errors, safe file writing, element tables, the tilt-geometry
contract and the Taichi backend."""
