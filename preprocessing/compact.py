"""The compact media members of a shard sample: ``sync.mp4`` and ``audio.flac`` (DESIGN §6).

``sync.mp4`` holds the decoded sync frames (25 fps, squashed to the preset's size) as H.264 in
yuv420p with no audio track. At CRF 20 the real 8 s clips take 21-41 KB at 64 px (2.4 MB raw) and
100-390 KB at 224 px (30 MB raw), with a mean absolute pixel error of ~3.5 and ~2.8 grey levels
(yuv420p's halved chroma alone is ~1.3 of that; CRF 23 would save a third of the bytes for ~0.6 more).
``audio.flac`` holds the training waveform (16 kHz mono) as 16-bit FLAC: lossless once quantised, so
the round trip differs from the float32 input by at most half a quantisation step (2**-16).

Both are produced and read in memory (bytes), and both are written bit-exact (no library version
strings), so rerunning a shard with the same libraries gives the same bytes; neither the
RGB->yuv420p conversion nor x264 may pick an algorithm by CPU, so that this holds on other CPUs too
(``SYNC_SWS_FLAGS``, ``SYNC_X264_PARAMS``; what was measured: docs/shard-format.md, "What identical
means").

Encoder: the PyAV 18.1 wheels bundle libx264, which is what ``video_encoder()`` finds here. Builds
without it fall back to another H.264 encoder that actually opens, then to MPEG-4 part 2.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import io
import sys
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

SYNC_CRF = 20
SYNC_PRESET = "veryfast"
# Small frames gain nothing from x264's threads, and precompute runs one encoder per worker anyway;
# one thread also keeps x264 deterministic (no frame threads, no lookahead thread).
# cpu-independent=1: x264 otherwise picks some algorithms by CPU (the 9-mode intra SATD/SA8D
# searches that decide the intra modes, and the mbtree propagation, which uses approximate
# reciprocals), so identical input planes can give another bitstream on another CPU. Measured with
# x264 core 165 (PyAV 18.1): without it, plain C (asm=0) or an SSE2-only CPU mask changed the bytes
# of every test clip (SSSE3 to AVX2 masks did not; AVX-512 and other vendors' reciprocals were not
# tested); with it, no mask changed them, for 0.05-0.2% more bytes and no speed cost. Issue 9's
# run-to-run difference on one machine was not reproduced (docs/benchmarks.md), so this is not
# shown to be its cause. scenecut=0 is kept from an earlier fix (an 8 s clip with a cut is still
# coded well: x264 intra-codes the changed macroblocks of the P-frame).
SYNC_X264_PARAMS = "scenecut=0:cpu-independent=1"
SYNC_THREADS = "1"
# RGB -> yuv420p for the encoder: one thread, and swscale's exact path. The default fast
# rgb24->yuv420p converter rounds differently in its SIMD and C versions (+-1 on 0.2-2.6% of the
# values of the test clips), so its planes depend on the CPU (C on a CPU without MMXEXT/SSE2, or
# another architecture's SIMD); ACCURATE_RND | BITEXACT makes every CPU compute what C computes.
# threads=1 because PyAV's default (0: one thread per core, + 1) starts a thread pool per frame:
# 2-7x slower at 64-224 px, and nothing left to chance.
SYNC_SWS_FLAGS = (
    av.video.reformatter.Interpolation.BILINEAR
    | av.video.reformatter.Interpolation.ACCURATE_RND
    | av.video.reformatter.Interpolation.BITEXACT
)
SYNC_SWS_THREADS = 1
FLAC_SCALE = 32768.0  # s16 full scale
BITEXACT_MUXER = {"fflags": "+bitexact"}  # no version strings or creation times: same inputs, same bytes

_ENCODER_CANDIDATES = ("libx264", "h264", "libopenh264", "mpeg4")


def configure_encoder(ctx: av.codec.CodecContext, crf: int, preset: str) -> None:
    """Set a video encoder's options as ``sync.mp4``'s: quality (CRF, or a pinned quantiser for MPEG-4),
    one thread and CPU-independent choices for libx264, FFmpeg's bitexact flag (module comments say why)."""
    if ctx.name == "libx264":
        ctx.options = {"crf": str(crf), "preset": preset, "threads": SYNC_THREADS, "x264-params": SYNC_X264_PARAMS}
    elif ctx.name == "mpeg4":
        # no CRF in MPEG-4 part 2: pin the quantiser (q 3 gives ~3.5 mean abs error at 64 px, like CRF 20).
        # A fixed qscale would need the quality on every frame, which PyAV does not expose.
        ctx.options = {"qmin": "3", "qmax": "3"}
    ctx.flags |= av.codec.context.Flags.bitexact


def _try_encoder(name: str) -> str | None:
    """The encoder's real name if it opens and encodes a tiny frame (some, e.g. V4L2, only exist on paper)."""
    try:
        codec = av.codec.Codec(name, "w")
        ctx = av.codec.CodecContext.create(codec)
        ctx.width = ctx.height = 16
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, 25)
        configure_encoder(ctx, SYNC_CRF, SYNC_PRESET)
        ctx.open()
        frame = av.VideoFrame(16, 16, "yuv420p")
        frame.pts = 0
        ctx.encode(frame)
        ctx.encode(None)
        return codec.name
    except (av.FFmpegError, ValueError, OSError):
        return None


@functools.cache
def video_encoder() -> str:
    """The first working encoder among libx264, the default H.264 encoder, OpenH264 and MPEG-4."""
    for candidate in _ENCODER_CANDIDATES:
        found = _try_encoder(candidate)
        if found is not None:
            return found
    raise RuntimeError(f"PyAV {av.__version__} has none of the video encoders {', '.join(_ENCODER_CANDIDATES)}")


def to_yuv420p(reformatter: av.video.reformatter.VideoReformatter, rgb: np.ndarray) -> av.VideoFrame:
    """The encoder's input frame: the same planes on every run and every CPU (``SYNC_SWS_FLAGS``)."""
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return reformatter.reformat(frame, format="yuv420p", interpolation=SYNC_SWS_FLAGS, threads=SYNC_SWS_THREADS)


@functools.cache
def _libm() -> ctypes.CDLL | None:
    # FE_DFL_ENV is ((const fenv_t *) -1) in glibc and musl; other C libraries spell it otherwise
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("m") or "libm.so.6"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@contextlib.contextmanager
def default_float_env() -> Iterator[None]:
    """Run the block in C's default floating-point environment (round to nearest, no flush-to-zero),
    then give the caller's environment back.

    x264's rate control computes each macroblock's QP in floating point and rounds it: the evidence
    of issue 9 (same length, a few macroblocks' QP one step apart, identical decoded frames) is what
    x264 writes for the same planes under another rounding mode, also with ``cpu-independent=1``.
    The environment is per thread and any library in the worker may change it, so the encoder never
    inherits it. No-op where the C library is unknown (not Linux).
    """
    libm = _libm()
    if libm is None:
        yield
        return
    saved = (ctypes.c_uint8 * 256)()  # fenv_t: 32 bytes on x86-64, 8 on aarch64; room to spare
    libm.fegetenv(saved)
    libm.fesetenv(ctypes.c_void_p(-1))
    try:
        yield
    finally:
        libm.fesetenv(saved)


def encode_sync_mp4(frames: np.ndarray, fps: int = 25, *, crf: int = SYNC_CRF, preset: str = SYNC_PRESET) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) as a video-only mp4 at ``fps``; H and W must be even."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T > 0, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    encoder = video_encoder()
    buf = io.BytesIO()
    with default_float_env(), av.open(buf, mode="w", format="mp4", options=BITEXACT_MUXER) as out:
        stream = out.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        configure_encoder(stream.codec_context, crf, preset)
        reformatter = av.video.reformatter.VideoReformatter()
        for i, rgb in enumerate(frames):
            frame = to_yuv420p(reformatter, rgb)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def rgb_frames(data: bytes) -> Iterator[np.ndarray]:
    """Each frame of the first video stream of ``data`` as uint8 RGB (H, W, 3), in order.

    One ``VideoReformatter`` for the whole clip: ``frame.to_ndarray(format="rgb24")`` builds a new
    swscale context per frame, which costs more than decoding a 64-pixel frame (measured on sync.mp4
    members of the tiny preset: 60 -> 14 ms per 50-frame clip; the loader's decode was 44 % of a training
    step). The conversion is the same, so the pixels are bit-identical."""
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    with av.open(io.BytesIO(data), mode="r") as container:
        for frame in container.decode(container.streams.video[0]):
            yield reformatter.reformat(frame, format="rgb24").to_ndarray()


def decode_sync_mp4(data: bytes) -> np.ndarray:
    """Decode a ``sync.mp4`` member back to uint8 RGB frames (T, H, W, 3), every frame in order."""
    frames = list(rgb_frames(data))
    if not frames:
        raise ValueError("sync.mp4 holds no video frames")
    return np.stack(frames)


def pcm16(audio: np.ndarray) -> np.ndarray:
    """A float waveform in [-1, 1] as 16-bit PCM (int16, same shape): round(x * 32768), clipped.
    The one quantisation of every audio file we write (FLAC members and outputs, the ALAC track of
    ``selva generate``'s mp4), so they hold the same samples."""
    # 1.0 itself is the one value s16 cannot hold; clipping it costs one quantisation step at most
    audio = np.clip(np.asarray(audio), -1.0, 1.0).astype(np.float64)
    return np.clip(np.round(audio * FLAC_SCALE), -32768, 32767).astype(np.int16)


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """Encode a mono float waveform in [-1, 1] as 16-bit FLAC."""
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected a non-empty mono waveform (N,), got shape {audio.shape}")
    peak = float(np.max(np.abs(audio)))
    if not np.isfinite(peak) or peak > 1.0:
        raise ValueError(f"audio must be finite and within [-1, 1] (peak {peak}); normalise before encoding")
    pcm = pcm16(audio)
    buf = io.BytesIO()
    # FFmpeg's FLAC encoder fits its LPC coefficients in double precision: pin the rounding mode too
    with default_float_env(), av.open(buf, mode="w", format="flac", options=BITEXACT_MUXER) as out:
        stream = out.add_stream("flac", rate=sample_rate, layout="mono", format="s16")
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = 0
        out.mux(stream.encode(frame))  # PyAV cuts the frame into the encoder's block size
        out.mux(stream.encode(None))
    return buf.getvalue()


_PCM_SCALES = {"s16": FLAC_SCALE, "s16p": FLAC_SCALE, "s32": 2.0**31, "s32p": 2.0**31}


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an ``audio.flac`` member to (float32 mono waveform, sample rate)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        if stream.codec_context.channels != 1:
            raise ValueError(f"audio.flac must be mono, has {stream.codec_context.channels} channels")
        chunks, scale = [], None
        for frame in container.decode(stream):
            scale = _PCM_SCALES.get(frame.format.name)
            if scale is None:
                raise ValueError(f"unexpected FLAC sample format {frame.format.name}")
            chunks.append(frame.to_ndarray().reshape(-1))
        rate = stream.codec_context.sample_rate
    if not chunks or scale is None:
        return np.zeros(0, np.float32), rate
    return (np.concatenate(chunks).astype(np.float64) / scale).astype(np.float32), rate
