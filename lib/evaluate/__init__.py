"""The evaluate stage: explanation maps of every registered method scored against ground-truth masks.

`registry` defines what a method provides and how it registers; `methods_*.py` modules hold the
methods; `truth` reads the ground truth; `scoring` accumulates scores; `run` drives the pass
over the data; `report` writes metrics, plot data and the summary table.
"""
