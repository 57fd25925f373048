"""Taichi kernels with hand-written adjoints: the Gaussian projector, the voxel projector, the
loss, the atom model and its optimiser, and the device neighbour grid."""
