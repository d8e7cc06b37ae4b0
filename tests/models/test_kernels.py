"""The fused attention kernels equal `decoder.attention` under the mask `Decoder.hidden_states`
builds — outputs on non-pad queries and gradients in q, k, v — for padding, GQA, sliding windows
and packed preference pairs: splash in Pallas' interpreter, and the cuDNN path's plumbing with
XLA's implementation of `jax.nn.dot_product_attention`; splash compiles for a TPU slice. On a GPU,
cuDNN itself in bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax.models import Decoder, DecoderConfig, decoder, kernels
from align_jax.topology import target
from align_jax.train.mesh import make_mesh

Q, K, H = 4, 2, 64


def decoder_mask(key_mask_BxT, segment_ids_BxT, sliding_window):
    """The mask_BxTxS that `Decoder.hidden_states` hands to `decoder.attention`."""
    config = DecoderConfig(vocab_size=2, hidden_size=8, intermediate_size=8, num_layers=1,
                           num_heads=1, num_kv_heads=1, head_dim=8, sliding_window=sliding_window)
    model = Decoder(config, rngs=nnx.Rngs(0))
    attention = decoder.attention

    def mask_of(key_mask_BxT, segment_ids_BxT):
        masks = []

        def capture(q, k, v, mask_BxTxS, **scores):
            masks.append(mask_BxTxS)
            return attention(q, k, v, mask_BxTxS, **scores)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(decoder, "attention", capture)
            model.hidden_states(jnp.zeros(key_mask_BxT.shape, jnp.int32), key_mask_BxT,
                                segment_ids_BxT=segment_ids_BxT)
        return masks[0]

    return jax.jit(mask_of)(key_mask_BxT, segment_ids_BxT)


def padded(T, spans):
    """Rows that are non-pad on slots [start, end) for each row's (start, end)."""
    slots = np.arange(T)
    return jnp.asarray(np.stack([(slots >= a) & (slots < b) for a, b in spans]))


def packed(T, lengths):
    """Rows [prompt | chosen | rejected | pad] of the given (P, C₁, C₂) lengths, as
    `batching._packed_pairs` lays them out: pads carry the rejected segment's id."""
    segment_ids = np.full((len(lengths), T), 2, np.int32)
    for row, (p, c1, _) in zip(segment_ids, lengths):
        row[:p], row[p:p + c1] = 0, 1
    return padded(T, [(0, sum(n)) for n in lengths]), jnp.asarray(segment_ids)


CASES = {  # name -> (key_mask_BxT, segment_ids_BxT, sliding_window)
    "right_pad": (padded(128, [(0, 128), (0, 77), (0, 5)]), None, None),
    "left_and_right_pad_T96": (padded(96, [(20, 96), (10, 70), (0, 96)]), None, None),
    "window": (padded(128, [(0, 128), (30, 128), (0, 90)]), None, 24),
    "packed": (*packed(128, [(30, 40, 20), (0, 50, 60), (50, 10, 68)]), None),
    "packed_window": (*packed(128, [(30, 40, 20), (0, 50, 60), (50, 10, 68)]), 24),
}
IMPLEMENTATIONS = {
    "splash": functools.partial(kernels.kernel_attention, "splash", interpret=True),
    "cudnn_plumbing_on_xla": functools.partial(
        kernels._unpacked_attention,
        functools.partial(kernels._dot_product_causal, implementation="xla", scale=H**-0.5),
        num_segments=3),
}


def output_and_grads(attend, q, k, v, cotangent):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


@functools.cache
def reference(case, scale=None, logit_softcap=None):
    """Random q, k, v, a cotangent that is zero on pad queries (their outputs are never used), and
    `decoder.attention`'s output and gradients under the decoder's mask (and with the given scale
    and soft-cap on the scores)."""
    key_mask_BxT, segment_ids_BxT, window = CASES[case]
    B, T = key_mask_BxT.shape
    rng = np.random.default_rng(0)
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                          for shape in ((B, T, Q, H), (B, K, T, H), (B, K, T, H), (B, T, Q, H)))
    inputs = (q, k, v, cotangent * key_mask_BxT[:, :, None, None])
    mask_BxTxS = decoder_mask(key_mask_BxT, segment_ids_BxT, window)
    attend = functools.partial(decoder.attention, mask_BxTxS=mask_BxTxS, scale=scale,
                               logit_softcap=logit_softcap)
    return inputs, jax.jit(output_and_grads, static_argnums=0)(attend, *inputs)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_decoder_attention(case, implementation):
    check_kernel(case, IMPLEMENTATIONS[implementation])


def test_splash_scales_and_soft_caps_scores_as_the_decoder():
    """Gemma's scores: q·kᵀ × query_pre_attn_scalar^-1/2, then c·tanh(s / c)."""
    check_kernel("packed_window", IMPLEMENTATIONS["splash"], scale=0.3, logit_softcap=2.0)


def check_kernel(case, implementation, **scores):
    key_mask_BxT, segment_ids_BxT, window = CASES[case]
    inputs, (ref, ref_grads) = reference(case, **scores)
    attend = functools.partial(implementation, key_mask_BxS=key_mask_BxT,
                               segment_ids_BxT=segment_ids_BxT, sliding_window=window, **scores)

    out, grads = jax.jit(output_and_grads, static_argnums=0)(attend, *inputs)

    assert jnp.isfinite(out).all()
    real = np.asarray(key_mask_BxT)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's attention needs an NVIDIA GPU")
@pytest.mark.parametrize("case", CASES)
def test_cudnn_on_a_gpu_is_as_close_to_float32_as_the_einsum_path_in_bf16(case):
    """cuDNN's flash attention, bf16 in and out, against `decoder.attention` in float32 on the
    same bf16-rounded inputs: its largest error in the outputs of non-pad queries and in each
    gradient is at most twice that of `decoder.attention` run in bf16 itself, or 2⁻⁸ (bf16's
    rounding) of the largest reference value, whichever is larger. A wrong mask or permutation
    errs by O(1)."""
    key_mask_BxT, segment_ids_BxT, window = CASES[case]
    (q, k, v, cotangent), _ = reference(case)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, cotangent)]
    mask_BxTxS = decoder_mask(key_mask_BxT, segment_ids_BxT, window)
    einsum = functools.partial(decoder.attention, mask_BxTxS=mask_BxTxS)
    cudnn = functools.partial(kernels.kernel_attention, "cudnn", key_mask_BxS=key_mask_BxT,
                              segment_ids_BxT=segment_ids_BxT, sliding_window=window)
    run = jax.jit(output_and_grads, static_argnums=0)
    exact = run(einsum, *(x.astype(jnp.float32) for x in bf16))
    real = np.asarray(key_mask_BxT)
    for name, ref, plain, fused in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(exact),
                                       jax.tree.leaves(run(einsum, *bf16)),
                                       jax.tree.leaves(run(cudnn, *bf16))):
        rows = real if name == "out" else slice(None)
        ref, plain, fused = (np.asarray(x, np.float32)[rows] for x in (ref, plain, fused))
        error, bound = np.abs(fused - ref).max(), max(2 * np.abs(plain - ref).max(),
                                                       2**-8 * np.abs(ref).max())
        assert error <= bound, f"{name}: cuDNN errs by {error:.3g}, bf16 einsum by " \
            f"{np.abs(plain - ref).max():.3g}"


def test_unknown_implementation_is_named():
    x = jnp.zeros((1, 128, 1, 8))
    with pytest.raises(ValueError, match="'flash': expected 'splash' or 'cudnn'"):
        kernels.kernel_attention("flash", x, x, x, key_mask_BxS=jnp.ones((1, 128), bool))


def test_splash_compiles_for_a_tpu_slice():
    """Packed pairs with a sliding window, forward and backward, bf16, rows split over a v5e:2x2
    mesh: each device runs splash on its own rows, with no all-gather."""
    mesh = make_mesh(data=2, fsdp=2, devices=target("v5e:2x2").devices)
    B, T = 8, 256
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    q, k, v = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=rows)
               for shape in ((B, T, Q, 128), (B, K, T, 128), (B, K, T, 128)))
    key_mask, segment_ids = (jax.ShapeDtypeStruct((B, T), dtype, sharding=rows)
                             for dtype in (bool, jnp.int32))

    def loss(q, k, v, key_mask, segment_ids):
        out = kernels.kernel_attention("splash", q, k, v, key_mask_BxS=key_mask,
                                       segment_ids_BxT=segment_ids, sliding_window=64, mesh=mesh)
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(
        q, k, v, key_mask, segment_ids).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo and "all-gather" not in hlo
