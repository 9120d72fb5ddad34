"""Subset selection (paper §IV-B-1): which experts serve under delay and energy limits.

from moe2.controller.optimize import Problem, solve
solution = solve(Problem.from_file("problem.json"), solver="smo")
"""

from moe2.controller.optimize.problem import Problem
from moe2.controller.optimize.solution import Infeasible, Solution
from moe2.controller.optimize.solver import Solver
from moe2.controller.optimize.solvers import DEFAULT_SOLVER, SOLVERS, solve

__all__ = ["DEFAULT_SOLVER", "SOLVERS", "Infeasible", "Problem", "Solution", "Solver", "solve"]
