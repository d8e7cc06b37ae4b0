"""What the tabular mechanism tests share: Adam on a small parameter table with a fresh batch each
step, a measure of the policy recorded along the way, and seeds as lanes of one vmapped program."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def adam_trajectory(grad: Callable, params, measure: Callable, key: jax.Array, *, steps: int,
                    lr: float) -> jax.Array:
    """Adam from `params` for `steps` steps, step k following grad(params, key_k) of its own key;
    returns measure(params) before the first step and after each [steps + 1, ...]."""
    tx = optax.adam(lr)

    def step(carry, step_key):
        params, opt_state = carry
        updates, opt_state = tx.update(grad(params, step_key), opt_state)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), measure(params)

    _, trajectory = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
    return jnp.concatenate([measure(params)[None], trajectory])


def over_seeds(train: Callable[[jax.Array], jax.Array], seeds: int) -> np.ndarray:
    """train(key) for `seeds` keys as the lanes of one jitted, vmapped program [seeds, ...]."""
    return np.asarray(jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(0), seeds)))
