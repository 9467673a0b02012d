"""The analysis units of an experiment, one module each, in the order they plan and assemble (a unit may read the
parts of those before it). Adding an analysis is one module with a `Unit` and one line here."""

from __future__ import annotations

from . import (compositions, cost, data, fit, forecast, init_comparison, models, pairs, perplexity, recipe,
               references, repair, routing, table1, unlearning)
from .unit import Unit

UNITS: dict[str, Unit] = {u.name: u for u in (
    models.UNIT,
    perplexity.UNIT,
    references.UNIT,
    pairs.UNIT,
    compositions.UNIT,
    routing.UNIT,
    cost.UNIT,
    repair.UNIT,
    unlearning.UNIT,
    recipe.UNIT,
    fit.UNIT,
    forecast.UNIT,
    init_comparison.UNIT,
    table1.UNIT,
    data.UNIT,
)}
