"""Strict loading with clear errors, safe reading, and our own checkpoints round-tripping."""

from __future__ import annotations

import pickle

import pytest
import torch

from selva.checkpoint import (
    CheckpointError,
    load_strict,
    load_weights,
    read_metadata,
    read_state_dict,
    save_weights,
)
from selva.presets import TINY


def test_own_checkpoint_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(0)
    gen = TINY.build_generator()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "gen.safetensors"
    save_weights(gen, path, {"preset": "tiny"})
    assert not (tmp_path / "gen.safetensors.tmp").exists()
    other = TINY.build_generator()
    load_weights(other, path, preset="tiny")
    for (name, a), (_, b) in zip(gen.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert read_metadata(path) == {"module": "Generator", "preset": "tiny"}


def test_a_checkpoint_of_another_module_or_preset_is_refused_by_its_metadata(tmp_path):
    path = tmp_path / "gen.safetensors"
    save_weights(TINY.build_generator(), path, {"preset": "tiny"})
    with pytest.raises(CheckpointError, match=r"gen\.safetensors holds Generator weights, not TextSynch weights"):
        load_weights(TINY.build_textsynch(), path)
    with pytest.raises(CheckpointError, match=r"saved for preset 'tiny'; this model is preset 'small_16k'"):
        load_weights(TINY.build_generator(), path, preset="small_16k")


def test_missing_unexpected_and_misshaped_keys_are_named_with_the_file(tmp_path):
    gen = TINY.build_generator()
    state = dict(gen.state_dict())
    path = tmp_path / "broken.safetensors"

    missing = dict(state)
    del missing["final_layer.conv.bias"]
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*missing keys: final_layer\.conv\.bias"):
        load_strict(gen, missing, str(path))

    extra = dict(state, **{"joint_blocks.9.bogus": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: joint_blocks\.9\.bogus"):
        load_strict(gen, extra, str(path))

    bad = dict(state, sync_pos_emb=torch.zeros(1, 1, 4, 64))
    with pytest.raises(CheckpointError, match=r"sync_pos_emb: file has \(1, 1, 4, 64\), model expects \(1, 1, 8, 64\)"):
        load_strict(gen, bad, str(path))


def test_a_failed_load_leaves_the_module_untouched():
    gen = TINY.build_generator()
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in gen.state_dict().items()}
    del state["empty_clip_feat"]
    with pytest.raises(CheckpointError):
        load_strict(gen, state, "test")
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_in_a_torch_file_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"weight": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_state_dict(path)
    assert not (tmp_path / "PWNED").exists()


def test_nested_checkpoint_key_and_missing_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"generator": {"w": torch.ones(2)}}, path)
    assert torch.equal(read_state_dict(path, key="generator")["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="no entry 'ema'"):
        read_state_dict(path, key="ema")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        read_state_dict(tmp_path / "nowhere.pt")


def test_equal_weights_give_equal_safetensors_bytes(tmp_path):
    """safetensors writes its header map in a per-process order; exports of equal weights differed by
    checksum until the header was put in a canonical order."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from selva.checkpoint import canonical_safetensors_header, read_metadata

    state = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    meta = {"module": "Generator", "preset": "tiny", "ema": "true", "ema_sigma_rel": "0.05"}
    digests = []
    for i, order in enumerate((list(meta), list(reversed(meta)))):
        path = tmp_path / f"w{i}.safetensors"
        save_file(dict(reversed(state.items())) if i else state, str(path), metadata={k: meta[k] for k in order})
        canonical_safetensors_header(path)
        assert read_metadata(path) == meta
        assert all(torch.equal(v, state[k]) for k, v in load_file(str(path)).items())
        assert _header_is_canonical(path)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def _header_is_canonical(path) -> bool:
    """Keys (and metadata keys) in sorted order: what makes the bytes a function of the content."""
    import json
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    return list(header) == sorted(header) and list(header.get("__metadata__", {})) == sorted(
        header.get("__metadata__", {}))


def test_exports_and_saved_weights_have_canonical_headers(tmp_path):
    """The mechanism is wired where files are written: save_weights and export_final."""
    from selva.checkpoint import save_weights
    from tests.test_export import tiny_modules
    from training.export import export_final

    textsynch, generator = tiny_modules()
    save_weights(generator, tmp_path / "g.safetensors", {"preset": "tiny", "z": "1", "a": "2"})
    final = export_final(tmp_path / "run", textsynch=textsynch, generator=generator, preset_name="tiny", config={},
                         ema_weights={"generator": {}}, ema_sigma_rel=0.05)
    for path in (tmp_path / "g.safetensors", final / "textsynch.safetensors", final / "generator.safetensors"):
        assert _header_is_canonical(path), path
