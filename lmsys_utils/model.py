"""Load the tokenizer and 3-way sequence classifier, add LoRA, save/load adapters; the tiny test model."""

from __future__ import annotations

from pathlib import Path

from .data import CLASS_NAMES

ID2LABEL = dict(enumerate(CLASS_NAMES))
LABEL2ID = {v: k for k, v in ID2LABEL.items()}


def build_tiny_model(out_dir, texts=None, vocab_size: int = 1000, hidden_size: int = 64,
                     num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny Llama-architecture classifier and a byte-level BPE tokenizer to `out_dir`.

    It loads through the same `from_pretrained` path as a real model, so tests, smoke runs and the demo
    exercise the real code. `texts` trains the tokenizer (default: the demo data's text).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if texts is None:
        from .demo import make_demo_data

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
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    LlamaForSequenceClassification(config).save_pretrained(out_dir)
    return out_dir
