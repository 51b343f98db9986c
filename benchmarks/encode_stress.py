"""Are ``sync.mp4`` bytes reproducible? Encode the same real frames many times, in several processes,
under CPU load, and compare every encode's bytes with a reference (issue 9).

Two checks per configuration:

* repeat: ``--encodes`` encodes spread over ``--procs`` fresh processes while ``--burners``
  busy-loop processes load every core; each encode's bytes are compared with a reference encoded
  first in the parent. Reports failures / total and the exact (Clopper-Pearson) 95% upper bound of
  the failure rate (with 0 failures in n: 1 - 0.05 ** (1 / n)).
* rounding: the same frames encoded with the calling thread in each other rounding mode (x86-64):
  x264's rate control rounds QPs from floating point, so the environment a library leaves behind
  could change the bytes; ``new`` encodes in the default environment whatever the caller set.
* cpu path: the same frames encoded once with every SIMD path switched off (x264 ``asm=0``,
  FFmpeg ``av_force_cpu_flags(0)`` for swscale), compared with the reference: what another CPU,
  or the same CPU seen through other flags, would write.

``old`` is the configuration before the fix (PyAV's default reformat: automatic threads and the
fast rgb24->yuv420p path; x264 ``scenecut=0`` only; the caller's floating-point environment);
``new`` is ``preprocessing.compact`` as it is.

    .venv/bin/python benchmarks/encode_stress.py                # both configurations, ~2.5 min on 2 cores
    .venv/bin/python benchmarks/encode_stress.py --configs new --encodes 600
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import hashlib
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIP = "F8Zt3mYlOqU_000094.mp4"
# (frame size, frames): the tiny preset's 64 px for a whole 8 s clip, and 224 px for 2 s of it
CASES = ((64, 200), (224, 50))


def _shared() -> Path:
    return Path(os.environ.get("SELVA_SHARED", ROOT.parent / "shared"))


def _frames() -> dict[int, object]:
    from preprocessing.media import decode_clip

    path = _shared() / "data" / "real" / CLIP
    return {size: decode_clip(path, start=0.0, duration=8.0, frame_size=size).frames[:n] for size, n in CASES}


def _configure(config: str, extra_x264: str = "") -> None:
    """Set ``preprocessing.compact`` to ``config`` in this process."""
    import av

    from preprocessing import compact

    if not hasattr(compact, "_orig_params"):
        compact._orig_params = (compact.SYNC_X264_PARAMS, compact.to_yuv420p, compact.default_float_env)
    params, to_yuv, float_env = compact._orig_params
    if config == "old":
        params = "scenecut=0"
        float_env = contextlib.nullcontext  # the caller's floating-point environment, as before the fix

        def to_yuv(_reformatter, rgb):  # PyAV's default reformat, as before the fix
            return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")

    compact.SYNC_X264_PARAMS = params + extra_x264
    compact.to_yuv420p = to_yuv
    compact.default_float_env = float_env


def _encode_all(frames: dict[int, object]) -> dict[int, str]:
    from preprocessing.compact import encode_sync_mp4

    return {size: hashlib.sha256(encode_sync_mp4(f)).hexdigest() for size, f in frames.items()}


def _force_ffmpeg_cpu_flags(flags: int) -> None:
    """``av_force_cpu_flags`` of the libavutil PyAV loaded (0: no SIMD, -1: detect again)."""
    import av

    libs = glob.glob(str(Path(av.__file__).parent.parent / "av.libs" / "libavutil*.so*"))
    lib = ctypes.CDLL(libs[0]) if libs else ctypes.CDLL("libavutil.so")
    lib.av_force_cpu_flags(flags)


def _worker(args: tuple[str, int, dict[int, str]]) -> list[tuple[int, bool]]:
    config, count, reference = args
    _configure(config)
    frames = _frames()
    out = []
    for i in range(count):
        size = CASES[i % len(CASES)][0]
        out.append((size, _encode_all({size: frames[size]})[size] == reference[size]))
    return out


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def upper_bound_95(failures: int, n: int) -> float:
    """Exact one-sided 95% Clopper-Pearson upper bound of a binomial rate (bisection, no SciPy)."""
    if n == 0:
        return 1.0
    if failures >= n:
        return 1.0
    if failures == 0:
        return 1.0 - 0.05 ** (1.0 / n)

    def cdf(p: float) -> float:  # P(X <= failures)
        return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(failures + 1))

    lo, hi = failures / n, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 0.05 else (lo, mid)
    return hi


def run_config(config: str, frames, encodes: int, procs: int, burners: int) -> dict:
    _configure(config)
    reference = _encode_all(frames)
    # cpu path: every SIMD path off, in this process
    _configure(config, ":asm=0")
    _force_ffmpeg_cpu_flags(0)
    try:
        plain_c = _encode_all(frames)
    finally:
        _force_ffmpeg_cpu_flags(-1)
        _configure(config)
    cpu_path = {size: plain_c[size] == reference[size] for size in reference}
    # rounding: the caller's thread set another rounding mode (x86-64 fesetround constants)
    libm = ctypes.CDLL("libm.so.6")
    rounding = {}
    for name, mode in (("down", 0x400), ("up", 0x800), ("toward zero", 0xC00)):
        libm.fesetround(mode)
        try:
            rounding[name] = _encode_all(frames) == reference
        finally:
            libm.fesetround(0)

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    load = [ctx.Process(target=_burn, args=(stop,), daemon=True) for _ in range(burners)]
    for p in load:
        p.start()
    began = time.perf_counter()
    share = [encodes // procs + (i < encodes % procs) for i in range(procs)]
    try:
        with ctx.Pool(procs, maxtasksperchild=1) as pool:  # a fresh process per share
            results = pool.map(_worker, [(config, n, reference) for n in share])
    finally:
        stop.set()
        for p in load:
            p.join()
    flat = [r for part in results for r in part]
    failures = sum(not same for _, same in flat)
    return {
        "config": config,
        "n": len(flat),
        "failures": failures,
        "upper95": upper_bound_95(failures, len(flat)),
        "by_size": {s: (sum(not ok for z, ok in flat if z == s), sum(z == s for z, _ in flat)) for s, _ in CASES},
        "cpu_path_same": cpu_path,
        "rounding_same": rounding,
        "seconds": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--encodes", type=int, default=320, help="encodes per configuration (>= 300)")
    parser.add_argument("--procs", type=int, default=4, help="encoding processes (fresh ones)")
    parser.add_argument("--burners", type=int, default=2, help="busy-loop processes")
    args = parser.parse_args()
    import av

    print(f"PyAV {av.__version__}, FFmpeg libs {av.library_versions}, {os.cpu_count()} CPUs, "
          f"{args.procs} encoding processes + {args.burners} busy-loop processes")
    frames = _frames()
    for config in args.configs:
        r = run_config(config, frames, args.encodes, args.procs, args.burners)
        sizes = ", ".join(f"{s} px {f}/{n}" for s, (f, n) in r["by_size"].items())
        cpu = ", ".join(f"{s} px {'same' if same else 'DIFFERENT'}" for s, same in r["cpu_path_same"].items())
        print(f"{config}: repeat under load: {r['failures']}/{r['n']} encodes differed ({sizes}); "
              f"95% upper bound of the failure rate {r['upper95']:.4f}; {r['seconds']:.0f} s")
        print(f"{config}: cpu path (x264 asm=0 + FFmpeg without SIMD) vs reference: {cpu}")
        modes = ", ".join(f"{m} {'same' if same else 'DIFFERENT'}" for m, same in r["rounding_same"].items())
        print(f"{config}: caller's rounding mode (all sizes) vs reference: {modes}")


if __name__ == "__main__":
    main()
