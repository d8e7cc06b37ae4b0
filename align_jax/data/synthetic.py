"""Synthetic tasks whose true reward is known, deterministic from a seed, needing nothing outside.

- **arithmetic**: "What is 37+45?" with an `answer` column; completions in the GRPO recipe's
  `<think>…</think><answer>…</answer>` format, scored by `rewards.accuracy` and
  `rewards.think_format`.
- **sentiment grammar**: reviews such as "the plot was not very good but the music was great ."
  over a small vocabulary; `sentiment_score` parses any text with the grammar
  score = Σ_adjectives (−1 if "not") · (intensifier) · value(adjective), the synthetic analogue of
  the DPO paper's IMDb task (prompt: a review's opening, reward: the sentiment of its continuation).
- **preference labelling**: from candidates and a true reward, TRL-format preference pairs
  (Bradley-Terry sampled, P(a ≻ b) = σ(β(r_a − r_b)), or deterministic) and unpaired labels, so
  reward models, DPO, KTO and friends can be measured against the truth.

Reward functions have TRL's signature (see `align_jax.rewards`).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import datasets
import numpy as np

from align_jax.data import agentic
from align_jax.rewards import accuracy, completion_text

FORMAT_INSTRUCTION = ("Think inside <think></think>, then give only the number inside "
                      "<answer></answer>.")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _prompt(text: str, conversational: bool):
    if conversational:
        return [{"role": "system", "content": FORMAT_INSTRUCTION},
                {"role": "user", "content": text}]
    return f"{FORMAT_INSTRUCTION}\n{text}\n"


def arithmetic_completion(question: str, answer: int, filler: int = 0) -> str:
    """A well-formed completion: the sum worked in <think> (then `filler` " ." tokens), the number
    in <answer>."""
    work = question.removeprefix("What is ").rstrip("?")
    return f"<think>{work}={answer}{' .' * filler}</think><answer>{answer}</answer>"


def arithmetic(n: int, seed: int, *, digits: int = 2, operators: str = "+-",
               conversational: bool = False, with_completion: bool = False,
               filler: int = 0) -> datasets.Dataset:
    """`n` problems "What is a∘b?" with operands of `digits` digits and ∘ from `operators`.

    Prompt-only rows (prompt, answer), or prompt-completion rows with a correct, well-formed
    completion when `with_completion` (an SFT warm-up set). With `filler` > 0 each completion's
    <think> ends with 0 … `filler` (uniform) " ." tokens: lengths that change neither the
    answer nor the format, for studying length biases.
    """
    if not operators or set(operators) - set(_OPS) or digits < 1:
        raise ValueError(f"operators must be drawn from {sorted(_OPS)} and digits >= 1")
    # problems independent of filler
    rng, filler_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(low, high, size=2))
        op = operators[rng.integers(len(operators))]
        question = f"What is {a}{op}{b}?"
        answer = _OPS[op](a, b)
        row = {"prompt": _prompt(question, conversational), "answer": answer}
        if with_completion:
            text = arithmetic_completion(question, answer,
                                         int(filler_rng.integers(filler + 1)) if filler else 0)
            row["completion"] = [{"role": "assistant", "content": text}] if conversational else text
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def arithmetic_candidates(row: dict, rng: np.random.Generator, n: int) -> list[str]:
    """`n` completions of mixed quality for one problem: right, off-by-a-little, badly formatted."""
    question = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    question = question.strip().splitlines()[-1]
    out = []
    for _ in range(n):
        kind = rng.integers(3)
        answer = row["answer"] + (0 if kind == 0 else int(rng.choice([-10, -2, -1, 1, 2, 10])))
        text = arithmetic_completion(question, answer)
        out.append(text if kind < 2 else text.replace("<think>", "").replace("</think>", " so "))
    return out


POSITIVE = {"good": 1.0, "great": 2.0, "fun": 1.0, "superb": 2.0, "charming": 1.0, "brilliant": 2.0}
NEGATIVE = {"bad": -1.0, "awful": -2.0, "dull": -1.0, "boring": -1.0, "terrible": -2.0,
            "weak": -1.0}
INTENSIFIERS = {"very": 2.0, "really": 1.5}
SUBJECTS = ("the plot", "the acting", "the music", "the ending", "the script", "the cast",
            "the movie")
CONNECTIVES = ("and", "but", "and honestly", "while", "and overall")
_ADJECTIVES = {**POSITIVE, **NEGATIVE}
_CLAUSE = re.compile(r"\b(?:(not)\s+)?(?:(%s)\s+)?(%s)\b"
                     % ("|".join(INTENSIFIERS), "|".join(_ADJECTIVES)))


def sentiment_score(text: str) -> float:
    """Σ over adjectives of (−1 if preceded by "not") · intensifier · value; words outside the
    grammar count for nothing, so any text has a score."""
    return float(sum((-1.0 if neg else 1.0) * INTENSIFIERS.get(intensity, 1.0) * _ADJECTIVES[adj]
                     for neg, intensity, adj in _CLAUSE.findall(text.lower())))


def sentiment_reward(completions: Sequence, **_) -> list[float]:
    return [sentiment_score(completion_text(c)) for c in completions]


def review_clause(rng: np.random.Generator) -> str:
    adjectives = list(_ADJECTIVES)
    words = [SUBJECTS[rng.integers(len(SUBJECTS))], "was"]
    if rng.random() < 0.3:
        words.append("not")
    if rng.random() < 0.3:
        words.append(list(INTENSIFIERS)[rng.integers(len(INTENSIFIERS))])
    words.append(adjectives[rng.integers(len(adjectives))])
    return " ".join(words)


def review(rng: np.random.Generator, clauses: int) -> str:
    parts = [review_clause(rng)]
    for _ in range(clauses - 1):
        parts += [CONNECTIVES[rng.integers(len(CONNECTIVES))], review_clause(rng)]
    return " ".join(parts) + " ."


def sentiment(n: int, seed: int, *, conversational: bool = False,
              with_completion: bool = False) -> datasets.Dataset:
    """Prompt-only rows: the opening clause of a review to continue
    ("Review: the plot was dull and"), with its `prefix_score`. The reward of a continuation is
    `sentiment_score` of the continuation. With `with_completion`, prompt-completion rows whose
    completion is a random continuation of one to three clauses (`sentiment_candidates`): an SFT
    set for a reference policy of neutral taste."""
    # prompts independent
    rng, completion_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    rows = []
    for _ in range(n):
        opening = review_clause(rng)
        text = f"Review: {opening} {CONNECTIVES[rng.integers(len(CONNECTIVES))]}"
        row = {"prompt": [{"role": "user", "content": text}] if conversational else text,
               "prefix_score": sentiment_score(opening)}
        if with_completion:
            row["completion"] = _as_completion(sentiment_candidates(row, completion_rng, 1)[0],
                                               row["prompt"])
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def sentiment_candidates(row: dict, rng: np.random.Generator, n: int) -> list[str]:
    """`n` continuations of one to three clauses of random sentiment."""
    return [" " + review(rng, int(rng.integers(1, 4))) for _ in range(n)]


RewardFn = Callable[..., list[float]]


def _scored_candidates(prompts: datasets.Dataset, candidates: Callable, reward_fn: RewardFn,
                       n: int, rng):
    for row in prompts:
        texts = candidates(row, rng, n)
        columns = {k: [v] * n for k, v in row.items() if k != "prompt"}
        yield row, texts, np.asarray(reward_fn(completions=texts, **columns), float)


def _as_completion(text: str, prompt):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def label_pairs(prompts: datasets.Dataset, candidates: Callable, reward_fn: RewardFn, *, seed: int,
                beta: float | None = 1.0) -> datasets.Dataset:
    """One preference pair per prompt, from two distinct candidates a, b with true rewards r_a, r_b:
    a is chosen with probability σ(β(r_a − r_b)) (Bradley-Terry), or whenever r_a > r_b when
    `beta` is None (then a, b have different rewards; a prompt without such a pair is skipped).
    Rows keep `score_chosen` and `score_rejected`."""
    rng = np.random.default_rng(seed)
    rows = []
    for row, texts, rewards in _scored_candidates(prompts, candidates, reward_fn, 8, rng):
        distinct = list({t: r for t, r in zip(texts, rewards)}.items())
        pairs = [(i, j) for i in range(len(distinct)) for j in range(i + 1, len(distinct))
                 if beta is not None or distinct[i][1] != distinct[j][1]]
        if not pairs:
            continue
        (a, ra), (b, rb) = (distinct[k] for k in pairs[rng.integers(len(pairs))])
        if beta is None:
            a_wins = ra > rb
        else:
            a_wins = rng.random() < 1.0 / (1.0 + np.exp(-beta * (ra - rb)))
        (c, rc), (r, rr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
        rows.append({"prompt": row["prompt"], "chosen": _as_completion(c, row["prompt"]),
                     "rejected": _as_completion(r, row["prompt"]), "score_chosen": rc,
                     "score_rejected": rr})
    return datasets.Dataset.from_list(rows)


def label_unpaired(prompts: datasets.Dataset, candidates: Callable, reward_fn: RewardFn, *,
                   seed: int, threshold: float, per_prompt: int = 2) -> datasets.Dataset:
    """Unpaired rows (prompt, completion, label): label = true reward > `threshold` (KTO's format);
    rows keep their `score`."""
    rng = np.random.default_rng(seed)
    rows = []
    for row, texts, rewards in _scored_candidates(prompts, candidates, reward_fn, per_prompt, rng):
        rows += [{"prompt": row["prompt"], "completion": _as_completion(t, row["prompt"]),
                  "label": bool(r > threshold), "score": float(r)} for t, r in zip(texts, rewards)]
    return datasets.Dataset.from_list(rows)


def arithmetic_pairs(n: int, seed: int, **kwargs) -> datasets.Dataset:
    """Preference pairs over arithmetic candidates, the right answer (or format) chosen."""
    return label_pairs(arithmetic(n, seed, **kwargs), arithmetic_candidates, accuracy, seed=seed,
                       beta=None)


def sentiment_pairs(n: int, seed: int, beta: float | None = 1.0, longer_chosen: bool = False,
                    **kwargs) -> datasets.Dataset:
    """Preference pairs of review continuations, labelled by Bradley-Terry on the true sentiment.
    With `longer_chosen`, only the pairs whose chosen continuation has more words than the rejected
    one are kept (of the `n` prompts): preferences where the better answer is also the longer one,
    as in SimPO's length ablations."""
    pairs = label_pairs(sentiment(n, seed, **kwargs), sentiment_candidates, sentiment_reward,
                        seed=seed, beta=beta)
    if longer_chosen:
        pairs = pairs.filter(lambda row: len(completion_text(row["chosen"]).split())
                             > len(completion_text(row["rejected"]).split()))
    return pairs


def sentiment_unpaired(n: int, seed: int, threshold: float = 0.0, **kwargs) -> datasets.Dataset:
    """Unpaired continuations, desirable when their sentiment is above `threshold`."""
    return label_unpaired(sentiment(n, seed, **kwargs), sentiment_candidates, sentiment_reward,
                          seed=seed, threshold=threshold)


TASKS = {  # the names a config's `data.synthetic` may use; each is f(n, seed, **synthetic_args)
    "arithmetic": arithmetic,
    "arithmetic_pairs": arithmetic_pairs,
    "sentiment": sentiment,
    "sentiment_pairs": sentiment_pairs,
    "sentiment_unpaired": sentiment_unpaired,
    **agentic.TASKS,  # the multi-turn tasks
}
