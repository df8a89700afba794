import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from lmsys_utils.metrics import accuracy, log_loss, normalize_probs


def test_log_loss_matches_sklearn_reference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=200)
    p = rng.dirichlet([1, 1, 1], size=200)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p, labels=[0, 1, 2]), rel=1e-12)


def test_log_loss_clips_and_normalises_like_kaggle():
    y = np.array([0, 1])
    p = np.array([[0.0, 2.0, 2.0], [1.0, 1.0, 2.0]])  # a zero and unnormalised rows
    expected = -(np.log(1e-15 / (1 + 1e-15)) + np.log(0.25)) / 2
    assert log_loss(y, p) == pytest.approx(expected)
    assert np.isfinite(log_loss(y, p))


def test_uniform_guess_scores_log3():
    assert log_loss(np.array([0, 1, 2]), np.full((3, 3), 1 / 3)) == pytest.approx(1.0986, abs=1e-4)


def test_soft_targets_equal_expected_hard_loss():
    p = np.array([[0.6, 0.3, 0.1]])
    t = np.array([[0.5, 0.5, 0.0]])
    assert log_loss(t, p) == pytest.approx(0.5 * -np.log(0.6) + 0.5 * -np.log(0.3))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        log_loss(np.zeros((2, 2)), np.full((2, 3), 1 / 3))


def test_accuracy_and_normalize():
    assert accuracy(np.array([0, 2]), np.array([[0.9, 0.05, 0.05], [0.5, 0.1, 0.4]])) == 0.5
    assert np.allclose(normalize_probs([[2, 1, 1]]).sum(axis=1), 1)
