"""Reference runners for the video encoder, the generator, the sampler and the sequence lengths.

Each runner mirrors the official call sequence of ``../shared/reference/README.md`` §7.3, with our
modules built from the preset whose manifest the case names and loaded through the same strict
loader as released checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from selva.checkpoint import load_strict, skip_init
from selva.generator import FlowTrace, Generator, PreprocessedConditions
from selva.presets import LARGE_44K, MEDIUM_44K, SMALL_16K, SMALL_44K, ModelPreset
from selva.reference.runners import CaseContext, register
from selva.sampling import sample_latents
from selva.sequence import SequenceConfig
from selva.textsynch import TextSynch, TextSynchTrace

# manifest name -> builder of our module with the official sizes
_BUILDERS = {
    "textsynch_depth1_sup5": SMALL_16K.build_textsynch,
    **{f"generator_{p.name}": p.build_generator for p in (SMALL_16K, SMALL_44K, MEDIUM_44K, LARGE_44K)},
}
_GENERATOR_PRESETS: dict[str, ModelPreset] = {f"generator_{p.name}": p for p in (SMALL_16K, SMALL_44K, MEDIUM_44K,
                                                                                   LARGE_44K)}


def _build(ctx: CaseContext) -> torch.nn.Module:
    model = ctx.case.get("model")
    if model not in _BUILDERS:
        raise NotImplementedError(f"no module of ours corresponds to the official model {model!r}")
    with skip_init():  # the strict load of the rule weights sets every tensor
        module = _BUILDERS[model]()
    load_strict(module, ctx.rule_state_dict(model), f"rule weights of {model}")  # strict: every tensor set
    return module.eval()


def _sequence(params: dict[str, Any], preset: ModelPreset) -> SequenceConfig:
    """The case's sequence lengths at the preset's audio rates, checked against the lengths it states."""
    seq = preset.sequence(float(params["duration"]))
    given = params.get("seq_lengths")
    if given:
        ours = {"latent": seq.latent_seq_len, "clip": seq.clip_seq_len, "sync": seq.sync_seq_len}
        if ours != {k: int(given[k]) for k in ours}:
            raise ValueError(f"case seq_lengths {given} differ from our {preset.name} lengths at "
                             f"{seq.duration} s: {ours}")
    return seq


def _generator(ctx: CaseContext) -> Generator:
    gen = _build(ctx)
    assert isinstance(gen, Generator)
    preset = _GENERATOR_PRESETS[str(ctx.case.get("model"))]
    gen.update_seq_lengths(_sequence(ctx.params, preset))  # before the dtype cast, as the official run
    return gen.to(ctx.dtype)


def _cond_values(cond: PreprocessedConditions) -> dict[str, torch.Tensor]:
    return {f"cond.{k}": getattr(cond, k) for k in ("clip_f", "sync_f", "text_f", "clip_f_c", "text_f_c")}


@register("textsynch", "encode_video_with_sync")
def run_textsynch(ctx: CaseContext) -> dict[str, Any]:
    model = _build(ctx).to(ctx.dtype)
    assert isinstance(model, TextSynch)
    video, text, mask = ctx.inputs["video"], ctx.inputs["text"], ctx.inputs["mask"]
    text_sup, mask_sup = model.prepend_sup_text_tokens(text, mask)
    trace = TextSynchTrace()
    out = model.encode_video_with_sync(video, text_sup, mask_sup, trace=trace)
    return {
        "output": out,
        "text_with_sup": text_sup,
        "mask_with_sup": mask_sup.to(torch.uint8),
        "text_proj": trace.text_proj,
        "patch_tokens_after_norm": torch.cat(trace.patch_tokens),
        "xattn_block_out": torch.cat(trace.xattn_out),
        "spatial_agg_out": torch.cat(trace.spatial_agg),
    }


@register("generator", "forward")
def run_generator_forward(ctx: CaseContext) -> dict[str, Any]:
    gen = _generator(ctx)
    x = ctx.inputs
    cond = gen.preprocess_conditions(x["clip"], x["sync"], x["text"])
    trace = FlowTrace()
    velocity = gen.predict_flow(x["latent"], x["t"], cond, trace=trace)
    values: dict[str, Any] = {
        "velocity": velocity,
        "t_embed": trace.t_embed,
        "global_cond_mlp": trace.global_cond_mlp,
        "audio_input_proj": trace.audio_input_proj,
        **_cond_values(cond),
    }
    for i, (latent, clip, text) in enumerate(trace.joint or []):
        values.update({f"joint_blocks.{i}.latent": latent, f"joint_blocks.{i}.clip": clip,
                       f"joint_blocks.{i}.text": text})
    for i, latent in enumerate(trace.fused or []):
        values[f"fused_blocks.{i}"] = latent
    return values


@register("generator", "get_empty_conditions")
def run_generator_empty(ctx: CaseContext) -> dict[str, Any]:
    gen = _generator(ctx)
    return _cond_values(gen.get_empty_conditions(int(ctx.params["batch"])))


@register("sampler", "sample")
def run_sampler(ctx: CaseContext) -> dict[str, Any]:
    gen = _generator(ctx)
    flows: list[torch.Tensor] = []
    x1 = sample_latents(
        gen,
        ctx.inputs["x0"],
        ctx.inputs["sync"],
        ctx.inputs["text"],
        steps=int(ctx.params["steps"]),
        cfg_strength=float(ctx.params["cfg_strength"]),
        on_step=lambda i, v: flows.append(v),
    )
    return {"x1": x1, "x1_unnormalized": gen.unnormalize(x1), "step_flows": torch.stack(flows)}


@register("sequence_config", "SequenceConfig")
def run_sequence_config(ctx: CaseContext) -> dict[str, Any]:
    p = ctx.params
    seq = SequenceConfig(
        float(p["duration"]),
        sampling_rate=int(p.get("sampling_rate", 16_000)),
        spectrogram_frame_rate=int(p.get("spectrogram_frame_rate", 256)),
    )
    return seq.as_dict()
