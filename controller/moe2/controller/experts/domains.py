"""Synthetic text domains: each a small grammar whose sentences use mostly its own words.

Tiny experts are trained on one domain each, so an expert is good on its own domain's text
and poor on the others': the structure the gate has to learn, in miniature. Generation is
seeded and deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    name: str
    templates: tuple[str, ...]  # "{slot}" placeholders filled from `slots`
    slots: dict[str, tuple[str, ...]]

    def sentence(self, rng: random.Random) -> str:
        template = rng.choice(self.templates)
        out = template
        for slot, words in self.slots.items():
            while "{" + slot + "}" in out:
                out = out.replace("{" + slot + "}", rng.choice(words), 1)
        return out

    def words(self) -> set[str]:
        ws: set[str] = set()
        for t in self.templates:
            ws.update(w for w in t.split() if not w.startswith("{"))
        for values in self.slots.values():
            for v in values:
                ws.update(v.split())
        return ws


_NUM = tuple(str(i) for i in range(0, 21))

DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            "arithmetic",
            (
                "{a} plus {b} equals {c} .",
                "{a} times {b} is {c} .",
                "half of {a} is {b} .",
                "subtract {a} from {b} to get {c} .",
            ),
            {"a": _NUM, "b": _NUM, "c": _NUM},
        ),
        Domain(
            "weather",
            (
                "today the weather in {city} is {adj} and {adj} .",
                "tomorrow {city} will be {adj} with {wind} wind .",
                "expect {precip} over {city} tonight .",
            ),
            {
                "city": ("paris", "oslo", "cairo", "lima", "tokyo", "delhi", "quito"),
                "adj": ("sunny", "cloudy", "rainy", "humid", "cold", "warm", "foggy", "dry"),
                "wind": ("light", "strong", "gusty", "calm"),
                "precip": ("snow", "rain", "hail", "drizzle", "showers"),
            },
        ),
        Domain(
            "cooking",
            (
                "add {qty} cups of {ing} and stir the {dish} .",
                "bake the {dish} for {qty} minutes until {done} .",
                "season the {dish} with {spice} and {spice} .",
            ),
            {
                "qty": ("two", "three", "four", "five", "ten"),
                "ing": ("flour", "sugar", "milk", "butter", "rice", "water", "cream"),
                "dish": ("soup", "cake", "bread", "stew", "pie", "sauce"),
                "done": ("golden", "crisp", "tender", "bubbling"),
                "spice": ("salt", "pepper", "cumin", "thyme", "basil", "paprika"),
            },
        ),
        Domain(
            "code",
            (
                "def {fn} ( {arg} ) : return {arg} {op} {k}",
                "for {arg} in range ( {k} ) : print ( {arg} )",
                "if {arg} {cmp} {k} : {fn} ( {arg} )",
            ),
            {
                "fn": ("compute", "update", "parse", "load", "emit", "reduce"),
                "arg": ("x", "y", "idx", "value", "item", "node"),
                "op": ("+", "-", "*", "//", "%"),
                "cmp": ("<", ">", "==", "!="),
                "k": ("1", "2", "8", "16", "42"),
            },
        ),
        Domain(
            "animals",
            (
                "the {animal} eats {food} in the {place} .",
                "a young {animal} sleeps near the {place} .",
                "the {animal} hunts {food} at {time} .",
            ),
            {
                "animal": ("fox", "owl", "bear", "otter", "heron", "badger", "lynx"),
                "food": ("berries", "fish", "mice", "insects", "roots", "seeds"),
                "place": ("forest", "river", "meadow", "marsh", "den", "valley"),
                "time": ("dawn", "dusk", "night", "noon"),
            },
        ),
        Domain(
            "music",
            (
                "the {inst} plays a {mood} melody in {key} major .",
                "a {mood} {genre} song needs a {inst} and drums .",
                "tune the {inst} to {key} before the {genre} concert .",
            ),
            {
                "inst": ("violin", "cello", "piano", "guitar", "flute", "trumpet"),
                "mood": ("gentle", "lively", "somber", "bright", "haunting"),
                "key": ("c", "d", "e", "f", "g", "a", "b"),
                "genre": ("jazz", "folk", "blues", "opera", "rock"),
            },
        ),
        Domain(
            "sports",
            (
                "the {team} scored {n} goals against the {team} .",
                "a late {play} won the match for the {team} .",
                "the {team} coach praised the {pos} after the {play} .",
            ),
            {
                "team": ("lions", "hawks", "sharks", "wolves", "comets", "rangers"),
                "n": ("one", "two", "three", "four", "five"),
                "play": ("header", "penalty", "volley", "tackle", "corner"),
                "pos": ("striker", "keeper", "defender", "winger"),
            },
        ),
        Domain(
            "medicine",
            (
                "the patient with {symptom} needs {drug} twice a day .",
                "a {symptom} that lasts {n} days may signal {disease} .",
                "the doctor treats {disease} with {drug} and rest .",
            ),
            {
                "symptom": ("fever", "cough", "rash", "headache", "nausea", "fatigue"),
                "drug": ("aspirin", "insulin", "penicillin", "ibuprofen", "antacids"),
                "disease": ("flu", "asthma", "diabetes", "anemia", "malaria"),
                "n": ("three", "five", "seven", "ten"),
            },
        ),
    )
}


def corpus(domain: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{domain}:{seed}")
    d = DOMAINS[domain]
    return [d.sentence(rng) for _ in range(n)]


def all_words() -> list[str]:
    ws: set[str] = set()
    for d in DOMAINS.values():
        ws |= d.words()
    return sorted(ws)
