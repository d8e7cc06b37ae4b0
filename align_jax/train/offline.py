"""The host loop of an offline run (SFT, reward model, DPO family, KTO): it only moves data, logs
and checkpoints; every computation is a jitted pure step.

A run writes what every `Session` does, its reward model as `…ForSequenceClassification`. A sweep
(`sweep.field`, `sweep.values`) trains its members in one vmapped program (`sweep.py`) and writes
each one's metrics, TensorBoard events and model under `<field>=<value>/`; the checkpoints hold
the stacked state.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from align_jax.config import RunConfig
from align_jax.data import DataError, LoaderState, batches, bucket_width, collate, default_buckets
from align_jax.train import best, methods, sweep
from align_jax.train.host import (
    MetricLog,
    NonFiniteError,
    build_model,
    check_finite,
    gather_to_host,
)
from align_jax.train.mesh import shard_batch
from align_jax.train.models import Models, add_reference, drop_reference, init_models
from align_jax.train.session import Session
from align_jax.train.state import learning_rate, make_optimizer
from align_jax.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step

log = logging.getLogger(__name__)


def _attach_reference_logps(data, ref_fn, width: int, pad_id, buckets, share_prompt, mesh,
                            frozen):
    """Precompute: reference log-probs of every pair, once, in batches of `width`, stored on the
    examples."""
    rows = data.examples
    padded = rows + rows[: (-len(rows)) % width]
    local = width // jax.process_count()
    for start in range(0, len(rows), width):
        chunk = padded[start:start + width]
        mine = chunk[jax.process_index() * local:(jax.process_index() + 1) * local]
        batch = collate(mine, "preference", buckets, pad_id,
                        bucket_width(chunk, "preference", buckets, share_prompt), share_prompt)
        chosen, rejected = gather_to_host(ref_fn(frozen, shard_batch(batch, mesh)))
        for i, example in enumerate(chunk[: len(rows) - start]):
            example["ref_chosen_logps"], example["ref_rejected_logps"] = (float(chosen[i]),
                                                                          float(rejected[i]))


def step_functions(cfg: RunConfig, loss_fn, models: Models, tx, schedule):
    """(train step, eval step) of an offline run; with a sweep, vmapped over the members' stacked
    states, member k with `loss.<sweep.field>` = `sweep.values[k]`."""
    def make_step(loss_cfg):
        return make_train_step(loss_fn, models, tx, loss_cfg, cfg.train.micro_batches, schedule)

    def make_eval(loss_cfg):
        return make_eval_step(loss_fn, models, loss_cfg, cfg.train.micro_batches)

    if cfg.sweep.field is None:
        return make_step(cfg.loss), make_eval(cfg.loss)
    field, values = cfg.sweep.field, cfg.sweep.values
    return (sweep.vmap_members(make_step, cfg.loss, field, values, (0, None, None)),
            sweep.vmap_members(make_eval, cfg.loss, field, values, (0, None, None)))


def train_offline(cfg: RunConfig, *, resume: bool = False, progress: bool = True,
                  max_updates: int | None = None) -> dict:
    """Run an offline config to `train.steps` updates; return the last metrics (for a sweep,
    {member name: its last metrics}). Stopping, resuming and non-finite steps as `train.train`
    says: a non-finite step is checkpointed with the data position before its batch (a sweep,
    whose other members took the step, keeps its last periodic checkpoint instead)."""
    t = cfg.train
    methods.check_micro_batches(t.method, cfg.loss, t.micro_batches)
    names = sweep.members(cfg)
    session = Session.open(cfg, resume)
    mesh = session.mesh
    buckets = tuple(cfg.data.buckets or default_buckets(cfg.data.max_length))
    share_prompt = cfg.data.share_prompt and t.method == "dpo"
    train_data, eval_data = session.load_data(methods.METHODS[t.method].data_kind)
    log.info("data: %s", train_data.counts)
    for name, data in (("train", train_data), ("eval", eval_data)):
        if data is not None and len(data.examples) < t.batch_size:
            raise DataError(f"{data.source}: the {name} split has {len(data.examples)} rows after "
                            f"truncation, fewer than train.batch_size={t.batch_size}")

    best.check(t, eval_data is not None)
    tx, schedule = make_optimizer(t), learning_rate(t)
    models, state, shardings, frozen, frozen_shardings = init_models(
        cfg, mesh, tx, *build_model(cfg, mesh, with_scalar_head=t.method == "reward"))
    loss_fn = methods.METHODS[t.method].loss
    if methods.needs_reference(t.method, cfg.loss) or cfg.loss.precompute_ref_logps:
        models, frozen, frozen_shardings = add_reference(cfg, mesh, models, state, frozen,
                                                         frozen_shardings)
    if cfg.loss.precompute_ref_logps:
        if t.method != "dpo":
            raise ValueError("loss.precompute_ref_logps applies to train.method=dpo")
        ref_fn = jax.jit(lambda f, b: methods.pair_logps(models.reference(f), b)[:2])
        for data in filter(None, (train_data, eval_data)):
            _attach_reference_logps(data, ref_fn, t.batch_size, session.pad_id, buckets,
                                    share_prompt, mesh, frozen)
        # no reference model from here on
        models, frozen, frozen_shardings = drop_reference(models, frozen, frozen_shardings)

    train_fn, eval_fn = step_functions(cfg, loss_fn, models, tx, schedule)
    if names is not None:  # the members' states stacked on a leading axis, one lane each
        shardings = sweep.stacked_shardings(shardings)
        state = sweep.stack(state, len(names), shardings)
    train_step = jit_train_step(train_fn, shardings, frozen_shardings, mesh)
    eval_step = jit_eval_step(eval_fn, shardings.params, frozen_shardings, mesh)
    member_dirs = [session.out] if names is None else [session.out / name for name in names]

    loader = LoaderState()
    restored = session.checkpoints.restore(state, shardings)
    step = 0
    if restored is not None:
        state, loader = restored[0], LoaderState(**restored[1])
        # a sweep's members all take the same steps
        step = int(np.ravel(gather_to_host(state.step))[0])
        log.info("resumed from step %d (%s)", step, loader)

    def stream(data, **kwargs):
        return batches(data, batch_size=t.batch_size, pad_id=session.pad_id, buckets=buckets,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       share_prompt=share_prompt, **kwargs)

    def evaluate(step: int) -> list[dict[str, float]]:
        results = [gather_to_host(eval_step(state.params, frozen, shard_batch(b, mesh)))
                   for _, (_, b) in zip(range(t.eval_batches),
                                        stream(eval_data, seed=0, epochs=1))]
        means = by_member({k: np.mean([r[k] for r in results], axis=0) for k in results[0]},
                          names)
        for log_, mean in zip(metric_logs, means):
            log_.write("eval", step, mean)
        return means

    def export(members: list[int], name: str = "model") -> None:
        """Every process gathers the parameters; the first one writes each member's model."""
        params, host_frozen = gather_to_host((state.params, frozen._replace(reference=None)))
        for i in members:
            session.export(models.model(params if names is None else sweep.member(params, i),
                                        host_frozen), member_dirs[i], name)

    def evaluate_and_track(step: int) -> bool:
        """Evaluate into the members' last metrics and their best; whether to stop early."""
        for member_last, mean in zip(last, means := evaluate(step)):
            member_last.update({f"eval_{k}": v for k, v in mean.items()})
        if tracker is None:
            return False
        tracker.update(step, means, export)
        return tracker.stop(step)

    train_stream = stream(train_data, seed=t.seed, state=loader)
    first, last, start = step, [{} for _ in member_dirs], time.perf_counter()
    for d in member_dirs:
        d.mkdir(parents=True, exist_ok=True)
    metric_logs = [MetricLog(d, cfg, step) for d in member_dirs]
    tracker = (best.Tracker(t, member_dirs, session.checkpoints.resume, session.primary)
               if t.keep_best or t.early_stopping_patience else None)
    if eval_data is not None and t.eval_on_start and step == 0:
        evaluate(0)
    stopped_early = False
    with session.loop(step, progress=progress, max_updates=max_updates,
                      unit="step") as (stop, bar, stop_at):
        while step < stop_at and not stop.requested:
            before, (loader, host_batch) = loader, next(train_stream)
            state, metrics = train_step(state, frozen, shard_batch(host_batch, mesh))
            try:
                check_finite(metrics, step + 1, str(loader))
            except NonFiniteError:
                if names is None:
                    session.checkpoints.save(step, state, dataclasses.asdict(before))
                raise
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                last = by_member(gather_to_host(metrics), names)
                for log_, member_last in zip(metric_logs, last):
                    member_last["steps_per_second"] = (step - first) / (time.perf_counter() - start)
                    log_.write("train", step, member_last)
                bar.set_postfix(loss=" ".join(f"{m['loss']:.4f}" for m in last))
            if eval_data is not None and t.eval_every and step % t.eval_every == 0:
                stopped_early = evaluate_and_track(step)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                session.checkpoints.save(step, state, dataclasses.asdict(loader))
            if stopped_early:
                break
        session.checkpoints.save(step, state, dataclasses.asdict(loader))
        finished = stopped_early or session.finished(step, "step")
        if finished and eval_data is not None and not (t.eval_every and step % t.eval_every == 0):
            evaluate_and_track(step)
    for log_ in metric_logs:
        log_.close()
    if finished and t.keep_best:
        tracker.keep()
    elif finished:  # every process takes part in the gather; the first one writes
        export(list(range(len(member_dirs))))
    return last[0] if names is None else dict(zip(names, last))


def by_member(metrics: dict, names: list[str] | None) -> list[dict[str, float]]:
    """Host metrics → one dict of floats per member (one, without a sweep)."""
    if names is None:
        return [{k: float(v) for k, v in metrics.items()}]
    return [{k: float(v[i]) for k, v in metrics.items()} for i in range(len(names))]
