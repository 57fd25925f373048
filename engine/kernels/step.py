"""One optimisation step of the atoms as one CPU kernel: render the batch, the loss's dL/dimage (and
the background offsets' Newton step), the adjoint per (projection, Gaussian) pair, its sum per
Gaussian, and Adam, from the `ti.func` bodies the separate kernels of `TiltSeriesProjector`,
`FitTarget` and `AtomModel` are made of. Three parallel loops instead of six kernels: one task per
projection renders it and takes its residual and offset while its image is in the cache; one task
per projection takes its adjoint pairs; one pass per atom sums its pairs and takes its Adam step.
On a 2-core CPU the thread pool's start of each parallel loop costs a few tenths of a millisecond,
as much as a small fit's loop. (The adjoint in the first loop's tasks would save a little more a
step, but one function that large takes LLVM 1.8 s longer to compile, on every new image size.)
Every sum keeps its order, so the step is bit for bit that of the separate kernels (tested). CPU
only: Taichi 1.7.4's SPIR-V code generator fails on the fused kernel ("value does not yet exist"),
and GPUs want a thread per (projection, Gaussian) pair."""

import taichi as ti

from engine.kernels.loss import offset_step, residual_projection
from engine.kernels.projector import CPU_TASK_SPREAD


@ti.kernel
def fused_step(projector: ti.template(), target: ti.template(), model: ti.template(), cloud: ti.template(),
               pairs: ti.template(), n_gaussians: ti.i32, n_atoms: ti.i32, nb: ti.i32, batch_scale: ti.f32,
               n_offsets: ti.i32, curvature: ti.f32, lr_pos: ti.f32, lr_amp: ti.f32, lr_sigma: ti.f32):
    """The step of `engine.fit.problem.FitProblem.step` without alignment or repulsion, for float32
    fields and a cloud that fits in one slab of the projector's adjoint scratch. ``pairs`` is the
    projector's ``pair_grad``, given as an argument because it is replaced when the capacity grows (and
    with it the kernel then compiled for it, which reads the new scratch too). ``n_offsets``: the
    batch size when the offsets are fitted, else 0 (an argument, not a template: one compiled kernel
    serves the fit and its B-factor refits)."""
    # One task per projection renders it and takes its residual (and offset) while its image is in the
    # cache; one per projection takes its adjoint pairs; then, per atom, the pairs' sums and Adam.
    for item in range(nb * CPU_TASK_SPREAD):
        if item % CPU_TASK_SPREAD == 0:
            b = item // CPU_TASK_SPREAD
            k = projector.batch[b]
            projector.render_projection(cloud, projector.image, k, n_gaussians)
            residual_projection(target, projector.image, projector.image_grad, k, batch_scale)
            if b < n_offsets:
                offset_step(target, k, curvature)
    for item in range(nb * CPU_TASK_SPREAD):
        if item % CPU_TASK_SPREAD == 0:
            projector.gather_projection(cloud, pairs, item // CPU_TASK_SPREAD, n_gaussians)
    for i in range(n_atoms):  # each atom sums its Gaussians' pairs, then steps
        for component in ti.static(range(model.profile.components)):
            projector.reduce_gaussian(cloud, pairs, component * n_atoms + i, nb)
        model.adam_atom(cloud, i, n_atoms, lr_pos, lr_amp, lr_sigma, 1.0)
