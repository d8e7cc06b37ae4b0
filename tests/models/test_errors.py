"""Unsupported architectures and broken checkpoints are errors that name the file and the
problem."""

import json
import re

import pytest
import transformers

from align_jax.models import config_from_hf, config_to_hf, load_pretrained
from tests.models.test_hf_parity import tiny_hf_model

LLAMA = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
MOE = dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "num_heads=2 is not a multiple of num_kv_heads=3"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=True"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"model_type": "gemma3", "text_config": {}}, "model_type='gemma3': Gemma 3 with its vision "
                                                 "tower (Gemma3ForConditionalGeneration)"),
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True},
     "use_bidirectional_attention=True is not supported"),
    ({"model_type": "gemma2", "layer_types": ["full_attention"] * 2}, "layer_types="),
    ({**MOE, "mlp_only_layers": [0]}, "mlp_only_layers (dense layers between MoE ones) is not "
                                      "supported"),
    ({**MOE, "decoder_sparse_step": 2}, "decoder_sparse_step != 1"),
    ({**MOE, "model_type": "mixtral", "router_jitter_noise": 0.1},
     "router_jitter_noise is not supported"),
    ({**MOE, "num_experts_per_tok": 5}, "num_experts_per_tok=5: expected 1 to num_experts=4"),
    ({"model_type": "qwen2_moe"}, "Qwen2-MoE (mixture of experts with shared experts) is not "
                                  "supported"),
])
def test_unsupported_configs_name_the_feature(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_hf({**LLAMA, **change}, source="x/config.json")


def test_missing_config_key_is_named():
    config = dict(LLAMA)
    del config["intermediate_size"]
    with pytest.raises(ValueError,
                       match="x/config.json: model_type='llama': missing key 'intermediate_size'"):
        config_from_hf(config, source="x/config.json")


def test_hf_round_trip_of_config():
    sizes = {k: v for k, v in LLAMA.items() if k != "model_type"}
    for hf in (transformers.LlamaConfig(**sizes), transformers.Qwen3Config(**sizes, head_dim=4),
               transformers.Gemma2Config(**sizes, head_dim=4),
               transformers.Gemma3TextConfig(**{**sizes, "num_hidden_layers": 7}, head_dim=4,
                                             rope_scaling={"rope_type": "linear", "factor": 8.0}),
               transformers.MixtralConfig(**sizes, num_local_experts=4, num_experts_per_tok=2),
               transformers.Qwen3MoeConfig(**sizes, head_dim=4, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=8,
                                           norm_topk_prob=True)):
        config = config_from_hf(hf)
        assert config_from_hf(config_to_hf(config)) == config
        reloaded = type(hf)(**{k: v for k, v in config_to_hf(config).items()
                               if k != "architectures"})
        assert config_from_hf(reloaded) == config


def test_gemma_hub_config_files_read_as_transformers_reads_them():
    """config.json as the Hub has it for Gemma 2 (no layer_types) and Gemma 3 (rope_scaling,
    rope_local_base_freq, sliding_window_pattern): the layer pattern and both RoPE bases."""
    gemma2 = config_from_hf({**LLAMA, "model_type": "gemma2", "num_hidden_layers": 4,
                                    "sliding_window": 16, "query_pre_attn_scalar": 224})
    assert gemma2.windowed_layers() == (True, False, True, False)
    assert gemma2.attention_scale == 224 ** -0.5 and gemma2.tie_word_embeddings
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (None, None)
    gemma3 = config_from_hf({**LLAMA, "model_type": "gemma3_text", "num_hidden_layers": 7,
                                    "sliding_window_pattern": 6, "rope_theta": 1e6,
                                    "rope_local_base_freq": 1e4,
                                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert gemma3.windowed_layers() == (True,) * 5 + (False, True)
    assert (gemma3.rope_theta, gemma3.rope_local_theta, gemma3.rope_factor) == (1e6, 1e4, 8.0)
    assert gemma3.qk_norm and gemma3.rope_type == "linear"


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
