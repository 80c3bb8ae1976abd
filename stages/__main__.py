"""`python -m stages <stage> [--params params.yaml]`: one Typer command per pipeline stage."""

from lib.cli import app
from stages import evaluate, features, prepare  # noqa: F401  (each import registers its command)
from stages import cbl, explain, sparse  # noqa: F401  (SALF-CBM: cbl, sparse, explain/probe/intervene)

if __name__ == "__main__":
    app()
