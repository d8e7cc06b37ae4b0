"""Fused attention for the training forward pass (no KV cache: the T tokens of a row attend among
themselves, S = T): Pallas splash attention on TPU, cuDNN flash attention on GPU.

`kernel_attention` computes `decoder.attention` under the mask `Decoder.hidden_states` builds —
causal, key padding, sliding window, and segment ids for packed preference pairs — without forming
[B, Q, T, S] scores. Both kernels take a causal and a sliding-window mask for free, but not the
packed-pair mask "segment s > 0 attends to segment 0 and to itself": splash's segment ids are
equality (a token attends to its own segment only), and cuDNN turns any other mask into a dense
[B, 1, T, S] bias (in q's bf16/fp16) that it reads forward and backward and whose gradient it
writes.

So each row is unpacked into rows that are plain causal attention, the kernel runs on those, and
each token takes its output back from its row:

  [prompt | c₁ | … | c_{n-1} | pad]  (segment ids 0 … n-1)  ->  [prompt | c_s | rest], s = 1 … n-1
  [pad | tokens | pad]               (no segment ids)        ->  [tokens | rest]

An unpacked row is a permutation of its packed row: the members (non-pad tokens of segment 0 and s)
first in slot order, then the rest. Member j attends to columns ≤ j (and > j - window): exactly the
keys of its dense mask row, since the permutation keeps the members' order and puts every
non-member after them. Its column is its decoder position (the number of keys it attends to, minus
one), so the window counts positions as the decoder does; without segment ids the decoder's window
counts slots, which is the same where a row's non-pad tokens are contiguous. The prompt's outputs
come from the first row. q, k and v go in and outputs come back by gathers, whose transposes sum a
prompt key's gradient over the rows that use it, so gradients come from the kernels' own backward.
A pad query's output is finite (it attends to the members and the rest before it), not the uniform
average the einsum path gives a query with no keys; pad outputs are never used.

Cost per head, in query·key pairs of causal triangles: (n-1)·T²/2, i.e. T² for a DPO row (n = 3),
the pairs the einsum path multiplies for that row, and T²/2 without segment ids. Wasted: the
prompt's queries in rows s ≥ 2 and each row's tail. (The pair unpacked into two rows of width W,
where the packed T = W + C, costs W²: packing saves the prompt's projections and MLP, not
attention.) The gathers move (n-1)·B·T·(Q+2K)·H elements.
Alternatives, for the DPO row [P | C₁ | C₂]:
  * splash twice, then merge: pass 1 with segment ids, each segment causally within itself
    (T²/2 pairs); pass 2, segments > 0 against segment-0 keys (T²/2 pairs: its static causal mask
    cannot skip what the prompt length, known only at run time, excludes); then
      out = (e^{l₁} o₁ + e^{l₂} o₂) / (e^{l₁} + e^{l₂})
    with lᵢ each pass's log-sum-exp (a query with no key in a pass gets lᵢ ≈ mask value, so weight
    0 after subtracting max(l₁, l₂)). The same T² pairs, two kernel calls, but the merge needs the
    gradient of lᵢ, which splash does not give (`save_residuals` is forward-only), and the window
    of C₂ against the prompt is shifted by C₁, a per-row amount no static mask expresses.
  * cuDNN with the dense mask: T²/2 pairs, plus the [B, 1, T, S] bias read twice and its gradient
    written per layer — O(B·T²) memory traffic, which the kernel exists to avoid.

Shape letters as in `align_jax.ops`, and U: the unpacked rows of a row (n-1, or 1 without segment
ids); A = B·U: all unpacked rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array
LANES = 128  # splash tiles the sequence in multiples of the TPU's 128 lanes


def kernel_attention(implementation: str, q_BxTxQxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array,
                     *, key_mask_BxS: Array, segment_ids_BxT: Array | None = None,
                     sliding_window: int | None = None, num_segments: int = 3,
                     scale: float | None = None, logit_softcap: float | None = None,
                     mesh: Mesh | None = None, batch_axes: str | tuple[str, ...] = ("data", "fsdp"),
                     head_axis: str | None = "tensor", interpret: bool = False) -> Array:
    """softmax(softcap(c·q·kᵀ) + mask)·v, as `decoder.attention` under the mask of
    `Decoder.hidden_states` without a cache, by a fused kernel: "splash" (TPU; `interpret` runs it
    in Pallas' interpreter on any backend; T is padded up to a multiple of 128 inside) or "cudnn"
    (GPU, bf16 or fp16).

    Args:
      q_BxTxQxH, k_BxKxSxH, v_BxKxSxH: queries, keys and values of the same T = S tokens (Q = K·J).
      key_mask_BxS: True on non-pad tokens.
      segment_ids_BxT: packed rows [segment 0 | segment 1 | … | pads], ids in [0, num_segments);
        a token of segment s > 0 attends to segment 0 and to earlier tokens of s.
      sliding_window: a query attends to keys fewer than this many positions before it.
      scale: c, the factor on q·kᵀ (default 1/√H).
      logit_softcap: scores s become cap·tanh(s / cap) (splash only: cuDNN has no soft-capping).
      mesh: run the kernel on each device's rows and heads (`shard_map`; XLA cannot partition a
        Pallas call): rows split over `batch_axes`, query and kv heads over `head_axis`, as
        `train.mesh` splits them.
    Returns:
      [B, T, Q, H]; the rows of pad queries are finite and meaningless.
    """
    scale = q_BxTxQxH.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "splash":
        causal = functools.partial(_splash_causal, interpret=interpret, scale=scale,
                                   logit_softcap=logit_softcap)
    elif implementation == "cudnn":
        if logit_softcap is not None:
            raise ValueError("cudnn attention cannot soft-cap scores")
        causal = functools.partial(_dot_product_causal, implementation="cudnn", scale=scale)
    else:
        raise ValueError(f"attention implementation {implementation!r}: expected 'splash' or "
                         "'cudnn'")
    attend = functools.partial(_unpacked_attention, causal, sliding_window=sliding_window,
                               num_segments=num_segments)
    args = (q_BxTxQxH, k_BxKxSxH, v_BxKxSxH, key_mask_BxS, segment_ids_BxT)
    if mesh is None:
        return attend(*args)
    q_spec, kv_spec, row_spec = (P(batch_axes, None, head_axis), P(batch_axes, head_axis),
                                 P(batch_axes))
    return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
                         out_specs=q_spec, check_vma=False)(*args)


def _unpacked_attention(causal, q_BxTxQxH, k_BxKxSxH, v_BxKxSxH, key_mask_BxS, segment_ids_BxT, *,
                        sliding_window, num_segments):
    """`causal(q, k, v, window)` on the unpacked rows (module docstring), outputs moved back to
    their packed slots."""
    B, T, Q, H = q_BxTxQxH.shape
    column_BxUxT, row_BxT = _unpacked_columns(key_mask_BxS, segment_ids_BxT, num_segments)
    U = column_BxUxT.shape[1]
    slot_BxUxT = _inverse_permutation(column_BxUxT)
    q_AxTxQxH = jax.vmap(lambda x, i: x[i])(q_BxTxQxH, slot_BxUxT).reshape(B * U, T, Q, H)
    k_AxKxTxH, v_AxKxTxH = (
        jax.vmap(lambda x, i: x[:, i].swapaxes(0, 1))(x, slot_BxUxT).reshape(B * U, -1, T, H)
        for x in (k_BxKxSxH, v_BxKxSxH))
    window = None if sliding_window is None or sliding_window >= T else sliding_window
    out_BxUxTxQxH = causal(q_AxTxQxH, k_AxKxTxH, v_AxKxTxH, window).reshape(B, U, T, Q, H)
    return jax.vmap(lambda o, r, c: o[r, c[r, jnp.arange(T)]])(out_BxUxTxQxH, row_BxT,
                                                               column_BxUxT)


def _unpacked_columns(key_mask_BxS: Array, segment_ids_BxT: Array | None,
                      num_segments: int) -> tuple[Array, Array]:
    """column_BxUxT: each slot's column in each of the U unpacked rows (members first, then the
    rest, each in slot order); row_BxT: the row each slot's output comes from."""
    key_mask_BxS = key_mask_BxS.astype(bool)
    if segment_ids_BxT is None:
        member_BxUxT = key_mask_BxS[:, None]
        row_BxT = jnp.zeros(key_mask_BxS.shape, jnp.int32)
    else:
        segment_Bx1xT = segment_ids_BxT.astype(jnp.int32)[:, None]
        s_Ux1 = jnp.arange(1, num_segments)[:, None]
        member_BxUxT = key_mask_BxS[:, None] & ((segment_Bx1xT == 0) | (segment_Bx1xT == s_Ux1))
        row_BxT = jnp.clip(segment_Bx1xT[:, 0] - 1, 0, num_segments - 2)
    members_BxUx1 = jnp.sum(member_BxUxT, axis=-1, keepdims=True, dtype=jnp.int32)
    rank = functools.partial(jnp.cumsum, axis=-1, dtype=jnp.int32)
    column_BxUxT = jnp.where(member_BxUxT, rank(member_BxUxT) - 1,
                             members_BxUx1 + rank(~member_BxUxT) - 1)
    return column_BxUxT, row_BxT


def _inverse_permutation(perm_BxUxT: Array) -> Array:
    """inv[…, perm[…, t]] = t."""
    T = perm_BxUxT.shape[-1]

    def invert(perm_T):
        return jnp.zeros_like(perm_T).at[perm_T].set(jnp.arange(T, dtype=perm_T.dtype),
                                                     unique_indices=True)

    return jnp.vectorize(invert, signature="(t)->(t)")(perm_BxUxT)


def _dot_product_causal(q_AxTxQxH, k_AxKxTxH, v_AxKxTxH, window, *, implementation, scale):
    """Causal attention by `jax.nn.dot_product_attention`: cuDNN's causal and sliding-window masks
    with implementation="cudnn", no bias; XLA's einsum with "xla"."""
    return jax.nn.dot_product_attention(
        q_AxTxQxH, k_AxKxTxH.swapaxes(1, 2), v_AxKxTxH.swapaxes(1, 2), is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), scale=scale,
        implementation=implementation)


def _splash_causal(q_AxTxQxH, k_AxKxTxH, v_AxKxTxH, window, *, interpret, scale, logit_softcap):
    """Causal attention by splash's MQA kernel, mapped over the rows and the K kv heads, each with
    its J query heads. T is padded up to a multiple of 128 with slots after every real one, which
    no real query attends to; blocks are the largest of 512, 256, 128 that divide it."""
    A, T, Q, H = q_AxTxQxH.shape
    K = k_AxKxTxH.shape[1]
    Tp = -(-T // LANES) * LANES
    block = next(b for b in (512, 256, 128) if Tp % b == 0)
    mask = (splash.CausalMask((Tp, Tp)) if window is None
            else splash.LocalMask((Tp, Tp), window_size=(window - 1, 0), offset=0))
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([mask] * (Q // K)),
        block_sizes=splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block,
                                      block_kv_dkv=block, use_fused_bwd_kernel=True),
        attn_logits_soft_cap=logit_softcap, interpret=interpret)

    def pad(x):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, Tp - T), (0, 0)])

    q_AxKxJxTxH = (q_AxTxQxH * scale).reshape(A, T, K, Q // K, H).transpose(0, 2, 3, 1, 4)
    out_AxKxJxTxH = jax.vmap(jax.vmap(kernel))(pad(q_AxKxJxTxH), pad(k_AxKxTxH), pad(v_AxKxTxH))
    return out_AxKxJxTxH[..., :T, :].transpose(0, 3, 1, 2, 4).reshape(A, T, Q, H)
