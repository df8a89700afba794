import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from lmsys_utils.blend import align_preds, apply_blend, cross_validate, fit_blend, read_labels, read_preds
from lmsys_utils.cli import main
from lmsys_utils.data import LABEL_COLUMNS, ArenaDataError, load_arena, make_folds
from lmsys_utils.metrics import log_loss


def _write(path, ids, probs):
    df = pd.DataFrame(probs, columns=list(LABEL_COLUMNS))
    df.insert(0, "id", list(ids))
    df.to_csv(path, index=False)
    return path


def _sharpen(probs, power):
    p = probs ** power
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def real_predictors(arena_train_path):
    """Labels of the real sample and two honest out-of-fold predictors: the class prior and a
    response-length logistic regression, each fitted on the other folds."""
    df, _ = load_arena(arena_train_path)
    labels = df["label"].to_numpy()
    folds = make_folds(df, k=5).to_numpy()
    length_a = np.log1p(df["response_a"].map(lambda turns: sum(map(len, turns))))
    length_b = np.log1p(df["response_b"].map(lambda turns: sum(map(len, turns))))
    features = np.c_[length_a - length_b, np.abs(length_a - length_b), length_a + length_b]
    prior, length = np.zeros((len(df), 3)), np.zeros((len(df), 3))
    for fold in range(5):
        train, test = folds != fold, folds == fold
        prior[test] = np.bincount(labels[train], minlength=3) / train.sum()
        length[test] = LogisticRegression().fit(features[train], labels[train]).predict_proba(features[test])
    return df["id"], labels, prior, length


def test_blend_of_two_real_predictors_is_no_worse_than_the_better(real_predictors):
    _, labels, prior, length = real_predictors
    cv = cross_validate(labels, [prior, length])
    prior_loss, length_loss = cv["inputs"]
    assert length_loss < prior_loss < 1.1  # lengths carry signal; the prior is near ln 3
    # cross-validation noise of fitting the weights on ~800 rows: a few thousandths
    assert cv["blend"] <= length_loss + 0.003 and cv["calibrated"] <= length_loss + 0.003
    assert fit_blend(labels, [prior, length])["weights"][1] > 0.7


def test_blend_of_two_noisy_predictors_beats_both(real_predictors):
    _, labels, _, _ = real_predictors
    rng = np.random.default_rng(0)
    noisy = [_sharpen(np.exp(2 * (np.eye(3)[labels] + rng.normal(0, 1, (len(labels), 3)))), 1) for _ in range(2)]
    cv = cross_validate(labels, noisy)
    assert cv["blend"] < min(cv["inputs"]) - 0.1
    weights = fit_blend(labels, noisy)["weights"]
    assert abs(weights[0] - weights[1]) < 0.2  # equally good inputs share the weight


def test_temperature_scaling_fixes_an_over_confident_predictor(real_predictors):
    _, labels, _, length = real_predictors
    over = _sharpen(length, 4)
    cv = cross_validate(labels, [over])
    assert cv["calibrated"] < cv["inputs"][0] - 0.2
    fitted = fit_blend(labels, [over])
    assert fitted["weights"] == [1.0] and 3 < fitted["temperature"] < 6  # undoes most of the power 4


def test_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (4000, 3))
    truth = _sharpen(np.exp(logits), 1)
    labels = np.array([rng.choice(3, p=p) for p in truth])
    fitted = fit_blend(labels, [_sharpen(truth, 2.5)])
    assert abs(fitted["temperature"] - 2.5) < 0.25
    np.testing.assert_allclose(apply_blend(fitted, [_sharpen(truth, 2.5)]), truth, atol=0.05)


def test_prediction_files_are_checked(tmp_path):
    good = _write(tmp_path / "a.csv", [1, 2, 3], np.full((3, 3), 1 / 3))
    ids, probs = read_preds(good)
    assert ids.tolist() == [1, 2, 3] and probs.shape == (3, 3)
    with pytest.raises(ArenaDataError, match="dup.csv: 1 duplicate id"):
        read_preds(_write(tmp_path / "dup.csv", [1, 1, 3], np.full((3, 3), 1 / 3)))
    with pytest.raises(ArenaDataError, match="neg.csv: 1 row.s. are not probabilities .* row 2, id 2"):
        read_preds(_write(tmp_path / "neg.csv", [1, 2, 3], [[0.2, 0.3, 0.5], [1.2, -0.2, 0.0], [0.1, 0.1, 0.8]]))
    with pytest.raises(ArenaDataError, match="nan.csv: 1 row"):
        read_preds(_write(tmp_path / "nan.csv", [1, 2, 3], [[0.2, 0.3, 0.5], [np.nan, 0.5, 0.5], [0.1, 0.1, 0.8]]))
    (tmp_path / "cols.csv").write_text("id,a,b,c\n1,0.2,0.3,0.5\n")
    with pytest.raises(ArenaDataError, match="cols.csv: missing column.s. winner_model_a"):
        read_preds(tmp_path / "cols.csv")
    other = _write(tmp_path / "b.csv", [3, 2, 4], np.full((3, 3), 1 / 3))
    with pytest.raises(ArenaDataError, match=r"b.csv: ids differ from .*a.csv: 1 missing \(1\), 1 extra \(4\)"):
        align_preds([good, other])
    labels = tmp_path / "labels.csv"
    _write(labels, [1, 2], [[1, 0, 0], [0.5, 0.5, 0]])
    with pytest.raises(ArenaDataError, match="labels.csv: 1 row.s. are not one-hot labels, first at row 2, id 2"):
        read_labels(labels)


def test_align_orders_rows_by_the_first_file(tmp_path):
    a = _write(tmp_path / "a.csv", [5, 6], [[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    b = _write(tmp_path / "b.csv", [6, 5], [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    ids, (pa, pb) = align_preds([a, b])
    assert ids.tolist() == [5, 6]
    np.testing.assert_allclose(pb, [[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])


def test_blend_cli_fit_then_apply(real_predictors, arena_train_path, arena_test_path, tmp_path, capsys):
    ids, labels, prior, length = real_predictors
    a = _write(tmp_path / "prior_oof.csv", ids, prior)
    b = _write(tmp_path / "length_oof.csv", ids[::-1], length[::-1])  # row order must not matter
    assert main(["blend", "--labels", str(arena_train_path), "--preds", str(a), str(b),
                 "--out", str(tmp_path / "blend.json")]) == 0
    out = capsys.readouterr().out
    fitted = json.loads((tmp_path / "blend.json").read_text())
    assert f"log loss {log_loss(labels, prior):.4f}  {a}" in out
    assert f"log loss {log_loss(labels, length):.4f}  {b}" in out
    assert f"log loss {fitted['cv_log_loss']['blend']:.4f}  blend (T = 1), 5-fold" in out
    assert f"log loss {fitted['cv_log_loss']['calibrated']:.4f}  calibrated blend" in out
    assert fitted["rows"] == 999 and fitted["inputs"] == [str(a), str(b)]

    test_ids = [136060, 211333, 1233961]
    rng = np.random.default_rng(2)
    test_a = _write(tmp_path / "prior_test.csv", test_ids, np.tile(prior[0], (3, 1)))
    test_b = _write(tmp_path / "length_test.csv", test_ids[::-1], _sharpen(rng.random((3, 3)), 1))
    assert main(["blend", "--apply", str(tmp_path / "blend.json"), "--preds", str(test_a), str(test_b),
                 "--out", str(tmp_path / "submission.csv"), "--data", str(arena_test_path)]) == 0
    sub = pd.read_csv(tmp_path / "submission.csv")
    assert sub["id"].tolist() == test_ids and np.allclose(sub[list(LABEL_COLUMNS)].sum(axis=1), 1)
    _, aligned = align_preds([test_a, test_b])
    np.testing.assert_allclose(sub[list(LABEL_COLUMNS)].to_numpy(), apply_blend(fitted, aligned), atol=1e-12)

    short = _write(tmp_path / "short_test.csv", test_ids[:2], np.full((2, 3), 1 / 3))
    assert main(["blend", "--apply", str(tmp_path / "blend.json"), "--preds", str(short), str(short),
                 "--out", str(tmp_path / "short.csv"), "--data", str(arena_test_path)]) == 1
    assert "1 missing (1233961)" in capsys.readouterr().err and not (tmp_path / "short.csv").exists()
    assert main(["blend", "--apply", str(tmp_path / "blend.json"), "--preds", str(test_a),
                 "--out", str(tmp_path / "one.csv")]) == 1
    assert "fitted on 2 file(s)" in capsys.readouterr().err and not (tmp_path / "one.csv").exists()
    before = test_a.read_bytes()
    assert main(["blend", "--apply", str(tmp_path / "blend.json"), "--preds", str(test_a), str(test_b),
                 "--out", str(test_a)]) == 1
    assert "--out is one of the input files" in capsys.readouterr().err and test_a.read_bytes() == before


def test_blend_cli_single_file_is_temperature_scaling(real_predictors, tmp_path, capsys):
    ids, labels, _, length = real_predictors
    labels_csv = _write(tmp_path / "labels.csv", ids, np.eye(3)[labels].astype(int))
    over = _write(tmp_path / "over.csv", ids, _sharpen(length, 4))
    assert main(["blend", "--labels", str(labels_csv), "--preds", str(over), "--out", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "temperature-scaled, 5-fold cross-validated" in out and "blend (T = 1)" not in out
    fitted = json.loads((tmp_path / "t.json").read_text())
    assert fitted["cv_log_loss"]["calibrated"] < fitted["cv_log_loss"]["inputs"][str(over)] - 0.2


def test_blend_cli_unlabeled_ids(tmp_path, capsys):
    labels = _write(tmp_path / "labels.csv", [1, 2, 3, 4], np.eye(3)[[0, 1, 2, 0]].astype(int))
    preds = _write(tmp_path / "p.csv", [1, 2, 9], np.full((3, 3), 1 / 3))
    assert main(["blend", "--labels", str(labels), "--preds", str(preds), "--out", str(tmp_path / "b.json")]) == 1
    assert "no label for 1 predicted id(s) (9)" in capsys.readouterr().err


def test_predict_blend_runs_each_model_and_writes_one_checked_submission(tiny_model_dir, arena_test_path, tmp_path):
    import torch

    from lmsys_utils.blend import predict_blend
    from lmsys_utils.config import EncodingSettings
    from lmsys_utils.model import add_lora, load_for_inference, save_adapter

    adapters = []
    for seed in (0, 1):  # two different "trained" adapters on the same base
        base, tokenizer, _ = load_for_inference(tiny_model_dir)
        lora = add_lora(base, r=4, alpha=8)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name or "score" in name:
                    p.normal_(0, 0.5)
        adapters.append(save_adapter(lora, tokenizer, tmp_path / f"adapter{seed}", encoding=EncodingSettings(128)))
    pairs = [(str(tiny_model_dir), a) for a in adapters]
    out = tmp_path / "submission.csv"
    sub = predict_blend(arena_test_path, pairs, out, device="cpu", progress=False)
    a, b = (read_preds(tmp_path / "submission_models" / f"pred_{i}.csv")[1] for i in (0, 1))
    assert not np.allclose(a, b, atol=1e-3)  # the two models differ, so the blend is not either one
    np.testing.assert_allclose(sub.iloc[:, 1:].to_numpy(), apply_blend({"weights": [0.5, 0.5], "temperature": 1.0},
                                                                       [a, b]), atol=1e-9)
    assert sub["id"].tolist() == [136060, 211333, 1233961]
    (tmp_path / "fitted.json").write_text(json.dumps({"weights": [1.0, 0.0], "temperature": 1.0}))
    only_first = predict_blend(arena_test_path, pairs, tmp_path / "first.csv", blend=tmp_path / "fitted.json",
                               device="cpu", progress=False)
    np.testing.assert_allclose(only_first.iloc[:, 1:].to_numpy(), a, atol=1e-9)
