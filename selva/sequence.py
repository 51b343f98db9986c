"""Sequence lengths of every stream for a clip duration (MMAudio's ``SequenceConfig``).

The generator's RoPE tables, the sync upsampling and the shard format all depend on these numbers,
so they are computed in exactly one place. 8 s at 16 kHz gives the official 250 latents, 64 CLIP
frames and 24 Synchformer segments (192 sync tokens); 10 s gives 313 / 80 / 30 (240).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SequenceConfig:
    duration: float
    sampling_rate: int = 16_000
    spectrogram_frame_rate: int = 256  # STFT hop in samples
    latent_downsample_rate: int = 2  # mel frames per latent frame
    clip_frame_rate: int = 8
    sync_frame_rate: int = 25
    sync_num_frames_per_segment: int = 16
    sync_step_size: int = 8
    sync_downsample_rate: int = 2  # frames per tubelet: 16 frames -> 8 tokens per segment

    @property
    def latent_seq_len(self) -> int:
        # ceil: the official code pads to a whole number of latents (10 s -> 312.5 -> 313)
        return int(
            math.ceil(
                self.duration * self.sampling_rate / self.spectrogram_frame_rate / self.latent_downsample_rate
            )
        )

    @property
    def num_audio_frames(self) -> int:
        """Waveform samples the latents cover (>= duration * sampling_rate)."""
        return self.latent_seq_len * self.spectrogram_frame_rate * self.latent_downsample_rate

    @property
    def clip_seq_len(self) -> int:
        return int(self.duration * self.clip_frame_rate)

    @property
    def sync_num_frames(self) -> int:
        """Frames at the sync frame rate that the clip holds (200 for 8 s)."""
        return int(self.duration * self.sync_frame_rate)

    @property
    def sync_seg_len(self) -> int:
        """Number of 16-frame Synchformer segments at stride 8."""
        num_frames = self.duration * self.sync_frame_rate
        return int((num_frames - self.sync_num_frames_per_segment) // self.sync_step_size + 1)

    @property
    def sync_tokens_per_segment(self) -> int:
        return self.sync_num_frames_per_segment // self.sync_downsample_rate

    @property
    def sync_seq_len(self) -> int:
        return self.sync_seg_len * self.sync_tokens_per_segment

    def as_dict(self) -> dict[str, int]:
        return {
            "latent_seq_len": self.latent_seq_len,
            "clip_seq_len": self.clip_seq_len,
            "sync_seg_len": self.sync_seg_len,
            "sync_seq_len": self.sync_seq_len,
            "num_audio_frames": self.num_audio_frames,
        }


def num_sync_segments(num_frames: int, frames_per_segment: int = 16, step: int = 8) -> int:
    """Segments a video of ``num_frames`` frames splits into; trailing frames are ignored."""
    if num_frames < frames_per_segment:
        raise ValueError(f"a video of {num_frames} frames is shorter than one {frames_per_segment}-frame segment")
    return (num_frames - frames_per_segment) // step + 1
