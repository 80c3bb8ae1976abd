"""toy_report: the shipped toy models scored like real weights on the toy test split."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def toy_report(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Score the shipped toy models on the toy test split: metrics/toy_models.json."""
    from lib.toy.report import run_toy_report

    run_stage("toy-report", params, run_toy_report)
