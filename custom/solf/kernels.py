"""Compiled (numba) kernels of SOLF stage A: runs, connected components, moments, surface areas.

A label map is read as a C-ordered ``(A, B, C)`` array: row ``(a, b)`` is the line of ``C`` voxels
along the contiguous axis, and a *run* is a maximal stretch of one non-zero id in one row. Organ
label maps are made of large smooth regions (a UKBOB-sized map of 14.4 M voxels holds ~0.35 M runs),
so connected components are found on runs (union-find, 26-connectivity) rather than on voxels, and
each component's voxel count, index moments and box are closed-form sums over its runs
(:func:`run_components`). Only two kernels read every voxel: :func:`find_runs` and
:func:`surface_areas`; :func:`erase_runs` writes only the runs of dropped components.

Callers (:mod:`custom.solf.features`) pass C-contiguous arrays; ``cache=True`` keeps the compiled
code on disk, so a worker process compiles nothing after the first run.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def find_runs(view: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of non-zero ids of a C-ordered ``(A, B, C)`` map, in one pass.

    Returns ``(row_start, begin, end, label)``: the runs of row ``r = a * B + b`` are
    ``row_start[r]:row_start[r + 1]``, in order along the row; ``begin``/``end`` are their first and
    one-past-last index along the row (int32), ``label`` their id (the map's dtype).
    """
    n_a, n_b, n_c = view.shape
    row_start = np.zeros(n_a * n_b + 1, np.int64)
    size = max(1024, view.size // 16)  # grown when a map has more runs
    begin, end, label = np.empty(size, np.int32), np.empty(size, np.int32), np.empty(size, view.dtype)
    n_words = n_c // 8 + 1
    change = np.zeros(n_words * 8, np.uint8)  # change[c]: the id differs between c - 1 and c (0 beyond the row)
    change_words = change.view(np.uint64)
    n = 0
    for r in range(n_a * n_b):
        row = view[r // n_b, r % n_b]
        if n + n_c > size:
            size = 2 * size + n_c
            begin, end, label = _grown(begin, n, size), _grown(end, n, size), _grown(label, n, size)
        change[0] = row[0] != 0
        for c in range(1, n_c):  # branch-free, so that it vectorises
            change[c] = row[c] != row[c - 1]
        change[n_c] = row[n_c - 1] != 0
        inside = False
        for w in range(n_words):
            if change_words[w] == 0:
                continue  # 8 voxels that continue the current run (or background)
            for c in range(8 * w, min(8 * w + 8, n_c + 1)):
                if change[c]:
                    if inside:
                        end[n] = c
                        n += 1
                    inside = c < n_c and row[c] != 0
                    if inside:
                        begin[n] = c
                        label[n] = row[c]
        row_start[r + 1] = n
    return row_start, begin[:n], end[:n], label[:n]


@numba.njit(cache=True, nogil=True)
def _grown(a: np.ndarray, n: int, size: int) -> np.ndarray:
    """A copy of ``a[:n]`` with room for ``size`` items."""
    out = np.empty(size, a.dtype)
    out[:n] = a[:n]
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _root(parent: np.ndarray, i: int) -> int:
    """The root of run ``i``'s set (union-find)."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True, inline="always")
def _join_rows(parent: np.ndarray, row_start: np.ndarray, begin: np.ndarray, end: np.ndarray, label: np.ndarray, r: int, s: int) -> None:
    """Union every run of row ``r`` with the runs of the earlier, neighbouring row ``s`` it touches.

    Sets are linked towards their smaller root, so a root is always its set's first run in raster order.
    """
    j0, j_stop = row_start[s], row_start[s + 1]
    for i in range(row_start[r], row_start[r + 1]):
        b_i, e_i, l_i = begin[i], end[i], label[i]
        while j0 < j_stop and end[j0] < b_i:  # runs ending left of run i touch no later run of row r
            j0 += 1
        j = j0
        while j < j_stop and begin[j] <= e_i:
            if label[j] == l_i:
                ri, rj = _root(parent, i), _root(parent, j)
                if ri < rj:
                    parent[rj] = ri
                elif rj < ri:
                    parent[ri] = rj
            j += 1


@numba.njit(cache=True, nogil=True)
def run_components(row_start: np.ndarray, begin: np.ndarray, end: np.ndarray, label: np.ndarray, n_b: int):
    """Connected components (26-connectivity) of the runs of :func:`find_runs`, and their measures.

    Two runs of one id touch when their rows are neighbours (``a`` and ``b`` each differ by at most 1)
    and their index ranges overlap or meet diagonally (``begin <= other end`` both ways). Each row is
    joined to its four neighbours that come earlier in raster order, so every touching pair is seen
    once. Components are numbered ``1..n`` in the raster order of their first run; a run's voxel
    count, index sums and products have closed forms, so the measures are sums over runs.

    Returns ``(comp, label, voxels, first, second, lo, hi)``: ``comp`` (runs,) the component of each
    run; per component (index 0 = background, empty): ``label`` (n+1,) id, ``voxels`` (n+1,),
    ``first`` (n+1, 3) index sums, ``second`` (n+1, 3, 3) index product sums, ``lo``/``hi`` (n+1, 3)
    box (``hi`` exclusive), along the ``(a, b, c)`` axes of the map.
    """
    n_runs = begin.size
    parent = np.arange(n_runs, dtype=np.int32)
    n_rows = row_start.size - 1
    for r in range(n_rows):
        if row_start[r] == row_start[r + 1]:
            continue
        a, b = r // n_b, r % n_b
        if b > 0:
            _join_rows(parent, row_start, begin, end, label, r, r - 1)
        if a > 0:
            if b > 0:
                _join_rows(parent, row_start, begin, end, label, r, r - n_b - 1)
            _join_rows(parent, row_start, begin, end, label, r, r - n_b)
            if b < n_b - 1:
                _join_rows(parent, row_start, begin, end, label, r, r - n_b + 1)
    comp = np.zeros(n_runs, np.int64)
    n = 0
    for i in range(n_runs):  # a root is its set's first run, so it is numbered before its members
        root = _root(parent, i)
        if root == i:
            n += 1
            comp[i] = n
        else:
            comp[i] = comp[root]
    comp_label = np.zeros(n + 1, np.int64)
    voxels = np.zeros(n + 1, np.int64)
    first = np.zeros((n + 1, 3))
    second = np.zeros((n + 1, 3, 3))
    lo = np.full((n + 1, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((n + 1, 3), np.int64)
    for r in range(n_rows):
        a, b = r // n_b, r % n_b
        fa, fb = float(a), float(b)
        for i in range(row_start[r], row_start[r + 1]):
            k = comp[i]
            c0, c1 = begin[i], end[i]
            m = float(c1 - c0)
            c = float(c0)
            sum_c = m * c + m * (m - 1) / 2  # sum of c0 .. c1 - 1
            sum_cc = m * c * c + c * m * (m - 1) + (m - 1) * m * (2 * m - 1) / 6  # sum of their squares
            comp_label[k] = label[i]
            voxels[k] += c1 - c0
            first[k, 0] += fa * m
            first[k, 1] += fb * m
            first[k, 2] += sum_c
            second[k, 0, 0] += fa * fa * m
            second[k, 1, 1] += fb * fb * m
            second[k, 2, 2] += sum_cc
            second[k, 0, 1] += fa * fb * m
            second[k, 0, 2] += fa * sum_c
            second[k, 1, 2] += fb * sum_c
            lo[k, 0] = min(lo[k, 0], a)
            lo[k, 1] = min(lo[k, 1], b)
            lo[k, 2] = min(lo[k, 2], c0)
            hi[k, 0] = max(hi[k, 0], a + 1)
            hi[k, 1] = max(hi[k, 1], b + 1)
            hi[k, 2] = max(hi[k, 2], c1)
    for k in range(n + 1):
        second[k, 1, 0] = second[k, 0, 1]
        second[k, 2, 0] = second[k, 0, 2]
        second[k, 2, 1] = second[k, 1, 2]
    return comp, comp_label, voxels, first, second, lo, hi


@numba.njit(cache=True, nogil=True)
def erase_runs(view: np.ndarray, row_start: np.ndarray, begin: np.ndarray, end: np.ndarray, comp: np.ndarray, drop: np.ndarray) -> None:
    """Set to 0, in place, the voxels of every run whose component ``k`` has ``drop[k]``."""
    n_b = view.shape[1]
    for r in range(row_start.size - 1):
        a, b = r // n_b, r % n_b
        for i in range(row_start[r], row_start[r + 1]):
            if drop[comp[i]]:
                view[a, b, begin[i] : end[i]] = 0


@numba.njit(cache=True, nogil=True, inline="always")
def _at(view: np.ndarray, a: int, b: int, c: int) -> int:
    """``view[a, b, c]``, 0 outside the map (the background that closes every surface)."""
    if a < 0 or b < 0 or c < 0 or a >= view.shape[0] or b >= view.shape[1] or c >= view.shape[2]:
        return 0
    return view[a, b, c]


@numba.njit(cache=True, nogil=True, inline="always")
def _add_cube(area: np.ndarray, table: np.ndarray, v: np.ndarray) -> None:
    """Add one cube's area to each non-zero id at its 8 corners ``v`` (corner k at (k&1, k>>1&1, k>>2&1)):
    an id's pattern is the set of corners that hold it."""
    done = 0
    for k in range(8):
        if done >> k & 1:
            continue
        x = v[k]
        code = 0
        for j in range(k, 8):
            code |= (v[j] == x) << j
        done |= code
        if x != 0:
            area[x] += table[code]


@numba.njit(cache=True, nogil=True, inline="always")
def _edge_cube(view: np.ndarray, area: np.ndarray, table: np.ndarray, v: np.ndarray, a: int, b: int, c: int) -> None:
    """:func:`_add_cube` for a cube that may reach past the map (bounds-checked reads)."""
    for k in range(8):
        v[k] = _at(view, a + (k & 1), b + (k >> 1 & 1), c + (k >> 2 & 1))
    for k in range(1, 8):
        if v[k] != v[0]:
            _add_cube(area, table, v)
            return


@numba.njit(cache=True, nogil=True)
def surface_areas(view: np.ndarray, table: np.ndarray, n_ids: int) -> np.ndarray:
    """Marching-cubes area of every id: ``sum over the cubes of 8 voxel centres of table[corner pattern]``.

    ``table``: area of each of the 256 corner patterns (corner k at ``(k&1, k>>1&1, k>>2&1)`` along
    ``(a, b, c)``). Cubes run from index -1 to the last index on each axis, so the map is padded with
    background without a copy. Returns ``(n_ids,)`` areas.
    """
    n_a, n_b, n_c = view.shape
    area = np.zeros(n_ids)
    v = np.zeros(8, view.dtype)
    mixed = np.zeros(max(n_c - 1, 0), view.dtype)  # the map's dtype: a narrower one could wrap an id difference to 0
    for a in range(-1, n_a):
        for b in range(-1, n_b):
            if not (0 <= a < n_a - 1 and 0 <= b < n_b - 1):  # cubes that reach past the map along a or b
                for c in range(-1, n_c):
                    _edge_cube(view, area, table, v, a, b, c)
                continue
            _edge_cube(view, area, table, v, a, b, -1)
            _edge_cube(view, area, table, v, a, b, n_c - 1)
            r0, r1, r2, r3 = view[a, b], view[a + 1, b], view[a, b + 1], view[a + 1, b + 1]
            for c in range(n_c - 1):  # branch-free, so that it vectorises: non-zero where a cube holds two ids or more
                x = r0[c]
                mixed[c] = (r0[c + 1] ^ x) | (r1[c] ^ x) | (r1[c + 1] ^ x) | (r2[c] ^ x) | (r2[c + 1] ^ x) | (r3[c] ^ x) | (r3[c + 1] ^ x)
            for c in range(n_c - 1):
                if mixed[c] == 0:
                    continue  # inside one id: no surface
                v[0], v[1], v[2], v[3] = r0[c], r1[c], r2[c], r3[c]
                v[4], v[5], v[6], v[7] = r0[c + 1], r1[c + 1], r2[c + 1], r3[c + 1]
                _add_cube(area, table, v)
    return area
