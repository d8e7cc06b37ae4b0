"""A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE) and its load-balancing loss.

    p = softmax(x·W_router)  (float32, over all E experts)
    (w, e) = top-k of p       (w renormalised to sum to 1 when `norm_topk_prob`)
    y = Σ_j w_j · down_{e_j}(act(gate_{e_j}(x)) · up_{e_j}(x))

The experts' weights are stacked, gate and up [E, D, I], down [E, I, D], with an "expert" logical
axis. Each token runs through its k experts only: the R·k (token, expert) assignments are sorted by
expert and the three products are grouped matrix products over contiguous runs of rows
(`jax.lax.ragged_dot`), so no token is dropped and no capacity is set. On a mesh
(`expert_parallel`), each device holds E / n experts of the `expert` axis and I / t of their width
on `tensor`: it gathers the rows of its expert-axis peers, runs the assignments of its own experts,
and the partial outputs, in float32, are summed back to their rows (reduce-scatter over `expert`,
sum over `tensor`) before the cast to the compute dtype. `dense_experts` runs every expert on
every token and weighs the outputs: the dense-equivalent reference the tests compare against.

Shape letters as in `align_jax.ops`, and R: the rows (tokens) of a batch, E: experts, k the experts
per token, I: an expert's width, A = R·k assignments.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array


class Routing(NamedTuple):
    """Which experts each row goes to, with what weight, and the router's probabilities."""

    experts_RxK: Array  # int32 expert ids
    weights_RxK: Array  # in the compute dtype
    probs_RxE: Array  # float32 softmax over every expert


def route(logits_RxE: Array, k: int, normalize: bool, dtype) -> Routing:
    """Top-k of softmax(logits) in float32; the weights renormalised when `normalize`."""
    probs = jax.nn.softmax(logits_RxE.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights.astype(dtype), probs)


def router_counts(routing: Routing, mask_R: Array) -> tuple[Array, Array]:
    """(assignments per expert, Σ of each expert's probability) over the rows in `mask_R`: the
    sums `balance_loss` pools over layers."""
    chosen = jnp.sum(jax.nn.one_hot(routing.experts_RxK, routing.probs_RxE.shape[-1],
                                    dtype=jnp.float32), axis=1)  # [R, E]
    mask = mask_R.astype(jnp.float32)[:, None]
    return jnp.sum(chosen * mask, axis=0), jnp.sum(routing.probs_RxE * mask, axis=0)


def balance_loss(counts_E: Array, probs_E: Array, rows: Array) -> Array:
    """E · Σ_e f_e · P_e, with f_e = (assignments to e) / rows and P_e = (Σ p_e) / rows, the counts
    and probabilities summed over every MoE layer and non-pad token and `rows` = layers · tokens
    (Switch Transformer's loss as transformers' `load_balancing_loss_func` pools it; k when the
    router is perfectly balanced)."""
    E = counts_E.shape[-1]
    return E * jnp.sum((counts_E / rows) * (probs_E / rows))


def sparse_experts(x_RxD: Array, experts_RxK: Array, weights_RxK: Array, gate_ExDxI: Array,
                   up_ExDxI: Array, down_ExIxD: Array, act: Callable, first: Array | int = 0
                   ) -> Array:
    """Σ_j w_j · expert_{e_j}(x) for the assignments to experts first … first + E - 1 (the rest
    contribute 0), summed in float32: assignments sorted by expert, then three grouped products."""
    R, K = experts_RxK.shape
    E = gate_ExDxI.shape[0]
    local_A = experts_RxK.reshape(R * K) - first
    mine_A = (local_A >= 0) & (local_A < E)
    order_A = jnp.argsort(jnp.where(mine_A, local_A, E), stable=True)  # others sort last
    rows_A = order_A // K
    sizes_E = jnp.bincount(jnp.where(mine_A, local_A, E), length=E + 1)[:E].astype(jnp.int32)
    x_AxD = x_RxD[rows_A]
    h_AxI = act(jax.lax.ragged_dot(x_AxD, gate_ExDxI, sizes_E)) * jax.lax.ragged_dot(
        x_AxD, up_ExDxI, sizes_E)
    out_AxD = jax.lax.ragged_dot(h_AxI, down_ExIxD, sizes_E, preferred_element_type=jnp.float32)
    w_A = jnp.where(mine_A, weights_RxK.reshape(R * K), 0)[order_A].astype(jnp.float32)
    out_AxD = jnp.where(mine_A[order_A][:, None], out_AxD * w_A[:, None], 0)
    return jnp.zeros(x_RxD.shape, jnp.float32).at[rows_A].add(out_AxD)


def dense_experts(x_RxD: Array, experts_RxK: Array, weights_RxK: Array, gate_ExDxI: Array,
                  up_ExDxI: Array, down_ExIxD: Array, act: Callable) -> Array:
    """The same sum with every expert run on every row, the unchosen ones weighted 0."""
    combine_RxE = jnp.sum(jax.nn.one_hot(experts_RxK, gate_ExDxI.shape[0], dtype=jnp.float32)
                          * weights_RxK[..., None].astype(jnp.float32), axis=1)
    h_RxExI = act(jnp.einsum("rd,edi->rei", x_RxD, gate_ExDxI)) * jnp.einsum(
        "rd,edi->rei", x_RxD, up_ExDxI)
    return jnp.einsum("rei,eid,re->rd", h_RxExI, down_ExIxD, combine_RxE,
                      preferred_element_type=jnp.float32)


def expert_parallel(mesh: Mesh, batch_axes: tuple[str, ...], x_RxD, experts_RxK, weights_RxK,
                    gate_ExDxI, up_ExDxI, down_ExIxD, act: Callable) -> Array:
    """`sparse_experts` with experts split over the mesh's `expert` axis and their width over
    `tensor` (module docstring). Rows split over `batch_axes` when they divide evenly, else every
    device takes every row."""
    split = x_RxD.shape[0] % math.prod(mesh.shape[axis] for axis in batch_axes) == 0
    rows = P(batch_axes if split else None, None)

    def local(x, experts, weights, gate, up, down):
        first = jax.lax.axis_index("expert") * gate.shape[0]
        if split:  # the rows of this device's expert-axis peers too
            x, experts, weights = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                                   for a in (x, experts, weights))
        y = sparse_experts(x, experts, weights, gate, up, down, act, first)
        y = jax.lax.psum(y, "tensor")
        if split:
            return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, "expert")

    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(rows, rows, rows, P("expert", None, "tensor"), P("expert", None, "tensor"),
                  P("expert", "tensor", None)),
        out_specs=rows, check_vma=False)(x_RxD, experts_RxK, weights_RxK, gate_ExDxI, up_ExDxI,
                                         down_ExIxD)


class MoE(nnx.Module):
    """The sparse MoE MLP of a block: a router D → E (no bias) and E gated experts of width I."""

    def __init__(self, config, act: Callable, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, E, width = config.hidden_size, config.num_experts, config.moe_intermediate_size
        init = nnx.initializers.normal(0.02)
        self.router = nnx.Param(init(rngs.params(), (D, E), param_dtype),
                                out_sharding=("embed", None))
        self.gate_proj = nnx.Param(init(rngs.params(), (E, D, width), param_dtype),
                                   out_sharding=("expert", "embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (E, D, width), param_dtype),
                                 out_sharding=("expert", "embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (E, width, D), param_dtype),
                                   out_sharding=("expert", "mlp", "embed"))
        self.act, self.dtype = act, dtype
        self.k, self.normalize = config.num_experts_per_tok, config.norm_topk_prob

    def __call__(self, x_RxD: Array, mesh: Mesh | None = None,
                 batch_axes: tuple[str, ...] = ()) -> tuple[Array, Routing]:
        """(the MLP's output [R, D], the routing); experts split over `mesh` when one is given."""
        x = x_RxD.astype(self.dtype)
        routing = route(x @ self.router[...].astype(self.dtype), self.k, self.normalize,
                        self.dtype)
        weights = [w[...].astype(self.dtype) for w in (self.gate_proj, self.up_proj,
                                                       self.down_proj)]
        args = (x, routing.experts_RxK, routing.weights_RxK, *weights, self.act)
        if mesh is None:
            return sparse_experts(*args).astype(self.dtype), routing
        return expert_parallel(mesh, batch_axes, *args).astype(self.dtype), routing


def collect_router_loss(model: nnx.Module) -> None:
    """Forward passes of every decoder in `model` sow their load-balancing loss (a training model;
    a reference or a sampler's model does not), for `nnx.capture` to collect."""
    for _, module in nnx.iter_graph(model):
        if hasattr(module, "collect_router_loss"):
            module.collect_router_loss = True


def router_loss(sown: nnx.State) -> tuple[Array, Array] | None:
    """(Σ over decoders of coefficient × mean load-balancing loss, the mean loss) from the
    intermediates `nnx.capture` collected (a decoder run several times counts the mean of its
    passes), or None when nothing was sown (a dense model)."""
    by_decoder: dict[tuple, dict[str, list]] = {}
    for path, value in nnx.to_flat_state(sown):
        if path[-1] in ("router_loss", "router_loss_term"):
            by_decoder.setdefault(path[:-1], {})[path[-1]] = list(value.get_value())
    if not by_decoder:
        return None
    term = sum(jnp.mean(jnp.stack(d["router_loss_term"])) for d in by_decoder.values())
    loss = jnp.mean(jnp.stack([jnp.mean(jnp.stack(d["router_loss"]))
                               for d in by_decoder.values()]))
    return term, loss
