"""Reference runners for the audio components: mel converter, VAE and BigVGAN vocoder (README §7.3).

Each runner follows the official load path: build our module, load the directory's rule weights
(parameters) together with the official buffers (``buffers_vae_bigvgan.safetensors`` at 16 kHz,
``buffers_44k.safetensors`` at 44.1 kHz, keys prefixed ``vae.`` / ``bigvgan.``) through the strict
loader, cast to the run dtype, fuse the weight norm, then call. The vocoder is cast *before* its weight
norm is fused, so a float64 run fuses in float64 as the official float64 reference did; the VAE always
fuses in float32 (official behaviour).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selva.audio.bigvgan import BIGVGAN_V2_44K, BigVGANVocoder, canonical_state_dict
from selva.audio.mel import get_mel_converter
from selva.audio.vae import get_my_vae
from selva.checkpoint import load_strict
from selva.reference.runners import CaseContext, register

BUFFERS_FILE = "buffers_vae_bigvgan.safetensors"  # 16 kHz set
BUFFERS_FILE_44K = "buffers_44k.safetensors"  # 44.1 kHz set (reference-44k README section 1)
# official model name -> (our builder, its buffers file, prefix of its buffers there)
_MODELS: dict[str, tuple[Callable[[], torch.nn.Module], str, str]] = {
    "vae_16k": (lambda: get_my_vae("16k"), BUFFERS_FILE, "vae."),
    "bigvgan_16k": (BigVGANVocoder, BUFFERS_FILE, "bigvgan."),
    "vae_44k": (lambda: get_my_vae("44k"), BUFFERS_FILE_44K, "vae."),
    "bigvgan_v2_44k": (lambda: BigVGANVocoder(BIGVGAN_V2_44K), BUFFERS_FILE_44K, "bigvgan."),
}
_MEL_MODES = {"mel_16k": "16k", "mel_44k": "44k"}


def official_buffers(directory: str | Path, prefix: str, filename: str = BUFFERS_FILE) -> dict[str, torch.Tensor]:
    """The persistent buffers stored under ``prefix`` in the directory's buffers file, unprefixed."""
    from safetensors.torch import load_file

    path = Path(directory) / filename
    if not path.is_file():
        raise FileNotFoundError(f"official buffers not found: {path}")
    return {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


def build_loaded(ctx: CaseContext) -> torch.nn.Module:
    """Our module for the case's model, loaded (float32) with rule parameters + official buffers."""
    model = str(ctx.case.get("model"))
    if model not in _MODELS:
        raise NotImplementedError(f"no audio module of ours corresponds to the official model {model!r}")
    builder, filename, prefix = _MODELS[model]
    module = builder()
    state = dict(ctx.rule_state_dict(model))
    state.update(official_buffers(ctx.directory, prefix, filename))
    if isinstance(module, BigVGANVocoder):
        state = canonical_state_dict(state)
    load_strict(module, state, f"rule weights of {model} + {filename}")
    return module


def _dtype(ctx: CaseContext) -> torch.dtype:
    if ctx.dtype is None:
        raise ValueError(f"case {ctx.case.get('id')} needs a float run dtype")
    return ctx.dtype


@register("mel", "forward")
def run_mel(ctx: CaseContext) -> dict[str, Any]:
    # No weights: the buffers are our own filterbank and window, bit-identical to the official
    # float32 tables; .to(float64) casts those float32 values up, as the float64 reference did.
    model = str(ctx.case.get("model", "mel_16k"))
    if model not in _MEL_MODES:
        raise NotImplementedError(f"no mel converter of ours corresponds to the official model {model!r}")
    mel = get_mel_converter(_MEL_MODES[model]).to(_dtype(ctx)).eval()
    return {"mel": mel(ctx.inputs["wave"].to(_dtype(ctx)))}


def _vae(ctx: CaseContext) -> torch.nn.Module:
    vae = build_loaded(ctx).to(_dtype(ctx))
    return vae.remove_weight_norm().eval()


@register("vae", "encode")
def run_vae_encode(ctx: CaseContext) -> dict[str, Any]:
    vae = _vae(ctx)
    posterior = vae.encode(ctx.inputs["mel"].to(_dtype(ctx)))
    return {"mean": posterior.mean, "std": posterior.std}


@register("vae", "decode")
def run_vae_decode(ctx: CaseContext) -> dict[str, Any]:
    vae = _vae(ctx)
    return {"mel": vae.decode(ctx.inputs["z"].to(_dtype(ctx)))}


@register("vocoder", "forward")
def run_vocoder(ctx: CaseContext) -> dict[str, Any]:
    vocoder = build_loaded(ctx).to(_dtype(ctx))  # cast first: the fusion happens in the run dtype
    vocoder.remove_weight_norm().eval()
    return {"wave": vocoder(ctx.inputs["mel"].to(_dtype(ctx)))}
