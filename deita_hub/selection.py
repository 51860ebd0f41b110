"""Deita's combined filter, exact and blockwise, plus the baselines users must compare it with.

The specification (deita-facts.md): order rows by evol score, descending, ties broken by row index ascending (a
stable sort; Deita's pandas sort is not stable). Walk that order with an empty selected set S; a candidate is
rejected iff its cosine similarity to any row already in S is > max_similarity (strict); otherwise it joins S.
Stop when |S| = budget. A smaller budget therefore yields a prefix of a larger one.

How it is computed: candidates come in blocks. One matrix product of the block against S drops every candidate
whose best similarity is over the threshold; the survivors are resolved in order against the earlier *accepted*
members of their own block only (a rejected row never rejects anyone). That makes the same decisions as the
one-at-a-time loop, without re-copying S per candidate.

Numerics: rows are L2-normalised in float32. The decision for a pair is the float64 inner product of the two
float32 unit vectors. Matrix products in float32 (or bf16/fp16 through torch) are only a filter: a similarity
within `band` of the threshold is recomputed in float64 before deciding, so the result does not depend on the
BLAS, the block size or the precision.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
import signal
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deita_hub.config import check_choices
from deita_hub.cpu import cores
from deita_hub.errors import DeitaHubError
from deita_hub.progress import progress_bar

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
# Largest error we allow a fast similarity to have before an fp32 -> fp64 recheck decides: fp32 dot products of
# unit vectors err by ~1e-6 at d=4096; bf16 moves cosines by up to ~0.008 and fp16 by ~0.001 (measured on
# Mistral embeddings), so the bands are about twice those. float32 walks multiply raw rows and divide each product
# by the row's norm after it (x.s / |x| instead of (x / |x|).s, |x| summed in one pass): that differs from the
# unit-row product by the roundings of the division, of the norm and of the unit row's elements, a few 1e-7 at
# most, far inside the float32 band.
BANDS = {"float32": 2e-4, "bfloat16": 0.016, "float16": 0.004}
# The short spellings earlier releases took (`precision: bf16`), still accepted.
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
METHODS = ("deita", "random", "score", "longest")
SAMPLERS = ("permutation", "python-random")  # the random method's samplers


@dataclass(frozen=True)
class SelectionConfig:
    """One subset to select: `deita-hub select`'s options and a recipe's `selection:`/`configs:` entries."""

    method: str = field(
        default="deita",
        metadata={
            "help": "deita (score-first, diversity-aware), random, score (top-k by evol score) or longest (response)",
            "choices": METHODS,
        },
    )
    budget: int = field(default=6000, metadata={"help": "rows to select"})
    max_similarity: float = field(
        default=0.9,
        metadata={"help": "deita: reject a candidate whose cosine similarity to a selected row is > this"},
    )
    seed: int = field(default=42, metadata={"help": "random: the sampler's seed"})
    sampler: str = field(
        default="permutation",
        metadata={
            "help": "random: permutation (numpy's seeded permutation, first `budget` rows) or python-random "
            "(Python's random.seed(seed) then random.sample(range(rows), budget): Deita's sample_ultrafeedback.py, "
            "so its 10K UltraFeedback pairs come out in its order)",
            "choices": SAMPLERS,
        },
    )
    block_size: int = field(default=1024, metadata={"help": "deita: candidates per matrix product"})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "deita: dtype of the similarity products: float32 (numpy), bfloat16 or float16 (torch, for a "
            "GPU); the result is exact either way (a float64 recheck decides near the threshold)",
            "choices": DTYPES,
        },
    )
    device: str | None = field(
        default=None,
        metadata={"help": "bfloat16/float16: torch device, e.g. cuda:1 (default: cuda if available)"},
    )

    def __post_init__(self):
        if self.dtype in _DTYPE_ALIASES:
            object.__setattr__(self, "dtype", _DTYPE_ALIASES[self.dtype])
        problems = check_choices(self)
        if not isinstance(self.budget, int) or self.budget < 1:
            problems.add("budget", f"must be a positive integer, got {self.budget!r}")
        if not -1.0 <= float(self.max_similarity) <= 1.0:
            problems.add("max_similarity", f"is a cosine similarity in [-1, 1], got {self.max_similarity}")
        if self.block_size < 1:
            problems.add("block_size", f"must be positive, got {self.block_size}")
        problems.raise_if_any()

    @property
    def needs_scores(self) -> bool:
        return self.method in ("deita", "score")

    @property
    def needs_embeddings(self) -> bool:
        return self.method == "deita"


@dataclass
class Selection:
    """Selected positions (into the pool's valid rows) in selection order, with audit columns."""

    positions: np.ndarray  # int64 [k]
    nearest: (
        np.ndarray
    )  # int64 [k]: position of the most similar earlier-selected row, -1 if none/not computed
    nearest_similarity: np.ndarray  # float64 [k]: its cosine similarity, NaN if none
    scanned_at: np.ndarray  # int64 [k]: candidates examined (in score order) when row i was accepted
    scanned: int  # candidates examined in all: scanned_at[-1] when the budget was met, else the pool size
    stats: dict = field(default_factory=dict)
    # (rows, columns, inner dim) of every similarity matrix product the walk made, in order: what
    # benchmarks/selection.py replays as plain float32 GEMMs to say how close the walk runs to them.
    products: list[tuple[int, int, int]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.positions)

    def prefix(self, budget: int) -> Selection:
        """The selection a smaller budget makes (the walk is the same; it stops earlier)."""
        k = min(budget, len(self.positions))
        if k == len(self.positions):
            return self
        scanned = int(self.scanned_at[k - 1])
        stats = {**self.stats, "selected": k, "scanned": scanned, "rejected": scanned - k, "budget": budget}
        return Selection(
            self.positions[:k],
            self.nearest[:k],
            self.nearest_similarity[:k],
            self.scanned_at[:k],
            scanned,
            stats,
            self.products,
        )


# --- scores ------------------------------------------------------------------------------------------------


def _per_turn(value, field_name: str, row: int) -> np.ndarray:
    if value is None:
        raise DeitaHubError(
            f"row {row}, field '{field_name}': missing score (score the pool first: deita-hub score)"
        )
    if isinstance(value, int | float):
        value = [value]
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DeitaHubError(
            f"row {row}, field '{field_name}': scores must be numbers, got {value!r}"
        ) from None
    if array.ndim != 1 or array.size == 0:
        raise DeitaHubError(
            f"row {row}, field '{field_name}': expected a number or a non-empty list, got {value!r}"
        )
    if not np.isfinite(array).all():
        raise DeitaHubError(f"row {row}, field '{field_name}': scores must be finite, got {value!r}")
    return array


def evol_scores(
    complexity: list, quality: list, *, source: str = "pool", rows: np.ndarray | None = None
) -> np.ndarray:
    """Deita's evol score per row: sum over turns of complexity_t * quality_t (not length-normalised).

    `complexity` and `quality` are per-row lists (or numbers), or Arrow columns of them."""
    if isinstance(complexity, pa.ChunkedArray | pa.Array) or isinstance(quality, pa.ChunkedArray | pa.Array):
        fast = _arrow_per_turn(complexity, quality)
        if fast is not None:
            return _sums_of_products(*fast)
        complexity, quality = (
            column.to_pylist() if isinstance(column, pa.ChunkedArray | pa.Array) else column
            for column in (complexity, quality)
        )
    fast = _per_turn_arrays(complexity, quality)
    if fast is not None:
        return _sums_of_products(*fast)
    c_rows, q_rows = [], []
    for i, (c, q) in enumerate(zip(complexity, quality, strict=True)):
        row = int(rows[i]) if rows is not None else i
        c_t = _per_turn(c, "complexity_scores", row)
        q_t = _per_turn(q, "quality_scores", row)
        if c_t.shape != q_t.shape:
            raise DeitaHubError(
                f"{source}: row {row}: {c_t.size} complexity score(s) but {q_t.size} quality score(s); "
                "Deita scores each (user, assistant) pair once with each scorer"
            )
        c_rows.append(c_t)
        q_rows.append(q_t)
    if not c_rows:
        return np.empty(0, dtype=np.float64)
    lengths = np.fromiter(map(len, c_rows), dtype=np.int64, count=len(c_rows))
    return _sums_of_products(np.concatenate(c_rows), np.concatenate(q_rows), lengths)


def _sums_of_products(c: np.ndarray, q: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row, the sum of c_t * q_t over its `lengths[i]` consecutive turns, added left to right (both paths of
    `evol_scores` add the same way, so a row's score never depends on which path read it)."""
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.add.reduceat(c * q, starts)


def _per_turn_arrays(complexity: list, quality: list) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The usual case read in a few array operations (a million rows in about a second instead of ~20 s row by
    row): every row two equally long non-empty lists of finite numbers -> (c, q flattened, lengths). None for
    anything else: the row-by-row path then finds the first bad row and names it."""
    if len(complexity) != len(quality) or not all(
        type(c) is list and type(q) is list for c, q in zip(complexity, quality, strict=True)
    ):
        return None
    c_len = np.fromiter(map(len, complexity), dtype=np.int64, count=len(complexity))
    q_len = np.fromiter(map(len, quality), dtype=np.int64, count=len(quality))
    if len(c_len) == 0 or (c_len != q_len).any() or (c_len == 0).any():
        return None
    total = int(c_len.sum())
    try:
        c = np.fromiter(chain.from_iterable(complexity), dtype=np.float64, count=total)
        q = np.fromiter(chain.from_iterable(quality), dtype=np.float64, count=total)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(c).all() and np.isfinite(q).all()):
        return None
    return c, q, c_len


def _arrow_per_turn(complexity, quality) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`_per_turn_arrays` for Arrow columns of number lists, read from Arrow's buffers (no Python object per
    score); None for anything else (the row-by-row path then names the first bad row)."""
    flat, lengths = [], []
    for column in (complexity, quality):
        if not isinstance(column, pa.ChunkedArray | pa.Array):
            return None
        kind = column.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
            return None
        if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
            return None
        values = pc.list_flatten(column)
        if column.null_count or values.null_count:
            return None
        flat.append(values.to_numpy().astype(np.float64))  # a ChunkedArray's to_numpy joins its chunks
        lengths.append(pc.list_value_length(column).to_numpy().astype(np.int64))
    c_len, q_len = lengths
    if len(c_len) == 0 or len(c_len) != len(q_len) or (c_len != q_len).any() or (c_len == 0).any():
        return None
    c, q = flat
    if not (np.isfinite(c).all() and np.isfinite(q).all()):
        return None
    return c, q, c_len


def score_order(scores: np.ndarray) -> np.ndarray:
    """Descending by score, ties by position ascending (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


# --- the exact blockwise filter ----------------------------------------------------------------------------


# torch does two of a float32 walk's steps faster than numpy: float16 -> float32 casts (exact, so any correct
# conversion gives the same bits; numpy's takes ~7 ms per 1024 x 4096 block, torch's ~1 ms) and, on CPUs that
# multiply bfloat16 natively, the sketch's guesses (see _Sketch). Importing torch costs ~1-2 s, so the walk uses it
# only when torch is already loaded or the matrix is large enough to pay for the import (~8 ms saved per 1,024
# rows).
TORCH_MIN_ELEMENTS = 200_000 * 4096
NORM_ROWS = 32  # rows squared at a time for their norms (512 KiB at d=4096: the squares stay in cache)


def _torch_if_it_pays(embeddings: np.ndarray):
    """torch, when it is loaded already or `embeddings` is large enough to pay for importing it; else None (the
    walk then does without)."""
    if "torch" not in sys.modules and embeddings.size < TORCH_MIN_ELEMENTS:
        return None
    import torch

    return torch


# /proc/cpuinfo flags of CPUs that multiply bfloat16 in hardware
BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def _bfloat16_flag(cpuinfo_lines: Iterable[str]) -> bool:
    """Whether the first `flags` line of /proc/cpuinfo's lines names one of `BFLOAT16_FLAGS` (read up to there)."""
    for line in cpuinfo_lines:
        if line.startswith("flags"):
            return not BFLOAT16_FLAGS.isdisjoint(line.partition(":")[2].split())
    return False


@functools.cache
def _native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware, as Linux lists it (`BFLOAT16_FLAGS`): Intel AMX
    (`amx_bf16`; measured: ~2.5x float32's rate on 2 cores, 4-5x on one thread) or AVX-512 BF16 (`avx512_bf16`:
    AMD Zen 4 and later, Intel Cooper Lake and later; measured on a Zen 4 EPYC, one thread: the sketch's guess
    1.6-1.8x faster than in float32). Elsewhere torch emulates bfloat16 and float32 is faster."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return _bfloat16_flag(handle)
    except OSError:  # not Linux
        return False


def _to_float32(raw: np.ndarray, out: np.ndarray, torch=None) -> None:
    """`raw` (float16/32) into float32 `out`; with `torch`, in torch (the caller keeps torch on one thread: the
    walk's own threads split the rows)."""
    if torch is None or raw.dtype != np.float16:
        np.copyto(out, raw)
        return
    torch.from_numpy(out).copy_(torch.from_numpy(raw))


def _exact_norms(rows: np.ndarray, squares: np.ndarray | None = None) -> np.ndarray:
    """The L2 norms of float32 `rows` by np.linalg.norm's own arithmetic (squares, add.reduce along the row,
    sqrt), so the unit rows are Deita's to the bit; without its copy of all the rows: a few at a time, so the
    squares stay in cache (`squares`: that many rows)."""
    if squares is None:
        squares = np.empty((max(1, min(NORM_ROWS, len(rows))), rows.shape[1]), dtype=np.float32)
    norms = np.empty(len(rows), dtype=np.float32)
    step = len(squares)
    for lo in range(0, len(rows), step):
        part = rows[lo : lo + step]
        np.add.reduce(np.multiply(part, part, out=squares[: len(part)]), axis=1, out=norms[lo : lo + step])
    return np.sqrt(norms, out=norms)


def _filter_norms(rows: np.ndarray, out: np.ndarray) -> None:
    """The L2 norms of float32 `rows` into `out`, in one pass (einsum): another summation order than
    `_exact_norms`, a few float32 roundings apart, so only for dividing products the band already allows for."""
    np.einsum("ij,ij->i", rows, rows, out=out)
    np.sqrt(out, out=out)


def _check_norms(norms: np.ndarray, positions: np.ndarray) -> None:
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        row = int(positions[np.flatnonzero(bad)[0]])
        raise DeitaHubError(f"embedding row {row} is zero or not finite; it has no direction to compare")


SHARE_ROWS = 64  # the fewest rows a thread's share of a step or a product gets
# Rows a thread takes from the file to the sketch's guess at a time (their sketch product with 8K selected rows:
# 8 MiB, still in the last-level cache for its argmax; fewer rows make the products less efficient).
CHUNK_ROWS = 256


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the BLAS libraries loaded, found once. It finds them through a ctypes callback, where
    an exception raised by a signal handler is printed and dropped: `deita-hub` turns Ctrl-C and SIGTERM into
    exceptions, and one arriving then was lost (the command ran on and exited 0). They wait until it returns."""
    from threadpoolctl import ThreadpoolController

    with _signals_deferred(signal.SIGINT, signal.SIGTERM):
        return ThreadpoolController()


@contextlib.contextmanager
def _signals_deferred(*signals: int):
    """Within: `signals` are only noted; after: raised again, so their own handlers run (in the main thread only,
    where Python runs signal handlers; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    # A handler set outside Python (getsignal gives None) cannot be put back: such signals are left alone.
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    handlers = {sig: handler for sig, handler in handlers.items() if handler is not None}
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


class _RowThreads:
    """The walk's work split over the CPU's cores, one contiguous share of the rows each: the calling thread takes
    the first share, helper threads the others; the float32 matrix products too, each share on one BLAS thread.

    One set of threads for everything, so nothing runs beside a product: a thread beside a multi-threaded BLAS
    product takes a core from it and the product waits for its slowest share, and BLAS's own threads spin for a
    while after each product, taking a core from whatever runs next (measured on 2 cores: a reader thread made the
    walk's products 1.5-2.5x slower, and splitting the row-wise steps gained nothing while BLAS threads spun)."""

    def __init__(self, threads: int, initializer=None):
        self.threads = max(1, threads)
        self.pool = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix="deita-select", initializer=initializer)
            if self.threads > 1
            else None
        )
        self.local = threading.local()

    def run(self, step, n: int, min_rows: int = SHARE_ROWS) -> None:
        """`step(lo, hi)` over [0, n) in contiguous shares (one share when n is small)."""
        shares = min(self.threads, max(1, n // min_rows))
        if shares == 1:
            step(0, n)
            return
        bounds = [n * i // shares for i in range(shares + 1)]
        futures = [self.pool.submit(step, bounds[i], bounds[i + 1]) for i in range(1, shares)]
        try:
            step(bounds[0], bounds[1])
        finally:
            for future in futures:
                future.result()

    def buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of `shape` for the calling thread alone, reused from call to call."""
        size = int(np.prod(shape))
        flat = getattr(self.local, name, None)
        if flat is None or len(flat) < size:
            flat = np.empty(size, dtype=np.float32)
            setattr(self.local, name, flat)
        return flat[:size].reshape(shape)

    def product(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b.T in float32, split by the rows of `a`, or by those of `b` when `a` has too few to share."""
        if len(a) >= self.threads * SHARE_ROWS or len(b) < len(a):
            out = np.empty((len(a), len(b)), dtype=np.float32)
            self.run(lambda lo, hi: np.matmul(a[lo:hi], b.T, out=out[lo:hi]), len(a))
            return out
        out_t = np.empty((len(b), len(a)), dtype=np.float32)  # each share writes whole rows of the transpose
        self.run(lambda lo, hi: np.matmul(b[lo:hi], a.T, out=out_t[lo:hi]), len(b))
        return out_t.T

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _RowReader:
    """Rows of the embedding matrix, read a block at a time in file order.

    A memory-mapped `.npy` is read with `pread`, not through its mapping: a page fault maps the whole page-cache
    folio around the row (measured: 1,024 random rows of a 1.5 GiB fp16 matrix mapped 1.1 GiB), so a walk
    through the mapping made the whole matrix resident within a few blocks, whatever was released between
    them. Read rows are copied into the block and nothing of the file counts as the process's memory. Any other
    array (in memory, or a view pread cannot address) is indexed as usual."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.path = None  # set when rows are read with pread
        mapping = getattr(array, "_mmap", None)
        itemsize = array.dtype.itemsize
        if (
            isinstance(array, np.memmap)
            and mapping is not None
            and array.filename
            and array.mode in ("r", "r+", "w+")  # "c" (copy on write) may hold changes the file lacks
            and array.strides[1] == itemsize
            and array.strides[0] > 0
        ):
            # The file position of the first row: numpy maps from the allocation boundary below `offset`.
            mapped_from = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
            start = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
            self.first = mapped_from + array.ctypes.data - start
            self.stride = array.strides[0]
            self.row_bytes = array.shape[1] * itemsize
            self.path = array.filename

    def read(self, positions: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows `positions` (in that order) into the first rows of `out` (C-contiguous, the matrix's dtype)."""
        file_order = np.argsort(positions, kind="stable")  # forward through the file
        out = out[: len(positions)]
        if self.path is None:
            out[file_order] = self.array[positions[file_order]]
            return out
        buffer, size = memoryview(out).cast("B"), self.row_bytes
        fd = os.open(self.path, os.O_RDONLY)  # per block: nothing to close when the walk stops early
        try:
            for j, p in zip(file_order.tolist(), positions[file_order].tolist(), strict=True):
                if os.preadv(fd, [buffer[j * size : (j + 1) * size]], self.first + p * self.stride) != size:
                    raise DeitaHubError(f"{self.path}: embedding row {p} is cut short (file truncated?)")
        finally:
            os.close(fd)
        return out


class _Matmul:
    """Similarity products in the configured precision; fp32 runs in numpy, half precision in torch."""

    def __init__(self, dtype: str, device: str | None, dim: int, capacity: int):
        self.precision = dtype
        if dtype == "float32":
            self.selected_fast = None
            return
        import torch

        self.torch = torch
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu":
            log.warning(
                "%s similarity products are meant for a GPU: on the CPU a float32 walk is faster (it guesses most "
                "rejections from a sketch and rechecks fewer pairs): use float32",
                dtype,
            )
        self.selected_fast = torch.empty((capacity, dim), dtype=self.dtype, device=self.device)

    def add(self, k: int, rows: np.ndarray) -> None:
        if self.selected_fast is not None:
            self.selected_fast[k : k + len(rows)] = self.torch.from_numpy(rows).to(self.device, self.dtype)

    def against_selected(
        self, block: np.ndarray, selected: np.ndarray, k: int, threads: _RowThreads
    ) -> np.ndarray:
        if self.selected_fast is None:
            return threads.product(block, selected[:k])
        fast_block = self.torch.from_numpy(block).to(self.device, self.dtype)
        return (fast_block @ self.selected_fast[:k].T).float().cpu().numpy()

    def gram(self, rows: np.ndarray, threads: _RowThreads) -> np.ndarray:
        if self.selected_fast is None:
            return threads.product(rows, rows)
        fast = self.torch.from_numpy(rows).to(self.device, self.dtype)
        return (fast @ fast.T).float().cpu().numpy()


SKETCH_WIDTH = (
    128  # random-projection width: cosine error ~ 1/sqrt(128) ~ 0.09, plenty to find a near-duplicate
)
SKETCH_MIN_SELECTED = 256  # below this the full product is cheap anyway
SKETCH_MIN_HIT_RATE = 0.1  # guesses that confirm less often than this do not pay for themselves...
SKETCH_PAUSE_BLOCKS = 8  # ...so skip them for this many blocks, then try again


class _Sketch:
    """A random projection of the selected rows, used only to *guess* which selected row rejects a candidate.

    A guess is confirmed with the candidate's real similarity before it rejects anything, and every unconfirmed
    candidate still goes through the full product, so decisions stay exact; the sketch only saves the full
    product for rows a near-duplicate already rejects (most rows of a redundant pool).

    Being a guess, the sketch needs no precision: with `torch` (a CPU that multiplies bfloat16 natively) its
    products run in bfloat16, whose rounding (~0.4%) is far below the projection's own error.
    """

    def __init__(self, dim: int, capacity: int, seed: int = 0, torch=None):
        rng = np.random.default_rng(seed)
        projection = (rng.standard_normal((dim, SKETCH_WIDTH)) / np.sqrt(SKETCH_WIDTH)).astype(np.float32)
        self.torch = torch
        if torch is None:
            self.projection = projection
            self.selected = np.empty((capacity, SKETCH_WIDTH), dtype=np.float32)
        else:
            self.projection = torch.from_numpy(projection).to(torch.bfloat16)
            self.selected = torch.empty((capacity, SKETCH_WIDTH), dtype=torch.bfloat16)
        self.skip = 0  # blocks to go without guessing, after a block where guesses rarely confirmed

    def worth_trying(self) -> bool:
        if self.skip:
            self.skip -= 1
            return False
        return True

    def record(self, hit_rate: float) -> None:
        # In a pool with little redundancy almost every guess fails: stop paying for guesses for a while.
        if hit_rate < SKETCH_MIN_HIT_RATE:
            self.skip = SKETCH_PAUSE_BLOCKS

    @property
    def dtype(self) -> str:
        return "float32" if self.torch is None else "bfloat16"

    def _operand(self, rows: np.ndarray):
        """`rows` in the sketch's precision: as they are, or as a bfloat16 tensor."""
        return rows if self.torch is None else self.torch.from_numpy(rows).to(self.torch.bfloat16)

    def add(self, k: int, rows: np.ndarray) -> None:
        self.selected[k : k + len(rows)] = self._operand(rows) @ self.projection

    def guess(
        self,
        rows: np.ndarray,
        selected: np.ndarray,
        k: int,
        threads: _RowThreads,
        guess: np.ndarray,
        dots: np.ndarray,
    ) -> None:
        """For each of a few `rows`: into `guess`, the selected row its sketch is nearest (an argmax per row, blind
        to the row's scale), and into `dots` the row's real dot product with that selected row. On the calling
        thread, with its buffers: the sketch product is still in cache for its argmax."""
        product = threads.buffer("sketch_product", (len(rows), k))
        if self.torch is None:
            sketched = threads.buffer("sketched", (len(rows), SKETCH_WIDTH))
            np.matmul(np.matmul(rows, self.projection, out=sketched), self.selected[:k].T, out=product)
        else:  # numpy's argmax is faster than torch's, and has no bfloat16
            self.torch.from_numpy(product).copy_(self._operand(rows) @ self.projection @ self.selected[:k].T)
        np.argmax(product, axis=1, out=guess)
        guessed = np.take(selected, guess, axis=0, out=threads.buffer("guessed", rows.shape))
        np.einsum("ij,ij->i", rows, guessed, out=dots)


def deita_select(
    embeddings: np.ndarray,
    scores: np.ndarray,
    config: SelectionConfig,
    *,
    progress: bool = False,
) -> Selection:
    """Exact Deita combined filter over `embeddings` [n, d] (float16/32, may be a memmap) ordered by `scores`."""
    n, dim = embeddings.shape
    if len(scores) != n:
        raise DeitaHubError(f"{len(scores)} scores for {n} embedding rows")
    threshold = float(config.max_similarity)
    band = BANDS[config.dtype]
    budget = min(config.budget, n)
    order = score_order(scores)
    selected = np.empty((budget, dim), dtype=np.float32)  # unit rows of S, in selection order
    positions = np.empty(budget, dtype=np.int64)
    nearest = np.full(budget, -1, dtype=np.int64)
    nearest_sim = np.full(budget, np.nan, dtype=np.float64)
    fast = _Matmul(config.dtype, config.device, dim, budget)
    scanned_at = np.zeros(budget, dtype=np.int64)
    products: list[tuple[int, int, int]] = []
    reader = _RowReader(embeddings)
    rows_per_block = min(config.block_size, n)
    row_buffer = np.empty((rows_per_block, dim), dtype=np.float32)  # the block being decided, as float32
    raw_buffer = row_buffer if embeddings.dtype == np.float32 else np.empty_like(row_buffer, embeddings.dtype)
    # float32 products multiply the rows as read and divide each row's *result* by its norm (a number per
    # candidate instead of a division per element; a one-pass norm, as the band allows); only candidates that
    # survive the products are made unit rows, with np.linalg.norm's arithmetic. Half precision needs unit rows
    # first (a raw row may not fit in float16), so the norms become 1 there (x / 1 is x: the arithmetic below is
    # the same either way).
    late = fast.selected_fast is None
    sketchable = config.dtype == "float32" and dim >= 4 * SKETCH_WIDTH
    sketching_in_bfloat16 = sketchable and _native_bfloat16()
    uses_torch = late and (embeddings.dtype == np.float16 or sketching_in_bfloat16)
    torch = _torch_if_it_pays(embeddings) if uses_torch else None
    torch_threads = torch.get_num_threads() if torch is not None else None
    # torch's casts and products run on the calling thread only: the walk's threads split the rows.
    one_torch_thread = (lambda: torch.set_num_threads(1)) if torch is not None else None
    threads = _RowThreads(cores(), initializer=one_torch_thread)
    if one_torch_thread:
        one_torch_thread()
    sketch = _Sketch(dim, budget, torch=torch if sketching_in_bfloat16 else None) if sketchable else None

    def exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return b.astype(np.float64) @ a.astype(np.float64)

    bar = progress_bar(total=budget, unit="row", desc="select", show=progress)

    def load(start: int, sketch_k: int) -> tuple[np.ndarray, ...]:
        """Block `start`: its positions, its rows as float32, their norms and, when `sketch_k` (the selected rows to
        guess among), each row's guess and its dot product with it. Each thread takes a share of the rows, a few
        at a time from the file to the guess, so the rows are still in cache for each next step."""
        block_pos = order[start : start + config.block_size]
        m = len(block_pos)
        raw, block = raw_buffer[:m], row_buffer[:m]
        norms = np.empty(m, dtype=np.float32)
        guess = np.empty(m, dtype=np.intp) if sketch_k else None
        guess_dots = np.empty(m, dtype=np.float32) if sketch_k else None

        def load_share(first: int, end: int) -> None:
            for lo in range(first, end, CHUNK_ROWS):
                part = slice(lo, min(lo + CHUNK_ROWS, end))
                reader.read(block_pos[part], raw[part])
                if raw_buffer is not row_buffer:
                    _to_float32(raw[part], block[part], torch)
                if late:  # the products' filter; the rows made unit rows get exact norms
                    _filter_norms(block[part], norms[part])
                else:  # the whole block becomes unit rows
                    norms[part] = _exact_norms(block[part], threads.buffer("squares", (NORM_ROWS, dim)))
                if sketch_k:
                    sketch.guess(block[part], selected, sketch_k, threads, guess[part], guess_dots[part])

        threads.run(load_share, m)
        _check_norms(norms, block_pos)
        return block_pos, block, norms, guess, guess_dots

    def walk() -> tuple[int, int, int]:
        k = rechecked = sketch_rejected = 0
        for start in range(0, n, config.block_size):
            if k == budget:
                break
            sketching = sketch is not None and k >= SKETCH_MIN_SELECTED and sketch.worth_trying()
            block_pos, block, norms, guess, guess_dots = load(start, k if sketching else 0)
            if not late:
                block /= norms[:, None]
                norms[:] = 1
            best = np.full(len(block), -1)
            best_sim = np.full(len(block), -np.inf)
            sims, sims_row = None, None
            if k:
                full = np.arange(len(block))
                if sketching:
                    # Most candidates of a redundant pool are rejected by one selected row: guess it from the sketch,
                    # confirm with the real product, and send only the unconfirmed rows through the full product.
                    products.extend([(len(block), SKETCH_WIDTH, dim), (len(block), k, SKETCH_WIDTH)])
                    guess_sim = guess_dots / norms
                    confirmed = guess_sim > threshold + band
                    best[confirmed], best_sim[confirmed] = guess[confirmed], guess_sim[confirmed]
                    full = np.flatnonzero(~confirmed)
                    sketch_rejected += int(confirmed.sum())
                    sketch.record(hit_rate=float(confirmed.mean()))
                # [len(full), k], rows not yet divided
                sims = fast.against_selected(block[full], selected, k, threads)
                products.append((len(full), k, dim))
                sims_row = np.full(len(block), -1)
                sims_row[full] = np.arange(len(full))
                if len(full):
                    top = sims.argmax(axis=1)  # blind to the row's scale too
                    best[full], best_sim[full] = top, sims[np.arange(len(full)), top] / norms[full]
            alive = best_sim <= threshold + band
            # The candidates still in the running, as unit rows (each element divided by its row's norm: the same
            # float32 unit rows as dividing the whole block); `unit[slot[i]]` is candidate i.
            candidates = np.flatnonzero(alive)
            unit = block[candidates]
            unit /= _exact_norms(unit)[:, None] if late else norms[candidates, None]
            slot = np.full(len(block), -1)
            slot[candidates] = np.arange(len(candidates))
            # Near the threshold the fast value cannot decide: recompute the close pairs in float64.
            for i in np.flatnonzero(alive & (best_sim > threshold - band)):
                close = np.flatnonzero(sims[sims_row[i]] / norms[i] > threshold - band)
                rechecked += 1
                if (exact(unit[slot[i]], selected[close]) > threshold).any():
                    alive[i] = False
            survivors = np.flatnonzero(alive)
            survivor_rows = unit[slot[survivors]]
            gram = fast.gram(survivor_rows, threads) if len(survivors) > 1 else None
            if gram is not None:
                products.append((len(survivors), len(survivors), dim))
            accepted = np.empty(len(survivors), dtype=np.int64)  # indices into `survivors` accepted so far
            n_accepted = 0
            for s, i in enumerate(survivors):
                if k == budget:
                    break
                in_block_best, in_block_sim = -1, -np.inf
                if n_accepted:
                    earlier = accepted[:n_accepted]
                    row_sims = gram[s, earlier]
                    j = int(row_sims.argmax())
                    if row_sims[j] > threshold + band:
                        continue
                    if row_sims[j] > threshold - band:
                        close = earlier[row_sims > threshold - band]
                        rechecked += 1
                        if (exact(survivor_rows[s], survivor_rows[close]) > threshold).any():
                            continue
                    in_block_best, in_block_sim = int(earlier[j]), float(row_sims[j])
                # Accepted: record the nearest earlier-selected row (exact similarity) for the audit columns.
                if k and (sims is not None) and best_sim[i] >= in_block_sim:
                    nearest[k] = positions[best[i]]
                    nearest_sim[k] = float(exact(survivor_rows[s], selected[best[i] : best[i] + 1])[0])
                elif in_block_best >= 0:
                    nearest[k] = block_pos[survivors[in_block_best]]
                    nearest_sim[k] = float(
                        exact(survivor_rows[s], survivor_rows[in_block_best : in_block_best + 1])[0]
                    )
                accepted[n_accepted] = s
                n_accepted += 1
                selected[k] = survivor_rows[s]
                positions[k] = block_pos[i]
                scanned_at[k] = start + int(i) + 1
                k += 1
            if n_accepted:
                new_rows = survivor_rows[accepted[:n_accepted]]
                fast.add(k - n_accepted, new_rows)
                if sketch is not None:
                    sketch.add(k - n_accepted, new_rows)
                    products.append((n_accepted, SKETCH_WIDTH, dim))
                bar.update(n_accepted)
        return k, rechecked, sketch_rejected

    try:
        one_blas_thread = threads.threads > 1  # each share's products on its own thread
        with (
            _blas_controller().limit(limits=1, user_api="blas")
            if one_blas_thread
            else contextlib.nullcontext()
        ):
            k, rechecked, sketch_rejected = walk()
    finally:
        threads.close()
        if torch is not None:
            torch.set_num_threads(torch_threads)
        bar.close()
    scanned = int(scanned_at[k - 1]) if k == budget else n
    stats = {
        "selected": k,
        "scanned": scanned,
        "rejected": scanned - k,
        "rechecked_in_fp64": rechecked,
        "rejected_via_sketch": sketch_rejected,
        "sketch_dtype": sketch.dtype if sketch is not None else None,
        "pool_rows": n,
        "budget": config.budget,
        "max_similarity": threshold,
        "dtype": config.dtype,
        "block_size": config.block_size,
    }
    if k < config.budget:
        log.warning(
            "only %d of the %d-row budget survive max_similarity %.4g over %d rows",
            k,
            config.budget,
            threshold,
            n,
        )
    return Selection(
        positions[:k].copy(),
        nearest[:k].copy(),
        nearest_sim[:k].copy(),
        scanned_at[:k].copy(),
        scanned,
        stats,
        products,
    )


# --- baselines ---------------------------------------------------------------------------------------------


def _ranked(order: np.ndarray, budget: int, method: str) -> Selection:
    positions = np.asarray(order[:budget], dtype=np.int64)
    k = len(positions)
    return Selection(
        positions,
        np.full(k, -1, dtype=np.int64),
        np.full(k, np.nan),
        np.arange(1, k + 1, dtype=np.int64),
        k,
        {"selected": k, "scanned": k, "rejected": 0, "method": method, "budget": budget},
    )


def select(
    config: SelectionConfig,
    *,
    num_rows: int,
    scores: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    response_lengths: np.ndarray | None = None,
    progress: bool = False,
) -> Selection:
    """Run one selection method over a pool of `num_rows` rows."""
    if config.needs_scores and scores is None:
        raise DeitaHubError(f"method '{config.method}' needs scores (complexity_scores and quality_scores)")
    if config.method == "deita":
        if embeddings is None:
            raise DeitaHubError(
                "method 'deita' needs embeddings (deita-hub embed, or the recipe's embedding section)"
            )
        return deita_select(embeddings, scores, config, progress=progress)
    budget = min(config.budget, num_rows)
    if config.method == "score":
        return _ranked(score_order(scores), budget, "score")
    if config.method == "random":
        if config.sampler == "python-random":
            import random

            # Deita's sampler exactly (a private Random seeded like the global one gives the same draws).
            sampled = random.Random(config.seed).sample(range(num_rows), budget)
            return _ranked(np.asarray(sampled, dtype=np.int64), budget, "random")
        return _ranked(np.random.default_rng(config.seed).permutation(num_rows), budget, "random")
    if response_lengths is None:
        raise DeitaHubError("method 'longest' needs response lengths")
    return _ranked(score_order(np.asarray(response_lengths, dtype=np.float64)), budget, "longest")
