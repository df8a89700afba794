"""One row -> model input: the conversation template, per-part token budgets and batched encoding."""

from __future__ import annotations

import contextlib
import dataclasses

import pandas as pd

PARTS = ("prompt", "response_a", "response_b")


@dataclasses.dataclass(frozen=True)
class Template:
    """Markers written before each turn; rounds are interleaved prompt, response A, response B.

    Markers end in a newline so that, with byte-level BPE tokenizers, the text after a marker tokenizes
    the same alone as inside the full string.
    """

    prompt: str = "<prompt>\n"
    """Before each prompt turn."""
    response_a: str = "\n\n<response_a>\n"
    """Before each turn of response A."""
    response_b: str = "\n\n<response_b>\n"
    """Before each turn of response B."""
    separator: str = "\n\n"
    """Between rounds (before every prompt marker but the first)."""


DEFAULT_TEMPLATE = Template()


def format_row(prompt, response_a, response_b, template: Template = DEFAULT_TEMPLATE) -> str:
    """The untruncated model input text of one row (for display and EDA; BOS not included)."""
    rounds = _rounds(prompt, response_a, response_b)
    return template.separator.join(
        f"{template.prompt}{p}{template.response_a}{a}{template.response_b}{b}" for p, a, b in rounds
    )


def encode_rows(tokenizer, df: pd.DataFrame, max_length: int, prompt_share: float = 0.3, keep_tail: int = 0,
                template: Template = DEFAULT_TEMPLATE, chunk_rows: int = 4096, return_stats: bool = False):
    """Token ids of every row: BOS once, markers intact, at most `max_length` ids, no padding.

    A row that is too long shares the budget: the prompt takes at most `prompt_share` of it, response A
    and response B get equal shares, and what a short part leaves goes to the others; so no non-empty
    part ever loses all its tokens (unless `max_length` cannot hold the markers of the rounds that part
    has text in: dozens of rounds at a few hundred tokens). Within a part the most recent turns are kept whole and the oldest
    kept turn keeps its head (and its last `keep_tail` tokens); rounds left with no text are dropped
    with their markers.

    Args:
        df: rows with `prompt`, `response_a`, `response_b` as lists of turns (as `load_arena` returns).
        chunk_rows: rows tokenized per batched call (bounds the memory of untruncated ids).
        return_stats: also return a DataFrame with each part's full and kept token counts per row.
    """
    if not 0 < prompt_share < 1:
        raise ValueError(f"prompt_share must be between 0 and 1, got {prompt_share}")
    if keep_tail < 0:
        raise ValueError(f"keep_tail must be >= 0, got {keep_tail}")
    missing = [c for c in PARTS if c not in df.columns]
    if missing:
        raise ValueError(f"encode_rows needs columns {', '.join(PARTS)}; missing {', '.join(missing)}")
    markers = _marker_ids(tokenizer, template)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    if len(bos) + markers["first_round"] + 3 > max_length:
        raise ValueError(f"max_length={max_length} cannot hold the template's markers "
                         f"({markers['first_round']} tokens) and one token per part; raise max_length")

    columns = [df[c].tolist() for c in PARTS]
    ids, stats = [], []
    for start in range(0, len(df), chunk_rows):
        rows = [_rounds(p, a, b) for p, a, b in zip(*(col[start:start + chunk_rows] for col in columns))]
        # one batched fast-tokenizer call per chunk for every turn of every part; budgets are list slicing
        flat = [text for rounds in rows for rnd in rounds for text in rnd]
        tokens = iter(_tokenize(tokenizer, flat))
        for rounds in rows:
            turn_ids = [[next(tokens) for _ in range(3)] for _ in rounds]
            row_ids, kept, full, truncated = _assemble(turn_ids, bos, markers, max_length, prompt_share,
                                                       keep_tail)
            ids.append(row_ids)
            stats.append((*full, *kept, truncated))
    if not return_stats:
        return ids
    columns = [f"{p}_tokens" for p in PARTS] + [f"{p}_kept" for p in PARTS] + ["truncated"]
    stats = pd.DataFrame(stats, columns=columns, index=df.index)
    stats["length"] = [len(x) for x in ids]
    return ids, stats


def ensure_pad_token(tokenizer):
    """Give the tokenizer a pad token when it has none (Llama-3), padding on the right.

    Prefers a reserved padding token already in the vocabulary, else the EOS token; never adds a token
    (that would need the model's embeddings resized). Set the model's `config.pad_token_id` from
    `tokenizer.pad_token_id` so both agree.
    """
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        candidates = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "<|pad|>")
        pad = next((t for t in candidates if t in vocab), tokenizer.eos_token)
        if pad is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token; "
                             "set tokenizer.pad_token to a token of its vocabulary before encoding")
        tokenizer.pad_token = pad
    # the classifier reads the last non-pad token, so padding goes after the text
    tokenizer.padding_side = "right"
    return tokenizer


def _rounds(prompt, response_a, response_b) -> list[tuple[str, str, str]]:
    parts = []
    for name, turns in zip(PARTS, (prompt, response_a, response_b)):
        if isinstance(turns, str) or not hasattr(turns, "__len__"):
            raise ValueError(f"{name} must be a list of turns (strings), got {type(turns).__name__} "
                             f"{str(turns)[:40]!r}; read the CSV with lmsys_utils.data.load_arena")
        parts.append([t or "" for t in turns])
    n = max(1, *(len(t) for t in parts))
    # turn counts can disagree in the data; missing turns read as empty text
    return [tuple(t[r] if r < len(t) else "" for t in parts) for r in range(n)]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, no special tokens, never padded or truncated (budgets cut later, per part)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and hasattr(backend, "encode_batch"):
        # the Rust backend: the same ids as tokenizer(texts), less work per token (no offsets with
        # encode_batch_fast, tokenizers 0.20+); it applies the padding and truncation a tokenizer.json stores
        # (all-MiniLM-L6-v2: 128), which tokenizer(texts, padding=False) would switch off, so switch them off
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        with _without_padding_and_truncation(backend):
            return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, padding=False, truncation=False,
                     return_attention_mask=False)["input_ids"]


@contextlib.contextmanager
def _without_padding_and_truncation(backend):
    """Switch off a Rust tokenizer's stored padding and truncation, and restore them after (the caller's object)."""
    padding, truncation = backend.padding, backend.truncation
    if padding is not None:
        backend.no_padding()
    if truncation is not None:
        backend.no_truncation()
    try:
        yield backend
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def _marker_ids(tokenizer, template: Template) -> dict:
    p, p_next, a, b = _tokenize(tokenizer, [template.prompt, template.separator + template.prompt,
                                            template.response_a, template.response_b])
    return {"prompt": p, "prompt_next": p_next, "response_a": a, "response_b": b,
            "first_round": len(p) + len(a) + len(b), "next_round": len(p_next) + len(a) + len(b)}


def _assemble(turn_ids, bos, markers, max_length, prompt_share, keep_tail):
    """Ids of one row from its tokenized turns [[p, a, b] per round]; returns (ids, kept, full, truncated)."""
    full = [sum(len(rnd[k]) for rnd in turn_ids) for k in range(3)]
    rounds = list(range(len(turn_ids)))

    def marker_cost(n_rounds):
        return len(bos) + markers["first_round"] + (n_rounds - 1) * markers["next_round"]

    if marker_cost(len(rounds)) + sum(full) <= max_length:
        keep = [[len(x) for x in rnd] for rnd in turn_ids]
    else:
        nonempty = sum(1 for n in full if n)
        # very many rounds: the markers alone leave no token for a part, so drop rounds, oldest and
        # empty ones first, keeping a turn of every non-empty part while possible
        while len(rounds) > 1 and marker_cost(len(rounds)) + nonempty > max_length:
            empty = [r for r in rounds if not any(turn_ids[r])]
            rounds.remove(empty[0] if empty else
                          next((r for r in rounds if _others_cover(turn_ids, rounds, r)), rounds[0]))
        keep = _keep_per_turn(turn_ids, rounds, max_length - marker_cost(len(rounds)), prompt_share)
        with_text = [r for r in rounds if any(keep[r])]
        if with_text and len(with_text) < len(rounds):
            # rounds that keep no text are dropped with their markers; the freed budget goes to the rest
            rounds = with_text
            keep = _keep_per_turn(turn_ids, rounds, max_length - marker_cost(len(rounds)), prompt_share)

    ids = list(bos)
    kept = [0, 0, 0]
    for i, r in enumerate(rounds):
        for k, name in enumerate(PARTS):
            ids += markers["prompt_next" if (k == 0 and i > 0) else name]
            ids += _cut(turn_ids[r][k], keep[r][k], keep_tail)
            kept[k] += keep[r][k]
    return ids, kept, full, len(rounds) < len(turn_ids) or kept != full


def _others_cover(turn_ids, rounds, dropped) -> bool:
    """Whether every part with text in `rounds` still has text once round `dropped` is removed."""
    rest = [r for r in rounds if r != dropped]
    return all(any(turn_ids[r][k] for r in rest) for k in range(3) if any(turn_ids[r][k] for r in rounds))


def _keep_per_turn(turn_ids, rounds, budget, prompt_share):
    """Tokens kept per turn of `rounds`: part budgets, then the most recent turns of each part first."""
    lengths = [[len(x) for x in rnd] for rnd in turn_ids]
    budgets = part_budgets(*(sum(lengths[r][k] for r in rounds) for k in range(3)), budget, prompt_share)
    keep = [[0, 0, 0] for _ in lengths]
    for k in range(3):
        left = budgets[k]
        for r in reversed(rounds):
            keep[r][k] = min(lengths[r][k], left)
            left -= keep[r][k]
    return keep


def part_budgets(n_prompt: int, n_a: int, n_b: int, budget: int, prompt_share: float = 0.3):
    """Tokens the prompt, response A and response B keep when their texts share `budget` tokens.

    The prompt gets at most `prompt_share` of the budget while the responses need it, A and B equal
    shares, and what a short part leaves goes to the others. Symmetric in A and B; a non-empty part
    keeps at least one token whenever `budget` >= 3.
    """
    if n_prompt + n_a + n_b <= budget:
        return n_prompt, n_a, n_b
    cap = min(int(prompt_share * budget), budget - (n_a > 0) - (n_b > 0))
    bp = min(n_prompt, max(cap, min(n_prompt, 1)))
    rest = budget - bp
    half = rest // 2
    if n_a <= half:
        ba, bb = n_a, min(n_b, rest - n_a)
    elif n_b <= half:
        ba, bb = min(n_a, rest - n_b), n_b
    else:
        ba = bb = half
    # what the responses leave (short responses, or the odd token of an uneven split) returns to the prompt
    bp = min(n_prompt, budget - ba - bb)
    return bp, ba, bb


def _cut(ids: list[int], n: int, keep_tail: int) -> list[int]:
    if n >= len(ids):
        return ids
    tail = min(keep_tail, n // 2)
    return ids[:n - tail] + (ids[len(ids) - tail:] if tail else [])
