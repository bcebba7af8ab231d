# cython: language_level=3
"""Union-find over voxel indices for the 3D Felzenszwalb merge passes (method.md §2).

``parent`` holds one entry per voxel; a root is a voxel whose parent is itself. Every join points the
nodes on both paths to the *smaller* of the two roots, so a root is always the smallest voxel index of
its segment and ``parent[i] <= i`` holds for every ``i``. The partition, and hence the published
labels, depend only on the sequence of joins, never on how paths are compressed.
"""


cdef inline Py_ssize_t find_root(Py_ssize_t *parent, Py_ssize_t node) noexcept nogil:
    """Root of ``node``'s segment; every node on the path is re-pointed at the root (path compression)."""
    cdef Py_ssize_t root = node
    cdef Py_ssize_t step
    while parent[root] != root:
        root = parent[root]
    while parent[node] != root:
        step = parent[node]
        parent[node] = root
        node = step
    return root


cdef inline void point_path(Py_ssize_t *parent, Py_ssize_t node, Py_ssize_t root) noexcept nogil:
    """Point every node from ``node`` up to (and including) its root at ``root``."""
    cdef Py_ssize_t step
    while parent[node] != node:
        step = parent[node]
        parent[node] = root
        node = step
    parent[node] = root


cdef inline Py_ssize_t join_trees(Py_ssize_t *parent, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    """Merge the segments of ``a`` and ``b`` under the smaller of their two roots; return that root."""
    cdef Py_ssize_t root_a = find_root(parent, a)
    cdef Py_ssize_t root_b = find_root(parent, b)
    cdef Py_ssize_t root = root_a if root_a < root_b else root_b
    point_path(parent, a, root)
    point_path(parent, b, root)
    return root
