"""concepts: the concept list's CLIP text embeddings, filtered as LF-CBM does."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def concepts(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/concepts: text embeddings (M, D) fp16 of the concepts the filters keep.

    data/<name>/concepts.tsv lists every concept of the file with its prompt and why it was dropped.
    """
    from lib.pipeline.concepts import check_concepts, run_concepts

    run_stage("concepts", params, run_concepts, check=check_concepts)
