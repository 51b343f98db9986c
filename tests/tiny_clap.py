"""A tiny random LAION-CLAP (``transformers`` ClapModel + ClapProcessor) for tests of ``selva evaluate``.

Its tokenizer is a byte-level BPE over the lowercase letters and the space, so prompts must use only
those; its audio window is 1 s at 48 kHz (the feature extractor's numpy log-mel is the slow part).
"""

from __future__ import annotations

from pathlib import Path

import torch

CLAP_RATE = 48_000
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_tiny_clap(folder: Path) -> Path:
    """Write the model and processor in ``save_pretrained`` layout to ``folder`` (seeded: the same
    weights every time) and return it: what ``--embedders clap=FOLDER`` loads."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=64, projection_dim=16)
    audio = dict(window_size=4, num_mel_bins=16, spec_size=64, patch_size=4, patch_stride=(4, 4), num_classes=10,
                 hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                 projection_dim=16, enable_fusion=False)
    torch.manual_seed(0)
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(folder)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({c: 5 + i for i, c in enumerate(LETTERS)})
    vocab.update({"\u0120" + c: 31 + i for i, c in enumerate(LETTERS)})  # "\u0120": byte-level BPE's space
    vocab["\u0120"] = 57
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[("\u0120", c) for c in LETTERS])
    features = ClapFeatureExtractor(feature_size=16, sampling_rate=CLAP_RATE, hop_length=480, max_length_s=1,
                                    fft_window_size=1024)
    ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    return folder
