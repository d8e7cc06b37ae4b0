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
from align_jax.train.rollout import make_update_rollout, minibatch_group, minibatch_rows
from align_jax.train.state import init_train_state
from align_jax.train.step import make_train_step
from tests.models.test_hf_parity import tiny_hf_model
from tests.train.test_online import random_rollout

G = 4


def grouped_rollout(seed, N=2, P=5, C=7):
    """N groups of G samples sharing a left-padded prompt; completions of different lengths."""
    return jax.tree.map(jnp.asarray, random_rollout(seed, B=N * G, P=P, T=C, group=G))


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
    """GRPO with β > 0 through `update_rollout`, μ = 2 passes of 2 mini-batches of whole groups,
    each in 2 micro-batches of one group: the same losses and parameters as a train step without
    packing on each mini-batch of the same draw."""
    hf = tiny_hf_model("llama")
    cfg = RLConfig(num_generations=G, num_iterations=2, mini_batches=2, beta=0.05,
                   epsilon_low=0.1)
    r = grouped_rollout(1, N=4)
    model = load_pretrained(hf)
    logps = online.policy_outputs(model, r, 1.0)[0]
    r = r._replace(old_logps_BxC=logps - 0.05, ref_logps_BxC=logps + 0.1)
    assert online.prompt_group(model.config, jax.tree.map(lambda x: x[:G], r), cfg) == G

    # plain SGD: Adam would turn float32 noise in a near-zero gradient into a full-size step
    tx, mesh = optax.sgd(0.5), make_mesh()
    graphdef, state, _ = init_train_state(lambda rngs: load_pretrained(hf), tx, mesh, 0)

    def step(share):
        return make_train_step(online.grpo, Models(graphdef), tx,
                               dataclasses.replace(cfg, share_prompt=share), 2,
                               optax.constant_schedule(0.5))

    key = jax.random.key(2)
    packed, metrics = jax.jit(make_update_rollout(step(True), cfg, mesh))(state, Frozen(), r, key)
    rows, separate = state, jax.jit(step(False))
    for index, loss in zip(minibatch_rows(key, 4 * G, 2, 2, G), metrics["loss"]):
        rows, step_metrics = separate(rows, Frozen(), jax.tree.map(lambda x: x[index], r))
        np.testing.assert_allclose(loss, step_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed.params), jax.tree.leaves(rows.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(metrics["loss"][-1] - metrics["loss"][0]) > 1e-3  # it trained


def test_minibatches_under_share_prompt_are_whole_groups_in_order():
    rows = np.asarray(minibatch_rows(jax.random.key(0), 24, 3, 2, group=4))
    assert rows.shape == (6, 12)
    for p in rows.reshape(3, 24):
        assert sorted(p.tolist()) == list(range(24))
    groups = rows.reshape(6, 3, 4)  # three groups of 4 per mini-batch, each 4g … 4g + 3
    assert (groups - groups[..., :1] == np.arange(4)).all() and (groups[..., 0] % 4 == 0).all()
    assert len({tuple(p) for p in rows.reshape(3, 24)}) == 3
    cfg = RLConfig(num_generations=4, mini_batches=2)
    assert minibatch_group(cfg, 24) == 4
    assert minibatch_group(cfg, 20) == 1  # 10 rows per mini-batch: not whole groups
    assert minibatch_group(dataclasses.replace(cfg, share_prompt=False), 24) == 1


def test_prompt_group_packs_whole_groups_when_it_costs_less():
    smollm2 = DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    cfg = RLConfig(num_generations=8)

    def group(P, C, B=32, **changes):
        r = online.Rollout(*(jnp.zeros((B, n)) for n in (P, P, C, C, C, C)), jnp.zeros(B))
        return online.prompt_group(smollm2, r, dataclasses.replace(cfg, **changes))

    assert group(64, 64) == 8  # 64 + 8·64 = 576 tokens instead of 8 · 128 = 1024
    assert group(64, 64, share_prompt=False) == 1
    assert group(64, 64, B=12) == 1  # not whole groups
    # a short prompt and long completions: the packed row's attention (4160² query-key pairs
    # against 8 · 576²) costs more than the 7 prompts it saves
    assert group(64, 512) == 1
