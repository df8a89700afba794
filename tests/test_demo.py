import numpy as np
import pandas as pd
import pytest

from lmsys_utils.data import LABEL_COLUMNS, load_arena
from lmsys_utils.synthetic import make_demo_data, write_demo_data
from lmsys_utils.metrics import log_loss


def test_demo_files_load_clean_and_have_the_real_structure(tmp_path):
    train_path, test_path = write_demo_data(tmp_path, n_train=400, n_test=50)
    train, summary = load_arena(train_path)
    test, test_summary = load_arena(test_path)
    assert summary.rows_kept == 400 and not summary.dropped
    assert summary.multi_turn_rows > 20 and summary.null_turns > 0 and summary.label_counts["tie"] > 50
    assert any(not t.isascii() for turns in train["prompt"] for t in turns)
    assert all(m.startswith("demo-") for m in train["model_a"])  # clearly synthetic
    assert not test_summary.labeled and len(test) == 50
    assert not set(train["id"]) & set(test["id"])


def test_demo_data_is_deterministic():
    pd.testing.assert_frame_equal(make_demo_data(100, seed=4), make_demo_data(100, seed=4))


def test_demo_labels_carry_a_learnable_signal():
    """A rule that only sees whether each response is helpful beats the class prior clearly."""
    df = make_demo_data(2000, seed=0)
    y = df[list(LABEL_COLUMNS)].to_numpy().argmax(axis=1)
    helpful = lambda turns: any(t and ("Sure!" in t or "Great question" in t or "overview" in t) for t in turns)
    a, b = df["response_a"].map(helpful), df["response_b"].map(helpful)
    p = np.where((a & ~b).to_numpy()[:, None], [0.8, 0.07, 0.13],
                 np.where((~a & b).to_numpy()[:, None], [0.07, 0.8, 0.13], [0.2, 0.2, 0.6]))
    prior = np.bincount(y, minlength=3) / len(y)
    assert log_loss(y, p) < log_loss(y, np.tile(prior, (len(y), 1))) - 0.2


@pytest.mark.slow
def test_demo_main_job_end_to_end(tmp_path, capsys):
    """`python -m lmsys_utils demo`, the README's first command: it learns, and writes what it says it writes."""
    import json

    from lmsys_utils.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "being compiled" in printed.err and "train 1/" in printed.err  # the step-level bar
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["uniform_log_loss"] == pytest.approx(np.log(3))
    assert metrics["holdout_log_loss"] < metrics["class_prior_log_loss"] - 0.2  # measured: 0.68 vs 1.10
    submission = pd.read_csv(out / "submission.csv")
    test, _ = load_arena(out / "data" / "test.csv")
    assert submission["id"].tolist() == test["id"].tolist()
    assert np.allclose(submission[list(LABEL_COLUMNS)].sum(axis=1), 1)
    assert len(list((out / "figures").glob("*.png"))) == 11
    assert (out / "run" / "adapter" / "adapter_config.json").is_file()
