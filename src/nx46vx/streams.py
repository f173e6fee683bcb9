"""Every seeded random stream of a run, in one registry.

A draw uses ``numpy.random.default_rng([seed, STREAM, ...])`` (:func:`generator`):
the run's ``seed``, the stream's id here, then what makes the draw unique (epoch,
step, meta-neuron). Ids are never reused or renumbered: a checkpoint's replay
depends on them.
"""

from __future__ import annotations

import numpy as np

SEARCH_EPOCH_SAMPLE = 0  # the search's class-balanced sample of each epoch: [seed, 0, epoch]
BOOTSTRAP = 1  # each meta-neuron's bootstrap: [seed, 1, epoch, meta-neuron]
INITIAL_THETA = 2  # a candidate's initial weights: [seed, 2, meta-neuron]
VALIDATION_SAMPLE = 3  # the search's validation voxels: [seed, 3]
SPLIT = 4  # the train/validation split: [seed, 4]
STUDENT_BATCH = 6  # the student's batch of a step: [seed, 6, step]
FEATURE_ORDER = 9  # the order training volumes get features in: [seed, 9]
FOREGROUND = 11  # a training volume's capped label-1 coordinates: [seed, 11]
TEACHER_SUBSET = 12  # the training volumes the teachers map: [seed, 12]
#: A volume's feature pool draws from ``[seed, first 60 bits of its content key]``: one stream per volume content.
POOL_KEY_HEX_DIGITS = 15
#: The student's probe batch (its step-0 loss check) is a batch of stream STUDENT_BATCH under ``seed + PROBE_SEED_OFFSET``.
PROBE_SEED_OFFSET = 1


def generator(seed: int, stream: int, *more: int) -> np.random.Generator:
    """The generator of ``stream`` for this draw: ``default_rng([seed, stream, *more])``."""
    return np.random.default_rng([seed, stream, *more])


def pool_generator(seed: int, content_key: str) -> np.random.Generator:
    """The generator of one volume's feature pool, from its content key (hex)."""
    return np.random.default_rng([seed, int(content_key[:POOL_KEY_HEX_DIGITS], 16)])


def student_init_seed(seed: int) -> int:
    """The torch seed of the student's initial weights."""
    return seed * 1000 + 5
