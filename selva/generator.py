"""The MMAudio flow-matching generator that SELVA fine-tunes (official 16 and 44.1 kHz sizes, and tiny ones).

Streams: audio latents (B, N, latent_dim), CLIP visual tokens (B, Nc, clip_dim), sync tokens from
TextSynch (B, Ns, sync_dim) and CLIP text tokens (B, 77, text_dim). SELVA never feeds real CLIP
visual features: it always passes the learned empty CLIP token sequence (``empty_clip_sequence``).

Official quirks kept on purpose (the released weights were trained with them):
- ``latent_mean``/``latent_std``/``empty_string_feat`` are frozen *parameters*, not buffers;
- the final layer is modulated by ``global_c``, not the frame-aligned ``extended_c``;
- RoPE tables and timestep frequencies are float32 values even in a float64 model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selva.generator_blocks import FinalBlock, JointBlock, MMDiTSingleBlock, TimestepEmbedder
from selva.layers import ChannelLastConv1d, ConvSwiGLU, SwiGLU, rope_rotations
from selva.sequence import SequenceConfig


@dataclass(frozen=True)
class GeneratorConfig:
    latent_dim: int = 20
    clip_dim: int = 1024
    sync_dim: int = 768
    text_dim: int = 1024
    hidden_dim: int = 448
    num_heads: int = 7
    depth: int = 12  # joint + fused blocks
    fused_depth: int = 8
    mlp_ratio: float = 4.0
    text_seq_len: int = 77
    sync_tokens_per_segment: int = 8
    duration: float = 8.0
    # the audio the latents stand for: 16 kHz with a 256-sample mel hop, or 44.1 kHz with 512
    sampling_rate: int = 16_000
    spectrogram_frame_rate: int = 256

    @property
    def sequence(self) -> SequenceConfig:
        """Sequence lengths at this config's duration and audio rates."""
        return self.sequence_for(self.duration)

    def sequence_for(self, duration: float) -> SequenceConfig:
        """Sequence lengths of a ``duration``-second clip at this config's audio rates."""
        return SequenceConfig(duration, sampling_rate=self.sampling_rate,
                              spectrogram_frame_rate=self.spectrogram_frame_rate)

    @property
    def joint_depth(self) -> int:
        return self.depth - self.fused_depth


@dataclass
class PreprocessedConditions:
    clip_f: torch.Tensor  # (B, Nc, D)
    sync_f: torch.Tensor  # (B, N, D), upsampled to the latent rate
    text_f: torch.Tensor  # (B, 77, D)
    clip_f_c: torch.Tensor  # (B, D)
    text_f_c: torch.Tensor  # (B, D)


@dataclass
class FlowTrace:
    """Intermediates of one ``predict_flow`` call (for reference checks and debugging)."""

    t_embed: torch.Tensor | None = None
    global_cond_mlp: torch.Tensor | None = None
    audio_input_proj: torch.Tensor | None = None
    joint: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    fused: list[torch.Tensor] | None = None


def upsample_sync(sync_f: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Sync tokens (B, Ns, D) -> one per latent frame (B, N, D) by nearest-exact interpolation (official).

    8 s: 192 -> 250 at 16 kHz, 192 -> 345 at 44.1 kHz. Kept as ``F.interpolate`` on purpose: for 192 -> 345
    the source index floor((i + 0.5) * 192 / 345) is exactly an integer at i = 57 and 172, which PyTorch's
    float32 arithmetic (and every dtype on CUDA) lands just below, picking frames 31/95, while CPU float64
    picks 32/96. The official vectors hold both behaviours (reference-44k README section 5.3), and only
    the same call reproduces both.
    """
    return F.interpolate(sync_f.transpose(1, 2), size=num_latents, mode="nearest-exact").transpose(1, 2)


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        if cfg.joint_depth < 1:
            raise ValueError("the generator needs at least one joint block (depth > fused_depth)")

        self.audio_input_proj = nn.Sequential(
            ChannelLastConv1d(cfg.latent_dim, d, kernel_size=7, padding=3),
            nn.SELU(),
            ConvSwiGLU(d, d * 4, kernel_size=7, padding=3),
        )
        # No activation between the Linear and the ConvMLP here, nor in text_input_proj (v1 generator).
        self.clip_input_proj = nn.Sequential(nn.Linear(cfg.clip_dim, d), ConvSwiGLU(d, d * 4, kernel_size=3, padding=1))
        self.sync_input_proj = nn.Sequential(
            ChannelLastConv1d(cfg.sync_dim, d, kernel_size=7, padding=3),
            nn.SELU(),
            ConvSwiGLU(d, d * 4, kernel_size=3, padding=1),
        )
        self.text_input_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), SwiGLU(d, d * 4))
        self.clip_cond_proj = nn.Linear(d, d)
        self.text_cond_proj = nn.Linear(d, d)
        self.global_cond_mlp = SwiGLU(d, d * 4)
        # one learned position per token of a sync segment
        self.sync_pos_emb = nn.Parameter(torch.zeros(1, 1, cfg.sync_tokens_per_segment, cfg.sync_dim))
        self.final_layer = FinalBlock(d, cfg.latent_dim)
        self.t_embed = TimestepEmbedder(d, frequency_embedding_size=256, max_period=10000)
        self.joint_blocks = nn.ModuleList(
            JointBlock(d, cfg.num_heads, cfg.mlp_ratio, pre_only=(i == cfg.joint_depth - 1))
            for i in range(cfg.joint_depth)
        )
        self.fused_blocks = nn.ModuleList(
            MMDiTSingleBlock(d, cfg.num_heads, cfg.mlp_ratio, kernel_size=3, padding=1)
            for _ in range(cfg.fused_depth)
        )
        # Frozen statistics of the latent space and the empty text; set from a checkpoint or the codec.
        self.latent_mean = nn.Parameter(torch.zeros(1, 1, cfg.latent_dim), requires_grad=False)
        self.latent_std = nn.Parameter(torch.ones(1, 1, cfg.latent_dim), requires_grad=False)
        self.empty_string_feat = nn.Parameter(torch.zeros(cfg.text_seq_len, cfg.text_dim), requires_grad=False)
        self.empty_clip_feat = nn.Parameter(torch.zeros(1, cfg.clip_dim))
        self.empty_sync_feat = nn.Parameter(torch.zeros(1, cfg.sync_dim))
        self.initialize_weights()
        self.update_seq_lengths(cfg.sequence)

    # -- set-up -----------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Official initialisation: xavier Linear, zeroed adaLN and output, N(0, 0.02) timestep MLP."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        blocks = [b for j in self.joint_blocks for b in (j.latent_block, j.clip_block, j.text_block)]
        for block in [*blocks, *self.fused_blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.conv.weight, self.final_layer.conv.bias, self.sync_pos_emb):
            nn.init.zeros_(p)
        nn.init.zeros_(self.empty_clip_feat)
        nn.init.zeros_(self.empty_sync_feat)

    def update_seq_lengths(self, seq: SequenceConfig) -> None:
        """Configure for a clip duration: sequence lengths and float32 RoPE tables."""
        self.seq = seq
        head_dim = self.cfg.hidden_dim // self.cfg.num_heads
        device = self.sync_pos_emb.device
        # float32 tables, held in float64 by a float64 model (as after the official .double()); a
        # bf16 model keeps them in float32 so the rotation stays exact enough.
        dtype = torch.float64 if self.sync_pos_emb.dtype == torch.float64 else torch.float32
        latent_rot = rope_rotations(seq.latent_seq_len, head_dim)
        # CLIP frames are spread over the latent timeline: scale their RoPE frequencies by N / Nc.
        clip_rot = rope_rotations(seq.clip_seq_len, head_dim, freq_scaling=seq.latent_seq_len / seq.clip_seq_len)
        self.register_buffer("latent_rot", latent_rot.to(device, dtype), persistent=False)
        self.register_buffer("clip_rot", clip_rot.to(device, dtype), persistent=False)

    # -- latent normalisation ---------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.latent_mean) / self.latent_std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std + self.latent_mean

    # -- conditions -------------------------------------------------------------------------------
    def preprocess_conditions(
        self, clip_f: torch.Tensor, sync_f: torch.Tensor, text_f: torch.Tensor
    ) -> PreprocessedConditions:
        seq = self.seq
        for name, x, n in (("clip", clip_f, seq.clip_seq_len), ("sync", sync_f, seq.sync_seq_len),
                           ("text", text_f, self.cfg.text_seq_len)):
            if x.shape[1] != n:
                raise ValueError(
                    f"{name} features have {x.shape[1]} tokens; the generator is set for {n} "
                    f"({seq.duration} s). Call update_seq_lengths for another duration."
                )
        bs = clip_f.shape[0]
        per_seg = self.cfg.sync_tokens_per_segment
        sync_f = sync_f.view(bs, seq.sync_seq_len // per_seg, per_seg, -1) + self.sync_pos_emb
        sync_f = sync_f.flatten(1, 2)

        clip_f = self.clip_input_proj(clip_f)
        sync_f = self.sync_input_proj(sync_f)
        text_f = self.text_input_proj(text_f)

        sync_f = upsample_sync(sync_f, seq.latent_seq_len)

        clip_f_c = self.clip_cond_proj(clip_f.mean(dim=1))
        text_f_c = self.text_cond_proj(text_f.mean(dim=1))
        return PreprocessedConditions(clip_f, sync_f, text_f, clip_f_c, text_f_c)

    def empty_clip_sequence(self, bs: int) -> torch.Tensor:
        return self.empty_clip_feat.unsqueeze(0).expand(bs, self.seq.clip_seq_len, -1)

    def empty_sync_sequence(self, bs: int) -> torch.Tensor:
        return self.empty_sync_feat.unsqueeze(0).expand(bs, self.seq.sync_seq_len, -1)

    def empty_string_sequence(self, bs: int) -> torch.Tensor:
        return self.empty_string_feat.unsqueeze(0).expand(bs, -1, -1)

    def get_empty_conditions(self, bs: int, negative_text: torch.Tensor | None = None) -> PreprocessedConditions:
        """Conditions of the unconditional branch; computed once and expanded to the batch."""
        text = negative_text if negative_text is not None else self.empty_string_sequence(1)
        cond = self.preprocess_conditions(self.empty_clip_sequence(1), self.empty_sync_sequence(1), text)
        cond.clip_f = cond.clip_f.expand(bs, -1, -1)
        cond.sync_f = cond.sync_f.expand(bs, -1, -1)
        cond.clip_f_c = cond.clip_f_c.expand(bs, -1)
        if negative_text is None:
            cond.text_f = cond.text_f.expand(bs, -1, -1)
            cond.text_f_c = cond.text_f_c.expand(bs, -1)
        return cond

    # -- flow -------------------------------------------------------------------------------------
    def predict_flow(
        self, latent: torch.Tensor, t: torch.Tensor, cond: PreprocessedConditions, trace: FlowTrace | None = None
    ) -> torch.Tensor:
        if latent.shape[1] != self.seq.latent_seq_len:
            raise ValueError(f"latent has {latent.shape[1]} frames; the generator is set for {self.seq.latent_seq_len}")
        clip_f, text_f = cond.clip_f, cond.text_f
        latent = self.audio_input_proj(latent)
        global_mlp = self.global_cond_mlp(cond.clip_f_c + cond.text_f_c)
        t_emb = self.t_embed(t)
        global_c = t_emb.unsqueeze(1) + global_mlp.unsqueeze(1)  # (B, 1, D)
        extended_c = global_c + cond.sync_f  # (B, N, D): frame-aligned modulation
        if trace is not None:
            trace.t_embed, trace.global_cond_mlp, trace.audio_input_proj = t_emb, global_mlp, latent
            trace.joint, trace.fused = [], []
        for block in self.joint_blocks:
            latent, clip_f, text_f = block(latent, clip_f, text_f, global_c, extended_c, self.latent_rot, self.clip_rot)
            if trace is not None:
                trace.joint.append((latent, clip_f, text_f))
        for block in self.fused_blocks:
            latent = block(latent, extended_c, self.latent_rot)
            if trace is not None:
                trace.fused.append(latent)
        return self.final_layer(latent, global_c)  # global_c, not extended_c: official behaviour

    def forward(
        self, latent: torch.Tensor, clip_f: torch.Tensor, sync_f: torch.Tensor, text_f: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return self.predict_flow(latent, t, self.preprocess_conditions(clip_f, sync_f, text_f))

    def cfg_flow(
        self,
        latent: torch.Tensor,
        t: torch.Tensor,
        cond: PreprocessedConditions,
        empty: PreprocessedConditions,
        cfg_strength: float,
    ) -> torch.Tensor:
        """Classifier-free guidance: s * v_cond + (1 - s) * v_uncond; off when s < 1."""
        if cfg_strength < 1.0:
            return self.predict_flow(latent, t, cond)
        return cfg_strength * self.predict_flow(latent, t, cond) + (1 - cfg_strength) * self.predict_flow(
            latent, t, empty
        )
