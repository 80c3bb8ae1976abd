"""Every method `evaluate` scores, in one explicit table: name -> factory (lib/evaluate/registry.py).

A new method adds a module here (its maps as a ConceptMapMethod) and a row to METHODS.
"""

from lib.evaluate.adapters.baselines import FACTORIES as BASELINES
from lib.evaluate.adapters.cefam import FACTORIES as CEFAM
from lib.evaluate.adapters.fact import fact_factory
from lib.evaluate.adapters.salf import salf_factory
from lib.evaluate.registry import MethodFactory

METHODS: dict[str, MethodFactory] = {**BASELINES, "salf": salf_factory, **CEFAM, "fact": fact_factory}
