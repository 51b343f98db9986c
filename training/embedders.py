"""Audio embedders for ``selva evaluate``, each loaded from local weight files only.

An embedder turns mono waveforms at its own sample rate into per-file embeddings and/or class
logits (see :class:`Embeddings`). Nothing is fetched: a package that downloads at import or at
first use is not used, and an embedder that cannot be built here is refused with one line that
says what is missing (:class:`EmbedderUnavailable`). Which metric uses which output is decided in
:mod:`training.evaluate`; how each front-end matches av-benchmark is in docs/evaluate.md.

| name | model | rate | outputs |
|---|---|---|---|
| clap | LAION-CLAP HTSAT-base as a transformers ``ClapModel`` folder | 48 kHz | 512-d audio and text embeddings |
| passt | PaSST-S ``passt_s_swa_p16_128_ap476`` (``hear21passt`` package) | 32 kHz | 768-d embedding, 527 logits |
| vggish | VGGish of ``torch_vggish_yamnet``, no last ReLU, TF log-mel front-end | 16 kHz | 128-d per 0.96 s |
| panns, imagebind, desync | refused (see ``REFUSED``) | | |
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

PASST_SAMPLES = 320_000  # av-benchmark pads/truncates PaSST input to 10 s at 32 kHz
PASST_LOGITS = 527  # PaSST's "all" output: 527 AudioSet logits, then the 768-d embedding

#: embedders that cannot be built here, and why (one line each, shown when one is asked for)
REFUSED = {
    "panns": "PANNs CNN14 (16 kHz) is not available: its packages download at import (panns_inference fetches a "
             "label file from the network when imported) or need librosa/numba (torchlibrosa), which this project "
             "does not install; FD-PANN, KL-PANNS and ISC-PANNS cannot be computed yet (docs/evaluate.md)",
    "imagebind": "the ImageBind score needs the ImageBind-huge model, which this project does not have (no package "
                 "that installs here provides it without downloading); IB-Score cannot be computed (docs/evaluate.md)",
    "desync": "DeSync needs Synchformer's audio branch and synchronisation head; this project implements only its "
              "MotionFormer video backbone, so DeSync cannot be computed (docs/evaluate.md)",
}
AVAILABLE = ("clap", "passt", "vggish")
#: the package each embedder's model class comes from (project dependencies, checked for a partial install)
PACKAGES = {"passt": ("hear21passt", "hear21passt==0.0.26"),
            "vggish": ("torch_vggish_yamnet", "torch-vggish-yamnet==0.2.1")}
ALL_NAMES = AVAILABLE + tuple(REFUSED)


class EmbedderUnavailable(RuntimeError):
    """An embedder that cannot be built: a refused model, a missing package or a bad weights path.
    The message is one line naming the embedder."""


@dataclass(frozen=True)
class WeightsRef:
    """The weights an embedder was loaded from: a file or a folder, and its sha256 (for a folder:
    :func:`sha256_path` over every file in it)."""

    path: str
    sha256: str


@dataclass
class Embeddings:
    """What an embedder gives for N files, in their order: ``vectors`` (N, D) one embedding per file,
    ``logits`` (N, C) pre-softmax class scores, ``frames`` N arrays (F_i, D) of per-frame embeddings
    (VGGish: one per 0.96 s); None where the model has no such output."""

    vectors: np.ndarray | None = None
    logits: np.ndarray | None = None
    frames: list[np.ndarray] | None = None


class AudioEmbedder(Protocol):
    """What :mod:`training.evaluate` needs from an embedder."""

    name: str  # "clap", "passt": the key in metrics.json
    model: str  # what it is, for the report
    sample_rate: int  # Hz of the waveforms ``embed`` takes
    weights: WeightsRef
    batch_size: int

    def embed(self, waveforms: Sequence[np.ndarray]) -> Embeddings:
        """Mono float32 waveforms (T_i,) at ``sample_rate`` -> one row per waveform."""
        ...


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; for a folder, sha256 of the sorted lines ``<relative path>\\t<file
    sha256>`` of every file under it (so renaming, adding or changing a file changes the hash)."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    lines = sorted(f"{p.relative_to(path).as_posix()}\t{sha256_path(p)}\n" for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def load_embedder(name: str, weights: str | os.PathLike, device: str = "cpu", batch_size: int = 16) -> AudioEmbedder:
    """Build embedder ``name`` from ``weights`` (a folder for clap, a file otherwise).
    Raises EmbedderUnavailable (one line) for a refused name, a missing package or a bad path."""
    check_embedder(name, weights)
    if name == "clap":
        return ClapEmbedder(weights, device, batch_size)
    if name == "vggish":
        return VggishEmbedder(weights, device, batch_size)
    return PasstEmbedder(weights, device, batch_size)


def check_embedder(name: str, weights: str | os.PathLike | None) -> None:
    """Everything about embedder ``name`` that can be checked without loading it (cheap: run it for
    every requested embedder before any work). Raises EmbedderUnavailable with one line."""
    if name in REFUSED:
        raise EmbedderUnavailable(f"{name}: {REFUSED[name]}")
    if name not in AVAILABLE:
        raise EmbedderUnavailable(f"{name}: unknown embedder (known: {', '.join(ALL_NAMES)})")
    if weights is None:
        raise EmbedderUnavailable(f"{name}: no weights given (NAME=PATH, or --weights DIR holding its default name)")
    path = Path(weights)
    if name == "clap":
        if not (path / "config.json").is_file():
            raise EmbedderUnavailable(f"clap: {path} is not a transformers ClapModel folder (no config.json); "
                                      "see docs/evaluate.md for how to make one from the LAION-CLAP checkpoint")
    elif not path.is_file():
        raise EmbedderUnavailable(f"{name}: weights file {path} does not exist")
    if name in PACKAGES:
        module, requirement = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise EmbedderUnavailable(f"{name}: needs the {module} package (a dependency of selva-pipeline: "
                                      f"pip install {requirement}), which is not installed") from None


class ClapEmbedder:
    """LAION-CLAP through transformers' ``ClapModel``/``ClapProcessor`` from a local folder
    (``save_pretrained`` layout: config.json, model.safetensors, processor and tokenizer files).

    Audio: the processor's log-mel front-end at its sampling rate (48 kHz for LAION-CLAP), each
    waveform repeat-padded to the model's window (10 s), as laion_clap does for non-fusion models
    (``data_filling='repeatpad'``). Longer input is cut to the window's first samples here, so the
    result never depends on the processor's random crop. Embeddings are L2-normalised (N, D)."""

    model = "LAION-CLAP (transformers ClapModel)"

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", batch_size: int = 16) -> None:
        from transformers import ClapModel, ClapProcessor
        from transformers.utils import logging as hf_logging

        self.name = "clap"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights = WeightsRef(str(Path(folder).resolve()), sha256_path(folder))
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load: noise beside our own bars
        try:
            self.net = ClapModel.from_pretrained(folder, local_files_only=True).eval().to(self.device)
            self.processor = ClapProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:  # transformers' "can't load ... from local files" family
            raise EmbedderUnavailable(f"clap: cannot load {folder}: {' '.join(str(err).split())[:300]}") from None
        finally:
            hf_logging.enable_progress_bar()
        features = self.processor.feature_extractor
        self.sample_rate = int(features.sampling_rate)
        self.max_samples = int(features.nb_max_samples)
        # fusion models take the 4-view "fusion" input; the unfused HTSAT-base of av-benchmark one view
        self.truncation = "fusion" if self.net.config.audio_config.enable_fusion else "rand_trunc"

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> Embeddings:
        clipped = [np.asarray(w, dtype=np.float32)[: self.max_samples] for w in waveforms]
        inputs = self.processor(audio=clipped, sampling_rate=self.sample_rate, return_tensors="pt",
                                truncation=self.truncation, padding="repeatpad")
        out = self.net.get_audio_features(**{k: v.to(self.device) for k, v in inputs.items()})
        return Embeddings(vectors=_pooled(out))

    @torch.inference_mode()
    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> L2-normalised text embeddings (N, D), in the audio embeddings' space."""
        inputs = self.processor(text=list(prompts), return_tensors="pt", padding=True)
        return _pooled(self.net.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()}))


def _pooled(out: torch.Tensor | object) -> np.ndarray:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected, normalised
    embedding; older versions return the tensor itself."""
    tensor = out if isinstance(out, torch.Tensor) else out.pooler_output
    return tensor.float().cpu().numpy()


class PasstEmbedder:
    """PaSST-S from the hear21passt package, built without its download (``pretrained=False``) and
    loaded strictly from a local state dict (the release's ``passt-s-f128-p16-s10-ap.476-swa.pt``).

    Front-end as ``hear21passt.base.get_basic_model``: 128 mels, 32 kHz, window 800, hop 320,
    FFT 1024 (augmentation off in eval). Each waveform is zero-padded or truncated to 10 s
    (320,000 samples) as av-benchmark does. Output: the 527 logits and the 768-d embedding."""

    model = "PaSST-S passt_s_swa_p16_128_ap476 (hear21passt)"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 16) -> None:
        from hear21passt.models.passt import get_model
        from hear21passt.models.preprocess import AugmentMelSTFT
        from hear21passt.wrapper import PasstBasicWrapper

        self.name = "passt"
        self.sample_rate = 32_000
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights = WeightsRef(str(Path(path).resolve()), sha256_path(path))
        mel = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                             htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)
        with contextlib.redirect_stdout(io.StringIO()):  # get_model prints the whole network
            net = get_model(arch="passt_s_swa_p16_128_ap476", pretrained=False)
        state = _state_dict(path)
        if any(k.startswith("net.") for k in state):  # a saved PasstBasicWrapper: keep the network's part
            state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        _load_exactly(net, state, f"passt: {path} does not fit passt_s_swa_p16_128_ap476")
        self.net = PasstBasicWrapper(mel=mel, net=net, mode="all").eval().to(self.device)

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> Embeddings:
        batch = np.zeros((len(waveforms), PASST_SAMPLES), np.float32)
        for row, wave in zip(batch, waveforms, strict=True):
            wave = np.asarray(wave, dtype=np.float32)[:PASST_SAMPLES]
            row[: wave.size] = wave
        out = self.net(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()
        return Embeddings(vectors=out[:, PASST_LOGITS:], logits=out[:, :PASST_LOGITS])


class VggishEmbedder:
    """VGGish as av-benchmark runs it for FD-VGG: the network class of the ``torch_vggish_yamnet``
    package (the TensorFlow release's layout; it downloads only when asked for pretrained weights,
    which we never do) loaded strictly from a local file with torchvggish's key names (the
    ``vggish-10086976.pth`` av-benchmark fetches through torch.hub), **without its final ReLU** and
    without PCA/quantisation, fed by :mod:`training.vggish_frontend`. Output: one 128-d embedding
    per 0.96 s example; FD-VGG pools the frames of all files."""

    model = "VGGish (torch_vggish_yamnet network, final ReLU removed, no PCA; TF log-mel front-end)"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 16) -> None:
        from torch import nn
        from torch_vggish_yamnet.vggish.model import VGGish

        self.name = "vggish"
        self.sample_rate = 16_000
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights = WeightsRef(str(Path(path).resolve()), sha256_path(path))
        net = VGGish()
        _load_exactly(net, _state_dict(path), f"vggish: {path} does not fit the VGGish network")
        # av-benchmark drops the ReLU after the 128-d layer ("to match audioldm_eval"): raw linear outputs
        net.embeddings = nn.Sequential(*list(net.embeddings)[:-1])
        self.net = net.eval().to(self.device)

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray]) -> Embeddings:
        from training.vggish_frontend import examples

        out = []
        for wave in waveforms:
            batch = examples(wave)  # (E, 96, 64): whole 0.96 s examples only
            if batch.shape[0] == 0:  # shorter than 0.96 s: no frame, as av-benchmark
                out.append(np.zeros((0, 128), np.float32))
                continue
            out.append(self.net(torch.from_numpy(batch)[:, None].to(self.device)).float().cpu().numpy())
        return Embeddings(frames=out)


def _state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A weights file read as data only; training checkpoints nest the weights under state_dict/model."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict):
        raise EmbedderUnavailable(f"{path}: not a state dict (a {type(state).__name__})")
    return state


def _load_exactly(net: torch.nn.Module, state: dict[str, torch.Tensor], misfit: str) -> None:
    """Load every key and nothing else; otherwise EmbedderUnavailable(``misfit``: the keys concerned)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EmbedderUnavailable(f"{misfit}: missing {_few(missing)}, unexpected {_few(unexpected)}")


def _few(keys: Sequence[str], limit: int = 5) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
