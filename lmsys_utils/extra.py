"""Public Arena preference sets (hub ids or local parquet/jsonl/csv, read with `datasets`) -> competition rows.

Conversations become the competition's turn lists, winners its three label columns; battles already in the
source or in an excluded file (the competition train/test) are dropped, swapped copies included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path

import datasets
import pandas as pd

from .auth import is_local, resolve_token
from .data import LABEL_COLUMNS, TEXT_COLUMNS, ArenaDataError, is_empty, load_arena, to_competition_csv

HUB_SETS = (
    "lmarena-ai/arena-human-preference-55k",
    "lmarena-ai/arena-human-preference-100k",
    "lmarena-ai/arena-human-preference-140k",
    "lmsys/chatbot_arena_conversations",
)
WINNER_LABELS = {
    "model_a": (1, 0, 0),
    "model_b": (0, 1, 0),
    "tie": (0, 0, 1),
    "tie (bothbad)": (0, 0, 1),
    "both_bad": (0, 0, 1),
}
ID_PREFIX = "extra-"
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# replaced by the turn lists; full_conversation (the 140k set) repeats earlier votes' context, not this battle's
_CONVERSATION_COLUMNS = ("conversation_a", "conversation_b", "full_conversation")
_SOURCE_ID_COLUMNS = ("id", "question_id")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass
class ExtraReport:
    """What converting one source found; every dropped row is counted here."""

    source: str
    """The hub id or file read."""
    rows_read: int = 0
    """Rows in the source (all splits)."""
    non_text_rows: int = 0
    """Rows with at least one non-text part (an image...); the parts are dropped, the row kept if text remains."""
    non_text_parts: int = 0
    """Non-text message parts dropped."""
    other_role_messages: int = 0
    """Messages neither from the user nor the assistant (e.g. system), left out of the turns."""
    no_text: list = dataclasses.field(default_factory=list)
    """Source ids of rows dropped because the prompt or both responses hold no text."""
    duplicates_within: int = 0
    """Rows dropped as repeats of an earlier row of the source (A/B-swapped copies included)."""
    duplicates_excluded: dict = dataclasses.field(default_factory=dict)
    """Exclude file -> rows dropped because the battle is in that file."""
    rows_kept: int = 0
    """Rows in the output."""

    def __str__(self) -> str:
        shown = ", ".join(map(str, self.no_text[:5])) + (" ..." if len(self.no_text) > 5 else "")
        lines = [
            f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept",
            f"  not text-only: {self.non_text_rows} rows ({self.non_text_parts} non-text parts dropped); "
            f"messages of other roles left out: {self.other_role_messages}",
            f"  dropped without text: {len(self.no_text)}" + (f" (source ids {shown})" if self.no_text else ""),
            f"  dropped as duplicates within the source: {self.duplicates_within}",
        ]
        lines += [f"  dropped as already in {path}: {n}" for path, n in self.duplicates_excluded.items()]
        return "\n".join(lines)


def load_extra(source, exclude=(), token: str | None = None) -> tuple[pd.DataFrame, ExtraReport]:
    """Read a public Arena preference set and return new battles in the competition's parsed form.

    The rows have `id`, `model_a`, `model_b`, `prompt`, `response_a`, `response_b` (lists of turns),
    the three label columns, `source_id` (the source's own id), `extra_source` and the source's other
    columns (nested values as JSON text).

    Ids are `extra-` and 16 hex digits of the battle's content hash (`battle_key`): stable across runs and
    sources (the same battle always gets the same id), unique within the output because duplicates are
    dropped, and never equal to a competition id, which is an integer.

    Args:
        source: a hub dataset id (see HUB_SETS) or a local .parquet, .jsonl/.json or .csv file, either with
            conversation_a/conversation_b and winner columns or in the competition's CSV schema.
        exclude: competition-format CSVs (train.csv, test.csv, earlier extra files) whose battles are dropped.
        token: Hugging Face token for hub ids; None resolves it (HF_TOKEN, Kaggle secret, stored login).
    """
    report = ExtraReport(source=str(source))
    ds = _read_source(source, token)
    if "full_conversation" in ds.column_names:
        ds = ds.remove_columns("full_conversation")  # the largest column, never used: skip decoding it
    report.rows_read = len(ds)
    columns = ds.column_names
    if "conversation_a" in columns and "conversation_b" in columns:
        convert, needed = _from_conversations, ["winner"]
    elif all(c in columns for c in TEXT_COLUMNS):
        convert, needed = _from_competition, [] if "winner" in columns else list(LABEL_COLUMNS)
    else:
        raise ArenaDataError(
            f"{source}: found columns {', '.join(columns)}; expected conversation_a, conversation_b and winner "
            "(the Arena preference sets) or prompt, response_a, response_b and the winner_* columns "
            "(the competition's schema)."
        )
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ArenaDataError(f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(columns)}.")

    id_column = next((c for c in _SOURCE_ID_COLUMNS if c in columns), None)
    skip = {*_CONVERSATION_COLUMNS, *TEXT_COLUMNS, *LABEL_COLUMNS, "winner", "model_a", "model_b", id_column}
    extra_columns = [c for c in columns if c not in skip]
    excluded = {Path(p): _battle_keys(p) for p in exclude}
    report.duplicates_excluded = {str(p): 0 for p in excluded}

    rows, problems, seen = [], [], set()
    for i, record in enumerate(ds):
        source_id = record[id_column] if id_column else i + 1
        try:
            prompt, response_a, response_b, labels = convert(record, report)
        except ValueError as e:
            problems.append(f"  row {i + 1}, id {source_id}, {e}")
            continue
        if is_empty(prompt) or (is_empty(response_a) and is_empty(response_b)):
            report.no_text.append(source_id)
            continue
        key = battle_key(prompt, response_a, response_b)
        if key in seen:
            report.duplicates_within += 1
            continue
        seen.add(key)
        hit = next((p for p, keys in excluded.items() if key in keys), None)
        if hit is not None:
            report.duplicates_excluded[str(hit)] += 1
            continue
        row = {"id": ID_PREFIX + key[:16], "model_a": record.get("model_a", ""), "model_b": record.get("model_b", ""),
               "prompt": prompt, "response_a": response_a, "response_b": response_b,
               **dict(zip(LABEL_COLUMNS, labels)), "source_id": source_id, "extra_source": str(source)}
        row.update({c: _plain(record[c]) for c in extra_columns if c not in row})
        rows.append(row)
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ArenaDataError(
            f"{source}: {len(problems)} row(s) cannot be converted (rows count from 1):\n"
            + "\n".join(problems[:5]) + more
            + f"\nwinner must be one of {', '.join(WINNER_LABELS)}; conversations are lists of "
              "{role, content} messages. Fix or remove these rows."
        )
    report.rows_kept = len(rows)
    return pd.DataFrame(rows), report


def write_extra(source, out, exclude=(), token: str | None = None) -> ExtraReport:
    """`load_extra` and write the rows as a competition CSV that `check-data` accepts.

    The file is checked with `load_arena` under a temporary name and only then renamed to `out`, so a
    failure never leaves a half-written or invalid file. `out` may not be the source or an excluded file.
    """
    out = Path(out)
    inputs = [Path(p) for p in (source, *exclude) if is_local(p)]
    if any(p.exists() and out.exists() and out.samefile(p) for p in inputs):
        raise ArenaDataError(f"{out}: the output would overwrite an input file; choose another --out path.")
    df, report = load_extra(source, exclude=exclude, token=token)
    if df.empty:
        raise ArenaDataError(f"{source}: no rows left to write ({report.rows_read} read; see the counts):\n{report}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".csv", dir=out.parent)
    os.close(fd)
    try:
        to_competition_csv(df, tmp)
        load_arena(tmp)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return report


def battle_key(prompt, response_a, response_b) -> str:
    """Hash of the normalized prompt and the unordered pair of responses (an A/B-swapped copy has the same key).

    Normalized: Unicode NFKC, case-folded, runs of whitespace as one space; turns keep their boundaries.
    """
    p = _join(prompt)
    a, b = sorted((_join(response_a), _join(response_b)))
    return hashlib.sha256("\x1f".join((p, a, b)).encode("utf-8", "surrogatepass")).hexdigest()


def _join(turns) -> str:
    return "\x1e".join(" ".join(unicodedata.normalize("NFKC", t).casefold().split()) for t in turns)


def _battle_keys(path) -> set:
    df, _ = load_arena(path)
    return {battle_key(p, a, b) for p, a, b in zip(df["prompt"], df["response_a"], df["response_b"])}


def _read_source(source, token):
    path = Path(str(source)).expanduser()
    if path.suffix.lower() in _FILE_BUILDERS or is_local(source):
        if not path.is_file():
            raise ArenaDataError(f"{path}: no such file. Give a local .parquet, .jsonl or .csv file, or a hub "
                                 f"dataset id such as {HUB_SETS[2]}.")
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ArenaDataError(f"{path}: unknown file type {path.suffix!r}; use .parquet, .jsonl/.json or .csv.")
        # keep_default_na=False: a cell reading "null" or "NA" is text, not a missing value
        options = {"keep_default_na": False} if builder == "csv" else {}
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as e:  # arrow/pandas/json errors of many kinds: all mean the file is not readable
            raise ArenaDataError(f"{path}: not a readable {builder} file ({type(e).__name__}: "
                                 f"{str(e)[:300]}). Check the file's format.") from None
    try:
        loaded = datasets.load_dataset(str(source), token=resolve_token(token))
    except datasets.exceptions.DatasetNotFoundError:
        raise ArenaDataError(
            f"no dataset {source} on the Hugging Face Hub, or it is gated and not accessible: check the id "
            f"(one of {', '.join(HUB_SETS)}); for a gated set accept its conditions on "
            f"https://huggingface.co/datasets/{source} and set HF_TOKEN."
        ) from None
    except ConnectionError:
        raise ArenaDataError(
            f"cannot reach the Hugging Face Hub to download {source} (offline, e.g. a Kaggle notebook with "
            "the internet off): download its parquet files elsewhere, attach them as a Kaggle dataset and "
            "pass the local file instead."
        ) from None
    return datasets.concatenate_datasets(list(loaded.values())) if isinstance(loaded, dict) else loaded


def _from_conversations(record, report):
    turns, non_text = {}, False
    for side in ("a", "b"):
        messages = record[f"conversation_{side}"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise ValueError(f"column conversation_{side}: not valid JSON") from None
        if not isinstance(messages, list):
            raise ValueError(f"column conversation_{side}: expected a list of messages, got {type(messages).__name__}")
        user, assistant = [], []
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"column conversation_{side}: a message without a role ({str(message)[:60]!r})")
            role = message["role"]
            if role not in ("user", "assistant"):
                report.other_role_messages += 1
                continue
            if role == "user" and side == "b":
                continue  # the user turns are taken from side A (both sides answer the same ones)
            text, dropped = _message_text(message.get("content"), f"conversation_{side}")
            report.non_text_parts += dropped
            non_text |= dropped > 0
            (user if role == "user" else assistant).append(text)
        turns[side] = (user, assistant)
    report.non_text_rows += non_text
    return turns["a"][0], turns["a"][1], turns["b"][1], _winner_labels(record["winner"])


def _message_text(content, column) -> tuple[str, int]:
    """A message's text and how many non-text parts it had."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return _SURROGATE.sub("", content), 0
    if not isinstance(content, list):
        raise ValueError(f"column {column}: content is {type(content).__name__}; expected text or a list of parts")
    texts, dropped = [], 0
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(_SURROGATE.sub("", part["text"]))
        else:
            dropped += 1
    return "\n".join(texts), dropped


def _from_competition(record, report):
    turns = []
    for col in TEXT_COLUMNS:
        value = record[col]
        try:
            value = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            raise ValueError(f"column {col}: not valid JSON; expected a JSON list of strings") from None
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            raise ValueError(f"column {col}: expected a list of strings (one per turn)")
        turns.append([_SURROGATE.sub("", v or "") for v in value])
    if "winner" in record:
        return (*turns, _winner_labels(record["winner"]))
    try:
        labels = tuple(int(float(record[c])) for c in LABEL_COLUMNS)
    except (TypeError, ValueError):
        labels = ()
    if sorted(labels) != [0, 0, 1]:
        raise ValueError(f"columns {', '.join(LABEL_COLUMNS)}: {[record[c] for c in LABEL_COLUMNS]} is not one-hot")
    return (*turns, labels)


def _winner_labels(winner):
    if winner not in WINNER_LABELS:
        raise ValueError(f"column winner: unknown value {winner!r}")
    return WINNER_LABELS[winner]


def _plain(value):
    """Nested values (structs, lists) as JSON text so they survive the CSV."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value
