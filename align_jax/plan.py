"""Will a run fit, and how fast can it go? Ahead-of-time compilation for a TPU slice or GPU node.

`plan(cfg, "v5e:2x2")` (or `"h100:8"`) builds the run's jitted programs from its config alone —
shapes from `model.path`'s `config.json` (no weights), `train.batch_size`, `data.max_length`,
`rl.max_new_tokens`, `rl.num_generations`, micro-batches and the mesh; no data is read — and
compiles each one with XLA for compile-only devices of the topology (`align_jax.topology`), on any
host. Per program and device it reports the compiler's memory (arguments,
outputs, temporaries, peak against the chip's HBM), the named inputs counted by hand from their
shardings (parameters, optimizer state, reference weights, batch), the FLOPs and bytes of its
matrix products (`matmul_cost`, split evenly over the devices), and the roofline time
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) with the MFU it implies.

Shapes are the largest the run can meet: sequences padded to the largest bucket, DPO's packed
pairs to T = L + K with K = L, rollouts to `data.max_length` prompt and `rl.max_new_tokens`
completion tokens; the sampler's cost is that of all `rl.max_new_tokens` decode steps.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from align_jax import ops, sampling
from align_jax.config import ConfigError, RunConfig
from align_jax.data import (
    PackedPairs,
    PreferenceBatch,
    SequenceBatch,
    UnpairedBatch,
    default_buckets,
)
from align_jax.models import DecoderConfig, init_cache, read_config
from align_jax.models.decoder import remat_policy
from align_jax.models.lora import TRAINABLE
from align_jax.models.registry import config_from_init
from align_jax.topology import GiB, Target, target
from align_jax.train import methods, online, sweep
from align_jax.train.host import compute_dtype, decoder_factory, frozen_params
from align_jax.train.mesh import (
    BATCH_AXES,
    batch_sharding,
    make_mesh,
    param_shardings,
    replicated,
)
from align_jax.train.models import Frozen, Models
from align_jax.train.offline import step_functions
from align_jax.train.rollout import (
    Sampled,
    jit_prepare_rollout,
    jit_update_rollout,
    prepare_rollout,
    rollout_optimizer,
)
from align_jax.train.state import (
    TrainState,
    fresh_state,
    learning_rate,
    make_optimizer,
    state_shardings,
)
from align_jax.train.step import jit_train_step, make_train_step


@dataclasses.dataclass
class Program:
    """One compiled program; every byte and FLOP figure is per device."""

    name: str
    # bytes of each named input group (params, optimizer, base: a LoRA run's frozen base,
    # reference: 0 when it is that base, reward_model, batch), counted
    # from its shapes and shardings, and the sampler's KV cache, one of its temporaries
    inputs: dict[str, int]
    compile_seconds: float
    fits: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0  # outputs written into donated inputs
    temp_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0  # arguments + outputs − aliased + temporaries + code
    flops: float = 0.0  # what the chip executes, recomputation included
    model_flops: float = 0.0  # the same program without remat or a chunked head
    bytes_accessed: float = 0.0
    roofline_seconds: float = 0.0
    mfu_at_roofline: float = 0.0  # model FLOPs / (roofline time × peak FLOP/s)
    error: str | None = None  # the compiler's message when the program does not fit
    needed_bytes: int | None = None  # what the compiler asked for (`_needed_bytes`), if it says
    # its largest buffers, when it does not fit
    largest: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Plan:
    topology: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    hbm_bytes_per_device: int
    peak_flops_per_device: float
    hbm_bandwidth_per_device: float
    programs: list[Program]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def to_json(self) -> dict[str, Any]:
        """The plan as one JSON object (`align-jax plan --json`)."""
        train = self.programs[0]
        return dict(dataclasses.asdict(self), fits=self.fits,
                    compile_seconds=sum(p.compile_seconds for p in self.programs),
                    peak_bytes_per_device=max(p.peak_bytes for p in self.programs),
                    flops_per_device=train.flops, roofline_step_seconds=train.roofline_seconds)


class Spec(NamedTuple):
    """A program to compile: its jitted function, abstract arguments, named input groups, and how
    many times its while loop runs (the sampler's decode steps) at most."""

    name: str
    fn: Callable
    args: tuple
    inputs: dict[str, Any]
    loop_trips: int = 1


def device_bytes(tree) -> int:
    """Bytes on one device of abstract arrays carrying shardings (the largest shard of each)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "sharding")]
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves))


def _placed(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)


def _arrays(mesh: Mesh, **shapes) -> dict[str, jax.ShapeDtypeStruct]:
    """Batch arrays split over the batch axes: name=(shape, dtype)."""
    return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh))
            for k, (s, d) in shapes.items()}


def _decoder_config(cfg: RunConfig, path: str | None) -> DecoderConfig:
    path = path or cfg.model.path
    try:
        if path is not None:
            return read_config(path)
        return config_from_init(cfg.model.init)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def _abstract_params(make_model, mesh: Mesh):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))
    return graphdef, _placed(params, param_shardings(params, mesh))


def _frozen(params, cfg: RunConfig, mesh: Mesh):
    """A frozen model's parameters as the run holds them (`host.frozen_params`), sharded."""
    cast = jax.eval_shape(lambda p: frozen_params(p, cfg), params)
    return _placed(cast, param_shardings(cast, mesh))


def _abstract_models(cfg: RunConfig, mesh: Mesh, tx, make_model, make_base):
    """(models, train state, its shardings, frozen parameters) as `train.models.init_models`
    makes them, abstract: every parameter trained, or LoRA adapters over the frozen base."""
    if cfg.model.lora is None:
        graphdef, params = _abstract_params(make_model, mesh)
        state, shardings = _abstract_state(params, tx, mesh)
        return Models(graphdef), state, shardings, Frozen()
    graphdef, adapters, base = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))),
                                         TRAINABLE, ...)
    state, shardings = _abstract_state(_placed(adapters, param_shardings(adapters, mesh)), tx,
                                       mesh)
    base = jax.eval_shape(lambda b: ops.cast_floating(b, compute_dtype(cfg)), base)
    base_graphdef = nnx.split(nnx.eval_shape(lambda: make_base(nnx.Rngs(0))))[0]
    return (Models(graphdef, base_graphdef), state, shardings,
            Frozen(base=_placed(base, param_shardings(base, mesh))))


def _abstract_reference(cfg: RunConfig, mesh: Mesh, models: Models, frozen: Frozen, make_base,
                        part: str | None = None, with_scalar_head: bool = False
                        ) -> tuple[Models, Frozen]:
    """`train.models.add_reference`, abstract: the LoRA base with the adapters off, else the
    `reference` checkpoint's model or the starting weights' (of the trained model's `part`),
    frozen."""
    if frozen.base is not None and cfg.reference is None:
        graphdef = (None if part is None else
                    nnx.split(getattr(nnx.eval_shape(lambda: make_base(nnx.Rngs(0))), part))[0])
        return dataclasses.replace(models, base_is_reference=True, reference_part=part,
                                   reference_graphdef=graphdef), frozen
    if cfg.reference is not None:  # a plain decoder: no adapters, not quantized
        make, part = decoder_factory(cfg, _decoder_config(cfg, cfg.reference), mesh,
                                     with_scalar_head=with_scalar_head, adapters=False,
                                     quantized=False), None
    else:
        make = make_base
    whole = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    graphdef, params = nnx.split(getattr(whole, part) if part else whole)
    params = _placed(params, param_shardings(params, mesh))
    return (dataclasses.replace(models, reference_graphdef=graphdef),
            frozen._replace(reference=_frozen(params, cfg, mesh)))


def _abstract_state(params, tx, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """The train state's shapes with its shardings, and the shardings."""
    shardings = state_shardings(params, tx, mesh)
    return _placed(jax.eval_shape(lambda p: fresh_state(p, tx, 0), params), shardings), shardings


def _sequences(mesh, B, L) -> SequenceBatch:
    a = _arrays(mesh, ids=((B, L), jnp.int32), attention=((B, L), jnp.bool_),
                completion=((B, L), jnp.bool_))
    return SequenceBatch(a["ids"], a["attention"], a["completion"])


def offline_batch(cfg: RunConfig, mesh: Mesh):
    """The largest batch of the method's type the run can meet."""
    B, L = cfg.train.batch_size, max(cfg.data.buckets or default_buckets(cfg.data.max_length))
    method, loss = cfg.train.method, cfg.loss
    per_pair = _arrays(mesh, margin=((B,), jnp.float32), ref_chosen=((B,), jnp.float32),
                       ref_rejected=((B,), jnp.float32))
    margin = per_pair["margin"] if loss.margin_column else None
    refs = ((per_pair["ref_chosen"], per_pair["ref_rejected"]) if loss.precompute_ref_logps
            else (None, None))
    if method == "sft":
        return _sequences(mesh, B, L)
    if method == "kto":
        return UnpairedBatch(_sequences(mesh, B, L), _arrays(mesh, y=((B,), jnp.bool_))["y"],
                             _sequences(mesh, B, L))
    if method == "dpo" and cfg.data.share_prompt:
        T, C = 2 * L, L
        a = _arrays(mesh, ids=((B, T), jnp.int32), mask=((B, T), jnp.bool_),
                    seg=((B, T), jnp.int32), index=((B, 2, C), jnp.int32),
                    labels=((B, 2, C), jnp.int32), lmask=((B, 2, C), jnp.bool_))
        return PackedPairs(*a.values(), margin, *refs)
    return PreferenceBatch(_sequences(mesh, B, L), _sequences(mesh, B, L), margin, *refs)


def offline_specs(cfg: RunConfig, mesh: Mesh) -> list[Spec]:
    """The train step of sft, reward, the DPO family or KTO (a sweep's vmapped step), and DPO's
    reference pass when its log-probs are precomputed."""
    t = cfg.train
    config = _decoder_config(cfg, None)
    scalar = t.method == "reward"
    make_model = decoder_factory(cfg, config, mesh, with_scalar_head=scalar)
    make_base = decoder_factory(cfg, config, mesh, with_scalar_head=scalar, adapters=False)
    tx = make_optimizer(t)
    models, state, shardings, frozen = _abstract_models(cfg, mesh, tx, make_model, make_base)
    if methods.needs_reference(t.method, cfg.loss) or cfg.loss.precompute_ref_logps:
        models, frozen = _abstract_reference(cfg, mesh, models, frozen, make_base,
                                             with_scalar_head=scalar)
    batch = offline_batch(cfg, mesh)
    specs = []
    if cfg.loss.precompute_ref_logps:
        ref_fn = jax.jit(lambda f, b: methods.pair_logps(models.reference(f), b)[:2])
        specs.append(Spec("reference_logps", ref_fn,
                          (frozen, batch._replace(ref_chosen_logps_B=None,
                                                  ref_rejected_logps_B=None)),
                          dict(base=frozen.base, reference=_reference_bytes(models, frozen),
                               batch=batch)))
        models = dataclasses.replace(models, base_is_reference=False)
        frozen = frozen._replace(reference=None)
    step, _ = step_functions(cfg, methods.METHODS[t.method].loss, models, tx, learning_rate(t))
    names = sweep.members(cfg)
    if names is not None:  # the members' states stacked, as the run holds them
        shardings = sweep.stacked_shardings(shardings)
        state = _placed(jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(names), *x.shape),
                                                                    x.dtype), state),
                        shardings)
    jitted = jit_train_step(step, shardings, _shardings(frozen), mesh)
    specs.insert(0, Spec("train_step", jitted, (state, frozen, batch),
                         dict(params=state.params, optimizer=state.opt_state, base=frozen.base,
                              reference=_reference_bytes(models, frozen), batch=batch)))
    return specs


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _reference_bytes(models: Models, frozen: Frozen):
    """The reference's own parameters: none when it is the LoRA base with the adapters off."""
    return 0 if models.base_is_reference else frozen.reference


def _sampled(cfg: RunConfig, mesh: Mesh, rows: int) -> Sampled:
    """A rollout as the host places it for `prepare_rollout`: `rows` samples of
    `data.max_length` prompt and `rl.max_new_tokens` completion tokens."""
    P, C = cfg.data.max_length, cfg.rl.max_new_tokens
    a = _arrays(mesh, prompt=((rows, P), jnp.int32), prompt_mask=((rows, P), jnp.bool_),
                ids=((rows, C), jnp.int32), mask=((rows, C), jnp.bool_),
                model_mask=((rows, C), jnp.bool_), logps=((rows, C), jnp.float32),
                truncated=((rows,), jnp.bool_),
                rewards=((rows,), jnp.float32))
    return Sampled(*a.values())


def _kv_cache_bytes(cfg: RunConfig, config: DecoderConfig, mesh: Mesh) -> int:
    """The sampler's KV cache on one device, if split like the rollout's rows: every layer's keys
    and values for B = N·G rows of P + C slots, in the compute dtype."""
    rows = cfg.train.batch_size * cfg.rl.num_generations
    slots = cfg.data.max_length + cfg.rl.max_new_tokens
    cache = jax.eval_shape(lambda: init_cache(config, rows, slots, compute_dtype(cfg)))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    return total // (math.prod(mesh.shape[a] for a in BATCH_AXES))


def _online_models(cfg: RunConfig, mesh: Mesh, method: online.OnlineMethod, tx):
    """(models, state, shardings, frozen, the policy's config) of an online run, abstract: the
    policy, or PPO's policy + critic pair, and the reference when the method holds one."""
    policy_config = _decoder_config(cfg, None)
    make_model = decoder_factory(cfg, policy_config, mesh)
    make_base = decoder_factory(cfg, policy_config, mesh, adapters=False)
    if method.critic:
        value_config = _decoder_config(cfg, cfg.rl.critic or cfg.rl.reward_model)
        make_model = online.actor_critic(make_model, decoder_factory(
            cfg, value_config, mesh, with_scalar_head=True))
        make_base = online.actor_critic(make_base, decoder_factory(
            cfg, value_config, mesh, with_scalar_head=True, adapters=False))
    models, state, shardings, frozen = _abstract_models(cfg, mesh, tx, make_model, make_base)
    if method.reference(cfg.rl):
        models, frozen = _abstract_reference(cfg, mesh, models, frozen, make_base,
                                             "policy" if method.critic else None)
    return models, state, shardings, frozen, policy_config


def _scalar(mesh: Mesh, dtype) -> jax.ShapeDtypeStruct:
    """A replicated scalar argument: a PRNG key or PPO's KL coefficient."""
    return jax.ShapeDtypeStruct((), dtype, sharding=replicated(mesh))


def _generate_spec(cfg: RunConfig, mesh: Mesh, policy, policy_config: DecoderConfig) -> Spec:
    """The sampler over a rollout's prompts: prefill and `rl.max_new_tokens` decode steps."""
    t, rl = cfg.train, cfg.rl
    graphdef, params = nnx.split(policy)
    prompts = _arrays(mesh, ids=((t.batch_size, cfg.data.max_length), jnp.int32),
                      mask=((t.batch_size, cfg.data.max_length), jnp.bool_))
    key = _scalar(mesh, jax.random.key(0).dtype)
    config = sampling.SamplingConfig(max_new_tokens=rl.max_new_tokens,
                                     num_samples=rl.num_generations, temperature=rl.temperature,
                                     top_k=rl.top_k, top_p=rl.top_p, stop_token_ids=(2,))
    generate = jax.jit(lambda p, ids, mask, k: sampling.generate_params(
        graphdef, p, ids, mask, k, config=config))
    return Spec("generate", generate, (params, prompts["ids"], prompts["mask"], key),
                dict(params=params, kv_cache=_kv_cache_bytes(cfg, policy_config, mesh),
                     batch=prompts), loop_trips=rl.max_new_tokens)


def online_specs(cfg: RunConfig, mesh: Mesh) -> list[Spec]:
    """GRPO/PPO, the three programs of a rollout as the run compiles them (`train.rollout`): the
    update (μ passes × mini-batches over the rollout, scanned), the sampler, and the preparation
    (reference, reward-model and critic passes over the whole rollout, the method's targets)."""
    t, rl = cfg.train, cfg.rl
    method = online.ONLINE_METHODS[t.method]
    rows = t.batch_size * rl.num_generations
    if rows % (rl.mini_batches * t.micro_batches):
        raise ConfigError(f"rl.mini_batches={rl.mini_batches} × train.micro_batches="
                          f"{t.micro_batches} does not divide the rollout's {rows} rows")
    tx, schedule = rollout_optimizer(cfg)
    models, state, shardings, frozen, policy_config = _online_models(cfg, mesh, method, tx)
    frozen_shardings = _shardings(frozen)
    update = jit_update_rollout(
        lambda c: make_train_step(method.loss, models, tx, c, t.micro_batches, schedule), rl,
        mesh, shardings, frozen_shardings)
    sampled, kl_coef = _sampled(cfg, mesh, rows), _scalar(mesh, jnp.float32)
    rollout = jax.eval_shape(lambda *a: prepare_rollout(method, models, rl, *a)[0],
                             state.params, frozen, None, sampled, kl_coef)
    rollout = _placed(rollout, jax.tree.map(lambda _: batch_sharding(mesh), rollout))
    inputs = dict(params=state.params, optimizer=state.opt_state, base=frozen.base,
                  reference=_reference_bytes(models, frozen))
    specs = [Spec("update_rollout", update,
                  (state, frozen, rollout, _scalar(mesh, jax.random.key(0).dtype)),
                  dict(inputs, batch=rollout))]
    policy = models.model(state.params, frozen)
    specs.append(_generate_spec(cfg, mesh, policy.policy if method.critic else policy,
                                policy_config))
    reward_graphdef = reward_params = None
    if method.critic and rl.reward_model:
        make_reward_model = decoder_factory(cfg, read_config(rl.reward_model), mesh,
                                            with_scalar_head=True, adapters=False,
                                            quantized=False)
        reward_graphdef, reward_params = _abstract_params(make_reward_model, mesh)
        reward_params = _frozen(reward_params, cfg, mesh)
    prepare = jit_prepare_rollout(method, models, rl, mesh, shardings.params, frozen_shardings,
                                  reward_graphdef)
    specs.append(Spec("prepare_rollout", prepare,
                      (state.params, frozen, reward_params, sampled, kl_coef),
                      dict(inputs, optimizer=None, reward_model=reward_params, batch=sampled)))
    return specs


def _subjaxprs(eqn) -> list:
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                found.append(v)
    return found


def _where(eqn) -> str:
    """The innermost align_jax line that made an equation."""
    frames = eqn.source_info.traceback.frames if eqn.source_info.traceback else []
    for frame in frames:
        if "/align_jax/" in frame.file_name:
            return (f"{frame.file_name.rsplit('/align_jax/', 1)[1]}:{frame.line_num} "
                    f"({frame.function_name})")
    return "?"


def largest_arrays(spec: Spec, n: int = 5) -> list[str]:
    """The n largest arrays the program computes (global shapes, before sharding), with the
    operation and the line of align_jax that makes each: what to shrink when it does not fit."""
    sizes: dict[str, int] = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                if hasattr(v.aval, "shape") and hasattr(v.aval, "dtype"):
                    key = f"{v.aval.str_short()} from {eqn.primitive.name} at {_where(eqn)}"
                    sizes[key] = math.prod(v.aval.shape) * v.aval.dtype.itemsize
            for sub in _subjaxprs(eqn):
                walk(sub)

    walk(jax.make_jaxpr(spec.fn)(*spec.args).jaxpr)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
    return [f"{_gib(size)} GiB {key}" for key, size in top]


def matmul_cost(spec: Spec) -> tuple[float, float]:
    """FLOPs and bytes of the program's matrix products, over all devices: 2·|out|·|contracted|
    FLOPs for each dot_general, and the bytes of its operands and result (each read or written
    once: a lower bound on HBM traffic); a scan's body counts its length times, a while loop's
    `spec.loop_trips` times. (XLA's own cost analysis counts a loop body once.)"""

    def walk(jaxpr, times: int) -> tuple[float, float]:
        flops = nbytes = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (contracting, _), _ = eqn.params["dimension_numbers"]
                lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
                flops += times * 2 * math.prod(out.shape) * math.prod(lhs.shape[d]
                                                                      for d in contracting)
                nbytes += times * sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
                                      for v in (*eqn.invars, *eqn.outvars))
            inner = times * {"scan": eqn.params.get("length", 1),
                             "while": spec.loop_trips}.get(eqn.primitive.name, 1)
            for sub in _subjaxprs(eqn):
                sub_flops, sub_bytes = walk(sub, inner)
                flops, nbytes = flops + sub_flops, nbytes + sub_bytes
        return flops, nbytes

    return walk(jax.make_jaxpr(spec.fn)(*spec.args).jaxpr, 1)


def _needed_bytes(message: str) -> int | None:
    """What an out-of-memory compile asked for, as XLA:TPU words it: "the total memory required
    for HLO temporaries (42.57G) exceeds available HBM", or "Used 34.62G of 15.75G hbm"."""
    found = re.search(r"(?:temporaries \(|Used )([\d.]+)([KMGT])", message)
    return None if found is None else int(float(found[1]) * 1024 ** "KMGT".index(found[2]) * 1024)


def compile_spec(spec: Spec, counted: Spec, model: Spec, where: Target) -> Program:
    """Lower and compile one program; out-of-memory is a result, not an error. FLOPs and bytes
    are `matmul_cost` of `counted`, model FLOPs of `model`: the same program in variants."""
    inputs = {k: v if isinstance(v, int) else device_bytes(v) for k, v in spec.inputs.items()
              if v is not None}
    start = time.perf_counter()
    try:
        compiled = spec.fn.lower(*spec.args).compile()
    except Exception as e:  # XLA reports a program over HBM as RESOURCE_EXHAUSTED at compile time
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Program(spec.name, inputs, time.perf_counter() - start, fits=False,
                       error=str(e).split("\n")[0][:500], largest=largest_arrays(spec),
                       needed_bytes=_needed_bytes(str(e)))
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    flops, accessed = (x / len(where.devices) for x in matmul_cost(counted))
    model_flops = matmul_cost(model)[0] / len(where.devices)
    chip, share = where.chip, where.share
    peak_flops, bandwidth = chip.peak_flops * share, chip.hbm_bandwidth * share
    roofline = max(flops / peak_flops, accessed / bandwidth)
    fits = peak <= chip.hbm_bytes * share
    return Program(spec.name, inputs, seconds, fits=fits,
                   argument_bytes=memory.argument_size_in_bytes,
                   output_bytes=memory.output_size_in_bytes,
                   alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                   code_bytes=memory.generated_code_size_in_bytes, peak_bytes=peak, flops=flops,
                   model_flops=model_flops, bytes_accessed=accessed, roofline_seconds=roofline,
                   mfu_at_roofline=model_flops / (roofline * peak_flops) if roofline else 0.0,
                   largest=[] if fits else largest_arrays(spec))


def _with_model(cfg: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def cost_variants(cfg: RunConfig) -> tuple[RunConfig, RunConfig]:
    """The run whose programs' FLOPs are counted: the einsum attention a fused kernel replaces
    (`matmul_cost` cannot see inside a kernel); and the model's own, also without recomputation
    (remat, the chunked head's)."""
    counted = _with_model(cfg, attention="xla")
    return counted, _with_model(counted, remat="none", logits_chunk=None)


def plan(cfg: RunConfig, topology: str) -> Plan:
    """Compile every program of the run `cfg` for `topology`; see the module docstring."""
    where = target(topology)
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=where.devices,
                         expert=cfg.mesh.expert)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if cfg.train.batch_size % shards:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split over the mesh's "
                          f"{shards} batch shards (data × fsdp × expert)")
    loss_cfg = cfg.rl if cfg.train.method in ("grpo", "ppo") else cfg.loss
    methods.check_micro_batches(cfg.train.method, loss_cfg, cfg.train.micro_batches)
    if cfg.train.method in methods.METHODS:
        make_specs = offline_specs
    elif cfg.train.method in ("grpo", "ppo"):
        make_specs = online_specs
    else:
        raise ConfigError(f"train.method: {cfg.train.method!r} is not one of "
                          f"{sorted(methods.METHODS) + ['grpo', 'ppo']}")
    counted, model = cost_variants(cfg)
    programs = [compile_spec(*specs, where)
                for specs in zip(make_specs(cfg, mesh), make_specs(counted, mesh),
                                 make_specs(model, mesh))]
    chip, share = where.chip, where.share
    return Plan(topology, where.device_kind, len(where.devices), dict(mesh.shape),
                int(chip.hbm_bytes * share), chip.peak_flops * share, chip.hbm_bandwidth * share,
                programs)


def advice(cfg: RunConfig, result: Plan) -> list[str]:
    """What to change when a program does not fit, in the order to try it."""
    tips = []
    if cfg.model.logits_chunk is None and cfg.train.method != "reward":
        tips.append("model.logits_chunk=256 (the LM head over 256 positions at a time, forward and "
                    "backward: no [B, T, V] logits)")
    remat = remat_policy(cfg.model.remat)
    if remat in ("none", "dots", "dots_no_batch"):
        tips.append("model.remat=full (keep only each layer's input for the backward pass, "
                    "recompute the rest)")
    elif remat == "full":
        tips.append("model.remat=offload (keep each layer's input in host memory)")
    if cfg.mesh.fsdp < result.num_devices:
        tips.append(f"mesh.fsdp={result.num_devices} mesh.data=1 (shard parameters and optimizer "
                    "state over every device)")
    if (cfg.train.micro_batches
            < cfg.train.batch_size // max(result.mesh["data"] * result.mesh["fsdp"], 1)):
        tips.append(f"train.micro_batches={2 * cfg.train.micro_batches} (accumulate gradients over "
                    "smaller micro-batches)")
    tips.append("a larger topology, or a shorter data.max_length / rl.max_new_tokens")
    return tips


def _gib(n: float) -> str:
    return f"{n / GiB:.3g}"


def _input_cell(p: Program, group: str) -> str:
    """GiB of an input group; "base" where the reference is the LoRA base with adapters off."""
    if group not in p.inputs:
        return "-"
    if group == "reference" and p.inputs[group] == 0 and "base" in p.inputs:
        return "base"
    return _gib(p.inputs[group])


def format_plan(result: Plan) -> str:
    """A table of the programs, one row each."""
    head = (f"{result.topology}: {result.num_devices} × {result.device_kind}, "
            f"{_gib(result.hbm_bytes_per_device)} GiB HBM, "
            f"{result.peak_flops_per_device / 1e12:.0f} bf16 TFLOP/s, "
            f"{result.hbm_bandwidth_per_device / 1e9:.0f} GB/s per device; mesh "
            + " ".join(f"{k}={v}" for k, v in result.mesh.items()))
    groups = ("params", "optimizer", "base", "reference", "reward_model", "kv_cache", "batch")
    columns = ["program", *groups, "temporaries", "peak", "fits", "TFLOP", "compile s",
               "roofline s", "MFU"]
    rows = []
    for p in result.programs:
        named = [_input_cell(p, g) for g in groups]
        compiled = ([_gib(p.temp_bytes), _gib(p.peak_bytes)] if p.error is None
                    else ["-", "-" if p.needed_bytes is None else f">{_gib(p.needed_bytes)}"])
        cost = ([f"{p.flops / 1e12:.3f}", f"{p.compile_seconds:.1f}", f"{p.roofline_seconds:.4f}",
                 f"{p.mfu_at_roofline:.0%}"] if p.error is None
                else ["-", f"{p.compile_seconds:.1f}", "-", "-"])
        rows.append([p.name, *named, *compiled, "yes" if p.fits else "NO", *cost])
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = [head, "per device, GiB:", line(columns), *map(line, rows)]
    for p in result.programs:
        if not p.fits:
            out.append(f"{p.name} does not fit: {p.error or f'peak {_gib(p.peak_bytes)} GiB'}")
            out.extend(f"  {b}" for b in p.largest)
    return "\n".join(out)
