"""Final export: atomic folder, safetensors + official-name .pth files, loading back, init paths."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from selva.checkpoint import read_metadata
from selva.presets import SMALL_16K, TINY
from selva.stages import set_trainable
from tests.conftest import require_shared, shared_dir
from training.export import ExportPathError, export_final, export_state, load_export, load_module_init


def tiny_modules(seed: int = 0):
    torch.manual_seed(seed)
    textsynch, generator = TINY.build_textsynch(), TINY.build_generator()
    with torch.no_grad():  # the zero-initialised parts too, so a swap of any key would show
        for p in (*textsynch.parameters(), *generator.parameters()):
            p.copy_(torch.randn_like(p))
    return textsynch, generator


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_with_ema_replacing_the_trained_weights(tmp_path):
    textsynch, generator = tiny_modules()
    trained_ids = {id(p) for p in set_trainable(textsynch, generator, "generator")}
    trained = {n for n, p in generator.named_parameters() if id(p) in trained_ids}
    ema = {n: torch.full_like(p, 0.5) for n, p in generator.named_parameters() if n in trained}
    config = {"preset": "tiny", "stage": "generator", "ema": {"sigma_rels": [0.05, 0.1]}}
    final = export_final(tmp_path, textsynch=textsynch, generator=generator, preset_name="tiny", config=config,
                         ema_weights={"generator": ema}, ema_sigma_rel=0.05)
    assert final == tmp_path / "final" and not list(tmp_path.glob("final.*"))

    loaded_textsynch, loaded_generator = load_export(final, "tiny")
    assert states_equal(loaded_textsynch.state_dict(), textsynch.state_dict())  # no EMA given: raw weights
    got = loaded_generator.state_dict()
    for name, value in generator.state_dict().items():
        assert torch.equal(got[name], ema[name] if name in trained else value), name
    assert {"latent_mean", "latent_std", "empty_string_feat"} <= set(got) - trained  # frozen: kept as they were

    assert yaml.safe_load((final / "config.yaml").read_text()) == config
    assert read_metadata(final / "generator.safetensors") == {
        "module": "Generator", "preset": "tiny", "ema": "true", "ema_sigma_rel": "0.05"}
    assert read_metadata(final / "textsynch.safetensors") == {"module": "TextSynch", "preset": "tiny", "ema": "false"}
    record = json.loads((final / "export.json").read_text())
    assert record["preset"] == "tiny" and record["modules"]["generator"]["ema"] == "true"
    assert "'tiny'" in (final / "weights" / "README.txt").read_text()

    # the official-name .pth files: plain weights-only torch files with the module's keys and shapes
    for name, module, file in [("textsynch", loaded_textsynch, "video_enc_sup_5.pth"),
                               ("generator", loaded_generator, "generator_small_16k_sup_5.pth")]:
        pth = torch.load(final / "weights" / file, map_location="cpu", weights_only=True)
        assert {k: v.shape for k, v in pth.items()} == {k: v.shape for k, v in module.state_dict().items()}
        assert states_equal(pth, module.state_dict()), name
        # and the same file serves as init for training, through the official loaders
        assert states_equal(load_module_init(name, final / "weights" / file, TINY).state_dict(), pth)


def test_a_new_export_replaces_the_old_one_only_when_complete(tmp_path):
    textsynch, generator = tiny_modules(0)
    export_final(tmp_path, textsynch=textsynch, generator=generator, preset_name="tiny", config={"run": 1})
    bad = {"generator": {"no_such_key": torch.zeros(1)}}
    with pytest.raises(ValueError, match="'no_such_key' is not a key of Generator"):
        export_final(tmp_path, textsynch=textsynch, generator=generator, preset_name="tiny", config={"run": 2},
                     ema_weights=bad)
    assert yaml.safe_load((tmp_path / "final" / "config.yaml").read_text()) == {"run": 1}
    other_textsynch, other_generator = tiny_modules(1)
    export_final(tmp_path, textsynch=other_textsynch, generator=other_generator, preset_name="tiny",
                 config={"run": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary or old folder left
    _, loaded = load_export(tmp_path / "final", TINY)
    assert states_equal(loaded.state_dict(), other_generator.state_dict())


def test_init_paths_and_the_wrong_path_error(tmp_path):
    textsynch, generator = tiny_modules()
    final = export_final(tmp_path, textsynch=textsynch, generator=generator, preset_name="tiny", config={})
    assert states_equal(load_module_init("textsynch", final, "tiny").state_dict(), textsynch.state_dict())
    from_file = load_module_init("generator", final / "generator.safetensors", "tiny")
    assert states_equal(from_file.state_dict(), generator.state_dict())

    # an official weights folder: the generator starts from MMAudio's, TextSynch from SELVA's
    official = tmp_path / "official"
    (official / "weights").mkdir(parents=True)
    torch.save(generator.state_dict(), official / "weights" / "mmaudio_small_16k.pth")
    with_extra = {**textsynch.state_dict(), "extra.dropped": torch.zeros(1)}  # the release drops such keys
    torch.save(with_extra, official / "weights" / "video_enc_sup_5.pth")
    assert states_equal(load_module_init("generator", official, TINY).state_dict(), generator.state_dict())
    assert states_equal(load_module_init("textsynch", official, TINY).state_dict(), textsynch.state_dict())
    with pytest.raises(ExportPathError) as err:
        load_export(official, TINY)  # no SELVA generator there
    assert str(err.value) == (
        f"{official}: expected an export folder (final/ with textsynch.safetensors and generator.safetensors) or an "
        "official weights folder (with weights/video_enc_sup_5.pth and weights/generator_small_16k_sup_5.pth)")

    with pytest.raises(ExportPathError) as err:
        load_module_init("generator", tmp_path / "nowhere", TINY)
    assert str(err.value) == (
        f"init.generator={tmp_path / 'nowhere'}: expected an export folder (final/ with generator.safetensors), "
        "a .safetensors from one, an official .pth, or an official weights folder with weights/mmaudio_small_16k.pth")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="holds TextSynch weights, not Generator"):
        load_module_init("generator", final / "textsynch.safetensors", TINY)
    with pytest.raises(ValueError, match="saved for preset 'tiny'; this model is preset 'small_16k'"):
        load_module_init("generator", final, SMALL_16K)


def test_small_16k_export_has_the_official_keys_and_shapes():
    """What export_final writes for small_16k (the state export_state builds; the files themselves are
    checked on tiny above): writing both formats of the real sizes would put 2.3 GB on the test disk."""
    reference = shared_dir() / "reference"
    manifests = {
        "textsynch": require_shared(reference / "textsynch_depth1_sup5.keys.json", "the official key manifests"),
        "generator": require_shared(reference / "generator_small_16k.keys.json", "the official key manifests"),
    }
    modules = {"textsynch": SMALL_16K.build_textsynch(), "generator": SMALL_16K.build_generator()}
    for kind, manifest in manifests.items():
        official = {name: tuple(shape) for name, shape, _dtype, _kind in json.loads(manifest.read_text())}
        state = export_state(modules[kind], None, f"small_16k {kind}")
        assert {k: tuple(v.shape) for k, v in state.items()} == official, kind
        assert all(v.dtype == torch.float32 for v in state.values())
