"""The pure train and eval steps: `(state, frozen, batch) -> (state, metrics)`, where `frozen`
holds the parameters the step reads and never updates (`models.Frozen`: a reference, a LoRA base)
and `models.Models` says how the trained and reference models are built from them.

A batch of B examples is split into M micro-batches scanned with `lax.scan`, carrying
(Σ ∇numerator, Σ numerator, Σ denominator); the update uses ∇(Σ num)/Σ den, which is exactly the
gradient of the full-batch loss Σ num / Σ den (denominators — token or pair counts — do not depend
on the parameters), for every loss that scores each example on its own; the few that compare or
average examples across the batch are refused with M > 1 by `methods.check_micro_batches`.
M = 1 differentiates num / den directly: no scan, no zero accumulator and no extra pass over the
gradients to divide them. A non-finite loss or gradient leaves params and optimizer state
untouched and sets `metrics["nonfinite"]`, so the host loop can stop with the last good state
intact. A mixture-of-experts model adds its load-balancing loss times its coefficient to every
method's loss (`models.moe.router_loss`; logged as `aux_loss`, as TRL does).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from align_jax.config import LossConfig, RLConfig
from align_jax.models.moe import collect_router_loss, router_loss
from align_jax.train.mesh import batch_sharding, replicated
from align_jax.train.models import Frozen, Models, dropout_key
from align_jax.train.state import TrainState


def _split_micro(batch, micro_batches: int):
    def split(x):
        if x.shape[0] % micro_batches:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {micro_batches} "
                             "micro-batches")
        return x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
    return jax.tree.map(split, batch)


def _accumulate(loss_fn: Callable, models: Models, params, frozen: Frozen, batch,
                cfg: LossConfig | RLConfig, micro_batches: int, with_grad: bool, dropout_key=None):
    """(gradients or None, loss, metrics) of the batch; micro-batch i draws LoRA dropout masks
    from `dropout_key` folded with i."""
    ref_model = models.reference(frozen)

    def objective(p, micro, index):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        model = models.model(p, frozen, key)
        collect_router_loss(model)
        (num, den, metrics), sown = nnx.capture(
            lambda model, micro: loss_fn(model, ref_model, micro, cfg), nnx.Intermediate)(
                model, micro)
        router = router_loss(sown)
        if router is not None:  # a mixture of experts: + coef · load-balancing loss, per row
            num = num + router[0] * jax.lax.stop_gradient(den)
            metrics = dict(metrics, aux_loss=router[1])
        return num, (den, metrics)

    if micro_batches == 1:  # the mean itself: den is a count, constant in p
        def mean_objective(p, micro):
            num, (den, metrics) = objective(p, micro, 0)
            return num / jax.lax.stop_gradient(den), metrics

        if with_grad:
            (loss, metrics), grads = jax.value_and_grad(mean_objective, has_aux=True)(params, batch)
            return grads, loss, metrics
        loss, metrics = mean_objective(params, batch)
        return None, loss, metrics

    def body(carry, xs):
        if with_grad:
            (n, (d, metrics)), g = jax.value_and_grad(objective, has_aux=True)(params, *xs)
        else:
            g, (n, (d, metrics)) = None, objective(params, *xs)
        return jax.tree.map(jnp.add, carry, (g, n, d)), metrics

    zeros = jax.tree.map(jnp.zeros_like, params) if with_grad else None
    (grads, num, den), metrics = jax.lax.scan(
        body, (zeros, 0.0, 0.0), (_split_micro(batch, micro_batches), jnp.arange(micro_batches)))
    # micro-batches hold equal counts
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    grads = jax.tree.map(lambda g: g / den, grads) if with_grad else None
    return grads, num / den, metrics


def make_train_step(loss_fn: Callable, models: Models, tx: optax.GradientTransformation,
                    cfg: LossConfig | RLConfig, micro_batches: int, schedule: optax.Schedule):
    def step(state: TrainState, frozen: Frozen, batch) -> tuple[TrainState, dict]:
        key = dropout_key(state) if models.dropout else None
        grads, loss, metrics = _accumulate(loss_fn, models, state.params, frozen, batch, cfg,
                                           micro_batches, with_grad=True, dropout_key=key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda *old: old, state.params,
                                         state.opt_state)
        new_state = TrainState(state.step + finite.astype(jnp.int32), params, opt_state, state.rng)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                       nonfinite=(~finite).astype(jnp.float32))
        return new_state, metrics

    return step


def make_eval_step(loss_fn: Callable, models: Models, cfg: LossConfig | RLConfig,
                   micro_batches: int):
    def step(params, frozen: Frozen, batch) -> dict:
        _, loss, metrics = _accumulate(loss_fn, models, params, frozen, batch, cfg, micro_batches,
                                       with_grad=False)
        return dict(metrics, loss=loss)

    return step


def jit_train_step(step, shardings: TrainState, frozen_shardings: Frozen, mesh: Mesh):
    """Jitted with the state's shardings in and out, the frozen parameters' in, batches split over
    the data axes, and the old state's buffers donated to the new one."""
    return jax.jit(step, in_shardings=(shardings, frozen_shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(step, param_shardings, frozen_shardings: Frozen, mesh: Mesh):
    return jax.jit(step, in_shardings=(param_shardings, frozen_shardings, batch_sharding(mesh)),
                   out_shardings=replicated(mesh))

