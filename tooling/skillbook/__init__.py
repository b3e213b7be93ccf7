"""Skillbook: an executable knowledge library of LLM research skills."""

import os

# How long an idle OpenMP thread spins before it sleeps (libgomp, which torch bundles). Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) made the tiny model's ops pay a thread wake-up each: pretraining ran 6K
# tokens/s instead of 10K, llama.cpp decode on 2 threads 130 tok/s instead of 2,800. Spinning forever
# (ACTIVE) starves other processes sharing the cores. A bounded spin (~100K iterations, well under a
# millisecond) keeps 9.5K tokens/s and lets idle servers sleep. Must be set before torch loads libgomp,
# hence here; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")

__version__ = "0.1.0"
