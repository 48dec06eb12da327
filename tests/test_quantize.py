"""Quantized embeddings equal sentence-transformers' `quantize_embeddings` (the definitions Cohere's types follow)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sentence_transformers.util.quantization import quantize_embeddings

from service.engine.quantize import calibration_ranges, quantize


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("dim", [8, 9, 384, 1024])
@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_equals_sentence_transformers(precision, dim):
    v = unit_vectors(64, dim, seed=dim)
    want = quantize_embeddings(v, precision, ranges=calibration_ranges(dim))
    got = quantize(v, precision)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=40), st.sampled_from(["int8", "uint8", "binary", "ubinary"]))
def test_any_vector_and_given_ranges(values, precision):
    v = np.array([values], dtype=np.float32)
    ranges = np.vstack([v[0] - 0.25, v[0] + np.linspace(0, 0.5, v.shape[1], dtype=np.float32)])  # some with a zero step
    np.testing.assert_array_equal(quantize(v, precision, ranges), quantize_embeddings(v, precision, ranges=ranges))


def test_binary_bits():
    v = np.array([[0.6, -0.8, 0.1, 0.0, 0.3, -0.2, 0.5, 0.9, -1.0]], dtype=np.float32)
    assert quantize(v, "ubinary").tolist() == [[0b10101011, 0]]  # most significant bit first; 0.0 is a 0 bit; padded
    assert quantize(v, "binary").tolist() == [[0b10101011 - 128, -128]]


def test_calibration_ranges():
    r = calibration_ranges(384)
    assert r.shape == (2, 384) and r.dtype == np.float32
    assert np.allclose(r[1], 6 / np.sqrt(384)) and np.array_equal(r[0], -r[1])
    assert np.array_equal(calibration_ranges(16)[1], np.ones(16, dtype=np.float32))  # never wider than a unit vector's
    q = quantize(np.zeros((1, 384), dtype=np.float32), "int8")
    assert set(q[0].tolist()) == {-1}  # 0 sits in the middle bucket (127 of 0..255)


def test_unknown_precision():
    with pytest.raises(ValueError):
        quantize(np.zeros((1, 4), dtype=np.float32), "int4")
