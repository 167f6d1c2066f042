"""Counter-based random numbers: a value is a pure function of a key tuple, never of a stream's history.

Extraction and augmentation need randomness that does not depend on how work is split: a candidate pixel's
sampling key must be the same whichever process surveys its section, and a patch's augmentation parameters the
same whatever batch it lands in. A sequential generator cannot give that; hashing the key can. The hash is
SplitMix64's finaliser (a bijection on 64-bit words with full avalanche), chained over the key's words;
numpy's uint64 arithmetic wraps modulo 2^64, which is what the finaliser expects.

Entry points: :func:`hash_words` (uint64 hashes of keys, vectorised over the last word), :func:`uniform`
(floats in [0, 1) from hashes), :func:`string_word` (a stable 64-bit word for a name such as a brain id).
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def string_word(text: str) -> int:
    """A stable 64-bit word for ``text`` (Python's ``hash`` of a str changes between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def hash_words(prefix: tuple[int, ...], last: np.ndarray | int) -> np.ndarray:
    """Hash the key ``(*prefix, last)`` for every element of ``last``; returns uint64 of ``last``'s shape.

    ``prefix`` words may be any non-negative Python ints (reduced modulo 2^64); ``last`` is an integer array.
    """
    h = np.zeros((), dtype=np.uint64)
    for word in prefix:
        h = _mix(h ^ np.uint64(int(word) % 2**64))
    arr = np.asarray(last).astype(np.uint64)
    return _mix(h ^ _mix(arr))


def uniform(hashes: np.ndarray) -> np.ndarray:
    """Map uint64 hashes to float64 in [0, 1) using their top 53 bits."""
    return (np.asarray(hashes, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
