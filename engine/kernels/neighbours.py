"""Cell-list neighbour search over points in 3D (Å), built on the device and rebuilt as atoms move.

A `NeighbourGrid` sorts points into a uniform grid of cells at least ``cutoff`` wide, so every point
within the cutoff of a point lies in the 27 cells around its own: building is O(N) (counting sort)
and each query O(points in 27 cells). Boundaries are open (the grid spans the points' bounding box,
taken afresh at every build) or periodic in an orthorhombic box (positions wrapped into [0, L),
distances by minimum image; along an axis shorter than 2·cutoff only the nearest image of a point
counts).

Everything is deterministic: members of a cell are kept in ascending index order, per-point results
are gathered rather than scattered, and pair lists are sorted before they are returned.

Neighbour loops inside your own kernels (``grid.cells`` is a `CellList`)::

    @ti.kernel
    def my_kernel(cells: ti.template(), pos: ti.template(), n: ti.i32):
        for i in range(n):
            home = cells.home_cell(pos[i])
            for c in range(NEIGHBOUR_CELLS):
                begin, end = cells.neighbour_span(home, c)
                for k in range(begin, end):
                    j = cells.order[k]                        # a candidate, possibly i itself
                    d = cells.displacement(pos[i], pos[j])    # pos[j] − pos[i], minimum image, Å
                    ...                                       # test |d| against your radius

    my_kernel(grid.cells, pos, n)

Pass ``grid.cells``, not the grid: it is replaced by a larger `CellList` when the points outgrow it,
and a new object makes Taichi compile the kernel afresh instead of reading fields that are gone.
The loop finds every j within ``cutoff`` of pos[i] as the cells were built; if points have moved by
up to δ since the build, every pair now within ``cutoff − δ`` (the Verlet-skin rule).
`NeighbourGrid.repulsion_gradient` is written this way.
"""

import numpy as np
import taichi as ti

NEIGHBOUR_CELLS = 27
MAX_CELLS_PER_AXIS = 256
MIN_CELL_BUDGET = 4096  # cells allowed however few the points; beyond that 2 per point of capacity
# Cells are at least cutoff·(1 + margin) wide. f32 cell coordinates are off by up to ~1e-4 of a
# cell at 256 cells per axis; with the margin two points within the cutoff never land two cells apart.
CELL_MARGIN = 1e-3
BLOCK = 1024  # items one thread handles in the two-level reductions (bounds, prefix sum)


def _power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@ti.data_oriented
class CellList:
    """Device fields of one cell list for up to ``capacity`` points (cutoff and box as `NeighbourGrid`).

    pos      (capacity,) positions at the last build, Å (wrapped into the box when periodic)
    order    (capacity,) point indices sorted by cell, ascending within a cell
    start    (cells + 1,) where each cell's run in ``order`` begins (cells numbered x fastest)
    dims, origin (Å), inv_edge (Å⁻¹): the grid of the last build (0-D fields)
    """

    def __init__(self, cutoff: float, capacity: int, box):
        self.cutoff = float(cutoff)
        self.capacity = int(capacity)
        self.periodic = box is not None
        self.box = tuple(float(v) for v in box) if self.periodic else (0.0, 0.0, 0.0)
        self.max_cells = max(MIN_CELL_BUDGET, 2 * self.capacity)
        self.pos = ti.Vector.field(3, ti.f32, self.capacity)
        self.point_cell = ti.field(ti.i32, self.capacity)
        self.order = ti.field(ti.i32, self.capacity)
        self.start = ti.field(ti.i32, self.max_cells + 1)
        self.fill = ti.field(ti.i32, self.max_cells)  # per-cell counts, then fill cursors
        self.block_lo = ti.Vector.field(3, ti.f32, (self.capacity + BLOCK - 1) // BLOCK)
        self.block_hi = ti.Vector.field(3, ti.f32, (self.capacity + BLOCK - 1) // BLOCK)
        self.block_sum = ti.field(ti.i32, (self.max_cells + BLOCK - 1) // BLOCK)
        self.dims = ti.Vector.field(3, ti.i32, ())
        self.origin = ti.Vector.field(3, ti.f32, ())
        self.inv_edge = ti.Vector.field(3, ti.f32, ())

    # ------------------------------------------------------------------ ti.func API
    @ti.func
    def home_cell(self, p):
        """Integer cell coordinates (x, y, z) of the cell holding position p (Å); positions outside
        an open grid go to the nearest edge cell, which still finds every point within the cutoff."""
        q = p
        if ti.static(self.periodic):
            box = ti.Vector(self.box)
            q = p - box * ti.floor(p / box)
        dims = self.dims[None]
        # Clamp as floats first so huge coordinates cannot overflow the cast, then as ints for NaN.
        u = ti.min(ti.max((q - self.origin[None]) * self.inv_edge[None], 0.0), ti.cast(dims - 1, ti.f32))
        return ti.min(ti.max(ti.cast(ti.floor(u), ti.i32), 0), dims - 1)

    @ti.func
    def neighbour_span(self, home, c):
        """(begin, end) in ``order`` of the members of neighbour cell c (0 ≤ c < 27) of cell ``home``;
        empty where that cell lies off an open grid, or repeats an earlier one along a periodic axis
        of fewer than 3 cells."""
        offset = ti.Vector([c % 3 - 1, c // 3 % 3 - 1, c // 9 - 1])
        dims = self.dims[None]
        cell = home + offset
        valid = True
        for a in ti.static(range(3)):
            if ti.static(self.periodic):
                # Offsets −1..(span − 2) with span = min(dims, 3) reach each distinct cell once.
                valid = valid and offset[a] <= ti.min(dims[a], 3) - 2
                cell[a] = (cell[a] + dims[a]) % dims[a]
            else:
                valid = valid and 0 <= cell[a] < dims[a]
        begin = 0
        end = 0
        if valid:
            first = self.linear(cell)
            begin = self.start[first]
            end = self.start[first + 1]
        return begin, end

    @ti.func
    def linear(self, cell):
        """Index of the cell with integer coordinates ``cell`` (x fastest)."""
        dims = self.dims[None]
        return (cell[2] * dims[1] + cell[1]) * dims[0] + cell[0]

    @ti.func
    def n_cells(self):
        """Cells in the grid of the last build."""
        dims = self.dims[None]
        return dims[0] * dims[1] * dims[2]

    @ti.func
    def displacement(self, a, b):
        """b − a (Å), the minimum image when periodic."""
        d = b - a
        if ti.static(self.periodic):
            box = ti.Vector(self.box)
            d -= box * ti.floor(d / box + 0.5)
        return d

    # ------------------------------------------------------------------ build
    @ti.kernel
    def load(self, src: ti.template(), n: ti.i32):
        """Copy n positions (Å) from a Vector(3) field (``pos`` itself is fine) into ``pos``."""
        for i in range(n):
            p = src[i]
            if ti.static(self.periodic):
                box = ti.Vector(self.box)
                p -= box * ti.floor(p / box)
            self.pos[i] = p

    @ti.func
    def _choose_grid(self, n):
        """Grid over the bounding box (open) or the box (periodic): as many cells per axis as fit at
        the minimum edge, at most 256, then coarsened to the cell budget."""
        lo = ti.Vector([0.0, 0.0, 0.0])
        extent = ti.Vector(self.box)
        if ti.static(not self.periodic):
            nb = (n + BLOCK - 1) // BLOCK
            hi = lo
            if nb > 0:
                lo = self.block_lo[0]
                hi = self.block_hi[0]
            for b in range(1, nb):
                lo = ti.min(lo, self.block_lo[b])
                hi = ti.max(hi, self.block_hi[b])
            extent = hi - lo
        edge_min = ti.static(self.cutoff * (1.0 + CELL_MARGIN))
        dims = ti.cast(ti.min(ti.max(extent / edge_min, 1.0), float(MAX_CELLS_PER_AXIS)), ti.i32)
        dims = ti.min(ti.max(dims, 1), MAX_CELLS_PER_AXIS)  # NaN-proof
        while dims[0] * dims[1] * dims[2] > ti.static(self.max_cells):
            # Coarsen the axis with the narrowest cells: keeps cells near cubic in sparse, huge boxes.
            narrowest = 0
            narrowest_edge = 3.0e38
            for a in ti.static(range(3)):
                edge = extent[a] / dims[a]
                if dims[a] > 1 and edge < narrowest_edge:
                    narrowest = a
                    narrowest_edge = edge
            for a in ti.static(range(3)):
                if a == narrowest:
                    dims[a] -= ti.max(1, dims[a] // 8)
        self.dims[None] = dims
        self.origin[None] = lo
        self.inv_edge[None] = 1.0 / ti.max(extent / ti.cast(dims, ti.f32), edge_min)

    @ti.kernel
    def index(self, n: ti.i32):
        """Sort the first n points of ``pos`` into cells: counting sort, then each cell's members by
        index (the atomic fill order varies from run to run). Its atomics sit directly in the point
        loop, where Mesa's software Vulkan keeps every one (see `NeighbourGrid.pairs`)."""
        if ti.static(not self.periodic):
            for b in range((n + BLOCK - 1) // BLOCK):
                lo = self.pos[b * BLOCK]
                hi = lo
                for i in range(b * BLOCK + 1, ti.min(n, (b + 1) * BLOCK)):
                    lo = ti.min(lo, self.pos[i])
                    hi = ti.max(hi, self.pos[i])
                self.block_lo[b] = lo
                self.block_hi[b] = hi
        for _ in range(1):  # serial
            self._choose_grid(n)
        for c in range(self.n_cells()):
            self.fill[c] = 0
        for i in range(n):
            c = self.linear(self.home_cell(self.pos[i]))
            self.point_cell[i] = c
            ti.atomic_add(self.fill[c], 1)
        # Exclusive prefix sum of the counts: blocks of cells in parallel, block totals serially.
        for b in range((self.n_cells() + BLOCK - 1) // BLOCK):
            total = 0
            for c in range(b * BLOCK, ti.min((b + 1) * BLOCK, self.n_cells())):
                total += self.fill[c]
            self.block_sum[b] = total
        for _ in range(1):  # serial
            cells = self.n_cells()
            running = 0
            for b in range((cells + BLOCK - 1) // BLOCK):
                total = self.block_sum[b]
                self.block_sum[b] = running
                running += total
            self.start[cells] = n
        for b in range((self.n_cells() + BLOCK - 1) // BLOCK):
            running = self.block_sum[b]
            for c in range(b * BLOCK, ti.min((b + 1) * BLOCK, self.n_cells())):
                self.start[c] = running
                running += self.fill[c]
                self.fill[c] = 0
        for i in range(n):
            c = self.point_cell[i]
            self.order[self.start[c] + ti.atomic_add(self.fill[c], 1)] = i
        for c in range(self.n_cells()):
            begin = self.start[c]
            for k in range(begin + 1, self.start[c + 1]):
                v = self.order[k]
                m = k
                while m > begin and self.order[m - 1] > v:
                    self.order[m] = self.order[m - 1]
                    m -= 1
                self.order[m] = v


@ti.data_oriented
class NeighbourGrid:
    """Cell list (uniform grid of near-cubic cells of edge >= cutoff, Å) over points in 3D, rebuilt as
    atoms move; O(N) build and O(N) queries, never O(N²).

    cutoff   : the largest radius any query may ask for, Å.
    capacity : points the device fields hold before they grow (by doubling; growing recompiles).
    box      : None for open boundaries (the grid spans the points' bounding box at each build), or
               the (3,) lengths of a periodic orthorhombic box, Å (points are wrapped into [0, L)).

    Memory stays bounded in huge sparse boxes: at most 256 cells per axis and max(4096, 2·capacity)
    cells in all, enlarging cells as needed. ``cells`` is the current `CellList` (see the module
    docstring for looping over neighbours in your own kernels); ``count`` the points of the last build.
    """

    def __init__(self, cutoff: float, capacity: int = 1024, box=None):
        self.cutoff = float(cutoff)
        if not self.cutoff > 0.0 or not np.isfinite(self.cutoff):
            raise ValueError(f"cutoff must be a positive length in Å, got {cutoff!r}")
        if box is not None:
            box = np.asarray(box, dtype=np.float64).reshape(-1)
            if box.shape != (3,) or not np.all(np.isfinite(box)) or np.any(box <= 0.0):
                raise ValueError(f"box must be three positive lengths in Å, got {box!r}")
        self.box = box
        self.count = 0
        self.built = False
        self._pair_capacity = 0
        self._query_capacity = 0
        self._allocate_points(_power_of_two(max(int(capacity), 1)))

    def _allocate_points(self, capacity: int) -> None:
        self.cells = CellList(self.cutoff, capacity, self.box)
        self._counts = ti.field(ti.i32, capacity)
        self._energy = ti.field(ti.f32, capacity)

    def _reserve(self, n: int) -> None:
        if n > self.cells.capacity:
            self._allocate_points(_power_of_two(n))

    # ------------------------------------------------------------------ build
    def build(self, positions) -> None:
        """Sort NumPy positions (N, 3), Å, into cells."""
        positions = np.asarray(positions, dtype=np.float32)
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise ValueError(f"positions must be an (N, 3) array, got shape {positions.shape}")
        if not np.all(np.isfinite(positions)):
            raise ValueError("positions must be finite")
        n = len(positions)
        self._reserve(n)
        padded = np.zeros((self.cells.capacity, 3), np.float32)
        padded[:n] = positions
        self.cells.pos.from_numpy(padded)
        self._index(self.cells.pos, n)

    def build_from_field(self, field, n: int) -> None:
        """Sort the first n positions (Å) of a ti.Vector.field(3, ti.f32) into cells, on the device."""
        n = int(n)
        if not 0 <= n <= field.shape[0]:
            raise ValueError(f"count {n} does not fit the field's {field.shape[0]} entries")
        self._reserve(n)
        self._index(field, n)

    def _index(self, source, n: int) -> None:
        self.cells.load(source, n)
        self.cells.index(n)
        self.count = n
        self.built = True

    def cell_shape(self):
        """Cells per axis (3,) and cell edge lengths (3,), Å, of the last build."""
        self._require_built()
        return self.cells.dims.to_numpy(), 1.0 / self.cells.inv_edge.to_numpy().astype(np.float64)

    def _require_built(self) -> None:
        if not self.built:
            raise RuntimeError("build the neighbour grid before querying it")

    def _radius_squared(self, radius) -> float:
        radius = self.cutoff if radius is None else float(radius)
        if not 0.0 <= radius <= self.cutoff:
            raise ValueError(f"radius {radius} Å must lie in [0, cutoff = {self.cutoff} Å]")
        return radius * radius

    # ------------------------------------------------------------------ queries
    @ti.kernel
    def _count(self, cells: ti.template(), counts: ti.template(), n: ti.i32, r2: ti.f32, above_only: ti.i32):
        for i in range(n):
            p = cells.pos[i]
            home = cells.home_cell(p)
            total = 0
            for c in range(NEIGHBOUR_CELLS):
                begin, end = cells.neighbour_span(home, c)
                for k in range(begin, end):
                    j = cells.order[k]
                    d = cells.displacement(p, cells.pos[j])
                    if (j > i or (j != i and above_only == 0)) and d.dot(d) <= r2:
                        total += 1
            counts[i] = total

    @ti.kernel
    def _fill_pairs(self, cells: ti.template(), offsets: ti.template(), out: ti.template(), n: ti.i32, r2: ti.f32):
        for i in range(n):
            p = cells.pos[i]
            home = cells.home_cell(p)
            slot = offsets[i]
            for c in range(NEIGHBOUR_CELLS):
                begin, end = cells.neighbour_span(home, c)
                for k in range(begin, end):
                    j = cells.order[k]
                    d = cells.displacement(p, cells.pos[j])
                    if j > i and d.dot(d) <= r2:
                        out[slot] = ti.Vector([i, j])
                        slot += 1
            # Sort this point's few partners: with points in ascending order that makes the list
            # lexicographic, with no sort on the host.
            for k in range(offsets[i] + 1, slot):
                pair = out[k]
                m = k
                while m > offsets[i] and out[m - 1][1] > pair[1]:
                    out[m] = out[m - 1]
                    m -= 1
                out[m] = pair

    def pairs(self, radius=None) -> np.ndarray:
        """(P, 2) int32 pairs i < j at distance <= radius (Å; default and at most the cutoff), minimum
        image when periodic, sorted lexicographically.

        Counted per point first, then written from each point's offset: no atomics (Mesa's software
        Vulkan drops atomic adds issued inside inner loops), and the buffer is sized before filling."""
        r2 = self._radius_squared(radius)
        self._require_built()
        n = self.count
        self._count(self.cells, self._counts, n, r2, 1)
        counts = self._counts.to_numpy()[:n].astype(np.int64)
        total = int(counts.sum())
        if total > self._pair_capacity:
            self._pair_capacity = _power_of_two(total)
            self._pair_buffer = ti.Vector.field(2, ti.i32, self._pair_capacity)
        offsets = np.zeros(self.cells.capacity, np.int32)
        offsets[:n] = np.cumsum(counts) - counts
        self._counts.from_numpy(offsets)
        if total == 0:
            return np.zeros((0, 2), np.int32)
        self._fill_pairs(self.cells, self._counts, self._pair_buffer, n, r2)
        return self._pair_buffer.to_numpy()[:total]

    @ti.kernel
    def _nearest(self, cells: ti.template(), queries: ti.template(), best_d2: ti.template(),
                 best_index: ti.template(), nq: ti.i32, r2: ti.f32):
        for q in range(nq):
            p = queries[q]
            home = cells.home_cell(p)
            d2_min = r2
            j_min = -1
            for c in range(NEIGHBOUR_CELLS):
                begin, end = cells.neighbour_span(home, c)
                for k in range(begin, end):
                    j = cells.order[k]
                    d = cells.displacement(p, cells.pos[j])
                    d2 = d.dot(d)
                    # Ties go to the lower index, whatever order the cells are visited in.
                    if d2 < d2_min or (d2 == d2_min and (j_min == -1 or j < j_min)):
                        d2_min = d2
                        j_min = j
            best_d2[q] = d2_min
            best_index[q] = j_min

    def nearest(self, queries):
        """For each query point (Q, 3), Å: the distance (Å, float64) to and index (int32) of the
        nearest point within the cutoff; inf and -1 where there is none."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != 3 or not np.all(np.isfinite(queries)):
            raise ValueError(f"queries must be a finite (Q, 3) array, got shape {queries.shape}")
        r2 = self._radius_squared(None)
        self._require_built()
        nq = len(queries)
        if max(nq, 1) > self._query_capacity:
            self._query_capacity = _power_of_two(max(nq, 1024))
            self._queries = ti.Vector.field(3, ti.f32, self._query_capacity)
            self._best_d2 = ti.field(ti.f32, self._query_capacity)
            self._best_index = ti.field(ti.i32, self._query_capacity)
        padded = np.zeros((self._query_capacity, 3), np.float32)
        padded[:nq] = queries
        self._queries.from_numpy(padded)
        self._nearest(self.cells, self._queries, self._best_d2, self._best_index, nq, r2)
        index = self._best_index.to_numpy()[:nq]
        distance = np.sqrt(self._best_d2.to_numpy()[:nq].astype(np.float64))
        distance[index < 0] = np.inf
        return distance, index

    def count_within(self, radius) -> np.ndarray:
        """(N,) int32: how many other points lie within ``radius`` (Å, at most the cutoff) of each point."""
        r2 = self._radius_squared(radius)
        self._require_built()
        self._count(self.cells, self._counts, self.count, r2, 0)
        return self._counts.to_numpy()[: self.count]

    @ti.kernel
    def _repulsion(self, cells: ti.template(), pos: ti.template(), grad: ti.template(),
                   energy: ti.template(), n: ti.i32, d_min: ti.f32, strength: ti.f32):
        for i in range(n):
            p = pos[i]
            home = cells.home_cell(p)
            g = ti.Vector([0.0, 0.0, 0.0])
            e = 0.0
            for c in range(NEIGHBOUR_CELLS):
                begin, end = cells.neighbour_span(home, c)
                for k in range(begin, end):
                    j = cells.order[k]
                    d = cells.displacement(p, pos[j])
                    dist = d.norm()
                    if j != i and dist < d_min:
                        e += strength * (d_min - dist) ** 2
                        if dist > 0.0:  # coincident points have no direction to push along
                            g += (2.0 * strength * (d_min - dist) / dist) * d
            energy[i] = 0.5 * e  # each pair is seen from both ends
            grad[i] += g

    def repulsion_gradient(self, pos_field, n: int, d_min: float, strength: float, grad_field) -> float:
        """Soft repulsion E = strength · Σ_{pairs, d < d_min} (d_min − d)² over the first n points of
        ``pos_field`` (Å): adds dE/dpos (per Å) to ``grad_field`` (a Vector(3) field) and returns E.

        The grid must have been built from these n points; they may have moved since by up to
        cutoff − d_min (Å) and every pair is still found. Each point gathers its own gradient and
        energy share, and E is summed in float64 on the host: the same on every run.
        """
        n = int(n)
        self._require_built()
        if n != self.count:
            raise ValueError(f"the grid holds {self.count} points, not {n}")
        if not 0.0 <= d_min <= self.cutoff:
            raise ValueError(f"d_min {d_min} Å must lie in [0, cutoff = {self.cutoff} Å]")
        self._repulsion(self.cells, pos_field, grad_field, self._energy, n, d_min, strength)
        return float(self._energy.to_numpy()[:n].astype(np.float64).sum())
