"""Evaluation and training sets: prompts with an application label and candidate targets.

A free-answer sample has one target (the answer text); a multiple-choice sample has several
options and the index of the correct one, scored by answer log-likelihood: the option whose
target tokens are most probable after the prompt wins.

    samples = tiny_domains(["animals", "code"], n_per_domain=50)
    samples = from_jsonl(Path("mine.jsonl"))

A JSONL line is one sample in one of three forms:

    {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1, "subject": "math"}
    {"prompt": "Question: 2 + 2?\nAnswer:", "choices": [" 3", " 4"], "answer": 1, "app": "math"}
    {"prompt": "The capital of France is", "target": " Paris", "app": "geo"}

A question is written into the prompt with ``PROMPT_FORMAT`` (placeholder ``{question}``) and
each choice into an option with ``OPTION_FORMAT`` (``{choice}``), the format the packaged
benchmarks use, so options are scored as the text that follows "Answer:"; both formats can be
changed. A ``prompt`` and its ``choices`` or ``target`` are used verbatim. ``subject`` and
``app`` name the application (default "default").
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moe2.controller.experts.domains import DOMAINS, corpus
from moe2.shared.errors import ConfigError

FREE = "free-answer"
CHOICE = "multiple-choice"


@dataclass(frozen=True)
class Sample:
    app: str
    prompt: str
    targets: tuple[str, ...]  # one for free-answer, the options for multiple-choice
    answer: int = 0  # index of the correct target

    @property
    def kind(self) -> str:
        return FREE if len(self.targets) == 1 else CHOICE


def kind_of(samples: Sequence[Sample]) -> str:
    kinds = {s.kind for s in samples}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _split(sentence: str) -> tuple[str, str]:
    words = sentence.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def tiny_domains(
    domains: Sequence[str], n_per_domain: int, seed: int = 1, choices: int = 1
) -> list[Sample]:
    """Sentences of the synthetic domains: prompt = the first half of the words, target = the
    rest; app = the domain. With ``choices`` > 1, the other options are the endings of
    sentences from other domains (multiple-choice). Samples of all domains are interleaved.
    ``seed`` 0 is the experts' training corpus: use another seed for held-out data."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ConfigError(f"unknown domain(s) {unknown}; expected some of {', '.join(DOMAINS)}")
    per = {d: corpus(d, n_per_domain, seed=seed) for d in domains}
    rng = random.Random(seed)
    out: list[Sample] = []
    for i in range(n_per_domain):
        for d in domains:
            prompt, target = _split(per[d][i])
            if choices <= 1:
                out.append(Sample(d, prompt, (target,)))
                continue
            others = [o for o in domains if o != d]
            picks = rng.sample(others, min(choices - 1, len(others)))
            options = [target] + [_split(per[o][rng.randrange(n_per_domain)])[1] for o in picks]
            order = list(range(len(options)))
            rng.shuffle(order)
            out.append(Sample(d, prompt, tuple(options[j] for j in order), order.index(0)))
    return out


PROMPT_FORMAT = "Question: {question}\nAnswer:"
OPTION_FORMAT = " {choice}"


def check_formats(prompt_format: str, option_format: str) -> None:
    """Refuse a format that does not place its text, or names another placeholder."""
    for name, fmt, key in (
        ("prompt format", prompt_format, "question"),
        ("option format", option_format, "choice"),
    ):
        try:
            shown = fmt.format(**{key: "\0"})
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"{name} {fmt!r} is not a format with the one placeholder {{{key}}}: {exc!r}"
            ) from None
        if "\0" not in shown:
            raise ConfigError(f"{name} {fmt!r} must contain {{{key}}}")


def from_jsonl(
    path: Path,
    default_app: str = "default",
    prompt_format: str = PROMPT_FORMAT,
    option_format: str = OPTION_FORMAT,
) -> list[Sample]:
    check_formats(prompt_format, option_format)
    out: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError(f"a line is a JSON object, got {type(obj).__name__}")
                app = str(obj.get("subject", obj.get("app", default_app)))
                if "question" in obj:
                    prompt = prompt_format.format(question=str(obj["question"]).strip())
                    choices = tuple(option_format.format(choice=str(c)) for c in obj["choices"])
                    out.append(Sample(app, prompt, choices, _answer(obj, choices)))
                elif "choices" in obj:
                    choices = tuple(str(c) for c in obj["choices"])
                    out.append(Sample(app, str(obj["prompt"]), choices, _answer(obj, choices)))
                else:
                    out.append(Sample(app, str(obj["prompt"]), (str(obj["target"]),)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}:{n}: expected {{'question', 'choices', 'answer'}} (optional "
                    f"'subject'), {{'prompt', 'choices', 'answer'}} or {{'prompt', 'target'}} "
                    f"(optional 'app'): {exc!r}"
                ) from None
    if not out:
        raise ConfigError(f"{path} holds no samples")
    return out


def _answer(obj: dict[str, object], choices: tuple[str, ...]) -> int:
    answer = obj["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"'answer' must be the index of the right choice, got {answer!r}")
    if len(choices) < 2 or not 0 <= answer < len(choices):
        raise ValueError(f"'answer' {answer} must index 'choices' (two or more)")
    return answer
