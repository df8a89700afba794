import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmsys_utils.data import (
    LABEL_COLUMNS, ArenaDataError, load_arena, split_train_valid, swap_ab, to_competition_csv,
)
from lmsys_utils.data import distill_targets, load_teacher, make_folds
from lmsys_utils.synthetic import make_demo_data

HEADER = "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie"


def _csv(tmp_path, rows, header=HEADER, name="train.csv", newline="\n"):
    path = tmp_path / name
    path.write_bytes((newline.join([header, *rows]) + newline).encode("utf-8"))
    return path


def _row(id_=1, prompt='"[""hi""]"', a='"[""hello""]"', b='"[""hey""]"', labels="1,0,0"):
    return f"{id_},m1,m2,{prompt},{a},{b},{labels}"


# --- the real sample ---

def test_real_train_sample(arena_train_path):
    df, summary = load_arena(arena_train_path)
    assert len(df) == summary.rows_read == summary.rows_kept == 999
    assert summary.label_counts == {"model_a": 352, "model_b": 352, "tie": 295}
    assert summary.multi_turn_rows == 131
    assert summary.soft_label_rows == 0
    assert summary.null_turns > 0  # 13 responses hold JSON null entries
    for col in ("prompt", "response_a", "response_b"):
        assert df[col].map(lambda turns: isinstance(turns, list) and all(isinstance(t, str) for t in turns)).all()
    raw = pd.read_csv(arena_train_path)
    for col in ("prompt", "response_a", "response_b"):
        # a literal backslash-n may remain only where the JSON itself escaped the backslash (code samples)
        parsed = df[col].map(lambda turns: sum(t.count("\\n") for t in turns))
        escaped = raw[col].str.count(r"(?<!\\)(?:\\\\)*\\\\n")  # an even run of backslashes, then n
        assert (parsed == escaped).all(), f"a literal \\n escape survived in {col}"
    assert df["response_a"].map(lambda turns: "\n" in "".join(turns)).mean() > 0.5
    assert df["label"].tolist() == np.argmax(df[list(LABEL_COLUMNS)].to_numpy(), axis=1).tolist()


def test_real_sample_naive_split_is_wrong(arena_train_path):
    """The anchor's strip-and-split parse leaves escapes in most rows; ours leaves none."""
    raw = pd.read_csv(arena_train_path)
    naive = raw["response_a"].str.strip("[]").str.split('","')
    assert naive.map(lambda parts: any("\\n" in p for p in parts)).mean() > 0.5


def test_real_test_file(arena_test_path):
    df, summary = load_arena(arena_test_path)
    assert df["id"].tolist() == [136060, 211333, 1233961]
    assert not summary.labeled and "label" not in df.columns


def test_real_sample_check_data_cli(arena_train_path, capsys):
    from lmsys_utils.cli import main

    assert main(["check-data", str(arena_train_path)]) == 0
    out = capsys.readouterr().out
    assert "999 rows read, 999 kept, 0 dropped" in out and "multi-turn rows: 131" in out


# --- bad input: a clear error (file, row, id, column) or handled and counted ---

def test_malformed_json_names_row_id_and_column(tmp_path):
    path = _csv(tmp_path, [_row(1), _row(7, a='"[""unterminated]"')])
    with pytest.raises(ArenaDataError) as e:
        load_arena(path)
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and "id 7" in msg and "response_a" in msg and "JSON" in msg


def test_json_but_not_a_list(tmp_path):
    path = _csv(tmp_path, [_row(3, b='"{""a"": 1}"')])
    with pytest.raises(ArenaDataError, match=r"row 1, id 3, column response_b: JSON dict"):
        load_arena(path)


def test_drop_invalid_reports_ids(tmp_path):
    path = _csv(tmp_path, [_row(1), _row(2, a="not json"), _row(3, labels="1,1,0"), _row(4)])
    df, summary = load_arena(path, drop_invalid=True)
    assert df["id"].tolist() == [1, 4]
    assert summary.rows_read == 4 and summary.rows_kept == 2
    assert summary.dropped == {"invalid response_a": [2], "invalid winner_model_a,winner_model_b,winner_tie": [3]}
    assert "dropped 1 (invalid response_a): ids 2" in str(summary)


def test_missing_column(tmp_path):
    path = _csv(tmp_path, ["1,m1,m2,x,0,1,0"], header="id,model_a,model_b,prompt,winner_model_a,winner_model_b,winner_tie")
    with pytest.raises(ArenaDataError, match="missing column.*response_a, response_b"):
        load_arena(path)


def test_two_winners(tmp_path):
    with pytest.raises(ArenaDataError, match=r"id 5.*must sum to 1"):
        load_arena(_csv(tmp_path, [_row(5, labels="1,1,0")]))


def test_nan_label(tmp_path):
    with pytest.raises(ArenaDataError, match=r"id 6, column winner_model_b: label '' is not a number"):
        load_arena(_csv(tmp_path, [_row(6, labels="0,,1")]))


def test_soft_labels_accepted_and_counted(tmp_path):
    df, summary = load_arena(_csv(tmp_path, [_row(1, labels="0.7,0.2,0.1"), _row(2, labels="0,0,1")]))
    assert summary.soft_label_rows == 1
    assert df["label"].tolist() == [0, 2]
    assert df.loc[0, "winner_model_a"] == pytest.approx(0.7)


def test_duplicate_ids(tmp_path):
    with pytest.raises(ArenaDataError, match="duplicate id.*row 1 id 8.*row 2 id 8"):
        load_arena(_csv(tmp_path, [_row(8), _row(8)]))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(ArenaDataError, match="empty"):
        load_arena(path)


def test_header_only(tmp_path):
    with pytest.raises(ArenaDataError, match="header but no data rows"):
        load_arena(_csv(tmp_path, []))


def test_missing_file(tmp_path):
    with pytest.raises(ArenaDataError, match="no such file"):
        load_arena(tmp_path / "nope.csv")


def test_invalid_utf8_bytes_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes((HEADER + "\n" + _row(1, a='"[""caf\xe9""]"') + "\n").encode("latin-1"))
    df, summary = load_arena(path)
    assert summary.invalid_utf8_bytes == 1
    assert df.loc[0, "response_a"] == ["caf\ufffd"]


def test_lone_surrogates_removed_and_counted(tmp_path):
    df, summary = load_arena(_csv(tmp_path, [_row(1, a=r'"[""ok \ud83d done"", ""pair \ud83d\ude00""]"')]))
    assert df.loc[0, "response_a"] == ["ok  done", "pair \U0001F600"]
    assert summary.surrogates_removed == 1
    df.loc[0, "response_a"][0].encode("utf-8")  # no lone surrogate left to break the tokenizer


def test_null_turns_and_mismatch_counted(tmp_path):
    df, summary = load_arena(_csv(tmp_path, [_row(1, a='"[null]"', b='"[""x"", ""y""]"')]))
    assert df.loc[0, "response_a"] == [""]
    assert summary.null_turns == 1 and summary.empty_responses == 1 and summary.turn_count_mismatches == 1


def test_one_megabyte_response(tmp_path):
    big = "x" * 1_000_000
    df, _ = load_arena(_csv(tmp_path, [_row(1, a=f'"[""{big}""]"')]))
    assert len(df.loc[0, "response_a"][0]) == 1_000_000


def test_windows_line_endings(tmp_path):
    path = _csv(tmp_path, [_row(1), _row(2, labels="0,0,1")], newline="\r\n")
    df, summary = load_arena(path)
    assert df["id"].tolist() == [1, 2] and df.loc[1, "label"] == 2
    assert df.loc[0, "prompt"] == ["hi"]


def test_extra_columns_kept_and_string_ids(tmp_path):
    header = HEADER + ",source"
    df, _ = load_arena(_csv(tmp_path, ["a1,m1,m2," + _row().split(",", 3)[3] + ",ext33k"], header=header))
    assert df.loc[0, "id"] == "a1" and df.loc[0, "source"] == "ext33k"


def test_check_data_cli_fails_on_bad_file(tmp_path, capsys):
    from lmsys_utils.cli import main

    assert main(["check-data", str(_csv(tmp_path, [_row(1, labels="1,1,0")]))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


# --- swap, split, round trip ---

def test_swap_ab_exchanges_sides():
    df = make_demo_data(30, seed=1)
    df["label"] = df[list(LABEL_COLUMNS)].to_numpy().argmax(axis=1)
    s = swap_ab(df)
    assert (s["response_a"] == df["response_b"]).all() and (s["model_b"] == df["model_a"]).all()
    assert (s["winner_model_a"] == df["winner_model_b"]).all() and (s["winner_tie"] == df["winner_tie"]).all()
    assert (s["label"] == df["label"].map({0: 1, 1: 0, 2: 2})).all()
    assert (s["prompt"] == df["prompt"]).all()


_turns = st.lists(st.one_of(st.text(max_size=20), st.just("")), min_size=1, max_size=3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(_turns, _turns, _turns, st.sampled_from([0, 1, 2])), min_size=1, max_size=8))
def test_swap_ab_is_its_own_inverse(rows):
    df = pd.DataFrame([
        {"id": i, "prompt": p, "response_a": a, "response_b": b, "model_a": f"m{i}", "model_b": "z",
         **dict(zip(LABEL_COLUMNS, np.eye(3)[k])), "label": k}
        for i, (p, a, b, k) in enumerate(rows)
    ])
    pd.testing.assert_frame_equal(swap_ab(swap_ab(df)), df)


def test_split_is_grouped_stratified_and_deterministic(arena_train_path):
    df, _ = load_arena(arena_train_path)
    train, valid = split_train_valid(df, valid_frac=0.2, seed=3)
    assert len(train) + len(valid) == len(df)
    key = lambda d: set(d["prompt"].map(json.dumps))
    assert not key(train) & key(valid), "a prompt sits on both sides of the split"
    assert 0.15 < len(valid) / len(df) < 0.25
    share = valid["label"].value_counts(normalize=True)
    overall = df["label"].value_counts(normalize=True)
    assert (abs(share - overall) < 0.05).all()
    again_train, _ = split_train_valid(df, valid_frac=0.2, seed=3)
    assert again_train["id"].tolist() == train["id"].tolist()


def test_competition_csv_round_trip(tmp_path):
    df = make_demo_data(50, seed=2)
    to_competition_csv(df, tmp_path / "demo.csv")
    back, summary = load_arena(tmp_path / "demo.csv")
    assert back["response_a"].tolist() == [[t or "" for t in turns] for turns in df["response_a"]]
    assert summary.rows_kept == 50


# --- folds ---

def _prompt_folds(df, folds):
    return df["prompt"].map(json.dumps).groupby(folds.to_numpy()).agg(set)


def test_folds_on_the_real_sample(arena_train_path):
    df, _ = load_arena(arena_train_path)
    folds = make_folds(df, k=5, seed=42)
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]
    sizes = folds.value_counts()
    assert sizes.min() >= 190 and sizes.max() <= 210
    per_fold = _prompt_folds(df, folds)
    assert sum(len(per_fold[i] & per_fold[j]) for i in range(5) for j in range(i + 1, 5)) == 0
    overall = df["label"].value_counts(normalize=True)
    for _, rows in df.groupby(folds.to_numpy()):
        assert (abs(rows["label"].value_counts(normalize=True) - overall) < 0.03).all()
    assert make_folds(df, k=5, seed=42).equals(folds)
    assert not make_folds(df, k=5, seed=7).equals(folds)


def test_folds_keep_repeated_prompts_together():
    df = make_demo_data(600, seed=1)
    assert df["prompt"].map(json.dumps).duplicated().sum() > 300  # the demo repeats its prompts a lot
    folds = make_folds(df, k=4, seed=0)
    per_fold = _prompt_folds(df, folds)
    assert sum(len(per_fold[i] & per_fold[j]) for i in range(4) for j in range(i + 1, 4)) == 0
    assert folds.value_counts().min() > 0.15 * len(df)


def test_folds_refuse_too_few_prompts():
    df = make_demo_data(30, seed=0).assign(prompt=[["same"]] * 15 + [["other"]] * 15)
    with pytest.raises(ValueError, match="3 folds need at least 3 distinct prompts; the data has 2"):
        make_folds(df, k=3)
    with pytest.raises(ValueError, match="at least 2"):
        make_folds(df, k=1)


def test_folds_cli_writes_id_and_fold(arena_train_path, tmp_path, capsys):
    from lmsys_utils.cli import main

    assert main(["folds", str(arena_train_path), "--folds", "5", "--out", str(tmp_path / "folds.csv")]) == 0
    written = pd.read_csv(tmp_path / "folds.csv")
    df, _ = load_arena(arena_train_path)
    assert written.columns.tolist() == ["id", "fold"] and written["id"].tolist() == df["id"].tolist()
    assert written["fold"].tolist() == make_folds(df, k=5, seed=42).tolist()
    out = capsys.readouterr().out
    assert [line[:7] for line in out.splitlines()[:5]] == [f"fold {i}:" for i in range(5)]
    assert "model_a 35." in out and "id,fold for 999 rows" in out
    assert main(["folds", str(tmp_path / "folds.csv"), "--out", str(tmp_path / "folds.csv")]) == 1
    assert pd.read_csv(tmp_path / "folds.csv").equals(written)


# --- teacher targets ---

def _teacher_csv(tmp_path, rows, name="teacher.csv"):
    path = tmp_path / name
    pd.DataFrame(rows, columns=["id", *LABEL_COLUMNS]).to_csv(path, index=False)
    return path


def test_load_teacher_aligns_to_ids(tmp_path):
    path = _teacher_csv(tmp_path, [(3, 0.2, 0.3, 0.5), (1, 0.7, 0.2, 0.1), ("extra-00ff", 0.1, 0.8, 0.1),
                                   (9, 0.3, 0.3, 0.4)])
    probs = load_teacher(path, [1, "extra-00ff", 3])
    np.testing.assert_allclose(probs, [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])


def test_load_teacher_missing_ids(tmp_path, capsys):
    path = _teacher_csv(tmp_path, [(1, 0.7, 0.2, 0.1)])
    with pytest.raises(ArenaDataError, match=r"no teacher row for 3 of 4 training id\(s\) \(e.g. 2, 5, 6\)"):
        load_teacher(path, [1, 2, 5, 6])
    probs = load_teacher(path, [1, 2, 5, 6], fallback=True)
    assert np.isnan(probs[1:]).all() and not np.isnan(probs[0]).any()
    assert "no teacher row for 3 of 4 id(s); those rows train on hard labels" in capsys.readouterr().out


def test_load_teacher_bad_files(tmp_path):
    (tmp_path / "logits.csv").write_text("id,a,b\n1,2,3\n")
    with pytest.raises(ArenaDataError, match="logits.csv: missing column.s. winner_model_a, winner_model_b"):
        load_teacher(tmp_path / "logits.csv", [1])
    with pytest.raises(ArenaDataError, match="duplicate id"):
        load_teacher(_teacher_csv(tmp_path, [(1, 0.5, 0.5, 0.0), (1, 0.2, 0.3, 0.5)]), [1])
    with pytest.raises(ArenaDataError, match="row 2, id 7: .*logits"):
        load_teacher(_teacher_csv(tmp_path, [(1, 0.5, 0.5, 0.0), (7, 2.1, -0.3, 0.5)]), [1, 7])
    with pytest.raises(ArenaDataError, match="no such teacher file"):
        load_teacher(tmp_path / "absent.csv", [1])


def test_distill_targets_mix():
    hard = np.array([0, 2])
    teacher = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    np.testing.assert_allclose(distill_targets(hard, teacher, alpha=0.0), np.eye(3)[hard])
    np.testing.assert_allclose(distill_targets(hard, teacher, alpha=1.0), teacher)
    np.testing.assert_allclose(distill_targets(hard, teacher, alpha=0.25)[0], [0.9, 0.075, 0.025])
    soft = np.sqrt(teacher[0]) / np.sqrt(teacher[0]).sum()
    np.testing.assert_allclose(distill_targets(hard, teacher, alpha=1.0, temperature=2.0)[0], soft)
    assert distill_targets(hard, teacher, 1.0, temperature=2.0)[0].max() < 0.6  # softened
    assert distill_targets(hard, teacher, 1.0, temperature=0.5)[0].max() > 0.6  # sharpened
    mixed = distill_targets(hard, np.array([[np.nan] * 3, [0.2, 0.2, 0.6]]), alpha=0.5)
    np.testing.assert_allclose(mixed, [[1, 0, 0], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(mixed.sum(axis=1), 1)
    with pytest.raises(ValueError, match="alpha"):
        distill_targets(hard, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_targets(hard, teacher, alpha=0.5, temperature=0)


# --- ids are kept exactly as the file writes them ---

def test_ids_beyond_int64_and_with_leading_zeros_are_kept_as_written(tmp_path):
    big = str(2**63)  # one above int64: used to wrap to a negative number
    df, _ = load_arena(_csv(tmp_path, [_row(big), _row("001"), _row("1.0", labels="0,0,1")]))
    assert df["id"].tolist() == [big, "001", "1.0"]
    plain, _ = load_arena(_csv(tmp_path, [_row(str(2**63 - 1)), _row("-4")], name="plain.csv"))
    assert plain["id"].tolist() == [2**63 - 1, -4] and plain["id"].dtype == np.int64


def test_empty_id_is_refused_naming_file_row_and_column(tmp_path):
    path = _csv(tmp_path, [_row(1), _row(""), _row(3)])
    with pytest.raises(ArenaDataError, match=r"1 empty id\(s\) in column id \(row\(s\) 2,") as e:
        load_arena(path)
    assert str(path) in str(e.value)


# --- labels: needed to train, irrelevant to predict ---

def test_labels_are_ignored_when_predicting(tmp_path):
    path = _csv(tmp_path, [_row(1), _row(2, labels="0,x,1"), _row(3)])
    df, summary = load_arena(path, labels=False)
    assert df["id"].tolist() == [1, 2, 3]  # the bad label cell costs no row
    assert not set(LABEL_COLUMNS) & set(df.columns) and "label" not in df.columns
    assert not summary.labeled and "present but ignored" in str(summary)
    with pytest.raises(ArenaDataError, match="id 2, column winner_model_b"):
        load_arena(path)


def test_training_on_a_file_without_labels_is_refused(arena_test_path):
    with pytest.raises(ArenaDataError, match=r"test.csv: no label columns .*looks like a test file"):
        load_arena(arena_test_path, labels=True)
    df, _ = load_arena(arena_test_path, labels=False)
    assert df["id"].tolist() == [136060, 211333, 1233961]


# --- input formats ---

@pytest.mark.parametrize("suffix", [".csv.gz", ".zip", ".csv.bz2", ".csv.xz"])
def test_compressed_files_are_read(tmp_path, arena_test_path, suffix):
    raw = pd.read_csv(arena_test_path, dtype=str, keep_default_na=False)
    packed = tmp_path / f"test{suffix}"
    raw.to_csv(packed, index=False)  # pandas compresses by the suffix, as it decompresses when reading
    df, summary = load_arena(packed)
    plain, _ = load_arena(arena_test_path)
    assert summary.rows_kept == 3 and df["id"].tolist() == plain["id"].tolist()
    assert df["response_a"].tolist() == plain["response_a"].tolist()


def test_a_corrupt_compressed_file_is_named(tmp_path):
    path = tmp_path / "train.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    with pytest.raises(ArenaDataError, match=r"train.csv.gz: cannot read the compressed file"):
        load_arena(path)


@pytest.mark.parametrize("sep, name", [(";", "semicolon"), ("\t", "tab")])
def test_other_separators_get_a_separator_hint(tmp_path, sep, name):
    df = make_demo_data(20, seed=3)
    for col in ("prompt", "response_a", "response_b"):
        df[col] = df[col].map(json.dumps)
    path = tmp_path / "train.csv"
    df.to_csv(path, sep=sep, index=False)
    with pytest.raises(ArenaDataError, match=rf"looks {name}-separated") as e:
        load_arena(path)
    assert "quoting" not in str(e.value) and f"sep={sep!r}" in str(e.value)


def test_all_rows_sharing_one_prompt_is_said_plainly(tmp_path):
    df, _ = load_arena(_csv(tmp_path, [_row(i, labels=("1,0,0", "0,1,0", "0,0,1")[i % 3]) for i in range(30)]))
    with pytest.raises(ArenaDataError, match="all 30 rows share one prompt.*valid_frac=0"):
        split_train_valid(df, valid_frac=0.1)
