import dataclasses

import pytest

from lmsys_utils.config import Config


def test_defaults_are_a_valid_kaggle_tpu_run():
    c = Config()
    assert c.train_path.startswith("/kaggle/input/lmsys-chatbot-arena") and c.output_dir.startswith("/kaggle/working")


def test_every_field_has_a_doc_line():
    source = open(Config.__module__.replace(".", "/") + ".py").read()
    for f in dataclasses.fields(Config):
        after = source.split(f"    {f.name}:", 1)[1].splitlines()[1].strip()
        assert after.startswith('"""'), f"field {f.name} has no doc line"


def test_invalid_fields_are_named():
    with pytest.raises(ValueError, match=r"max_length=4.*lr=0"):
        Config(max_length=4, lr=0)
    with pytest.raises(ValueError, match="schedule='cosin'"):
        dataclasses.replace(Config(), schedule="cosin")


def test_save_load_round_trip(tmp_path):
    c = dataclasses.replace(Config(), max_length=256, lora_targets=("q_proj", "v_proj"))
    c.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == c
