"""Text encoders: the embedded MiniLM slots, and the official FLAN-T5 / CLIP loaders on tiny local models.

The official loaders are exercised end to end on models built here: a T5 encoder with a sentencepiece
vocabulary trained in the test, and an open_clip CLIP with a tiny text tower. No test touches the network:
socket connections are refused for the whole module.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from selva.presets import SMALL_16K, TINY
from selva.text import (
    CLIP_FOLDER,
    T5_FOLDER,
    EmbeddedTextEncoder,
    OpenClipTextEncoder,
    T5TextEncoder,
    TextFeatures,
    build_text_encoders,
    fixed_projection,
)
from tests.text_towers import clip_model_cfg, make_clip_folder, make_t5_folder

PROMPTS = ["a dog barks", "rain falls on a tin roof while thunder rumbles far away"]
T5_WIDTH = 64  # = TINY.textsynch.text_dim, so the tiny folders also serve the factory
CLIP_WIDTH = 64  # = TINY.generator.text_dim


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Refuse every outbound connection: the encoders must load from local files only."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a text encoder tried to open a network connection: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


# ----------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def embedded() -> tuple[EmbeddedTextEncoder, EmbeddedTextEncoder]:
    t5, clip = build_text_encoders("embedded", TINY)
    assert isinstance(t5, EmbeddedTextEncoder) and isinstance(clip, EmbeddedTextEncoder)
    return t5, clip


def test_embedded_same_prompt_same_features_different_prompts_differ(embedded):
    t5, clip = embedded
    for enc in (t5, clip):
        a = enc.encode(["a dog barks"])
        b = enc.encode(["a dog barks"])
        c = enc.encode(["a cat meows"])
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
        assert a.tokens.shape == c.tokens.shape  # same token count, so a pure content comparison
        assert (a.tokens - c.tokens).abs().max() > 1e-3


def test_embedded_is_identical_across_separately_built_encoders(embedded):
    t5, clip = embedded
    again_t5 = EmbeddedTextEncoder("t5", TINY.textsynch.text_dim)
    again_clip = EmbeddedTextEncoder("clip", TINY.generator.text_dim)
    assert torch.equal(t5.encode(PROMPTS).tokens, again_t5.encode(PROMPTS).tokens)
    assert torch.equal(clip.encode(PROMPTS).tokens, again_clip.encode(PROMPTS).tokens)


def test_embedded_t5_slot_pads_to_longest_and_masks_the_tail(embedded):
    t5, _ = embedded
    feats = t5.encode(PROMPTS)
    assert feats.tokens.dtype == torch.float32 and feats.mask.dtype == torch.bool
    assert feats.tokens.shape[0] == 2 and feats.tokens.shape[2] == TINY.textsynch.text_dim
    short, long = feats.mask
    assert long.all()
    n = int(short.sum())
    assert 2 < n < feats.length and not short[n:].any() and short[:n].all()
    # Padding changes nothing about the real tokens of the shorter prompt.
    alone = t5.encode(PROMPTS[:1])
    assert alone.length == n
    torch.testing.assert_close(feats.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-5)


def test_embedded_t5_slot_truncates_at_max_length():
    enc = EmbeddedTextEncoder("t5", 16, length=6)
    feats = enc.encode(["a very long prompt about many different sounds happening at once"])
    assert feats.length == 6 and feats.mask.all()


def test_embedded_clip_slot_is_77_unit_norm_tokens(embedded):
    _, clip = embedded
    feats = clip.encode(PROMPTS)
    assert feats.tokens.shape == (2, TINY.generator.text_seq_len, TINY.generator.text_dim)
    assert feats.mask.all()
    torch.testing.assert_close(feats.tokens.norm(dim=-1), torch.ones(2, 77))
    assert clip.fixed_length and clip.max_length == 77


def test_empty_prompt_features(embedded):
    t5, clip = embedded
    e5, ec = t5.empty(), clip.empty()
    assert e5.batch_size == 1 and e5.mask.all() and e5.dim == TINY.textsynch.text_dim
    assert ec.tokens.shape == (1, 77, TINY.generator.text_dim)
    assert torch.equal(ec.tokens, clip.encode([""]).tokens)


def test_features_can_feed_trainable_layers(embedded):
    # encode() runs under inference_mode; its outputs must still be usable as inputs in training.
    t5, _ = embedded
    layer = nn.Linear(TINY.textsynch.text_dim, 3)
    layer(t5.encode(PROMPTS).tokens).sum().backward()
    assert layer.weight.grad is not None


def test_bad_prompts_are_named_by_index(embedded):
    t5, clip = embedded
    with pytest.raises(ValueError, match="prompt 1 is NoneType"):
        t5.encode(["a dog barks", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="prompt 2 is int"):
        clip.encode(["a", "b", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="single str"):
        t5.encode("a dog barks")  # type: ignore[arg-type]
    none = clip.encode([])
    assert none.tokens.shape == (0, 77, TINY.generator.text_dim)


def test_fixed_projection_is_deterministic_and_role_specific():
    a = fixed_projection("t5", 32)
    assert a.shape == (384, 32) and a.dtype == torch.float32
    assert torch.equal(a, fixed_projection("t5", 32))
    assert not torch.equal(a, fixed_projection("clip", 32))
    assert abs(float(a.std()) - (1 / 384) ** 0.5) < 0.1 * (1 / 384) ** 0.5


def test_embedded_official_widths():
    t5, clip = build_text_encoders("embedded", SMALL_16K)
    assert t5.encode(["a dog barks"]).dim == 768
    assert clip.encode(["a dog barks"]).tokens.shape == (1, 77, 1024)


# ----------------------------------------------------------------------------- FLAN-T5 loader


def _make_t5_folder(weights_dir: Path, work: Path) -> Path:
    return make_t5_folder(weights_dir, work, T5_WIDTH)


def _clip_model_cfg() -> dict:
    return clip_model_cfg(CLIP_WIDTH)


def _make_clip_folder(weights_dir: Path) -> tuple[Path, nn.Module]:
    return make_clip_folder(weights_dir, CLIP_WIDTH)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    _make_t5_folder(root, tmp_path_factory.mktemp("t5work"))
    _make_clip_folder(root)
    return root


@pytest.fixture(scope="module")
def clip_reference(weights_dir) -> nn.Module:
    """The full tiny CLIP the folder was saved from (rebuilt from the same seed)."""
    _, model = _make_clip_folder(Path(weights_dir.parent) / "clip-reference")
    return model


def test_t5_folder_loads_through_the_real_path(weights_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    folder = weights_dir / T5_FOLDER
    enc = T5TextEncoder.from_folder(folder)
    assert enc.dim == T5_WIDTH and enc.max_length is None  # official: the tokenizer's own cap
    feats = enc.encode(PROMPTS)
    assert feats.tokens.shape[0] == 2 and feats.tokens.shape[2] == T5_WIDTH
    assert feats.mask.dtype == torch.bool and feats.mask[1].all()
    n = int(feats.mask[0].sum())
    assert n < feats.length and not feats.mask[0, n:].any()

    # Same numbers as transformers' own encoder call on the same folder: the last hidden states.
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = tok(PROMPTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    torch.testing.assert_close(feats.tokens, expected)
    assert torch.equal(feats.mask, batch["attention_mask"].bool())


def test_t5_truncates_and_loads_from_spiece_model_alone(weights_dir, tmp_path):
    folder = weights_dir / T5_FOLDER
    short = T5TextEncoder.from_folder(folder, max_length=4).encode(PROMPTS)
    assert short.length == 4 and short.mask.all()

    only_spiece = tmp_path / "t5"
    only_spiece.mkdir()
    for name in ("config.json", "model.safetensors", "spiece.model"):
        (only_spiece / name).write_bytes((folder / name).read_bytes())
    a = T5TextEncoder.from_folder(only_spiece).encode(PROMPTS)
    b = T5TextEncoder.from_folder(folder).encode(PROMPTS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)


# ----------------------------------------------------------------------------- CLIP loader


def _release_clip_tokens(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The official release's patched ``encode_text(normalize=True)``, applied to the full CLIP model."""
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    return torch.nn.functional.normalize(model.ln_final(x), dim=-1)


def test_clip_folder_loads_text_tower_only_and_matches_the_release(weights_dir, clip_reference):
    enc = OpenClipTextEncoder.from_folder(weights_dir / CLIP_FOLDER)
    assert not any(name.startswith("visual") for name in enc.tower.state_dict())
    feats = enc.encode(PROMPTS)
    assert feats.tokens.shape == (2, 77, CLIP_WIDTH) and feats.mask.all()
    torch.testing.assert_close(feats.tokens.norm(dim=-1), torch.ones(2, 77))
    assert (feats.tokens[0] - feats.tokens[1]).abs().max() > 1e-3

    import open_clip

    ids = open_clip.get_tokenizer("ViT-H-14-378-quickgelu")(PROMPTS)  # the release's tokenizer
    assert torch.equal(enc.token_ids(PROMPTS), ids)
    with torch.no_grad():
        expected = _release_clip_tokens(clip_reference, ids)
    torch.testing.assert_close(feats.tokens, expected)


def test_clip_bin_weights_and_text_only_state_dict(weights_dir, clip_reference, tmp_path):
    expected = OpenClipTextEncoder.from_folder(weights_dir / CLIP_FOLDER).encode(PROMPTS).tokens
    folder = tmp_path / "clip"
    folder.mkdir()
    torch.save(clip_reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": _clip_model_cfg()}))
    assert torch.equal(OpenClipTextEncoder.from_folder(folder).encode(PROMPTS).tokens, expected)

    text_only = {k: v for k, v in clip_reference.state_dict().items() if not k.startswith("visual.")}
    torch.save(text_only, tmp_path / "text.pt")
    bare_cfg = tmp_path / "cfg.json"
    bare_cfg.write_text(json.dumps(_clip_model_cfg()))  # a bare model config, not the hub wrapper
    enc = OpenClipTextEncoder.from_files(tmp_path / "text.pt", bare_cfg)
    assert torch.equal(enc.encode(PROMPTS).tokens, expected)


def test_clip_weights_that_do_not_fit_the_config_are_refused(weights_dir, tmp_path):
    cfg = _clip_model_cfg()
    cfg["text_cfg"]["layers"] = 3
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit the text tower"):
        OpenClipTextEncoder.from_files(weights_dir / CLIP_FOLDER / "open_clip_model.safetensors", wrong)


# ----------------------------------------------------------------------------- factory


def test_factory_builds_official_encoders_from_the_layout(weights_dir):
    t5, clip = build_text_encoders("official", TINY, weights_dir)
    assert isinstance(t5, T5TextEncoder) and isinstance(clip, OpenClipTextEncoder)
    ft, fc = t5.encode(PROMPTS), clip.encode(PROMPTS)
    assert isinstance(ft, TextFeatures) and ft.dim == TINY.textsynch.text_dim
    assert fc.tokens.shape == (2, TINY.generator.text_seq_len, TINY.generator.text_dim)
    assert clip.empty().tokens.shape == (1, 77, CLIP_WIDTH)


def test_factory_names_the_missing_file(weights_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_encoders("official", TINY, tmp_path / "nowhere")

    # A layout with FLAN-T5 complete but no CLIP weights: the message names the file and its folder.
    partial = tmp_path / "partial"
    (partial / T5_FOLDER).mkdir(parents=True)
    for f in (weights_dir / T5_FOLDER).iterdir():
        (partial / T5_FOLDER / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{CLIP_FOLDER}.*open_clip_model.safetensors"):
        build_text_encoders("official", TINY, partial)

    (partial / T5_FOLDER / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{T5_FOLDER}.*model.safetensors"):
        build_text_encoders("official", TINY, partial)
    (partial / T5_FOLDER / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_text_encoders("official", TINY, partial)


def test_factory_checks_widths_before_loading(weights_dir):
    with pytest.raises(ValueError, match="expects T5 width 768"):
        build_text_encoders("official", SMALL_16K, weights_dir)
    with pytest.raises(ValueError, match="weights_dir"):
        build_text_encoders("official", TINY)
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        build_text_encoders("clap", TINY)


def test_clip_folder_without_config_uses_the_official_architecture(weights_dir, tmp_path):
    # Only the weights file: the built-in ViT-H-14-378-quickgelu config (width 1024) describes the tower,
    # so the tiny preset is refused by width, before any weights are read.
    (tmp_path / T5_FOLDER).symlink_to(weights_dir / T5_FOLDER)
    (tmp_path / CLIP_FOLDER).mkdir()
    (tmp_path / CLIP_FOLDER / "open_clip_model.safetensors").symlink_to(
        weights_dir / CLIP_FOLDER / "open_clip_model.safetensors"
    )
    with pytest.raises(ValueError, match="expects 77 x 64"):
        build_text_encoders("official", TINY, tmp_path)


def test_find_files_names_the_folder_and_the_missing_role(tmp_path):
    from selva.text.base import find_files

    wanted = {"config": ("config.json",), "weights": ("a.safetensors", "a.bin")}
    with pytest.raises(FileNotFoundError) as gone:
        find_files(tmp_path / "t5", "FLAN-T5", "a copy of X", wanted)
    assert str(gone.value) == (
        f"FLAN-T5 folder {tmp_path / 't5'} does not exist; it should hold a copy of X: "
        "config (config.json), weights (a.safetensors or a.bin)"
    )
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as lacking:
        find_files(tmp_path / "t5", "FLAN-T5", "a copy of X", wanted)
    folder = tmp_path / "t5"
    expected = f"FLAN-T5 folder {folder} has no weights: expected a.safetensors or a.bin (a copy of X)"
    assert str(lacking.value) == expected
    (tmp_path / "t5" / "a.bin").write_bytes(b"")
    assert find_files(tmp_path / "t5", "FLAN-T5", "x", wanted) == {
        "config": tmp_path / "t5" / "config.json", "weights": tmp_path / "t5" / "a.bin"
    }
