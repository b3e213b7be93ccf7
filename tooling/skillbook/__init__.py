"""Skillbook: an executable knowledge library of LLM research skills."""

import os

# OpenMP threads that spin while waiting make torch 5-200x slower when other processes share the cores
# (measured on 2 cores under load); sleeping waiters cost a few percent on an idle machine. Must be set
# before torch loads libgomp, hence here. An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
