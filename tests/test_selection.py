"""Blockwise selection equals a plain one-at-a-time loop, exactly; baselines; budget prefixes; scores."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deita_hub import selection
from deita_hub.errors import DeitaHubError
from deita_hub.selection import SelectionConfig, _RowReader, deita_select, evol_scores, select


def reference_select(embeddings, scores, budget, max_similarity):
    """The specification, literally: stable descending order, one candidate at a time, strict '>'."""
    unit = embeddings.astype(np.float32)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True).astype(np.float32)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen = []
    for i in order:
        if len(chosen) == budget:
            break
        if any(
            float(unit[j].astype(np.float64) @ unit[i].astype(np.float64)) > max_similarity for j in chosen
        ):
            continue
        chosen.append(i)
    return chosen


def clustered(rng, n, dim, clusters=6, noise=0.25, dup=0.1):
    centers = rng.normal(size=(clusters, dim))
    data = centers[rng.integers(0, clusters, n)] + rng.normal(scale=noise, size=(n, dim))
    copies = rng.integers(0, n, int(n * dup))
    data[rng.integers(0, n, len(copies))] = data[copies]  # exact duplicates: similarity 1
    return data.astype(np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_blockwise_equals_reference_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(60, 250)), int(rng.integers(2, 24))
    emb = clustered(rng, n, dim)
    scores = rng.integers(0, 4, n).astype(np.float64)  # many ties
    max_similarity = float(rng.choice([0.3, 0.7, 0.9, 0.97]))
    budget = int(rng.integers(1, n))
    expected = reference_select(emb, scores, budget, max_similarity)
    for block_size, precisions in (
        (1, ("fp32",)),
        (5, ("fp32", "bf16")),
        (64, ("fp32", "fp16", "bf16")),
        (1024, ("fp32",)),
    ):
        for precision in precisions:
            config = SelectionConfig(
                budget=budget, max_similarity=max_similarity, block_size=block_size, dtype=precision
            )
            got = deita_select(emb, scores, config)
            assert got.positions.tolist() == expected, (block_size, precision)


def test_similarity_exactly_at_the_threshold_is_kept():
    rng = np.random.default_rng(7)
    emb = clustered(rng, 300, 8, noise=0.15)
    scores = rng.random(300)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).astype(np.float32)
    # Thresholds equal to real pair similarities: those pairs sit exactly on the threshold (not rejected, '>').
    sims = unit[:40].astype(np.float64) @ unit[:40].astype(np.float64).T
    for max_similarity in (float(sims[0, 1]), float(sims[2, 3]), float(sims[5, 9]), float(sims[0, 0])):
        expected = reference_select(emb, scores, 200, max_similarity)
        for block_size in (3, 256):
            got = deita_select(
                emb,
                scores,
                SelectionConfig(
                    budget=200, max_similarity=max_similarity, block_size=block_size, dtype="bf16"
                ),
            )
            assert got.positions.tolist() == expected


def test_budget_prefix_property_and_audit_columns():
    rng = np.random.default_rng(3)
    emb = clustered(rng, 500, 16)
    scores = rng.random(500)
    big = deita_select(emb, scores, SelectionConfig(budget=300, max_similarity=0.8, block_size=37))
    small = deita_select(emb, scores, SelectionConfig(budget=120, max_similarity=0.8, block_size=200))
    assert small.positions.tolist() == big.positions[:120].tolist()
    assert big.prefix(120).positions.tolist() == small.positions.tolist()
    assert big.prefix(120).scanned == small.scanned
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert big.nearest[0] == -1 and np.isnan(big.nearest_similarity[0])
    for k in range(1, len(big)):  # nearest earlier-selected neighbour and its similarity
        earlier = big.positions[:k]
        sims = unit[earlier] @ unit[big.positions[k]]
        assert big.nearest[k] == earlier[int(np.argmax(sims))]
        assert big.nearest_similarity[k] == pytest.approx(float(sims.max()), abs=1e-6)
        assert big.nearest_similarity[k] <= 0.8


def test_budget_not_met_scans_everything():
    emb = np.ones((50, 4), dtype=np.float32)  # all identical: only the first survives
    got = deita_select(emb, np.arange(50.0), SelectionConfig(budget=10, max_similarity=0.9))
    assert got.positions.tolist() == [49] and got.scanned == 50 and got.stats["rejected"] == 49


def test_float16_memmap_input(tmp_path):
    import torch  # noqa: F401  (loaded: the walk converts float16 rows in torch, as on a large matrix)

    rng = np.random.default_rng(11)
    emb = clustered(rng, 256, 12).astype(np.float16)
    path = tmp_path / "e.npy"
    np.save(path, emb)
    mapped = np.load(path, mmap_mode="r")
    scores = rng.random(256)
    got = deita_select(mapped, scores, SelectionConfig(budget=100, max_similarity=0.85, block_size=50))
    assert got.positions.tolist() == reference_select(emb, scores, 100, 0.85)


def test_memory_mapped_rows_are_read_without_mapping_them(tmp_path):
    """pread, not page faults: a fault maps the whole page-cache folio around a row, so a walk through the
    mapping made the whole matrix resident. Views pread can address read the same rows as indexing them."""
    emb = np.random.default_rng(3).normal(size=(300, 16)).astype(np.float16)
    np.save(tmp_path / "e.npy", emb)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    positions = np.random.default_rng(4).permutation(100)
    for view in (mapped, mapped[37:290], mapped[::3], mapped[:, :8], np.asarray(mapped)):
        reader = _RowReader(view)
        assert (reader.path is not None) == (isinstance(view, np.memmap) and view.strides[1] == 2)
        buffer = np.empty((128, view.shape[1]), dtype=view.dtype)
        assert np.array_equal(reader.read(positions, buffer), view[positions])
    copy_on_write = np.load(tmp_path / "e.npy", mmap_mode="c")
    assert _RowReader(copy_on_write).path is None  # its changes are not in the file
    scores = np.random.default_rng(5).random(300)
    config = SelectionConfig(budget=120, max_similarity=0.3, block_size=32)
    assert deita_select(mapped, scores, config).positions.tolist() == reference_select(emb, scores, 120, 0.3)


def test_zero_vector_is_an_error():
    emb = np.eye(4, dtype=np.float32)
    emb[2] = 0
    with pytest.raises(DeitaHubError, match="embedding row 2 is zero"):
        deita_select(emb, np.arange(4.0), SelectionConfig(budget=4))


def test_baselines():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 0.5])
    lengths = np.array([10, 50, 5, 50, 7])
    score = select(SelectionConfig(method="score", budget=3), num_rows=5, scores=scores)
    assert score.positions.tolist() == [1, 2, 3]  # tie 1/2 broken by row index
    longest = select(SelectionConfig(method="longest", budget=3), num_rows=5, response_lengths=lengths)
    assert longest.positions.tolist() == [1, 3, 0]
    r1 = select(SelectionConfig(method="random", budget=3, seed=1), num_rows=5)
    r2 = select(SelectionConfig(method="random", budget=3, seed=1), num_rows=5)
    r3 = select(SelectionConfig(method="random", budget=3, seed=2), num_rows=100)
    assert r1.positions.tolist() == r2.positions.tolist() and len(set(r1.positions.tolist())) == 3
    assert len(r3) == 3
    with pytest.raises(DeitaHubError, match="needs scores"):
        select(SelectionConfig(method="score", budget=3), num_rows=5)
    with pytest.raises(DeitaHubError, match="needs embeddings"):
        select(SelectionConfig(budget=3), num_rows=5, scores=scores)


def test_evol_score_is_sum_of_per_turn_products():
    scores = evol_scores([[2.0, 3.0], 4.0, [1.5]], [[5.0, 1.0], 2.0, [2.0]])
    assert scores.tolist() == [13.0, 8.0, 3.0]
    with pytest.raises(DeitaHubError, match="row 0: 2 complexity score"):
        evol_scores([[1.0, 2.0]], [[1.0]])
    with pytest.raises(DeitaHubError, match="row 1, field 'quality_scores': missing score"):
        evol_scores([1.0, 1.0], [1.0, None])
    with pytest.raises(DeitaHubError, match="must be finite"):
        evol_scores([float("nan")], [1.0])
    with pytest.raises(DeitaHubError, match="must be numbers"):
        evol_scores([["a"]], [[1.0]])


def test_evol_scores_read_arrow_columns_as_their_lists():
    complexity, quality = [[2.0, 3.0], [4], [1.5]], [[5.0, 1.0], [2.0], [2]]
    column = pa.chunked_array([complexity[:1], complexity[1:]])  # two chunks, as the JSON reader gives
    assert evol_scores(column, pa.array(quality)).tolist() == evol_scores(complexity, quality).tolist()
    # Anything the column path cannot take goes row by row, which names the row.
    with pytest.raises(DeitaHubError, match="row 1, field 'quality_scores': missing score"):
        evol_scores(pa.array([[1.0], [1.0]]), pa.array([[1.0], None]))
    with pytest.raises(DeitaHubError, match="row 0: 2 complexity score"):
        evol_scores(pa.array([[1.0, 2.0]]), pa.array([[1.0]]))
    assert evol_scores(pa.array([2.0, 3.0]), pa.array([[1.0], [2.0]])).tolist() == [2.0, 6.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"max_similarity": 1.5}, "max_similarity"),
        ({"method": "kmeans"}, "method"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_selection_config(kwargs, message):
    with pytest.raises(DeitaHubError, match=message):
        SelectionConfig(**kwargs)


POOLS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pools"


@pytest.mark.skipif(not POOLS.is_dir(), reason=f"shared pools not found at {POOLS}")
def test_real_pool_embedded_with_minilm_matches_reference():
    """FastChat's templated dummy conversations (near-duplicates) embedded with the packaged MiniLM."""
    from deita_hub.embedding import EmbedConfig, SentenceEmbedder
    from deita_hub.pool import read_pool

    pool = read_pool(POOLS / "fastchat-dummy-conversation.json")
    conversations = pool.conversations[:120]
    emb = SentenceEmbedder(EmbedConfig(max_length=48)).encode(conversations)
    scores = np.array([float(len(c)) for c in conversations])  # deterministic synthetic scores: turn count
    for max_similarity in (0.8, 0.9, 0.95):
        expected = reference_select(emb, scores, 100, max_similarity)
        got = deita_select(
            emb, scores, SelectionConfig(budget=100, max_similarity=max_similarity, block_size=32)
        )
        assert got.positions.tolist() == expected
    assert len(reference_select(emb, scores, 100, 0.8)) < 100  # templated near-duplicates are rejected


@pytest.mark.parametrize("sketch_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cores", [1, 3])
def test_sketch_path_is_exact_on_wide_redundant_data(cores, sketch_dtype, monkeypatch):
    """Wide vectors and >256 selected rows switch on the random-projection guess; decisions must not change,
    whether one thread walks or three split every block's rows and products (unevenly: 512 / 3), and whether the
    guesses are multiplied in float32 or in bfloat16 (as on CPUs with AMX or AVX-512 BF16; emulated by torch
    elsewhere)."""
    import torch
    from threadpoolctl import threadpool_info

    monkeypatch.setattr(selection, "cores", lambda: cores)
    monkeypatch.setattr(selection, "_native_bfloat16", lambda: sketch_dtype == "bfloat16")
    rng = np.random.default_rng(5)
    n, dim, clusters = 1400, 512, 400
    centres = rng.normal(size=(clusters, dim))
    emb = (centres[rng.integers(0, clusters, n)] + rng.normal(scale=0.3, size=(n, dim))).astype(np.float32)
    scores = rng.integers(0, 5, n).astype(np.float64)
    blas_threads = [pool["num_threads"] for pool in threadpool_info()]
    torch_threads = torch.get_num_threads()
    for max_similarity, block_size, rows in (
        (0.85, 128, emb),
        (0.9, 512, emb),
        (0.9, 512, emb.astype(np.float16)),
    ):
        expected = reference_select(rows, scores, 1000, max_similarity)
        got = deita_select(
            rows, scores, SelectionConfig(budget=1000, max_similarity=max_similarity, block_size=block_size)
        )
        assert got.positions.tolist() == expected
        assert got.stats["rejected_via_sketch"] > 0
        assert got.stats["sketch_dtype"] == sketch_dtype
    # The walk puts BLAS and torch on one thread per share while it runs, and gives the counts back.
    assert [pool["num_threads"] for pool in threadpool_info()] == blas_threads
    assert torch.get_num_threads() == torch_threads


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx avx2 fma bmi2 sha_ni", False),  # AMD Zen 2/3, Intel before Cooper Lake: emulated
        ("fpu avx2 avx512f avx512bw avx512_vnni", False),  # AVX-512 without BF16 (Skylake-SP, Ice Lake)
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4/5, Intel Cooper Lake
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True),  # Intel Sapphire Rapids and later
        ("fpu avx2 amx_bf16", True),
    ],
)
def test_the_sketch_multiplies_in_bfloat16_where_the_cpu_flags_bf16_units(flags, native):
    """Only the flags line counts (not `bugs`, nor an Arm `Features` line, which has no x86 flags)."""
    cpuinfo = f"processor\t: 0\nvendor_id\t: x\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16\n\nprocessor\t: 1\n"
    assert selection._bfloat16_flag(cpuinfo.splitlines()) is native
    assert selection._bfloat16_flag(["processor\t: 0", "Features\t: fp asimd bf16"]) is False


def test_float16_rows_convert_the_same_in_torch_and_numpy():
    """The walk converts large float16 matrices in torch, on one thread: every finite float16 (subnormals and
    signed zeros included) must come out with numpy's float32 bits, and torch's thread count is left as found."""
    import torch

    from deita_hub.selection import _to_float32

    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)].reshape(-1, 64)
    out = np.empty(halves.shape, dtype=np.float32)
    threads = torch.get_num_threads()
    _to_float32(halves, out, torch)
    assert torch.get_num_threads() == threads
    assert np.array_equal(out.view(np.uint32), halves.astype(np.float32).view(np.uint32))


def test_a_signal_while_blas_libraries_are_found_is_not_lost(monkeypatch):
    """threadpoolctl finds the BLAS libraries through a ctypes callback, which prints and drops an exception a
    signal handler raises in it: a SIGTERM arriving then (CI caught one) must still stop the command, after the
    search. The signal is sent from inside a ctypes callback run where threadpoolctl runs its own."""
    import ctypes
    import os
    import signal

    import threadpoolctl

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    sent, search = [], threadpoolctl.ThreadpoolController._load_libraries
    compare_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))

    def compare(a, b):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside the callback, unless held
        return a[0] - b[0]

    def search_with_a_signal(self):
        numbers = (ctypes.c_int * 2)(2, 1)
        ctypes.CDLL(None).qsort(numbers, 2, ctypes.sizeof(ctypes.c_int), compare_type(compare))
        return search(self)

    monkeypatch.setattr(threadpoolctl.ThreadpoolController, "_load_libraries", search_with_a_signal)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped):
            selection._blas_controller.__wrapped__()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent
