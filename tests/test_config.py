import re

import pytest
import yaml

from llm.config import ConfigError, ModelConfig, RunConfig, load_config, load_model_config, save_config
from tests.helpers import ROOT


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_config_with_preset_and_overrides(tmp_path):
    path = write(tmp_path, {"model": "tiny", "data": {"seq_len": 256}, "train": {"steps": 5}, "optim": {"lr": "3e-4"}})
    cfg = load_config(path, ["train.micro_batch_size=2", "model.n_layers=3", "optim.betas=[0.9, 0.99]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.model.d_model == 128 and cfg.model.n_layers == 3
    assert cfg.train.steps == 5 and cfg.train.micro_batch_size == 2
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == [0.9, 0.99]


def test_model_preset_file_reads_as_run_config():
    cfg = load_config("configs/model/7b.yaml")
    assert cfg.model.n_layers == 32 and cfg.model.d_ff == 11008


@pytest.mark.parametrize(
    "model, key, fragment",
    [
        ({"d_model": 64, "n_heads": 7}, "model.n_heads", "must divide model.d_model = 64"),
        ({"d_model": 64, "n_heads": 8, "n_kv_heads": 3}, "model.n_kv_heads", "divisor of model.n_heads = 8"),
        ({"d_model": 64, "n_heads": 4, "n_layer": 2}, "model.n_layer", "did you mean 'n_layers'"),
        ({"d_model": "big"}, "model.d_model", "expected an integer"),
        ({"d_model": 64.0}, "model.d_model", "expected an integer"),
        ({"tie_embeddings": "yes"}, "model.tie_embeddings", "expected true or false"),
        ({"attention": "flashy"}, "model.attention", "one of 'auto', 'flash', 'sdpa', 'eager'"),
        ({"vocab_size": 0}, "model.vocab_size", "must be positive"),
    ],
)
def test_bad_model_values_name_key_value_and_file(tmp_path, model, key, fragment):
    path = write(tmp_path, {"model": model})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and fragment in msg


def test_bad_value_in_other_sections(tmp_path):
    path = write(tmp_path, {"model": "tiny", "data": {"seq_len": 128}, "train": {"steps": -1}})
    with pytest.raises(ConfigError, match=r"train\.steps = -1: must be positive"):
        load_config(path)
    path = write(tmp_path, {"model": "tiny", "data": {"seq_len": 4096}})
    with pytest.raises(ConfigError, match=r"data\.seq_len = 4096: exceeds model\.max_seq_len = 512"):
        load_config(path)
    path = write(tmp_path, {"model": "tiny", "data": {"seq_len": 128, "datasets": [{"path": "x", "weight": 0}]}})
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.weight = 0"):
        load_config(path)
    path = write(tmp_path, {"model": "tiny", "schedule": {"x": 1}})
    with pytest.raises(ConfigError, match="unknown key 'schedule'"):
        load_config(path)


def test_bad_override_is_named(tmp_path):
    path = write(tmp_path, {"model": "tiny", "data": {"seq_len": 128}})
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads = 3"):
        load_config(path, ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        load_config(path, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["train.steps"])


def test_missing_file_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="model preset 'nope' not found.*tiny"):
        load_config(write(tmp_path, {"model": "nope"}))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"model": "tiny", "data": {"seq_len": 128}, "train": {"steps": 7}}))
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_model_config_derived_sizes():
    cfg = ModelConfig(d_model=4096, n_heads=32, n_kv_heads=None, d_ff=None)
    assert cfg.kv_heads == 32 and cfg.head_dim == 128
    assert cfg.ffn_hidden == 11008  # Llama's rule: 8/3 * 4096 rounded up to a multiple of 256
    assert load_model_config("tiny", ["n_layers=1"]).n_layers == 1


def test_translation_run_config(tmp_path):
    path = write(tmp_path, {"task": "translation", "model": "transformer-base", "data": {"path": "data/pairs"},
                            "decode": {"beam_size": 4}})
    cfg = load_config(path, ["model.vocab_size=8000", "data.max_tokens=2048"])
    assert cfg.model.n_encoder_layers == 6 and cfg.model.vocab_size == 8000 and cfg.data.max_tokens == 2048
    assert cfg.decode.beam_size == 4 and cfg.label_smoothing == 0.1
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert RunConfig().label_smoothing == 0.0  # lm default


@pytest.mark.parametrize("data, message", [
    ({"task": "translation", "model": "tiny"}, "task = 'translation': the model section describes a ModelConfig"),
    ({"model": "transformer-tiny"}, "task = 'lm': the model section describes a TranslationModelConfig; set task: "
                                    "translation"),
    ({"task": "mt"}, "task = 'mt': expected one of 'lm', 'translation'"),
    ({"task": "translation", "model": "transformer-tiny", "data": {"seq_len": 5}}, "unknown key 'data.seq_len'"),
    ({"task": "translation", "model": "transformer-tiny", "data": {"bleu_source": "a.txt"}},
     "bleu_source and bleu_reference go together"),
    ({"task": "translation", "model": "transformer-tiny", "decode": {"beam_size": 0}}, "decode.beam_size = 0"),
    ({"model": "tiny", "train": {"label_smoothing": 1.0}}, "train.label_smoothing = 1.0: must be in"),
])
def test_translation_config_errors_name_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.grad_clip=.inf", "model.init_std=.inf",
                                      "train.collective_timeout_s=-.inf"])
def test_nan_and_infinite_values_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} = .*expected a finite number"):
        load_config(ROOT / "configs/train/tiny_cpu.yaml", [override])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[mt][or]*/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_model_and_train_config_loads(path):
    """(A config with `model: init_from` gets a preset's shape in place of the folder it names.)"""
    load_config(path, model_of=lambda folder: yaml.safe_load((ROOT / "configs/model/smollm2-135m.yaml").read_text()))


@pytest.mark.parametrize("rope, message", [
    ("{type: llama3, factor: 8.0}", r"model.rope_scaling.original_max_position_embeddings = None: llama3 scaling "
                                    r"needs the pretraining context length"),
    ("{type: yarn, factor: 0.5, original_max_position_embeddings: 64}", r"model.rope_scaling.factor = 0.5: must be at"),
    ("{type: ntk, factor: 2.0}", r"model.rope_scaling.type = 'ntk': expected one of 'llama3', 'linear', 'yarn'"),
    ("{type: linear, factr: 2.0}", r"unknown key 'model.rope_scaling.factr' \(did you mean 'factor'\?\)"),
])
def test_rope_scaling_is_checked_with_the_key_named(tmp_path, rope, message):
    (tmp_path / "run.yaml").write_text(f"model: {{n_layers: 1, rope_scaling: {rope}}}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "run.yaml")


def test_decoupled_head_size(tmp_path):
    (tmp_path / "run.yaml").write_text("model: {d_model: 96, n_heads: 5, d_head: 32}\n")
    assert load_config(tmp_path / "run.yaml").model.head_dim == 32  # 5 heads do not divide 96: d_head says 32
    (tmp_path / "run.yaml").write_text("model: {d_model: 96, n_heads: 5}\n")
    with pytest.raises(ConfigError, match=r"model.n_heads = 5: must divide model.d_model = 96 \(or set model.d_head\)"):
        load_config(tmp_path / "run.yaml")


def test_model_init_from_takes_the_folders_model(tmp_path):
    """`model: init_from` reads the train.init_from folder's config.json (through the CLI's resolver); overrides
    apply to it; without init_from, or with a folder we cannot import, one line names the problem."""
    import transformers

    from llm.export.families import model_section

    folder = tmp_path / "qwen"
    transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=True).save_pretrained(folder)
    (tmp_path / "run.yaml").write_text(f"model: init_from\ndata: {{seq_len: 64}}\ntrain: {{init_from: {folder}}}\n")
    cfg = load_config(tmp_path / "run.yaml", ["model.attention=sdpa"], model_of=model_section)
    assert (cfg.model.family, cfg.model.attention_bias, cfg.model.vocab_size) == ("qwen2", True, 300)
    assert cfg.model.attention == "sdpa" and cfg.model.tie_embeddings and cfg.train.init_from == str(folder)
    with pytest.raises(ConfigError, match="model = 'init_from': takes the model of train.init_from, which is not"):
        load_config(tmp_path / "run.yaml", ["train.init_from=null"], model_of=model_section)
    with pytest.raises(ConfigError, match=rf"model = 'init_from': train.init_from: {tmp_path}/nothing: no config"):
        load_config(tmp_path / "run.yaml", [f"train.init_from={tmp_path}/nothing"], model_of=model_section)
    transformers.GPT2Config().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"gpt2/config.json: model_type 'gpt2' is not supported"):
        load_config(tmp_path / "run.yaml", [f"train.init_from={tmp_path}/gpt2"], model_of=model_section)


@pytest.mark.parametrize("overrides, message", [
    (["train.sequence_parallel=3"], "train.sequence_parallel = 3: must divide data.seq_len = 128"),
    (["train.sequence_parallel=8", "data.seq_len=256"], "train.sequence_parallel = 8: must divide model.n_heads = 4"),
    (["model.d_model=192", "model.n_heads=12", "model.n_kv_heads=4", "train.sequence_parallel=3",
      "data.seq_len=129"], "model.n_kv_heads = 4: one must divide the other"),
    (["train.sequence_parallel=0"], "train.sequence_parallel = 0: must be positive"),
])
def test_sequence_parallel_is_checked_against_the_sequence_and_the_heads(tmp_path, overrides, message):
    path = write(tmp_path, {"model": "tiny", "data": {"seq_len": 128}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, overrides)
    assert load_config(path, ["train.sequence_parallel=4"]).train.sequence_parallel == 4  # 4 heads, 2 kv: repeated
    translation = write(tmp_path, {"task": "translation", "model": "transformer-tiny", "data": {"path": "p"},
                                   "train": {"sequence_parallel": 2}}, "mt.yaml")
    with pytest.raises(ConfigError, match="train.sequence_parallel = 2: splits the sequences of language models"):
        load_config(translation)
