"""The released 44.1 kHz variants against ``../shared/reference-44k`` (made with the official code).

- Layout: our ``small_44k``, ``medium_44k``, ``large_44k`` generators, the 44.1 kHz VAE and BigVGAN v2
  have exactly the official state-dict names, shapes and order, so released files load strictly.
- Constants: mel tables, anti-alias filters, RoPE tables and the timestep frequencies are the official
  values; the sync upsampling picks the official frames in each dtype (README section 5.3).
- Numbers: ``selva check-reference`` on every case except the medium/large forwards, in both dtypes
  (tests/test_reference_44k_check.py; the whole set, medium and large included, is
  ``benchmarks/reference_44k.py``, whose results are in docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selva.audio import BigVGANVocoder, get_mel_converter, get_my_vae, load_bigvgan
from selva.audio.bigvgan import BIGVGAN_V2_44K
from selva.checkpoint import skip_init
from selva.generator import upsample_sync
from selva.presets import LARGE_44K, MEDIUM_44K, SMALL_44K, TINY_44K, get_preset
from selva.reference.audio_runners import BUFFERS_FILE_44K, official_buffers
from selva.reference.inputs import InputSet
from selva.reference.weight_rule import rule_state_dict

MODULES = {
    "generator_small_44k": SMALL_44K.build_generator,
    "generator_medium_44k": MEDIUM_44K.build_generator,
    "generator_large_44k": LARGE_44K.build_generator,
    "vae_44k": lambda: get_my_vae("44k"),
    "bigvgan_v2_44k": lambda: BigVGANVocoder(BIGVGAN_V2_44K),
}
PARAMETERS_M = {"generator_small_44k": 157.41, "generator_medium_44k": 621.81, "generator_large_44k": 1030.00,
                "vae_44k": 305.48, "bigvgan_v2_44k": 122.18}  # README sections 5.2, 5.5, 5.6


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = ours.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("model", sorted(MODULES))
def test_state_dict_is_the_official_manifest(reference_44k_dir: Path, model: str) -> None:
    entries = json.loads((reference_44k_dir / f"{model}.keys.json").read_text())
    with torch.device("meta"):  # names and shapes only: the large generator alone is 4 GB
        module = MODULES[model]()
    assert [(n, tuple(t.shape)) for n, t in module.state_dict().items()] == [
        (name, tuple(shape)) for name, shape, _dtype, _kind in entries
    ]
    assert {n for n, _ in module.named_parameters()} == {n for n, _s, _d, kind in entries if kind == "parameter"}
    assert round(sum(p.numel() for p in module.parameters()) / 1e6, 2) == PARAMETERS_M[model]
    if not model.startswith("generator"):  # every official buffer is in the buffers file
        prefix = "vae." if model == "vae_44k" else "bigvgan."
        stored = official_buffers(reference_44k_dir, prefix, BUFFERS_FILE_44K)
        assert set(stored) == {n for n, _s, _d, kind in entries if kind == "buffer"}


def test_mel_tables_are_the_official_buffers(reference_44k_dir: Path) -> None:
    tables = load_file(str(reference_44k_dir / "mel_44k.tables.safetensors"))
    mel = get_mel_converter("44k")
    assert torch.equal(mel.mel_basis, tables["mel_basis"]) and torch.equal(mel.hann_window, tables["hann_window"])
    assert mel.num_frames(44_100) == 86 and mel.num_frames(2 * 345 * 512) == 690  # floor(N / 512)


def test_bigvgan_v2_filters_are_the_constructor_values(reference_44k_dir: Path) -> None:
    ours = {k: v for k, v in BigVGANVocoder(BIGVGAN_V2_44K).state_dict().items() if k.endswith(".filter")}
    stored = official_buffers(reference_44k_dir, "bigvgan.", BUFFERS_FILE_44K)
    assert len(ours) == 218 and set(ours) == set(stored)
    assert max(float((ours[k] - stored[k]).abs().max()) for k in ours) <= 1e-7


def test_generator_tables_are_the_official_float32_values(reference_44k_dir: Path) -> None:
    """RoPE tables (clip frequencies scaled by latent/clip) and timestep frequencies at 8, 5 and 10 s."""
    tables = load_file(str(reference_44k_dir / "generator_44k.tables.safetensors"))
    with skip_init():
        gen = SMALL_44K.build_generator()
    assert torch.equal(gen.t_embed.freqs, tables["t_embed_freqs"])
    for duration in (8, 5, 10):
        gen.update_seq_lengths(SMALL_44K.sequence(float(duration)))
        assert torch.equal(gen.latent_rot, tables[f"latent_rot_{duration}s"])
        assert torch.equal(gen.clip_rot, tables[f"clip_rot_{duration}s"])


@pytest.mark.parametrize("duration", [8, 5, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sync_upsampling_picks_the_official_frames_in_each_dtype(reference_44k_dir: Path, duration, dtype) -> None:
    """At 8 s (192 -> 345 tokens) float32/bf16 pick frames 31 and 95 where float64 picks 32 and 96 on the CPU;
    each run must reproduce its own map (README section 5.3)."""
    tables = load_file(str(reference_44k_dir / "generator_44k.tables.safetensors"))
    seq = SMALL_44K.sequence(float(duration))
    frames = torch.arange(seq.sync_seq_len, dtype=dtype).view(1, -1, 1)  # token i carries the value i
    picked = upsample_sync(frames, seq.latent_seq_len).view(-1).long()
    wanted = tables[f"sync_upsample_index_{duration}s_{'float64' if dtype == torch.float64 else 'float32'}"]
    assert torch.equal(picked, wanted)
    if duration == 8:
        other = tables[f"sync_upsample_index_8s_{'float32' if dtype == torch.float64 else 'float64'}"]
        assert (picked != other).nonzero().view(-1).tolist() == [57, 172]


def test_bigvgan_v2_loads_the_released_files_old_weight_norm_names(reference_44k_dir: Path) -> None:
    """``bigvgan_generator.pt`` is written by NVIDIA's code with ``X.weight_g``/``X.weight_v``: it loads, in a
    ``{'generator': ...}`` file as released, and gives the official clamped wave."""
    cases = json.loads((reference_44k_dir / "cases.json").read_text())
    legacy = {}
    for name, tensor in rule_state_dict(reference_44k_dir, "bigvgan_v2_44k", cases["weight_salt"]).items():
        name = name.replace(".parametrizations.weight.original0", ".weight_g")
        legacy[name.replace(".parametrizations.weight.original1", ".weight_v")] = tensor
    assert sum(k.endswith(".weight_g") for k in legacy) == 116 and not any("parametrizations" in k for k in legacy)
    legacy.update(official_buffers(reference_44k_dir, "bigvgan.", BUFFERS_FILE_44K))
    case = next(c for c in cases["cases"] if c["id"] == "vocoder/44k_16frames_clamped")
    output = next(o for o in case["outputs"] if o["run"] == "float32")
    mel = InputSet(reference_44k_dir).resolve_all(case["inputs"], torch.float32)["mel"]
    vocoder = load_bigvgan(legacy, BIGVGAN_V2_44K, source="legacy-named state dict")
    assert vocoder.weight_norm_removed and vocoder.conv_post.bias is None
    with torch.inference_mode():
        wave = vocoder(mel)
    expected = load_file(str(reference_44k_dir / case["file"]))[output["key"]]
    assert wave.shape == (1, 1, 512 * 16) and rel_l2(wave, expected) <= output["tol"]
    assert float(wave.abs().max()) == 1.0  # the clamp, not a tanh, bounds the loud case


def test_presets_carry_the_official_44k_rates() -> None:
    for name in ("small_44k", "medium_44k", "large_44k", "tiny_44k"):
        preset = get_preset(name)
        assert preset.audio_mode == "44k" and preset.sampling_rate == 44_100
    seq = SMALL_44K.seq
    assert (seq.latent_seq_len, seq.clip_seq_len, seq.sync_seq_len, seq.num_audio_frames) == (345, 64, 192, 353280)
    assert TINY_44K.seq.latent_seq_len == 87 and TINY_44K.seq.num_audio_frames == 87 * 1024
    # one precomputed dataset serves the three 44.1 kHz sizes, and none of the 16 kHz presets
    assert SMALL_44K.data_signature == MEDIUM_44K.data_signature == LARGE_44K.data_signature
    assert get_preset("small_16k").data_signature != SMALL_44K.data_signature
    assert get_preset("tiny").data_signature != TINY_44K.data_signature
