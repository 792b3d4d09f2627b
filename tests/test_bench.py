"""The trigram baseline that config/novel_cpu.py must beat is a proper probability model."""
import math

import numpy as np

from bench import trigram_loss


def test_trigram_probabilities_sum_to_one_in_every_context():
    rng = np.random.default_rng(0)
    vocab = 12
    train_ids = (rng.integers(0, vocab, 3000) ** 2) % vocab  # skewed, with unseen tokens and contexts
    for a, b in [(0, 1), (4, 4), (3, 7), (11, 2), (5, 5)]:
        total = sum(math.exp(-trigram_loss(train_ids, np.array([a, b, c]), vocab)) for c in range(vocab))
        assert abs(total - 1.0) < 1e-9


def test_trigram_learns_a_repeating_pattern():
    pattern = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    train_ids, val_ids = np.tile(pattern, 200), np.tile(pattern, 10)
    assert trigram_loss(train_ids, val_ids, 10) < 0.1 < math.log(10)
