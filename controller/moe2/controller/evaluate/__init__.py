"""Evaluation: MoE² against its baselines on held-out questions (``moe2ctl eval``).

    from moe2.controller.evaluate import Grid, ScoreAnswerer, evaluate
    result = evaluate(selection, test, ScoreAnswerer(test), Grid((0.02,), (1.0, 2.0)))
    print(markdown(result)); plot(result, Path("eval.png"))

``answerer`` (where answers come from: the seam), ``metrics`` (accuracy, voting, costs of
answers), ``run`` (the methods and the grid), ``report`` (markdown tables, JSON, PNG), ``cli``.
"""

from moe2.controller.evaluate.answerer import (
    ANSWERERS,
    Answer,
    Answerer,
    Question,
    Route,
    ScoreAnswerer,
)
from moe2.controller.evaluate.report import markdown, plot
from moe2.controller.evaluate.run import EvalSettings, Evaluation, Grid, evaluate

__all__ = [
    "ANSWERERS",
    "Answer",
    "Answerer",
    "EvalSettings",
    "Evaluation",
    "Grid",
    "Question",
    "Route",
    "ScoreAnswerer",
    "evaluate",
    "markdown",
    "plot",
]
