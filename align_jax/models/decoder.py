"""A Flax NNX decoder-only transformer that reproduces Hugging Face's models of every registered
family (`models.registry`: Llama, Mistral, Qwen2/3, Gemma 2/3, Mixtral, Qwen3-MoE).

Blocks x + Attn(norm(x)), then x + MLP(norm(x)) (with Gemma's extra norms on both outputs), from
the parts in `models.layers`: rotary position embeddings in transformers' layout, grouped-query
attention, the gated MLP or a sparse mixture of experts (`models.moe`). What sets a family apart
is a `DecoderConfig` field. The KV cache is a pytree passed in and returned, so decoding stays a
pure function.

The L blocks are one module whose parameters are stacked along a leading "layers" axis, and the
forward pass is one `lax.scan` over them: a 32-layer model compiles one block, not 32. Layers
that differ (windowed and global attention) select their mask and RoPE by their index. With
`scan_layers=False` they are L modules run one after another (a program L blocks long, which XLA
optimises across layers: faster on a CPU, slower to compile). Parameters carry logical axis names
("layers", "vocab", "embed", "heads", "kv_heads", "mlp", "expert") that the trainer maps to mesh
axes.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from align_jax.models.config import DecoderConfig
from align_jax.models.kernels import kernel_attention
from align_jax.models.layers import (
    ACTIVATION_FNS,
    MLP,
    Attention,
    attention,
    dense,
    rms_norm,
    rope_angles,
    rope_inv_freq,
    softcap,
)
from align_jax.models.moe import MoE, balance_loss, router_counts

Array = jax.Array


ATTENTION = ("xla", "splash", "cudnn")  # model.attention: see `Decoder` and `kernels`
REMAT_POLICIES = {  # model.remat: what each block keeps for the backward pass
    "none": None,  # every activation (no recomputation)
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "dots": jax.checkpoint_policies.checkpoint_dots,  # the outputs of matrix products
    # the outputs of matrix products without batch dimensions (the projections, not attention)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # only the block's input, moved to host memory until the backward pass needs it
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("block_input",),
        offload_src="device", offload_dst="pinned_host"),
}


def remat_policy(remat: str | bool) -> str:
    """The key of `REMAT_POLICIES` that `remat` names; true and false mean "full" and "none"."""
    name = {"true": "full", "false": "none"}.get(str(remat).lower(), remat)
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected one of {list(REMAT_POLICIES)} (true and false "
                         f"mean full and none)")
    return name


class KVCache(NamedTuple):
    """Keys and values of every layer for S slots, which slots hold real tokens, and the next
    slot."""

    keys_LxBxKxSxH: Array
    values_LxBxKxSxH: Array
    key_mask_BxS: Array  # bool, True where a slot holds a non-pad token
    index: Array  # int32 scalar: the slot the next token is written to


def init_cache(config: DecoderConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `max_length` slots."""
    zeros = jnp.zeros((config.num_layers, batch, config.num_kv_heads, max_length, config.head_dim),
                      dtype)
    return KVCache(zeros, zeros, jnp.zeros((batch, max_length), bool), jnp.zeros((), jnp.int32))


class LayerContext(NamedTuple):
    """What a block needs beyond its input and parameters."""

    cos_sin: tuple[Array, Array]  # RoPE of this layer's kind
    attend: Callable  # attend(q, k, v): attention under this layer's mask
    token_mask_R: Array  # bool, the non-pad rows (the router's statistics count these)
    mesh: jax.sharding.Mesh | None  # where experts run in parallel (`moe.expert_parallel`)
    batch_axes: tuple[str, ...]  # the mesh axes that split the rows


class Block(nnx.Module):
    """x + Attn(norm(x)), then x + MLP(norm(x)); with `sandwich_norm` (Gemma) the attention's and
    the MLP's outputs are normalised too before they are added. The MLP is a sparse mixture of
    experts when the config has experts (`models.moe`)."""

    def __init__(self, config: DecoderConfig, *, rngs, dtype, param_dtype, lora=None, quant=None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, lora=lora, quant=quant)
        self.attn_norm = rms_norm(config, config.hidden_size, param_dtype)
        self.self_attn = Attention(config, **kw)
        self.mlp_norm = rms_norm(config, config.hidden_size, param_dtype)
        if config.num_experts:
            self.mlp = MoE(config, ACTIVATION_FNS[config.hidden_act], rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)
        else:
            self.mlp = MLP(config, **kw)
        if config.sandwich_norm:
            self.attn_out_norm = rms_norm(config, config.hidden_size, param_dtype)
            self.mlp_out_norm = rms_norm(config, config.hidden_size, param_dtype)
        self.sandwich = config.sandwich_norm

    def __call__(self, x, ctx: LayerContext, kv_cache, dropout_key=None):
        """(output, kv_cache, router counts): the counts `moe.router_counts` of an MoE block,
        None for a dense one."""
        x = checkpoint_name(x, "block_input")
        attn, kv_cache = self.self_attn(self.attn_norm(x), ctx.cos_sin, ctx.attend, kv_cache,
                                        dropout_key)
        x = x + (self.attn_out_norm(attn) if self.sandwich else attn)
        counts = None
        if isinstance(self.mlp, MoE):
            mlp, routing = self.mlp(self.mlp_norm(x), ctx.mesh, ctx.batch_axes)
            counts = router_counts(routing, ctx.token_mask_R)
        else:
            mlp = self.mlp(self.mlp_norm(x), dropout_key)
        return x + (self.mlp_out_norm(mlp) if self.sandwich else mlp), kv_cache, counts


def stacked_blocks(config: DecoderConfig, *, rngs, **kw) -> Block:
    """L blocks as one Block whose parameters have a leading "layers" axis of size L (`kw`: the
    Block's dtypes, LoRA and quantization)."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(config, rngs=rngs, **kw)

    return make(rngs)


def separate_blocks(config: DecoderConfig, *, rngs, **kw) -> nnx.List:
    """L Blocks holding the rows of `stacked_blocks`' parameters: a model initialises to the
    same weights whichever layout it has."""
    stacked = nnx.to_pure_dict(nnx.state(stacked_blocks(config, rngs=rngs, **kw)))
    blocks = nnx.List()
    for layer in range(config.num_layers):
        block = nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0), **kw))
        state = nnx.state(block)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x[layer], stacked))
        nnx.update(block, state)
        blocks.append(block)
    return blocks


def pin_rows(x_RxD: Array, sharding: jax.sharding.NamedSharding | None) -> Array:
    """x with its rows split over the mesh axes named in `sharding.spec[0]`, when they divide
    evenly (a sampler's few prompts may not): keeps XLA's sharding propagation from choosing a
    layout that regathers activations between blocks."""
    if sharding is None:
        return x_RxD
    shards = math.prod(sharding.mesh.shape[axis] for axis in sharding.spec[0])
    return x_RxD if x_RxD.shape[0] % shards else jax.lax.with_sharding_constraint(x_RxD, sharding)


def run_blocks(blocks: Block | nnx.List, x_RxD, context, cache_kv, index, *,
               remat: str, activation_sharding=None, dropout_key=None):
    """x ← block_l(x) for l = 1…L: one `lax.scan` over stacked parameters (`blocks` a Block), or
    a Python loop over L Blocks (`blocks` an `nnx.List`). Returns (x, cache_kv, the MoE blocks'
    router counts summed over layers, or None).

    `context(l)` gives layer l's `LayerContext` (its RoPE and its attention, global or
    windowed). Each layer runs as a pure function of (graphdef, parameters), so
    the body never writes back to the module it came from (which may belong to another trace, e.g.
    a frozen reference merged outside `value_and_grad`). `remat` names a policy of
    `REMAT_POLICIES` for `jax.checkpoint` around it. With a cache, the stacked keys and values ride
    in the carry and each layer writes its new tokens in place. Each block's input is pinned to
    `activation_sharding` (`pin_rows`). Layer l draws its LoRA dropout masks from `dropout_key`
    folded with l.
    """
    def layer_fn(graphdef):
        def body(carry, xs):
            (x, kv, total), (params, layer) = carry, xs
            kv = None if kv is None else (*kv, layer, index)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer)
            x = pin_rows(x, activation_sharding)
            x, kv, counts = nnx.merge(graphdef, params)(x, context(layer), kv, key)
            total = counts if total is None else jax.tree.map(jnp.add, total, counts)
            return (x, kv, total), None
        if remat == "none":
            return body
        return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

    carry = (x_RxD, cache_kv, None)
    if isinstance(blocks, Block):
        graphdef, state = nnx.split(blocks)
        if isinstance(blocks.mlp, MoE):  # the scan's carry holds the counts from the start
            E = blocks.mlp.router.get_value().shape[-1]
            carry = (x_RxD, cache_kv, (jnp.zeros((E,), jnp.float32),) * 2)
        num_layers = jax.tree.leaves(state)[0].shape[0]
        carry, _ = jax.lax.scan(layer_fn(graphdef), carry, (state, jnp.arange(num_layers)))
    else:
        for layer, block in enumerate(blocks):
            graphdef, params = nnx.split(block)
            carry, _ = layer_fn(graphdef)(carry, (params, layer))
    return carry


class Decoder(nnx.Module):
    """The causal LM. `with_scalar_head` adds a linear D→1 head for reward and value models.

    `remat` names what each block keeps for the backward pass (`REMAT_POLICIES`; the rest is
    recomputed; True and False mean "full" and "none"); `activation_sharding` (a NamedSharding
    of the [B·T, D] activations, `train.mesh.activation_sharding`) pins each block's input to
    it; `attention` is "xla" (einsum), "splash" (Pallas, TPU; the Pallas interpreter elsewhere)
    or "cudnn" (GPU) for the forward passes without a KV cache; `logits_chunk` tells the
    trainer's log-prob functions (`ops.head_token_stats`) to run the LM head over that many
    positions at a time, forward and backward, instead of forming [B, T, V] logits;
    `scan_layers` stacks the blocks' parameters and scans over them (`run_blocks`).

    `lora` (a `config.LoRAConfig`) adds adapters to the projections it targets, and `quant`
    ("int8" | "nf4") stores every projection's kernel quantized (`models.lora.Linear`);
    `lora_dropout_key`, set on a model for a training forward pass (`lora.set_dropout_key`), draws
    the adapters' dropout masks. With `collect_router_loss` set (`moe.collect_router_loss`), each
    forward pass of a mixture-of-experts model sows its load-balancing loss
    (`moe.balance_loss`, over its non-pad tokens) as an `nnx.Intermediate` "router_loss", and
    that times `config.router_aux_loss_coef` as "router_loss_term", for `nnx.capture`.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: str | bool = "none",
                 logits_chunk: int | None = None, with_scalar_head: bool = False,
                 activation_sharding: jax.sharding.NamedSharding | None = None,
                 attention: str = "xla", scan_layers: bool = True, lora=None,
                 quant: str | None = None):
        self.config, self.dtype, self.logits_chunk = config, dtype, logits_chunk
        self.scan_layers = scan_layers
        self.lora_dropout_key = None
        self.collect_router_loss = False
        self.remat = remat_policy(remat)
        self.activation_sharding = activation_sharding
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}: expected one of {ATTENTION}")
        if attention == "cudnn" and config.attn_logit_softcap is not None:
            raise ValueError(f"attention='cudnn' cannot soft-cap attention scores "
                             f"(model_type={config.model_type!r} caps them at "
                             f"{config.attn_logit_softcap}); use xla")
        self.attention = attention
        # Logical axis names stay metadata; the trainer places parameters on its mesh with
        # jit(init, out_shardings=...), so no variable is sharded eagerly at construction.
        with nnx.use_eager_sharding(False):
            self._build(config, rngs, dtype, param_dtype, with_scalar_head, lora, quant)

    def _build(self, config, rngs, dtype, param_dtype, with_scalar_head, lora, quant):
        embed_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size,
                                      embedding_init=embed_init,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        blocks = stacked_blocks if self.scan_layers else separate_blocks
        self.layers = blocks(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, lora=lora,
                             quant=quant)
        self.norm = rms_norm(config, config.hidden_size, param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = dense(rngs, config.hidden_size, config.vocab_size, ("embed", "vocab"),
                                  dtype=dtype, param_dtype=param_dtype)
        if with_scalar_head:
            self.score_head = dense(rngs, config.hidden_size, 1, ("embed", None),
                                     dtype=dtype, param_dtype=param_dtype)

    def hidden_states(self, input_ids_BxT: Array, attention_mask_BxT: Array | None = None,
                      cache: KVCache | None = None, segment_ids_BxT: Array | None = None
                      ) -> tuple[Array, KVCache | None]:
        """Final-norm hidden states [B, T, D], and the updated cache when one is given.

        Position ids count the non-pad tokens before each one (so left padding is handled), as
        transformers' `generate` does. Without a cache, T tokens attend causally among
        themselves; with one, they are written at `cache.index` and attend to every filled slot.

        `segment_ids_BxT` packs several sequences that share a prefix into one row (DPO's prompt,
        chosen and rejected): a token of segment s > 0 attends to segment 0 and to earlier tokens
        of s only, and its position is the number of tokens it attends to, minus one — so each
        segment sees exactly what it would see as prefix + segment in a row of its own.
        """
        B, T = input_ids_BxT.shape
        new_mask = (jnp.ones((B, T), bool) if attention_mask_BxT is None
                    else attention_mask_BxT.astype(bool))
        if cache is None:
            key_mask, index, offset = new_mask, jnp.zeros((), jnp.int32), jnp.zeros((B,), jnp.int32)
        else:
            if segment_ids_BxT is not None:
                raise ValueError("segment_ids_BxT packs training rows; it cannot be combined with "
                                 "a KV cache")
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask_BxS, new_mask, (0, cache.index))
            index, offset = cache.index, jnp.sum(cache.key_mask_BxS, axis=1, dtype=jnp.int32)
        query_slots = index + jnp.arange(T)
        key_slots = jnp.arange(key_mask.shape[1])
        allowed = key_slots[None, :] <= query_slots[:, None]
        mask_BxTxS = allowed[None] & key_mask[:, None, :]
        if segment_ids_BxT is None:
            positions = jnp.maximum(offset[:, None]
                                    + jnp.cumsum(new_mask, axis=1, dtype=jnp.int32) - 1, 0)
            # a cache may hold masked slots between a row's tokens (between the turns of a
            # conversation): distances count tokens, not slots
            key_positions = jnp.cumsum(key_mask, axis=1, dtype=jnp.int32) - 1
            distance = positions[:, :, None] - key_positions[:, None, :]
        else:
            seg_q, seg_k = segment_ids_BxT[:, :, None], segment_ids_BxT[:, None, :]
            mask_BxTxS &= (seg_k == 0) | (seg_k == seg_q)
            positions = jnp.maximum(jnp.sum(mask_BxTxS, axis=2, dtype=jnp.int32) - 1, 0)
            distance = positions[:, :, None] - positions[:, None, :]
        window = self.config.sliding_window
        window_BxTxS = None if window is None else mask_BxTxS & (distance < window)

        # Tokens go through the blocks as the rows of one [B·T, D] matrix: XLA's CPU backward of a
        # dense layer on [B, T, D] inputs transposes its activations (≈ 30% slower per layer).
        x = self.embed_tokens(input_ids_BxT.reshape(B * T))
        if self.config.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)
        context = self._layer_context(mask_BxTxS, window_BxTxS, positions, new_mask,
                                      segment_ids_BxT, cache, x.dtype)
        kv = None if cache is None else (cache.keys_LxBxKxSxH, cache.values_LxBxKxSxH)
        x, kv, counts = run_blocks(self.layers, x, context, kv, index, remat=self.remat,
                                   activation_sharding=self.activation_sharding,
                                   dropout_key=self.lora_dropout_key)
        if counts is not None and self.collect_router_loss:
            rows = self.config.num_layers * jnp.sum(new_mask, dtype=jnp.float32)
            loss = balance_loss(*counts, rows)
            self.sow(nnx.Intermediate, "router_loss", loss)
            self.sow(nnx.Intermediate, "router_loss_term", self.config.router_aux_loss_coef * loss)
        x = self.norm(x).reshape(B, T, -1)
        if cache is None:
            return x, None
        return x, KVCache(*kv, key_mask, index + T)

    def _layer_context(self, mask_BxTxS, window_BxTxS, positions_BxT, key_mask_BxS,
                       segment_ids_BxT, cache, dtype):
        """context(l) -> the `LayerContext` of layer l: RoPE and attend(q, k, v), global or windowed
        (`DecoderConfig.windowed_layers`), as a select on the layer index when the layers differ.
        attend is the einsum `attention` under the dense mask, or a fused kernel
        (`kernels.kernel_attention`) for a forward pass without a cache."""
        c = self.config
        rope = rope_angles(positions_BxT, rope_inv_freq(c), dtype)
        local_rope = (rope if c.rope_local_theta is None
                      else rope_angles(positions_BxT, rope_inv_freq(c, local=True), dtype))
        scores = dict(scale=c.attention_scale, logit_softcap=c.attn_logit_softcap)
        mesh = None if self.activation_sharding is None else self.activation_sharding.mesh
        batch_axes = () if mesh is None else tuple(self.activation_sharding.spec[0])
        token_mask_R = key_mask_BxS.reshape(-1)

        def layer(cos_sin, attend):
            return LayerContext(cos_sin, attend, token_mask_R, mesh, batch_axes)

        einsum = self.attention == "xla" or cache is not None  # else a fused kernel
        if einsum:
            def attend(mask):
                return functools.partial(attention, mask_BxTxS=mask, **scores)
            windowed_attend, global_attend = attend(window_BxTxS), attend(mask_BxTxS)
        else:
            platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform

            def attend(window):
                return functools.partial(
                    kernel_attention, self.attention, key_mask_BxS=key_mask_BxS,
                    segment_ids_BxT=segment_ids_BxT, sliding_window=window, mesh=mesh,
                    batch_axes=batch_axes or ("data", "fsdp"),
                    interpret=self.attention == "splash" and platform != "tpu", **scores)
            windowed_attend, global_attend = attend(c.sliding_window), attend(None)
        windowed = c.windowed_layers()
        if len(set(windowed)) == 1:
            fixed = layer(local_rope, windowed_attend) if windowed[0] else layer(rope,
                                                                                  global_attend)
            return lambda index: fixed
        flags_L = jnp.asarray(windowed)

        def context(index):
            w = flags_L[index]
            cos_sin = jax.tree.map(functools.partial(jnp.where, w), local_rope, rope)
            if einsum:
                return layer(cos_sin, attend(jnp.where(w, window_BxTxS, mask_BxTxS)))
            return layer(cos_sin, lambda q, k, v: jax.lax.cond(w, windowed_attend, global_attend,
                                                               q, k, v))
        return context

    def logits(self, hidden_BxTxD: Array) -> Array:
        """The LM head (soft-capped where the config says: Gemma 2)."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden_BxTxD)
        else:
            logits = self.lm_head(hidden_BxTxD)
        return softcap(logits, self.config.final_logit_softcap)

    def __call__(self, input_ids_BxT, attention_mask_BxT=None, cache=None, segment_ids_BxT=None):
        """Logits [B, T, V] (in the compute dtype; `ops.token_logps` normalises in float32)."""
        hidden, cache = self.hidden_states(input_ids_BxT, attention_mask_BxT, cache,
                                           segment_ids_BxT)
        return (self.logits(hidden), cache) if cache is not None else self.logits(hidden)

    def token_values(self, input_ids_BxT, attention_mask_BxT=None) -> Array:
        """The scalar head on every position's hidden state [B, T] (PPO's critic)."""
        hidden, _ = self.hidden_states(input_ids_BxT, attention_mask_BxT)
        return self.score_head(hidden)[..., 0].astype(jnp.float32)

    def score(self, input_ids_BxT, attention_mask_BxT) -> Array:
        """The scalar head at each row's last non-pad token [B] (a reward model's score)."""
        values_BxT = self.token_values(input_ids_BxT, attention_mask_BxT)
        slots = jnp.arange(input_ids_BxT.shape[1])
        last = jnp.max(jnp.where(attention_mask_BxT.astype(bool), slots, -1), axis=1)
        return jnp.take_along_axis(values_BxT, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
