"""Multi-turn rollouts in the online loop: `rl.environment` or `rl.tools` make each sample a
trajectory of `rl.max_turns` model turns and the environment's replies (`align_jax.multiturn`),
laid out as one completion whose environment tokens are in the context but carry no loss.

Reward functions see `completions` = each trajectory's last model turn, `completion_ids` = the
model's tokens of all its turns, and the columns `trajectory` (the decoded text after the prompt,
observations included) and `environment_reward` (the sum of the environment's step rewards, None
if it gave none), which the reward "environment" returns.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from align_jax import envs, multiturn, rewards
from align_jax.config import ConfigError, RunConfig
from align_jax.data import agentic, default_buckets
from align_jax.sampling import encode_prompts

# the names `rl.environment` and `rl.tools` may use besides 'module:function'
ENVIRONMENTS = {"guess_number": agentic.GuessNumber}
TOOLS = {"calculator": agentic.calculator}


def multi_turn(cfg: RunConfig) -> bool:
    return cfg.rl.environment is not None or bool(cfg.rl.tools)


def check_multi_turn(cfg: RunConfig) -> None:
    """ConfigError naming the key for a multi-turn setting that cannot run."""
    rl = cfg.rl
    if rl.environment is not None and rl.tools:
        raise ConfigError("rl.environment and rl.tools are both set: give the tools to the "
                          "environment, or use rl.tools alone (each sample a ToolEnvironment)")
    if rl.max_turns < 1 or (rl.rollout_tokens is not None and rl.rollout_tokens < 1):
        raise ConfigError(f"rl.max_turns={rl.max_turns} and rl.rollout_tokens="
                          f"{rl.rollout_tokens} must be >= 1")
    if not multi_turn(cfg):
        if rl.max_turns > 1:
            raise ConfigError(f"rl.max_turns={rl.max_turns} needs rl.environment or rl.tools "
                              "to answer the turns")
        return
    if cfg.sweep.field is not None:
        raise ConfigError(f"sweep.field={cfg.sweep.field}: a sweep's members sample as lanes of "
                          "one program, which multi-turn rollouts (rl.environment, rl.tools) "
                          "do not")
    if rl.soft_overlong_cache:
        raise ConfigError("rl.soft_overlong_cache penalises a completion's length against "
                          "rl.max_new_tokens, which bounds each turn, not a trajectory; it is "
                          "refused with rl.environment or rl.tools")
    environment_factory(cfg)  # names that resolve, tools the model can be told about


def environment_factory(cfg: RunConfig) -> Callable[[], envs.Environment] | None:
    """A callable that makes one sample's environment, or None for single-turn rollouts."""
    rl = cfg.rl
    key = "rl.tools" if rl.tools else "rl.environment"
    try:
        if rl.tools:
            tools = [rewards.resolve(name, TOOLS, "tool") for name in rl.tools]
            for fn in tools:
                envs.tool_schema(fn)  # a tool the model cannot be told about fails here
            return lambda: envs.ToolEnvironment(tools, timeout=rl.tool_timeout)
        if rl.environment is None:
            return None
        return rewards.resolve(rl.environment, ENVIRONMENTS, "environment")
    except ValueError as e:  # envs.ToolError too
        raise ConfigError(f"{key}: {e}") from None


def tool_schemas(cfg: RunConfig) -> list[dict] | None:
    """The JSON schemas of `rl.tools` for the chat template to render in the prompts."""
    return [envs.tool_schema(rewards.resolve(name, TOOLS, "tool")) for name in cfg.rl.tools
            ] or None


def environment_reward(environment_reward: Sequence, **_) -> list:
    """The reward "environment": each trajectory's summed step rewards (None: not scored)."""
    return list(environment_reward)


def slots(cfg: RunConfig, prompt_width: int) -> int:
    """The cache slots of a rollout: the prompt's and `rl.rollout_tokens` after it."""
    rl = cfg.rl
    return prompt_width + (rl.rollout_tokens or 2 * rl.max_turns * rl.max_new_tokens)


def sample_turns(run, params, frozen, batch, key) -> dict:
    """One round of multi-turn trajectories for `batch`'s prompts, G per prompt, as the host
    arrays and text `rl.sample_round` gives for single-turn rollouts, plus `model_mask`, `turns`
    and the tool counts."""
    cfg, session, G = run.session.cfg, run.session, run.sampling.num_samples
    N = batch.ids_BxP.shape[0]
    rows = [{k: v[i] for k, v in batch.columns.items()} for i in range(N) for _ in range(G)]
    environments = [run.environment() for _ in rows]
    prompts = multiturn.reset_prompts(environments, rows, G)
    ids, mask = batch.ids_BxP, batch.mask_BxP
    if prompts is not None:
        ids, mask = (np.asarray(x) for x in encode_prompts(
            session.tokenizer, prompts, pad_token_id=session.pad_id,
            buckets=default_buckets(cfg.data.max_length), tools=tool_schemas(cfg)))
    trajectories = multiturn.rollout(
        run.turns(params, frozen), session.tokenizer, environments,
        *run.place_prompts((ids, mask), False), key, num_samples=G, max_turns=cfg.rl.max_turns,
        slots=slots(cfg, ids.shape[1]), conversational=not isinstance(rows[0]["prompt"], str),
        stop_ids=run.sampling.stop_token_ids)
    part = multiturn.layout(trajectories, session.pad_id,
                            default_buckets(slots(cfg, 0), smallest=8))
    tooled = [e for e in environments if isinstance(e, envs.ToolEnvironment)]
    if tooled:
        part["tool_calls"] = np.array([e.calls for e in tooled])
        part["tool_failures"] = np.array([e.failures for e in tooled])
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    columns["trajectory"] = [session.tokenizer.decode(t.ids, skip_special_tokens=True)
                             for t in trajectories]
    columns["environment_reward"] = [t.reward for t in trajectories]
    return dict(part, prompt_ids=np.repeat(ids, G, axis=0), prompt_mask=np.repeat(mask, G, axis=0),
                prompts=(prompts and [p for p in prompts for _ in range(G)])
                or [r["prompt"] for r in rows],
                texts=[t.text for t in trajectories], columns=columns)
