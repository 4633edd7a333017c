"""Teacher contexts: the demonstration context, K few-shot agreement contexts, negative demonstrations.

Pure text functions build chat-message lists (the trainer applies the chat template); two functions
need the base model and cache what it generates: :func:`build_negatives` (mechanism 2) and
:func:`induce_instructions` (agreement strategy ``induction``). Examples are duck-typed: anything with
``.id``, ``.messages``, ``.demonstration``, ``.kind``, ``.choices`` and ``.answer`` (the trainer's
``TrainingExample`` and the harness's ``Example`` both qualify).

Bump the matching ``*_VERSION`` string whenever a prompt's wording changes: caches are keyed on it.

Example::

    teacher = demonstration_context(ex.messages, ex.demonstration)
    contexts = fewshot_contexts(i, examples, k=3, strategy="retrieval", seed=0,
                                embeddings=example_embeddings(examples, cache_dir))
    negatives = build_negatives(model, tok, examples, cache_dir, model_id="bundled:smollm2-135m-instruct")
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from unisd_components.cache import JsonCache, dataset_fingerprint, example_fingerprint
from unisd_components.embeddings import nearest_neighbors, prompt_text

__all__ = [
    "CONTEXT_VERSION",
    "INDUCTION_VERSION",
    "NEGATIVE_VERSION",
    "build_negatives",
    "by_benchmark",
    "demonstration_context",
    "fewshot_contexts",
    "induce_instructions",
    "induction_prompt",
    "negative_demonstration_prompt",
    "wrong_letter",
]

CONTEXT_VERSION = "ctx-v1"
NEGATIVE_VERSION = "neg-v1"
INDUCTION_VERSION = "ind-v1"

Strategy = Literal["random", "retrieval", "induction"]

_DEMO_INTRO = "Here is an example response to this problem:"
_DEMO_INSTRUCTION = (
    "Study the reference response above, then solve the problem with your own approach and reasoning, "
    "ending in the same answer format."
)
_DONOR_INTRO = (
    "Below are solved examples of other problems. They are references only: do not solve them again."
)
_CURRENT_INTRO = "Now solve this problem:"


def _with_user_text(messages: Sequence[dict], text: str) -> list[dict]:
    """Copy of ``messages`` whose last user turn is replaced by ``text`` (system turns kept)."""
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message.get("role") == "user":
            message["content"] = text
            return out
    raise ValueError("a teacher context needs a prompt with a user message")


def demonstration_context(messages: Sequence[dict], demonstration: str) -> list[dict]:
    """The main teacher's context ``c(x, y*)``: prompt, the demonstration as an example, an instruction."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("a teacher context needs a prompt with a user message")
    text = f"{users[-1]['content']}\n\n{_DEMO_INTRO}\n\n{demonstration}\n\n{_DEMO_INSTRUCTION}"
    return _with_user_text(messages, text)


def _donor_block(donors: Sequence[Any]) -> str:
    parts = [_DONOR_INTRO]
    for number, donor in enumerate(donors, start=1):
        parts.append(
            f"### Reference example {number}\nProblem:\n{prompt_text(donor.messages)}\n\n"
            f"Solution:\n{donor.demonstration}"
        )
    return "\n\n".join(parts)


def _random_donors(index: int, examples: Sequence[Any], count: int, seed: int) -> list[int]:
    """``count`` donors, distinct while there are enough other examples, seeded by (seed, example id)."""
    others = [i for i in range(len(examples)) if i != index]
    rng = random.Random(f"{seed}:{examples[index].id}")
    rng.shuffle(others)
    # Fewer other examples than needed (tiny datasets): reuse them, reshuffled each round.
    picked: list[int] = []
    while len(picked) < count:
        picked.extend(others[: count - len(picked)])
        rng.shuffle(others)
    return picked


def fewshot_contexts(
    example_index: int,
    examples: Sequence[Any],
    k: int,
    strategy: Strategy,
    seed: int,
    n_shots: int = 1,
    embeddings: np.ndarray | None = None,
    instructions: Sequence[str] | None = None,
) -> list[list[dict]]:
    """K teacher contexts for ``examples[example_index]``; none contains the current gold answer.

    - ``random``: ``k·n_shots`` distinct donors, seeded by ``seed`` and the example id.
    - ``retrieval``: nearest donors by cosine over ``embeddings`` (``[N, D]``, row i = example i), self
      excluded; context j gets the j-th nearest (with ``n_shots > 1``, ranks j, j+k, j+2k, ...).
    - ``induction``: no donors; context j is instruction ``instructions[j]`` followed by the prompt.

    Each donor context is the donors' problems and solved demonstrations, marked as references not to
    solve, then the current plain prompt.
    """
    current = examples[example_index]
    if strategy == "induction":
        if instructions is None or len(instructions) < k:
            raise ValueError(f"induction contexts need {k} instructions, got {len(instructions or [])}")
        return [
            _with_user_text(current.messages, f"{instructions[j]}\n\n{prompt_text(current.messages)}")
            for j in range(k)
        ]
    if len(examples) < 2:
        raise ValueError("few-shot contexts need at least 2 training examples (donors are other examples)")
    count = k * n_shots
    if strategy == "random":
        picked = _random_donors(example_index, examples, count, seed)
        groups = [picked[j * n_shots : (j + 1) * n_shots] for j in range(k)]
    elif strategy == "retrieval":
        if embeddings is None:
            raise ValueError("retrieval contexts need embeddings (embeddings.example_embeddings)")
        if len(embeddings) != len(examples):
            raise ValueError(f"{len(embeddings)} embeddings for {len(examples)} examples")
        ranked = nearest_neighbors(embeddings, example_index, count)
        while len(ranked) < count:  # tiny datasets: cycle through the neighbours
            ranked.append(ranked[len(ranked) % (len(examples) - 1)])
        groups = [ranked[j::k][:n_shots] for j in range(k)]
    else:
        raise ValueError(f"unknown few-shot strategy {strategy!r}; use random, retrieval or induction")
    plain = prompt_text(current.messages)
    return [
        _with_user_text(
            current.messages, f"{_donor_block([examples[i] for i in group])}\n\n{_CURRENT_INTRO}\n{plain}"
        )
        for group in groups
    ]


def by_benchmark(examples: Sequence[Any]) -> dict[str, list[int]]:
    """Example indices grouped by ``benchmark`` (missing or "": one group), in first-seen order.

    Agreement contexts are built within a group, so donors, retrieval neighbours and induced
    instructions share the prompt's benchmark. (Negatives need no grouping: each is generated from its
    own example.)
    """
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(getattr(ex, "benchmark", "") or "", []).append(i)
    return groups


# ---- negative demonstrations (mechanism 2)


def wrong_letter(example_id: str, answer: str, n_choices: int) -> str:
    """A wrong option letter chosen deterministically from the example id (stable across runs)."""
    letters = [c for c in string.ascii_uppercase[:n_choices] if c != answer.strip().upper()]
    if not letters:
        raise ValueError(f"no wrong option for {example_id!r} ({n_choices} choices, answer {answer!r})")
    digest = int(hashlib.sha256(example_id.encode()).hexdigest(), 16)
    return letters[digest % len(letters)]


def negative_demonstration_prompt(
    example_messages: Sequence[dict],
    choices: Sequence[str],
    answer: str,
    kind: str,
    example_id: str = "",
) -> list[dict]:
    """Messages asking the base model for a plausible but wrong demonstration of this example.

    Multiple choice: a convincing argument for one specific wrong option (:func:`wrong_letter`) that
    ends with ``The answer is (X).``. Code: a subtly wrong version of the reference program. Tool calls
    and anything else: a plausible response that makes a wrong call or gives a wrong answer.
    """
    problem = prompt_text(example_messages)
    if kind == "multiple_choice":
        letter = wrong_letter(example_id, answer, len(choices))
        option = choices[string.ascii_uppercase.index(letter)]
        text = (
            f"{problem}\n\nWrite a short, confident, step-by-step argument that the correct answer is "
            f"({letter}) {option}. Make it sound convincing and do not say that it could be wrong. "
            f"Finish with the line: The answer is ({letter})."
        )
    elif kind == "code":
        text = (
            f"{problem}\n\nA correct solution is:\n```python\n{answer.strip()}\n```\n\n"
            "Rewrite this solution so that it looks correct but contains a subtle bug (for example an "
            "off-by-one error, a wrong comparison or a missed edge case) that makes some tests fail. "
            "Reply with one ```python code block only, without comments about the bug."
        )
    elif kind == "tool_call":
        text = (
            f"{problem}\n\nWrite a plausible response in the same `Action:` / `Action Input:` format that "
            "calls the wrong tool or passes wrong arguments, without saying that it is wrong."
        )
    else:
        text = (
            f"{problem}\n\nWrite a plausible, confident response that reaches a wrong answer, without "
            "saying that it is wrong."
        )
    return _with_user_text(example_messages, text)


_ANSWER_LINE = re.compile(r"answer (?:is|must be)\W{0,3}\(?([A-Z])\)", re.IGNORECASE)
_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)```", re.DOTALL)


def _finish_negative(example: Any, text: str) -> str:
    """Force the canonical answer format on a generated negative, so it reads like a demonstration."""
    if example.kind == "multiple_choice":
        letter = wrong_letter(example.id, example.answer, len(example.choices))
        final = f"The answer is ({letter})."
        # Drop lines that state another letter (small models often state the right one too), then
        # state the wrong letter last, in the canonical format.
        kept = [
            line
            for line in text.strip().splitlines()
            if all(found.upper() == letter for found in _ANSWER_LINE.findall(line))
        ]
        body = "\n".join(kept).strip()
        if body.endswith(final):
            body = body[: -len(final)].rstrip()
        return f"{body}\n\n{final}".strip()
    if example.kind == "code":
        match = _CODE_BLOCK.search(text)
        code = match.group(1) if match else text
        return f"```python\n{code.strip()}\n```"
    return text.strip()


def build_negatives(
    model,
    tokenizer,
    examples: Sequence[Any],
    cache_dir: str | Path,
    model_id: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, str]:
    """``{example id: negative demonstration}``, generated by ``model`` once and cached.

    Cache: ``<cache_dir>/negatives-<hash>.json``, keyed by model id, prompt version and seed, with one
    entry per example under ``<id>#<example fingerprint>`` (an edited example regenerates).
    """
    from unisd_components.generation import generate_texts

    cache = JsonCache(cache_dir, "negatives", {"model": model_id, "version": NEGATIVE_VERSION, "seed": seed})
    keys = {ex.id: f"{ex.id}#{example_fingerprint(ex)}" for ex in examples}
    missing = [ex for ex in examples if keys[ex.id] not in cache]
    if missing:
        prompts = [
            negative_demonstration_prompt(ex.messages, ex.choices, ex.answer, ex.kind, example_id=ex.id)
            for ex in missing
        ]
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, seed, batch_size)
        cache.update(
            {keys[ex.id]: _finish_negative(ex, text) for ex, text in zip(missing, texts, strict=True)}
        )
    return {ex.id: cache.get(keys[ex.id]) for ex in examples}


# ---- induced instructions (agreement strategy "induction")


def induction_prompt(solved_examples: Sequence[Any]) -> list[dict]:
    """Messages asking the model to induce one instruction from a few solved examples."""
    blocks = [
        f"### Example {n}\nProblem:\n{prompt_text(ex.messages)}\n\nSolution:\n{ex.demonstration}"
        for n, ex in enumerate(solved_examples, start=1)
    ]
    text = (
        "Here are solved examples of a task.\n\n"
        + "\n\n".join(blocks)
        + "\n\nWrite one concise instruction (two to four sentences) that tells someone how to solve new "
        "problems of this task well and in the same answer format. Reply with the instruction only."
    )
    return [{"role": "user", "content": text}]


def _first_paragraph(text: str, max_chars: int = 600) -> str:
    """The instruction proper: small models run on into invented examples after a blank line."""
    paragraphs = [p.strip() for p in text.strip().split("\n\n") if p.strip()]
    return (paragraphs[0] if paragraphs else "")[:max_chars]


def induce_instructions(
    model,
    tokenizer,
    examples: Sequence[Any],
    k: int,
    cache_dir: str | Path,
    model_id: str,
    *,
    n_examples: int = 3,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
) -> list[str]:
    """``k`` instructions for this dataset, each induced from a different seeded sample of solved
    examples; generated once and cached (keyed by model id, dataset fingerprint, version, seed)."""
    cache = JsonCache(
        cache_dir,
        "instructions",
        {
            "model": model_id,
            "dataset": dataset_fingerprint(examples),
            "version": INDUCTION_VERSION,
            "seed": seed,
        },
    )
    keys = [f"instruction-{j}-of-{n_examples}" for j in range(k)]
    missing = [j for j, key in enumerate(keys) if key not in cache]
    if missing:
        from unisd_components.generation import generate_texts

        prompts = []
        for j in missing:
            rng = random.Random(f"{seed}:induction:{j}")
            sample = rng.sample(range(len(examples)), min(n_examples, len(examples)))
            prompts.append(induction_prompt([examples[i] for i in sample]))
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, seed)
        cache.update({keys[j]: _first_paragraph(text) for j, text in zip(missing, texts, strict=True)})
    return [cache.get(key) for key in keys]
