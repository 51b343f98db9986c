"""Validation during training: a fixed-noise val loss (overall and by flow time t) and a few generated clips.

The trainer calls :meth:`Validator.run` every ``validation.every`` steps and at the end, on every rank
(the loss is a collective). What it computes:

* **Val loss.** The first ``validation.batches`` batches *per rank* (capped at one epoch) of the val
  split, read by a loader of its own (``world_size``/``rank`` as training, so ranks share the work;
  seed ``cfg.seed``, epoch 0, no shuffle buffer, no mixing: ``MixConfig(prob=0)`` only normalises the
  video) — the same batches on every call. The draws (latent posterior ε, noise, t) come from
  :func:`training.objective.draw` at :data:`LOSS_MICRO_STEP` (never a training micro-step) with CFG
  dropout off, so every validation sees the same noise and t: curves are comparable across steps.
  A key met twice on a rank (the loader's spare-slot re-draws) counts once; ranks hold disjoint
  samples, so once the batches cover the split the loss is the mean over the whole val split,
  whatever the world size. Runs in eval mode under ``no_grad`` (bf16 autocast when training uses it).
* **Metrics.** ``val/loss`` (mean per-sample loss), ``val/samples`` (how many), and the loss by t in
  :data:`T_BINS` equal bins of [0, 1] as MMAudio logs it: ``val/loss_t0.0-0.2`` … ``val/loss_t0.8-1.0``;
  bin k holds ``k/5 <= t < (k+1)/5`` (1.0 falls in the last); an empty bin is left out. Per-bin counts
  are in :attr:`Validator.last_bin_counts`, so the bins' count-weighted mean is ``val/loss``.
* **Audio (rank 0).** The first ``validation.audio_clips`` val clips (fixed), generated from noise drawn
  per clip key (:data:`AUDIO_MICRO_STEP`), ``sampling_steps`` Euler steps, CFG ``cfg_strength``, decoded
  by the preset's embedded codec: ``out/validation/step-000120/<key>.flac`` (16 kHz mono 16-bit; as
  long as the codec makes it: latent frames × hop, 32256 samples for ``tiny``) and ``<key>.png`` (a
  log-mel image, see :func:`log_mel_image`); the first run of a :class:`Validator` also writes the clip's
  own latent decoded, ``<key>.reference.flac/png``. A step folder is written under a temporary name
  and renamed into place (an old one of the same step is replaced). Datasets made with the official
  encoders need the VAE/vocoder weights, which the trainer config does not name yet: audio is skipped.

Nothing of the training state changes: the global RNGs (torch CPU/CUDA, numpy, random) are restored,
every module gets its own train/eval flag back, no gradient is computed, the training loader is not
touched. A val set that does not exist turns validation off (one log line), it never stops training.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from preprocessing.compact import encode_flac
from preprocessing.shards import read_dataset_info
from selva.audio.mel import slaney_mel_filterbank
from selva.encoders import build_codec
from selva.mixing import MixConfig
from selva.presets import get_preset
from selva.sampling import sample_latents
from training.engine import use_bf16
from training.loader import LoaderConfig, build_loader
from training.objective import SelvaObjective, draw, sample_generator
from training.train_config import TrainConfig

log = logging.getLogger("selva.validation")

LOSS_MICRO_STEP = -1  # the draws of the val loss: no training micro-step is negative
AUDIO_MICRO_STEP = -2  # the starting noise of the generated clips
T_BINS = 5  # equal bins of t in [0, 1]
# log-mel image: n_fft 1024, hop 256, 80 bands, every cell SCALE x SCALE pixels, dB in [DB_MIN, 0]
PNG_N_FFT, PNG_HOP, PNG_MELS, PNG_SCALE, PNG_DB_MIN = 1024, 256, 80, 3, -90.0


def bin_name(k: int) -> str:
    return f"val/loss_t{k / T_BINS:.1f}-{(k + 1) / T_BINS:.1f}"


def log_mel_image(wave: np.ndarray, sample_rate: int):
    """A (S,) waveform in [-1, 1] -> a PIL RGB image of its log-mel spectrogram, low bands at the bottom.

    Size (width, height) = (PNG_SCALE * (S // PNG_HOP + 1), PNG_SCALE * PNG_MELS). Magnitudes are divided
    by the window sum (a full-scale sine peaks near -6 dB) and shown on a fixed dB scale [PNG_DB_MIN, 0],
    so images of different steps compare directly.
    """
    from PIL import Image, ImageOps

    window = torch.hann_window(PNG_N_FFT, dtype=torch.float64)
    spec = torch.stft(torch.from_numpy(np.asarray(wave, np.float64)), PNG_N_FFT, PNG_HOP, window=window,
                      center=True, return_complex=True).abs() / window.sum()
    basis = torch.from_numpy(slaney_mel_filterbank(sample_rate, PNG_N_FFT, PNG_MELS)).double()
    basis = basis / basis.amax(dim=1, keepdim=True)  # triangles of peak 1: a band shows its loudest tone's level
    mel = basis @ spec  # (mels, frames)
    db = 20 * torch.log10(mel.clamp(min=10 ** (PNG_DB_MIN / 20)))
    grey = ((db - PNG_DB_MIN) / -PNG_DB_MIN * 255).round().clamp(0, 255).to(torch.uint8).flip(0).numpy()
    image = Image.fromarray(np.ascontiguousarray(grey))  # uint8 (H, W): mode "L"
    image = image.resize((image.width * PNG_SCALE, image.height * PNG_SCALE), Image.Resampling.NEAREST)
    return ImageOps.colorize(image, black="black", mid="purple", white="yellow")


@contextmanager
def preserved_state(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Restore the global RNGs and every submodule's train/eval flag on exit; eval mode inside."""
    cpu, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        torch.set_rng_state(cpu)
        np.random.set_state(np_state)
        random.setstate(py_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Validator:
    """Val loss and audio of one rank; ``run`` must be called on every rank at the same steps."""

    def __init__(self, cfg: TrainConfig, objective: SelvaObjective, *, rank: int, world_size: int,
                 device: torch.device | str, out_dir: Path):
        self.cfg, self.objective, self.rank, self.world_size = cfg, objective, rank, world_size
        self.device, self.out_dir = torch.device(device), Path(out_dir)
        self.preset = get_preset(cfg.preset)
        self.bf16 = use_bf16(cfg, self.device)
        self.last_bin_counts: dict[str, int] = {}  # bin_name -> samples in it, of the last run
        self._codec = None
        self._references_written = False
        self.path, self.split = self._val_set()
        self.audio = self.path is not None and rank == 0 and cfg.validation.audio_clips > 0
        if self.audio and read_dataset_info(self.path).extra.get("encoders_family") == "official":
            self.audio = False
            if rank == 0:
                log.warning("validation audio off: %s was made with the official encoders, whose decoder needs a "
                            "weights folder the trainer config does not name", self.path)

    def due(self, step: int) -> bool:
        """Whether the trainer validates after optimizer step ``step``: every ``validation.every`` steps
        (0: never in between) and at the last step. The same answer on every rank."""
        every = self.cfg.validation.every
        return self.path is not None and ((every > 0 and step % every == 0) or step == self.cfg.steps)

    def _val_set(self) -> tuple[str | None, str]:
        """(dataset folder, split): ``val_dataset`` (its val split, or its train split when it has no
        val split: a folder made for validation), else the first dataset's val split; (None, "") = off."""
        explicit = bool(self.cfg.val_dataset)
        path = self.cfg.val_dataset or self.cfg.dataset[0].path
        clips = read_dataset_info(path).clips
        split = "val" if clips.get("val") else ("train" if explicit and clips.get("train") else "")
        if not split:
            if self.rank == 0:
                log.warning("validation off: %s has no val split (set val_dataset=DIR to validate)", path)
            return None, ""
        return path, split

    def _loader(self, batch_size: int, *, rank: int, world_size: int):
        lc = LoaderConfig(batch_size=batch_size, num_workers=0, shuffle_buffer=0, seed=self.cfg.seed)
        return build_loader(self.path, lc, rank=rank, world_size=world_size, split=self.split,
                            mix=MixConfig(prob=0.0, seed=self.cfg.seed), device=self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def run(self, step: int) -> tuple[dict[str, float], list[Path]]:
        """Metrics (empty when validation is off) and the files written (rank 0; else empty)."""
        if self.path is None:
            return {}, []
        modules = [self.objective.textsynch, self.objective.generator]
        with preserved_state(modules), torch.no_grad():
            metrics = self._loss() if self.cfg.validation.batches > 0 else {}
            files = self._write_audio(step) if self.audio else []
        return metrics, files

    # ---------------------------------------------------------------------------------------- loss
    def _loss(self) -> dict[str, float]:
        """All-reduced sums -> ``val/loss``, ``val/samples`` and the non-empty t bins."""
        loader = self._loader(self.cfg.loader.batch_size, rank=self.rank, world_size=self.world_size)
        seen: dict[str, tuple[float, float]] = {}  # key -> (loss, t)
        n = min(self.cfg.validation.batches, loader.batches_per_epoch)
        for batch in islice(loader.epoch_batches(), n):
            latent_shape = tuple(batch["latent_mean"].shape[1:])
            draws = draw(batch["key"], latent_shape, self.objective.seed, LOSS_MICRO_STEP, cfg_dropout=0.0)
            with self._autocast():
                _, per_sample, t = self.objective.loss(batch, LOSS_MICRO_STEP, draws=draws)
            for key, loss, tk in zip(batch["key"], per_sample.float().cpu().tolist(), t.float().cpu().tolist(),
                                     strict=True):
                seen.setdefault(key, (loss, tk))
        # [loss sum, count, T_BINS loss sums, T_BINS counts], float64
        sums = torch.zeros(2 + 2 * T_BINS, dtype=torch.float64)
        for loss, tk in seen.values():
            k = min(int(tk * T_BINS), T_BINS - 1)
            sums[0] += loss
            sums[1] += 1
            sums[2 + k] += loss
            sums[2 + T_BINS + k] += 1
        if dist.is_available() and dist.is_initialized():
            reduced = sums.to(self.device)
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        elif self.world_size != 1:
            raise RuntimeError(f"validation on {self.world_size} ranks needs the process group")
        count = int(sums[1])
        if count == 0:
            return {}
        metrics = {"val/loss": float(sums[0]) / count, "val/samples": float(count)}
        self.last_bin_counts = {}
        for k in range(T_BINS):
            nk = int(sums[2 + T_BINS + k])
            if nk:
                metrics[bin_name(k)] = float(sums[2 + k]) / nk
                self.last_bin_counts[bin_name(k)] = nk
        return metrics

    # ---------------------------------------------------------------------------------------- audio
    def _clips(self) -> dict:
        """The first ``audio_clips`` val clips (one rank-0 batch of the fixed order), duplicates dropped."""
        loader = self._loader(self.cfg.validation.audio_clips, rank=0, world_size=1)
        batch = next(iter(loader.epoch_batches()))
        first = {key: i for i, key in reversed(list(enumerate(batch["key"])))}
        keep = sorted(first.values())
        return {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep])
                for k, v in batch.items() if isinstance(v, list) or torch.is_tensor(v)}

    def _write_audio(self, step: int) -> list[Path]:
        v, gen = self.cfg.validation, self.objective.generator
        if self._codec is None:
            self._codec = build_codec("embedded", self.preset, device=self.device)
        batch = self._clips()
        keys = batch["key"]
        noise = torch.stack([torch.randn(tuple(batch["latent_mean"].shape[1:]),
                                         generator=sample_generator(self.cfg.seed, AUDIO_MICRO_STEP, key))
                             for key in keys]).to(self.device)
        with torch.inference_mode(), self._autocast():
            # generate_latents' steps with the objective's sync features: the text-free ablation
            # (text_in_encoder false) is conditioned as it trains
            sync = self.objective.sync_features(batch)
            latent = sample_latents(gen, noise, sync, batch["clip_text"], steps=v.sampling_steps,
                                    cfg_strength=v.cfg_strength)
            latent = gen.unnormalize(latent.float())
        waves = {key: self._decode(latent[i]) for i, key in enumerate(keys)}
        if not self._references_written:
            waves.update({f"{key}.reference": self._decode(batch["latent_mean"][i]) for i, key in enumerate(keys)})
        root = self.out_dir / "validation"
        final = root / f"step-{step:06d}"
        tmp, old = root / f".{final.name}.tmp-{os.getpid()}", root / f".{final.name}.old-{os.getpid()}"
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        names = []
        for name, wave in waves.items():
            (tmp / f"{name}.flac").write_bytes(encode_flac(wave, self._codec.sampling_rate))
            log_mel_image(wave, self._codec.sampling_rate).save(tmp / f"{name}.png")
            names += [f"{name}.flac", f"{name}.png"]
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        self._references_written = True
        return [final / name for name in names]

    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        """(N, D) unnormalised latent -> (N * hop,) float32 waveform in [-1, 1] (non-finite values as 0)."""
        with torch.inference_mode():
            wave = self._codec.decode(latent[None].float())[0].float().cpu().numpy()
        return np.clip(np.nan_to_num(wave, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
