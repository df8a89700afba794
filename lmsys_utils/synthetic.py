"""Synthetic battles in the competition's format and tiny models of each supported architecture, made by the
project so tests, smoke runs and the demo run end to end on a fresh clone with no download.

The rows are clearly synthetic (model names start with `demo-`) but have the real data's structure:
JSON lists of turns, multi-turn rows, null turns, non-ASCII text and ties. The label follows a learnable
signal: a helpful, specific response beats a vague or refusing one; equal quality is most often a tie.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data import ID2LABEL, LABEL2ID, LABEL_COLUMNS, to_competition_csv

_TOPICS = [
    "sorting a list in Python", "the water cycle", "baking sourdough bread", "the French Revolution",
    "compound interest", "photosynthesis", "writing a cover letter", "black holes", "la cuisine française",
    "東京の観光", "learning to juggle", "binary search", "the history of tea", "training for a marathon",
    "choosing a laptop", "the Pythagorean theorem", "résumé tips", "coral reefs", "Ünïcödé normalisation",
    "planning a trip to Kraków", "prime numbers", "making cold brew coffee ☕", "electric cars", "haiku",
]
_ASK = [
    "Can you explain {t}?", "Tell me about {t}.", "What should I know about {t}?",
    "Give me a short guide to {t}.", "Why does {t} matter?",
]
_FOLLOW_UP = ["Can you give an example?", "Make it shorter please.", "What is a common mistake?", "Merci !"]
_GOOD = [
    "Sure! Here is a clear answer about {t}.\n\n1. Start with the key idea.\n2. Then look at an example.\n"
    "3. Finally, check the common mistakes.\n\nI hope this helps, happy to go deeper.",
    "Great question. {t} comes down to three points: the definition, a worked example and a practical "
    "tip. For example, step by step, you can see how each part fits. Let me know if you want more detail.",
    "Here is a concise, accurate overview of {t}:\n- what it is\n- how it works\n- why it matters\n"
    "Example included below, with a short summary at the end.",
]
_BAD = [
    "I cannot help with that request.",
    "Not sure. {t}? Maybe look it up somewhere.",
    "As an AI I have no opinion on {t}.",
    "{t} is something. It depends.",
]
_MODELS = {  # name -> probability of a helpful answer
    "demo-model-alpha": 0.8, "demo-model-beta": 0.6, "demo-model-gamma": 0.45, "demo-model-delta": 0.25,
}


def make_demo_data(n_rows: int = 800, seed: int = 0, labeled: bool = True) -> pd.DataFrame:
    """Return `n_rows` synthetic battles as parsed rows (lists of turns), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    names = list(_MODELS)
    rows = []
    for i in range(n_rows):
        topic = _TOPICS[rng.integers(len(_TOPICS))]
        n_turns = 1 if rng.random() < 0.85 else int(rng.integers(2, 4))
        prompt = [_ASK[rng.integers(len(_ASK))].format(t=topic)]
        prompt += [_FOLLOW_UP[rng.integers(len(_FOLLOW_UP))] for _ in range(n_turns - 1)]
        model_a, model_b = rng.choice(names, size=2, replace=False)
        good_a, good_b = rng.random() < _MODELS[model_a], rng.random() < _MODELS[model_b]
        response_a = _respond(rng, topic, good_a, n_turns)
        response_b = _respond(rng, topic, good_b, n_turns)
        row = {"id": 9_000_000 + i, "model_a": model_a, "model_b": model_b,
               "prompt": prompt, "response_a": response_a, "response_b": response_b}
        if labeled:
            row.update(zip(LABEL_COLUMNS, _label(rng, good_a, good_b)))
        rows.append(row)
    return pd.DataFrame(rows)


def _respond(rng, topic: str, good: bool, n_turns: int) -> list:
    pool = _GOOD if good else _BAD
    turns = [pool[rng.integers(len(pool))].format(t=topic) for _ in range(n_turns)]
    if rng.random() < 0.02:  # the real data has JSON null turns
        turns[-1] = None
    return turns


def _label(rng, good_a: bool, good_b: bool) -> tuple:
    if good_a != good_b:
        p = [0.82, 0.06, 0.12] if good_a else [0.06, 0.82, 0.12]
    else:
        p = [0.2, 0.2, 0.6]
    winner = rng.choice(3, p=p)
    return tuple(int(k == winner) for k in range(3))


def write_demo_data(out_dir, n_train: int = 800, n_test: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.csv` and `test.csv` (no labels) in the competition's format; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = make_demo_data(n_train, seed)
    test = make_demo_data(n_test, seed + 1, labeled=False).drop(columns=["model_a", "model_b"])
    test["id"] += n_train
    train_path, test_path = out_dir / "train.csv", out_dir / "test.csv"
    to_competition_csv(train, train_path)
    to_competition_csv(test, test_path)
    return train_path, test_path




# tiny configs of each architecture family the best solutions used; every one loads through the same
# `from_pretrained` path as the real model, with LoRA targets, pad token and score head chosen the same way
_TINY_ARCHITECTURES = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=64),
    "bert": dict(num_attention_heads=4, type_vocab_size=1),
}
ARCHITECTURES = tuple(_TINY_ARCHITECTURES)


def build_tiny_model(out_dir, texts=None, vocab_size: int = 1000, hidden_size: int = 64, num_layers: int = 2,
                     seed: int = 0, architecture: str = "llama") -> Path:
    """Write a tiny 3-way classifier of `architecture` (see ARCHITECTURES) and a byte-level BPE tokenizer.

    It loads through the same `from_pretrained` path as a real model, so tests, smoke runs and the demo
    exercise the real code. `texts` trains the tokenizer (default: the demo data's text).
    """
    # here, not at the top: the demo data (check-data, eda) must not need torch
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    if architecture not in _TINY_ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if texts is None:
        df = make_demo_data(400, seed=seed)
        texts = [t or "" for col in ("prompt", "response_a", "response_b") for turns in df[col] for t in turns]
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    bpe = Tokenizer(models.BPE(unk_token="<|unk|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|bos|>",
                                        eos_token="<|eos|>", unk_token="<|unk|>")
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        architecture, vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=2 * hidden_size, max_position_embeddings=4096, num_labels=3, id2label=ID2LABEL,
        label2id=LABEL2ID, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **_TINY_ARCHITECTURES[architecture])
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out_dir)
    return out_dir


def smoke_inputs(smoke_dir, shared_data="../shared/data/arena") -> dict:
    """Paths for a notebook's smoke mode: the real sample rows when `shared_data` holds them, else demo data,
    and the tiny model (built once; deterministic, so every notebook gets the same weights).

    Returns {"train_csv", "test_csv", "model"}.
    """
    smoke_dir, shared = Path(smoke_dir), Path(shared_data)
    if (shared / "train_sample.csv").is_file() and (shared / "test.csv").is_file():
        train_csv, test_csv = shared / "train_sample.csv", shared / "test.csv"
    else:
        train_csv, test_csv = write_demo_data(smoke_dir / "data")
    model = smoke_dir / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    return {"train_csv": str(train_csv), "test_csv": str(test_csv), "model": str(model)}
