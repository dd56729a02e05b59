"""Embedding cache on real files, with real processes for the concurrency cases (no mocks)."""

import gc
import json
import multiprocessing
import random
import time

import numpy as np
import pytest
from filelock import FileLock

from FewShotSAMLib.embedding_cache import (
    DATA_FILE,
    HEADER_FILE,
    EmbeddingCache,
    ReversedEntry,
    SlicesMissing,
    cache_key,
    default_cache_dir,
)
from FewShotSAMLib.errors import Cancelled

SHAPE = (8, 16, 16)  # small stand-in for SAM's 256x64x64
N = 6
SLICE_BYTES = int(np.prod(SHAPE)) * 2


def embedding(index: int) -> np.ndarray:
    """Deterministic float32 "encoder output" for a slice."""
    return np.random.default_rng(index).standard_normal(SHAPE, dtype=np.float32)


def expected(indices) -> np.ndarray:
    return np.stack([embedding(i) for i in indices]).astype(np.float16)


class Encoder:
    """compute_fn that records which slices it was asked for."""

    def __init__(self, delay: float = 0.0):
        self.calls = []
        self.delay = delay

    def __call__(self, indices):
        self.calls.append(list(indices))
        time.sleep(self.delay)
        return np.stack([embedding(i) for i in indices])

    @property
    def encoded(self):
        return sorted(i for call in self.calls for i in call)


def filled_entry(root, key="vol", n=N):
    cache = EmbeddingCache(root)
    cache.get_or_compute(key, n, SHAPE, None, Encoder())
    return cache, cache.root / key


def test_miss_then_hit_encodes_each_slice_once(tmp_path):
    encoder = Encoder()
    first = EmbeddingCache(tmp_path).get_or_compute("vol", N, SHAPE, None, encoder, batch_size=4)
    assert encoder.calls == [[0, 1, 2, 3], [4, 5]]
    assert first.dtype == np.float16 and np.array_equal(first, expected(range(N)))

    again = Encoder()  # a new session: a fresh cache object on the same folder
    second = EmbeddingCache(tmp_path).get_or_compute("vol", N, SHAPE, [5, 0, 2], again)
    assert again.calls == []
    assert np.array_equal(second, expected([5, 0, 2]))


def test_partial_entry_computes_only_missing_slices(tmp_path):
    cache = EmbeddingCache(tmp_path)
    entry = cache.open_entry("vol", N, SHAPE)
    entry.write([1, 3], np.stack([embedding(1), embedding(3)]))
    entry.write(4, embedding(4))  # one int index takes one [C, H, W] embedding
    assert entry.missing() == [0, 2, 5]

    encoder = Encoder()
    out = cache.get_or_compute("vol", N, SHAPE, range(1, 3), encoder)  # a range first...
    assert encoder.encoded == [2]
    assert np.array_equal(out, expected([1, 2]))
    out = cache.get_or_compute("vol", N, SHAPE, None, encoder)  # ...completed later
    assert encoder.encoded == [0, 2, 5]
    assert np.array_equal(out, expected(range(N)))
    with pytest.raises(SlicesMissing):
        cache.open_entry("other", N, SHAPE).read([0])


def test_reversed_entry_shares_the_slices_of_a_scan_stored_the_other_way_round(tmp_path):
    """Slice i of the flipped scan is slice N - 1 - i of the entry: what either order encoded, the other reads."""
    cache = EmbeddingCache(tmp_path)
    forward = cache.open_entry("vol", N, SHAPE)
    forward.get_or_compute([0, 1], Encoder())
    assert not cache.has_entry("other") and cache.has_entry("vol")

    class FlippedEncoder(Encoder):  # the flipped scan's slice i shows what the first scan's slice N - 1 - i does
        def __call__(self, indices):
            self.calls.append(list(indices))
            return np.stack([embedding(N - 1 - i) for i in indices])

    flipped, encoder = ReversedEntry(cache.open_entry("vol", N, SHAPE)), FlippedEncoder()
    out = flipped.get_or_compute([2, 5, 4], encoder)
    assert encoder.encoded == [2]  # 5 and 4 are the first scan's 0 and 1, already encoded
    np.testing.assert_array_equal(out, expected([3, 0, 1]))
    assert forward.missing() == [2, 4, 5]  # flipped slice 2 was stored as the entry's slice 3
    everything = flipped.get_or_compute(None, encoder)
    assert encoder.encoded == [0, 1, 2, 3]
    np.testing.assert_array_equal(everything, expected(range(N))[::-1])
    np.testing.assert_array_equal(flipped.embeddings(), forward.embeddings()[::-1])


def test_truncated_data_file_recomputes_lost_slices(tmp_path):
    cache, folder = filled_entry(tmp_path)
    with open(folder / DATA_FILE, "r+b") as file:
        file.truncate(2 * SLICE_BYTES + SLICE_BYTES // 2)  # slice 2 half there, 3..5 gone

    encoder = Encoder()
    out = cache.get_or_compute("vol", N, SHAPE, None, encoder)
    assert encoder.encoded == [2, 3, 4, 5]
    assert np.array_equal(out, expected(range(N)))
    assert (folder / DATA_FILE).stat().st_size == N * SLICE_BYTES


def test_flipped_bytes_are_detected_and_only_that_slice_recomputed(tmp_path):
    cache, folder = filled_entry(tmp_path)
    with open(folder / DATA_FILE, "r+b") as file:
        file.seek(3 * SLICE_BYTES + 100)
        original = file.read(4)
        file.seek(3 * SLICE_BYTES + 100)
        file.write(bytes(b ^ 0xFF for b in original))

    entry = cache.open_entry("vol", N, SHAPE)
    with pytest.raises(SlicesMissing) as raised:
        entry.read()
    assert raised.value.indices == [3]
    assert entry.missing() == [3]  # unmarked, never returned as data

    encoder = Encoder()
    assert np.array_equal(cache.get_or_compute("vol", N, SHAPE, None, encoder), expected(range(N)))
    assert encoder.encoded == [3]


@pytest.mark.parametrize(
    "garble",
    [
        lambda text: "{not json",
        lambda text: text[: len(text) // 2],  # torn write
        lambda text: "",
        lambda text: json.dumps({**json.loads(text), "shape": [N, 4, 16, 16]}),  # describes another entry
        lambda text: json.dumps({**json.loads(text), "crc32": [12345] * (N - 1)}),
    ],
)
def test_garbled_header_resets_the_entry(tmp_path, garble):
    cache, folder = filled_entry(tmp_path)
    header = folder / HEADER_FILE
    header.write_text(garble(header.read_text()))

    encoder = Encoder()
    out = cache.get_or_compute("vol", N, SHAPE, None, encoder)
    assert encoder.encoded == list(range(N))
    assert np.array_equal(out, expected(range(N)))
    assert all(crc is not None for crc in json.loads(header.read_text())["crc32"])


def test_deleted_data_file_and_shape_change_recompute(tmp_path):
    cache, folder = filled_entry(tmp_path)
    (folder / DATA_FILE).unlink()
    encoder = Encoder()
    cache.get_or_compute("vol", N, SHAPE, None, encoder)
    assert encoder.encoded == list(range(N))

    # The same key asked for with another slice count: the stale entry is reset, not misread.
    assert cache.open_entry("vol", N + 1, SHAPE).missing() == list(range(N + 1))


def test_storage_is_float16_on_disk(tmp_path):
    torch = pytest.importorskip("torch")
    cache = EmbeddingCache(tmp_path)
    values = np.stack([embedding(i) for i in range(N)])
    out = cache.get_or_compute("vol", N, SHAPE, None, lambda idx: torch.from_numpy(values[idx]))

    assert (cache.root / "vol" / DATA_FILE).stat().st_size == N * int(np.prod(SHAPE)) * 2
    assert out.dtype == np.float16
    assert np.array_equal(out, values.astype(np.float16))
    assert json.loads((cache.root / "vol" / HEADER_FILE).read_text())["dtype"] == "float16"


def test_non_finite_embeddings_are_refused_and_not_marked(tmp_path):
    entry = EmbeddingCache(tmp_path).open_entry("vol", N, SHAPE)
    bad = embedding(0)
    bad[0, 0, 0] = 1e6  # beyond float16's range
    with pytest.raises(ValueError):
        entry.write(0, bad)
    assert entry.missing() == list(range(N))


def test_cancel_raises_and_keeps_finished_batches(tmp_path):
    cache = EmbeddingCache(tmp_path)
    answers = iter([False, False, True])
    encoder, progress = Encoder(), []
    with pytest.raises(Cancelled):
        cache.get_or_compute(
            "vol", N, SHAPE, None, encoder, progress=lambda *p: progress.append(p),
            cancel=lambda: next(answers), batch_size=2,
        )
    assert encoder.calls == [[0, 1], [2, 3]]
    assert progress == [(0, N), (2, N), (4, N)]
    assert cache.open_entry("vol", N, SHAPE).missing() == [4, 5]

    encoder, progress = Encoder(), []
    out = cache.get_or_compute("vol", N, SHAPE, None, encoder, progress=lambda *p: progress.append(p), batch_size=2)
    assert encoder.calls == [[4, 5]]
    assert progress == [(4, N), (6, N)]
    assert np.array_equal(out, expected(range(N)))


def _hammer(root, key, n, seed, barrier):
    """Child process: overwrite every slice of a shared entry in random order, then read it back."""
    barrier.wait(timeout=60)
    entry = EmbeddingCache(root).open_entry(key, n, SHAPE)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    for index in order:
        entry.write(index, embedding(index))
    encoder = Encoder()
    out = entry.get_or_compute(None, encoder, batch_size=2)
    if not np.array_equal(out, expected(range(n))):
        raise SystemExit(3)
    if encoder.calls:  # this process wrote every slice itself: a mark lost to a racing header update shows here
        raise SystemExit(4)


def _encode(root, key, n, seed, barrier):
    """Child process: encode a volume through get_or_compute while another process does the same."""
    barrier.wait(timeout=60)
    out = EmbeddingCache(root).get_or_compute(key, n, SHAPE, None, Encoder(delay=0.002), batch_size=3)
    if not np.array_equal(out, expected(range(n))):
        raise SystemExit(3)


@pytest.mark.parametrize("worker", [_hammer, _encode])
def test_two_processes_writing_the_same_entry(tmp_path, worker):
    n = 64
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [context.Process(target=worker, args=(str(tmp_path), "shared", n, seed, barrier)) for seed in (1, 2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]

    entry = EmbeddingCache(tmp_path).open_entry("shared", n, SHAPE)
    assert entry.missing() == []
    assert np.array_equal(entry.read(), expected(range(n)))
    assert sorted(path.name for path in entry.path.iterdir()) == [DATA_FILE, HEADER_FILE]  # no stray temp files


def test_lru_eviction_removes_least_recently_used(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.get_or_compute("a", N, SHAPE, None, Encoder())
    one_entry = cache.size_bytes()
    cache.max_bytes = int(2.5 * one_entry)
    time.sleep(0.02)
    cache.get_or_compute("b", N, SHAPE, None, Encoder())
    time.sleep(0.02)
    hit = Encoder()
    cache.get_or_compute("a", N, SHAPE, [0], hit)  # using "a" makes "b" the least recently used
    assert hit.calls == []
    time.sleep(0.02)
    cache.get_or_compute("c", N, SHAPE, None, Encoder())

    assert [info.key for info in cache.entries()] == ["a", "c"]
    assert not (cache.root / "b").exists()
    assert cache.size_bytes() <= cache.max_bytes


def _hold_lock(path, held, release):
    with FileLock(path):
        held.set()
        release.wait(timeout=60)


def test_eviction_skips_entries_in_use(tmp_path):
    cache = EmbeddingCache(tmp_path)
    for key in ("a", "b"):
        cache.get_or_compute(key, N, SHAPE, None, Encoder())
        time.sleep(0.02)
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(cache.root / ".locks" / "a.lock"), held, release))
    holder.start()
    try:
        assert held.wait(timeout=30)
        cache.max_bytes = 1  # everything is over the limit now
        entry = cache.open_entry("c", N, SHAPE)
        out = entry.get_or_compute(None, Encoder())  # the entry being written is never evicted
        assert np.array_equal(out, expected(range(N)))
        remaining = {key for key in "abc" if (cache.root / key).exists()}
        assert remaining == {"a", "c"}  # "a" is locked by the other process, "c" is open here, "b" went
    finally:
        release.set()
        holder.join(timeout=30)
    del entry, out
    gc.collect()
    assert set(cache.evict()) == {"a", "c"}
    assert cache.entries() == [] and cache.size_bytes() == 0


def test_entries_and_clear(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.get_or_compute("a", N, SHAPE, None, Encoder(), model_id="litemedsam:abc123")
    cache.get_or_compute("b", N, SHAPE, [0, 1], Encoder())
    infos = {info.key: info for info in cache.entries()}
    assert (infos["a"].n_done, infos["a"].n_slices, infos["a"].model_id) == (N, N, "litemedsam:abc123")
    assert infos["b"].n_done == 2
    assert cache.size_bytes() == sum(info.size_bytes for info in infos.values()) > 2 * N * SLICE_BYTES

    assert cache.clear() == 2
    assert cache.entries() == [] and cache.size_bytes() == 0


def test_cache_key_follows_every_input():
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    base = cache_key(volume, 0, "ct-window", "sam_vit_b:01ec64")
    changed = volume.copy()
    changed[2, 3, 4] += 1
    variants = [
        cache_key(changed, 0, "ct-window", "sam_vit_b:01ec64"),
        cache_key(volume, 1, "ct-window", "sam_vit_b:01ec64"),
        cache_key(volume, 0, "mr-percentile", "sam_vit_b:01ec64"),
        cache_key(volume, 0, "ct-window", "litemedsam:9f2c11"),
        cache_key(volume.astype(np.uint16), 0, "ct-window", "sam_vit_b:01ec64"),
        cache_key(volume.reshape(5, 4, 6), 0, "ct-window", "sam_vit_b:01ec64"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert len(base) == 64
    # Same content gives the same key, however the array is laid out in memory.
    assert cache_key(np.asfortranarray(volume), -3, "ct-window", "sam_vit_b:01ec64") == base
    # The key names the stack of slices: the same slices stored along another array axis share it.
    assert cache_key(np.ascontiguousarray(volume.transpose(1, 2, 0)), 2, "ct-window", "sam_vit_b:01ec64") == base


def test_default_cache_dir_and_key_validation(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSHOTSAM_CACHE_DIR", raising=False)
    assert default_cache_dir().name == "embeddings" and "fewshotsam" in str(default_cache_dir())
    monkeypatch.setenv("FEWSHOTSAM_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert EmbeddingCache().root == (tmp_path / "mine").resolve()
    with pytest.raises(ValueError):
        EmbeddingCache(tmp_path).open_entry("../escape", N, SHAPE)
