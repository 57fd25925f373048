"""Projector benchmark: Taichi forward / backward against a PyTorch-autograd model in the same run.

Sizes (issue 3): (N = 2000, 90 tilts, 128² px, σ = 0.5 Å, pixel 0.3 Å) and (N = 20000, 71 tilts,
256² px). Gaussians fill a sphere and are sorted along the tilt axis (y), as the engine keeps them
(consecutive Gaussians then touch the same image rows). Times are medians of --repeats runs after a
warm-up. The last line is one JSON object for the first size.

    python scripts/bench_projector.py [--arch cpu|cuda|vulkan] [--repeats 10] [--no-torch] [--first-only]
                                      [--dtype float32|float64]

--dtype float64 times the float64 kernels (CPU and CUDA only), which the tests use for tight gradient checks.
"""

import argparse
import json
import math
import time

import numpy as np

from engine.core.backend import init_backend
from engine.core.geometry import TiltGeometry, centre_index, pixel_centres
from engine.kernels.projector import TRUNCATION_RADIUS_SIGMAS, GaussianCloud, TiltSeriesProjector, pack_images

SIZES = [dict(n=2000, tilts=90, px=128, radius=15.0), dict(n=20000, tilts=71, px=256, radius=33.0)]
SIGMA, PIXEL, BLUR = 0.5, 0.3, 0.0


def make_problem(n, tilts, px, radius, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    pos = d / np.linalg.norm(d, axis=1, keepdims=True) * radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3)
    pos = pos[np.argsort(pos[:, 1])]
    geometry = TiltGeometry.from_tilt_angles(np.linspace(-89.0, 89.0, tilts))
    return pos, np.ones(n), np.full(n, SIGMA), geometry, rng.normal(size=(tilts, px, px))


def footprint_pixels(pos, geometry, px):
    """Gaussian-pixel evaluations of one forward pass: Σ over (projection, Gaussian) of its clipped
    square footprint."""
    s = math.sqrt(SIGMA**2 + BLUR**2) / PIXEL
    r = TRUNCATION_RADIUS_SIGMAS * s
    q = geometry.to_beam_frame(pos)[..., :2] / PIXEL + centre_index(px)
    lo = np.clip(np.ceil(q - r), 0, px - 1)
    hi = np.clip(np.floor(q + r), 0, px - 1)
    return float(np.prod(np.clip(hi - lo + 1, 0, None), axis=-1).sum())


def median_ms(fn, sync, repeats):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def bench_taichi(problem, px, repeats, dtype="float32"):
    import taichi as ti

    pos, amp, sig, geometry, grad = problem
    cloud = GaussianCloud(len(pos), dtype)
    cloud.set(pos, amp, sig)
    projector = TiltSeriesProjector(geometry, (px, px), PIXEL, BLUR, capacity=len(pos), dtype=dtype)
    projector.image_grad.from_numpy(pack_images(grad, dtype))
    fwd = median_ms(lambda: projector.forward(cloud), ti.sync, repeats)
    bwd = median_ms(lambda: projector.backward(cloud), ti.sync, repeats)
    both = median_ms(lambda: (projector.forward(cloud), projector.backward(cloud)), ti.sync, repeats)
    return fwd, bwd, both


def bench_torch(problem, px, repeats, device="cpu", chunk=8):
    """The same model in PyTorch autograd, written the way PyTorch is fast: separable Gaussians,
    each projection a batched matrix product (a·ey)ᵀ ex over all Gaussians, untruncated; projections
    go in chunks of ``chunk`` so memory stays bounded. Runs on the GPU when Taichi does."""
    import torch

    torch.set_flush_denormal(True)
    pos_np, amp_np, sig_np, geometry, grad_np = problem
    f32 = dict(dtype=torch.float32, device=device)
    rot = torch.tensor(geometry.rotations[:, :2, :], **f32)
    shift = torch.tensor(geometry.shifts, **f32)
    grad = torch.tensor(grad_np, **f32)
    pos = torch.tensor(pos_np, **f32, requires_grad=True)
    amp = torch.tensor(amp_np, **f32, requires_grad=True)
    sig = torch.tensor(sig_np, **f32, requires_grad=True)
    coords = torch.tensor(pixel_centres(px, PIXEL), **f32)  # Å
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        pos.grad = amp.grad = sig.grad = None
        for k0 in range(0, rot.shape[0], chunk):
            image = torch_projections(pos, amp, sig, rot[k0:k0 + chunk], shift[k0:k0 + chunk], coords, BLUR)
            (image * grad[k0:k0 + chunk]).sum().backward()

    return median_ms(step, sync, repeats)


def torch_projections(pos, amp, sig, rot, shift, coords, blur):
    """Projections (k, H, W) of Gaussians (pos (N, 3) Å, amp, sig Å: torch tensors) for the k
    projections with in-plane rotation rows ``rot`` (k, 2, 3) and shifts (k, 2) Å, at pixel centres
    ``coords`` (Å, square images), blurred by ``blur`` Å: separable, a batched matrix product."""
    import torch

    uv = torch.einsum("kij,nj->kni", rot, pos) + shift[:, None, :]
    s2 = sig**2 + blur**2
    ex = torch.exp(-(coords - uv[..., 0, None]) ** 2 / (2 * s2[:, None]))  # (k, n, W)
    ey = torch.exp(-(coords - uv[..., 1, None]) ** 2 / (2 * s2[:, None]))  # (k, n, H)
    weight = amp / (2 * math.pi * s2)
    return torch.bmm((weight[:, None] * ey).transpose(1, 2), ex)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cpu", choices=["cpu", "cuda", "vulkan"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--first-only", action="store_true", help="only the first size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="kernel precision")
    args = parser.parse_args()
    arch = init_backend(args.arch)
    results = []
    for size in SIZES[:1] if args.first_only else SIZES:
        problem = make_problem(**size)
        fwd, bwd, both = bench_taichi(problem, size["px"], args.repeats, args.dtype)
        evaluations = footprint_pixels(problem[0], problem[3], size["px"])
        line = (f"[{arch}, {args.dtype}] N={size['n']} tilts={size['tilts']} {size['px']}^2 px: forward {fwd:.1f} ms, "
                f"backward {bwd:.1f} ms, forward+backward {both:.1f} ms; "
                f"{evaluations / (fwd * 1e-3) / 1e9:.2f} G Gaussian-pixel evaluations/s (forward)")
        torch_ms = None
        if not args.no_torch:
            try:
                device = "cuda" if arch == "cuda" else "cpu"
                torch_ms = bench_torch(problem, size["px"], max(3, args.repeats // 3), device)
                line += (f"; torch autograd ({device}) forward+backward {torch_ms:.1f} ms, "
                         f"speed-up {torch_ms / both:.1f}x")
            except ImportError:
                line += "; torch not installed (pip install '.[bench]')"
        print(line, flush=True)
        results.append({"arch": arch, "dtype": args.dtype, "n": size["n"], "fwd_ms": round(fwd, 2), "bwd_ms": round(bwd, 2),
                        "fwdbwd_ms": round(both, 2), "torch_fwdbwd_ms": None if torch_ms is None else round(torch_ms, 1),
                        "speedup_vs_torch": None if torch_ms is None else round(torch_ms / both, 2)})
    print(json.dumps(results[0]))


if __name__ == "__main__":
    main()
