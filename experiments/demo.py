"""The demo: SFT, then three ways to align from it — RLHF (reward model + PPO), DPO, and GRPO.

On the synthetic arithmetic task ("What is 7*8?", answered as <think>…</think><answer>…</answer>),
whose true reward is known: accuracy + ½ · format (`rewards.accuracy`, `rewards.think_format`).
1. SFT a tiny Llama-style model from scratch (`configs/sft_arithmetic.yaml`).
2. Sample 4 completions per training prompt from the SFT model, score them with the true reward,
   and keep one (better, worse) pair per prompt: an on-policy preference dataset in TRL's format,
   written to `pairs.jsonl`.
3. Three branches from the SFT model, each with the SFT model as reference:
   - RLHF: a Bradley-Terry reward model on the pairs (`configs/reward_arithmetic.yaml`, batches
     of 16), then PPO against it with a critic initialised from it (`configs/ppo_arithmetic.yaml`,
     2 PPO epochs per rollout to fit the demo's time);
   - DPO on the pairs, plus the NLL of the chosen answers (RPO, Pang et al. 2024), which keeps
     the chosen answers' likelihood from falling (`configs/dpo_arithmetic.yaml`, batches of 16);
   - GRPO on the true reward itself (`configs/grpo_arithmetic.yaml`).
After each stage the policy answers 256 fresh problems, greedy and sampled (T = 1); the table
reports accuracy, format reward, KL(π ‖ π_SFT) estimated on the sampled completions, mean length,
the completions each branch drew from a policy to train (the pairs' 4 per prompt, and each online
rollout's) and wall time. Writes `report.md`, `curves.png` and the runs' own outputs under `--out`.

Run: python experiments/demo.py [--out runs/demo] [--sft-steps 400] [--rm-steps 100]
     [--dpo-steps 120] [--ppo-rollouts 20] [--grpo-rollouts 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from align_jax import rewards
from align_jax.config import load_config
from align_jax.data import collate, encode
from align_jax.data import synthetic as syn
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.hostmem import retain_freed_memory
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate, sequence_kl
from align_jax.train import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).parents[1]
COLORS = {"sft": "C0", "ppo": "C1", "dpo": "C2", "grpo": "C3"}
STAGES = ("sft", "reward", "ppo", "dpo", "grpo")


def sample(model, tokenizer, prompts, *, num_samples: int, greedy: bool, seed: int,
           max_new_tokens: int = 40):
    """Completions (texts), their sampler log-probs and token arrays, for prompt-only rows."""
    encoded = encode(prompts, tokenizer, kind="prompt_only")
    batch = collate(encoded.examples, "prompt_only", (64,), tokenizer.pad_token_id)
    config = SamplingConfig(max_new_tokens=max_new_tokens, num_samples=num_samples, greedy=greedy,
                            stop_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id)
    out = generate(model, batch.ids_BxP, batch.mask_BxP, jax.random.key(seed), config)
    texts = [tokenizer.decode(np.asarray(ids)[np.asarray(mask)], skip_special_tokens=True)
             for ids, mask in zip(out.ids_BxC, out.mask_BxC)]
    return texts, out, batch


def evaluate(model, sft_model, tokenizer, problems, stage: str, seconds: float,
             samples: int) -> dict:
    greedy, _, _ = sample(model, tokenizer, problems, num_samples=1, greedy=True, seed=0)
    sampled, out, batch = sample(model, tokenizer, problems, num_samples=4, greedy=False, seed=1)
    answers = [a for a in problems["answer"] for _ in range(4)]
    return {
        "stage": stage,
        "accuracy (greedy)": np.mean(rewards.accuracy(greedy, problems["answer"])),
        "accuracy (T=1)": np.mean(rewards.accuracy(sampled, answers)),
        "format (T=1)": np.mean(rewards.think_format(sampled)),
        "KL to SFT (T=1)": float(np.mean(sequence_kl(sft_model, batch.ids_BxP, batch.mask_BxP, out,
                                                     num_samples=4))),
        "mean length": float(jnp.mean(out.lengths_B)),
        "samples drawn": samples,
        "wall time (s)": seconds,
    }


def rollout_samples(cfg) -> int:
    """Completions an online run draws from its policy: rollouts × prompts × samples per prompt."""
    return cfg.train.steps * cfg.train.batch_size * cfg.rl.num_generations


def true_reward(completions, answer, **_) -> list[float]:
    """accuracy + ½ · format: what GRPO is trained on, what labels the pairs, what the table
    reports."""
    return [a + 0.5 * f for a, f in zip(rewards.accuracy(completions, answer),
                                        rewards.think_format(completions))]


def on_policy_pairs(model, tokenizer, prompts, path: Path, seed: int) -> int:
    """Sample 4 completions per prompt, keep one (better, worse) pair each by the true reward (pairs
    with an empty completion are left out), write TRL-format JSONL."""
    texts, _, _ = sample(model, tokenizer, prompts, num_samples=4, greedy=False, seed=seed)
    by_prompt = {i: texts[4 * i: 4 * i + 4] for i in range(len(prompts))}
    pairs = syn.label_pairs(prompts.add_column("index", list(range(len(prompts)))),
                            lambda row, rng, n: by_prompt[row["index"]], true_reward, seed=seed,
                            beta=None)
    pairs = pairs.filter(lambda row: row["chosen"].strip() and row["rejected"].strip())
    pairs.to_json(str(path), lines=True)
    return len(pairs)


def _series(out: Path, stage: str, key: str, split: str = "train"):
    rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]


def curves(out: Path):
    """SFT loss; the true reward of GRPO's and PPO's training rollouts; the reward model's score and
    the KL penalty under PPO; DPO's implicit-reward accuracy (train solid, eval dashed)."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    axes[0].plot(*zip(*_series(out, "sft", "loss")), color=COLORS["sft"], label="SFT train")
    axes[0].plot(*zip(*_series(out, "sft", "loss", "eval")), "o--", color=COLORS["sft"],
                 label="SFT eval")
    for stage in ("grpo", "ppo"):
        acc, fmt = (_series(out, stage, "rewards/accuracy/mean"),
                    _series(out, stage, "rewards/format/mean"))
        axes[1].plot([s for s, _ in acc], [a + 0.5 * f for (_, a), (_, f) in zip(acc, fmt)],
                     color=COLORS[stage], label=stage.upper())
    axes[2].plot(*zip(*_series(out, "ppo", "objective/scores")), color=COLORS["ppo"],
                 label="reward-model score")
    axes[2].plot(*zip(*_series(out, "ppo", "objective/kl")), "--", color=COLORS["ppo"],
                 label="KL(π‖π_SFT)")
    for split, style in (("train", "-"), ("eval", "o--")):
        axes[3].plot(*zip(*_series(out, "dpo", "rewards/accuracies", split)), style,
                     color=COLORS["dpo"], label=f"DPO {split}")
    titles = ("SFT loss", "true reward of training samples", "PPO", "DPO rewards/accuracies")
    for ax, title, unit in zip(axes, titles, ("step", "rollout", "rollout", "step")):
        ax.set(title=title, xlabel=unit)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--dpo-steps", type=int, default=120)
    parser.add_argument("--rm-steps", type=int, default=100)
    parser.add_argument("--ppo-rollouts", type=int, default=20)
    parser.add_argument("--grpo-rollouts", type=int, default=30)
    parser.add_argument("--pair-prompts", type=int, default=1024)
    args = parser.parse_args(argv)
    retain_freed_memory()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    for stage in STAGES:  # the demo owns these runs: start them afresh
        shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    sft_dir = out / "sft" / "model"
    config = lambda name, *overrides: load_config(ROOT / "configs" / name, [  # noqa: E731
        f"model.path={sft_dir}", *overrides])
    sft_config = load_config(ROOT / "configs/sft_arithmetic.yaml", [f"train.steps={args.sft_steps}",
                                                                    f"out_dir={out / 'sft'}"])
    task = {k: v for k, v in sft_config.data.synthetic_args.items() if k in ("digits", "operators")}
    # fresh draws (another seed) from the task's problems
    problems = syn.arithmetic(256, seed=12345, **task)

    start = time.perf_counter()
    train(sft_config)
    sft_seconds = time.perf_counter() - start
    sft = load_pretrained(sft_dir)
    rows = [evaluate(sft, sft, tokenizer, problems, "SFT", sft_seconds, 0)]

    start = time.perf_counter()
    n_pairs = on_policy_pairs(sft, tokenizer, syn.arithmetic(args.pair_prompts, seed=7, **task),
                              out / "pairs.jsonl", seed=7)
    if n_pairs == 0:
        raise SystemExit(f"no preference pairs: the SFT model's 4 samples tied on reward for all "
                         f"{args.pair_prompts} prompts; train SFT longer (--sft-steps, now "
                         f"{args.sft_steps}) or use more --pair-prompts")
    pair_seconds, pair_samples = time.perf_counter() - start, 4 * args.pair_prompts
    pairs = f"data.train={out / 'pairs.jsonl'}"

    start = time.perf_counter()
    train(config("reward_arithmetic.yaml", pairs, f"train.steps={args.rm_steps}",
                 "train.batch_size=16", "train.eval_batches=8", f"out_dir={out / 'reward'}"))
    rm_accuracy = _series(out, "reward", "accuracy", "eval")[-1][1]
    ppo = config("ppo_arithmetic.yaml", f"rl.reward_model={out / 'reward' / 'model'}",
                 "rl.num_iterations=2", f"train.steps={args.ppo_rollouts}",
                 f"out_dir={out / 'ppo'}")
    train(ppo)
    rows.append(evaluate(load_pretrained(out / "ppo" / "model"), sft, tokenizer, problems,
                         f"SFT → reward model (held-out pair accuracy {rm_accuracy:.2f}) → "
                         "PPO (RLHF)", pair_seconds + time.perf_counter() - start,
                         pair_samples + rollout_samples(ppo)))

    start = time.perf_counter()
    train(config("dpo_arithmetic.yaml", pairs, f"train.steps={args.dpo_steps}",
                 "train.batch_size=16", f"out_dir={out / 'dpo'}"))
    rows.append(evaluate(load_pretrained(out / "dpo" / "model"), sft, tokenizer, problems,
                         "SFT → DPO + NLL (RPO)", pair_seconds + time.perf_counter() - start,
                         pair_samples))

    start = time.perf_counter()
    grpo = config("grpo_arithmetic.yaml", f"train.steps={args.grpo_rollouts}",
                  f"out_dir={out / 'grpo'}")
    train(grpo)
    rows.append(evaluate(load_pretrained(out / "grpo" / "model"), sft, tokenizer, problems,
                         "SFT → GRPO", time.perf_counter() - start, rollout_samples(grpo)))

    header = list(rows[0])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r["stage"] if k == "stage"
                          else f"{r[k]:.0f}" if k in ("samples drawn", "wall time (s)")
                          else f"{r[k]:.3f}" for k in header) + " |" for r in rows])
    curves(out)
    report = (f"# align_jax demo: SFT, then RLHF (PPO), DPO and GRPO on synthetic arithmetic\n\n"
              f"{__doc__.split(chr(10) + chr(10))[1]}\n\n"
              f"{n_pairs} on-policy pairs from {args.pair_prompts} prompts; {args.sft_steps} SFT "
              f"steps, {args.rm_steps} reward-model steps, {args.dpo_steps} DPO steps, "
              f"{args.ppo_rollouts} PPO and {args.grpo_rollouts} GRPO rollouts; evaluation on 256 "
              f"fresh draws of the task's problems (seed 12345). Wall times of the "
              f"PPO and DPO rows include sampling the pairs, and PPO's the reward model.\n\n"
              f"{table}\n\n![curves](curves.png)\n")
    (out / "report.md").write_text(report)
    print("\n" + table + f"\n\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    main()
