"""NumPy float64 helpers the head tests share: relative error, finite differences, softmax CE."""

import numpy as np


def rel_error(actual, expected):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_close(actual, expected, tol, what=''):
  err = rel_error(actual, expected)
  assert err <= tol, f'{what}: relative error {err:.3g} > {tol:g}'


def fd_grad(f, x, h=1e-6):
  """Central finite differences of a float64 scalar function."""
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[index] += h
    minus[index] -= h
    grad[index] = (f(plus) - f(minus)) / (2 * h)
  return grad


def np_ce(logits, labels):
  """Batch-mean softmax cross-entropy of (B, C) logits."""
  z = logits - logits.max(axis=1, keepdims=True)
  log_norm = np.log(np.exp(z).sum(axis=1))
  return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))
