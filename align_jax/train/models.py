"""The models a step trains and the ones it only reads: full fine-tuning, or LoRA adapters on a
frozen (possibly quantized) base.

Full fine-tuning trains every parameter; the reference, when a method needs one, is a frozen copy
(`Frozen.reference`). With `model.lora`, the train state holds the adapters (and a reward model's
or critic's scalar head: `lora.TRAINABLE`) and their optimizer state only; the base is frozen
(`Frozen.base`), held in the compute dtype or quantized (`model.lora.base_dtype`), and the
reference is that same base with the adapters off: the base's parameters merged into the model
built without adapters, no second copy. A sweep's members are stacked adapters over one base.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from align_jax import ops
from align_jax.config import RunConfig
from align_jax.models import save_pretrained
from align_jax.models.lora import PROJECTIONS, TRAINABLE, set_dropout_key
from align_jax.models.peft import merge_adapters, read_adapter, write_adapter
from align_jax.models.quant import quantize
from align_jax.train.host import base_quant, decoder_factory, frozen_params, pretrained_params
from align_jax.train.mesh import param_shardings
from align_jax.train.state import TrainState, init_train_state


class Frozen(NamedTuple):
    """The parameters a step reads and never updates."""

    base: nnx.State | None = None  # LoRA: the base the adapters sit on
    reference: nnx.State | None = None  # a reference model held on its own


@dataclasses.dataclass(frozen=True)
class Models:
    """How a step builds its models from the train state's parameters and the frozen ones.

    `graphdef` is the trained model's (under LoRA, split into adapters and base); `base_graphdef`
    the same model without adapters, which `Frozen.base` completes when the model has no scalar
    head (a policy); `reference_graphdef` that of `Frozen.reference` (default: `graphdef`).
    `base_is_reference`: the reference is the base with the adapters off (its `reference_part`,
    PPO's "policy" of the actor-critic pair, built by `reference_graphdef`). `dropout`: training
    passes draw LoRA dropout masks."""

    graphdef: nnx.GraphDef
    base_graphdef: nnx.GraphDef | None = None
    reference_graphdef: nnx.GraphDef | None = None
    base_is_reference: bool = False
    reference_part: str | None = None
    dropout: bool = False

    def model(self, params: nnx.State, frozen: Frozen, dropout_key: jax.Array | None = None):
        model = (nnx.merge(self.graphdef, params) if frozen.base is None
                 else nnx.merge(self.graphdef, params, frozen.base))
        if self.dropout and dropout_key is not None:
            set_dropout_key(model, dropout_key)
        return model

    def reference(self, frozen: Frozen):
        """The frozen reference model, or None when the run holds none."""
        if frozen.reference is not None:
            return nnx.merge(self.reference_graphdef or self.graphdef, frozen.reference)
        if self.base_is_reference and self.reference_part is not None:
            return nnx.merge(self.reference_graphdef, frozen.base[self.reference_part])
        if self.base_is_reference:
            return nnx.merge(self.base_graphdef, frozen.base)
        return None


_quantize = jax.jit(quantize, static_argnames="kind")


def to_base(pretrained: nnx.State, shardings: nnx.State, quant: str | None, dtype,
            init: Callable[[], nnx.State]) -> nnx.State:
    """The frozen base, laid out as `shardings`: `pretrained`'s weights (floating point, without
    adapters or scalar head) placed one array at a time, every projection's kernel quantized from
    its float32 weights when `quant` says so, every floating-point array in the compute `dtype`;
    what `pretrained` lacks (a critic's base when only the policy is given) from `init()`.
    Placing one array at a time keeps the whole float32 model off the devices."""
    where = nnx.to_pure_dict(shardings)
    tree = jax.tree.map(lambda _: None, where)

    def put(node: dict, given: dict, where: dict):
        for name, child in given.items():
            if isinstance(child, dict) and name in PROJECTIONS and quant is not None:
                child = dict(child)
                codes, scale = _quantize(jax.device_put(child.pop("kernel"),
                                                        where[name]["kernel"]), kind=quant)
                node[name]["kernel"] = jax.device_put(codes, where[name]["kernel"])
                node[name]["kernel_scale"] = jax.device_put(scale.astype(dtype),
                                                            where[name]["kernel_scale"])
                put(node[name], child, where[name])
            elif isinstance(child, dict):
                put(node[name], child, where[name])
            else:
                node[name] = ops.cast_floating(jax.device_put(child, where[name]), dtype)

    put(tree, nnx.to_pure_dict(pretrained), where)
    if any(x is None for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None)):
        initial = nnx.to_pure_dict(jax.jit(init, out_shardings=shardings)())
        tree = jax.tree.map(lambda x, y: y if x is None else x, tree, initial,
                            is_leaf=lambda x: x is None)
    base = jax.tree.map(lambda x: x, shardings)
    nnx.replace_by_pure_dict(base, tree)
    return base


def init_lora(make_model: Callable, make_base: Callable, tx: optax.GradientTransformation,
              mesh: Mesh, seed: int, pretrained: nnx.State | None, adapters: nnx.State | None,
              quant: str | None, dtype) -> tuple[Models, TrainState, TrainState, Frozen, Frozen]:
    """(models, train state of the adapters, its shardings, the frozen base, its shardings).

    The base is `pretrained` (its scalar head, if any, goes to the train state) or, without it,
    `make_model`'s own initial weights; `adapters` (from a PEFT directory) replace the new ones."""
    trained = None
    if pretrained is not None:
        head, pretrained = nnx.split_state(pretrained, TRAINABLE, ...)
        trained = nnx.merge_state(head, adapters) if adapters is not None else head
    elif adapters is not None:
        trained = adapters
    graphdef, state, shardings = init_train_state(make_model, tx, mesh, seed, trained or None,
                                                  trainable=TRAINABLE)
    # the base: what the trained model holds besides its trainable parameters
    abstract_base = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(seed))), TRAINABLE,
                              ...)[2]
    base_graphdef = nnx.split(nnx.eval_shape(lambda: make_base(nnx.Rngs(seed))))[0]
    base_shardings = param_shardings(abstract_base, mesh)

    def init():  # the model's initialisation, whose projections Linear quantized already
        _, _, base = nnx.split(make_model(nnx.Rngs(seed)), TRAINABLE, ...)
        return ops.cast_floating(base, dtype)

    base = (jax.jit(init, out_shardings=base_shardings)() if pretrained is None
            else to_base(pretrained, base_shardings, quant, dtype, init))
    models = Models(graphdef, base_graphdef)
    return models, state, shardings, Frozen(base=base), Frozen(base=base_shardings)


def dropout_key(state: TrainState) -> jax.Array:
    """The key of a training step's LoRA dropout: the state's rng folded with its step."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def init_models(cfg: RunConfig, mesh: Mesh, tx: optax.GradientTransformation, make_model,
                make_base, pretrained: nnx.State | None, *, adapter_prefix: tuple = ()
                ) -> tuple[Models, TrainState, TrainState, Frozen, Frozen]:
    """(models, train state, its shardings, frozen parameters, their shardings) of a run that
    trains `make_model` from `pretrained` (`host.build_model`): every parameter, or with
    `model.lora` adapters on the frozen base `make_base` builds (continued from the PEFT adapter
    `model.lora.init_from`, placed at `adapter_prefix` of the model: ("policy",) in PPO's
    actor-critic pair)."""
    seed = cfg.train.seed
    if cfg.model.lora is None:
        graphdef, state, shardings = init_train_state(make_model, tx, mesh, seed, pretrained)
        return Models(graphdef), state, shardings, Frozen(), Frozen()
    lora = cfg.model.lora
    adapters = None
    if lora.init_from is not None:
        abstract = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(seed))), TRAINABLE,
                             ...)[1]
        for key in adapter_prefix:
            abstract = abstract[key]
        adapters = read_adapter(lora.init_from, abstract, lora)
        for key in reversed(adapter_prefix):
            adapters = nnx.State({key: adapters})
    models, state, shardings, frozen, frozen_shardings = init_lora(
        make_model, make_base, tx, mesh, seed, pretrained, adapters, base_quant(cfg),
        jnp.dtype(cfg.model.dtype))
    return (dataclasses.replace(models, dropout=lora.dropout > 0), state, shardings, frozen,
            frozen_shardings)


def add_reference(cfg: RunConfig, mesh: Mesh, models: Models, state: TrainState, frozen: Frozen,
                  frozen_shardings: Frozen, part: str | None = None,
                  make_base: Callable | None = None) -> tuple[Models, Frozen, Frozen]:
    """The run's models and frozen parameters with the reference of DPO, KTO, GRPO (β > 0) and
    PPO: the checkpoint `reference` names, else the base with the adapters off (LoRA), else a
    frozen copy of the starting weights; of the trained model's `part` when given (PPO's
    "policy", whose adapter-free structure `make_base` builds under LoRA)."""
    if cfg.reference is None and models.base_graphdef is not None:
        graphdef = (None if part is None else
                    nnx.split(getattr(nnx.eval_shape(lambda: make_base(nnx.Rngs(0))), part))[0])
        return (dataclasses.replace(models, base_is_reference=True, reference_part=part,
                                    reference_graphdef=graphdef), frozen, frozen_shardings)
    if cfg.reference is not None:  # a plain decoder: no adapters, not quantized
        config, params = pretrained_params(cfg, cfg.reference)
        make = decoder_factory(cfg, config, mesh, adapters=False, quantized=False)
        graphdef = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))[0]
    else:
        model = models.model(state.params, frozen)
        graphdef, params = nnx.split(getattr(model, part) if part else model)
    params = frozen_params(params, cfg)
    shardings = param_shardings(params, mesh)
    return (dataclasses.replace(models, reference_graphdef=graphdef),
            frozen._replace(reference=jax.device_put(params, shardings)),
            frozen_shardings._replace(reference=shardings))


def drop_reference(models: Models, frozen: Frozen, frozen_shardings: Frozen
                   ) -> tuple[Models, Frozen, Frozen]:
    """The same without a reference (DPO's reference log-probs precomputed)."""
    return (dataclasses.replace(models, base_is_reference=False),
            frozen._replace(reference=None), frozen_shardings._replace(reference=None))


def export(cfg: RunConfig, model, out: Path, tokenizer, name: str = "model") -> None:
    """The trained model as a Hugging Face directory `out/<name>/`; after a LoRA run, `<name>/`
    holds the adapters merged into the base, and the policy's adapters are also written as a PEFT
    directory `out/adapter/`."""
    lora = cfg.model.lora
    if lora is None:
        save_pretrained(model, out / name, tokenizer=tokenizer)
        return
    if name == "model":
        write_adapter(model, lora, out / "adapter", base_model=cfg.model.path)
    save_pretrained(merge_adapters(model, lora), out / name, tokenizer=tokenizer)
