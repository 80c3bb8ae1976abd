"""`python -m stages <stage> [--params params.yaml]`: one Typer command per pipeline stage."""

from lib.cli import app
from stages import cbl, circles, concepts, evaluate, explain, features, prepare, similarity, sparse, toy_models  # noqa: F401  (each import registers its command)  # noqa: F401  (SALF-CBM: cbl, sparse, explain/probe/intervene)  # noqa: F401  (CLIP side: red circles, concept list, P)

if __name__ == "__main__":
    app()
