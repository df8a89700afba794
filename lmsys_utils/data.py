"""Read and validate the Arena CSVs: parsed conversations, labels, a grouped split and the A/B swap."""

from __future__ import annotations

import codecs
import dataclasses
import json
import lzma
import re
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
LABEL_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
CLASS_NAMES = ("model_a", "model_b", "tie")
ID2LABEL = dict(enumerate(CLASS_NAMES))
LABEL2ID = {v: k for k, v in ID2LABEL.items()}
_SWAP_PAIRS = (("response_a", "response_b"), ("model_a", "model_b"), ("winner_model_a", "winner_model_b"))
_SURROGATE = re.compile("[\ud800-\udfff]")


class ArenaDataError(ValueError):
    """A data file the project cannot use as it is; the message says where and how to fix it."""


@dataclasses.dataclass
class DataSummary:
    """What loading a file found: counts a user should see before training on it."""

    path: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)  # reason -> list of ids
    labeled: bool = False
    labels_ignored: bool = False
    soft_label_rows: int = 0
    label_counts: dict = dataclasses.field(default_factory=dict)
    multi_turn_rows: int = 0
    turn_count_mismatches: int = 0
    null_turns: int = 0
    empty_responses: int = 0
    identical_responses: int = 0
    surrogates_removed: int = 0
    invalid_utf8_bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {self.rows_read} rows read, {self.rows_kept} kept, "
            f"{sum(len(v) for v in self.dropped.values())} dropped",
        ]
        for reason, ids in self.dropped.items():
            shown = ", ".join(map(str, ids[:5])) + (" ..." if len(ids) > 5 else "")
            lines.append(f"  dropped {len(ids)} ({reason}): ids {shown}")
        if self.labeled:
            total = max(sum(self.label_counts.values()), 1)
            balance = ", ".join(f"{k} {v} ({v / total:.1%})" for k, v in self.label_counts.items())
            lines.append(f"  labels: {balance}; soft-label rows: {self.soft_label_rows}")
        elif self.labels_ignored:
            lines.append("  labels: present but ignored (not needed to predict)")
        else:
            lines.append("  labels: none (a test file)")
        lines += [
            f"  multi-turn rows: {self.multi_turn_rows}; prompt/response turn-count mismatches: "
            f"{self.turn_count_mismatches}",
            f"  null turns (read as empty text): {self.null_turns}; rows with an empty response: "
            f"{self.empty_responses}; identical A/B responses: {self.identical_responses}",
            f"  lone UTF-16 surrogates removed: {self.surrogates_removed}; invalid UTF-8 bytes replaced: "
            f"{self.invalid_utf8_bytes}",
        ]
        return "\n".join(lines)


def load_arena(path, drop_invalid: bool = False, labels: bool | None = None) -> tuple[pd.DataFrame, DataSummary]:
    """Read a competition-format CSV (train.csv, test.csv or one with extra columns; also .gz/.zip/.bz2/.xz).

    Returns the rows with `prompt`, `response_a`, `response_b` parsed into lists of strings and, for
    labeled files, float label columns plus an integer `label` (0 A, 1 B, 2 tie; argmax for soft
    labels), and a summary of what was found.

    Args:
        drop_invalid: drop rows with bad cells or labels (reported in the summary by id) instead of
            raising. Missing columns, empty or duplicate ids and unreadable files always raise.
        labels: None: check the label columns when the file has them; True: the file must have them
            (training); False: drop them unchecked (predicting: a test file that carries labels loses no row).
    """
    path = Path(path)
    summary = DataSummary(path=str(path))
    df = _read_csv(path, summary)
    if labels is False and any(c in df.columns for c in LABEL_COLUMNS):
        df = df.drop(columns=[c for c in LABEL_COLUMNS if c in df.columns])
        summary.labels_ignored = True
    missing = [c for c in ("id", *TEXT_COLUMNS) if c not in df.columns]
    label_cols = [c for c in LABEL_COLUMNS if c in df.columns]
    if label_cols and len(label_cols) < len(LABEL_COLUMNS):
        missing += [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise ArenaDataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}. "
            "The file needs id, prompt, response_a, response_b (and all three winner_* columns for training)."
            + _separator_hint(df.columns)
        )
    if labels and not label_cols:
        raise ArenaDataError(
            f"{path}: no label columns ({', '.join(LABEL_COLUMNS)}); this looks like a test file. Training "
            "needs a labeled file such as the competition's train.csv."
        )
    summary.labeled = bool(label_cols)
    summary.rows_read = len(df)
    df["id"] = parse_ids(df["id"], path)

    problems = []  # (row number, id, column, message)
    parsed = {c: [] for c in TEXT_COLUMNS}
    for i, row in enumerate(df.itertuples(index=False)):
        for col in TEXT_COLUMNS:
            turns, err = _parse_turns(getattr(row, col), summary)
            if err:
                problems.append((i + 1, row.id, col, err))
            parsed[col].append(turns)
    for col in TEXT_COLUMNS:
        df[col] = parsed[col]
    if summary.labeled:
        problems += _check_labels(df, summary)

    bad_rows = sorted({p[0] for p in problems})
    if problems and not drop_invalid:
        shown = "\n".join(f"  row {r}, id {i}, column {c}: {m}" for r, i, c, m in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ArenaDataError(
            f"{path}: {len(problems)} invalid cell(s) in {len(bad_rows)} row(s) (rows count from 1 after "
            f"the header):\n{shown}{more}\nFix these cells, or load with drop_invalid=True "
            "(`check-data --drop-invalid`) to drop the rows and report their ids."
        )
    for r, row_id, col, msg in problems:
        reason = f"invalid {col}"
        if row_id not in summary.dropped.get(reason, []):
            summary.dropped.setdefault(reason, []).append(row_id)
    df = df.drop(index=[r - 1 for r in bad_rows]).reset_index(drop=True)

    if summary.labeled:
        labels = df[list(LABEL_COLUMNS)].to_numpy(dtype=np.float64)
        df["label"] = labels.argmax(axis=1)
        counts = Counter(df["label"])
        summary.label_counts = {name: int(counts.get(k, 0)) for k, name in enumerate(CLASS_NAMES)}
    _count_shapes(df, summary)
    summary.rows_kept = len(df)
    return df, summary


def _read_csv(path: Path, summary: DataSummary) -> pd.DataFrame:
    if not path.is_file():
        raise ArenaDataError(f"{path}: no such file. Point --data at the competition's train.csv or test.csv.")

    def _count_replace(err):
        summary.invalid_utf8_bytes += err.end - err.start
        return "\ufffd", err.end

    codecs.register_error("lmsys_count_replace", _count_replace)
    try:
        # pandas infers the compression (.gz, .zip, .bz2, .xz) from the name
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                         encoding_errors="lmsys_count_replace")
    except pd.errors.EmptyDataError:
        raise ArenaDataError(f"{path}: the file is empty; expected a CSV with a header row and data rows.") from None
    except pd.errors.ParserError as e:
        hint = _separator_hint(_header(path)) or " Check quoting of the text columns."
        raise ArenaDataError(f"{path}: not a readable CSV ({str(e).strip()}).{hint}") from None
    except (EOFError, lzma.LZMAError, zipfile.BadZipFile, zlib.error, OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a real I/O fault (permissions, disk): the CLI names it
        raise ArenaDataError(f"{path}: cannot read the compressed file ({e}); is it complete and of the "
                             "type its name says (.gz, .zip with one CSV, .bz2, .xz)?") from None
    if df.empty:
        raise ArenaDataError(f"{path}: the file has a header but no data rows.")
    return df


def _header(path: Path) -> list[str]:
    try:
        return list(pd.read_csv(path, nrows=0, encoding="utf-8-sig", encoding_errors="replace").columns)
    except (ValueError, OSError, EOFError):
        return []


def _separator_hint(columns) -> str:
    """A hint when the header was split on commas but is held together by another separator."""
    header = ",".join(map(str, columns))
    for sep, name in ((";", "semicolon"), ("\t", "tab")):
        if header.count(sep) >= 3:  # the competition's header has 9 columns, a test file's 4
            return (f" The header looks {name}-separated ({header[:60]!r}); the project reads comma-separated "
                    f"files like the competition's: convert it with pandas.read_csv(path, sep={sep!r})"
                    ".to_csv('fixed.csv', index=False).")
    return ""


def parse_ids(ids: pd.Series, path: Path) -> pd.Series:
    """The ids exactly as read: int64 when every id is a plain whole number (as in the competition files),
    else the strings themselves (`001`, `1.0`, an id beyond int64 stay as written, so a submission repeats the
    test file's ids). Empty and duplicate ids are an error."""
    ids = ids.astype(str).reset_index(drop=True)
    empty = ids[ids.str.strip() == ""]
    if len(empty):
        rows = ", ".join(str(r + 1) for r in empty.index[:6])
        raise ArenaDataError(f"{path}: {len(empty)} empty id(s) in column id (row(s) {rows}, counting from 1 "
                             "after the header); every row needs a unique id. Fill them in or remove the rows.")
    if ids.map(_is_plain_int64).all():
        ids = ids.astype("int64")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        rows = ", ".join(f"row {r + 1} id {v}" for r, v in dup.head(6).items())
        raise ArenaDataError(
            f"{path}: {dup.nunique()} duplicate id(s) ({rows}); each row needs a unique id. "
            "Remove the repeated rows or renumber them."
        )
    return ids


def _is_plain_int64(text: str) -> bool:
    """Whether `text` is a whole number that int64 holds and that prints back as the same text."""
    if not re.fullmatch(r"-?\d+", text):
        return False
    value = int(text)
    return str(value) == text and -(2**63) <= value < 2**63


def _parse_turns(cell: str, summary: DataSummary) -> tuple[list[str], str | None]:
    """A JSON list of strings -> list of str; null turns become "", lone surrogates are removed."""
    try:
        value = json.loads(cell, strict=False)
    except (json.JSONDecodeError, TypeError):
        snippet = (cell[:60] + "...") if len(cell) > 60 else cell
        return [], f"not valid JSON ({snippet!r}); expected a JSON list of strings such as [\"hi\"]"
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        return [], f"JSON {type(value).__name__} but expected a list of strings (one per turn)"
    turns = []
    for v in value:
        if v is None:
            summary.null_turns += 1
            v = ""
        v, n = _SURROGATE.subn("", v)
        summary.surrogates_removed += n
        turns.append(v)
    return turns, None


def _check_labels(df: pd.DataFrame, summary: DataSummary) -> list:
    problems = []
    values = df[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    for i, (row_id, row) in enumerate(zip(df["id"], values.to_numpy(dtype=np.float64))):
        bad = [c for c, v in zip(LABEL_COLUMNS, row) if not np.isfinite(v) or v < 0 or v > 1]
        if bad:
            raw = df.at[i, bad[0]]
            problems.append((i + 1, row_id, bad[0], f"label {raw!r} is not a number in [0, 1]"))
        elif abs(row.sum() - 1) > 1e-3:
            col = ",".join(LABEL_COLUMNS)
            problems.append((i + 1, row_id, col, f"labels {row.tolist()} must sum to 1 (exactly one winner)"))
        elif not np.isin(row, (0.0, 1.0)).all():
            summary.soft_label_rows += 1
    df[list(LABEL_COLUMNS)] = values
    return problems


def _count_shapes(df: pd.DataFrame, summary: DataSummary) -> None:
    n_prompt = df["prompt"].map(len)
    summary.multi_turn_rows = int((n_prompt > 1).sum())
    summary.turn_count_mismatches = int(
        ((df["response_a"].map(len) != n_prompt) | (df["response_b"].map(len) != n_prompt)).sum()
    )
    empty = df["response_a"].map(is_empty) | df["response_b"].map(is_empty)
    summary.empty_responses = int(empty.sum())
    summary.identical_responses = int((df["response_a"] == df["response_b"]).sum())


def is_empty(turns: list[str]) -> bool:
    """Whether a response (its list of turns) holds no text at all."""
    return not any(t.strip() for t in turns)


def targets(df: pd.DataFrame) -> np.ndarray:
    """The (N, 3) target probabilities of labeled rows (one-hot for hard labels, as given for soft ones)."""
    missing = [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"these rows need the label columns {', '.join(LABEL_COLUMNS)}; missing "
                         f"{', '.join(missing)} (is this a test file?)")
    return df[list(LABEL_COLUMNS)].to_numpy(np.float32)


def swap_ab(df: pd.DataFrame) -> pd.DataFrame:
    """Exchange responses, model names and A/B labels (a tie stays a tie). Its own inverse.

    Used by both swap augmentation in training and swap test-time augmentation.
    """
    out = df.copy()
    for a, b in _SWAP_PAIRS:
        if a in out.columns and b in out.columns:
            out[a], out[b] = df[b], df[a]
    if "label" in out.columns:
        # class ids follow the columns: 0 (A wins) <-> 1 (B wins), 2 (tie) unchanged
        out["label"] = df["label"].map({0: 1, 1: 0, 2: 2}).astype(df["label"].dtype)
    return out


def split_train_valid(df: pd.DataFrame, valid_frac: float = 0.1, seed: int = 0):
    """Deterministic split, stratified by label and grouped by prompt text.

    The same prompt recurs across battles; all its rows go to one side so validation measures
    generalisation to new prompts.
    """
    if not 0 < valid_frac < 1:
        raise ValueError(f"valid_frac must be between 0 and 1, got {valid_frac}")
    key = df["prompt"].map(lambda turns: "\x1e".join(turns))
    if key.nunique() < 2:
        raise ArenaDataError(
            f"all {len(df)} rows share one prompt; the split keeps each prompt on one side, so it cannot hold "
            "rows out for validation. Use a file with more than one distinct prompt, or valid_frac=0 to train "
            "without validation."
        )
    groups = pd.DataFrame({"key": key, "label": df["label"] if "label" in df else 0})
    # each prompt group is stratified by its most common label
    group_label = groups.groupby("key")["label"].agg(lambda s: s.value_counts().index[0])
    group_size = groups.groupby("key").size()
    rng = np.random.default_rng(seed)
    valid_keys = set()
    for _, keys in group_label.groupby(group_label):
        order = rng.permutation(keys.index.to_numpy())
        target = valid_frac * group_size[order].sum()
        taken = 0
        for k in order:
            if taken >= target:
                break
            valid_keys.add(k)
            taken += group_size[k]
    is_valid = key.isin(valid_keys).to_numpy()
    if is_valid.all():
        raise ArenaDataError(
            f"valid_frac={valid_frac} put every one of the {key.nunique()} distinct prompts ({len(df)} rows) into "
            "validation, leaving nothing to train on; lower valid_frac or add rows with other prompts."
        )
    return df[~is_valid].reset_index(drop=True), df[is_valid].reset_index(drop=True)


def to_competition_csv(df: pd.DataFrame, path) -> None:
    """Write parsed rows back in the competition's format (JSON-encoded turn lists)."""
    out = df.drop(columns=["label"], errors="ignore").copy()
    for col in TEXT_COLUMNS:
        out[col] = out[col].map(lambda turns: json.dumps(turns, ensure_ascii=False))
    out.to_csv(path, index=False)


def make_folds(df: pd.DataFrame, k: int = 5, seed: int = 42) -> pd.Series:
    """Fold number (0..k-1) of each row: deterministic, grouped by prompt, stratified by label.

    Built from `split_train_valid`: fold 0 takes 1/k of the rows, fold 1 takes 1/(k-1) of the rest, and so
    on, so folds inherit its grouping (a prompt's rows share one fold) and its stratification.
    """
    if k < 2:
        raise ValueError(f"folds must be at least 2, got {k}")
    n_prompts = df["prompt"].map(lambda turns: "\x1e".join(turns)).nunique()
    if n_prompts < k:
        raise ValueError(f"{k} folds need at least {k} distinct prompts; the data has {n_prompts}")
    rest = df.assign(_row=np.arange(len(df)))
    folds = np.full(len(df), k - 1)
    for fold in range(k - 1):
        rest, taken = split_train_valid(rest, valid_frac=1 / (k - fold), seed=seed + fold)
        folds[taken["_row"].to_numpy()] = fold
    counts = np.bincount(folds, minlength=k)
    if (counts == 0).any():
        raise ValueError(f"fold(s) {np.flatnonzero(counts == 0).tolist()} came out empty: too few prompts "
                         f"({n_prompts}) for {k} folds; use fewer folds")
    return pd.Series(folds, index=df.index, name="fold")


def read_id_table(path, what: str) -> pd.DataFrame:
    """A CSV of id and the three label columns, as text (ids through parse_ids), refused with one clear error
    when it is missing, unreadable, lacks a column or has no rows."""
    path = Path(path)
    if not path.is_file():
        raise ArenaDataError(f"{path}: no such {what} file.")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ArenaDataError(f"{path}: not a readable CSV ({e}).") from None
    missing = [c for c in ("id", *LABEL_COLUMNS) if c not in raw.columns]
    if missing:
        raise ArenaDataError(f"{path}: missing column(s) {', '.join(missing)}; {what} files hold "
                             f"id,{','.join(LABEL_COLUMNS)}.")
    if raw.empty:
        raise ArenaDataError(f"{path}: no rows.")
    raw["id"] = parse_ids(raw["id"], path)
    return raw


def read_probabilities(path, what: str = "predictions") -> tuple[pd.Series, np.ndarray]:
    """Ids and row-normalized probabilities of a CSV of id and the three label columns (a submission, an
    oof.csv, a teacher); a row that is not probabilities (non-finite, negative as logits are, all zero) is
    refused with its row and id."""
    raw = read_id_table(path, what)
    probs = raw[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (probs.sum(axis=1) <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ArenaDataError(
            f"{path}: {bad.sum()} row(s) are not probabilities (finite, non-negative, not all zero), first at "
            f"row {row + 1}, id {raw['id'][row]}: {raw.loc[row, list(LABEL_COLUMNS)].tolist()}. Write softmax "
            "outputs, not logits."
        )
    return raw["id"], probs / probs.sum(axis=1, keepdims=True)


def load_teacher(path, ids, fallback: bool = False) -> np.ndarray:
    """A teacher's probabilities (CSV of id and the three label columns) aligned to `ids`, shape (N, 3).

    Ids are matched as text, so a file of integer competition ids and `extra-` ids both match. Rows are
    renormalized to sum to 1. Ids the teacher lacks raise ArenaDataError with the count and a few ids, or
    with `fallback` become NaN rows (the count is printed) for the caller to replace by hard labels.
    """
    teacher_ids, probs = read_probabilities(path, "teacher")
    table = pd.DataFrame(probs, index=teacher_ids.astype(str).str.strip())
    wanted = pd.Index([str(i) for i in ids])
    absent = wanted[~wanted.isin(table.index)]
    if len(absent) and not fallback:
        raise ArenaDataError(
            f"{path}: no teacher row for {len(absent)} of {len(wanted)} training id(s) (e.g. "
            f"{', '.join(absent[:5])}); predict them with the teacher too, or allow the fallback to hard labels."
        )
    if len(absent):
        print(f"{path}: no teacher row for {len(absent)} of {len(wanted)} id(s); those rows train on hard labels")
    return table.reindex(wanted).to_numpy(dtype=np.float64)


def distill_targets(hard, teacher, alpha: float, temperature: float = 1.0) -> np.ndarray:
    """Training targets: `alpha` * teacher + (1 - alpha) * hard labels, shape (N, 3).

    Args:
        hard: class ids (N,) or target probabilities (N, 3).
        teacher: teacher probabilities (N, 3); NaN rows (no teacher) take the hard labels alone.
        alpha: teacher weight in [0, 1].
        temperature: > 1 softens the teacher (p ** (1 / T), renormalized), < 1 sharpens it.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"distill alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"distill temperature must be positive, got {temperature}")
    hard = np.asarray(hard)
    hard = np.eye(len(LABEL_COLUMNS))[hard.astype(int)] if hard.ndim == 1 else hard.astype(np.float64)
    teacher = np.asarray(teacher, dtype=np.float64)
    if teacher.shape != hard.shape:
        raise ValueError(f"teacher has shape {teacher.shape} but the labels {hard.shape}")
    soft = teacher ** (1 / temperature)
    soft = soft / soft.sum(axis=1, keepdims=True)
    no_teacher = np.isnan(soft).any(axis=1)
    soft[no_teacher] = hard[no_teacher]
    return alpha * soft + (1 - alpha) * hard
