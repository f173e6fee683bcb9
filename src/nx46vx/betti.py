"""Betti matching of two binary 3-D images, as Betti-Matching-3D computes it (the competition's TopoScore).

Both images are cubical complexes in the V-construction: voxels are vertices, and an
edge, square or cube takes the largest value of its vertices. Values are 0 and 1
(``0`` = foreground of the *un*-inverted mask, so foreground components are H0).
Every cell is ordered by ``(value, index)``, the index being lexicographic in
``(x, y, z, type)`` with ``x`` the first array axis: this total order defines the
persistence pairs uniquely, so any correct reduction gives Betti-Matching-3D's pairs.

A persistence pair of image 0 and one of image 1 are *matched* when both map, through
the inclusions of their sublevel sets into those of the comparison image
``min(image0, image1)``, onto the same pair of the comparison image:

* **dimension 0** (components, union-find over edges in order): at each merge of the
  comparison, the younger root of each input over the same merged sets must be the
  birth vertex of a finite pair of that input;
* **dimension 1** (tunnels, column reduction of the squares' boundaries): the pivot of
  a comparison death square in the *image* reduction (columns in the comparison's
  order, rows in the input's order) must be the birth edge of a finite pair of that
  input;
* **dimension 2** (cavities, union-find over cubes and squares of the dual graph,
  squares in decreasing order): the comparison's dying cube must be the younger root,
  by comparison values, of a finite pair's merge in each input.

Only finite bars count (birth value ≠ death value). Dimension 2 is not computed when an
axis has length 1 (no cubes). Squares paired in dimension 2 never kill a tunnel and
are left out of the dimension-1 reductions (the reference's clearing), which does
not change any pair.

The kernels are compiled by numba at first use (cached on disk); no system compiler
is needed.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_OUTSIDE = 2  # the dual graph's outside node: older than every cube (the reference's +inf)


@nb.njit(cache=True, inline="always")
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@nb.njit(cache=True, inline="always")
def _link(parent: np.ndarray, birth: np.ndarray, a: int, b: int) -> int:
    """Join roots ``a`` and ``b`` by the elder rule of sublevel sets; return the younger (the loser)."""
    if birth[a] > birth[b] or (birth[a] == birth[b] and a > b):
        parent[a] = b
        return a
    parent[b] = a
    return b


@nb.njit(cache=True, inline="always")
def _link_dual(parent: np.ndarray, birth: np.ndarray, a: int, b: int) -> int:
    """Join dual roots ``a`` and ``b`` (the larger value is older; ties: the larger index); return the loser."""
    if birth[a] < birth[b] or (birth[a] == birth[b] and a < b):
        parent[a] = b
        return a
    parent[b] = a
    return b


@nb.njit(cache=True)
def _edges(nx: int, ny: int, nz: int) -> tuple:
    """Edge endpoints in index order: arrays ``(v, w)`` of vertex ids, and each edge's id ``3·v + type``."""
    n = 3 * nx * ny * nz
    v_out = np.empty(n, np.int64)
    w_out = np.empty(n, np.int64)
    id_out = np.empty(n, np.int64)
    k = 0
    nyz = ny * nz
    for x in range(nx):
        for y in range(ny):
            for z in range(nz):
                v = (x * ny + y) * nz + z
                if x + 1 < nx:
                    v_out[k], w_out[k], id_out[k] = v, v + nyz, 3 * v
                    k += 1
                if y + 1 < ny:
                    v_out[k], w_out[k], id_out[k] = v, v + nz, 3 * v + 1
                    k += 1
                if z + 1 < nz:
                    v_out[k], w_out[k], id_out[k] = v, v + 1, 3 * v + 2
                    k += 1
    return v_out[:k], w_out[:k], id_out[:k]


@nb.njit(cache=True)
def _dim0_input(vals: np.ndarray, ev: np.ndarray, ew: np.ndarray, eid: np.ndarray) -> tuple:
    """Finite dimension-0 pairs of one image: their birth vertices (mask), count, and the value-0 edges that close a loop."""
    n = vals.size
    parent = np.arange(n)
    born = np.zeros(n, np.bool_)
    positive0 = np.zeros(3 * n, np.bool_)
    count = 0
    for level in range(2):
        for k in range(ev.size):
            v, w = ev[k], ew[k]
            value = max(vals[v], vals[w])
            if value != level:
                continue
            a, b = _find(parent, v), _find(parent, w)
            if a == b:
                if level == 0:
                    positive0[eid[k]] = True
                continue
            loser = _link(parent, vals, a, b)
            if vals[loser] != value:
                born[loser] = True
                count += 1
    return born, count, positive0


@nb.njit(cache=True)
def _dim0_matches(f: np.ndarray, g: np.ndarray, c: np.ndarray, born_f: np.ndarray, born_g: np.ndarray,
                  ev: np.ndarray, ew: np.ndarray) -> int:
    n = c.size
    pc, pf, pg = np.arange(n), np.arange(n), np.arange(n)
    matched = 0
    for level in range(2):
        for k in range(ev.size):
            v, w = ev[k], ew[k]
            value = max(c[v], c[w])
            if value != level:
                continue
            a, b = _find(pc, v), _find(pc, w)
            if a == b:
                continue
            loser_c = _link(pc, c, a, b)
            loser_f = _link(pf, f, _find(pf, v), _find(pf, w))
            loser_g = _link(pg, g, _find(pg, v), _find(pg, w))
            if c[loser_c] != value and born_f[loser_f] and born_g[loser_g]:
                matched += 1
    return matched


@nb.njit(cache=True)
def _cube_values(vals3: np.ndarray) -> np.ndarray:
    """Value of every cube (dual-graph node) and, last, of the outside node."""
    nx, ny, nz = vals3.shape
    out = np.empty((nx - 1) * (ny - 1) * (nz - 1) + 1, np.uint8)
    k = 0
    for x in range(nx - 1):
        for y in range(ny - 1):
            for z in range(nz - 1):
                out[k] = vals3[x:x + 2, y:y + 2, z:z + 2].max()
                k += 1
    out[k] = _OUTSIDE
    return out


@nb.njit(cache=True)
def _square_value(vals: np.ndarray, sid: int, nyz: int, nz: int) -> int:
    v, t = sid // 3, sid % 3
    if t == 0:
        return max(max(vals[v], vals[v + 1]), max(vals[v + nz], vals[v + nz + 1]))
    if t == 1:
        return max(max(vals[v], vals[v + 1]), max(vals[v + nyz], vals[v + nyz + 1]))
    return max(max(vals[v], vals[v + nz]), max(vals[v + nyz], vals[v + nyz + nz]))


@nb.njit(cache=True)
def _squares(nx: int, ny: int, nz: int) -> tuple:
    """Square ids ``3·v + type`` in index order, with the two cubes each one bounds (the outside node where none)."""
    mx, my, mz = nx - 1, ny - 1, nz - 1
    outside = mx * my * mz if mx > 0 and my > 0 and mz > 0 else 0
    n = 3 * nx * ny * nz
    sid = np.empty(n, np.int64)
    lo = np.empty(n, np.int64)
    hi = np.empty(n, np.int64)
    k = 0
    for x in range(nx):
        for y in range(ny):
            for z in range(nz):
                v = (x * ny + y) * nz + z
                here = (x * my + y) * mz + z
                if y + 1 < ny and z + 1 < nz:  # type 0 spans y, z; cubes at x - 1 and x
                    sid[k] = 3 * v
                    lo[k] = outside if x == 0 else here - my * mz
                    hi[k] = outside if x == mx else here
                    k += 1
                if x + 1 < nx and z + 1 < nz:  # type 1 spans x, z; cubes at y - 1 and y
                    sid[k] = 3 * v + 1
                    lo[k] = outside if y == 0 else here - mz
                    hi[k] = outside if y == my else here
                    k += 1
                if x + 1 < nx and y + 1 < ny:  # type 2 spans x, y; cubes at z - 1 and z
                    sid[k] = 3 * v + 2
                    lo[k] = outside if z == 0 else here - 1
                    hi[k] = outside if z == mz else here
                    k += 1
    return sid[:k], lo[:k], hi[:k]


@nb.njit(cache=True)
def _dim2_input(vals: np.ndarray, cube_k: np.ndarray, cube_c: np.ndarray, sid: np.ndarray, lo: np.ndarray,
                hi: np.ndarray, nyz: int, nz: int) -> tuple:
    """Finite dimension-2 pairs of one image, keyed by the comparison's younger root of their merge; and the cleared squares."""
    pk, pc = np.arange(cube_k.size), np.arange(cube_k.size)
    keyed = np.zeros(cube_k.size, np.bool_)
    cleared = np.zeros(3 * vals.size, np.bool_)
    count = 0
    for level in range(1, -1, -1):
        for k in range(sid.size - 1, -1, -1):
            value = _square_value(vals, sid[k], nyz, nz)
            if value != level:
                continue
            a, b = _find(pk, lo[k]), _find(pk, hi[k])
            if a == b:
                continue
            loser = _link_dual(pk, cube_k, a, b)
            loser_c = _link_dual(pc, cube_c, _find(pc, lo[k]), _find(pc, hi[k]))
            cleared[sid[k]] = True
            if cube_k[loser] != value:
                keyed[loser_c] = True
                count += 1
    return keyed, count, cleared


@nb.njit(cache=True)
def _dim2_matches(c: np.ndarray, cube_c: np.ndarray, keyed_f: np.ndarray, keyed_g: np.ndarray, sid: np.ndarray,
                  lo: np.ndarray, hi: np.ndarray, nyz: int, nz: int) -> tuple:
    pc = np.arange(cube_c.size)
    cleared = np.zeros(3 * c.size, np.bool_)
    matched = 0
    for level in range(1, -1, -1):
        for k in range(sid.size - 1, -1, -1):
            value = _square_value(c, sid[k], nyz, nz)
            if value != level:
                continue
            a, b = _find(pc, lo[k]), _find(pc, hi[k])
            if a == b:
                continue
            loser = _link_dual(pc, cube_c, a, b)
            cleared[sid[k]] = True
            if cube_c[loser] != value and keyed_f[loser] and keyed_g[loser]:
                matched += 1
    return matched, cleared


@nb.njit(cache=True, inline="always")
def _faces(s: int, nyz: int, nz: int) -> tuple:
    v, t = s // 3, s % 3
    if t == 0:
        return 3 * v + 1, 3 * (v + 1) + 1, 3 * v + 2, 3 * (v + nz) + 2
    if t == 1:
        return 3 * v, 3 * (v + 1), 3 * v + 2, 3 * (v + nyz) + 2
    return 3 * v, 3 * (v + nz), 3 * v + 1, 3 * (v + nyz) + 1


@nb.njit(cache=True, inline="always")
def _edge_value(vals: np.ndarray, e: int, nyz: int, nz: int) -> int:
    v, t = e // 3, e % 3
    w = v + (nyz if t == 0 else (nz if t == 1 else 1))
    return max(vals[v], vals[w])


@nb.njit(cache=True, inline="always")
def _heap_push(heap: np.ndarray, size: int, key: int) -> np.ndarray:
    if size == heap.size:
        grown = np.empty(2 * heap.size, np.int64)
        grown[:size] = heap[:size]
        heap = grown
    i = size
    heap[i] = key
    while i > 0:
        up = (i - 1) >> 1
        if heap[up] >= heap[i]:
            break
        heap[up], heap[i] = heap[i], heap[up]
        i = up
    return heap


@nb.njit(cache=True, inline="always")
def _heap_pop(heap: np.ndarray, size: int) -> int:
    """Remove the largest key (``size`` > 0) and return it; the caller shrinks ``size`` by one."""
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        big = left
        if left + 1 < size and heap[left + 1] > heap[left]:
            big = left + 1
        if heap[i] >= heap[big]:
            break
        heap[i], heap[big] = heap[big], heap[i]
        i = big
    return top


@nb.njit(cache=True, inline="always")
def _pop_pivot(heap: np.ndarray, size: int) -> tuple:
    """The largest key present an odd number of times (removed), and the heap's new size; -1 when none is left."""
    while size > 0:
        top = _heap_pop(heap, size)
        size -= 1
        if size > 0 and heap[0] == top:
            _heap_pop(heap, size)
            size -= 1
            continue
        return top, size
    return -1, 0


@nb.njit(cache=True)
def _reduce(col_vals: np.ndarray, row_vals: np.ndarray, sid: np.ndarray, skip: np.ndarray, max_level: int,
            nyz: int, nz: int) -> np.ndarray:
    """Column reduction of the squares' boundaries; the pivot edge of every reduced column (-1: zero or not reduced).

    Columns are the squares of ``sid`` not in ``skip`` whose value in ``col_vals`` is at
    most ``max_level``, in ``(value, index)`` order; rows are edges in ``(value, index)``
    order of ``row_vals``. A row key is ``value·E + edge id`` with E the edge-id range.
    """
    n_ids = 3 * col_vals.size
    low = np.full(n_ids, -1, np.int64)
    owner = np.full(n_ids, -1, np.int64)  # edge -> square whose reduced column has it as pivot
    start = np.full(n_ids, -1, np.int64)  # square -> its stored reduced column (-1: the raw boundary)
    length = np.zeros(n_ids, np.int64)
    store = np.empty(1024, np.int64)
    used = 0
    heap = np.empty(64, np.int64)
    for level in range(max_level + 1):
        for k in range(sid.size):
            s = sid[k]
            if skip[s] or _square_value(col_vals, s, nyz, nz) != level:
                continue
            e0, e1, e2, e3 = _faces(s, nyz, nz)
            k0 = _edge_value(row_vals, e0, nyz, nz) * n_ids + e0
            k1 = _edge_value(row_vals, e1, nyz, nz) * n_ids + e1
            k2 = _edge_value(row_vals, e2, nyz, nz) * n_ids + e2
            k3 = _edge_value(row_vals, e3, nyz, nz) * n_ids + e3
            top = max(max(k0, k1), max(k2, k3))
            if owner[top % n_ids] < 0:  # emergent: the raw boundary is already reduced
                owner[top % n_ids] = s
                low[s] = top % n_ids
                continue
            size = 0
            heap = _heap_push(heap, size, k0)
            size += 1
            heap = _heap_push(heap, size, k1)
            size += 1
            heap = _heap_push(heap, size, k2)
            size += 1
            heap = _heap_push(heap, size, k3)
            size += 1
            pivot, size = _pop_pivot(heap, size)
            while pivot >= 0:
                j = owner[pivot % n_ids]
                if j < 0:
                    break
                # add column j: its pivot cancels ours, the rest joins the working column
                if start[j] < 0:
                    f0, f1, f2, f3 = _faces(j, nyz, nz)
                    for e in (f0, f1, f2, f3):
                        key = _edge_value(row_vals, e, nyz, nz) * n_ids + e
                        if key != pivot:
                            heap = _heap_push(heap, size, key)
                            size += 1
                else:
                    for i in range(start[j], start[j] + length[j]):
                        if store[i] != pivot:
                            heap = _heap_push(heap, size, store[i])
                            size += 1
                pivot, size = _pop_pivot(heap, size)
            if pivot < 0:
                continue
            # store the reduced column: its pivot, then what is left in the heap (equal pairs cancelled)
            need = used + 1 + size
            if need > store.size:
                grown = np.empty(max(2 * store.size, need), np.int64)
                grown[:used] = store[:used]
                store = grown
            start[s] = used
            store[used] = pivot
            used += 1
            while size > 0:
                key, size = _pop_pivot(heap, size)
                if key < 0:
                    break
                store[used] = key
                used += 1
            length[s] = used - start[s]
            owner[pivot % n_ids] = s
            low[s] = pivot % n_ids
    return low


@nb.njit(cache=True)
def _dim1(f: np.ndarray, g: np.ndarray, c: np.ndarray, pos_f: np.ndarray, pos_g: np.ndarray, clear_f: np.ndarray,
          clear_g: np.ndarray, clear_c: np.ndarray, sid: np.ndarray, nyz: int, nz: int) -> tuple:
    """(matched, finite pairs of f, finite pairs of g) in dimension 1."""
    # births of the inputs' finite pairs: loop-closing value-0 edges no value-0 square kills
    low_f = _reduce(f, f, sid, clear_f, 0, nyz, nz)
    low_g = _reduce(g, g, sid, clear_g, 0, nyz, nz)
    birth_f = pos_f.copy()
    birth_g = pos_g.copy()
    for s in range(low_f.size):
        if low_f[s] >= 0:
            birth_f[low_f[s]] = False
        if low_g[s] >= 0:
            birth_g[low_g[s]] = False
    low_c = _reduce(c, c, sid, clear_c, 1, nyz, nz)
    im_f = _reduce(c, f, sid, clear_c, 1, nyz, nz)
    im_g = _reduce(c, g, sid, clear_c, 1, nyz, nz)
    matched = 0
    for k in range(sid.size):
        s = sid[k]
        e = low_c[s]
        if e < 0 or _edge_value(c, e, nyz, nz) == _square_value(c, s, nyz, nz):
            continue  # not a finite pair of the comparison
        if im_f[s] >= 0 and im_g[s] >= 0 and birth_f[im_f[s]] and birth_g[im_g[s]]:
            matched += 1
    return matched, int(birth_f.sum()), int(birth_g.sum())


def matching_counts(image0: np.ndarray, image1: np.ndarray) -> np.ndarray:
    """Per dimension, (matched, finite pairs of image0, finite pairs of image1) of the Betti matching.

    Parameters
    ----------
    image0, image1 : ndarray, shape (x, y, z)
        Binary images (0/1; any nonzero is 1), filtered by sublevel sets.

    Returns
    -------
    ndarray of int64, shape (3, 3)
        Row k for dimension k: ``(m_k, p_k, g_k)``; ``p_k - m_k`` and ``g_k - m_k`` are
        the unmatched pairs of each image.
    """
    if image0.shape != image1.shape or image0.ndim != 3:
        raise ValueError(f"expected two 3-D images of one shape, got {image0.shape} and {image1.shape}")
    counts = np.zeros((3, 3), np.int64)
    if image0.size == 0:
        return counts
    f = np.ascontiguousarray(image0 != 0, dtype=np.uint8)
    g = np.ascontiguousarray(image1 != 0, dtype=np.uint8)
    c = np.minimum(f, g)
    nx, ny, nz = f.shape
    nyz = ny * nz
    ff, gf, cf = f.ravel(), g.ravel(), c.ravel()
    ev, ew, eid = _edges(nx, ny, nz)
    born_f, counts[0, 1], pos_f = _dim0_input(ff, ev, ew, eid)
    born_g, counts[0, 2], pos_g = _dim0_input(gf, ev, ew, eid)
    counts[0, 0] = _dim0_matches(ff, gf, cf, born_f, born_g, ev, ew)
    del ev, ew, eid
    sid, lo, hi = _squares(nx, ny, nz)
    no_clearing = np.zeros(3 * f.size, np.bool_)
    if min(nx, ny, nz) >= 2:
        cube_f, cube_g, cube_c = _cube_values(f), _cube_values(g), _cube_values(c)
        keyed_f, counts[2, 1], clear_f = _dim2_input(ff, cube_f, cube_c, sid, lo, hi, nyz, nz)
        keyed_g, counts[2, 2], clear_g = _dim2_input(gf, cube_g, cube_c, sid, lo, hi, nyz, nz)
        counts[2, 0], clear_c = _dim2_matches(cf, cube_c, keyed_f, keyed_g, sid, lo, hi, nyz, nz)
    else:
        clear_f = clear_g = clear_c = no_clearing
    counts[1] = _dim1(ff, gf, cf, pos_f, pos_g, clear_f, clear_g, clear_c, sid, nyz, nz)
    return counts
