"""The model families align_jax runs, by the `model_type` of a Hugging Face config.json.

Every family runs on the one `Decoder`, whose features (norm style, activation, sandwich norms,
soft-capping, per-layer windows, experts, …) are DecoderConfig fields. A family is a record of how
to read its config.json into those fields, write them back, and name its tensors: adding one is a
module with its records (`models.llama`, `models.gemma`, `models.mixtral`) plus its parity test
against transformers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

from align_jax.models import gemma, llama, mixtral
from align_jax.models.config import DecoderConfig, common_fields, common_hf

# (HF tensor name inside block i, after "model.layers.{i}."; the path of our variable inside a
# block; whether the HF tensor is the transpose of ours[; the expert it is row e of, for a
# stacked expert weight])
BlockName = tuple


class Family(NamedTuple):
    causal_lm: str  # the transformers class of the language model
    classifier: str  # … of a one-label sequence classifier (reward model, critic)
    fields: Callable[[dict[str, Any], str], dict[str, Any]]  # config.json -> DecoderConfig fields
    hf_fields: Callable[[DecoderConfig], dict[str, Any]]  # DecoderConfig -> config.json entries
    block_names: Callable[[DecoderConfig], Iterator[BlockName]]
    gguf: bool  # GGUF files load (llama.cpp's tensor names, `models.hf`)
    # a transformers model's state_dict() -> the checkpoint's tensor names, where they differ
    unfuse: Callable[[dict[str, Any], DecoderConfig], dict[str, Any]] | None


FAMILIES: dict[str, Family] = {}
for _module in (llama, gemma, mixtral):
    for _type, (_lm, _classifier, _gguf) in _module.ARCHITECTURES.items():
        FAMILIES[_type] = Family(_lm, _classifier, _module.fields, _module.hf_fields,
                                 _module.block_names, _gguf, getattr(_module, "unfuse", None))

# model types that are close relatives of a family but need what the Decoder does not have
REFUSED = {
    "gemma3": "Gemma 3 with its vision tower (Gemma3ForConditionalGeneration); a text-only "
              "checkpoint has model_type 'gemma3_text'",
    "gemma3n": "Gemma 3n (per-layer embeddings, AltUp, LAuReL)",
    "qwen2_moe": "Qwen2-MoE (mixture of experts with shared experts)",
}


def check_model_type(model_type: str | None, where: str) -> None:
    """A ValueError naming `where` and the feature, unless `model_type` is a registered family."""
    if model_type in REFUSED:
        raise ValueError(f"{where}: {REFUSED[model_type]} is not supported")
    if model_type not in FAMILIES:
        raise ValueError(f"{where} is not supported; align_jax supports {tuple(FAMILIES)}")


def config_from_hf(hf: dict[str, Any] | Any, *, source: str = "config") -> DecoderConfig:
    """The DecoderConfig of a transformers config (object or config.json dict)."""
    hf = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = hf.get("model_type")
    where = f"{source}: model_type={model_type!r}"
    check_model_type(model_type, where)
    try:
        fields = {**common_fields(hf, where), **FAMILIES[model_type].fields(hf, where)}
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}") from None
    return DecoderConfig(**fields, model_type=model_type)


def config_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """The config.json dict that transformers loads into the matching architecture."""
    family = FAMILIES[config.model_type]
    return {"architectures": [family.causal_lm], **common_hf(config), **family.hf_fields(config)}


def config_from_init(init: dict[str, Any], *, source: str = "model.init") -> DecoderConfig:
    """The DecoderConfig of a model built from scratch: `init` holds a transformers config's
    keyword arguments, with `model_type` (default "llama") naming the family; what `init` leaves
    out takes transformers' default for that family."""
    import transformers

    init = dict(init)
    model_type = init.pop("model_type", "llama")
    check_model_type(model_type, f"{source}: model_type={model_type!r}")
    hf = transformers.AutoConfig.for_model(model_type, **init)
    return config_from_hf(hf, source=source)
