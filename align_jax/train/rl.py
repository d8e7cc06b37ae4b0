"""The host loop of online RL (GRPO and its variants, RLOO, PPO): it draws prompts, decodes and
scores text, logs and checkpoints; everything on arrays runs in three jitted programs.

One rollout: `train.batch_size` prompts → the sampler (G samples each, KV cache, the policy's
log-probs; `sampling.generate`) → the completions' text → reward functions (GRPO family; PPO
without a reward model, the DPO paper's "PPO-GT") → `rollout.prepare_rollout` (reference
log-probs, the reward model's scores, the critic's values, the method's advantages) →
`rollout.update_rollout` (`rl.num_iterations` passes of `rl.mini_batches` train steps) → metrics.
With `rl.dynamic_sampling` (DAPO), groups whose rewards are all equal are dropped and more prompts
are drawn, up to `rl.max_sampling_rounds` rounds, until the batch is full. What differs between
algorithms is their `online.OnlineMethod`. Checkpoints hold the train state, the prompt
iterator's position and the KL controller; PPO also writes its critic to `value_model/`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax import multiturn, rewards
from align_jax.config import ConfigError, RunConfig
from align_jax.data import LoaderState, batches, bucket, default_buckets, synthetic
from align_jax.data.tokenize import render_pair
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, compute_model, generate_params
from align_jax.train import methods, online, sweep, turns
from align_jax.train.host import (
    MetricLog,
    NonFiniteError,
    build_model,
    frozen_params,
    gather_to_host,
)
from align_jax.train.mesh import activation_sharding, param_shardings, shard_batch
from align_jax.train.models import Frozen, Models, add_reference, init_models
from align_jax.train.rollout import (
    Sampled,
    jit_prepare_rollout,
    jit_update_rollout,
    rollout_optimizer,
)
from align_jax.train.session import Session
from align_jax.train.state import TrainState
from align_jax.train.step import make_train_step

log = logging.getLogger(__name__)

# the names `rl.reward_funcs` may use besides "reward_model" and "module:function"
REWARD_FUNCTIONS = {
    "accuracy": rewards.accuracy,
    "format": rewards.think_format,
    "sentiment": synthetic.sentiment_reward,
}


def check_online(cfg: RunConfig) -> online.OnlineMethod:
    """The run's OnlineMethod, after the checks that need no model (ConfigError naming the key)."""
    t, rl = cfg.train, cfg.rl
    method = online.ONLINE_METHODS[t.method]
    rows = t.batch_size * rl.num_generations
    if rows % (rl.mini_batches * t.micro_batches):
        raise ConfigError(f"train.batch_size × rl.num_generations = {rows} completions "
                          f"do not split into rl.mini_batches={rl.mini_batches} × "
                          f"train.micro_batches={t.micro_batches}")
    methods.check_micro_batches(t.method, rl, t.micro_batches)
    for key in ("keep_best", "early_stopping_patience"):
        if getattr(t, key):
            raise ConfigError(f"train.{key} applies to the offline methods, which evaluate on an "
                              f"eval split; {t.method} has none")
    turns.check_multi_turn(cfg)
    if rl.importance_sampling_cap is not None and rl.importance_sampling_cap < 1:
        raise ConfigError(f"rl.importance_sampling_cap={rl.importance_sampling_cap}: a cap below "
                          "1 would down-weight every token; expected >= 1 (TRL's default is 2)")
    if method.critic:
        if rl.reward_model is None and not rl.reward_funcs and rl.environment is None:
            raise ConfigError("PPO needs rl.reward_model (a reward model's HF directory), "
                              "rl.reward_funcs or rl.environment to score")
        return method
    if rl.num_generations < 2:
        raise ConfigError("rl.num_generations must be >= 2 for group-relative advantages")
    if rl.advantage not in ("grpo", "rloo"):
        raise ConfigError(f"rl.advantage must be grpo or rloo, got {rl.advantage!r}")
    if not rl.reward_funcs and rl.environment is None:
        raise ConfigError("GRPO needs at least one reward function in rl.reward_funcs, or "
                          "rl.environment's rewards")
    return method


def reward_functions(cfg: RunConfig, tokenizer, score_fn) -> tuple[dict, list[float]]:
    """({name: reward function}, weights) of `rl.reward_funcs` (with DAPO's soft overlong
    punishment when `rl.soft_overlong_cache` is set); "reward_model" scores with `score_fn`."""
    rl = cfg.rl
    weights = (list(rl.reward_weights) if rl.reward_weights is not None
               else [1.0] * len(rl.reward_funcs))
    if len(weights) != len(rl.reward_funcs):
        raise ConfigError(f"rl.reward_weights has {len(weights)} entries for "
                          f"{len(rl.reward_funcs)} rl.reward_funcs")
    funcs = {}
    for name in rl.reward_funcs:
        if name == "reward_model":
            if score_fn is None:
                raise ConfigError("rl.reward_funcs names reward_model but "
                                  "rl.reward_model is not set")
            funcs[name] = rewards.reward_model_reward(
                score_fn, lambda p, c: render_pair(tokenizer, p, c), tokenizer.pad_token_id or 0)
        else:
            funcs[name.rsplit(":", 1)[-1]] = rewards.resolve(name, REWARD_FUNCTIONS)
    if rl.environment is not None:
        funcs["environment"] = turns.environment_reward
        weights.append(1.0)
    if rl.soft_overlong_cache:
        funcs["soft_overlong"] = rewards.soft_overlong_punishment(rl.max_new_tokens,
                                                                  rl.soft_overlong_cache)
        weights.append(1.0)
    return funcs, weights


def member_configs(cfg: RunConfig) -> list:
    """Each member's RLConfig: `rl` with the swept field set (one, without a sweep)."""
    field, values = cfg.sweep.field, cfg.sweep.values
    if field is None or field == "seed":
        return [cfg.rl] * (len(values) if field else 1)
    return [dataclasses.replace(cfg.rl, **{field: v}) for v in values]


@dataclasses.dataclass
class Member:
    """One run of a sweep (the only one without): its seed (sampling, shuffling and prompt
    order), prompt stream and position, KL coefficient, output directory and metric log."""

    seed: int
    directory: Path
    stream: Iterator
    loader: LoaderState
    kl_coef: float
    log: MetricLog
    last: dict = dataclasses.field(default_factory=dict)

    def record(self) -> dict:
        return dict(dataclasses.asdict(self.loader), kl_coef=self.kl_coef)


def open_members(session: Session, names: list[str] | None, prompts, records: list | None,
                 start: int) -> list[Member]:
    """The members of the run, continued from the checkpoint's `records` when resuming. Every
    process walks the same global prompt batches (reward functions see all completions)."""
    cfg = session.cfg
    t, field = cfg.train, cfg.sweep.field
    seeds = [int(v) for v in cfg.sweep.values] if field == "seed" else [t.seed] * len(names or [0])
    buckets = tuple(cfg.data.buckets or default_buckets(cfg.data.max_length))
    kl_coefs, members = [c.kl_coef for c in member_configs(cfg)], []
    for k, seed in enumerate(seeds):
        record = records[k] if records else None
        loader = (LoaderState(record["epoch"], record["step"]) if record else LoaderState())
        directory = session.out if names is None else session.out / names[k]
        directory.mkdir(parents=True, exist_ok=True)
        members.append(Member(seed, directory, batches(prompts, batch_size=t.batch_size, seed=seed,
                                                       pad_id=session.pad_id, buckets=buckets,
                                                       state=loader),
                              loader, record["kl_coef"] if record else kl_coefs[k],
                              MetricLog(directory, cfg, start)))
    return members


@dataclasses.dataclass
class OnlineRun:
    """What the loop holds fixed: the session, the models and their frozen parameters, the
    reward model, the reward functions and the jitted programs (over the members' stacked
    states in a sweep)."""

    session: Session
    method: online.OnlineMethod
    names: list[str] | None
    models: Models
    shardings: TrainState
    frozen: Frozen
    reward_params: Any  # the reward model's parameters, or None
    funcs: dict[str, Callable]
    weights: list[float]
    sampling: SamplingConfig
    generate: Callable  # jitted (params, frozen, ids, mask, key) -> sampling.Completions
    prepare: Callable  # jitted rollout.prepare_rollout
    update: Callable  # jitted rollout.update_rollout
    # with rl.sampler_devices: where the sampler's copy of the parameters goes, and the frozen
    # parameters it reads (the LoRA base), on its devices
    sampler_shardings: Any = None
    sampler_frozen: Frozen | None = None
    # multi-turn rollouts: one sample's environment, and the sampler's turns on (params, frozen)
    environment: Callable | None = None
    turns: Callable | None = None

    def policy(self, model):
        return model.policy if self.method.critic else model

    def behaviour(self, params, copy: bool):
        """The parameters the sampler reads: on its own devices when it has them, else these
        (a copy, when an update may run while it samples)."""
        if self.sampler_shardings is not None:
            return jax.device_put(params, self.sampler_shardings)
        return jax.tree.map(jnp.copy, params) if copy else params

    def place_prompts(self, tree, stacked: bool):
        if self.session.sampler_mesh is None:
            return self.session.place(tree, stacked)
        return shard_batch(tree, self.session.sampler_mesh, stacked)


def build(session: Session, method: online.OnlineMethod, names: list[str] | None
          ) -> tuple[OnlineRun, TrainState]:
    """(the run's fixed parts, the initial train state): the policy (with PPO, the policy +
    critic pair, the critic from `rl.critic` or the reward model, as Huang et al. 2024, or the
    policy's weights with a new scalar head), its reference, the reward model and functions."""
    cfg, mesh = session.cfg, session.mesh
    rl = cfg.rl
    make_model, make_base, pretrained = build_model(cfg, mesh)
    if method.critic:
        make_value, make_value_base, value_state = build_model(
            cfg, mesh, with_scalar_head=True, path=rl.critic or rl.reward_model)
        make_model = online.actor_critic(make_model, make_value)
        make_base = online.actor_critic(make_base, make_value_base)
        parts = {"policy": pretrained, "value": value_state}
        pretrained = nnx.State({k: v for k, v in parts.items() if v is not None}) or None
    tx, schedule = rollout_optimizer(cfg)
    part = "policy" if method.critic else None
    models, state, shardings, frozen, frozen_shardings = init_models(
        cfg, mesh, tx, make_model, make_base, pretrained, adapter_prefix=(part,) if part else ())
    if any(method.reference(c) for c in member_configs(cfg)):
        models, frozen, frozen_shardings = add_reference(cfg, mesh, models, state, frozen,
                                                         frozen_shardings, part, make_base)
    if names is not None:  # the members' states stacked on a leading axis, one lane each
        shardings = sweep.stacked_shardings(shardings)
        state = sweep.stack(state, len(names), shardings)
    reward_graphdef, reward_params, score_fn = reward_model(cfg, mesh)
    # GRPO trains on the reward functions; PPO trains on the reward model and logs the reward
    # functions as a measure of the true reward, or, without a reward model, trains on them
    funcs, weights = reward_functions(cfg, session.tokenizer, score_fn)
    sampling = SamplingConfig(max_new_tokens=rl.max_new_tokens, num_samples=rl.num_generations,
                              temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                              stop_token_ids=(session.tokenizer.eos_token_id,),
                              pad_token_id=session.pad_id)
    run = OnlineRun(session, method, names, models, shardings, frozen,
                    reward_params if method.critic else None, funcs, weights, sampling,
                    None, None, None)
    if session.sampler_mesh is not None:
        run.sampler_shardings, run.sampler_frozen = sampler_placement(
            session.sampler_mesh, state, frozen, names)
    run.generate = jit_generate(run, names is not None)
    run.environment = turns.environment_factory(cfg)
    if run.environment is not None:
        run.turns = multiturn.jit_turns(
            lambda params, frozen: compute_model(*nnx.split(sampler_policy(run, params, frozen))),
            run.sampling)
    run.update = jit_update_rollout(
        lambda c: make_train_step(method.loss, models, tx, c, cfg.train.micro_batches, schedule),
        rl, mesh, shardings, frozen_shardings, cfg.sweep)
    run.prepare = jit_prepare_rollout(method, models, rl, mesh, shardings.params,
                                      frozen_shardings,
                                      reward_graphdef if method.critic else None, cfg.sweep)
    return run, state


def reward_model(cfg: RunConfig, mesh) -> tuple:
    """(graphdef, parameters, host score function) of `rl.reward_model`, or three Nones."""
    if not cfg.rl.reward_model:
        return None, None, None
    graphdef, params = nnx.split(load_pretrained(cfg.rl.reward_model))
    params = frozen_params(params, cfg)
    params = jax.device_put(params, param_shardings(params, mesh))
    score = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p).score(ids, mask))
    return graphdef, params, lambda ids, mask: score(params, ids, mask)


def sampler_placement(mesh, state: TrainState, frozen: Frozen, names) -> tuple:
    """(shardings of the sampler's copy of the parameters, the frozen LoRA base placed) on the
    sampler's mesh."""
    one = state.params if names is None else sweep.member(state.params, 0)
    shardings = param_shardings(one, mesh)
    if names is not None:
        shardings = sweep.stacked_shardings(shardings)
    base = (None if frozen.base is None
            else jax.device_put(frozen.base, param_shardings(frozen.base, mesh)))
    return shardings, Frozen(base=base)


def jit_generate(run: OnlineRun, stacked: bool) -> Callable:
    """The sampler on the policy of the train state's parameters, vmapped over a sweep's members
    (their params, prompts and keys; the frozen parameters shared); on the sampler's devices
    when it has its own."""
    def one(params, frozen, ids, mask, key):
        graphdef, state = nnx.split(sampler_policy(run, params, frozen))
        return generate_params(graphdef, state, ids, mask, key, config=run.sampling)

    return jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0, 0)) if stacked else one)


def sampler_policy(run: OnlineRun, params, frozen):
    """The policy the sampler runs, its activations pinned to the sampler's devices when it has
    its own."""
    policy = run.policy(run.models.model(params, frozen))
    if run.session.sampler_mesh is not None:
        policy.activation_sharding = activation_sharding(run.session.sampler_mesh)
    return policy


def rollout_keys(seed: int, index: int) -> tuple[jax.Array, jax.Array]:
    """(sampling key, shuffling key) of rollout `index`; a dynamic-sampling round r samples with
    the first folded with r."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), index)))


def _left_pad(x: np.ndarray, width: int, value) -> np.ndarray:
    return np.pad(x, [(0, 0), (width - x.shape[1], 0)], constant_values=value)


def sample_round(run: OnlineRun, params, batches_: list, keys: list,
                 then: Callable | None = None) -> list[dict]:
    """Each member's G completions of each prompt of its batch, as host arrays (completions cut
    to the smallest bucket that holds the member's longest), their text, and the prompts'
    columns repeated G times. `then()` runs once the sampler is dispatched, before the host waits
    for it (an asynchronous loop dispatches the update there, queued behind the sampler)."""
    G, session = run.sampling.num_samples, run.session
    frozen = run.frozen if run.sampler_frozen is None else run.sampler_frozen
    if run.environment is not None:  # the update queues first: the turns wait on the host
        if then is not None:
            then()
        return [turns.sample_turns(run, params, frozen, batches_[0], keys[0])]
    if run.names is None:
        done = run.generate(params, frozen, *run.place_prompts(
            (batches_[0].ids_BxP, batches_[0].mask_BxP), False), keys[0])
    else:  # the members' prompts left-padded to one width
        P = max(b.ids_BxP.shape[1] for b in batches_)
        ids = np.stack([_left_pad(b.ids_BxP, P, session.pad_id) for b in batches_])
        mask = np.stack([_left_pad(b.mask_BxP, P, False) for b in batches_])
        done = run.generate(params, frozen, *run.place_prompts((ids, mask), True),
                            jnp.stack(keys))
    if then is not None:
        then()
    done = gather_to_host(done)
    done = ([done] if run.names is None
            else [sweep.member(done, k) for k in range(len(batches_))])
    buckets = default_buckets(run.sampling.max_new_tokens, smallest=8)
    parts = []
    for batch, d in zip(batches_, done):
        C = bucket(max(int(d.lengths_B.max()), 1), buckets)
        ids, mask = np.asarray(d.ids_BxC)[:, :C], np.asarray(d.mask_BxC)[:, :C]
        columns = {k: [v for v in vs for _ in range(G)] for k, vs in batch.columns.items()}
        parts.append({"prompt_ids": np.repeat(batch.ids_BxP, G, axis=0),
                      "prompt_mask": np.repeat(batch.mask_BxP, G, axis=0), "completion_ids": ids,
                      "completion_mask": mask, "model_mask": mask,
                      "logps": np.asarray(d.logps_BxC, np.float32)[:, :C],
                      "truncated": np.asarray(d.truncated_B), "prompts": columns.pop("prompt"),
                      "texts": session.tokenizer.batch_decode(
                          [row[m] for row, m in zip(ids, mask)], skip_special_tokens=True),
                      "columns": columns})
    return parts


def score_round(part: dict, funcs: dict, weights: list[float]) -> dict:
    """The round with its combined rewards [B] and each function's [B, F] (NaN: not scored)."""
    n = len(part["texts"])
    if not funcs:
        return dict(part, rewards=np.full(n, np.nan), per_function=np.zeros((n, 0)))
    ids = [row[m].tolist() for row, m in zip(part["completion_ids"], part["model_mask"])]
    r, per_fn = rewards.score(funcs, weights, prompts=part["prompts"], completions=part["texts"],
                              completion_ids=ids, columns=part["columns"])
    return dict(part, rewards=r, per_function=per_fn)


def _nan_std(x: np.ndarray) -> float:
    """Unbiased std over the entries that are not NaN (None rewards); 0 for fewer than two."""
    x = x[~np.isnan(x)]
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


@dataclasses.dataclass
class Groups:
    """A member's groups of G samples collected so far in a rollout."""

    kept: list = dataclasses.field(default_factory=list)  # informative
    spare: list = dataclasses.field(default_factory=list)  # all rewards equal (dynamic sampling)
    rounds: int = 0
    batch: Any = None  # the prompts of its last round
    loader: LoaderState | None = None  # the prompt stream's position after that round

    def add(self, part: dict, G: int, filtered: bool) -> None:
        for g in range(len(part["texts"]) // G):
            rows = slice(g * G, (g + 1) * G)
            group = {k: (v[rows] if not isinstance(v, dict)
                         else {c: x[rows] for c, x in v.items()}) for k, v in part.items()}
            informative = not filtered or _nan_std(group["rewards"]) > 0
            (self.kept if informative else self.spare).append(group)


def collect(run: OnlineRun, params, members: list[Member], index: int,
            then: Callable | None = None) -> list[tuple[dict, dict, LoaderState]]:
    """Each member's (full batch of scored groups, sampling metrics, prompt position after it),
    sampled by the policy of `params`: one round of `train.batch_size` prompts, or with dynamic
    sampling (GRPO family), rounds until as many groups with unequal rewards are found (filled
    with equal ones when `rl.max_sampling_rounds` run out). A member already full draws no more
    prompts; its lane of the vmapped sampler repeats its last batch and the result is dropped.
    `then()` runs once the first round's sampler is dispatched."""
    cfg = run.session.cfg
    N, G = cfg.train.batch_size, cfg.rl.num_generations
    dynamic = cfg.rl.dynamic_sampling and not run.method.critic
    groups = [Groups() for _ in members]
    for round_ in range(cfg.rl.max_sampling_rounds if dynamic else 1):
        active = [len(g.kept) < N for g in groups]
        if not any(active):
            break
        for m, g, a in zip(members, groups, active):
            if a:
                g.loader, g.batch = next(m.stream)
                g.rounds += 1
        keys = [jax.random.fold_in(rollout_keys(m.seed, index)[0], round_) for m in members]
        parts = sample_round(run, params, [g.batch for g in groups], keys, then)
        then = None
        for g, a, part in zip(groups, active, parts):
            if a:
                g.add(score_round(part, run.funcs, run.weights), G, dynamic)
    out = []
    for g in groups:
        shortfall = max(0, N - len(g.kept))
        metrics = ({"sampling/rounds": g.rounds, "sampling/shortfall_groups": shortfall}
                   if dynamic else {})
        out.append((pad_rows((g.kept + g.spare[:shortfall])[:N], run.session.pad_id, concat=True),
                    metrics, g.loader))
    return out


# how pad_rows widens each array: (the width it shares, the padding value, left)
_PADDING = {"prompt_ids": ("P", "pad", True), "prompt_mask": ("P", 0, True),
            "completion_ids": ("C", "pad", False), "completion_mask": ("C", 0, False),
            "model_mask": ("C", 0, False), "logps": ("C", 0, False)}


def pad_rows(parts: list[dict], pad_id: int, concat: bool = False):
    """Rows of several groups or members padded to common prompt (left) and completion (right)
    widths; with `concat`, concatenated into one dict."""
    width = {"P": max(p["prompt_ids"].shape[1] for p in parts),
             "C": max(p["completion_ids"].shape[1] for p in parts)}

    def pad(key, x):
        if key not in _PADDING:
            return x
        w, value, left = _PADDING[key]
        extra = width[w] - x.shape[1]
        return np.pad(x, [(0, 0), (extra, 0) if left else (0, extra)],
                      constant_values=pad_id if value == "pad" else value)

    padded = [{k: pad(k, v) for k, v in p.items()} for p in parts]
    if not concat:
        return padded
    out = {}
    for key, first in padded[0].items():
        values = [p[key] for p in padded]
        if isinstance(first, dict):
            out[key] = {c: sum((list(v[c]) for v in values), []) for c in first}
        else:
            out[key] = (np.concatenate(values) if isinstance(first, np.ndarray)
                        else sum(values, []))
    return out


def host_metrics(data: dict, funcs: dict) -> dict[str, float]:
    """Completion lengths and each reward function's mean and std, from the host's arrays."""
    lengths = data["completion_mask"].sum(1)
    metrics = {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
               "completions/max_length": lengths.max(),
               "completions/clipped_ratio": data["truncated"].mean()}
    for j, name in enumerate(funcs):
        scored = data["per_function"][:, j][~np.isnan(data["per_function"][:, j])]
        metrics[f"rewards/{name}/mean"] = scored.mean() if scored.size else np.nan
        metrics[f"rewards/{name}/std"] = _nan_std(data["per_function"][:, j])
    if "turns" in data:  # multi-turn rollouts, with TRL's tool metrics
        metrics.update({"turns/mean": data["turns"].mean(), "turns/max": data["turns"].max()})
    if "tool_calls" in data:
        calls = data["tool_calls"].sum()
        metrics.update({"tools/call_frequency": calls / len(data["texts"]),
                        "tools/failure_frequency": data["tool_failures"].sum() / max(calls, 1)})
    scored = data["rewards"][~np.isnan(data["rewards"])]
    metrics["reward"] = scored.mean() if scored.size else np.nan
    return {k: float(v) for k, v in metrics.items()}


def sampled(data: dict) -> Sampled:
    return Sampled(data["prompt_ids"], data["prompt_mask"], data["completion_ids"],
                   data["completion_mask"], data["model_mask"], data["logps"], data["truncated"],
                   data["rewards"].astype(np.float32))


def update_metrics(stacked: dict, index: int, step: int, member: str = "") -> dict[str, float]:
    """The means over a rollout's updates, except the sampler-vs-trainer log-prob gap, which the
    first update measures before any change; NonFiniteError if an update was refused."""
    bad = np.flatnonzero(stacked["nonfinite"])
    if bad.size:
        raise NonFiniteError(f"{member}step {step + bad[0] + 1}: non-finite loss or gradient "
                             f"in rollout {index + 1} (losses "
                             f"{np.asarray(stacked['loss']).tolist()}); that update was refused "
                             "and the last checkpoint is intact")
    mean = {k: float(np.mean(v)) for k, v in stacked.items()
            if k not in ("logp_diff", "nonfinite")}
    mean["sampling/sampler_trainer_logp_diff"] = float(stacked["logp_diff"][0])
    return mean


def timed_collect(run: OnlineRun, params, members: list[Member], index: int,
                  then: Callable | None = None) -> list:
    """`collect`, each member's metrics with the wall time it took."""
    clock = time.perf_counter()
    collected = collect(run, params, members, index, then)
    for _, metrics, _ in collected:
        metrics["timing/generate_and_score"] = time.perf_counter() - clock
    return collected


def dispatch(run: OnlineRun, state: TrainState, members: list[Member], collected: list,
             index: int) -> tuple[TrainState, tuple]:
    """Place the collected rollout and start `prepare` and `update` on it (JAX runs them
    asynchronously); each member's position moves past the rollout. Returns the new state and
    the metrics still on the devices."""
    data = [d for d, _, _ in collected]
    for m, (_, _, loader) in zip(members, collected):
        m.loader = loader
    kl_coef = np.float32([m.kl_coef for m in members])
    if run.names is None:
        inputs, kl_coef, keys = (run.session.place(sampled(data[0])), kl_coef[0],
                                 rollout_keys(members[0].seed, index)[1])
    else:
        inputs = run.session.place(jax.tree.map(lambda *x: np.stack(x), *map(
            sampled, pad_rows(data, run.session.pad_id))), stacked=True)
        keys = jnp.stack([rollout_keys(m.seed, index)[1] for m in members])
    rollout, prepared = run.prepare(state.params, run.frozen, run.reward_params, inputs, kl_coef)
    state, stacked = run.update(state, run.frozen, rollout, keys)
    return state, (prepared, stacked)


def advance(run: OnlineRun, state: TrainState, members: list[Member], collected: list,
            index: int, sample_next: bool) -> tuple[TrainState, tuple, list | None]:
    """Start rollout `index`'s prepare and update (`dispatch`). With `sample_next` (asynchronous
    rollouts), rollout index + 1 is sampled by the parameters from before that update, its
    sampler dispatched first so that the update queues behind it, and decoded and scored while
    the update runs. Returns (state, metrics on the devices, rollout index + 1 or None)."""
    if not sample_next:
        return (*dispatch(run, state, members, collected, index), None)
    behaviour, started = run.behaviour(state.params, True), []
    pending = timed_collect(run, behaviour, members, index + 1, then=lambda: started.extend(
        dispatch(run, state, members, collected, index)))
    return (*started, pending)


def finish(run: OnlineRun, members: list[Member], collected: list, on_device: tuple, index: int,
           step: int) -> list[dict]:
    """Each member's metrics of the rollout: the host's, `prepare`'s and the updates' (waiting
    for them)."""
    prepared, stacked = gather_to_host(on_device)
    out = []
    for k, (m, (data, metrics, _)) in enumerate(zip(members, collected)):
        pick = (lambda x: x) if run.names is None else (lambda x: x[k])  # noqa: E731
        metrics = dict(metrics, **host_metrics(data, run.funcs))
        metrics.update(update_metrics(jax.tree.map(pick, stacked), index, step,
                                      "" if run.names is None else f"{run.names[k]}: "))
        metrics.update({name: float(pick(v)) for name, v in prepared.items()})
        if run.method.critic:
            metrics.update(reward=metrics["objective/scores"], kl_coef=m.kl_coef)
        out.append(metrics)
    return out


def train_online(cfg: RunConfig, *, resume: bool = False, progress: bool = True,
                 max_updates: int | None = None) -> dict:
    """Run a GRPO-family or PPO config for `train.steps` rollouts; return the last metrics (for a
    sweep, {member name: its last metrics}). Stopping and resuming as `train.train` says; a
    non-finite update raises NonFiniteError and keeps the last checkpoint as it was (the
    rollout's earlier updates are not a state to save). With `rl.async_rollouts`, rollout k+1 is
    sampled by the policy before update k, and decoded and scored while that update runs."""
    t, rl = cfg.train, cfg.rl
    method = check_online(cfg)
    names = sweep.members(cfg, method.sweepable)
    session = Session.open(cfg, resume)
    prompts, _ = session.load_data("prompt_only", tools=turns.tool_schemas(cfg))
    run, state = build(session, method, names)
    restored = session.checkpoints.restore(state, run.shardings)
    state, records = restored if restored is not None else (state, {"members": None})
    if "members" not in records:  # one run's position, recorded flat
        records = {"members": [records]}
    updates = rl.num_iterations * rl.mini_batches
    index = first = int(np.ravel(gather_to_host(state.step))[0]) // updates
    members = open_members(session, names, prompts, records["members"], index)
    start, pending = time.perf_counter(), None
    save = lambda: session.checkpoints.save(  # noqa: E731
        index, state, {"members": [m.record() for m in members]})
    with session.loop(index, progress=progress, max_updates=max_updates,
                      unit="rollout") as (stop, bar, stop_at):
        while index < stop_at and not stop.requested:
            started = time.perf_counter()
            collected = pending or timed_collect(run, run.behaviour(state.params, False), members,
                                                 index)
            dispatched = time.perf_counter()
            state, on_device, pending = advance(run, state, members, collected, index,
                                                rl.async_rollouts and index + 1 < stop_at)
            metrics = finish(run, members, collected, on_device, index, index * updates)
            index, now = index + 1, time.perf_counter()
            bar.update(1)
            for m, member_metrics in zip(members, metrics):
                # the update's time is what the loop waited for it beyond the overlapped sampling
                member_metrics.update({"timing/rollout": now - started, "timing/update": (
                    now - dispatched - (pending[0][1]["timing/generate_and_score"] if pending
                                        else 0.0))})
                log_rollout(m, member_metrics, cfg, index, (index - first) / (now - start))
            bar.set_postfix(reward=" ".join(f"{x['reward']:.3f}" for x in metrics))
            if t.checkpoint_every and index % t.checkpoint_every == 0:
                save()
        save()
    for m in members:
        m.log.close()
    if session.finished(index, "rollout"):
        export(run, state, members)
    return members[0].last if names is None else {n: m.last for n, m in zip(names, members)}


def log_rollout(m: Member, metrics: dict, cfg: RunConfig, index: int, rate: float) -> None:
    """PPO's adaptive KL controller steps on the rollout's KL; every `train.log_every` rollouts
    (and the last) the metrics are written."""
    t, rl = cfg.train, cfg.rl
    if cfg.train.method == "ppo" and rl.kl_target is not None:
        m.kl_coef = online.adaptive_kl_coef(m.kl_coef, metrics["objective/kl"],
                                            target=rl.kl_target, horizon=rl.kl_horizon,
                                            n_steps=t.batch_size * rl.num_generations)
    if index % t.log_every == 0 or index == t.steps:
        m.last = dict(metrics, rollouts_per_second=rate)
        m.log.write("train", index, m.last)


def export(run: OnlineRun, state: TrainState, members: list[Member]) -> None:
    """Each member's policy as `<dir>/model/` (PPO's critic as `<dir>/value_model/`); every
    process gathers, the first one writes."""
    params, frozen = gather_to_host((state.params, run.frozen._replace(reference=None)))
    for k, m in enumerate(members):
        model = run.models.model(params if run.names is None else sweep.member(params, k), frozen)
        run.session.export(run.policy(model), m.directory)
        if run.method.critic:
            run.session.export(model.value, m.directory, name="value_model")
