"""Statistics of every concept method from its concept_stats store, reduced with dask (the `stats` stage)."""
