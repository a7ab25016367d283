"""Environments: LIBERO tasks (one process per env) and the rendering set-up they need."""
