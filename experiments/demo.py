"""The demo: SFT, then DPO on the model's own samples labelled by the known reward.

On the synthetic arithmetic task ("What is 37+45?", answered as <think>…</think><answer>…</answer>):
1. SFT a tiny Llama-style model from scratch (`configs/sft_arithmetic.yaml`).
2. Sample 4 completions per training prompt from the SFT model, score them with the true reward
   (`arithmetic_accuracy`), and keep one (right, wrong) pair per prompt: an on-policy preference
   dataset in TRL's format, written to `pairs.jsonl`.
3. DPO from the SFT model, with the SFT model as reference (`configs/dpo_arithmetic.yaml`), twice:
   plain DPO, and DPO plus the NLL of the chosen answers (RPO, Pang et al. 2024, "Iterative
   Reasoning Preference Optimization"), which keeps the chosen answers' likelihood from falling.
After each stage the policy answers 256 fresh problems, greedy and sampled (T = 1); the table
reports accuracy, format reward, KL(π ‖ π_SFT) estimated on the sampled completions, mean length
and wall time. Writes `report.md`, `curves.png` and the runs' own outputs under `--out`.

Run: python experiments/demo.py [--out runs/demo] [--sft-steps 600] [--dpo-steps 150]
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

from align_jax import ops, rewards
from align_jax.config import load_config
from align_jax.data import collate, encode
from align_jax.data import synthetic as syn
from align_jax.data.tiny_tokenizer import tiny_tokenizer
from align_jax.models import load_pretrained
from align_jax.sampling import SamplingConfig, generate
from align_jax.train import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).parents[1]
COLORS = {"sft": "C0", "dpo": "C1", "rpo": "C2"}


def sample(model, tokenizer, prompts, *, num_samples: int, greedy: bool, seed: int, max_new_tokens: int = 40):
    """Completions (texts), their sampler log-probs and token arrays, for prompt-only rows."""
    encoded = encode(prompts, tokenizer, kind="prompt_only")
    batch = collate(encoded.examples, "prompt_only", (64,), tokenizer.pad_token_id)
    config = SamplingConfig(max_new_tokens=max_new_tokens, num_samples=num_samples, greedy=greedy,
                            stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    out = generate(model, batch.ids_BxP, batch.mask_BxP, jax.random.key(seed), config)
    texts = [tokenizer.decode(np.asarray(ids)[np.asarray(mask)], skip_special_tokens=True)
             for ids, mask in zip(out.ids_BxN, out.mask_BxN)]
    return texts, out, batch


def kl_to(model, reference, out, batch, num_samples: int) -> float:
    """Mean over sampled completions of Σ_t log π(y_t) − log π_ref(y_t) (the k1 estimate of the
    sequence-level KL(π ‖ π_ref)); π's log-probs are the sampler's, π_ref's a teacher-forced pass."""
    prompt_ids = jnp.repeat(batch.ids_BxP, num_samples, axis=0)
    prompt_mask = jnp.repeat(batch.mask_BxP, num_samples, axis=0)
    ids = jnp.concatenate([prompt_ids, out.ids_BxN], axis=1)
    mask = jnp.concatenate([prompt_mask, out.mask_BxN], axis=1)
    P = prompt_ids.shape[1]
    ref_logps = ops.token_logps(reference(ids, mask)[:, P - 1:-1], out.ids_BxN)
    return float(jnp.mean(ops.masked_sum(out.logps_BxN - ref_logps, out.mask_BxN, axis=1)))


def evaluate(model, sft_model, tokenizer, problems, stage: str, seconds: float) -> dict:
    greedy, _, _ = sample(model, tokenizer, problems, num_samples=1, greedy=True, seed=0)
    sampled, out, batch = sample(model, tokenizer, problems, num_samples=4, greedy=False, seed=1)
    answers = [a for a in problems["answer"] for _ in range(4)]
    return {
        "stage": stage,
        "accuracy (greedy)": np.mean(rewards.accuracy(greedy, problems["answer"])),
        "accuracy (T=1)": np.mean(rewards.accuracy(sampled, answers)),
        "format (T=1)": np.mean(rewards.think_format(sampled)),
        "KL to SFT (T=1)": kl_to(model, sft_model, out, batch, 4),
        "mean length": float(jnp.mean(out.lengths_B)),
        "wall time (s)": seconds,
    }


def on_policy_pairs(model, tokenizer, prompts, path: Path, seed: int) -> int:
    """Sample 4 completions per prompt, keep one (right, wrong) pair each, write TRL-format JSONL."""
    texts, _, _ = sample(model, tokenizer, prompts, num_samples=4, greedy=False, seed=seed)
    by_prompt = {i: texts[4 * i: 4 * i + 4] for i in range(len(prompts))}
    pairs = syn.label_pairs(prompts.add_column("index", list(range(len(prompts)))),
                            lambda row, rng, n: by_prompt[row["index"]], rewards.accuracy, seed=seed, beta=None)
    pairs = pairs.remove_columns(["index"]) if "index" in pairs.column_names else pairs
    pairs.to_json(str(path), lines=True)
    return len(pairs)


def curves(out: Path):
    """SFT loss; DPO's and RPO's chosen log-probs and reward accuracy (train solid, eval dashed)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    panels = ((axes[0], "loss", ("sft",)), (axes[1], "logps/chosen", ("dpo", "rpo")),
              (axes[2], "rewards/accuracies", ("dpo", "rpo")))
    for ax, key, stages in panels:
        for stage in stages:
            rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
            for split, style in (("train", "-"), ("eval", "o--")):
                points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
                if points:
                    ax.plot(*zip(*points), style, color=COLORS[stage], label=f"{stage.upper()} {split}")
        ax.set(title=key, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--dpo-steps", type=int, default=120)
    parser.add_argument("--pair-prompts", type=int, default=1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    for stage in ("sft", "dpo", "rpo"):  # the demo owns these runs: start them afresh
        shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    sft_config = load_config(ROOT / "configs/sft_arithmetic.yaml", [f"train.steps={args.sft_steps}",
                                                                    f"out_dir={out / 'sft'}"])
    task = {k: v for k, v in sft_config.data.synthetic_args.items() if k in ("digits", "operators")}
    problems = syn.arithmetic(256, seed=12345, **task)  # fresh draws (another seed) from the task's problems

    start = time.perf_counter()
    train(sft_config)
    sft_seconds = time.perf_counter() - start
    sft = load_pretrained(out / "sft" / "model")
    rows = [evaluate(sft, sft, tokenizer, problems, "SFT", sft_seconds)]

    start = time.perf_counter()
    n_pairs = on_policy_pairs(sft, tokenizer, syn.arithmetic(args.pair_prompts, seed=7, **task), out / "pairs.jsonl",
                              seed=7)
    pair_seconds = time.perf_counter() - start
    for stage, label, rpo in (("dpo", "SFT → DPO", "null"), ("rpo", "SFT → DPO + NLL (RPO)", "1.0")):
        start = time.perf_counter()
        train(load_config(ROOT / "configs/dpo_arithmetic.yaml", [
            f"train.steps={args.dpo_steps}", f"model.path={out / 'sft' / 'model'}", f"data.train={out / 'pairs.jsonl'}",
            f"loss.rpo_alpha={rpo}", f"out_dir={out / stage}"]))
        rows.append(evaluate(load_pretrained(out / stage / "model"), sft, tokenizer, problems, label,
                             pair_seconds + time.perf_counter() - start))

    header = list(rows[0])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r["stage"] if k == "stage" else f"{r[k]:.3f}" if k != "wall time (s)" else f"{r[k]:.0f}"
                          for k in header) + " |" for r in rows])
    curves(out)
    report = (f"# align_jax demo: SFT then DPO on synthetic arithmetic\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\n"
              f"{n_pairs} on-policy pairs from {args.pair_prompts} prompts; {args.sft_steps} SFT and "
              f"{args.dpo_steps} steps of each DPO run; evaluation on 256 fresh draws of the task's problems (seed 12345).\n\n{table}\n\n![curves](curves.png)\n")
    (out / "report.md").write_text(report)
    print("\n" + table + f"\n\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    main()
