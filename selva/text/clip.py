"""CLIP-H per-token text states for the generator, the way the official MMAudio/SELVA code computes them.

The release loads ``apple/DFN5B-CLIP-ViT-H-14-384`` with open_clip and patches ``encode_text`` to return
every token instead of the pooled embedding: token embedding + positional embedding -> transformer (with
the causal mask) -> ``ln_final`` -> L2 normalisation per token. That gives (B, 77, 1024), where the pooled
path would give (B, 1024). We build the same computation on open_clip's own text tower.

Only the text tower is ever built: the weights file is read for the text keys alone (safetensors by name,
``.bin``/``.pt`` through a memory map), so the 630 M-parameter vision tower never occupies memory.
Weights are read as data (``weights_only=True`` or safetensors); nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selva.text.base import TextEncoder, TextFeatures, find_files, freeze

CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# The built-in open_clip config with DFN5B-CLIP-ViT-H-14-384's architecture (QuickGELU, text width 1024);
# the release takes its tokenizer from this name too.
OFFICIAL_CLIP_CONFIG = "ViT-H-14-378-quickgelu"
# Checkpoint keys that belong to the image side of a CLIP model; everything else must be text tower.
_NON_TEXT_PREFIXES = ("visual.", "logit_scale", "logit_bias")


def find_clip_weights(folder: str | Path) -> Path:
    """The open_clip weights file in ``folder``, or a FileNotFoundError naming what is expected
    (the config file is optional: a built-in open_clip name can stand in for it)."""
    hint = "a local copy of apple/DFN5B-CLIP-ViT-H-14-384"
    return find_files(folder, "CLIP", hint, {"weights": CLIP_WEIGHT_FILES})["weights"]


def load_clip_config(config: str | Path) -> dict[str, Any]:
    """An open_clip model config (``embed_dim``, ``text_cfg``, ...) from a json file or a built-in name.

    The json may be a bare model config or the hub's ``open_clip_config.json`` (``{"model_cfg": ...}``).
    """
    path = Path(config)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"open_clip config file {path} does not exist")
        raw = json.loads(path.read_text())
        model_cfg = raw.get("model_cfg", raw)
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(str(config))
        if model_cfg is None:
            raise ValueError(f"{config!r} is neither a json file nor a built-in open_clip model config")
    if "text_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise ValueError(f"open_clip config {config} has no text_cfg/embed_dim: not a CLIP model config")
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        # Those towers and tokenizers come from the Hugging Face hub; the CLIP-H of the release does not.
        raise ValueError(f"open_clip config {config} uses a Hugging Face text tower, which is not supported")
    if text_cfg.get("embed_cls"):
        raise ValueError(f"open_clip config {config} appends a CLS token (CoCa style), which is not supported")
    return model_cfg


def _read_checkpoint(path: Path, keep) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` whose names pass ``keep``, read as data, the others never loaded."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k.removeprefix("module."))}
    try:
        # mmap: the vision tower's tensors stay on disk (zip-format checkpoints, torch >= 1.6)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"CLIP weights {path} do not hold a state dict")
    return {k: v for k, v in state.items() if keep(k.removeprefix("module."))}


def build_text_tower(model_cfg: dict[str, Any]) -> nn.Module:
    """open_clip's text tower (``TextTransformer``) for ``model_cfg``, randomly initialised.

    Its module names equal the text keys of a full ``open_clip.CLIP`` state dict, which is what lets a
    whole-model checkpoint load into the text tower alone.
    """
    from open_clip.model import _build_text_tower  # the builder open_clip.CLIP itself uses

    return _build_text_tower(
        int(model_cfg["embed_dim"]), dict(model_cfg["text_cfg"]), quick_gelu=bool(model_cfg.get("quick_gelu", False))
    )


class OpenClipTextEncoder(TextEncoder):
    """Per-token, per-token-normalised states of an open_clip CLIP text tower: (B, 77, width)."""

    # The generator consumes all 77 positions (padding after <end_of_text> included, exactly as the release
    # feeds them), so every position is a real token to it: the mask is all True.
    fixed_length = True

    def __init__(self, tower: nn.Module, tokenizer) -> None:
        super().__init__()
        self.tower = freeze(tower)
        self.tokenizer = tokenizer
        self.dim = int(tower.width)
        self.max_length = int(tower.context_length)
        if int(tokenizer.context_length) != self.max_length:
            raise ValueError(
                f"CLIP tokenizer context {tokenizer.context_length} != text tower context {self.max_length}"
            )

    @classmethod
    def from_files(
        cls,
        weights: str | Path,
        config: str | Path = OFFICIAL_CLIP_CONFIG,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> OpenClipTextEncoder:
        """Load the text tower from a CLIP weights file (the whole model's or the text tower's state dict).

        ``config`` is an open_clip config json or a built-in config name (default: the official one).
        """
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"CLIP weights file {weights} does not exist")
        model_cfg = load_clip_config(config)
        tower = build_text_tower(model_cfg)
        state = _read_checkpoint(weights, keep=lambda k: not k.startswith(_NON_TEXT_PREFIXES))
        state = {k.removeprefix("module."): v for k, v in state.items()}
        expected = set(tower.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"CLIP weights {weights} do not fit the text tower of config {config}: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        tower.load_state_dict(state, strict=True)
        del state
        tower.to(device=device, dtype=dtype)

        from open_clip.tokenizer import SimpleTokenizer

        text_cfg = model_cfg["text_cfg"]
        tokenizer = SimpleTokenizer(
            context_length=int(text_cfg.get("context_length", 77)), **(text_cfg.get("tokenizer_kwargs") or {})
        )
        return cls(tower, tokenizer)

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> OpenClipTextEncoder:
        """Load from a folder laid out like the hub repository: weights + optional ``open_clip_config.json``.

        Without the json, the built-in :data:`OFFICIAL_CLIP_CONFIG` describes the architecture.
        """
        weights = find_clip_weights(folder)
        config_file = Path(folder) / CLIP_CONFIG_FILE
        config: str | Path = config_file if config_file.is_file() else OFFICIAL_CLIP_CONFIG
        return cls.from_files(weights, config, device=device, dtype=dtype)

    def modules(self) -> list[nn.Module]:
        return [self.tower]

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """open_clip token ids (B, context): <start>, BPE tokens, <end>, zero padding; truncated to fit."""
        return self.tokenizer(texts)

    def _encode(self, texts: list[str]) -> TextFeatures:
        tower = self.tower
        ids = self.token_ids(texts).to(self.device)
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(ids).to(cast) + tower.positional_embedding.to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = F.normalize(tower.ln_final(x), dim=-1)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return TextFeatures(x, mask)
