"""concepts: the concept list's CLIP text embeddings, filtered as LF-CBM does."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, stage_setup, summary, user_errors


@app.command()
def concepts(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/concepts: text embeddings (M, D) fp16 of the concepts the filters keep.

    data/<name>/concepts.tsv lists every concept of the file with its prompt and why it was dropped.
    """
    with user_errors():
        from lib.concept_store import build_concepts

        config, layout, device = stage_setup(params)
        report = build_concepts(config, layout, device)
    dropped = ", ".join(f"{count} {reason}" for reason, count in report.dropped.items()) or "none"
    summary(
        "concepts",
        f"kept {report.n_kept} of {report.n_listed} concepts (D={report.embed_dim}); dropped: {dropped} "
        f"(see {layout.concepts_report})",
    )
