"""A group's prompt run once: the G samples of a prompt packed as prompt | completion 1 | … |
completion G give the log-probs, entropies, values, gradients and updates of G separate rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from align_jax.config import RLConfig
from align_jax.models import Decoder, load_pretrained
from align_jax.models.config import DecoderConfig
from align_jax.train import online
from align_jax.train.mesh import make_mesh
from align_jax.train.models import Frozen, Models
from align_jax.train.rollout import make_update_rollout
from align_jax.train.state import init_train_state
from align_jax.train.step import make_train_step
from tests.models.test_hf_parity import tiny_hf_model
from tests.train.test_online import random_rollout

G = 4


def grouped_rollout(seed, N=2, P=5, C=7):
    """N groups of G samples: a group's rows share their left-padded prompt; completions of
    different lengths (one cut at C)."""
    r = random_rollout(seed, B=N * G, P=P, T=C)
    first = np.repeat(np.arange(N) * G, G)
    return jax.tree.map(jnp.asarray, r._replace(prompt_ids_BxP=r.prompt_ids_BxP[first],
                                                prompt_mask_BxP=r.prompt_mask_BxP[first]))


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_packed_groups_give_the_outputs_of_separate_rows(name):
    """Log-probs, entropies (at a temperature) and a critic's values at the completions' tokens;
    gemma3_text has windowed and global layers, sandwich norms and a local RoPE base."""
    hf = tiny_hf_model(name)
    model = load_pretrained(hf)
    critic = Decoder(model.config, rngs=nnx.Rngs(1), with_scalar_head=True)
    r = grouped_rollout(0)
    assert online.prompt_group(model.config, r, RLConfig(num_generations=G)) == G
    mask = np.asarray(r.completion_mask_BxC)  # what a pad slot attends to is never used
    for packed, rows in zip(online.policy_outputs(model, r, 0.7, G),
                            online.policy_outputs(model, r, 0.7)):
        np.testing.assert_allclose(packed[mask], rows[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(online.critic_values(critic, r, G)[mask],
                               online.critic_values(critic, r)[mask], rtol=1e-5, atol=1e-5)


def test_packed_groups_give_the_updates_of_separate_rows():
    """GRPO with β > 0, μ = 2 passes of 2 micro-batches (each two whole groups) through
    `update_rollout`: the same losses and parameters either way."""
    hf = tiny_hf_model("llama")
    cfg = RLConfig(num_generations=G, num_iterations=2, beta=0.05, epsilon_low=0.1)
    r = grouped_rollout(1, N=4)
    model = load_pretrained(hf)
    logps = online.policy_outputs(model, r, 1.0)[0]
    r = r._replace(old_logps_BxC=logps - 0.05, ref_logps_BxC=logps + 0.1)

    # plain SGD: Adam would turn float32 noise in a near-zero gradient into a full-size step
    tx, mesh = optax.sgd(0.5), make_mesh()
    graphdef, state, _ = init_train_state(lambda rngs: load_pretrained(hf), tx, mesh, 0)

    def update(share):
        rl = dataclasses.replace(cfg, share_prompt=share)
        step = make_train_step(online.grpo, Models(graphdef), tx, rl, 2,
                               optax.constant_schedule(0.5))
        return jax.jit(make_update_rollout(step, rl, mesh))(state, Frozen(), r, jax.random.key(2))

    (packed, packed_metrics), (rows, rows_metrics) = update(True), update(False)
    np.testing.assert_allclose(packed_metrics["loss"], rows_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed.params), jax.tree.leaves(rows.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(packed_metrics["loss"][-1] - packed_metrics["loss"][0]) > 1e-3  # it trained


def test_prompt_group_packs_only_whole_groups_in_order_and_when_it_costs_less():
    smollm2 = DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    cfg = RLConfig(num_generations=8)

    def group(P, C, B=32, **changes):
        r = online.Rollout(*(jnp.zeros((B, n)) for n in (P, P, C, C, C, C)), jnp.zeros(B))
        return online.prompt_group(smollm2, r, dataclasses.replace(cfg, **changes))

    assert group(64, 64) == 8  # 64 + 8·64 = 576 tokens instead of 8 · 128 = 1024
    assert group(64, 64, share_prompt=False) == 1
    assert group(64, 64, B=12) == 1  # not whole groups
    assert online.prompt_group(smollm2, online.Rollout(*(jnp.zeros((8, 4)),) * 6, jnp.zeros(8)),
                               cfg, in_order=False) == 1  # a mini-batch of permuted rows
    # a short prompt and long completions: the packed row's attention (4160² query-key pairs
    # against 8 · 576²) costs more than the 7 prompts it saves
    assert group(64, 512) == 1
