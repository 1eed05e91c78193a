"""Reading a run directory: its config, its checkpoints, what prediction needs, its network.

The layer below `train/` and `evaluation/`: training writes runs, evaluation, prediction,
weight export and analysis read them, all through these modules, which import neither.
"""
