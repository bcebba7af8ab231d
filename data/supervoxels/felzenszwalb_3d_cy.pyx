# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""3D Felzenszwalb-Huttenlocher graph segmentation (method.md §2, supervoxel pseudo-labels).

Everything that decides which partition comes out is fixed here, in the order the published supervoxels
were computed:

* the 13-neighbour grid graph, its edges enumerated block by block (``EDGE_BLOCKS``), first endpoint in
  C order of the block's own shape;
* edge costs ``sqrt(w * (I_a - I_b)**2)`` in float64;
* the edge order of NumPy <= 1.24's ``argsort(kind='quicksort')`` for float64 (introsort: median-of-three
  quicksort, insertion sort for partitions of 16 or fewer, heapsort past a depth of 2*floor(log2 n)),
  ported in :func:`classic_argsort` because NumPy 2 sorts ties differently;
* merge thresholds ``internal + scale / size`` rounded to float32, joins under the smaller root
  (``_union_find.pxd``), then the small-segment pass with ``min_size``.

Shapes: image ``(Z, Y, X)`` float64 (``Z`` slices); labels ``(Z, Y, X)`` int32.
"""

import numpy as np

from libc.math cimport sqrt

from data.supervoxels._union_find cimport find_root, join_trees

cdef enum:
    # Partitions of at most SMALL_PARTITION + 1 elements are insertion-sorted (NumPy's SMALL_QUICKSORT).
    SMALL_PARTITION = 15
    # Pending-partition stack: the larger side is pushed, so its depth never exceeds log2(n) < 64.
    STACK_SIZE = 128
    N_BLOCKS = 13

#: Edge blocks in enumeration order: offsets (dz, dy, dx) of the first endpoint ``a`` and of ``b``
#: relative to the block's voxel ``(z, y, x)``, and the weight (1: in-plane, 2: pure z, 3: z plus one
#: in-plane axis, 4: z plus both in-plane axes).
EDGE_BLOCKS = (
    ((0, 1, 0), (0, 0, 0), 1),
    ((0, 1, 1), (0, 0, 0), 1),
    ((0, 0, 1), (0, 0, 0), 1),
    ((0, 1, 0), (0, 0, 1), 1),
    ((1, 1, 0), (0, 0, 0), 3),
    ((1, 1, 1), (0, 0, 0), 4),
    ((1, 0, 1), (0, 0, 0), 3),
    ((1, 0, 0), (0, 1, 0), 3),
    ((1, 0, 0), (0, 1, 1), 4),
    ((1, 0, 0), (0, 0, 1), 3),
    ((1, 1, 0), (0, 0, 1), 4),
    ((1, 0, 1), (0, 1, 0), 4),
    ((1, 0, 0), (0, 0, 0), 2),
)


cdef struct EdgeLayout:
    # Per block: first global edge index (plus the total at N_BLOCKS), block extent in z, y and x, and
    # the flat-index offsets of both endpoints from the block voxel.
    Py_ssize_t start[N_BLOCKS + 1]
    Py_ssize_t size_z[N_BLOCKS]
    Py_ssize_t size_y[N_BLOCKS]
    Py_ssize_t size_x[N_BLOCKS]
    Py_ssize_t offset_a[N_BLOCKS]
    Py_ssize_t offset_b[N_BLOCKS]


cdef EdgeLayout make_layout(Py_ssize_t Z, Py_ssize_t Y, Py_ssize_t X):
    cdef EdgeLayout layout
    cdef Py_ssize_t k, ez, ey, ex
    layout.start[0] = 0
    for k, (a, b, _) in enumerate(EDGE_BLOCKS):
        ez, ey, ex = max(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2])
        layout.size_z[k] = max(Z - ez, 0)
        layout.size_y[k] = max(Y - ey, 0)
        layout.size_x[k] = max(X - ex, 0)
        layout.offset_a[k] = a[0] * Y * X + a[1] * X + a[2]
        layout.offset_b[k] = b[0] * Y * X + b[1] * X + b[2]
        layout.start[k + 1] = layout.start[k] + layout.size_z[k] * layout.size_y[k] * layout.size_x[k]
    return layout


cdef inline void edge_ends(const EdgeLayout *layout, Py_ssize_t Y, Py_ssize_t X, Py_ssize_t edge,
                           Py_ssize_t *a, Py_ssize_t *b) noexcept nogil:
    """Both endpoints (flat voxel indices) of global edge number ``edge``."""
    cdef Py_ssize_t k = N_BLOCKS - 1
    cdef Py_ssize_t local, x, y, z, voxel
    while layout.start[k] > edge:  # the last block starting at or before ``edge`` (empty ones skipped)
        k -= 1
    local = edge - layout.start[k]
    x = local % layout.size_x[k]
    local = local // layout.size_x[k]
    y = local % layout.size_y[k]
    z = local // layout.size_y[k]
    voxel = (z * Y + y) * X + x
    a[0] = voxel + layout.offset_a[k]
    b[0] = voxel + layout.offset_b[k]


# --- classic NumPy introsort argsort (float64) ---------------------------------------------------------

cdef inline bint less(double a, double b) noexcept nogil:
    """NumPy's float ordering: NaNs sort last."""
    return a < b or (b != b and a == a)


cdef inline void swap(Py_ssize_t *order, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef Py_ssize_t tmp = order[i]
    order[i] = order[j]
    order[j] = tmp


cdef void heap_argsort(const double *v, Py_ssize_t *order, Py_ssize_t n) noexcept nogil:
    """Indirect heapsort of ``order[0:n]`` by ``v`` (1-based heap positions, as NumPy's aheapsort)."""
    cdef Py_ssize_t i, j, top, tmp
    top = n >> 1
    while top > 0:  # build the max-heap
        tmp = order[top - 1]
        i = top
        j = top << 1
        while j <= n:
            if j < n and less(v[order[j - 1]], v[order[j]]):
                j += 1
            if less(v[tmp], v[order[j - 1]]):
                order[i - 1] = order[j - 1]
                i = j
                j += j
            else:
                break
        order[i - 1] = tmp
        top -= 1
    while n > 1:  # move the maximum to the end, sift the displaced last element down
        tmp = order[n - 1]
        order[n - 1] = order[0]
        n -= 1
        i = 1
        j = 2
        while j <= n:
            if j < n and less(v[order[j - 1]], v[order[j]]):
                j += 1
            if less(v[tmp], v[order[j - 1]]):
                order[i - 1] = order[j - 1]
                i = j
                j += j
            else:
                break
        order[i - 1] = tmp


cdef void introsort_argsort(const double *v, Py_ssize_t *order, Py_ssize_t num) noexcept nogil:
    """Indirect introsort of ``order[0:num]`` by ``v``, step for step as NumPy <= 1.24's aquicksort."""
    cdef Py_ssize_t stack[STACK_SIZE]
    cdef int depth_stack[STACK_SIZE]
    cdef Py_ssize_t n_stack = 0
    cdef Py_ssize_t pl = 0
    cdef Py_ssize_t pr = num - 1
    cdef Py_ssize_t pm, pi, pj, vi
    cdef double vp
    cdef int depth = 0
    cdef Py_ssize_t bits = num
    while bits > 1:  # depth limit 2 * floor(log2(num))
        bits >>= 1
        depth += 1
    depth *= 2
    while True:
        if depth < 0:
            heap_argsort(v, order + pl, pr - pl + 1)
        else:
            while pr - pl > SMALL_PARTITION:
                pm = pl + ((pr - pl) >> 1)  # median of three, pivot parked at pr - 1
                if less(v[order[pm]], v[order[pl]]):
                    swap(order, pm, pl)
                if less(v[order[pr]], v[order[pm]]):
                    swap(order, pr, pm)
                if less(v[order[pm]], v[order[pl]]):
                    swap(order, pm, pl)
                vp = v[order[pm]]
                pi = pl
                pj = pr - 1
                swap(order, pm, pj)
                while True:
                    pi += 1
                    while less(v[order[pi]], vp):
                        pi += 1
                    pj -= 1
                    while less(vp, v[order[pj]]):
                        pj -= 1
                    if pi >= pj:
                        break
                    swap(order, pi, pj)
                swap(order, pi, pr - 1)
                if pi - pl < pr - pi:  # push the larger side, continue with the smaller one
                    stack[n_stack] = pi + 1
                    stack[n_stack + 1] = pr
                    pr = pi - 1
                else:
                    stack[n_stack] = pl
                    stack[n_stack + 1] = pi - 1
                    pl = pi + 1
                depth -= 1
                depth_stack[n_stack >> 1] = depth
                n_stack += 2
            pi = pl + 1
            while pi <= pr:  # insertion sort of the small partition
                vi = order[pi]
                vp = v[vi]
                pj = pi
                while pj > pl and less(vp, v[order[pj - 1]]):
                    order[pj] = order[pj - 1]
                    pj -= 1
                order[pj] = vi
                pi += 1
        if n_stack == 0:
            break
        n_stack -= 2
        pl = stack[n_stack]
        pr = stack[n_stack + 1]
        depth = depth_stack[n_stack >> 1]


def classic_argsort(values) -> np.ndarray:
    """Order of NumPy <= 1.24 ``np.argsort(values, kind='quicksort')`` for a 1-D float64 array.

    Shape: ``(N,)`` float64 -> ``(N,)`` intp. Ties come out exactly as the classic introsort leaves them.
    """
    array = np.ascontiguousarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"classic_argsort: expected a 1-D array, got shape {array.shape}")
    cdef const double[::1] v = array
    order_array = np.arange(v.shape[0], dtype=np.intp)
    cdef Py_ssize_t[::1] order = order_array
    if v.shape[0] > 1:
        with nogil:
            introsort_argsort(&v[0], &order[0], v.shape[0])
    return order_array


# --- graph ---------------------------------------------------------------------------------------------

def edge_weights(spacing) -> tuple:
    """Weights ``(w1, w2, w3, w4)`` of in-plane, pure-z, z+one-axis and z+two-axes edges.

    ``spacing`` is ``(z, y, x)`` in mm and ``s = spacing[0] / spacing[1]``. The float64 arithmetic is the
    published one on purpose (``w3 = (sqrt(1 + s**2) / sqrt(2))**2``, scalar ``**`` going through the C
    ``pow`` as NumPy does): it equals ``(1 + s**2) / 2`` mathematically but not always bit for bit, and
    the bits decide ties between edge costs.
    """
    sp = np.ascontiguousarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing: expected 3 positive finite values (z, y, x), got {spacing!r}")
    s = sp[0] / sp[1]
    w2 = s ** 2
    w3 = (np.sqrt(1 + s ** 2) / np.sqrt(2)) ** 2
    w4 = (np.sqrt(2 + s ** 2) / np.sqrt(3)) ** 2
    return 1.0, float(w2), float(w3), float(w4)


def _check_image(image) -> np.ndarray:
    volume = np.ascontiguousarray(image, dtype=np.float64)
    if volume.ndim != 3 or volume.size == 0:
        raise ValueError(f"image: expected a non-empty (Z, Y, X) volume, got shape {np.shape(image)}")
    if not np.all(np.isfinite(volume)):
        raise ValueError("image: contains NaN or infinite values")
    return volume


def edge_endpoints(shape) -> tuple:
    """Endpoints ``(a, b)`` of every edge of a ``(Z, Y, X)`` grid, in enumeration order.

    Shape: two ``(E,)`` intp arrays of flat voxel indices (``z*Y*X + y*X + x``), ``E`` = number of edges.
    """
    cdef Py_ssize_t Z, Y, X, e
    Z, Y, X = (int(n) for n in shape)
    cdef EdgeLayout layout = make_layout(Z, Y, X)
    a_array = np.empty(layout.start[N_BLOCKS], dtype=np.intp)
    b_array = np.empty(layout.start[N_BLOCKS], dtype=np.intp)
    cdef Py_ssize_t[::1] a = a_array
    cdef Py_ssize_t[::1] b = b_array
    for e in range(layout.start[N_BLOCKS]):
        edge_ends(&layout, Y, X, e, &a[e], &b[e])
    return a_array, b_array


cdef void fill_costs(const double *image, Py_ssize_t Z, Py_ssize_t Y, Py_ssize_t X,
                     const EdgeLayout *layout, const double *block_weight, double *costs) noexcept nogil:
    cdef Py_ssize_t k, z, y, x, voxel, e
    cdef double d, w
    for k in range(N_BLOCKS):
        e = layout.start[k]
        w = block_weight[k]
        for z in range(layout.size_z[k]):
            for y in range(layout.size_y[k]):
                voxel = (z * Y + y) * X
                for x in range(layout.size_x[k]):
                    d = image[voxel + x + layout.offset_a[k]] - image[voxel + x + layout.offset_b[k]]
                    costs[e] = sqrt(w * (d * d))
                    e += 1


def edge_costs(image, spacing) -> np.ndarray:
    """Cost ``sqrt(w * (I_a - I_b)**2)`` of every edge, in enumeration order.

    Shape: image ``(Z, Y, X)`` -> ``(E,)`` float64.
    """
    volume = _check_image(image)
    weights = edge_weights(spacing)
    cdef Py_ssize_t Z = volume.shape[0], Y = volume.shape[1], X = volume.shape[2]
    cdef EdgeLayout layout = make_layout(Z, Y, X)
    cdef double block_weight[N_BLOCKS]
    for k, (_, _, weight_id) in enumerate(EDGE_BLOCKS):
        block_weight[k] = weights[weight_id - 1]
    costs_array = np.empty(layout.start[N_BLOCKS], dtype=np.float64)
    cdef double[::1] costs = costs_array
    cdef const double[:, :, ::1] img = volume
    if costs.shape[0] > 0:
        with nogil:
            fill_costs(&img[0, 0, 0], Z, Y, X, &layout, block_weight, &costs[0])
    return costs_array


# --- segmentation --------------------------------------------------------------------------------------

def felzenszwalb_3d(image, spacing, Py_ssize_t min_size, double scale=1.0) -> np.ndarray:
    """Felzenszwalb-Huttenlocher segmentation of a 3D volume on the 13-neighbour grid graph.

    ``image`` is the volume rescaled to 0-255 (no smoothing is applied), ``spacing`` its ``(z, y, x)``
    voxel size, ``min_size`` the smallest segment kept (``n_sv``), ``scale`` the observation level
    (divided by 255 as in scikit-image). Labels are ``0..n-1`` in increasing order of each segment's
    smallest voxel index.

    Shape: ``(Z, Y, X)`` float -> ``(Z, Y, X)`` int32.
    """
    if min_size < 0:
        raise ValueError(f"min_size: expected a non-negative integer, got {min_size}")
    if not scale > 0:
        raise ValueError(f"scale: expected a positive number, got {scale}")
    volume = _check_image(image)
    costs_array = edge_costs(volume, spacing)
    order_array = classic_argsort(costs_array)
    cdef Py_ssize_t Z = volume.shape[0], Y = volume.shape[1], X = volume.shape[2]
    cdef Py_ssize_t n_voxels = Z * Y * X
    cdef EdgeLayout layout = make_layout(Z, Y, X)
    cdef const double[::1] costs = costs_array
    cdef const Py_ssize_t[::1] order = order_array
    parent_array = np.arange(n_voxels, dtype=np.intp)
    size_array = np.ones(n_voxels, dtype=np.intp)
    internal_array = np.zeros(n_voxels, dtype=np.float64)
    labels_array = np.empty(n_voxels, dtype=np.int32)
    cdef Py_ssize_t[::1] parent = parent_array
    cdef Py_ssize_t[::1] size = size_array
    cdef double[::1] internal = internal_array
    cdef int[::1] labels = labels_array
    cdef double unit = scale / 255.0
    cdef Py_ssize_t i, edge, a, b, root_a, root_b, root
    cdef Py_ssize_t n_edges = costs.shape[0]
    cdef float threshold_a, threshold_b
    cdef int n_labels = 0
    with nogil:
        for i in range(n_edges):
            edge = order[i]
            edge_ends(&layout, Y, X, edge, &a, &b)
            root_a = find_root(&parent[0], a)
            root_b = find_root(&parent[0], b)
            if root_a == root_b:
                continue
            # Thresholds are stored in C float by the published code; the rounding decides borderline joins.
            threshold_a = internal[root_a] + unit / size[root_a]
            threshold_b = internal[root_b] + unit / size[root_b]
            if costs[edge] < (threshold_a if threshold_a < threshold_b else threshold_b):
                root = join_trees(&parent[0], root_a, root_b)
                size[root] = size[root_a] + size[root_b]
                internal[root] = costs[edge]
        for i in range(n_edges):  # small-segment pass, same edge order
            edge = order[i]
            edge_ends(&layout, Y, X, edge, &a, &b)
            root_a = find_root(&parent[0], a)
            root_b = find_root(&parent[0], b)
            if root_a == root_b:
                continue
            if size[root_a] < min_size or size[root_b] < min_size:
                root = join_trees(&parent[0], root_a, root_b)
                size[root] = size[root_a] + size[root_b]
        for i in range(n_voxels):  # a root is its segment's smallest index, so it is labelled first
            root = find_root(&parent[0], i)
            if root == i:
                labels[i] = n_labels
                n_labels += 1
            else:
                labels[i] = labels[root]
    return labels_array.reshape(Z, Y, X)
