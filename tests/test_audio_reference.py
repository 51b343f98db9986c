"""MMAudio's 16 kHz audio components against the official reference vectors.

The mel converter, VAE and BigVGAN vocoder must (1) have exactly the official state-dict layout, so
released checkpoints load strictly, and (2) reproduce every mel/vae/vocoder vector in
``../shared/reference`` within the tolerance that ``cases.json`` gives for it: (2) is the
``selva check-reference`` run of tests/test_model_reference.py, which checks every component.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selva.audio import BigVGANVocoder, get_mel_converter, get_my_vae, load_bigvgan
from selva.audio.vae_blocks import MPConv1D
from selva.checkpoint import CheckpointError, load_strict
from selva.reference.audio_runners import BUFFERS_FILE, build_loaded, official_buffers
from selva.reference.inputs import InputSet
from selva.reference.runners import CaseContext
from selva.reference.weight_rule import rule_state_dict

BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "vae_16k": lambda: get_my_vae("16k"),
    "bigvgan_16k": BigVGANVocoder,
}


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = ours.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def cases(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "cases.json").read_text())


@pytest.fixture(scope="module")
def rules(reference_dir: Path, cases: dict) -> Callable[[str], dict[str, torch.Tensor]]:
    """Rule state dicts by model, built once per module (the two models hold ~280 M parameters)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(model: str) -> dict[str, torch.Tensor]:
        if model not in cache:
            cache[model] = rule_state_dict(reference_dir, model, cases["weight_salt"])
        return dict(cache[model])

    yield get
    cache.clear()


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_state_dict_is_the_official_manifest(reference_dir: Path, model: str) -> None:
    entries = json.loads((reference_dir / f"{model}.keys.json").read_text())
    module = BUILDERS[model]()
    # Same names, shapes and order as the official module before weight-norm removal.
    assert [(n, tuple(t.shape)) for n, t in module.state_dict().items()] == [
        (name, tuple(shape)) for name, shape, _dtype, _kind in entries
    ]
    params = {name for name, _ in module.named_parameters()}
    assert params == {name for name, _s, _d, kind in entries if kind == "parameter"}
    # Every official buffer is in the buffers file, under the model's prefix.
    prefix = {"vae_16k": "vae.", "bigvgan_16k": "bigvgan."}[model]
    stored = official_buffers(reference_dir, prefix)
    assert set(stored) == {name for name, _s, _d, kind in entries if kind == "buffer"}


def test_mel_tables_are_the_official_buffers(reference_dir: Path) -> None:
    tables = load_file(str(reference_dir / "mel_16k.tables.safetensors"))
    mel = get_mel_converter("16k")
    assert set(mel.state_dict()) == set(tables)
    # Bit-identical: our slaney filterbank reproduces librosa's float32 double rounding.
    assert torch.equal(mel.mel_basis, tables["mel_basis"])
    assert torch.equal(mel.hann_window, tables["hann_window"])


def test_bigvgan_filters_are_the_constructor_values(reference_dir: Path) -> None:
    # Our constructor computes the kaiser-sinc filters; they must equal the stored official ones.
    ours = {k: v for k, v in BigVGANVocoder().state_dict().items() if k.endswith(".filter")}
    stored = official_buffers(reference_dir, "bigvgan.")
    assert set(ours) == set(stored)
    worst = max(float((ours[k] - stored[k]).abs().max()) for k in ours)
    assert worst <= 1e-7


@pytest.mark.parametrize(
    ("model", "dropped"),
    [
        ("vae_16k", "decoder.up.1.upsample.conv.weight"),
        ("bigvgan_16k", "resblocks.7.convs2.1.parametrizations.weight.original0"),
    ],
)
def test_missing_key_is_named(reference_dir: Path, rules, model: str, dropped: str) -> None:
    state = rules(model)
    state.update(official_buffers(reference_dir, "vae." if model == "vae_16k" else "bigvgan."))
    del state[dropped]
    with pytest.raises(CheckpointError, match=r"missing keys: .*" + dropped.replace(".", r"\.")) as err:
        load_strict(BUILDERS[model](), state, "test checkpoint")
    assert "test checkpoint" in str(err.value)


def test_missing_buffer_is_named(reference_dir: Path, rules) -> None:
    # Buffers are part of the checkpoint layout: a VAE file without its data statistics is refused.
    state = rules("vae_16k")
    state.update(official_buffers(reference_dir, "vae."))
    del state["data_std"]
    with pytest.raises(CheckpointError, match="data_std"):
        load_strict(get_my_vae("16k"), state, "test checkpoint")


def test_bigvgan_loads_legacy_weight_norm_names(reference_dir: Path, cases: dict, rules) -> None:
    """A ``best_netG.pt`` in the old ``weight_g``/``weight_v`` naming loads and gives the same wave."""
    legacy = {}
    for name, tensor in rules("bigvgan_16k").items():
        name = name.replace(".parametrizations.weight.original0", ".weight_g")
        legacy[name.replace(".parametrizations.weight.original1", ".weight_v")] = tensor
    assert any(k.endswith(".weight_g") for k in legacy) and not any("parametrizations" in k for k in legacy)
    legacy.update(official_buffers(reference_dir, "bigvgan."))
    vocoder = load_bigvgan(legacy, source="legacy-named state dict")
    assert vocoder.weight_norm_removed
    case = next(c for c in cases["cases"] if c["component"] == "vocoder")
    output = next(o for o in case["outputs"] if o["run"] == "float32")
    mel = InputSet(reference_dir).resolve_all(case["inputs"], torch.float32)["mel"]
    with torch.inference_mode():
        wave = vocoder(mel)
    expected = load_file(str(reference_dir / case["file"]))[output["key"]]
    assert rel_l2(wave, expected) <= output["tol"]


def test_vae_refuses_raw_weights() -> None:
    # Inference with the checkpoint's raw MPConv1D weights would be silently wrong: it must raise.
    conv = MPConv1D(4, 4, 3)
    with pytest.raises(RuntimeError, match="remove_weight_norm"):
        conv(torch.zeros(1, 4, 8))
    conv.remove_weight_norm()
    # After fusion every output channel has unit norm (up to the 1e-4 of the EDM2 normalisation).
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(4), atol=1e-3)
    assert conv(torch.zeros(1, 4, 8)).shape == (1, 4, 8)


def test_runner_uses_the_buffers_file(reference_dir: Path, rules) -> None:
    # The VAE's data statistics come from the official buffers file, not from placeholders.
    case = {"id": "probe", "component": "vae", "model": "vae_16k"}
    ctx = CaseContext(
        case=case,
        dtype=torch.float32,
        inputs={},
        params={},
        wanted=set(),
        rule_state_dict=rules,
        directory=str(reference_dir),
    )
    vae = build_loaded(ctx)
    stored = load_file(str(reference_dir / BUFFERS_FILE))
    assert torch.equal(vae.data_mean, stored["vae.data_mean"])
    assert torch.equal(vae.data_std, stored["vae.data_std"])
