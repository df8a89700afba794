"""EDA and training figures. Every `plot_` function returns a matplotlib Figure (no pyplot, no global state)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import font_manager, ft2font
from matplotlib.figure import Figure

from .data import targets
from .metrics import as_target_probs, log_loss
from .text import encode_rows

OUTCOMES = ("A wins", "B wins", "Tie")
_COLORS = ("#4C72B0", "#DD8452", "#8C8C8C")  # A, B, tie: the same everywhere
_UNIFORM_LOSS = float(np.log(3))


def plot_label_balance(df: pd.DataFrame) -> Figure:
    """Bar chart of outcome counts, with the log loss of predicting the class prior."""
    counts = _labels(df).value_counts().reindex(range(3), fill_value=0).to_numpy()
    share = counts / max(counts.sum(), 1)
    prior_loss = float(-(share[share > 0] * np.log(share[share > 0])).sum())
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(OUTCOMES, counts, color=_COLORS)
    ax.bar_label(bars, [f"{c:,}\n({s:.1%})" for c, s in zip(counts, share)], padding=2)
    ax.set_ylim(0, counts.max() * 1.25 + 1)
    ax.set_ylabel("battles")
    ax.set_title(f"Outcome balance ({counts.sum():,} battles)\n"
                 f"class-prior log loss {prior_loss:.4f} vs uniform {_UNIFORM_LOSS:.4f}", fontsize=11)
    return fig


def plot_model_stats(df: pd.DataFrame, top_n: int = 15) -> Figure:
    """Battles, win rate and tie rate per model, for the `top_n` models with the most battles."""
    stats = _model_table(df)
    top = stats.head(top_n).iloc[::-1]  # most battles at the top of the chart
    fig = Figure(figsize=(11, 1.2 + 0.32 * len(top)), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    y = np.arange(len(top))
    panels = [("battles", "battles (A or B seat)", "#4C72B0"), ("win_rate", "win rate", "#55A868"),
              ("tie_rate", "tie rate", "#8C8C8C")]
    for ax, (col, label, color) in zip(axes, panels):
        ax.barh(y, top[col], color=color)
        ax.set_xlabel(label)
        if col != "battles":
            ax.set_xlim(0, 1)
            ax.xaxis.set_major_formatter("{x:.0%}")
            ax.axvline(top[col].mean(), color="black", lw=0.8, ls="--")
    axes[0].set_yticks(y, top.index)
    fig.suptitle(f"Top {len(top)} of {len(stats)} models by battles (dashed: mean of the shown models)")
    return fig


def plot_length_by_outcome(df: pd.DataFrame) -> Figure:
    """Box plots of response A and B length (characters, all turns) for each outcome."""
    labels = _labels(df)
    len_a, len_b = _chars(df["response_a"]), _chars(df["response_b"])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    data, positions, colors = [], [], []
    for k in range(3):
        sel = (labels == k).to_numpy()
        data += [len_a[sel] + 1, len_b[sel] + 1]  # +1: empty responses stay on the log axis
        positions += [3 * k, 3 * k + 1]
        colors += [_COLORS[0], _COLORS[1]]
    box = ax.boxplot(data, positions=positions, widths=0.8, showfliers=False, patch_artist=True,
                     medianprops={"color": "black"})
    for patch, c in zip(box["boxes"], colors):
        patch.set_facecolor(c)
    ax.set_xticks([3 * k + 0.5 for k in range(3)], OUTCOMES)
    ax.set_yscale("log")
    ax.set_ylabel("response length (characters, log scale)")
    fig.legend(box["boxes"][:2], ["response A", "response B"], loc="outside lower center", ncols=2)
    ax.set_title(f"Response length by outcome ({len(labels):,} battles; boxes: quartiles, black: median)",
                 fontsize=10)
    return fig


def plot_length_bias(df: pd.DataFrame, bins: int = 8) -> Figure:
    """P(A wins), P(B wins), P(tie) against the A minus B length difference (verbosity bias)."""
    labels = _labels(df).to_numpy()
    diff = _chars(df["response_a"]) - _chars(df["response_b"])
    # quantile bins: equal numbers of battles per point, so every point is equally reliable
    edges = np.unique(np.quantile(diff, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # every difference equal: one bin
        edges = np.array([diff.min(), diff.min() + 1])
    which = np.clip(np.searchsorted(edges, diff, side="right") - 1, 0, len(edges) - 2)
    x = np.arange(len(edges) - 1)
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for k in range(3):
        rate = [np.mean(labels[which == i] == k) if np.any(which == i) else np.nan for i in x]
        ax.plot(x, rate, marker="o", color=_COLORS[k], label=f"P({OUTCOMES[k]})")
    ax.set_xticks(x, [f"{_short_int(edges[i])} to {_short_int(edges[i + 1])}" for i in x],
                  rotation=30, ha="right")
    ax.set_xlabel("len(A) - len(B), characters (bins with equal numbers of battles)")
    ax.set_ylabel("share of battles")
    ax.yaxis.set_major_formatter("{x:.0%}")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper center", ncols=3)
    ax.set_title(f"Verbosity bias: outcome against length difference ({len(diff):,} battles, "
                 f"~{len(diff) // len(x)} per point)")
    return fig


def plot_position_bias(df: pd.DataFrame, top_n: int = 10) -> Figure:
    """Share of decisive battles won by seat A (95% interval), and per-model win rate in seat A vs seat B."""
    labels = _labels(df).to_numpy()
    decisive = labels < 2
    n, wins_a = int(decisive.sum()), int((labels == 0).sum())
    p = wins_a / max(n, 1)
    half_width = 1.96 * np.sqrt(p * (1 - p) / max(n, 1))
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 2])
    left.bar(["seat A", "seat B"], [p, 1 - p], yerr=[half_width, half_width], capsize=6, color=_COLORS[:2])
    left.axhline(0.5, color="black", lw=0.8, ls="--")
    left.set_ylim(0, 1)
    left.yaxis.set_major_formatter("{x:.0%}")
    left.set_ylabel("share of decisive battles won")
    left.set_title(f"{n:,} decisive battles (ties left out)\nseat A wins {p:.1%} ± {half_width:.1%}",
                   fontsize=10)

    seats = []
    for seat, k in (("a", 0), ("b", 1)):
        won = pd.Series(labels == k, index=df.index)
        seats.append(won.groupby(df[f"model_{seat}"]).agg(["mean", "size"]))
    table = pd.concat(seats, axis=1, keys=["A", "B"]).dropna()
    total = (table["A", "size"] + table["B", "size"]).sort_values(ascending=False)
    top = table.loc[total.index[:top_n][::-1]]
    y = np.arange(len(top))
    right.barh(y + 0.2, top["A", "mean"], height=0.4, color=_COLORS[0], label="in seat A")
    right.barh(y - 0.2, top["B", "mean"], height=0.4, color=_COLORS[1], label="in seat B")
    right.set_yticks(y, [f"{m} ({int(a)}/{int(b)})" for m, a, b in
                         zip(top.index, top["A", "size"], top["B", "size"])])
    right.set_xlim(0, 1)
    right.xaxis.set_major_formatter("{x:.0%}")
    right.set_xlabel("win rate (battles in seat A / seat B in brackets)")
    right.legend(loc="lower right")
    right.set_title(f"Win rate by seat, top {len(top)} models", fontsize=10)
    fig.suptitle("Position bias")
    return fig


def plot_turns(df: pd.DataFrame, max_turns: int = 5) -> Figure:
    """Conversations per number of turns, and the outcome shares for each."""
    turns = df["prompt"].map(len).to_numpy()
    labels = _labels(df).to_numpy()
    longest = int(turns.max())
    turns = turns.clip(max=max_turns)
    x = np.arange(1, min(max_turns, longest) + 1)
    names = [f"{t}+" if t == max_turns < longest else str(t) for t in x]
    counts = np.array([(turns == t).sum() for t in x])
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    bars = left.bar(names, counts, color="#4C72B0")
    left.bar_label(bars, [f"{c:,}" for c in counts], padding=2)
    left.set_ylim(0, counts.max() * 1.15 + 1)
    left.set_xlabel("turns per conversation")
    left.set_ylabel("battles")
    left.set_title(f"{(turns > 1).mean():.1%} of battles are multi-turn", fontsize=10)
    bottom = np.zeros(len(x))
    for k in range(3):
        share = np.array([np.mean(labels[turns == t] == k) if counts[i] else 0 for i, t in enumerate(x)])
        right.bar(names, share, bottom=bottom, color=_COLORS[k], label=OUTCOMES[k])
        bottom += share
    right.set_ylim(0, 1)
    right.yaxis.set_major_formatter("{x:.0%}")
    right.set_xlabel("turns per conversation")
    right.set_ylabel("share of battles")
    right.legend(loc="upper left", bbox_to_anchor=(1, 1))
    right.set_title("Outcome by number of turns", fontsize=10)
    return fig


def plot_duplicate_prompts(df: pd.DataFrame, top_n: int = 8, max_repeats: int = 8) -> Figure:
    """How often the same prompt recurs across battles, and the most repeated prompts."""
    key = df["prompt"].map(lambda turns: "\n".join(t or "" for t in turns))
    per_prompt = key.value_counts()
    shared = (key.map(per_prompt) > 1).mean()
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 2])
    reps = per_prompt.clip(upper=max_repeats).value_counts().sort_index()
    names = [f"{r}+" if r == max_repeats else str(r) for r in reps.index]
    bars = left.bar(names, reps.to_numpy(), color="#4C72B0")
    left.bar_label(bars, [f"{c:,}" for c in reps], padding=2)
    left.set_ylim(0, reps.max() * 1.15 + 1)
    left.set_xlabel("battles that share one prompt")
    left.set_ylabel("distinct prompts")
    top = per_prompt[per_prompt > 1].head(top_n).iloc[::-1]
    if len(top):
        right.barh(np.arange(len(top)), top.to_numpy(), color="#DD8452")
        right.set_yticks(np.arange(len(top)), [_label_text(p, 60) for p in top.index])
        right.set_xlabel("battles")
        right.xaxis.get_major_locator().set_params(integer=True)
    else:
        right.text(0.5, 0.5, "no prompt occurs twice", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    right.set_title("Most repeated prompts (first 60 characters)", fontsize=10)
    fig.suptitle(f"Duplicate prompts: {len(per_prompt):,} distinct prompts in {len(key):,} battles; "
                 f"{shared:.1%} of battles share their prompt (keep them on one side of the split)")
    return fig


def token_lengths(tokenizer, df: pd.DataFrame) -> np.ndarray:
    """Untruncated token count of each row's model input, built exactly as training builds it."""
    _, stats = encode_rows(tokenizer, df, max_length=sys.maxsize, return_stats=True)
    return stats["length"].to_numpy()


def plot_token_lengths(lengths, max_lengths=(512, 1024, 2048), tokenizer_name: str = "") -> Figure:
    """Histogram of token lengths with the share of rows each candidate max_length truncates.

    Args:
        lengths: token count per row (see `token_lengths`).
        tokenizer_name: shown in the title, since counts differ between tokenizers.
    """
    lengths = np.asarray(lengths)
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax = fig.add_subplot()
    bins = np.logspace(np.log10(max(lengths.min(), 1)), np.log10(lengths.max() + 1), 40)
    ax.hist(lengths, bins=bins, color="#4C72B0", alpha=0.8)
    ax.set_xscale("log")
    for m, style in zip(max_lengths, ("--", "-.", ":", (0, (5, 1)))):
        cut = (lengths > m).mean()
        ax.axvline(m, color="#C44E52", ls=style, lw=1.5, label=f"max_length {m:,}: {cut:.1%} of rows truncated")
    ax.set_xlabel("tokens per row (prompt + A + B, untruncated; log scale)")
    ax.set_ylabel("rows")
    fig.legend(loc="outside lower center", ncols=len(max_lengths), fontsize=9)
    name = f" ({tokenizer_name})" if tokenizer_name else ""
    ax.set_title(f"Token lengths of {len(lengths):,} rows{name}: median {int(np.median(lengths)):,}, "
                 f"95th percentile {int(np.percentile(lengths, 95)):,}")
    return fig


def plot_history(history: dict) -> Figure:
    """Training loss (and validation log loss when present) and the learning rate against the optimizer step.

    Args:
        history: the dict `train.fit` returns and writes as `history.json`: lists `step`, `loss`, `lr`
            (one entry per step) and `eval` (dicts with `step` and `log_loss`).
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    window = max(1, len(history["loss"]) // 20)
    left.plot(history["step"], history["loss"], color="#4C72B0", alpha=0.35 if window > 1 else 1.0,
              label="train loss (per step)")
    if window > 1:  # per-step losses are noisy; a trailing mean shows the trend
        smooth = np.convolve(history["loss"], np.ones(window) / window, mode="valid")
        left.plot(history["step"][window - 1:], smooth, color="#4C72B0", label=f"train loss ({window}-step mean)")
    evals = history.get("eval") or []
    if evals:
        left.plot([e["step"] for e in evals], [e["log_loss"] for e in evals], "o-", color="#DD8452",
                  label="validation log loss")
    left.axhline(_UNIFORM_LOSS, color="black", lw=0.8, ls="--", label=f"uniform guess ({_UNIFORM_LOSS:.4f})")
    left.set_xlabel("optimizer step")
    left.set_ylabel("log loss")
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncols=3)
    left.set_title("Loss", fontsize=10)
    right.plot(history["step"], history["lr"], color="#55A868")
    right.set_xlabel("optimizer step")
    right.set_ylabel("learning rate")
    right.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    right.set_title("Learning-rate schedule", fontsize=10)
    return fig


def plot_reliability(targets, probs, bins: int = 10, min_rows: int = 5) -> Figure:
    """Reliability diagram: observed frequency against predicted probability, per class, on validation.

    Args:
        targets: class ids (N,) or target probabilities (N, 3).
        probs: predicted probabilities (N, 3).
        min_rows: bins with fewer rows are left off the curves (they still count in the error).
    """
    t, probs = as_target_probs(targets), np.asarray(probs, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    fig = Figure(figsize=(6.5, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="perfectly calibrated")
    ece = 0.0
    for k in range(3):
        which = np.clip(np.digitize(probs[:, k], edges) - 1, 0, bins - 1)
        sizes = np.bincount(which, minlength=bins)
        filled = sizes > 0
        mean_p = (np.bincount(which, probs[:, k], minlength=bins)[filled] / sizes[filled])
        freq = (np.bincount(which, t[:, k], minlength=bins)[filled] / sizes[filled])
        sizes = sizes[filled]
        ece += float(np.sum(sizes * np.abs(mean_p - freq))) / len(probs) / 3
        shown = sizes >= min_rows  # a bin of one or two rows is noise, not miscalibration
        top.plot(mean_p[shown], freq[shown], "o-", color=_COLORS[k], label=OUTCOMES[k])
        bottom.hist(probs[:, k], bins=edges, histtype="step", color=_COLORS[k], lw=1.5)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("observed frequency")
    top.legend(loc="upper left")
    top.set_title(f"Reliability on {len(probs):,} validation rows\n"
                  f"log loss {log_loss(t, probs):.4f}, mean calibration error {ece:.3f}", fontsize=10)
    bottom.set_xlabel(f"predicted probability ({bins} bins; curves skip bins under {min_rows} rows)")
    bottom.set_ylabel("rows")
    return fig


def plot_confusion_matrix(targets, probs) -> Figure:
    """Confusion matrix of the most probable class against the true outcome, with row shares."""
    true = as_target_probs(targets).argmax(axis=1)
    pred = np.asarray(probs).argmax(axis=1)
    matrix = np.zeros((3, 3), dtype=int)
    np.add.at(matrix, (true, pred), 1)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(5.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{matrix[i, j]:,}\n{rows[i, j]:.0%}", ha="center", va="center",
                    color="white" if rows[i, j] > 0.6 else "black")
    ax.set_xticks(range(3), OUTCOMES)
    ax.set_yticks(range(3), OUTCOMES)
    ax.set_xlabel("predicted (most probable class)")
    ax.set_ylabel("true outcome")
    fig.colorbar(image, ax=ax, label="share of the true row", format="{x:.0%}")
    ax.set_title(f"Confusion matrix, accuracy {np.trace(matrix) / max(matrix.sum(), 1):.1%} "
                 f"({matrix.sum():,} rows)", fontsize=10)
    return fig


def plot_eda(df: pd.DataFrame, lengths=None, max_lengths=(512, 1024, 2048), top_n: int = 15,
             tokenizer_name: str = "") -> dict[str, Figure]:
    """All EDA figures of a labeled DataFrame, by name (`token_lengths` only when `lengths` is given)."""
    figures = {
        "label_balance": plot_label_balance(df),
        "model_stats": plot_model_stats(df, top_n=top_n),
        "length_by_outcome": plot_length_by_outcome(df),
        "length_bias": plot_length_bias(df),
        "position_bias": plot_position_bias(df, top_n=min(top_n, 10)),
        "turns": plot_turns(df),
        "duplicate_prompts": plot_duplicate_prompts(df),
    }
    if lengths is not None:
        figures["token_lengths"] = plot_token_lengths(lengths, max_lengths, tokenizer_name)
    return figures


def save_eda_figures(df: pd.DataFrame, out_dir, lengths=None, max_lengths=(512, 1024, 2048), top_n: int = 15,
                     tokenizer_name: str = "", dpi: int = 110) -> dict[str, Path]:
    """Write every EDA figure as `out_dir/<name>.png`; return the paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in plot_eda(df, lengths, max_lengths, top_n, tokenizer_name).items():
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=dpi)
    return paths


def _labels(df: pd.DataFrame) -> pd.Series:
    return pd.Series(targets(df).argmax(axis=1), index=df.index)


def _model_table(df: pd.DataFrame) -> pd.DataFrame:
    labels = _labels(df)
    if "model_a" not in df.columns or "model_b" not in df.columns:
        raise ValueError("per-model figures need the model_a and model_b columns (train.csv has them)")
    seat_a = pd.DataFrame({"model": df["model_a"], "win": labels == 0, "tie": labels == 2})
    seat_b = pd.DataFrame({"model": df["model_b"], "win": labels == 1, "tie": labels == 2})
    stats = pd.concat([seat_a, seat_b]).groupby("model").agg(battles=("win", "size"), win_rate=("win", "mean"),
                                                             tie_rate=("tie", "mean"))
    return stats.sort_values("battles", ascending=False)


def _chars(column: pd.Series) -> np.ndarray:
    return column.map(lambda turns: sum(len(t or "") for t in turns)).to_numpy()


def _short_int(x: float) -> str:
    return f"{x / 1000:+.1f}k" if abs(x) >= 1000 else f"{x:+.0f}"


@functools.lru_cache(maxsize=1)
def _font_chars() -> frozenset:
    return frozenset(ft2font.FT2Font(font_manager.findfont("DejaVu Sans")).get_charmap())


def _label_text(text: str, width: int) -> str:
    """One line of at most `width` characters that matplotlib renders as written."""
    text = " ".join(text.split())
    text = text[:width - 1] + "…" if len(text) > width else text
    # '$' would start mathtext; glyphs missing from the font would render as boxes with a warning
    return "".join(c if ord(c) in _font_chars() else "?" for c in text).replace("$", r"\$")
