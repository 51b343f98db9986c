"""FLAN-T5-base encoder states for TextSynch, loaded from a local transformers folder.

The folder is a plain copy of the ``google/flan-t5-base`` repository (``config.json``, the weights, and
``tokenizer.json`` and/or ``spiece.model``). Only the encoder half is built: ``T5EncoderModel`` skips
the decoder weights of the full checkpoint. Nothing here can reach a hub: the folder must exist, and
every ``from_pretrained`` call is made with ``local_files_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from selva.text.base import TextEncoder, TextFeatures, find_files, freeze

T5_CONFIG_FILE = "config.json"
T5_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")

# The official release truncates T5 prompts at the tokenizer's model_max_length (512 for flan-t5-base), so
# FLAN-T5 defaults to max_length=None (that cap) to match it. The embedded encoder caps at 77 tokens: it
# bounds what one prompt costs in a shard and in TextSynch's cross-attention and equals CLIP's context.
# The two agree on every prompt shorter than 77 T5 tokens (about 60 English words).
DEFAULT_T5_MAX_LENGTH = 77


def check_t5_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, or a FileNotFoundError naming the folder and the file it lacks."""
    wanted = {"config": (T5_CONFIG_FILE,), "weights": T5_WEIGHT_FILES, "tokenizer": T5_TOKENIZER_FILES}
    find_files(folder, "FLAN-T5", "a local copy of google/flan-t5-base", wanted)
    return Path(folder)


def t5_width(folder: str | Path) -> int:
    """The encoder width (``d_model``) from ``config.json``, read without loading any weights."""
    config = json.loads((check_t5_folder(folder) / T5_CONFIG_FILE).read_text())
    if "d_model" not in config:
        raise ValueError(f"{Path(folder) / T5_CONFIG_FILE} has no d_model: not a T5 config")
    return int(config["d_model"])


class T5TextEncoder(TextEncoder):
    """Last hidden states of a T5 encoder, padded to the longest prompt, with the tokenizer's mask."""

    fixed_length = False

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None) -> None:
        super().__init__()
        if max_length is not None and max_length < 2:
            raise ValueError(f"T5 max_length must be at least 2 (one token + </s>), got {max_length}")
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.dim = int(model.config.d_model)
        self.max_length = max_length

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        max_length: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> T5TextEncoder:
        """Load the encoder and its tokenizer from one local folder (see :func:`check_t5_folder`).

        ``dtype`` defaults to float32 because transformers 5 otherwise keeps the checkpoint's dtype, and
        T5 is known to overflow in float16; bfloat16 is the safe reduced precision.
        """
        folder = check_t5_folder(folder)
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        return cls(model.to(device), tokenizer, max_length=max_length)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def _encode(self, texts: list[str]) -> TextFeatures:
        batch = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,  # with max_length=None: the tokenizer's model_max_length, as the release does
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return TextFeatures(states, attention_mask.bool())
