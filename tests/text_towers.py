"""Random official-layout text towers built offline, for tests: a FLAN-T5 folder (T5 encoder + a
sentencepiece vocabulary trained here) and an open_clip CLIP folder, each of a chosen width."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from selva.text import CLIP_FOLDER, T5_FOLDER

CORPUS = [
    "a dog barks at the mailman",
    "rain falls on a tin roof",
    "thunder rumbles far away",
    "a car engine starts and idles",
    "birds chirp in the morning",
    "a man speaks into a microphone",
    "a woman laughs loudly",
    "a baby cries in the next room",
    "waves crash on the rocky shore",
    "a train horn blows twice",
    "people clap and cheer in a stadium",
    "a cat meows at the door",
    "wind howls through the trees",
    "a drum beats a steady rhythm",
    "a guitar plays a soft melody",
    "footsteps on a wooden floor",
    "a door creaks open slowly",
    "water drips from a faucet",
    "a helicopter flies overhead",
    "an airplane takes off from the runway",
    "a siren wails in the distance",
    "a phone rings on the desk",
    "keys jingle in a pocket",
    "a fire crackles in the fireplace",
    "a horse gallops across a field",
    "frogs croak by the pond",
    "a bell rings at noon",
    "glass shatters on the floor",
    "a motorcycle revs its engine",
    "children play in the park",
]


def train_tokenizer(tmp: Path) -> Path:
    """A tiny sentencepiece unigram model with T5's special ids (<pad>=0, </s>=1, <unk>=2)."""
    import sentencepiece as spm

    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "spiece"),
        vocab_size=120,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return tmp / "spiece.model"


def make_t5_folder(weights_dir: Path, work: Path, width: int, layers: int = 2) -> Path:
    """A ``flan-t5-base/`` folder: a random T5 encoder of ``width`` with a tokenizer trained here."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    spiece = train_tokenizer(work)
    staging = work / "tokenizer"
    staging.mkdir()
    (staging / "spiece.model").write_bytes(spiece.read_bytes())
    # transformers 5 builds the (tokenizers-backed) T5 tokenizer from spiece.model found in a folder.
    tokenizer = T5Tokenizer.from_pretrained(str(staging), local_files_only=True)
    folder = weights_dir / T5_FOLDER
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=128, num_layers=layers,
                      num_heads=4)
    T5EncoderModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "spiece.model").write_bytes(spiece.read_bytes())
    return folder


def clip_model_cfg(width: int, heads: int = 2, layers: int = 2) -> dict:
    """An open_clip config with a tiny vision tower and a text tower of ``width`` (the full 49408-token
    vocabulary: open_clip's packaged tokenizer produces those ids)."""
    return {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }


def make_clip_folder(weights_dir: Path, width: int, heads: int = 2, layers: int = 2) -> tuple[Path, nn.Module]:
    """A ``clip-vit-h-14-384/`` folder (open_clip safetensors + config) and the model it holds."""
    import open_clip
    from safetensors.torch import save_file

    cfg = clip_model_cfg(width, heads, layers)
    torch.manual_seed(0)
    model = open_clip.CLIP(
        cfg["embed_dim"],
        open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
        open_clip.CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=cfg["quick_gelu"],
    ).eval()
    folder = weights_dir / CLIP_FOLDER
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return folder, model
