"""The stacked, scanned layers: one block's program whatever the depth, and a parameter that does
not divide its mesh axis is named in a warning."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from align_jax.models import Decoder, DecoderConfig
from align_jax.train.mesh import AXES, param_shardings


def config(num_layers: int, num_kv_heads: int = 2) -> DecoderConfig:
    return DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=num_layers,
                         num_heads=4, num_kv_heads=num_kv_heads, head_dim=6)


def training_program(num_layers: int) -> str:
    """The StableHLO of a loss and its gradient, for a model of `num_layers` layers."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(config(num_layers),
                                                                rngs=nnx.Rngs(0), remat="full")))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(p, ids):
        return jnp.mean(nnx.merge(graphdef, p)(ids) ** 2)

    return jax.jit(jax.value_and_grad(loss)).lower(params, ids).as_text()


def test_the_program_does_not_grow_with_depth():
    shallow, deep = training_program(2), training_program(32)
    # Only the stacked shapes' leading dimension differs: 2 -> 32.
    assert deep.count("\n") == shallow.count("\n")
    assert deep.count("stablehlo.while") == shallow.count("stablehlo.while") == 2  # fwd, bwd


def test_a_parameter_that_does_not_divide_its_mesh_axis_is_named():
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config(2, num_kv_heads=1),
                                                        rngs=nnx.Rngs(0))))
    mesh = AbstractMesh((1, 2, 1, 4), AXES)
    with pytest.warns(UserWarning) as caught:
        shardings = param_shardings(abstract, mesh)
    # One kv head of width 6 does not split over 4 tensor devices; 4 query heads of 6 do.
    assert sorted(str(w.message) for w in caught) == [
        f"parameter layers.self_attn.{p}_proj.kernel: dimension 2 ('kv_heads', size 6) does not "
        f"divide over mesh axis 'tensor' (4 devices); it is replicated there" for p in "kv"]
    attention = shardings["layers"]["self_attn"]
    assert attention["k_proj"]["kernel"].get_value().spec == P(None, "fsdp", None)
    assert attention["q_proj"]["kernel"].get_value().spec == P(None, "fsdp", "tensor")
