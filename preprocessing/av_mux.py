"""Write a playable mp4 with both a video and an audio track, bit-exact, in memory.

``compact.encode_sync_mp4`` writes video-only members for shards; a benchmark composite (or any
clip a person should watch and hear) also needs its sound. The video side uses exactly the same
encoder choice and settings as ``sync.mp4`` (``compact.video_encoder()``: libx264 at CRF 20 with
CPU-independent settings and swscale's bit-exact RGB->yuv420p), so what a model decodes from
either file follows the same rules. Audio is AAC-LC in mono at the waveform's rate (16 kHz here):
what every player plays. The muxer and both encoders run with FFmpeg's ``bitexact`` flags (no
version strings, no creation times), so the same inputs give the same bytes on a rerun.

AAC is lossy: the track is for listening and for baselines that read a video's audio, never a
reference for metrics (the benchmark keeps its references as FLAC).
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

# the private helpers are the single definition of how sync.mp4 is encoded; reusing them keeps the
# composite's frames coded exactly like the training clips (same encoder, options, colour conversion)
from preprocessing.compact import (
    _BITEXACT,
    SYNC_CRF,
    SYNC_PRESET,
    _configure_encoder,
    _to_yuv420p,
    default_float_env,
    video_encoder,
)

AAC_BITRATE = 96_000  # bits/s for 16 kHz mono: transparent enough to listen to, ~100 KB per 8 s
AAC_FRAME = 1024  # samples per AAC frame; audio is handed to the encoder in such chunks


def encode_av_mp4(
    frames: np.ndarray, audio: np.ndarray, *, fps: int = 25, sample_rate: int = 16_000, crf: int = SYNC_CRF
) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) and a mono float waveform (N,) in [-1, 1] as one mp4.

    H and W must be even (yuv420p). Video frame k has pts k/fps; the audio starts at 0 s. The
    two tracks are interleaved by time, as players expect.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T > 0, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected a non-empty mono waveform (N,), got shape {audio.shape}")
    peak = float(np.max(np.abs(audio)))
    if not np.isfinite(peak) or peak > 1.0:
        raise ValueError(f"audio must be finite and within [-1, 1] (peak {peak})")

    buf = io.BytesIO()
    with default_float_env(), av.open(buf, mode="w", format="mp4", options=_BITEXACT) as out:
        vstream = out.add_stream(video_encoder(), rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        _configure_encoder(vstream.codec_context, crf, SYNC_PRESET)
        astream = out.add_stream("aac", rate=sample_rate, layout="mono")
        astream.bit_rate = AAC_BITRATE
        astream.codec_context.flags |= av.codec.context.Flags.bitexact
        reformatter = av.video.reformatter.VideoReformatter()
        next_sample = 0
        for i, rgb in enumerate(frames):
            # write the audio that starts before this frame's time first, so the tracks interleave
            while next_sample < audio.size and Fraction(next_sample, sample_rate) <= Fraction(i, fps):
                chunk = audio[next_sample : next_sample + AAC_FRAME]
                out.mux(astream.encode(_audio_frame(chunk, next_sample, sample_rate)))
                next_sample += chunk.size
            frame = _to_yuv420p(reformatter, rgb)
            frame.pts = i
            out.mux(vstream.encode(frame))
        while next_sample < audio.size:
            chunk = audio[next_sample : next_sample + AAC_FRAME]
            out.mux(astream.encode(_audio_frame(chunk, next_sample, sample_rate)))
            next_sample += chunk.size
        out.mux(vstream.encode(None))
        out.mux(astream.encode(None))
    return buf.getvalue()


def _audio_frame(chunk: np.ndarray, first: int, sample_rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = first
    frame.time_base = Fraction(1, sample_rate)
    return frame
