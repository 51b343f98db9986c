"""The weight rule (reference README §2) against the self-checks and every ``*.rule_check.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_dir

from selva.reference.weight_rule import (
    crc32,
    iter_rule_tensors,
    manifest,
    rule_category,
    rule_state_dict,
    rule_tensor,
    uni,
)

UNI_ABC = [
    0.04263152664021619,
    0.14326365479820002,
    0.7917371460689273,
    -0.8985968214054625,
    -0.12497816257184935,
]
UNI_EXAMPLE_ABC = [
    -0.9497150241960988,
    -0.026242949925455505,
    0.002166078927881454,
    -0.0726242553284644,
    0.2437625385165585,
]


def _scalar_uni(name: str, n: int) -> list[float]:
    """The §2.1 loop with Python integers, as the obvious (slow) cross-check of the vector code."""
    mask = (1 << 64) - 1
    seed = crc32(name)
    out = []
    for i in range(n):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z = z ^ (z >> 31)
        out.append(2.0 * (float(z >> 11) * 2.0**-53) - 1.0)
    return out


def test_uni_selfcheck() -> None:
    assert uni("abc", 5).tolist() == UNI_ABC


def test_uni_salted_selfcheck() -> None:
    assert crc32("example/abc") == 1607773944
    assert uni("example/" + "abc", 5).tolist() == UNI_EXAMPLE_ABC


def test_uni_matches_scalar_loop_across_chunks() -> None:
    from selva.reference import weight_rule

    n = weight_rule.CHUNK + 37  # spans a chunk boundary, so the threaded path is exercised
    fast = uni("blocks.0.attn.qkv.weight", n)
    assert fast.dtype == np.float64
    assert fast[:64].tolist() == _scalar_uni("blocks.0.attn.qkv.weight", 64)
    # The full scalar loop is too slow for a million values: spot-check indices around the chunk
    # boundary with the same formula evaluated at a single index.
    mask = (1 << 64) - 1
    seed = crc32("blocks.0.attn.qkv.weight")
    for i in [0, 1, 2, weight_rule.CHUNK - 1, weight_rule.CHUNK, n - 1]:
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z = z ^ (z >> 31)
        assert fast[i] == 2.0 * (float(z >> 11) * 2.0**-53) - 1.0
    assert fast.min() >= -1.0 and fast.max() < 1.0


def test_uni_edge_lengths() -> None:
    assert uni("x", 0).shape == (0,)
    assert uni("x", 1).tolist() == _scalar_uni("x", 1)
    with pytest.raises(ValueError):
        uni("x", -1)


@pytest.mark.parametrize(
    ("name", "shape", "category"),
    [
        ("blocks.0.norm1.weight", (768,), "gain"),
        ("joint_blocks.0.latent_block.attn.q_norm.weight", (64,), "gain"),
        ("latent_std", (1, 1, 20), "gain"),
        ("blocks.0.norm1.bias", (768,), "bias"),
        ("conv_pre.parametrizations.weight.original0", (512, 1, 1), "wn_gain"),
        ("conv_pre.weight_g", (512, 1, 1), "wn_gain"),
        ("conv_pre.parametrizations.weight.original1", (512, 80, 7), "fanin"),
        ("conv_pre.weight_v", (512, 80, 7), "fanin"),
        ("spatial_attn_agg.self_attn.in_proj_weight", (2304, 768), "fanin"),
        ("spatial_attn_agg.self_attn.in_proj_bias", (2304,), "bias"),
        ("blocks.0.norm1.weight", (4, 768), "fanin"),  # not 1-D: no gain
        ("head.weight", (768,), "other"),  # 1-D weight, no 'norm' in its module name
        ("normalizer.linear.weight", (8, 8), "fanin"),  # 'norm' only matters for 1-D weights
        ("encoder.learnable_gain", (), "other"),
        ("resblocks.0.activations.0.act.alpha", (768,), "other"),
        ("sup_text_feat", (5, 768), "other"),
    ],
)
def test_rule_category(name: str, shape: tuple[int, ...], category: str) -> None:
    assert rule_category(name, shape) == category


def test_rule_tensor_formulas() -> None:
    v = uni("w.weight", 6 * 4)
    got = rule_tensor("w.weight", (6, 4))
    assert got.dtype == torch.float32 and got.shape == (6, 4)
    assert torch.equal(got.reshape(-1), torch.from_numpy((v * math.sqrt(3.0 / 4)).astype(np.float32)))
    # ConvTranspose1d layout (in, out, k): fan_in is n // shape[0] = out * k, as the spec says.
    t = rule_tensor("up.weight", (3, 5, 2))
    expect = (uni("up.weight", 30) * math.sqrt(3.0 / 10)).astype(np.float32)
    assert torch.equal(t.reshape(-1), torch.from_numpy(expect))
    g = rule_tensor("x.parametrizations.weight.original0", (3, 1, 1))
    vg = uni("x.parametrizations.weight.original0", 3)
    assert torch.equal(g.reshape(-1), torch.from_numpy((0.7 * (1.0 + 0.1 * vg)).astype(np.float32)))
    s = rule_tensor("encoder.learnable_gain", ())
    assert s.shape == () and float(s) == float(np.float32(0.5 * uni("encoder.learnable_gain", 1)[0]))


def test_salt_changes_only_the_hashed_string() -> None:
    salted = rule_tensor("blocks.0.norm1.weight", (8,), salt="dir7/")
    v = uni("dir7/blocks.0.norm1.weight", 8)
    # Still the 'gain' category of the bare name, although "dir7/..." would not change that either.
    assert torch.equal(salted, torch.from_numpy((1.0 + 0.1 * v).astype(np.float32)))
    assert not torch.equal(salted, rule_tensor("blocks.0.norm1.weight", (8,)))


def _models() -> list[str]:
    ref = shared_dir() / "reference"
    return sorted(p.name.removesuffix(".keys.json") for p in ref.glob("*.keys.json"))


@pytest.mark.parametrize("model", _models() or ["<no reference directory>"])
def test_rule_matches_rule_check(reference_dir: Path, model: str) -> None:
    """The proof that our rule is the official one: category, float64 sum and first 4 values."""
    check_path = reference_dir / f"{model}.rule_check.json"
    assert check_path.is_file(), f"{check_path} missing"
    expected = json.loads(check_path.read_text())
    shapes = {name: shape for name, shape, _, _ in manifest(reference_dir, model)}
    got_names = []
    for (name, tensor), ref in zip(iter_rule_tensors(reference_dir, model, ""), expected, strict=True):
        got_names.append(name)
        assert name == ref["name"]
        assert rule_category(name, shapes[name]) == ref["rule"], name
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == shapes[name]
        flat = tensor.reshape(-1).numpy()
        assert [float(x) for x in flat[:4]] == ref["first4"], name
        as64 = flat.astype(np.float64)
        total = float(as64.sum())
        assert abs(total - ref["sum"]) <= 1e-12 * float(np.abs(as64).sum()) + 1e-15, (name, total, ref["sum"])
    assert got_names == [e["name"] for e in expected]


def test_manifest_and_state_dict_exclude_buffers(tmp_path: Path) -> None:
    keys = [
        ["a.weight", [4, 3], "float32", "parameter"],
        ["a.bias", [4], "float32", "parameter"],
        ["data_mean", [1, 4, 1], "float32", "buffer"],
        ["gain", [], "float32", "parameter"],
    ]
    (tmp_path / "toy.keys.json").write_text(json.dumps(keys))
    entries = manifest(tmp_path, "toy")
    assert entries[2] == ("data_mean", (1, 4, 1), "float32", "buffer")
    sd = rule_state_dict(tmp_path, "toy", salt="s/")
    assert list(sd) == ["a.weight", "a.bias", "gain"]
    assert sd["gain"].shape == ()
    assert torch.equal(sd["a.bias"], rule_tensor("a.bias", (4,), salt="s/"))
    with pytest.raises(FileNotFoundError):
        manifest(tmp_path, "missing")
