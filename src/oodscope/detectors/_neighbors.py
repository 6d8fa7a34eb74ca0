"""Nearest-neighbour search helpers shared by the detectors with a neighbour bank.

* `topk_inner_products`: exact top-k inner products of queries against an in-memory bank
  (chunked float32 GEMM + selection);
* `stream_topk`: the same against a bank read chunk by chunk (e.g. a memory-mapped float16
  file), which is how the exact reference of a recall measurement is computed at fit time;
* `probe_recall`: recall@k of an approximate search on a held-out probe of the bank;
* `release_rows`: drop the pages of a read-only memory-mapped array that a streaming pass
  has finished with, so the bank file does not stay resident in the process.
"""

from __future__ import annotations

import mmap
import time
from typing import Any, Callable

import numpy as np

from ._stats import iter_chunks

__all__ = ["topk_inner_products", "stream_topk", "probe_recall", "release_rows"]


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency in practice
        return None
    return torch


def topk_inner_products(
    bank: np.ndarray, queries: np.ndarray, k: int, chunk_size: int | None = None,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products, values descending: ``(values, ids)``, float32 / int64.
    Bank rows ``exclude`` are left out (value −inf, never selected before a real row).

    A chunked float32 GEMM; the selection uses ``torch.topk`` when torch is importable
    (about 10x faster than ``np.argpartition`` on wide rows), else numpy.
    """
    torch = _torch()
    n_bank = len(bank)
    k = min(k, n_bank)
    rows = chunk_size or max(1, min(4096, (1 << 25) // max(n_bank, 1)))
    vals = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), rows):
        sims = queries[start : start + rows] @ bank.T
        if exclude is not None and len(exclude):
            sims[:, exclude] = -np.inf
        stop = start + len(sims)
        if torch is not None:
            top = torch.topk(torch.from_numpy(sims), k, dim=1, largest=True, sorted=True)
            vals[start:stop], ids[start:stop] = top.values.numpy(), top.indices.numpy()
            continue
        part = (
            np.argpartition(-sims, k - 1, axis=1)[:, :k]
            if k < n_bank
            else np.broadcast_to(np.arange(n_bank), sims.shape).copy()
        )
        top = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        vals[start:stop] = np.take_along_axis(top, order, axis=1)
        ids[start:stop] = np.take_along_axis(part, order, axis=1)
    return vals, ids


def _merge(vals_a, ids_a, vals_b, ids_b, k):
    vals = np.concatenate([vals_a, vals_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(ids, order, axis=1)


def stream_topk(
    rows: Callable[[slice], np.ndarray], n: int, queries: np.ndarray, k: int,
    chunk_size: int = 16_384, exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact top-k inner products against a bank read as ``rows(slice)`` chunks, leaving
    out the sorted bank rows ``exclude``.

    Returns ``(values, ids, seconds)`` where ``seconds`` is the time spent searching (the
    GEMMs and selections), without reading and converting the chunks: the cost of the same
    search against a bank held in memory.
    """
    k = min(k, n - (0 if exclude is None else len(exclude)))
    vals = np.empty((len(queries), 0), dtype=np.float32)
    ids = np.empty((len(queries), 0), dtype=np.int64)
    spent = 0.0
    for sl in iter_chunks(n, chunk_size):
        block = rows(sl)
        t0 = time.perf_counter()
        skip = None
        if exclude is not None:
            lo, hi = np.searchsorted(exclude, [sl.start, sl.stop])
            skip = exclude[lo:hi] - sl.start
        v, i = topk_inner_products(block, queries, k, exclude=skip)
        vals, ids = _merge(vals, ids, v, i + sl.start, k)
        spent += time.perf_counter() - t0
    return vals, ids, spent


def probe_recall(
    queries: np.ndarray,
    exact_vals: np.ndarray,
    exact_ids: np.ndarray,
    approx_ids: np.ndarray,
    rows: Callable[[np.ndarray], np.ndarray],
) -> float:
    """Recall@k of an approximate search: the share of each query's exact k neighbours
    (``exact_*``, k columns) that the approximate search returned (``approx_ids``).

    A returned neighbour outside the exact list still counts when its exact inner product
    ties the exact k-th value (duplicates in the bank make the exact list one choice among
    equals); ``rows(ids)`` gives bank rows for those few inner products.
    """
    k = exact_ids.shape[1]
    hits = 0
    for q, ev, ei, ai in zip(queries, exact_vals, exact_ids, approx_ids):
        got = ai[:k]
        got = got[got >= 0]
        exact_set = set(ei.tolist())
        outside = np.array([j for j in got.tolist() if j not in exact_set], dtype=np.int64)
        hits += len(got) - len(outside)
        if len(outside):
            sims = rows(np.sort(outside)) @ q
            kth = float(ev[-1])
            scale = max(abs(kth), float(np.abs(ev).max()), 1e-30)
            hits += int(np.sum(sims >= kth - 1e-5 * scale))
    return hits / (k * len(queries))


def _mapping_of(array: Any) -> mmap.mmap | None:
    """The mmap behind an array (a np.memmap, or a view of one), else None."""
    for _ in range(8):
        if isinstance(array, mmap.mmap):
            return array
        mm = getattr(array, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        array = getattr(array, "base", None)
        if array is None:
            return None
    return None


def release_rows(array: Any, sl: slice) -> None:
    """Tell the kernel this process no longer needs rows ``sl`` of a read-only
    memory-mapped array (``MADV_DONTNEED``): the pages leave the process's resident set
    but stay in the page cache, so a later read is cheap. A no-op for anything else."""
    mm = _mapping_of(array)
    if (mm is None or array.flags.writeable or not array.flags.c_contiguous
            or not hasattr(mmap, "MADV_DONTNEED")):
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return
    row = array.strides[0]
    first = array.ctypes.data - base + sl.start * row
    last = array.ctypes.data - base + sl.stop * row
    page = mmap.PAGESIZE
    start, stop = -(-first // page) * page, (last // page) * page
    if stop > start:
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
