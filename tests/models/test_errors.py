"""Unsupported architectures and broken checkpoints are errors that name the file and the
problem."""

import json

import pytest
import transformers

from align_jax.models import DecoderConfig, load_pretrained
from tests.models.test_hf_parity import tiny_hf_model

LLAMA = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "num_heads=2 is not a multiple of num_kv_heads=3"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=True"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
])
def test_unsupported_configs_name_the_feature(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        DecoderConfig.from_hf({**LLAMA, **change}, source="x/config.json")


def test_missing_config_key_is_named():
    config = dict(LLAMA)
    del config["intermediate_size"]
    with pytest.raises(ValueError,
                       match="x/config.json: model_type='llama': missing key 'intermediate_size'"):
        DecoderConfig.from_hf(config, source="x/config.json")


def test_hf_round_trip_of_config():
    for hf in (transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}),
               transformers.Qwen3Config(vocab_size=10, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=4)):
        config = DecoderConfig.from_hf(hf)
        assert DecoderConfig.from_hf(config.to_hf()) == config


def test_broken_checkpoint_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        load_pretrained(tmp_path)
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=False)  # pickled pytorch_model.bin only
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        load_pretrained(tmp_path)


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                         r"\(96, 64\), expected \(128, 64\)"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.1"):
        load_pretrained(tmp_path)


def test_failed_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    from align_jax.models import hf as hf_io

    model = load_pretrained(tiny_hf_model("llama"))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "to_tensors", explode)
    with pytest.raises(OSError, match="disk full"):
        hf_io.save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
