"""Inductor's compile cache packed to travel between GPU leases (:mod:`bench.compile_cache`):
the most recently used entries first, whole, never over the limit, and a damaged archive is a
line in the log, not a failed lease."""

from __future__ import annotations

import os
import tarfile

from bench.compile_cache import cache_entries, pack_cache, unpack_cache


def _entry(cache, name, sizes, used, written=1_000_000.0):
    """A cache folder of incompressible files, read at ``used`` and written at ``written``."""
    folder = cache / name
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        f = folder / f"f{i}"
        f.write_bytes(os.urandom(size))
        os.utime(f, (used, written))
    return folder


def test_entries_come_most_recently_used_first_and_locks_are_left_out(tmp_path):
    cache = tmp_path / "cache"
    _entry(cache, "fxgraph/ab/old", [10], used=1_000_000.0)
    _entry(cache, "triton/0/used", [10, 10], used=3_000_000.0)  # loaded this lease: atime newer than mtime
    _entry(cache, "cw/new", [10], used=1_000_000.0, written=2_000_000.0)
    _entry(cache, "locks/x", [10], used=9_000_000.0)
    (cache / "cw" / "new" / "k.lock").write_text("")
    (cache / "top-level-file").write_text("")
    entries = cache_entries(cache)
    assert [str(folder.relative_to(cache)) for folder, _ in entries] == ["triton/0/used", "cw/new", "fxgraph/ab/old"]
    assert [f.name for f in entries[1][1]] == ["f0"]


def test_the_archive_keeps_whole_entries_by_recency_within_its_limit(tmp_path):
    cache = tmp_path / "cache"
    kib = 1024
    _entry(cache, "a", [600 * kib], used=5.0e6)  # newest, fits
    _entry(cache, "b", [300 * kib, 300 * kib], used=4.0e6)  # would pass the limit: left out whole
    _entry(cache, "c", [100 * kib], used=3.0e6)  # older but small: fits after b is skipped
    archive = tmp_path / "cache.tgz"
    limit_mib = 2.0  # 1 MiB of it is kept for what the compressor holds back
    said = pack_cache(cache, archive, limit_mib)
    assert said.startswith("compile cache: 2 of 3 entries packed")
    assert archive.stat().st_size <= limit_mib * 2**20
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["a/f0", "c/f0"]
    assert not archive.with_name("cache.tgz.part").exists()

    again = tmp_path / "again"
    assert unpack_cache(archive, again).startswith("compile cache: 2 files from the last lease")
    for name in ("a/f0", "c/f0"):
        assert (again / name).read_bytes() == (cache / name).read_bytes()
    assert not (again / "b").exists()


def test_an_empty_cache_packs_nothing_and_a_damaged_archive_is_one_line(tmp_path):
    assert pack_cache(tmp_path / "none", tmp_path / "x.tgz", 15) == "compile cache: nothing to pack"
    assert not (tmp_path / "x.tgz").exists()
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tar archive")
    said = unpack_cache(bad, tmp_path / "cache")
    assert said.startswith(f"compile cache: could not unpack {bad}") and said.endswith("compiling from scratch")


def test_an_archive_cannot_write_outside_the_cache(tmp_path):
    evil = tmp_path / "evil.tgz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../outside")
    said = unpack_cache(evil, tmp_path / "cache")
    assert "could not unpack" in said and not (tmp_path / "outside").exists()


def test_a_python_without_extraction_filters_checks_the_archive_by_hand(tmp_path, monkeypatch):
    evil = tmp_path / "evil.tgz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../outside")
    monkeypatch.delattr(tarfile, "data_filter")
    said = unpack_cache(evil, tmp_path / "cache")
    assert "is not a plain file inside the cache" in said and not (tmp_path / "outside").exists()
    good = tmp_path / "good.tgz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(payload, arcname="fxgraph/ab/graph")
    assert unpack_cache(good, tmp_path / "cache").startswith("compile cache: 1 file from the last lease")
    assert (tmp_path / "cache" / "fxgraph" / "ab" / "graph").read_text() == "x"
