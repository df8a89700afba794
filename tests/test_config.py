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


# --- typed values from the command line and --config JSON ---

from lmsys_utils.config import ConfigError  # noqa: E402


def test_command_line_values_are_converted_by_the_field_type():
    c = Config.from_overrides(None, ["resume=False", "force=no", "overwrite=1", "tta=YES", "max_steps=100",
                                     "lr=1e-4", "epochs=2", "grad_clip=None", "eval_every=null",
                                     "quantization=None", "lora_targets=q_proj, v_proj", "model=/m/llama"])
    assert (c.resume, c.force, c.overwrite, c.tta) == (False, False, True, True)
    assert c.max_steps == 100 and isinstance(c.max_steps, int)
    assert c.lr == 1e-4 and c.epochs == 2.0 and isinstance(c.epochs, float)
    assert c.grad_clip is None and c.eval_every is None and c.quantization is None
    assert c.lora_targets == ("q_proj", "v_proj") and c.model == "/m/llama"
    assert Config.from_overrides(None, ['lora_targets=["o_proj"]']).lora_targets == ("o_proj",)


@pytest.mark.parametrize("item, match", [
    ("lr=abc", r"lr='abc': expected a finite number"),
    ("lr=inf", r"lr='inf': expected a finite number"),
    ("batch_size=2.5", r"batch_size='2.5': expected a whole number"),
    ("resume=maybe", r"resume='maybe': expected true or false"),
    ("batch_size=None", r"batch_size='None': expected a whole number"),
    ("lora_targets=[1, 2]", r"lora_targets='\[1, 2\]': expected a list of names"),
    ("max_stpes=3", r"unknown Config field 'max_stpes' in the command line; did you mean max_steps\?"),
    ("max_steps", r"'max_steps': use FIELD=VALUE"),
])
def test_bad_command_line_values_name_the_field(item, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_overrides(None, [item])


def test_config_json_is_converted_and_checked(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"resume": "false", "max_steps": 50, "epochs": 2, "lora_targets": ["q_proj"]}')
    c = Config.from_overrides(path, ["max_steps=60"])
    assert c.resume is False and c.max_steps == 60 and c.epochs == 2.0 and c.lora_targets == ("q_proj",)
    for text, match in [("[1, 2]", "must be an object"), ('{"lr": true}', "lr=True: expected a finite number"),
                        ('{"batch_sise": 4}', "did you mean batch_size"), ("{oops", "not valid JSON")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            Config.load(path)


def test_python_values_are_checked_too():
    with pytest.raises(ConfigError, match="batch_size=True: expected a whole number"):
        Config(batch_size=True)
    assert dataclasses.replace(Config(), resume="false").resume is False


# --- ranges: every numeric field ---

@pytest.mark.parametrize("field, value, match", [
    ("valid_frac", 1.0, ">= 0 and < 1"), ("valid_frac", -0.1, ">= 0 and < 1"),
    ("max_train_rows", 0, ">= 1, or None"), ("max_length", 8, ">= 16"),
    ("prompt_share", 1.0, "> 0 and < 1"), ("keep_tail", -1, ">= 0 and < max_length"),
    ("keep_tail", 1024, r">= 0 and < max_length \(1024\)"), ("lora_r", 0, ">= 1"), ("lora_alpha", 0, "> 0"),
    ("lora_dropout", 1.0, ">= 0 and < 1"), ("lora_dropout", -0.1, ">= 0 and < 1"), ("epochs", 0.0, "> 0"),
    ("max_steps", 0, ">= 1, or None"), ("max_steps", -3, ">= 1, or None"), ("batch_size", 0, ">= 1"),
    ("grad_accum", 0, ">= 1"), ("lr", 0.0, "> 0"), ("lr", -1e-4, "> 0"), ("weight_decay", -0.01, ">= 0"),
    ("warmup_steps", -1, ">= 0"), ("grad_clip", 0.0, "> 0, or None"), ("log_every", 0, ">= 1"),
    ("eval_every", 0, ">= 1, or None"), ("save_every", -5, ">= 1, or None"), ("seed", -1, ">= 0"),
    ("predict_batch_tokens", 512, r">= max_length \(1024\)"),
])
def test_out_of_range_values_are_refused_with_the_allowed_range(field, value, match):
    with pytest.raises(ConfigError, match=rf"{field}={value!r} \(must be {match}"):
        dataclasses.replace(Config(), **{field: value})


def test_every_numeric_field_has_a_range_rule():
    """A new numeric field without a rule fails here: a huge negative value must be refused, naming it."""
    numeric = [f.name for f in dataclasses.fields(Config) if f.type in ("int", "float", "int | None", "float | None")]
    assert len(numeric) >= 20
    for name in numeric:
        with pytest.raises(ConfigError, match=rf"{name}=-1000000000(\.0)? \(must be"):
            dataclasses.replace(Config(), **{name: -10**9})


def test_overwrite_defaults_to_false():
    assert Config().overwrite is False
