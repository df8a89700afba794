import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest

from lmsys_utils.data import ArenaDataError, load_arena, swap_ab, to_competition_csv
from lmsys_utils.extra import ID_PREFIX, battle_key, load_extra, write_extra

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches converted files; keep that cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _parts(text, image=False):
    parts = [{"type": "text", "text": text, "image": None, "mimeType": None}]
    if image:
        parts.append({"type": "image", "text": None, "image": "https://example.org/cat.png", "mimeType": "image/png"})
    return parts


def _conversation(prompts, answers, as_parts=False, image_in_first=False):
    messages = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        user = _parts(p, image=image_in_first and i == 0) if as_parts else p
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": _parts(a) if as_parts else a}]
    return messages


def _battle(i, winner, prompts=None, a=None, b=None, **kw):
    prompts = prompts or [f"Question number {i}?"]
    a = a or [f"Answer A to {i}." for _ in prompts]
    b = b or [f"Answer B to {i}, longer." for _ in prompts]
    return {"id": f"v{i}", "model_a": "gpt-4o", "model_b": "llama-3-70b", "winner": winner,
            "conversation_a": _conversation(prompts, a, **kw), "conversation_b": _conversation(prompts, b, **kw),
            "language": "English", "conv_metadata": {"sum_assistant_a_tokens": 7, "turns": len(prompts)}}


WINNERS = [("model_a", [1, 0, 0]), ("model_b", [0, 1, 0]), ("tie", [0, 0, 1]),
           ("tie (bothbad)", [0, 0, 1]), ("both_bad", [0, 0, 1])]


def test_140k_schema_parquet_with_parts_and_an_image(tmp_path):
    rows = [_battle(i, w, as_parts=True, image_in_first=(i == 0)) for i, (w, _) in enumerate(WINNERS)]
    rows.append(_battle(9, "model_a", prompts=["Two turns", "and more"], a=["a1", "a2"], b=["b1", "b2"],
                        as_parts=True))
    pd.DataFrame(rows).to_parquet(tmp_path / "arena.parquet")
    df, report = load_extra(tmp_path / "arena.parquet")

    assert report.rows_read == report.rows_kept == len(rows) == len(df)
    assert report.non_text_rows == report.non_text_parts == 1  # the image part; its row keeps its text
    assert df["prompt"][0] == ["Question number 0?"]
    for i, (_, labels) in enumerate(WINNERS):
        assert df.loc[i, ["winner_model_a", "winner_model_b", "winner_tie"]].tolist() == labels
    last = df.iloc[-1]
    assert (last["prompt"], last["response_a"], last["response_b"]) == (["Two turns", "and more"], ["a1", "a2"],
                                                                        ["b1", "b2"])
    assert last["model_a"] == "gpt-4o" and last["model_b"] == "llama-3-70b" and last["source_id"] == "v9"
    assert json.loads(last["conv_metadata"]) == {"sum_assistant_a_tokens": 7, "turns": 2}
    assert last["language"] == "English"
    assert df["id"].str.fullmatch(ID_PREFIX + "[0-9a-f]{16}").all() and df["id"].is_unique
    assert "conversation_a" not in df.columns and "winner" not in df.columns


def test_chatbot_arena_conversations_schema_jsonl(tmp_path):
    # lmsys/chatbot_arena_conversations: content is a plain string, ids in question_id
    rows = [_battle(i, w) for i, (w, _) in enumerate(WINNERS)]
    for row in rows:
        row["question_id"] = row.pop("id")
        row["judge"] = "arena_user_1"
    path = tmp_path / "conversations.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    df, report = load_extra(path)
    assert report.rows_kept == 5 and report.non_text_rows == 0
    assert df["response_b"][3] == ["Answer B to 3, longer."]
    assert df[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy().tolist() == [w[1] for w in WINNERS]
    assert df["source_id"].tolist() == [f"v{i}" for i in range(5)] and (df["judge"] == "arena_user_1").all()


def test_conversations_as_json_text_in_csv(tmp_path):
    # the 100k set declares its conversations as strings: JSON text of the message list
    rows = [_battle(i, w) for i, (w, _) in enumerate(WINNERS[:3])]
    for row in rows:
        row["question_id"] = row.pop("id")
        for side in ("a", "b"):
            row[f"conversation_{side}"] = json.dumps(row[f"conversation_{side}"])
        row["conv_metadata"] = json.dumps(row["conv_metadata"])
    pd.DataFrame(rows).to_csv(tmp_path / "arena100k.csv", index=False)
    df, report = load_extra(tmp_path / "arena100k.csv")
    assert report.rows_kept == 3 and df["prompt"][2] == ["Question number 2?"]
    assert df["winner_model_b"].tolist() == [0, 1, 0]


def test_competition_schema_csv_and_its_excluded_copy(tmp_path, arena_train_path):
    # the 55k set is the competition's train.csv: every battle is excluded by the train file itself
    df, report = load_extra(arena_train_path, exclude=[arena_train_path])
    assert df.empty and report.rows_read == 999
    assert report.duplicates_excluded == {str(arena_train_path): 998} and len(report.no_text) == 1
    alone, report = load_extra(arena_train_path)
    assert report.rows_kept == 998 and report.duplicates_within == 0
    original, _ = load_arena(arena_train_path)
    kept = original[original["id"].astype(str).isin(alone["source_id"].astype(str))]
    assert len(kept) == 998 and alone["prompt"].tolist() == kept["prompt"].tolist()


def test_dedup_within_the_source_and_against_excludes(tmp_path):
    rows = [_battle(1, "model_a"), _battle(2, "tie")]
    swapped = _battle(3, "model_b")  # battle 1 with A and B exchanged, in other case and spacing
    swapped["conversation_a"] = _conversation(["QUESTION   number 1?"], ["Answer B to 1, longer."])
    swapped["conversation_b"] = _conversation(["Question number 1?"], ["answer a to 1."])
    rows += [swapped, _battle(4, "model_b"), _battle(5, "model_a")]
    pd.DataFrame(rows).to_parquet(tmp_path / "arena.parquet")
    competition = pd.DataFrame([
        {"id": 17, "model_a": "x", "model_b": "y", "prompt": ["Question number 4?"],
         "response_a": ["Answer B to 4, longer."], "response_b": ["Answer A to 4."],  # battle 4, swapped
         "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0}])
    to_competition_csv(competition, tmp_path / "train.csv")
    test = competition.drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]).assign(
        id=18, prompt=[["Question number 5?"]], response_a=[["Answer A to 5."]],
        response_b=[["Answer B to 5, longer."]])
    to_competition_csv(test, tmp_path / "test.csv")

    df, report = load_extra(tmp_path / "arena.parquet", exclude=[tmp_path / "train.csv", tmp_path / "test.csv"])
    assert report.rows_read == 5 and report.duplicates_within == 1
    assert report.duplicates_excluded == {str(tmp_path / "train.csv"): 1, str(tmp_path / "test.csv"): 1}
    assert report.rows_kept == 2 and df["source_id"].tolist() == ["v1", "v2"]
    assert "duplicates within the source: 1" in str(report) and "test.csv: 1" in str(report)


def test_battle_key_is_symmetric_and_normalized():
    key = battle_key(["Hi  there"], ["one"], ["two"])
    assert key == battle_key(["hi there"], ["two"], ["ONE"])
    assert key != battle_key(["hi there"], ["one"], ["three"])
    assert battle_key(["a", "b"], ["x"], ["y"]) != battle_key(["a b"], ["x"], ["y"])  # turn boundaries count


def test_rows_without_text_are_dropped_and_counted(tmp_path):
    image_only = _battle(1, "model_a", as_parts=True)
    for side in ("a", "b"):
        image_only[f"conversation_{side}"][0]["content"] = _parts("", image=True)
    empty_answers = _battle(2, "tie", a=[""], b=["  "], as_parts=True)
    rows = [image_only, empty_answers, _battle(3, "model_b", as_parts=True)]
    pd.DataFrame(rows).to_parquet(tmp_path / "arena.parquet")
    df, report = load_extra(tmp_path / "arena.parquet")
    assert report.no_text == ["v1", "v2"] and report.rows_kept == 1 and df["source_id"].tolist() == ["v3"]
    assert report.non_text_rows == 1 and report.non_text_parts == 1  # the user turn counts once, not per side
    assert "dropped without text: 2 (source ids v1, v2)" in str(report)


def test_other_roles_are_left_out_and_counted(tmp_path):
    row = _battle(1, "model_a")
    row["conversation_a"] = [{"role": "system", "content": "be brief"}] + row["conversation_a"]
    pd.DataFrame([row]).to_parquet(tmp_path / "arena.parquet")
    df, report = load_extra(tmp_path / "arena.parquet")
    assert report.other_role_messages == 1 and df["prompt"][0] == ["Question number 1?"]


def test_unknown_winner_names_row_id_and_column(tmp_path):
    rows = [_battle(1, "model_a"), _battle(2, "model_c")]
    pd.DataFrame(rows).to_parquet(tmp_path / "arena.parquet")
    message = r"(?s)row 2, id v2, column winner: unknown value 'model_c'.*one of model_a"
    with pytest.raises(ArenaDataError, match=message):
        load_extra(tmp_path / "arena.parquet")


def test_unusable_sources(tmp_path):
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ArenaDataError, match="other.parquet: found columns question, answer; expected conversation_a"):
        load_extra(tmp_path / "other.parquet")
    with pytest.raises(ArenaDataError, match="missing.parquet: no such file"):
        load_extra(tmp_path / "missing.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ArenaDataError, match="broken.parquet: not a readable parquet file"):
        load_extra(tmp_path / "broken.parquet")
    (tmp_path / "arena.txt").write_text("x")
    with pytest.raises(ArenaDataError, match="unknown file type"):
        load_extra(tmp_path / "arena.txt")


def test_ids_are_stable_and_never_competition_ids(tmp_path):
    rows = [_battle(i, "tie") for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    swapped = pd.DataFrame(rows).rename(columns={"conversation_a": "conversation_b",
                                                 "conversation_b": "conversation_a"})
    swapped.to_json(tmp_path / "b.jsonl", orient="records", lines=True)
    first, _ = load_extra(tmp_path / "a.parquet")
    again, _ = load_extra(tmp_path / "a.parquet")
    other_source, _ = load_extra(tmp_path / "b.jsonl")
    assert first["id"].tolist() == again["id"].tolist() == other_source["id"].tolist()
    assert pd.to_numeric(first["id"], errors="coerce").isna().all()


def test_write_extra_passes_check_data_and_protects_inputs(tmp_path, arena_train_path):
    rows = [_battle(i, w, as_parts=True) for i, (w, _) in enumerate(WINNERS)]
    pd.DataFrame(rows).to_parquet(tmp_path / "arena.parquet")
    report = write_extra(tmp_path / "arena.parquet", tmp_path / "extra.csv", exclude=[arena_train_path])
    df, summary = load_arena(tmp_path / "extra.csv")
    assert summary.rows_kept == report.rows_kept == 5 and summary.label_counts == {"model_a": 1, "model_b": 1, "tie": 3}
    assert df["prompt"].tolist() == [[f"Question number {i}?"] for i in range(5)]

    before = (tmp_path / "extra.csv").read_bytes()
    with pytest.raises(ArenaDataError, match="would overwrite an input"):
        write_extra(tmp_path / "arena.parquet", tmp_path / "extra.csv", exclude=[tmp_path / "extra.csv"])
    with pytest.raises(ArenaDataError, match="no rows left to write"):
        write_extra(tmp_path / "arena.parquet", tmp_path / "again.csv", exclude=[tmp_path / "extra.csv"])
    assert (tmp_path / "extra.csv").read_bytes() == before and not (tmp_path / "again.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def _real_sample_as_conversations(arena_train_path, path, swap=False):
    """The real sample rebuilt in the 140k set's schema (written under the test's tmp folder only)."""
    df, _ = load_arena(arena_train_path)
    if swap:
        df = swap_ab(df)
    names = ("model_a", "model_b", "tie")
    rows = [{"id": f"r{r.id}", "model_a": r.model_a, "model_b": r.model_b, "winner": names[r.label],
             "conversation_a": _conversation(r.prompt, r.response_a, as_parts=True),
             "conversation_b": _conversation(r.prompt, r.response_b, as_parts=True)} for r in df.itertuples()]
    pd.DataFrame(rows).to_parquet(path)
    return df


def test_real_sample_round_trip_and_swapped_exclusion(tmp_path, arena_train_path):
    original = _real_sample_as_conversations(arena_train_path, tmp_path / "real.parquet")
    df, report = load_extra(tmp_path / "real.parquet")
    # one battle has no text on either side; every other one comes back with its turns and its winner
    assert report.rows_read == 999 and report.rows_kept == 998 and len(report.no_text) == 1
    back = original.set_index(original["id"].map(lambda i: f"r{i}")).loc[df["source_id"]]
    assert df["response_a"].tolist() == back["response_a"].tolist()
    assert (df[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy().argmax(1) == back["label"]).all()

    _real_sample_as_conversations(arena_train_path, tmp_path / "swapped.parquet", swap=True)
    _, report = load_extra(tmp_path / "swapped.parquet", exclude=[arena_train_path])
    assert report.rows_kept == 0 and report.duplicates_excluded[str(arena_train_path)] == 998


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lmsys_utils", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_extra_data(tmp_path, arena_train_path, arena_test_path):
    rows = [_battle(i, w, as_parts=True, image_in_first=(i == 1)) for i, (w, _) in enumerate(WINNERS)]
    rows.append(rows[0])
    pd.DataFrame(rows).to_parquet(tmp_path / "arena.parquet")
    env = {"HF_DATASETS_CACHE": str(tmp_path / "cache")}
    run = _cli("extra-data", tmp_path / "arena.parquet", "--out", tmp_path / "extra.csv",
               "--exclude", arena_train_path, arena_test_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "6 rows read, 5 kept" in run.stdout and "not text-only: 1 rows (1 non-text parts dropped)" in run.stdout
    assert "duplicates within the source: 1" in run.stdout and "already in" in run.stdout
    check = _cli("check-data", tmp_path / "extra.csv")
    assert check.returncode == 0 and "5 rows read, 5 kept, 0 dropped" in check.stdout

    bad = _cli("extra-data", tmp_path / "nothing.parquet", "--out", tmp_path / "x.csv", env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == (
        f"error: {tmp_path / 'nothing.parquet'}: no such file. Give a local .parquet, .jsonl or .csv file, "
        "or a hub dataset id such as lmarena-ai/arena-human-preference-140k.")


@pytest.mark.slow
def test_cli_hub_id_offline_is_one_clear_error(tmp_path):
    secret = "hf_thisMustNeverBePrinted123"
    run = _cli("extra-data", "lmarena-ai/arena-human-preference-140k", "--out", tmp_path / "extra.csv",
               env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": secret, "HF_HOME": str(tmp_path / "hf")})
    assert run.returncode == 1
    assert run.stderr.startswith("error: cannot reach the Hugging Face Hub to download lmarena-ai/")
    assert "pass the local file instead" in run.stderr and "Traceback" not in run.stderr
    assert secret not in run.stdout + run.stderr and not (tmp_path / "extra.csv").exists()
