"""The evaluation metrics as pure numpy/scipy functions of embeddings and logits.

Every definition follows av-benchmark (hkchengrex/av-benchmark, the tool MMAudio and SELVA report
with) except KAD, which av-benchmark does not have and which follows kadtk (YoonjinXD/kadtk); the
source of each formula is named in its docstring (details: docs/evaluate.md). Where the standard
tool prints a warning and returns -1 or NaN, these functions raise :class:`MetricError` with one
line that names the metric and the cause instead.

Shapes: ``N`` files (or frames), ``D`` embedding width, ``C`` classes (527 AudioSet classes for
PANNs and PaSST).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.spatial.distance import cdist, pdist
from scipy.special import log_softmax, softmax

FD_EPS = 1e-6  # av-benchmark/pytorch-fid: added to both covariances when sqrtm is not finite
FD_IMAG_ATOL = 1e-3  # av-benchmark/pytorch-fid: largest |imag| on the diagonal of sqrtm that is dropped
IS_SPLITS = 10  # av-benchmark calls the torch-fidelity ISC with 10 splits ...
IS_SEED = 2020  # ... after a permutation of the files with this seed
KAD_SCALE = 100.0  # kadtk reports 100 x MMD^2
KAD_GAMMA_EPS = 1e-8  # kadtk: gamma = 1 / (2 bw^2 + 1e-8)
_KAD_BLOCK = 2048  # rows of the kernel matrix held at once: 15k VGGSound files would need 1.8 GB


class MetricError(ValueError):
    """A metric that cannot be computed; the message is one line: ``"<metric>: <cause>"``."""


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``mu`` (D,) and unbiased covariance ``sigma`` (D, D) of ``n`` embeddings."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


@dataclass(frozen=True)
class FDResult:
    value: float
    eps_added: bool  # sqrtm of the covariance product was not finite, so FD_EPS * I was added (as av-benchmark)
    max_imag: float  # largest |imag| on the diagonal of the matrix square root (dropped when <= FD_IMAG_ATOL)
    note: str | None = None  # why the value is less trustworthy (rank-deficient covariances), else None


@dataclass(frozen=True)
class ISResult:
    mean: float
    std: float  # over the splits, ddof=0 (numpy's default, as torch-fidelity)
    splits: int


@dataclass(frozen=True)
class KADResult:
    value: float  # 100 x unbiased MMD^2; may be slightly negative (an unbiased estimate of a value >= 0)
    bandwidth: float  # the Gaussian kernel's sigma, in embedding units
    bandwidth_source: str  # "median pairwise distance of the reference set" or "given"


def gaussian_stats(x: np.ndarray, metric: str = "FD") -> GaussianStats:
    """Mean and covariance of embeddings ``x`` (N, D), as av-benchmark's ``calculate_embd_statistics``:
    the mean in the input's float32, the covariance ``np.cov(rowvar=False)`` (ddof=1) in float64."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise MetricError(f"{metric}: embeddings must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise MetricError(f"{metric}: {x.shape[0]} embedding(s): a covariance needs at least 2")
    if not np.isfinite(x).all():
        raise MetricError(f"{metric}: the embeddings hold NaN or inf")
    return GaussianStats(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), n=x.shape[0])


def frechet_distance(gen: GaussianStats, ref: GaussianStats, metric: str = "FD") -> FDResult:
    """Fréchet distance between two Gaussians (pytorch-fid's ``calculate_frechet_distance``, which
    av-benchmark's ``metrics/fad.py`` copies):

        FD = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr(sqrtm(S_g S_r))

    ``sqrtm`` is scipy's, of the plain product (not a symmetrised form). A non-finite root is
    retried with ``FD_EPS * I`` added to both covariances, as the reference does; a root whose
    diagonal has an imaginary part above ``FD_IMAG_ATOL`` raises (the reference prints "Imaginary
    component" and returns -1) naming the covariance ranks, the usual cause.
    """
    mu1, mu2 = np.atleast_1d(gen.mu).astype(np.float64), np.atleast_1d(ref.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(gen.sigma), np.atleast_2d(ref.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise MetricError(f"{metric}: embedding widths differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    eps_added = False
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * FD_EPS
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        eps_added = True
        if not np.isfinite(covmean).all():
            raise MetricError(f"{metric}: the square root of the covariance product is not finite, even with "
                              f"{FD_EPS:g}*I added ({_rank_note(gen, ref)})")
    max_imag = 0.0
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > FD_IMAG_ATOL:
            raise MetricError(f"{metric}: the square root of the covariance product has an imaginary diagonal "
                              f"up to {max_imag:.3g} (> {FD_IMAG_ATOL:g}): the covariances are near-singular or "
                              f"not positive semi-definite ({_rank_note(gen, ref)})")
        covmean = covmean.real
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    note = None
    if min(gen.n, ref.n) <= s1.shape[0]:  # av-benchmark reports such values silently; they are strongly biased
        note = (f"rank-deficient covariance: {min(gen.n, ref.n)} vectors for {s1.shape[0]} dimensions "
                f"(a full-rank estimate needs more vectors than dimensions)")
    return FDResult(value=value, eps_added=eps_added, max_imag=max_imag, note=note)


def _rank_note(gen: GaussianStats, ref: GaussianStats) -> str:
    dim = np.atleast_2d(gen.sigma).shape[0]
    return (f"generated: {gen.n} vectors, rank {np.linalg.matrix_rank(np.atleast_2d(gen.sigma))}; reference: "
            f"{ref.n} vectors, rank {np.linalg.matrix_rank(np.atleast_2d(ref.sigma))}; width {dim}: "
            f"more files than dimensions are needed for a full-rank covariance")


def fd_from_embeddings(gen: np.ndarray, ref: np.ndarray, metric: str = "FD") -> FDResult:
    """:func:`frechet_distance` of the statistics of ``gen`` (N_g, D) and ``ref`` (N_r, D)."""
    return frechet_distance(gaussian_stats(gen, metric), gaussian_stats(ref, metric), metric)


def kl_softmax(ref_logits: np.ndarray, gen_logits: np.ndarray, metric: str = "KL") -> float:
    """Mean over pairs of KL(reference || generated) between the softmax class distributions of
    paired logits (N, C), as av-benchmark's ``metrics/kl.py`` (``kl_div`` with ``log_target``,
    summed, divided by N): (1/N) sum_i sum_c p_ref,ic (log p_ref,ic - log p_gen,ic). No eps: the
    log-softmax is finite for finite logits. Computed in float64."""
    ref, gen = _logits(ref_logits, metric), _logits(gen_logits, metric)
    if ref.shape != gen.shape:
        raise MetricError(f"{metric}: paired logits differ in shape ({ref.shape} vs {gen.shape})")
    log_p, log_q = log_softmax(ref, axis=1), log_softmax(gen, axis=1)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)) / ref.shape[0])


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS, seed: int | None = IS_SEED,
                    metric: str = "IS") -> ISResult:
    """Inception score of logits (N, C), as torch-fidelity's ``isc`` that av-benchmark calls
    (``splits=10, samples_shuffle=True, rng_seed=2020``): permute the rows with
    ``RandomState(seed).permutation(N)`` (no permutation for ``seed=None``), split them at
    ``k*N//splits``, and per split score exp(mean_i KL(p_i || mean_j p_j)); report the mean and the
    std (ddof=0) of the split scores. Raises when a split would be empty (N < splits)."""
    x = _logits(logits, metric)
    n = x.shape[0]
    if n < splits:
        raise MetricError(f"{metric}: {n} files are fewer than its {splits} splits (each split needs a file)")
    if seed is not None:
        x = x[np.random.RandomState(seed).permutation(n)]
    p, log_p = softmax(x, axis=1), log_softmax(x, axis=1)
    scores = []
    for k in range(splits):
        part_p, part_log_p = p[k * n // splits:(k + 1) * n // splits], log_p[k * n // splits:(k + 1) * n // splits]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_q = np.log(part_p.mean(axis=0))  # the split's marginal: 0 only where every row's p is 0
            # a class no row predicts adds 0 (the limit p log p -> 0); torch-fidelity's plain product
            # would give NaN there, but only for probabilities that underflow float64 (logit gaps > ~745)
            terms = np.where(part_p > 0, part_p * (part_log_p - log_q), 0.0)
        scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
    return ISResult(mean=float(np.mean(scores)), std=float(np.std(scores)), splits=splits)


def median_pairwise_distance(x: np.ndarray) -> float:
    """kadtk's default bandwidth: ``torch.median(torch.pdist(x))``, i.e. the *lower* middle of the
    N(N-1)/2 Euclidean distances between the rows of ``x`` (N, D) (torch.median does not average)."""
    d = pdist(np.asarray(x, dtype=np.float64))
    return float(np.partition(d, (d.size - 1) // 2)[(d.size - 1) // 2])


def kernel_audio_distance(ref: np.ndarray, gen: np.ndarray, bandwidth: float | None = None,
                          metric: str = "KAD") -> KADResult:
    """KAD (kadtk's ``calc_kernel_audio_distance``): 100 x the unbiased MMD^2 between ``ref`` (M, D)
    and ``gen`` (N, D) with the Gaussian kernel k(a, b) = exp(-gamma |a - b|^2),
    gamma = 1 / (2 bw^2 + 1e-8):

        MMD^2 = sum_{i!=j} k(r_i, r_j) / (M(M-1)) + sum_{i!=j} k(g_i, g_j) / (N(N-1)) - 2 mean k(r, g)

    The bandwidth defaults to the median pairwise distance of the **reference** set, as kadtk's
    README defines it (some kadtk versions took it from the evaluated set; a score must not depend
    on the set it judges), so it is the same for every generated set compared to one reference.
    """
    r, g = np.asarray(ref, dtype=np.float64), np.asarray(gen, dtype=np.float64)
    if r.ndim != 2 or g.ndim != 2 or r.shape[1] != g.shape[1]:
        raise MetricError(f"{metric}: embeddings must be (N, D) of one width, got {r.shape} and {g.shape}")
    if min(r.shape[0], g.shape[0]) < 2:
        raise MetricError(f"{metric}: the unbiased estimate needs 2 files per set, got {r.shape[0]} reference "
                          f"and {g.shape[0]} generated")
    if not (np.isfinite(r).all() and np.isfinite(g).all()):
        raise MetricError(f"{metric}: the embeddings hold NaN or inf")
    source = "given"
    if bandwidth is None:
        bandwidth, source = median_pairwise_distance(r), "median pairwise distance of the reference set"
    if not bandwidth > 0:
        raise MetricError(f"{metric}: the kernel bandwidth is {bandwidth:g} (the reference embeddings are all "
                          "identical?)")
    gamma = 1.0 / (2.0 * bandwidth**2 + KAD_GAMMA_EPS)
    m, n = r.shape[0], g.shape[0]
    k_rr = (_kernel_sum(r, r, gamma) - m) / (m * (m - 1))  # the diagonal of k(x, x) is exp(0) = 1 each
    k_gg = (_kernel_sum(g, g, gamma) - n) / (n * (n - 1))
    k_rg = _kernel_sum(r, g, gamma) / (m * n)
    return KADResult(value=float(KAD_SCALE * (k_rr + k_gg - 2.0 * k_rg)), bandwidth=float(bandwidth),
                     bandwidth_source=source)


def _kernel_sum(a: np.ndarray, b: np.ndarray, gamma: float) -> float:
    """sum_ij exp(-gamma |a_i - b_j|^2), a block of rows at a time (memory O(block x N))."""
    total = 0.0
    for start in range(0, a.shape[0], _KAD_BLOCK):
        total += float(np.exp(-gamma * cdist(a[start:start + _KAD_BLOCK], b, "sqeuclidean")).sum())
    return total


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired embeddings (N, D) -> (N,): the CLAP score's per-pair
    term (av-benchmark's LAION-CLAP-Score is the mean over pairs, not scaled)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise MetricError(f"cosine: paired embeddings must be (N, D) of one shape, got {a.shape} and {b.shape}")
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if np.any(norm == 0):
        raise MetricError("cosine: an embedding is all zeros")
    return np.sum(a * b, axis=1) / norm


def _logits(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise MetricError(f"{metric}: logits must be (N, C) with N >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise MetricError(f"{metric}: the logits hold NaN or inf")
    return x
