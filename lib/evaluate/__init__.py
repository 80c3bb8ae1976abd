"""The evaluate stage: explanation maps of every method scored against ground-truth masks.

`registry` defines what a method provides; `adapters/` hold one module per method and the table
of all of them; `truth` reads the ground truth; `scoring` accumulates scores; `run` drives the
pass over the data; `report` writes metrics, plot data and the summary table.
"""
