import copy
import threading
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lmsys_utils.config import EncodingSettings
from lmsys_utils.data import LABEL_COLUMNS, load_arena, swap_ab
from lmsys_utils.device import resolve
from lmsys_utils.metrics import log_loss
from lmsys_utils.predict import (
    A_EMPTY_PROBS, IDENTICAL_PROBS, SubmissionError, apply_rules, compare_rules, predict, predict_proba,
    write_submission,
)
from lmsys_utils.synthetic import make_demo_data

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
    with pytest.raises(ValueError, match="label columns"):
        compare_rules(df.drop(columns=["winner_tie"]), probs)


# --- prediction ---

class RowModel(torch.nn.Module):
    """Logits that are a function of each row's own (unpadded) ids: any mix-up of rows or padding shows."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.01))
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        mask = attention_mask.double()
        length = mask.sum(1)
        id_sum = (input_ids.double() * mask).sum(1)
        logits = torch.stack([length, torch.remainder(id_sum, 97), torch.full_like(length, 20.0)], 1)
        return SimpleNamespace(logits=(logits * self.scale.double()).float())


class WordCountModel(torch.nn.Module):
    """Prefers the response with more "apple"/"zebra" words; swapping A and B swaps its A and B logits."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()])
            counts = {w: text.count(w) for w in ("apple", "zebra")}
            first, second = sorted(counts, key=text.find)  # the word of response A comes first
            rows.append([0.3 * counts[first], 0.3 * counts[second], 0.5])
        return SimpleNamespace(logits=torch.tensor(rows) + self.dummy)


class FirstWinsModel(torch.nn.Module):
    """Always prefers whichever response comes first."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([2.0, 0.0, 0.5]))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits.expand(len(input_ids), 3))


def _expected_row_probs(model, seqs):
    with torch.inference_mode():
        out = [model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits
               for s in seqs]
    return torch.cat(out).float().softmax(-1).numpy()


@pytest.fixture(scope="module")
def demo_rows():
    return make_demo_data(60, seed=3)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()


def test_rows_come_back_in_input_order(bpe_tokenizer, demo_rows):
    from lmsys_utils.text import encode_rows

    model = RowModel()
    # a small token budget: many batches of different lengths and row counts
    probs = predict_proba(model, bpe_tokenizer, demo_rows, EncodingSettings(256), resolve("cpu"), max_tokens=1024)
    seqs = encode_rows(bpe_tokenizer, demo_rows, 256)
    assert len({len(s) for s in seqs}) > 10 and model.calls > 5
    np.testing.assert_allclose(probs, _expected_row_probs(model, seqs), rtol=0, atol=1e-7)
    assert probs.shape == (len(demo_rows), 3) and probs.dtype == np.float64


def test_batched_tiny_llama_matches_one_row_at_a_time(tiny_model, bpe_tokenizer, demo_rows):
    from lmsys_utils.text import encode_rows

    rows = demo_rows.head(24)
    probs = predict_proba(tiny_model, bpe_tokenizer, rows, EncodingSettings(128), resolve("cpu"), max_tokens=800)
    expected = _expected_row_probs(tiny_model, encode_rows(bpe_tokenizer, rows, 128))
    # right padding and the classifier's last-non-pad-token read leave each row's result unchanged
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)


def test_tta_is_a_no_op_for_a_model_that_ignores_the_ab_order(bpe_tokenizer):
    df = pd.DataFrame({
        "id": [1, 2, 3, 4],
        "prompt": [["which is better?"], ["pick one"], ["hi"], ["q"]],
        "response_a": [["apple apple apple"], ["zebra"], ["apple"], ["zebra zebra zebra zebra"]],
        "response_b": [["zebra"], ["apple apple"], ["zebra zebra"], ["apple"]],
    })
    model = WordCountModel(bpe_tokenizer)
    plain = predict_proba(model, bpe_tokenizer, df, EncodingSettings(128), resolve("cpu"))
    tta = predict_proba(model, bpe_tokenizer, df, EncodingSettings(128), resolve("cpu"), tta=True)
    assert not np.allclose(plain[:, 0], plain[:, 1])  # A and B do differ, so a missed column swap would show
    np.testing.assert_allclose(tta, plain, rtol=0, atol=1e-7)


def test_tta_cancels_a_first_position_bias(bpe_tokenizer, demo_rows):
    model = FirstWinsModel()
    plain = predict_proba(model, bpe_tokenizer, demo_rows, EncodingSettings(128), resolve("cpu"))
    tta = predict_proba(model, bpe_tokenizer, demo_rows, EncodingSettings(128), resolve("cpu"), tta=True)
    assert (plain[:, 0] > plain[:, 1] + 0.5).all()
    np.testing.assert_allclose(tta[:, 0], tta[:, 1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(tta[:, 2], plain[:, 2], rtol=0, atol=1e-7)
    np.testing.assert_allclose(tta.sum(axis=1), 1, atol=1e-6)


def test_two_model_copies_in_threads_equal_one(tiny_model, bpe_tokenizer, demo_rows):
    single = predict_proba(tiny_model, bpe_tokenizer, demo_rows, EncodingSettings(128), resolve("cpu"), max_tokens=512)
    copies = [copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)]
    calls = [0, 0]
    for i, m in enumerate(copies):
        m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    multi = predict_proba(copies, bpe_tokenizer, demo_rows, EncodingSettings(128), resolve("cpu"), max_tokens=512)
    assert calls[0] > 0 and calls[1] > 0, f"both copies must take batches, got {calls}"
    np.testing.assert_array_equal(multi, single)


def test_a_failing_device_copy_raises(bpe_tokenizer, demo_rows):
    # the healthy copy holds its first batch until the broken one has one: else it may take every batch first
    broken_started = threading.Event()

    class Healthy(RowModel):
        def forward(self, input_ids, attention_mask):
            broken_started.wait(timeout=60)
            return super().forward(input_ids, attention_mask)

    class Broken(RowModel):
        def forward(self, input_ids, attention_mask):
            broken_started.set()
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        predict_proba([Healthy(), Broken()], bpe_tokenizer, demo_rows, EncodingSettings(128), resolve("cpu"),
                      max_tokens=512)
    assert broken_started.is_set()


# --- the entry point ---

def test_predict_end_to_end_on_the_real_test_file(tiny_model_dir, arena_test_path, tmp_path):
    out = tmp_path / "submission.csv"
    sub = predict(arena_test_path, str(tiny_model_dir), out=out, tta=True, max_length=256, device="cpu",
                  progress=False)
    written = pd.read_csv(out)
    assert written["id"].tolist() == OFFICIAL_TEST_IDS == sub["id"].tolist()
    values = written[list(LABEL_COLUMNS)].to_numpy()
    assert np.isfinite(values).all() and (values > 0).all()
    np.testing.assert_allclose(values.sum(axis=1), 1, atol=1e-9)


def test_predict_with_an_adapter_and_an_unreadable_row(tiny_model_dir, arena_test_path, tmp_path):
    from lmsys_utils.model import add_lora, load_for_inference, save_adapter

    base, tokenizer, _ = load_for_inference(tiny_model_dir)
    lora = add_lora(base, r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: its output differs from the base model's
    adapter = save_adapter(lora, tokenizer, tmp_path / "adapter", encoding=EncodingSettings(256))
    rows = pd.read_csv(arena_test_path)
    rows.loc[1, "response_b"] = "not json"
    data = tmp_path / "test.csv"
    rows.to_csv(data, index=False)

    sub = predict(data, str(tiny_model_dir), adapter=adapter, out=tmp_path / "sub.csv", device="cpu",
                  progress=False)
    assert sub["id"].tolist() == OFFICIAL_TEST_IDS
    np.testing.assert_allclose(sub.iloc[1, 1:].to_numpy(dtype=float), 1 / 3)  # unreadable: the uniform guess
    df, _ = load_arena(arena_test_path)
    model, tokenizer, _ = load_for_inference(tiny_model_dir, adapter)
    expected = predict_proba(model, tokenizer, df.iloc[[0, 2]], EncodingSettings(256), resolve("cpu"))
    np.testing.assert_allclose(sub.iloc[[0, 2], 1:].to_numpy(dtype=float), expected, atol=1e-6)
    plain = predict(data, str(tiny_model_dir), out=tmp_path / "plain.csv", max_length=256, device="cpu",
                    progress=False)
    assert not np.allclose(plain.iloc[[0, 2], 1:].to_numpy(dtype=float), expected, atol=1e-3)


def test_cli_predict(tiny_model_dir, arena_test_path, tmp_path, capsys):
    from lmsys_utils.cli import main

    out = tmp_path / "sub.csv"
    rc = main(["predict", "--data", str(arena_test_path), "--model", str(tiny_model_dir), "--out", str(out),
               "--max-length", "128", "--device", "cpu"])
    assert rc == 0 and pd.read_csv(out)["id"].tolist() == OFFICIAL_TEST_IDS
    rc = main(["predict", "--data", str(tmp_path / "missing.csv"), "--model", str(tiny_model_dir), "--out",
               str(tmp_path / "never.csv"), "--device", "cpu"])
    assert rc == 1 and "no such file" in capsys.readouterr().err and not (tmp_path / "never.csv").exists()


XLA_SCRIPT = """
import sys, numpy as np, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
import torch_xla.debug.metrics as met
from lmsys_utils.config import EncodingSettings
from lmsys_utils.device import resolve
from lmsys_utils.predict import predict_proba
from lmsys_utils.synthetic import make_demo_data

def compile_count():
    # under SPMD every host transfer of a sharded result adds a cached (cheap) compile; count real ones
    return met.counter_value("UncachedCompile") or 0

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
df = make_demo_data(24, seed=5)
cpu = predict_proba(model, tokenizer, df, EncodingSettings(128), resolve("cpu"), max_tokens=512)
xla_model = resolve("xla").prepare_model(model)
first = predict_proba(xla_model, tokenizer, df, EncodingSettings(128), resolve("xla"), max_tokens=512)
compiled = compile_count()
again = predict_proba(xla_model, tokenizer, df.sample(frac=1, random_state=1), EncodingSettings(128), resolve("xla"),
                      max_tokens=512)
print("RESULT", compiled, compile_count() - compiled, np.abs(first - cpu).max(),
      np.abs(again - first[df.sample(frac=1, random_state=1).index]).max())
"""


@pytest.mark.slow
@pytest.mark.xla
def test_xla_buckets_compile_once_and_match_cpu(tiny_model_dir):
    import os
    import subprocess
    import sys

    pytest.importorskip("torch_xla")
    # two virtual devices: SPMD, the model sharded FSDP-style and each batch split in two, as on a TPU
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2"}
    run = subprocess.run([sys.executable, "-c", XLA_SCRIPT, str(tiny_model_dir)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled, recompiled, diff_cpu, diff_again = map(float, run.stdout.split("RESULT")[1].split())
    # one bucket (max_length 128): one forward graph, none on a rerun in another row order
    assert 0 < compiled <= 2 and recompiled == 0, (compiled, recompiled)
    assert diff_cpu < 1e-4 and diff_again < 1e-6


def test_cli_predict_refuses_a_setup_that_cannot_fit_unless_forced(tiny_model_dir, arena_test_path, tmp_path, capsys):
    from lmsys_utils.cli import main

    out = tmp_path / "sub.csv"
    args = ["predict", "--data", str(arena_test_path), "--model", str(tiny_model_dir), "--out", str(out),
            "--max-length", "128", "--device", "cpu", "--memory-target", "cpu:0.01"]
    assert main(args) == 1
    assert "DOES NOT FIT" in capsys.readouterr().err and not out.exists()
    with pytest.warns(UserWarning, match="forced"):
        assert main(args + ["--force"]) == 0
    assert pd.read_csv(out)["id"].tolist() == OFFICIAL_TEST_IDS


def test_the_encoding_saved_with_the_adapter_is_what_predict_uses(tiny_model_dir, arena_train_path, tmp_path,
                                                                   capsys):
    """Trained with max_length=160 and prompt_share=0.5: predicting with no flags uses exactly those settings;
    only an explicit --max-length changes the inputs, and says so."""
    from lmsys_utils.cli import main
    from lmsys_utils.model import add_lora, load_for_inference, save_adapter

    base, tokenizer, _ = load_for_inference(tiny_model_dir)
    lora = add_lora(base, r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    trained = EncodingSettings(max_length=160, prompt_share=0.5)
    adapter = save_adapter(lora, tokenizer, tmp_path / "adapter", encoding=trained)
    rows = pd.read_csv(arena_train_path, nrows=12).drop(columns=list(LABEL_COLUMNS))
    data = tmp_path / "test.csv"
    rows.to_csv(data, index=False)  # real rows, most of them longer than 160 tokens

    def run(*flags):
        out = tmp_path / f"sub{len(list(tmp_path.glob('sub*')))}.csv"
        args = ["predict", "--data", str(data), "--model", str(tiny_model_dir), "--adapter", str(adapter),
                "--out", str(out), "--device", "cpu", *flags]
        assert main(args) == 0
        return pd.read_csv(out).iloc[:, 1:].to_numpy(), capsys.readouterr().out

    no_flags, said = run()
    assert "override" not in said
    model, tokenizer, saved = load_for_inference(tiny_model_dir, adapter)
    assert saved == trained
    explicit = predict_proba(model, tokenizer, load_arena(data)[0], trained, resolve("cpu"))
    np.testing.assert_allclose(no_flags, explicit, atol=1e-6)
    same, said = run("--max-length", "160")
    np.testing.assert_allclose(same, no_flags, atol=1e-9)
    assert "override" not in said
    longer, said = run("--max-length", "1024")
    assert "max_length 1024 (override; the model was trained with 160)" in said
    assert np.abs(longer - no_flags).max() > 1e-3
    default_share = predict_proba(model, tokenizer, load_arena(data)[0], EncodingSettings(160), resolve("cpu"))
    assert np.abs(default_share - no_flags).max() > 1e-3  # prompt_share travels too, not only max_length


# --- the submission file: exact ids, normal permissions, nothing destroyed ---

def test_write_submission_writes_ids_exactly_as_read(tmp_path):
    ids = ["001", str(2**63), "7"]  # as parse_ids keeps them: no int64 wrap, no lost zero
    path = tmp_path / "submission.csv"
    write_submission(list(reversed(ids)), _probs(3), path, expected_ids=ids)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,winner_model_a,winner_model_b,winner_tie"
    assert [line.split(",")[0] for line in lines[1:]] == ids


def test_write_submission_has_normal_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_submission([1, 2], _probs(2), tmp_path / "submission.csv")
    finally:
        os.umask(old)
    assert (tmp_path / "submission.csv").stat().st_mode & 0o777 == 0o644  # mkstemp gave 0600


def test_write_submission_never_overwrites_a_file_that_is_not_a_submission(tmp_path, arena_test_path):
    data = tmp_path / "test.csv"
    data.write_bytes(arena_test_path.read_bytes())
    with pytest.raises(ValueError, match=r"test.csv exists and is not a submission"):
        write_submission(OFFICIAL_TEST_IDS, _probs(3), data, expected_ids=OFFICIAL_TEST_IDS)
    assert data.read_bytes() == arena_test_path.read_bytes()
    with pytest.raises(ValueError, match="is a directory"):
        write_submission([1], _probs(1), tmp_path)


def test_predict_ignores_label_columns_and_keeps_odd_ids(tiny_model_dir, arena_test_path, tmp_path):
    rows = pd.read_csv(arena_test_path, dtype=str, keep_default_na=False)
    rows["id"] = ["00136060", str(2**64), "1233961"]
    rows["winner_model_a"], rows["winner_model_b"], rows["winner_tie"] = ["1", "oops", "0"], "0", "0"
    data = tmp_path / "test_with_labels.csv"
    rows.to_csv(data, index=False)
    sub = predict(data, str(tiny_model_dir), out=tmp_path / "sub.csv", max_length=128, device="cpu",
                  progress=False)
    written = [line.split(",")[0] for line in (tmp_path / "sub.csv").read_text().splitlines()[1:]]
    assert written == ["00136060", str(2**64), "1233961"]
    plain = predict(arena_test_path, str(tiny_model_dir), out=tmp_path / "plain.csv", max_length=128,
                    device="cpu", progress=False)
    # the row with the bad label cell got the model's prediction, not the uniform guess
    np.testing.assert_allclose(sub.iloc[:, 1:].to_numpy(dtype=float), plain.iloc[:, 1:].to_numpy(dtype=float),
                               atol=1e-6)
    assert not np.allclose(sub.iloc[1, 1:].to_numpy(dtype=float), 1 / 3, atol=1e-4)
