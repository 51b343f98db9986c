"""training/metrics.py against closed forms: FD of known Gaussians, KL, IS, KAD/MMD, cosine."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    FD_IMAG_ATOL,
    GaussianStats,
    MetricError,
    cosine_scores,
    fd_from_embeddings,
    frechet_distance,
    inception_score,
    kernel_audio_distance,
    kl_softmax,
    median_pairwise_distance,
)


def _spd(rng: np.random.RandomState, d: int) -> np.ndarray:
    a = rng.randn(d, d)
    return a @ a.T + d * np.eye(d)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fd_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    fd = frechet_distance(GaussianStats(mu1, np.diag(v1), 100), GaussianStats(mu2, np.diag(v2), 100))
    # |mu1-mu2|^2 + sum (sqrt v1 - sqrt v2)^2 = (1 + 0 + 6.25) + (4 + 1 + 0)
    assert fd.value == pytest.approx(12.25, abs=1e-9)
    assert not fd.eps_added and fd.max_imag <= FD_IMAG_ATOL


def test_fd_of_non_commuting_covariances_is_the_symmetric_closed_form():
    rng = np.random.RandomState(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.randn(6), rng.randn(6)
    r1 = _sqrt_psd(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r1 @ s2 @ r1))
    fd = frechet_distance(GaussianStats(mu1, s1, 10), GaussianStats(mu2, s2, 10))
    assert fd.value == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(GaussianStats(mu1, s1, 10), GaussianStats(mu1, s1, 10)).value == pytest.approx(0, abs=1e-8)


def test_fd_from_samples_approaches_the_population_value():
    rng = np.random.RandomState(1)
    x = rng.randn(20000, 2) * [1.0, 2.0]
    y = rng.randn(20000, 2) * [3.0, 2.0] + [2.0, 0.0]
    # population: |(2, 0)|^2 + (1 - 3)^2 + (2 - 2)^2 = 8
    assert fd_from_embeddings(x, y).value == pytest.approx(8.0, abs=0.15)


def test_fd_on_too_few_files_names_the_metric_and_the_cause():
    with pytest.raises(MetricError, match=r"^FD-PANN: 1 embedding\(s\): a covariance needs at least 2$"):
        fd_from_embeddings(np.zeros((1, 4)), np.zeros((5, 4)), "FD-PANN")


def test_fd_with_an_imaginary_root_names_the_metric_and_the_ranks():
    # a covariance with a negative eigenvalue (what round-off can leave of a singular one): no real root
    with pytest.raises(MetricError) as err:
        frechet_distance(GaussianStats(np.zeros(2), np.eye(2), 3),
                         GaussianStats(np.zeros(2), np.diag([1.0, -1.0]), 3), "FD-PASST")
    message = str(err.value)
    assert message.startswith("FD-PASST: the square root of the covariance product has an imaginary diagonal up to 1")
    assert "generated: 3 vectors, rank 2; reference: 3 vectors, rank 2; width 2" in message and "\n" not in message


def test_fd_of_fewer_files_than_dimensions_is_computed_with_a_note():
    rng = np.random.RandomState(3)
    fd = fd_from_embeddings(rng.randn(3, 40), rng.randn(3, 40) * 5, "FD-PASST")
    assert fd.value > 0 and fd.note.startswith("rank-deficient covariance: 3 vectors for 40 dimensions")
    assert fd_from_embeddings(rng.randn(50, 4), rng.randn(50, 4)).note is None


def test_kl_of_identical_distributions_is_zero_and_matches_the_sum_form():
    rng = np.random.RandomState(2)
    a = rng.randn(7, 527)
    assert kl_softmax(a, a) == pytest.approx(0.0, abs=1e-12)
    assert kl_softmax(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax ignores a constant shift
    b = rng.randn(7, 527)
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(1, keepdims=True)
    assert kl_softmax(a, b) == pytest.approx(np.mean(np.sum(p * np.log(p / q), axis=1)), rel=1e-10)
    # direction: KL(reference || generated), not symmetric
    two = np.array([[4.0, 0.0]]), np.array([[0.0, 0.0]])
    p0 = np.exp(4) / (1 + np.exp(4))
    assert kl_softmax(*two) == pytest.approx(p0 * np.log(2 * p0) + (1 - p0) * np.log(2 * (1 - p0)), rel=1e-12)
    assert kl_softmax(*two) != pytest.approx(kl_softmax(two[1], two[0]), rel=1e-3)


def test_is_of_uniform_predictions_is_one_and_of_distinct_one_hots_is_the_split_size():
    uniform = inception_score(np.zeros((50, 527)))
    assert uniform.mean == pytest.approx(1.0, abs=1e-12) and uniform.std == pytest.approx(0.0, abs=1e-12)
    # 100 files, each confidently a different class: every split of 10 files has a uniform marginal
    # over its 10 classes and one-hot rows, so exp(KL) = 10 whatever the permutation
    one_hot = np.full((100, 527), -1e3)
    one_hot[np.arange(100), np.arange(100)] = 0.0
    result = inception_score(one_hot)
    assert result.mean == pytest.approx(10.0, rel=1e-9) and result.std == pytest.approx(0.0, abs=1e-9)
    # all files confidently the same class: marginal = each row, IS = 1
    same = np.full((30, 527), -1e3)
    same[:, 5] = 0.0
    assert inception_score(same).mean == pytest.approx(1.0, abs=1e-9)


def test_is_with_fewer_files_than_splits_is_one_line():
    with pytest.raises(MetricError, match=r"^ISC-PANNS: 7 files are fewer than its 10 splits"):
        inception_score(np.zeros((7, 527)), metric="ISC-PANNS")


def test_unbiased_mmd_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.RandomState(4)
    ref, same = rng.randn(400, 8), rng.randn(400, 8)
    near = kernel_audio_distance(ref, same)
    shifted = kernel_audio_distance(ref, same + 1.0)
    assert abs(near.value) < 0.5 and shifted.value > 10 * max(abs(near.value), 0.1)
    # identical sets: the cross term counts the m diagonal ones the within-set terms leave out, so the
    # estimate is slightly negative, O(1/m)
    assert -100 * 2 / 400 < kernel_audio_distance(ref, ref).value <= 0


def test_kad_matches_the_definition_and_its_bandwidth_comes_from_the_reference_only():
    rng = np.random.RandomState(5)
    ref, gen_a, gen_b = rng.randn(30, 4), rng.randn(20, 4) + 0.5, rng.randn(25, 4) * 3
    a, b = kernel_audio_distance(ref, gen_a), kernel_audio_distance(ref, gen_b)
    d = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))[np.triu_indices(30, 1)]
    assert a.bandwidth == b.bandwidth == np.sort(d)[(d.size - 1) // 2] == median_pairwise_distance(ref)
    assert a.bandwidth_source == "median pairwise distance of the reference set"
    gamma = 1 / (2 * a.bandwidth**2 + 1e-8)

    def k(x, y):
        return np.exp(-gamma * ((x[:, None] - y[None]) ** 2).sum(-1))

    krr, kgg = k(ref, ref), k(gen_a, gen_a)
    mmd = ((krr.sum() - 30) / (30 * 29) + (kgg.sum() - 20) / (20 * 19) - 2 * k(ref, gen_a).mean())
    assert a.value == pytest.approx(100 * mmd, rel=1e-10)
    assert kernel_audio_distance(ref, gen_a, bandwidth=2.0).bandwidth_source == "given"


def test_kad_refuses_a_zero_bandwidth():
    with pytest.raises(MetricError, match="^KAD-PASST: the kernel bandwidth is 0"):
        kernel_audio_distance(np.ones((5, 3)), np.zeros((5, 3)), metric="KAD-PASST")


def test_cosine_scores_are_per_pair():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_scores(a, b), [1.0, -1.0, 0.0], atol=1e-12)
