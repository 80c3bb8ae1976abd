"""`python -m stages <stage> [--params params.yaml]`: one Typer command per pipeline stage."""

from lib.cli import app
from stages import prepare  # noqa: F401  (each import registers its command)

if __name__ == "__main__":
    app()
