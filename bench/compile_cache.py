"""Inductor's on-disk compile cache, packed to travel from one GPU lease to the next.

A lent GPU machine starts bare, so every lease compiled every model from scratch: about 100 s
per reduced DeiT-Tiny on the H200 machine, which is most of why a CUDA-graphs sweep of sixteen
methods does not fit a 15-minute lease. Inductor keys its cache entries (FX graphs, Triton
kernels, C++ kernels) by the graph, the torch build and the device, so a copy of the cache
brought back from one lease and carried to the next turns the compiles of unchanged graphs into
loads (on the project's 2-core CPU a reduced DeiT-Tiny's first call took about a tenth as long
with its cache as without, 2026-12-05).

The archive must fit what a device call brings back and carries, so it holds the entries used
or written most recently, as many as fit: a folder of the cache is one entry, kept or left out
whole (a Triton kernel's binary and metadata only work together). Standard library only: the
GPU machine runs this before the harness's dependencies are installed.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

TAR_OVERHEAD = 1024
"""A file's tar header and padding, at most (bytes)."""
COMPRESSOR_SLACK = 2**20
"""What gzip may still hold when the size of the archive so far is read (bytes)."""


def cache_entries(cache: Path) -> list[tuple[Path, list[Path]]]:
    """``(folder, its files)`` for every folder of ``cache`` that holds files (lock files and
    the lock folder left out), the most recently used or written first.

    Used: a file's access time. Linux's default ``relatime`` updates it on the first read after
    an unpacked file's times were set (both to the archived write time), so entries this lease
    loaded rank with those it wrote, ahead of ones nothing asked for; with ``noatime`` the write
    times alone order them."""
    entries = []
    for folder, _, names in os.walk(cache):
        where = Path(folder)
        if where == cache or "locks" in where.relative_to(cache).parts:
            continue
        files = [where / n for n in sorted(names) if not n.endswith(".lock") and (where / n).is_file()]
        if files:
            entries.append((where, files))

    def last_touched(entry: tuple[Path, list[Path]]) -> float:
        return max(max(s.st_atime, s.st_mtime) for s in (f.stat() for f in entry[1]))

    return sorted(entries, key=last_touched, reverse=True)


def pack_cache(cache: Path, archive: Path, limit_mib: float) -> str:
    """Write the most recently used entries of ``cache`` that fit ``limit_mib`` (compressed)
    into ``archive`` (gzipped tar, paths relative to ``cache``); says what it packed, in words.

    An entry whose uncompressed size no longer fits what is left is skipped and a smaller,
    older one may follow: the archive never exceeds the limit. Written beside ``archive`` and
    moved into place, so a lease cut off mid-way leaves the previous archive whole."""
    entries = cache_entries(cache) if cache.is_dir() else []
    if not entries:
        return "compile cache: nothing to pack"
    limit = int(limit_mib * 2**20)
    part = archive.with_name(archive.name + ".part")
    packed = 0
    with part.open("wb") as raw:
        with tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for _, files in entries:
                bound = sum(f.stat().st_size + TAR_OVERHEAD for f in files)
                if raw.tell() + bound + COMPRESSOR_SLACK > limit:
                    continue
                for f in files:
                    tar.add(f, arcname=str(f.relative_to(cache)), recursive=False)
                packed += 1
    os.replace(part, archive)
    size = archive.stat().st_size / 2**20
    return f"compile cache: {packed} of {len(entries)} entries packed for the next lease ({size:.1f} MiB)"


def unpack_cache(archive: Path, cache: Path) -> str:
    """Unpack ``archive`` into ``cache``; says what it did, in words. A damaged archive is
    reported, not raised: a lease must go on without its cache rather than stop."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            if hasattr(tarfile, "data_filter"):
                tar.extractall(cache, filter="data")  # regular files inside ``cache`` only
            else:  # a Python without extraction filters: the same check by hand
                for m in members:
                    if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or ".." in Path(m.name).parts:
                        raise tarfile.TarError(f"{m.name!r} is not a plain file inside the cache")
                tar.extractall(cache)
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"compile cache: could not unpack {archive} ({e}); compiling from scratch"
    size = archive.stat().st_size / 2**20
    files = f"{len(members)} file{'' if len(members) == 1 else 's'}"
    return f"compile cache: {files} from the last lease ({size:.1f} MiB)"
