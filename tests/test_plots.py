"""EDA and training figures: the numbers they show are the data's, and no text leaves the canvas."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from lmsys_utils import plots
from lmsys_utils.data import LABEL_COLUMNS, load_arena
from lmsys_utils.synthetic import make_demo_data


@pytest.fixture(scope="module")
def demo_df():
    return make_demo_data(300, seed=3)  # no `label` column: the figures read the winner_* columns


def _labels(df):
    return df[list(LABEL_COLUMNS)].to_numpy().argmax(axis=1)


def _texts(fig):
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]


def _assert_text_inside(fig):
    """Everything drawn lies inside the canvas (clipped legends and labels are the common layout bug)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    drawn = fig.get_tightbbox(canvas.get_renderer())  # inches, from the artists actually drawn
    width, height = fig.get_size_inches()
    tol = 0.02
    assert drawn.x0 >= -tol and drawn.y0 >= -tol and drawn.x1 <= width + tol and drawn.y1 <= height + tol, (
        f"drawn area {drawn} leaves the {width}x{height} inch canvas")


def test_every_figure_is_a_figure_with_text_inside(demo_df):
    lengths = np.random.default_rng(0).integers(50, 3000, size=len(demo_df))
    figures = plots.plot_eda(demo_df, lengths=lengths, tokenizer_name="demo")
    assert set(figures) == {"label_balance", "model_stats", "length_by_outcome", "length_bias",
                            "position_bias", "turns", "duplicate_prompts", "token_lengths"}
    probs = np.random.default_rng(1).dirichlet([1, 1, 1], size=len(demo_df))
    steps = list(range(1, 101))
    history = {"step": steps, "loss": [1.1 - s / 1000 for s in steps], "lr": [s * 1e-7 for s in steps],
               "eval": [{"step": 50, "log_loss": 1.05, "accuracy": 0.4}, {"step": 100, "log_loss": 1.0,
                                                                           "accuracy": 0.45}]}
    figures.update(reliability=plots.plot_reliability(_labels(demo_df), probs),
                   confusion=plots.plot_confusion_matrix(_labels(demo_df), probs),
                   history=plots.plot_history(history))
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        assert fig.axes, name
        _assert_text_inside(fig)
    loss_panel = figures["history"].axes[0]
    assert list(loss_panel.lines[2].get_ydata()) == [1.05, 1.0]  # raw, smoothed, then validation


def test_label_balance_shows_the_counts(demo_df):
    fig = plots.plot_label_balance(demo_df)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [int((_labels(demo_df) == k).sum()) for k in range(3)]


def test_label_balance_on_the_real_sample(arena_train_path):
    df, _ = load_arena(arena_train_path)
    fig = plots.plot_label_balance(df)
    assert [p.get_height() for p in fig.axes[0].patches] == [352, 352, 295]  # README of the sample
    _assert_text_inside(fig)


def test_model_stats_rates(demo_df):
    table = plots._model_table(demo_df)
    assert table["battles"].sum() == 2 * len(demo_df)
    m = table.index[0]
    labels = _labels(demo_df)
    as_a, as_b = (demo_df["model_a"] == m).to_numpy(), (demo_df["model_b"] == m).to_numpy()
    wins = (labels[as_a] == 0).sum() + (labels[as_b] == 1).sum()
    assert table.loc[m, "win_rate"] == pytest.approx(wins / (as_a.sum() + as_b.sum()))


def test_length_bias_finds_the_demo_signal(demo_df):
    # demo data: helpful answers are longer and win, so P(A wins) rises with len(A) - len(B)
    fig = plots.plot_length_bias(demo_df, bins=4)
    p_a = fig.axes[0].lines[0].get_ydata()
    assert p_a[-1] > p_a[0] + 0.3


def test_token_lengths_legend_gives_the_truncated_share():
    lengths = np.array([100] * 7 + [1500] * 2 + [5000])
    fig = plots.plot_token_lengths(lengths, max_lengths=(1024, 2048))
    text = " ".join(_texts(fig))
    assert "max_length 1,024: 30.0% of rows truncated" in text
    assert "max_length 2,048: 10.0% of rows truncated" in text


@pytest.mark.slow  # builds the tiny model (tokenizer) once per session
def test_token_lengths_of_rows(demo_df, bpe_tokenizer):
    lengths = plots.token_lengths(bpe_tokenizer, demo_df.head(5))
    assert lengths.shape == (5,) and (lengths > 10).all()
    # the figure's truncation shares are what training does: rows longer than max_length are the truncated ones
    from lmsys_utils.text import encode_rows

    cut = int(np.median(lengths))
    _, stats = encode_rows(bpe_tokenizer, demo_df.head(5), max_length=cut, return_stats=True)
    assert stats["truncated"].tolist() == (lengths > cut).tolist()


def test_confusion_matrix_counts():
    targets = np.array([0, 0, 1, 2, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 2, 2, 0]]
    fig = plots.plot_confusion_matrix(targets, probs)
    assert np.array_equal(fig.axes[0].images[0].get_array()[0], [0.5, 0.5, 0.0])
    assert "accuracy 66.7%" in " ".join(_texts(fig))


def test_reliability_of_a_calibrated_model_lies_on_the_diagonal():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([2, 2, 2], size=20000)
    targets = (rng.random(len(probs))[:, None] > probs.cumsum(axis=1)).sum(axis=1)  # one draw per row
    fig = plots.plot_reliability(targets, probs, min_rows=500)
    for line in fig.axes[0].lines[1:]:
        assert np.abs(line.get_xdata() - line.get_ydata()).max() < 0.05
    assert "mean calibration error 0.00" in " ".join(_texts(fig))


def test_prompt_labels_render_as_written():
    assert plots._label_text("costs $5 and $6", 60) == r"costs \$5 and \$6"
    assert plots._label_text("東京\n  tour", 60) == "?? tour"
    assert len(plots._label_text("x" * 100, 60)) == 60


def test_unlabeled_rows_raise_a_clear_error(demo_df):
    with pytest.raises(ValueError, match="need the label columns"):
        plots.plot_label_balance(demo_df.drop(columns=list(LABEL_COLUMNS)))


def test_save_eda_figures_writes_pngs(demo_df, tmp_path):
    paths = plots.save_eda_figures(demo_df, tmp_path / "eda")
    assert len(paths) == 7
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_importing_plots_leaves_pyplot_and_the_backend_alone():
    code = "import lmsys_utils.plots, sys; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
