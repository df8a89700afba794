import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lmsys_utils.data import LABEL_COLUMNS, load_arena, swap_ab
from lmsys_utils.demo import make_demo_data
from lmsys_utils.metrics import log_loss
from lmsys_utils.predict import (
    A_EMPTY_PROBS, IDENTICAL_PROBS, SubmissionError, apply_rules, compare_rules, predict, predict_proba,
    write_submission,
)

OFFICIAL_TEST_IDS = [136060, 211333, 1233961]


# --- submission ---

def _probs(n, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(3), size=n)


def test_write_submission_orders_by_expected_ids_and_normalises(tmp_path):
    probs = np.array([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    path = tmp_path / "sub" / "submission.csv"
    write_submission([30, 10, 20], probs, path, expected_ids=[10, 20, 30])
    sub = pd.read_csv(path)
    assert list(sub.columns) == ["id", *LABEL_COLUMNS]
    assert sub["id"].tolist() == [10, 20, 30]
    values = sub[list(LABEL_COLUMNS)].to_numpy()
    np.testing.assert_allclose(values.sum(axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(values[2], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(values[1], [0.2, 0.3, 0.5])
    assert (values > 0).all()  # clipped away from exact 0 and 1, as Kaggle scores
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary file left


@pytest.mark.parametrize("case, ids, expected, match", [
    ("nan", [1, 2, 3], None, "NaN or inf"),
    ("inf", [1, 2, 3], None, "NaN or inf"),
    ("negative", [1, 2, 3], None, "negative"),
    ("zero row", [1, 2, 3], None, "all zero"),
    ("wrong count", [1, 2], None, "3 rows of probabilities for 2 ids"),
    ("duplicate id", [1, 1, 3], None, "duplicate"),
    ("missing id", [1, 2, 3], [1, 2, 3, 4], "1 missing \\(4\\)"),
    ("extra id", [1, 2, 5], [1, 2], "0 missing \\(none\\), 1 extra \\(5\\)"),
])
def test_write_submission_refuses_bad_input_before_writing(tmp_path, case, ids, expected, match):
    probs = _probs(3)
    if case == "nan":
        probs[1, 0] = np.nan
    elif case == "inf":
        probs[2, 2] = np.inf
    elif case == "negative":
        probs[0] = [1.2, -0.1, -0.1]
    elif case == "zero row":
        probs[1] = 0
    path = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match=match):
        write_submission(ids, probs, path, expected_ids=expected)
    assert list(tmp_path.iterdir()) == []


def test_write_submission_keeps_previous_file_when_refused(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission([1, 2], _probs(2), path)
    before = path.read_bytes()
    with pytest.raises(SubmissionError):
        write_submission([1, 2], np.full((2, 3), np.nan), path)
    assert path.read_bytes() == before


# --- degenerate-row rules ---

def _rule_rows():
    return pd.DataFrame({
        "prompt": [["p"]] * 5,
        "response_a": [["same"], [""], ["a"], ["x"], [" "]],
        "response_b": [["same"], ["b"], [" ", ""], ["y"], [""]],
        "winner_model_a": [0.0, 0.0, 1.0, 1.0, 0.0],
        "winner_model_b": [0.0, 1.0, 0.0, 0.0, 0.0],
        "winner_tie": [1.0, 0.0, 0.0, 0.0, 1.0],
    })


def test_apply_rules_overwrites_only_degenerate_rows():
    df = _rule_rows()
    probs = np.full((5, 3), 1 / 3)
    ruled = apply_rules(df, probs)
    np.testing.assert_allclose(ruled[0], IDENTICAL_PROBS)  # identical responses
    np.testing.assert_allclose(ruled[1], A_EMPTY_PROBS)  # A empty -> B
    np.testing.assert_allclose(ruled[2], np.asarray(A_EMPTY_PROBS)[[1, 0, 2]])  # B empty -> A
    np.testing.assert_allclose(ruled[3], probs[3])  # an ordinary row is untouched
    np.testing.assert_allclose(ruled[4], IDENTICAL_PROBS)  # both empty: nothing to choose between
    np.testing.assert_allclose(probs, 1 / 3)  # input not modified
    # the rules follow the A/B swap
    np.testing.assert_allclose(apply_rules(swap_ab(df), probs)[:, [1, 0, 2]], ruled)


def test_compare_rules_reports_both_losses():
    df = _rule_rows()
    probs = np.full((5, 3), 1 / 3)
    report = compare_rules(df, probs)
    targets = df[list(LABEL_COLUMNS)].to_numpy()
    assert report["rows_changed"] == 4
    assert report["log_loss"] == pytest.approx(np.log(3))
    assert report["log_loss_with_rules"] == pytest.approx(log_loss(targets, apply_rules(df, probs)))
    assert report["changed_log_loss_with_rules"] < report["changed_log_loss"]
    with pytest.raises(ValueError, match="labeled"):
        compare_rules(df.drop(columns=["winner_tie"]), probs)
