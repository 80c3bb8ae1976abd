"""counterfactuals: every present concept's true effect on the backbone and the concept models (toy world)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def counterfactuals(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/counterfactuals.zarr: per image of evaluate.split and concept it shows, the logit
    change when the concept is replaced by each other value of its type (Δ = y(x) − mean y(x′))."""
    from lib.compare.counterfactual_stage import run_counterfactuals

    run_stage("counterfactuals", params, run_counterfactuals)
