"""Face embeddings of many images, flip-summed, batched and sharded over all devices.

The embedding insightface evaluates with: each image and its horizontal flip go through the
model and the two raw embeddings are added (not normalised here). Batches are padded to a
multiple of the device count and split over a mesh; a few batches stay in flight so that
transfers overlap compute while memory stays bounded.
"""

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sface_jax import arguments
from sface_jax import xla_options
from sface_jax.data import images as images_lib


def _apply(target, variables, images):
  if isinstance(target, nn.Module):
    outputs = target.apply(variables, images, train=False)
  else:
    outputs = target(variables, images, train=False)
  embeddings = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
  return embeddings.astype(jnp.float32)


def _embed_batch(target, variables, images, out_sharding=None):
  """(image + flip embedding, raw norms of both (B, 2)) for one padded batch."""
  if images.dtype == jnp.uint8:
    images = images_lib.normalize(images.astype(jnp.float32))
  # Two passes rather than one of the concatenation: each keeps the batch's sharding.
  embeddings = _apply(target, variables, images)
  flipped = _apply(target, variables, images[:, :, ::-1, :])
  norms = jnp.stack([jnp.linalg.norm(embeddings, axis=-1), jnp.linalg.norm(flipped, axis=-1)],
                    axis=-1)
  outputs = (embeddings + flipped, norms)
  if out_sharding is not None:  # every process gets the whole batch back
    outputs = jax.lax.with_sharding_constraint(outputs, out_sharding)
  return outputs


def _on_mesh(variables: Any, mesh: Mesh) -> Any:
  """Leaves already laid out on `mesh` stay as they are; others are replicated onto it."""
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())
  def place(leaf):
    if isinstance(leaf, jax.Array) and set(leaf.sharding.device_set) == devices:
      return leaf
    return jax.device_put(leaf, replicated)
  return jax.tree.map(place, variables)


def embed(apply_fn_or_model: nn.Module | Callable[..., Any], variables: Any, images: np.ndarray,
          *, batch_size: int, mesh: Mesh | None = None, return_norms: bool = False,
          on_batch: Callable[[int], None] | None = None):
  """Flip-summed embeddings of `images`, batched and (with `mesh`) sharded over all devices.

  Args:
    apply_fn_or_model: a Flax module, or a function with `Module.apply`'s signature; called
      as `(variables, images, train=False)`, returning embeddings or (embeddings, ...).
    variables: the model's variables.
    images: (N, S, S, 3) uint8 pixels, normalised here as (x - 127.5) / 128, or float images
      already normalised that way.
    batch_size: images per step (each also goes through flipped), rounded up to a multiple of
      the mesh's device count; the last batch is padded and the padding dropped.
    mesh: when given, each batch is split over all its devices (every axis, `data` first; the
      variables are replicated onto it unless they already live there).
    return_norms: also return the raw L2 norms of each image's and its flip's embedding.
    on_batch: called after each batch with the number of images embedded so far (progress).

  Returns:
    float32 (N, D) `embed(x) + embed(flip(x))`, not normalised; with `return_norms`, also
    float32 (N, 2) norms, whose mean is insightface's XNorm. (insightface adds the two in
    float64; the float32 sum differs by at most half an ulp, which moves a pair's distance by
    ~1e-7 -- it changes a decision only for a pair that close to a threshold.)
  """
  arguments.check_positive(batch_size=batch_size)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (N, H, W, 3); got {images.shape}')
  num_images = images.shape[0]
  if num_images == 0:
    raise ValueError('no images to embed')
  step = _padded_batch_size(min(batch_size, num_images), mesh)
  outputs, done = [], 0
  for output in _embed_stream(apply_fn_or_model, variables,
                              (images[start:start + step] for start in range(0, num_images, step)),
                              batch_size=step, mesh=mesh, flip=True):
    outputs.append(output)
    done += output[0].shape[0]
    if on_batch is not None:
      on_batch(done)
  summed = np.concatenate([batch_summed for batch_summed, _ in outputs])
  if not return_norms:
    return summed
  return summed, np.concatenate([batch_norms for _, batch_norms in outputs])


def _embed_batch_unflipped(target, variables, images, out_sharding=None):
  """The raw embedding of each image of one padded batch (no flip)."""
  if images.dtype == jnp.uint8:
    images = images_lib.normalize(images.astype(jnp.float32))
  embeddings = _apply(target, variables, images)
  if out_sharding is not None:
    embeddings = jax.lax.with_sharding_constraint(embeddings, out_sharding)
  return embeddings


def embed_batches(apply_fn_or_model: nn.Module | Callable[..., Any], variables: Any,
                  batches: Iterable[np.ndarray], *, batch_size: int,
                  mesh: Mesh | None = None, flip: bool = True) -> Iterator[np.ndarray]:
  """`embed` for a stream of batches too large to hold at once (a folder of a million faces).

  Each batch from `batches` ((b, S, S, 3) uint8, or float already normalised, b ≤
  `batch_size`, the same S throughout) is padded to `batch_size` rounded up to a multiple of
  the mesh's device count, so one compiled shape serves all of them, and split over `mesh`
  like `embed` splits its batches. With `flip`, an image's embedding is `embed`'s
  embed(x) + embed(flip(x)) (the same jitted function); without, the raw embed(x). Yields
  float32 (b, D) per batch, in order, while up to two more batches are in flight, so the
  caller can decode the next batch while the devices work.
  """
  arguments.check_positive(batch_size=batch_size)  # now, not at the first batch
  stream = _embed_stream(apply_fn_or_model, variables, batches, batch_size=batch_size,
                         mesh=mesh, flip=flip)
  return (summed for summed, _ in stream) if flip else stream


@functools.cache
def _jitted(embed_fn, platform: str):
  """`embed_fn` under `jax.jit`, with our compiler options for `platform`."""
  return jax.jit(embed_fn, static_argnames=('target', 'out_sharding'),
                 compiler_options=xla_options.compiler_options(platform))


def _padded_batch_size(batch_size: int, mesh: Mesh | None) -> int:
  """`batch_size` rounded up to a multiple of the mesh's device count."""
  num_shards = 1 if mesh is None else mesh.devices.size
  return -(-batch_size // num_shards) * num_shards


def _embed_stream(apply_fn_or_model, variables, batches: Iterable[np.ndarray], *,
                  batch_size: int, mesh: Mesh | None, flip: bool) -> Iterator[Any]:
  """The one batching loop of `embed` and `embed_batches`: pads each batch to one compiled
  shape, splits it over `mesh`, keeps up to two more in flight, and yields each batch's
  outputs as NumPy with the padding dropped: (flip-summed embeddings, norms) with `flip`,
  else the raw embeddings."""
  step = _padded_batch_size(batch_size, mesh)
  if mesh is not None:
    in_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    out_sharding = NamedSharding(mesh, P())  # every process gets the whole batch back
    variables = _on_mesh(variables, mesh)
  else:
    out_sharding = None
  platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
  embed_fn = _jitted(_embed_batch if flip else _embed_batch_unflipped, platform)
  pending = []

  def fetch():
    outputs, count = pending.pop(0)
    return jax.tree.map(lambda x: np.asarray(x)[:count], outputs)

  for batch in batches:
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] != 3:
      raise ValueError(f'images must be (N, H, W, 3); got {batch.shape}')
    count = batch.shape[0]
    if not 0 < count <= step:
      raise ValueError(f'a batch of {count} images; expected 1 to {step}')
    if batch.dtype != np.uint8:
      batch = batch.astype(np.float32)
    if count < step:
      batch = np.concatenate([batch, np.zeros((step - count,) + batch.shape[1:], batch.dtype)])
    if mesh is not None:
      batch = jax.make_array_from_callback(batch.shape, in_sharding, batch.__getitem__)
    pending.append((embed_fn(apply_fn_or_model, variables, batch, out_sharding=out_sharding),
                    count))
    if len(pending) > 2:  # a few batches in flight: transfers overlap compute, memory bounded
      yield fetch()
  while pending:
    yield fetch()
