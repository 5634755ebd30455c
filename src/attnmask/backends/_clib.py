"""Building and loading ``segattn.c``: the "native" backend's kernel and the allowed-pair counts of planning.

Layer 3 (attention), under every backend module: imports nothing of attnmask. ``native`` runs the kernel
(``attnmask_segattn``); ``_common.allowed_fraction`` counts the pairs a spec allows with ``attnmask_run_pairs`` /
``attnmask_real_pairs`` (one C call in place of eight numpy ones, each 20-90 us right after an attention kernel has
evicted the caches: planning a small call, ``benchmarks/bench_small_rows.py``), and ``_common.varlen_plan`` cuts
packed rows into documents with ``attnmask_doc_segments`` (one C call in place of ~40 torch ones). The estimates of
the costs path sum over those documents in C too (``blocksparse``'s floor, ``native``'s items and its threads' deal,
``varlen``'s floor), each with its numpy form kept for a machine without the library.

The C source is compiled on first use with the system C compiler (``$CC``, default ``cc``; about two seconds) into
``$ATTNMASK_CACHE_DIR`` (default ``$XDG_CACHE_HOME/attnmask`` or ``~/.cache/attnmask``; a per-user folder in the
temporary directory when that one is not writable), keyed by a hash of the source, the flags and the CPU, and loaded
with ctypes; no Python or torch headers are involved. Without a compiler, or with ``ATTNMASK_NATIVE=0``,
:func:`library` returns the reason instead: the "native" backend then reports itself unsupported and the counts run in
numpy.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["c_array", "library"]

_log = logging.getLogger("attnmask")

_SOURCE = Path(__file__).with_name("segattn.c")
# The kernel's threads are an OpenMP team: with GCC's runtime, the one torch itself loaded (one libgomp.so.1 per
# process), whose idle threads are already spinning after torch's last parallel region and take the items at once.
# Private pthreads, started per call, measured 1.3-1.8x slower than the team right after a torch matmul or SDPA (the
# team's threads, still spinning, held the cores; RESULTS.md, issue 15, "native's threads"). A compiler without
# OpenMP (Apple clang) builds with "-fopenmp-simd" instead, and segattn.c starts pthreads.
_OPENMP, _SIMD_ONLY = "-fopenmp", "-fopenmp-simd"
_FLAGS = (
    "-O3",
    "-march=native",
    _OPENMP,
    "-fno-trapping-math",
    "-fno-math-errno",
    "-fPIC",
    "-shared",
    "-std=gnu11",
)
# ATTNMASK_NATIVE_SANITIZE=1 (``make sanitize``): the kernel built with AddressSanitizer and UndefinedBehaviorSanitizer,
# any finding fatal; the process must preload the ASan runtime (LD_PRELOAD=$(cc -print-file-name=libasan.so)).
_SANITIZE = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all")
_PORTABLE = "-march=native"  # dropped on a later try: some compilers (older Apple clang on arm64) refuse it
_LIBS = ("-lm", "-lpthread")
_COMPILE_TIMEOUT_S = 120


def _cache_dirs() -> list[Path]:
    """Where the built kernel is kept: ``$ATTNMASK_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnmask`` or
    ``~/.cache/attnmask``; then a per-user folder in the temporary directory, for a read-only home."""
    if os.environ.get("ATTNMASK_CACHE_DIR"):
        first = Path(os.environ["ATTNMASK_CACHE_DIR"])
    else:
        first = Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")) / "attnmask"
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return [first, Path(tempfile.gettempdir()) / f"attnmask-{user}"]


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and its CPU flags (Linux), so a shared cache stays correct."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.system()}|{flags.strip()}"


def _build(compiler: str) -> Path:
    """Compile ``segattn.c`` once per source, flags, compiler and CPU; returns the shared library's path. A compiler
    that refuses OpenMP or ``-march=native`` gets further tries without them (the first error is the one raised)."""
    flags = _FLAGS
    if os.environ.get("ATTNMASK_NATIVE_SANITIZE") == "1":
        flags = tuple(f for f in _FLAGS if f != "-O3") + _SANITIZE
    simd_only = tuple(_SIMD_ONLY if f == _OPENMP else f for f in flags)
    tries = [flags, tuple(f for f in flags if f != _PORTABLE), simd_only, tuple(f for f in simd_only if f != _PORTABLE)]
    first = None
    for attempt in tries:
        try:
            return _build_with(compiler, attempt)
        except OSError as err:
            first = first or err
    raise first


def _build_with(compiler: str, flags: tuple[str, ...]) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(), _cpu_signature().encode()]))
    name = f"segattn-{key.hexdigest()[:16]}.so"
    for folder in _cache_dirs():
        if (folder / name).exists():
            return folder / name
    for folder in _cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=Path(name).stem, suffix=".tmp.so", dir=folder)
        except OSError:
            continue  # not writable: try the next folder
        os.close(fd)
        return _compile(compiler, flags, tmp, folder / name)
    raise OSError(f"no writable cache folder among {[str(f) for f in _cache_dirs()]}")


def _compile(compiler: str, flags: tuple[str, ...], tmp: str, target: Path) -> Path:
    try:
        cmd = [compiler, *flags, "-o", tmp, str(_SOURCE), *_LIBS]
        _log.info("building %s once for this machine into %s (a few seconds)", _SOURCE.name, target.parent)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: concurrent processes building the same key are harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_PTR, _I64, _INT, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
# segattn.c's planning helpers (everything but the kernel): name -> (return type, argument types).
_HELPERS = {
    "attnmask_run_pairs": (_I64, [_PTR, *[_I64] * 5, _INT]),
    "attnmask_real_pairs": (_I64, [_PTR, *[_I64] * 5, _INT]),
    "attnmask_doc_segments": (_I64, [_PTR, *[_I64] * 5, _PTR, _I64]),
    "attnmask_padded_segments": (_I64, [_PTR, *[_I64] * 5, _INT, _I64, _PTR]),
    "attnmask_forward_items": (_I64, [_PTR, *[_I64] * 4, _PTR, _I64]),
    "attnmask_keys_disjoint": (_INT, [_PTR, _I64]),
    "attnmask_uncovered": (_I64, [_PTR, *[_I64] * 3, _PTR]),
    "attnmask_allowed_pairs": (_F64, [_PTR, _I64, _INT, _I64]),
    "attnmask_segment_tile_pairs": (_I64, [_PTR, *[_I64] * 5, _INT, _I64, _PTR]),
    "attnmask_item_work": (None, [_PTR, _I64, _INT, _I64, *[_F64] * 12, _I64, _PTR]),
    "attnmask_pull_makespan": (_F64, [_PTR, *[_I64] * 4, _PTR]),
    "attnmask_item_work_makespan": (_F64, [_PTR, _I64, _INT, _I64, *[_F64] * 12, _I64, _PTR, *[_I64] * 3, _PTR]),
    "attnmask_varlen_floor_sums": (None, [_PTR, _I64, _INT, _I64, _I64, _F64, _F64, _PTR]),
    "attnmask_most_keys_seen": (_I64, [_PTR, _I64, _INT, _I64]),
    "attnmask_segment_tile_classes": (None, [_PTR, *[_I64] * 4, _INT, _I64, _PTR]),
    "attnmask_amx_ready": (_INT, []),
    "attnmask_finite_bf16": (_INT, [_PTR, *[_I64] * 7]),
}


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernel, or why there is none (disabled, not Linux/macOS, no compiler, compile error)."""
    if os.environ.get("ATTNMASK_NATIVE", "1") == "0":
        return "disabled by ATTNMASK_NATIVE=0"
    if sys.platform not in ("linux", "darwin"):
        return f"the C kernel is built on Linux and macOS only (this is {sys.platform})"
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return f"no C compiler {compiler!r} on PATH (set CC) to build the kernel"
    try:
        lib = ctypes.CDLL(str(_build(shutil.which(compiler))))
    except (OSError, subprocess.SubprocessError) as err:
        return f"could not build the C kernel: {err}"
    fn = lib.attnmask_segattn
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        *[ctypes.c_void_p] * 12,
        ctypes.c_int64,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    for name, (restype, argtypes) in _HELPERS.items():
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    return lib


@functools.cache
def _array_type(ctype: type, size: int) -> type:
    return ctype * size


def c_array(ctype: type, n: int, values: tuple | list = ()) -> ctypes.Array:
    """A C array of at least ``n`` elements of ``ctype``, ``values`` first and zeros after. Its type is kept, by ``n``
    rounded up to a power of two (at most ~60 types per element type): a ctypes array type made anew took ~16 us, and
    ctypes keeps it only weakly, so each one went as cyclic garbage with its last array and came back on a later
    call (two to four a kernel call, at every new count of segments in the estimates)."""
    return _array_type(ctype, 1 << max(n - 1, 0).bit_length())(*values)
