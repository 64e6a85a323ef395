"""``python -m bench.gpu_session``: the GPU half of the speed table, packed for a short GPU lease.

A GPU here is lent for minutes at a time, to a machine that starts bare: its Python has torch,
timm, pandas and pytest but not fvcore or Hydra, no network, and none of ``../shared``. Working
that out by hand costs the lease, so the session is prepared in advance and run in one call:

- ``prepare`` (here, where the package registry is reachable): builds wheels of the packages
  the GPU image lacks (:data:`CARRIED`, at the versions installed here, so both machines run the
  same harness code) into ``.gpu/wheels``, copies the evaluation images into ``.gpu/`` and
  writes the commit being measured; prints the one command to run there.
- ``run`` (there): installs the wheels into a private folder, then runs :data:`STEPS` in order,
  most important first (the CUDA sync-debug tests, then the eager sweeps, then the CUDA-graphs
  ones, whose compiling is slow), each cut off at the deadline so the whole call ends inside the lease. After
  every step the run store and the log are copied to ``--out``, so whatever finished comes
  back even when a later step is cut off.
- ``merge`` (here): appends the returned records to ``results/speed/runs.jsonl`` (records
  already there are skipped) and rewrites that folder's leaderboard.

Inductor's compile cache travels too (:mod:`bench.compile_cache`): ``run`` packs it into
``--out`` after each step that compiled something, ``merge`` keeps the archive in ``.gpu/``, the
next ``prepare`` keeps it in the kit where it fits, and the next ``run`` unpacks it before its first
step, so graphs that did not change since the last lease load instead of compiling.

This module imports only the standard library at the top: on the GPU machine it runs before
the harness's dependencies are installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.compile_cache import pack_cache, unpack_cache

KIT = Path(".gpu")
"""Everything ``prepare`` writes, git-ignored; the device call carries it (``carry=[".gpu"]``)."""
DATASET = "imagenet-val-1300"
TRAVEL_LIMIT_MIB = 62
"""What a device call may carry is 64 MiB in all (the working tree included); keep a margin."""

CARRIED = (
    "fvcore",
    "iopath",
    "yacs",
    "termcolor",
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "timm",
)
"""Pure-Python packages the GPU image lacks (fvcore, Hydra and what they need), plus timm so
that the model code is the version CI tests."""

ALL_METHODS = "fatr,tome,evit,pool,kmedoids,dpcknn,topk,random,pitome,tofu,mctf,ppt,ats,zerotprune,dct,diffrate"
RESULTS_DIR = Path("/tmp/fatr-gpu-results")
"""The session's run store on the GPU machine; its ``runs.jsonl`` and ``*.txt`` reports come back."""
LOG_PATH = Path("/tmp/fatr-gpu-session.log")
SITE_DIR = Path("/tmp/fatr-gpu-site")
"""Where the carried wheels are installed on the GPU machine."""
CACHE_DIR = Path("/tmp/fatr-inductor-cache")
"""Inductor's on-disk cache on the GPU machine (``TORCHINDUCTOR_CACHE_DIR``; Triton's kernels go
under it too): seeded from the kit's archive, packed into ``--out`` after each step that changed it."""
CACHE_ARCHIVE = "compile-cache.tgz"
"""The compile cache as it travels (:mod:`bench.compile_cache`): back in ``--out``, then in the kit."""
CACHE_ROOM = "cache-room-mib"
"""A file in the kit: how many MiB the next archive may take, so that the kit still travels."""
ARCHIVE_LIMIT_MIB = 15.0
"""A file the device call brings back may be 16 MiB."""
ROOM_MARGIN_MIB = 1.0
"""Left free when ``prepare`` sizes the next archive: the tree grows with the commits made before
the next lease, and an archive that no longer fits is left out whole."""
SPEED_ONLY = (
    "model.random_init=true",
    "bench.accuracy=false",
    "bench.spectral.enabled=false",
    "bench.scaling.enabled=false",
    "progress=false",
)


@dataclass(frozen=True)
class Step:
    """One command of the session: ``args`` after ``python -m``; ``sweep`` marks a ``bench.run``
    sweep (it gets the shared overrides and writes to the session's run store)."""

    name: str
    why: str
    args: tuple[str, ...]
    sweep: bool = True


def _sweep(name: str, why: str, *overrides: str) -> Step:
    return Step(name, why, ("bench.run", f"method={ALL_METHODS}", *overrides))


STEPS: tuple[Step, ...] = (
    Step(
        "cuda-tests",
        "every reducer's forward under torch.cuda.set_sync_debug_mode('error')",
        ("pytest", "tests/test_compile.py", "-k", "cuda and not inductor", "-p", "no:cacheprovider"),
        sweep=False,
    ),
    Step(
        "cuda-inductor",
        "inductor compiles every reducer's steps for CUDA (Triton lowers sorts and scans the CPU does not)",
        ("pytest", "tests/test_compile.py", "-k", "cuda_inductor", "-p", "no:cacheprovider", "--durations=5"),
        sweep=False,
    ),
    _sweep(
        "small-base-fp32-eager",
        "target: the paper's fp32 throughput ratios at DeiT-S and DeiT-B, batch 256",
        "model=deit_small,deit_base",
        "bench.latency.compile=eager",
        "bench.latency.batch_size=[256]",
    ),
    _sweep(
        "tiny-bf16-eager",
        "the table: DeiT-Tiny bf16 eager, batch 1 and 256",
        "model=deit_tiny",
        "bench.latency.amp=true",
        "bench.latency.compile=eager",
        "bench.latency.batch_size=[1,256]",
    ),
    _sweep(
        "tiny-bf16-cudagraphs",
        "target: no reducer slower than unreduced, DeiT-Tiny bf16 batch 256, CUDA graphs",
        "model=deit_tiny",
        "bench.latency.amp=true",
        "bench.latency.compile=cudagraphs",
        "bench.latency.batch_size=[256]",
    ),
    Step(
        "profile",
        "where a DeiT-Tiny bf16 batch-256 eager forward spends its GPU time, per method (bench.kernel_profile)",
        (
            "bench.kernel_profile",
            f"--methods=none,{ALL_METHODS}",
            "--batch=256",
            "--amp",
            f"--out={RESULTS_DIR / 'profile-deit-tiny-bf16-b256.txt'}",
        ),
        sweep=False,
    ),
    Step(
        "profile-compiled",
        "which inductor kernels a compiled DeiT-Tiny bf16 batch-256 forward spends its GPU time in: the unreduced "
        "model, ToMe (slower than unreduced under CUDA graphs) and FATR (about even)",
        (
            "bench.kernel_profile",
            "--methods=none,tome,fatr",
            "--batch=256",
            "--amp",
            "--compile=compile",
            f"--out={RESULTS_DIR / 'profile-deit-tiny-bf16-b256-compiled.txt'}",
        ),
        sweep=False,
    ),
    _sweep(
        "small-base-fp32-cudagraphs",
        "the table: DeiT-S and DeiT-B fp32 with CUDA graphs, batch 256",
        "model=deit_small,deit_base",
        "bench.latency.compile=cudagraphs",
        "bench.latency.batch_size=[256]",
    ),
    _sweep(
        "tiny-fp32",
        "the table: DeiT-Tiny fp32, eager and CUDA graphs, batch 1 and 256",
        "model=deit_tiny",
        "bench.latency.compile=eager,cudagraphs",
        "bench.latency.batch_size=[1,256]",
    ),
    _sweep(
        "small-base-bf16",
        "the table: DeiT-S and DeiT-B bf16, eager and CUDA graphs, batch 1 and 256",
        "model=deit_small,deit_base",
        "bench.latency.amp=true",
        "bench.latency.compile=eager,cudagraphs",
        "bench.latency.batch_size=[1,256]",
    ),
)
"""Most important first: a lease that ends early has the tests and the targets. The eager steps
come before the CUDA-graphs ones because each takes a few minutes at most, while compiling
sixteen reduced models can take the rest of the lease (a cut-off sweep keeps every finished job)."""


# -- prepare (here) --------------------------------------------------------------------------------


def build_wheels(dest: Path, packages: Sequence[str] = CARRIED) -> list[Path]:
    """Wheels of ``packages`` at the versions installed here (``pip wheel --no-deps``: a
    registry wheel where there is one, else built from the sdist; all are pure Python)."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in packages]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), *pins],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def tree_mib(paths: Sequence[Path]) -> float:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 2**20


def tracked_mib(repo: Path) -> float:
    """Size of what travels besides the kit: tracked and untracked, not ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    files = [repo / f for f in out.decode().split("\0") if f]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def copy_files(src: Path, dest: Path) -> None:
    """The files under ``src`` into ``dest``, contents only: a read-only source (``../shared``
    is) must not make the kit read-only, or the next ``prepare`` could not replace it."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


def commit_label(repo: Path) -> str:
    """The commit as the run store writes it (``bench.store.git_commit``), read here where
    ``.git`` is: the GPU machine gets the working tree without it."""
    from bench.store import git_commit

    return git_commit(repo)


def keep_archive(kit: Path, archive: bytes | None, room_mib: float) -> str:
    """Put the last lease's compile cache (``archive``, read before the kit was rebuilt) back into
    ``kit`` if it fits the ``room_mib`` left to carry; says what happened, in words."""
    if archive is None:
        return "no compile cache from an earlier lease: every model compiles from scratch"
    mib = len(archive) / 2**20
    if mib > room_mib:
        return f"the compile cache from the last lease ({mib:.1f} MiB) is left out: {room_mib:.1f} MiB left to carry"
    (kit / CACHE_ARCHIVE).write_bytes(archive)
    return f"the compile cache from the last lease ({mib:.1f} MiB) travels too"


def prepare(images: Path, repo: Path = Path(".")) -> int:
    if not images.is_dir():
        print(f"error: no images at {images} (pass --images PATH, an ImageNet val folder)", file=sys.stderr)
        return 2
    kit = repo / KIT
    archive = (kit / CACHE_ARCHIVE).read_bytes() if (kit / CACHE_ARCHIVE).is_file() else None
    if kit.exists():
        shutil.rmtree(kit)
    wheels = build_wheels(kit / "wheels")
    copy_files(images, kit / DATASET)
    (kit / "commit").write_text(commit_label(repo) + "\n")
    size = tracked_mib(repo) + tree_mib([kit])
    if size > TRAVEL_LIMIT_MIB:
        print(f"error: {size:.1f} MiB is over the {TRAVEL_LIMIT_MIB} MiB a device call may carry", file=sys.stderr)
        return 2
    room = TRAVEL_LIMIT_MIB - size
    (kit / CACHE_ROOM).write_text(f"{max(0.0, min(ARCHIVE_LIMIT_MIB, room - ROOM_MARGIN_MIB)):.1f}\n")
    print(keep_archive(kit, archive, room))
    if (kit / CACHE_ARCHIVE).is_file():
        size += tree_mib([kit / CACHE_ARCHIVE])
    print(f"{len(wheels)} wheels and {images} copied into {kit}/; {size:.1f} MiB will travel")
    print('then, on the GPU machine (device tool): run(carry=[".gpu"], timeout_s=600,')
    print('    command="python3 -m bench.gpu_session run --deadline-s 540 --out $OUT")')
    return 0


PROBE = "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
"""First line of the log: the torch build and the GPU the numbers were measured on."""


# -- run (there) -----------------------------------------------------------------------------------


def install_wheels(wheels: Path, target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(target),
            *map(str, sorted(wheels.glob("*.whl"))),
        ],
        check=True,
    )


def step_command(
    step: Step, results_dir: Path, data_root: Path, device: str = "cuda", extra: Sequence[str] = ()
) -> list[str]:
    """The step's command line; a sweep's overrides with ``extra`` replacing those of the same
    key (``method=evit`` narrows every sweep to one method)."""
    if not step.sweep:
        return [sys.executable, "-m", *step.args]
    # data_root stays relative (.gpu/...): a row's identity must not depend on where the GPU
    # machine put its copy of the tree
    where = [f"device={device}", f"data.root={data_root}", f"results_dir={results_dir}"]
    overrides = [*step.args[1:], *SPEED_ONLY, *where]
    keyed = {o.split("=", 1)[0]: o for o in [*overrides, *extra]}
    return [sys.executable, "-m", step.args[0], *keyed.values()]


def run_until(cmd: Sequence[str], seconds: float, log, env: dict[str, str], grace: float = 15.0) -> str:
    """Run ``cmd`` (its output into ``log``) for at most ``seconds``: then SIGINT to its process
    group (a sweep keeps every finished job's record), SIGKILL after ``grace``. Returns what
    happened, in words."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, seconds))
        return f"exit {rc}"
    except subprocess.TimeoutExpired:
        interrupt([proc], grace)
        return f"cut off after {seconds:.0f} s"


def interrupt(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGINT to each process group (a sweep keeps every finished job's record), then SIGKILL
    to those still running after ``grace`` seconds."""
    for proc in procs:
        os.killpg(proc.pid, signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


WARM_ONLY = (
    "bench.latency.iters=1",
    "bench.latency.tolerance=null",
    "bench.latency.max_seconds=1",
    "bench.latency.warmup=1",
)
"""A warm-up job compiles and runs once; its timings are thrown away (see :func:`warm_commands`)."""
WARM_DIR = Path("/tmp/fatr-gpu-warm")
WARM_SHARE = 0.5
"""At most this share of the time left goes to warming a compiled step's caches."""


def _override(cmd: Sequence[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in cmd if o.startswith(f"{key}=")]
    return values[-1] if values else None


def warm_commands(
    step: Step, data_root: Path, device: str = "cuda", extra: Sequence[str] = (), warm_dir: Path | None = None
) -> list[list[str]]:
    """For a compiled sweep, one command per method that compiles that method's models (every
    model of the step, its compiled modes only) into inductor's on-disk caches, each into a
    scratch store of its own; none for an eager sweep or a non-sweep step.

    Why: a cold inductor compile of one reduced model took about 100 s on the H200's 16 cores,
    most of it one process's single-threaded lowering, so a serial sweep of sixteen methods
    does not fit a lease. Run in parallel first, the compiles fill the caches that the timed
    sweep then reads (its ``compile s`` is then a warm-cache compile). Their timings, taken
    while the others compile, are discarded with the scratch store: every published number
    comes from the serial sweep."""
    if not step.sweep:
        return []
    warm_dir = WARM_DIR if warm_dir is None else warm_dir
    cmd = step_command(step, warm_dir, data_root, device, extra)
    modes = [m for m in (_override(cmd, "bench.latency.compile") or "eager").split(",") if m != "eager"]
    if not modes:
        return []
    methods = (_override(cmd, "method") or "").split(",")
    return [
        step_command(
            step,
            warm_dir / method,
            data_root,
            device,
            [*extra, f"method={method}", f"bench.latency.compile={','.join(modes)}", *WARM_ONLY],
        )
        for method in methods
        if method
    ]


def run_parallel(
    cmds: Sequence[Sequence[str]], seconds: float, log_dir: Path, env: dict[str, str], jobs: int, grace: float = 15.0
) -> tuple[int, int]:
    """``cmds`` at most ``jobs`` at a time (each one's output in ``log_dir/<i>.log``) until all
    ended or ``seconds`` passed (then the rest are stopped by :func:`interrupt`).
    Returns (how many exited 0, how many there were)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    waiting = list(enumerate(cmds))
    running: list[tuple[subprocess.Popen, object]] = []
    ok = 0
    end = time.monotonic() + seconds
    while (waiting or running) and time.monotonic() < end:
        while waiting and len(running) < jobs:
            i, cmd = waiting.pop(0)
            log = (log_dir / f"{i}.log").open("w")
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            running.append((proc, log))
        for proc, log in list(running):
            if proc.poll() is not None:
                ok += proc.returncode == 0
                log.close()
                running.remove((proc, log))
        time.sleep(0.2)
    interrupt([proc for proc, _ in running], grace)
    for _, log in running:
        log.close()
    return ok, len(cmds)


def warm_caches(cmds: Sequence[Sequence[str]], seconds: float, log, env: dict[str, str], jobs: int = 4) -> str:
    """:func:`run_parallel` over ``cmds``, one per CPU at most, inductor's compile workers
    shared out among them (``compile_threads`` is not part of inductor's cache key); says
    what happened, in words, into ``log`` too."""
    cpus = os.cpu_count() or 1
    jobs = max(1, min(len(cmds), cpus, jobs))
    warm_env = dict(env, TORCHINDUCTOR_COMPILE_THREADS=str(max(2, 2 * cpus // jobs)))
    start = time.monotonic()
    ok, n = run_parallel(cmds, seconds, WARM_DIR / "logs", warm_env, jobs)
    what = f"warmed: {ok} of {n} methods compiled in {time.monotonic() - start:.0f} s ({jobs} at a time)"
    log.write(f"{what}\n")
    for i in range(len(cmds)):  # each job's last lines: a warm-up that failed says why in the log that comes back
        job_log = WARM_DIR / "logs" / f"{i}.log"
        tail = job_log.read_text(errors="replace").splitlines()[-3:] if job_log.is_file() else ["(no log)"]
        log.write("".join(f"  warm-up {i}: {line[:200]}\n" for line in tail))
    log.flush()
    return what


def copy_back(results_dir: Path, log_path: Path, out: Path, since: float = 0.0, jobs: Path = Path("outputs")) -> None:
    """The run store, the reports (``*.txt``) and the log into ``out``: plain files, as the
    device tool fetches them. The tracebacks jobs saved since ``since`` (a failed compile's,
    a bug's) go to ``out/tracebacks``, named by their job folder: the session log has only
    each failure's one line, and the machine is gone when the call ends."""
    out.mkdir(parents=True, exist_ok=True)
    runs = results_dir / "runs.jsonl"
    if runs.is_file():
        shutil.copy2(runs, out / "runs.jsonl")
    for report in sorted(results_dir.glob("*.txt")):
        shutil.copy2(report, out / report.name)
    for saved in sorted(jobs.glob("**/*traceback.txt")) if jobs.is_dir() else ():
        if saved.stat().st_mtime >= since:
            (out / "tracebacks").mkdir(exist_ok=True)
            shutil.copy2(saved, out / "tracebacks" / f"{saved.parent.parent.name}-{saved.parent.name}-{saved.name}")
    shutil.copy2(log_path, out / "gpu-session.log")


def archive_limit(kit: Path = KIT) -> float:
    """MiB the compile cache may take on its way back: what ``prepare`` left room for in the kit,
    at most :data:`ARCHIVE_LIMIT_MIB`."""
    try:
        return min(ARCHIVE_LIMIT_MIB, float((kit / CACHE_ROOM).read_text()))
    except (OSError, ValueError):
        return ARCHIVE_LIMIT_MIB


def cache_state(cache: Path) -> tuple[int, float]:
    """How many files the cache holds and when the newest was written: packed again only when
    this changes (a step that compiled nothing, or only loaded, leaves it as it was)."""
    files = [f for f in cache.rglob("*") if f.is_file()] if cache.is_dir() else []
    return len(files), max((f.stat().st_mtime for f in files), default=0.0)


def tell(log, what: str) -> None:
    """A line for the call's output (what the device tool shows) and for the session log."""
    print(what, flush=True)
    log.write(f"{what}\n")
    log.flush()


def bring_back_cache(out: Path, log, packed: tuple[int, float], limit_mib: float) -> tuple[int, float]:
    """Pack the compile cache into ``out`` when it changed since ``packed``; returns its state."""
    now = cache_state(CACHE_DIR)
    if now != packed:
        tell(log, pack_cache(CACHE_DIR, out / CACHE_ARCHIVE, limit_mib))
    return now


def run(
    deadline_s: float,
    out: Path,
    steps: Sequence[str] | None = None,
    device: str = "cuda",
    extra: Sequence[str] = (),
    reserve_s: float = 20.0,
    min_step_s: float = 30.0,
    warm_jobs: int = 0,
) -> int:
    """Every step in :data:`STEPS` (or those named in ``steps``, in that order) while at least ``min_step_s``
    is left before the deadline less ``reserve_s`` (for copying back); ``device`` other than
    ``cuda`` only to rehearse the session on the CPU. With ``warm_jobs`` > 0 a compiled sweep
    first warms inductor's caches, that many methods at a time (:func:`warm_commands`). 0 when
    every step ran to the end."""
    start = time.monotonic()
    since = time.time()
    by_name = {s.name: s for s in STEPS}
    unknown = set(steps or ()) - set(by_name)
    if unknown:
        print(f"error: unknown step(s) {sorted(unknown)}; choose from {[s.name for s in STEPS]}", file=sys.stderr)
        return 2
    if not deadline_s > reserve_s + min_step_s:
        print(
            f"error: --deadline-s {deadline_s:g} leaves no step its {min_step_s:g} s after the {reserve_s:g} s kept "
            "for copying back; give the seconds the device call may take (e.g. 540 for a 600 s call)",
            file=sys.stderr,
        )
        return 2
    if warm_jobs < 0:
        print(f"error: --warm {warm_jobs}: give how many methods compile at a time (1 or more)", file=sys.stderr)
        return 2
    chosen = list(STEPS) if steps is None else [by_name[name] for name in steps]
    if not (KIT / "wheels").is_dir() or not (KIT / DATASET).is_dir():
        print("error: no .gpu kit here: run `python -m bench.gpu_session prepare`, carry .gpu", file=sys.stderr)
        return 2
    site = SITE_DIR
    install_wheels(KIT / "wheels", site)
    env = dict(os.environ, PYTHONUNBUFFERED="1", FATR_GIT_COMMIT=(KIT / "commit").read_text().strip())
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path.cwd()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE_DIR)
    results_dir = RESULTS_DIR
    log_path = LOG_PATH
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failed = False
    with log_path.open("w") as log:
        log.write(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env).stdout)
        if (KIT / CACHE_ARCHIVE).is_file():
            tell(log, unpack_cache(KIT / CACHE_ARCHIVE, CACHE_DIR))
        packed, limit = cache_state(CACHE_DIR), archive_limit()
        for step in chosen:
            left = deadline_s - (time.monotonic() - start) - reserve_s
            if left < min_step_s:
                print(f"{step.name}: skipped, {left:.0f} s left")
                log.write(f"== {step.name}: skipped, {left:.0f} s left\n")
                continue
            log.write(f"\n== {step.name}: {step.why}\n")
            warm = warm_commands(step, KIT / DATASET, device, extra) if warm_jobs > 0 else []
            if warm:
                print(f"{step.name}: {warm_caches(warm, left * WARM_SHARE, log, env, warm_jobs)}", flush=True)
                left = deadline_s - (time.monotonic() - start) - reserve_s
            cmd = step_command(step, results_dir, KIT / DATASET, device, extra)
            what = run_until(cmd, left, log, env)
            failed |= what != "exit 0"
            print(f"{step.name}: {what} ({time.monotonic() - start:.0f} s in)", flush=True)
            log.flush()
            copy_back(results_dir, log_path, out, since)
            packed = bring_back_cache(out, log, packed, limit)
    copy_back(results_dir, log_path, out, since)
    return 1 if failed else 0


# -- merge (here) ----------------------------------------------------------------------------------


def merge(runs_file: Path, results_dir: Path, kit: Path = KIT) -> int:
    """Append the records of ``runs_file`` that ``results_dir`` lacks; rewrite its leaderboard;
    copy the reports that came back with it (``*.txt``, e.g. the kernel profile) into
    ``results_dir/profiles``, replacing older ones of the same name (git keeps those); keep the
    compile cache that came back with it in ``kit`` for the next lease."""
    if not runs_file.is_file():
        print(f"error: no run store at {runs_file} (the device call's runs.jsonl)", file=sys.stderr)
        return 2
    from bench.leaderboard import write_leaderboard
    from bench.store import append_record, read_records

    have = {(r.get("config_hash"), r.get("timestamp")) for r in read_records(results_dir)}
    new = [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]
    added = [r for r in new if (r.get("config_hash"), r.get("timestamp")) not in have]
    for record in added:
        append_record(results_dir, record)
    print(f"{len(added)} of {len(new)} records added to {results_dir}")
    for report in sorted(runs_file.parent.glob("*.txt")):
        (results_dir / "profiles").mkdir(parents=True, exist_ok=True)
        shutil.copy2(report, results_dir / "profiles" / report.name)
        print(results_dir / "profiles" / report.name)
    if (runs_file.parent / CACHE_ARCHIVE).is_file():
        kit.mkdir(parents=True, exist_ok=True)
        shutil.copy2(runs_file.parent / CACHE_ARCHIVE, kit / CACHE_ARCHIVE)
        print(f"{kit / CACHE_ARCHIVE}: the compile cache, kept for the next lease")
    for path in write_leaderboard(results_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser(
        "prepare", help="here: wheels, images and commit into .gpu/ (the last lease's compile cache kept where it fits)"
    )
    p.add_argument(
        "--images",
        type=Path,
        default=Path("../shared/data") / DATASET,
        help="the image folder to take along (default: %(default)s)",
    )
    r = sub.add_parser("run", help="there: the steps, in order, until the deadline")
    r.add_argument("--deadline-s", type=float, required=True, help="seconds the whole call may take")
    r.add_argument("--out", type=Path, required=True, help="where the run store and log go ($OUT)")
    names = ",".join(s.name for s in STEPS)
    r.add_argument("--steps", help=f"only these steps, in this order (comma-separated), of {names}")
    r.add_argument("--device", default="cuda", help="cpu: rehearse the session here (the CUDA tests skip)")
    r.add_argument(
        "--warm",
        type=int,
        nargs="?",
        const=4,
        default=0,
        metavar="N",
        help="compile the methods N at a time (default 4) before a compiled sweep, to fill inductor's caches "
        "(sixteen at a time finished none in 208 s on the H200 lease; fewer is untried)",
    )
    r.add_argument("overrides", nargs="*", help="replace a sweep override of the same key, e.g. method=evit")
    m = sub.add_parser("merge", help="here: the returned records into results/speed, the compile cache into .gpu/")
    m.add_argument("runs_file", type=Path, help="the runs.jsonl the session brought back")
    m.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results/speed"),
        help="the store to add them to (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.what == "prepare":
        return prepare(args.images)
    if args.what == "run":
        steps = args.steps.split(",") if args.steps else None
        return run(args.deadline_s, args.out, steps, args.device, args.overrides, warm_jobs=args.warm)
    return merge(args.runs_file, args.results_dir)


if __name__ == "__main__":
    sys.exit(main())
