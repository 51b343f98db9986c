"""Generation from an official weights folder, as the release lays it out (docs/weights.md).

The folder is made here: TextSynch, the generator, the VAE and BigVGAN get the reference directory's
deterministic rule weights (the weights the official code made the reference vectors with), the text
towers are random FLAN-T5 / CLIP folders of the official widths with tokenizers built offline. Loaded
through ``selva generate``'s path, the modules reproduce reference vectors, and the CLI generates with
one Euler step on a short span. The full-size run with the real release is a script, not a test
(docs/generate-and-evaluate.md)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from selva.presets import SMALL_16K
from selva.reference.audio_runners import official_buffers
from selva.reference.check import relative_error
from selva.reference.inputs import InputSet
from selva.reference.runners import CaseContext, get_runner
from selva.reference.weight_rule import rule_state_dict
from selva.weight_layout import OFFICIAL_FILES
from tests.media_fixtures import make_clip
from tests.text_towers import make_clip_folder, make_t5_folder
from training.generate import GenerationRequest, generate, load_model, write_outputs


@pytest.fixture(scope="module")
def release(reference_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    salt = json.loads((reference_dir / "cases.json").read_text())["weight_salt"]
    for folder in ("weights", "ext_weights"):
        (root / folder).mkdir()
    torch.save(rule_state_dict(reference_dir, "textsynch_depth1_sup5", salt), root / OFFICIAL_FILES["textsynch"].path)
    torch.save(rule_state_dict(reference_dir, "generator_small_16k", salt),
               root / OFFICIAL_FILES["selva_generator"].path)
    vae = {**rule_state_dict(reference_dir, "vae_16k", salt), **official_buffers(reference_dir, "vae.")}
    torch.save(vae, root / OFFICIAL_FILES["vae"].path)
    vocoder = {**rule_state_dict(reference_dir, "bigvgan_16k", salt), **official_buffers(reference_dir, "bigvgan.")}
    torch.save({"generator": vocoder}, root / OFFICIAL_FILES["vocoder"].path)  # the release nests it
    make_t5_folder(root, tmp_path_factory.mktemp("t5work"), SMALL_16K.textsynch.text_dim, layers=1)
    make_clip_folder(root, SMALL_16K.generator.text_dim, heads=16, layers=1)
    return root


@pytest.fixture(scope="module")
def official(release):
    """The folder loaded as ``selva generate`` loads a checkpoint."""
    return load_model(release)


def _case(reference_dir: Path, case_id: str) -> dict:
    return next(c for c in json.loads((reference_dir / "cases.json").read_text())["cases"] if c["id"] == case_id)


@pytest.mark.parametrize("case_id", ["textsynch/seg1", "generator/A_t030"])
def test_modules_loaded_from_the_release_layout_reproduce_the_reference(official, reference_dir, case_id):
    """The modules ``selva generate`` loads from the folder, fed to the reference runner in place of the
    rule weights, give the official float32 outputs within the vectors' tolerance."""
    case = _case(reference_dir, case_id)
    module = official.textsynch if case["component"] == "textsynch" else official.generator
    state = module.state_dict()
    outputs = [o for o in case["outputs"] if o["run"] == "float32"]
    ctx = CaseContext(case=case, dtype=torch.float32,
                      inputs=InputSet(reference_dir).resolve_all(case["inputs"], torch.float32),
                      params=dict(case.get("params") or {}), wanted={o["value"] for o in outputs},
                      rule_state_dict=lambda name=None: dict(state), directory=str(reference_dir))
    with torch.inference_mode():
        values = get_runner(case["component"], case["call"])(ctx)
    from safetensors.torch import load_file

    stored = load_file(str(reference_dir / case["file"]))
    for output in outputs:
        assert relative_error(values[output["value"]], stored[output["key"]]) <= output["tol"], output["key"]


def test_generate_with_the_official_layout_one_step(official, tmp_path):
    model = official
    assert model.kind == "official" and model.preset.name == "small_16k" and model.encoders.kind == "official"
    video = make_clip(tmp_path / "clip.mp4", 1.0, fps=25, size=(128, 96), audio=False)
    out = tmp_path / "out"
    # the library path the CLI runs (tests/test_generate.py runs the CLI itself; loading the official sizes
    # twice would double this test's cost)
    request = GenerationRequest(video, "a dog barking", steps=1, duration=0.64)
    write_outputs(generate(model, request), request, out, "one")
    with av.open(str(out / "one.flac")) as container:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
        assert container.streams.audio[0].sample_rate == 16_000
    assert len(samples) == round(0.64 * 16_000) and np.isfinite(samples).all() and np.abs(samples).max() > 0
    assert (out / "one.mp4").is_file() and (out / "one.png").is_file()



def test_a_44k_release_folder_generates_44k_audio(release, reference_44k_dir, tmp_path):
    """The 44.1 kHz release beside the 16 kHz one in one folder (docs/weights.md): ``preset="small_44k"``
    loads its own generator, ``v1-44.pth`` and BigVGAN v2 from NVIDIA's file (old weight-norm names, nested
    under ``generator``), reproduces the official float32 velocity, and writes duration x 44,100 samples."""
    from safetensors.torch import load_file

    from selva.presets import SMALL_44K
    from selva.weight_layout import official_files

    ref = reference_44k_dir
    salt = json.loads((ref / "cases.json").read_text())["weight_salt"]
    files = official_files("small_44k")
    root = tmp_path / "release"
    for role in ("textsynch", "flan_t5", "clip"):  # shared with the 16 kHz release
        (root / files[role].path).parent.mkdir(parents=True, exist_ok=True)
        (root / files[role].path).symlink_to(release / files[role].path)
    for role in ("selva_generator", "vae", "vocoder"):
        (root / files[role].path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(rule_state_dict(ref, "generator_small_44k", salt), root / files["selva_generator"].path)
    torch.save({**rule_state_dict(ref, "vae_44k", salt), **official_buffers(ref, "vae.", "buffers_44k.safetensors")},
               root / files["vae"].path)
    vocoder = {}
    for name, tensor in rule_state_dict(ref, "bigvgan_v2_44k", salt).items():  # NVIDIA's old names
        name = name.replace(".parametrizations.weight.original0", ".weight_g")
        vocoder[name.replace(".parametrizations.weight.original1", ".weight_v")] = tensor
    vocoder.update(official_buffers(ref, "bigvgan.", "buffers_44k.safetensors"))
    torch.save({"generator": vocoder}, root / files["vocoder"].path)

    model = load_model(root, preset="small_44k")
    assert model.preset is SMALL_44K and model.encoders.codec.sampling_rate == 44_100
    case = _case(ref, "generator/small44_A_t060_t005")
    output = next(o for o in case["outputs"] if o["run"] == "float32")
    state = model.generator.state_dict()
    ctx = CaseContext(case=case, dtype=torch.float32, inputs=InputSet(ref).resolve_all(case["inputs"], torch.float32),
                      params=dict(case["params"]), wanted={output["value"]},
                      rule_state_dict=lambda name=None: dict(state), directory=str(ref))
    with torch.inference_mode():
        velocity = get_runner("generator", "forward")(ctx)["velocity"]
    assert relative_error(velocity, load_file(str(ref / case["file"]))[output["key"]]) <= output["tol"]

    video = make_clip(tmp_path / "clip.mp4", 1.0, fps=25, size=(128, 96), audio=False)
    request = GenerationRequest(video, "a dog barking", steps=1, duration=0.64)
    write_outputs(generate(model, request), request, tmp_path / "out", "one")
    with av.open(str(tmp_path / "out" / "one.flac")) as container:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
        assert container.streams.audio[0].sample_rate == 44_100
    assert len(samples) == round(0.64 * 44_100) and np.isfinite(samples).all() and np.abs(samples).max() > 0
