"""The compact media members of a shard sample: ``sync.mp4`` and ``audio.flac`` (DESIGN §6).

``sync.mp4`` holds the decoded sync frames (25 fps, squashed to the preset's size) as H.264 in
yuv420p with no audio track. At CRF 20 the real 8 s clips take 21-41 KB at 64 px (2.4 MB raw) and
100-390 KB at 224 px (30 MB raw), with a mean absolute pixel error of ~3.5 and ~2.8 grey levels
(yuv420p's halved chroma alone is ~1.3 of that; CRF 23 would save a third of the bytes for ~0.6 more).
``audio.flac`` holds the training waveform (16 kHz mono) as 16-bit FLAC: lossless once quantised, so
the round trip differs from the float32 input by at most half a quantisation step (2**-16).

Both are produced and read in memory (bytes), and both are written bit-exact (no library version
strings), so rerunning a shard with the same libraries gives the same bytes.

Encoder: the PyAV 18.1 wheels bundle libx264, which is what ``video_encoder()`` finds here. Builds
without it fall back to another H.264 encoder that actually opens, then to MPEG-4 part 2.
"""

from __future__ import annotations

import functools
import io
from fractions import Fraction

import av
import numpy as np

SYNC_CRF = 20
SYNC_PRESET = "veryfast"
# Small frames gain nothing from x264's threads, and precompute runs one encoder per worker anyway.
# scenecut=0: with scene-cut detection on, x264 core 165 (PyAV 18.1) gave a different bitstream for
# identical input planes in 1-10% of runs at 224 px (single thread, stress test under load); with it
# off, no run differed. Shards must be byte-reproducible, and an 8 s clip with a cut is still coded
# well: x264 intra-codes the changed macroblocks of the P-frame.
SYNC_X264_PARAMS = "scenecut=0"
SYNC_THREADS = "1"
FLAC_SCALE = 32768.0  # s16 full scale
_BITEXACT = {"fflags": "+bitexact"}

_ENCODER_CANDIDATES = ("libx264", "h264", "libopenh264", "mpeg4")


def _configure_encoder(ctx: av.codec.CodecContext, crf: int, preset: str) -> None:
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
        _configure_encoder(ctx, SYNC_CRF, SYNC_PRESET)
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


def encode_sync_mp4(frames: np.ndarray, fps: int = 25, *, crf: int = SYNC_CRF, preset: str = SYNC_PRESET) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) as a video-only mp4 at ``fps``; H and W must be even."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T > 0, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    encoder = video_encoder()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options=_BITEXACT) as out:
        stream = out.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        _configure_encoder(stream.codec_context, crf, preset)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def decode_sync_mp4(data: bytes) -> np.ndarray:
    """Decode a ``sync.mp4`` member back to uint8 RGB frames (T, H, W, 3), every frame in order."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError("sync.mp4 holds no video frames")
    return np.stack(frames)


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """Encode a mono float waveform in [-1, 1] as 16-bit FLAC."""
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected a non-empty mono waveform (N,), got shape {audio.shape}")
    peak = float(np.max(np.abs(audio)))
    if not np.isfinite(peak) or peak > 1.0:
        raise ValueError(f"audio must be finite and within [-1, 1] (peak {peak}); normalise before encoding")
    # 1.0 itself is the one value s16 cannot hold; clipping it costs one quantisation step at most
    pcm = np.clip(np.round(audio.astype(np.float64) * FLAC_SCALE), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac", options=_BITEXACT) as out:
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
