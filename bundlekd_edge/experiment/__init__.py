"""The experiment grid (`bkd-edge experiment GRID.toml`): the paper's research questions as cells
that train, generate and score students, each resumable and cached by its inputs."""

from .grid import Cell, Experiment, load_grid

__all__ = ["Cell", "Experiment", "load_grid"]
