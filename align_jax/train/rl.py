"""The host loop of online RL (GRPO and its variants, RLOO, PPO): it samples, scores and moves
data; every computation on arrays is a jitted pure function.

One rollout: `train.batch_size` prompts → the sampler (G samples each, KV cache, the policy's
log-probs) → reward functions on the decoded texts (GRPO family; PPO without a reward model, the
DPO paper's "PPO-GT") or the reward model's score (PPO) → advantages → `rl.num_iterations`
passes of `rl.mini_batches` sharded train steps (`online.grpo` / `online.ppo`) → metrics. With
`rl.dynamic_sampling` (DAPO), groups whose rewards are all equal are dropped and more prompts are
drawn, up to `rl.max_sampling_rounds` rollouts, until the batch is full. Checkpoints hold the
train state, the prompt iterator's position and the KL controller; outputs are those of `run.py`
(PPO also writes its critic to `value_model/`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from align_jax import losses, rewards
from align_jax.config import ConfigError, RunConfig
from align_jax.data import LoaderState, batches, bucket, default_buckets, synthetic
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate
from align_jax.train import methods, online
from align_jax.train.host import (
    Checkpoints,
    MetricLog,
    StopSignal,
    build_model,
    check_finite,
    frozen_params,
    gather_to_host,
    load_tokenizer,
    record_config,
)
from align_jax.train.mesh import make_mesh, param_shardings, shard_batch
from align_jax.train.models import export, init_models
from align_jax.train.run import load_data
from align_jax.train.state import learning_rate, make_optimizer
from align_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)

# the names `rl.reward_funcs` may use besides "reward_model" and "module:function"
REWARD_FUNCTIONS = {
    "accuracy": rewards.accuracy,
    "format": rewards.think_format,
    "sentiment": synthetic.sentiment_reward,
}


def _reward_functions(cfg: RunConfig, tokenizer, score_fn) -> tuple[dict, list[float]]:
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
            funcs[name] = rewards.reward_model_reward(score_fn, tokenizer)
        else:
            funcs[name.rsplit(":", 1)[-1]] = rewards.resolve(name, REWARD_FUNCTIONS)
    if rl.soft_overlong_cache:
        funcs["soft_overlong"] = rewards.soft_overlong_punishment(rl.max_new_tokens,
                                                                  rl.soft_overlong_cache)
        weights.append(1.0)
    return funcs, weights


def _nan_mean(x: np.ndarray) -> float:
    """Mean over the entries that are not NaN (None rewards); NaN when there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _nan_std(x: np.ndarray) -> float:
    """Unbiased std over the entries that are not NaN; 0 for fewer than two."""
    x = x[~np.isnan(x)]
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


def _pad_to(x: np.ndarray, width: int, value, left: bool) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[1] = (width - x.shape[1], 0) if left else (0, width - x.shape[1])
    return np.pad(x, pad, constant_values=value)


def _concat_groups(parts: list[dict], pad_id: int) -> dict:
    """Rows from several sampling rounds, padded to common prompt (left) and completion (right)
    widths."""
    P = max(p["prompt_ids"].shape[1] for p in parts)
    C = max(p["completion_ids"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key in ("prompt_ids", "prompt_mask"):
            values = [_pad_to(v, P, pad_id if key == "prompt_ids" else 0, left=True)
                      for v in values]
        elif key in ("completion_ids", "completion_mask", "logps"):
            values = [_pad_to(v, C, pad_id if key == "completion_ids" else 0, left=False)
                      for v in values]
        out[key] = np.concatenate(values) if isinstance(values[0], np.ndarray) else sum(values, [])
    return out


def rollout_optimizer(cfg: RunConfig):
    """(AdamW, its schedule) counted in updates: `train.steps` and `train.warmup_steps` count
    rollouts of `rl.num_iterations` × `rl.mini_batches` updates each."""
    t, updates = cfg.train, cfg.rl.num_iterations * cfg.rl.mini_batches
    in_updates = dataclasses.replace(t, steps=t.steps * updates,
                                     warmup_steps=t.warmup_steps * updates)
    return make_optimizer(in_updates), learning_rate(in_updates)


def train_online(cfg: RunConfig, *, resume: bool = False, progress: bool = True,
                 max_updates: int | None = None) -> dict:
    """Run a GRPO-family or PPO config for `train.steps` rollouts; return the last metrics.

    SIGTERM / Ctrl-C, or `max_updates` rollouts made by this call, end it early with a checkpoint
    that `resume=True` continues exactly. A non-finite update raises NonFiniteError and keeps the
    last checkpoint as it was (the rollout's earlier mini-batch updates are not a state to save).
    """
    t, rl = cfg.train, cfg.rl
    is_ppo = t.method == "ppo"
    G = rl.num_generations
    rows_per_rollout = t.batch_size * G
    if rows_per_rollout % (rl.mini_batches * t.micro_batches):
        raise ConfigError(f"train.batch_size × rl.num_generations = {rows_per_rollout} completions "
                          f"do not split into rl.mini_batches={rl.mini_batches} × "
                          f"train.micro_batches={t.micro_batches}")
    methods.check_micro_batches(t.method, rl, t.micro_batches)
    if not is_ppo and G < 2:
        raise ConfigError("rl.num_generations must be >= 2 for group-relative advantages")
    if is_ppo and rl.reward_model is None and not rl.reward_funcs:
        raise ConfigError("PPO needs rl.reward_model (a reward model's HF directory) or "
                          "rl.reward_funcs to score")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_config(out, cfg, resume)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert)
    tokenizer = load_tokenizer(cfg.tokenizer)
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    prompts, _ = load_data(cfg, tokenizer, "prompt_only")
    prompt_buckets = tuple(cfg.data.buckets or default_buckets(cfg.data.max_length))
    completion_buckets = default_buckets(rl.max_new_tokens, smallest=8)

    # Models: the policy (with PPO, a policy + critic pair), the frozen reference and reward model.
    make_model, make_base, pretrained = build_model(cfg, mesh)
    reward_model = load_pretrained(rl.reward_model) if rl.reward_model else None
    if is_ppo:  # the critic starts from the reward model (or rl.critic), as Huang et al. 2024
        # do; with neither, from the policy's starting weights with a new scalar head
        make_value, make_value_base, value_state = build_model(
            cfg, mesh, with_scalar_head=True, path=rl.critic or rl.reward_model)
        make_model = online.actor_critic(make_model, make_value)
        make_base = online.actor_critic(make_base, make_value_base)
        parts = {"policy": pretrained, "value": value_state}
        pretrained = nnx.State({k: v for k, v in parts.items() if v is not None}) or None
    updates_per_rollout = rl.num_iterations * rl.mini_batches
    tx, schedule = rollout_optimizer(cfg)
    models, state, shardings, frozen, frozen_shardings = init_models(
        cfg, mesh, tx, make_model, make_base, pretrained,
        adapter_prefix=("policy",) if is_ppo else ())
    policy_of = (lambda m: m.policy) if is_ppo else (lambda m: m)  # noqa: E731

    ref_logps_fn = None
    if is_ppo or rl.beta != 0.0:
        if cfg.reference is None and models.base_graphdef is not None:
            # LoRA: the base with the adapters off, from the frozen base itself
            ref_graphdef = nnx.split(policy_of(nnx.eval_shape(lambda: make_base(nnx.Rngs(0)))))[0]
            ref_params = frozen.base["policy"] if is_ppo else frozen.base
        else:
            source = (load_pretrained(cfg.reference) if cfg.reference
                      else policy_of(models.model(state.params, frozen)))
            ref_graphdef, ref_params = nnx.split(source)
            ref_params = frozen_params(ref_params, cfg)
            ref_params = jax.device_put(ref_params, param_shardings(ref_params, mesh))
        ref_logps_fn = jax.jit(lambda p, r: online.policy_outputs(nnx.merge(ref_graphdef, p), r,
                                                                  rl.temperature)[0])
    score_fn = None
    if reward_model is not None:
        rm_graphdef, rm_params = nnx.split(reward_model)
        rm_params = frozen_params(rm_params, cfg)
        rm_params = jax.device_put(rm_params, param_shardings(rm_params, mesh))
        rm_score = jax.jit(lambda p, ids, mask: nnx.merge(rm_graphdef, p).score(ids, mask))
        score_fn = lambda ids, mask: rm_score(rm_params, ids, mask)  # noqa: E731
    # GRPO trains on the reward functions; PPO trains on the reward model and, when given reward
    # functions, logs them as a measure of the true reward; PPO without a reward model trains on
    # them.
    funcs, weights = _reward_functions(cfg, tokenizer, score_fn)
    if not funcs and not is_ppo:
        raise ConfigError("GRPO needs at least one reward function in rl.reward_funcs")
    trains_on_funcs = score_fn is None or not is_ppo
    if is_ppo:
        values_fn = jax.jit(lambda p, f, r: online.critic_values(models.model(p, f).value, r))
        targets_fn = jax.jit(lambda *args: online.ppo_targets(*args, rl))

    loss_fn = online.ppo if is_ppo else online.grpo
    train_step = jit_train_step(make_train_step(loss_fn, models, tx, rl, t.micro_batches,
                                                schedule),
                                shardings, frozen_shardings, mesh)
    sampling = SamplingConfig(max_new_tokens=rl.max_new_tokens, num_samples=G,
                              temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                              stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=pad_id)

    checkpoints = Checkpoints(out, t.keep_checkpoints, resume)
    loader, kl_coef = LoaderState(), rl.kl_coef
    restored = checkpoints.restore(state, shardings)
    if restored is not None:
        state, record = restored
        loader, kl_coef = LoaderState(record["epoch"], record["step"]), record["kl_coef"]
        log.info("resumed from rollout %d (%s)", int(state.step) // updates_per_rollout, loader)
    # Every process walks the same global prompt batches (reward functions see all completions);
    # arrays are split over processes only when they are placed on the mesh.
    stream = batches(prompts, batch_size=t.batch_size, seed=t.seed, pad_id=pad_id,
                     buckets=prompt_buckets, state=loader)
    process_count, process_index = jax.process_count(), jax.process_index()

    def place(tree):
        def mine(x):
            n = x.shape[0] // process_count
            return np.asarray(x)[process_index * n:(process_index + 1) * n]
        return shard_batch(jax.tree.map(mine, tree), mesh)

    def sample_round(rollout: int, round_: int) -> dict:
        nonlocal loader
        loader, batch = next(stream)
        key = jax.random.fold_in(jax.random.key(t.seed), rollout * rl.max_sampling_rounds + round_)
        policy = policy_of(models.model(state.params, frozen))
        done = gather_to_host(generate(policy, *place((batch.ids_BxP, batch.mask_BxP)), key,
                                       sampling))
        C = bucket(max(int(done.lengths_B.max()), 1), completion_buckets)
        ids, mask = np.asarray(done.ids_BxC)[:, :C], np.asarray(done.mask_BxC)[:, :C]
        columns = {k: [v for v in vs for _ in range(G)] for k, vs in batch.columns.items()}
        prompt_texts = columns.pop("prompt")
        return {"prompt_ids": np.repeat(batch.ids_BxP, G, axis=0),
                "prompt_mask": np.repeat(batch.mask_BxP, G, axis=0), "completion_ids": ids,
                "completion_mask": mask, "logps": np.asarray(done.logps_BxC)[:, :C],
                "truncated": np.asarray(done.truncated_B), "prompts": prompt_texts,
                "texts": tokenizer.batch_decode([row[m] for row, m in zip(ids, mask)],
                                                skip_special_tokens=True),
                "columns": columns}

    def score_round(part: dict) -> dict:
        ids = [row[m].tolist() for row, m in zip(part["completion_ids"], part["completion_mask"])]
        r, per_fn = rewards.score(funcs, weights, prompts=part["prompts"],
                                  completions=part["texts"], completion_ids=ids,
                                  columns=part["columns"])
        return dict(part, rewards=r, per_function=per_fn)

    def collect(rollout: int) -> tuple[dict, dict]:
        """A full batch of scored groups (GRPO family) or completions (PPO), and sampling
        metrics."""
        kept, spare, rounds = [], [], 0
        while len(kept) < t.batch_size and rounds < (rl.max_sampling_rounds
                                                     if rl.dynamic_sampling else 1):
            part = (score_round(sample_round(rollout, rounds)) if funcs
                    else sample_round(rollout, rounds))
            rounds += 1
            for g in range(t.batch_size):
                rows = slice(g * G, (g + 1) * G)
                group = {k: (v[rows] if not isinstance(v, dict)
                             else {c: x[rows] for c, x in v.items()})
                         for k, v in part.items()}
                informative = not rl.dynamic_sampling or is_ppo or _nan_std(group["rewards"]) > 0
                (kept if informative else spare).append(group)
        shortfall = max(0, t.batch_size - len(kept))
        # rounds ran out: fill with uninformative groups
        groups = (kept + spare[:shortfall])[:t.batch_size]
        columns = [g.pop("columns") for g in groups]
        merged = _concat_groups(groups, pad_id)
        merged["columns"] = {c: sum((list(col[c]) for col in columns), []) for c in columns[0]}
        metrics = ({"sampling/rounds": rounds, "sampling/shortfall_groups": shortfall}
                   if rl.dynamic_sampling else {})
        return merged, metrics

    def prepare(data: dict) -> tuple[online.Rollout, dict]:
        """Advantages (and PPO's targets) for a collected rollout: the jitted part of a
        rollout."""
        loss_mask = data["completion_mask"].copy()
        if rl.mask_truncated:
            loss_mask &= ~data["truncated"][:, None]
        lengths = data["completion_mask"].sum(1)
        metrics = {"completions/mean_length": lengths.mean(),
                   "completions/min_length": lengths.min(), "completions/max_length": lengths.max(),
                   "completions/clipped_ratio": data["truncated"].mean()}
        for j, name in enumerate(funcs):
            metrics[f"rewards/{name}/mean"] = _nan_mean(data["per_function"][:, j])
            metrics[f"rewards/{name}/std"] = _nan_std(data["per_function"][:, j])
        valid = ~np.isnan(data["rewards"]) if trains_on_funcs else np.ones(len(lengths), bool)
        # a completion no reward function applies to (all None) is not trained on
        loss_mask &= valid[:, None]
        if is_ppo:
            advantages = np.zeros(loss_mask.shape, np.float32)
        else:
            r = np.nan_to_num(data["rewards"])
            if rl.advantage == "rloo":
                advantages = losses.rloo_advantages(jnp.asarray(r), G, valid_B=jnp.asarray(valid))
                _, group = losses.group_advantages(jnp.asarray(r), G, valid_B=jnp.asarray(valid))
            elif rl.advantage == "grpo":
                advantages, group = losses.group_advantages(jnp.asarray(r), G,
                                                            scale=rl.scale_rewards,
                                                            valid_B=jnp.asarray(valid))
            else:
                raise ConfigError(f"rl.advantage must be grpo or rloo, got {rl.advantage!r}")
            metrics["reward"] = _nan_mean(data["rewards"])
            metrics.update({k: float(v) for k, v in group.items()})
        rollout = online.Rollout(data["prompt_ids"], data["prompt_mask"], data["completion_ids"],
                                 data["completion_mask"], loss_mask,
                                 data["logps"].astype(np.float32),
                                 np.asarray(advantages, np.float32))
        placed = place(rollout)
        if ref_logps_fn is not None:
            rollout = rollout._replace(
                ref_logps_BxC=gather_to_host(ref_logps_fn(ref_params, placed)))
        if is_ppo:
            values = gather_to_host(values_fn(state.params, frozen, placed))
            ids = np.concatenate([rollout.prompt_ids_BxP, rollout.completion_ids_BxC], 1)
            mask = np.concatenate([rollout.prompt_mask_BxP, rollout.completion_mask_BxC], 1)
            scores = (gather_to_host(score_fn(*place((ids, mask)))) if score_fn is not None
                      else np.nan_to_num(data["rewards"]).astype(np.float32))
            rollout, ppo_metrics = targets_fn(rollout, rollout.ref_logps_BxC, values, scores,
                                              data["truncated"], jnp.float32(kl_coef))
            rollout = gather_to_host(rollout._replace(ref_logps_BxC=None))
            metrics.update({k: float(v) for k, v in ppo_metrics.items()})
            metrics.update(reward=metrics["objective/scores"], kl_coef=kl_coef)
        return rollout, metrics

    def update(rollout: online.Rollout, index: int) -> dict:
        """μ passes over the rollout in shuffled mini-batches; metrics averaged over the updates,
        except logp_diff (sampler vs trainer), which the first update measures before any change."""
        nonlocal state
        B = rollout.prompt_ids_BxP.shape[0]
        rng = np.random.default_rng([t.seed, index])
        all_metrics = []
        for _ in range(rl.num_iterations):
            order = rng.permutation(B)
            for rows in np.split(order, rl.mini_batches):
                state, metrics = train_step(
                    state, frozen, place(jax.tree.map(lambda x: x[np.sort(rows)], rollout)))
                check_finite(metrics, int(gather_to_host(state.step)) + 1, f"rollout {index + 1}")
                all_metrics.append(gather_to_host(metrics))
        mean = {k: float(np.mean([m[k] for m in all_metrics])) for k in all_metrics[0]}
        mean["sampling/sampler_trainer_logp_diff"] = float(all_metrics[0]["logp_diff"])
        del mean["logp_diff"], mean["nonfinite"]
        return mean

    rollout_index = int(gather_to_host(state.step)) // updates_per_rollout
    first, last, start = rollout_index, {}, time.perf_counter()
    metric_log = MetricLog(out, cfg, rollout_index)
    primary = process_index == 0
    with StopSignal().installed() as stop, \
            tqdm(total=t.steps, initial=rollout_index, disable=not (progress and primary),
                 desc=t.method, unit="rollout") as bar:
        stop_at = t.steps if max_updates is None else min(t.steps, rollout_index + max_updates)
        while rollout_index < stop_at and not stop.requested:
            clock = time.perf_counter()
            data, metrics = collect(rollout_index)
            metrics["timing/generate_and_score"] = time.perf_counter() - clock
            clock = time.perf_counter()
            rollout, prepared = prepare(data)
            metrics.update(prepared)
            metrics.update(update(rollout, rollout_index))
            metrics["timing/update"] = time.perf_counter() - clock
            if is_ppo and rl.kl_target is not None:
                kl_coef = online.adaptive_kl_coef(kl_coef, metrics["objective/kl"],
                                                  target=rl.kl_target, horizon=rl.kl_horizon,
                                                  n_steps=rows_per_rollout)
            rollout_index += 1
            bar.update(1)
            if rollout_index % t.log_every == 0 or rollout_index == t.steps:
                last = {k: float(v) for k, v in metrics.items()}
                last["rollouts_per_second"] = ((rollout_index - first)
                                               / (time.perf_counter() - start))
                metric_log.write("train", rollout_index, last)
                bar.set_postfix(reward=f"{last['reward']:.3f}")
            record = dict(dataclasses.asdict(loader), kl_coef=kl_coef)
            if t.checkpoint_every and rollout_index % t.checkpoint_every == 0:
                checkpoints.save(rollout_index, state, record)
        checkpoints.save(rollout_index, state, dict(dataclasses.asdict(loader), kl_coef=kl_coef))
    metric_log.close()
    if rollout_index < t.steps:
        log.warning("stopped at rollout %d of %d: checkpoint written, continue with --resume",
                    rollout_index, t.steps)
        return last
    # every process gathers; the first one writes
    model = models.model(*gather_to_host((state.params, frozen._replace(reference=None))))
    if primary:
        export(cfg, policy_of(model), out, tokenizer)
        if is_ppo:
            export(cfg, model.value, out, tokenizer, name="value_model")
    return last
