"""Evaluation: MoE² against its baselines on held-out questions (``moe2ctl eval``).

    from moe2.controller.evaluate import Grid, ScoreAnswerer, evaluate
    result = evaluate(selection, test, ScoreAnswerer(test), Grid((0.02,), (1.0, 2.0)))
    print(markdown(result)); plot(result, Path("eval.png"))

``answerer`` (where answers come from: the seam), ``gateway`` (answers through a live
gateway, with measured costs), ``metrics`` (accuracy, voting, costs of
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
from moe2.controller.evaluate.gateway import GateArtefact, GatewayAnswerer
from moe2.controller.evaluate.report import markdown, plot
from moe2.controller.evaluate.run import EvalSettings, Evaluation, Grid, evaluate

ANSWERERS[GatewayAnswerer.name] = GatewayAnswerer

__all__ = [
    "ANSWERERS",
    "Answer",
    "Answerer",
    "EvalSettings",
    "Evaluation",
    "GateArtefact",
    "GatewayAnswerer",
    "Grid",
    "Question",
    "Route",
    "ScoreAnswerer",
    "evaluate",
    "markdown",
    "plot",
]
