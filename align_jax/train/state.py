"""The train state — one pytree — created directly in its sharded placement, and the optimizer.

`init_train_state` never builds the whole model on one device: `nnx.eval_shape` gives the
parameter shapes and logical axis names, `mesh.param_shardings` turns those into placements, and
`jax.jit(init, out_shardings=…)` materialises every shard where it lives. Optimizer-state
shardings follow the parameters' (`optax.tree_map_params`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from align_jax.config import ConfigError, TrainConfig
from align_jax.train.mesh import param_shardings, replicated


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates applied so far
    params: nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpointable)


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine or linear decay to 0 (or
    constant)."""
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    decays = {"cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps),
              "linear": optax.linear_schedule(cfg.lr, 0.0, decay_steps),
              "constant": optax.constant_schedule(cfg.lr)}
    if cfg.schedule not in decays:
        raise ValueError(f"train.schedule must be one of {sorted(decays)}, got {cfg.schedule!r}")
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decays[cfg.schedule]], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the schedule, decoupled weight decay on matrices only (not norms or biases), its
    first moment in `mu_dtype`, and gradient clipping by global norm."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    if cfg.mu_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"train.mu_dtype={cfg.mu_dtype!r}: expected float32 or bfloat16")
    adamw = optax.adamw(learning_rate(cfg), weight_decay=cfg.weight_decay, mask=decay_mask,
                        mu_dtype=jnp.dtype(cfg.mu_dtype))
    return (optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm
            else adamw)


def state_shardings(abstract_params: nnx.State, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    params = param_shardings(abstract_params, mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params),
                                params, transform_non_params=lambda _: replicated(mesh))
    return TrainState(replicated(mesh), params, opt, replicated(mesh))


def fresh_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0 of `params`: `tx`'s initial optimizer state and the rng of `seed`."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      jax.random.key_data(jax.random.key(seed)))


def init_train_state(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                     mesh: Mesh, seed: int, pretrained: nnx.State | None = None,
                     trainable: nnx.filterlib.Filter = ...
                     ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, sharded state, its shardings). `pretrained` params (e.g. from `load_pretrained`)
    replace the freshly initialised ones they name; others (a new scalar head) keep their init.

    `trainable` filters the parameters the state holds (default: all of them); with another filter
    the graphdef splits the model into (trainable, the rest), which the caller holds apart."""
    filters = (...,) if trainable is ... else (trainable, ...)
    graphdef, abstract, *_ = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(seed))),
                                       *filters)
    shardings = state_shardings(abstract, tx, mesh)

    def init(pretrained):
        _, params, *_ = nnx.split(make_model(nnx.Rngs(seed)), *filters)
        if pretrained is not None:
            params = nnx.merge_state(params, pretrained)
        return fresh_state(params, tx, seed)

    if pretrained is not None:
        pretrained = jax.device_put(pretrained, param_shardings(pretrained, mesh))
    state = jax.jit(init, out_shardings=shardings)(pretrained)
    return graphdef, state, shardings
