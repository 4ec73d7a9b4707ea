"""The training input pipeline: TFRecord shards -> per-host numpy batches -> global jax.Arrays.

One chain, read top to bottom (big_vision style):

  per-host split -> per-epoch file shuffle -> file interleave -> shuffle buffer -> epochs
  -> skip (resume only, on the serialised records) -> decode -> resize
  -> [zoom / shift / rotate] -> flip -> [brightness / contrast]
  -> (x - 127.5) / 128 -> fixed-size batches -> prefetch

The bracketed augmentations are off by default (`Augmentation()`); they are for small
datasets (the 300-image demo), where a network otherwise memorises its training set.

Determinism. Everything random is derived from `seed` with stateless operations, per epoch:
the file order of epoch e from (seed, e), the shuffle buffer's seed from (seed, e), the flip
and augmentation of the i-th example of epoch e from (seed, e, i). Epochs are built one at a
time (`range(epoch, inf).flat_map(one_epoch)`), so epoch e's order does not depend on what
came before it; the interleave's cycle length is fixed and `deterministic=True` keeps
parallel reading and decoding in order, so the thread count changes speed only. The k-th
global batch is therefore a pure function of (seed, k, dataset).

Hosts (`host_split`). 'records' (the default): every host reads the same stream and keeps
its slice of each global batch (host h the examples [h·L, (h+1)·L) of every B, L = B / hosts),
skipping the others before decoding them: the global batches are the same on any number of
hosts, so a run can move between machine sizes and give the same result. 'files': each host
reads every hosts-th shard with its own stream (the host index folded into every seed): 1/hosts
of the reading, for pods where reading every record on every host costs too much; the
batches then depend on the host count.

Resuming at `start_step` = k skips k·B examples of the stream (k·L per host with 'files'):
whole epochs arithmetically, the rest of the current epoch by passing its serialised records
through the shuffle buffer without parsing or decoding them, and then sees exactly the
batches an uninterrupted run sees. That costs reading (not decoding) up to one epoch of
records, far faster than decoding them (`bench/input_pipeline.py` measures the rate;
BENCHMARKS.md § Input pipeline has the figures); from cold storage the bound is reading
those bytes once.
"""

import dataclasses
import math
from typing import Iterator, Optional

import jax
import numpy as np

from sface_jax.data import images as images_lib
from sface_jax.data import tfrecord

tf = images_lib.tensorflow()  # on the host only, off the accelerators that JAX owns

# Files read concurrently by the interleave. Fixed, not AUTOTUNE: the interleave's output
# order depends on it, and AUTOTUNE would make the order depend on the machine.
CYCLE_LENGTH = 16
HOST_SPLITS = ('records', 'files')

# Purpose tags folded into the seed so that the random streams are independent.
_FILE_ORDER, _SHUFFLE_BUFFER, _FLIP, _GEOMETRY, _PHOTOMETRY = 1, 2, 3, 4, 5



@dataclasses.dataclass(frozen=True)
class HostSplit:
  """How one host reads the dataset (module docstring, "Hosts").

  `by == 'records'`: every host reads all shards (`files`) in the same order and keeps its
  slice of each global batch. `by == 'files'`: the host reads `files` (every
  `process_count`-th shard) as its own stream.
  """
  by: str  # 'records' | 'files'
  files: tuple[str, ...]
  file_sizes: tuple[int, ...]
  num_examples: int  # records in this host's stream per epoch
  process_index: int
  process_count: int

  @property
  def stream(self) -> tuple[int, ...]:
    """What is folded into every seed besides (seed, epoch): the host, for own streams."""
    return (self.process_index,) if self.by == 'files' and self.process_count > 1 else ()


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random transforms of a training image beyond the flip; every magnitude 0 = off.

  Each is drawn uniformly per example, independently (`config.data.random_*`):
    scale: zoom by a factor in [1 - scale, 1 + scale] about the centre (> 1 magnifies);
    translate: shift by up to ± translate × side, horizontally and vertically;
    rotate: rotate by up to ± rotate degrees about the centre;
    brightness: add up to ± brightness × 255 to every pixel;
    contrast: scale each channel's deviation from its mean by a factor in
      [1 - contrast, 1 + contrast].
  The geometric ones are one affine map, sampled bilinearly at the network's input size;
  pixels it brings in from outside the image repeat the nearest edge pixel. Photometric
  results are clipped to [0, 255], the range of a decoded image.
  """
  scale: float = 0.0
  translate: float = 0.0
  rotate: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0

  def __post_init__(self):
    for name in ('scale', 'translate', 'brightness', 'contrast'):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f'augmentation {name} (config.data.random_{name}) is {value}, '
                         'expected in [0, 1)')
    if not 0.0 <= self.rotate <= 180.0:
      raise ValueError(f'augmentation rotate (config.data.random_rotate) is {self.rotate} '
                       'degrees, expected in [0, 180]')

  @classmethod
  def from_config(cls, data_config) -> 'Augmentation':
    """From `config.data.random_{scale,translate,rotate,brightness,contrast}`."""
    return cls(**{f.name: float(data_config[f'random_{f.name}'])
                  for f in dataclasses.fields(cls)})

  @property
  def geometric(self) -> bool:
    return bool(self.scale or self.translate or self.rotate)

  @property
  def photometric(self) -> bool:
    return bool(self.brightness or self.contrast)


def affine_transform(image: tf.Tensor, zoom, angle_degrees, shift_x, shift_y) -> tf.Tensor:
  """(S, S, C) float image zoomed by `zoom`, rotated, then shifted by (shift_x, shift_y) px.

  Output pixel p shows input pixel c + R(-angle) (p - c - shift) / zoom, with c the image
  centre ((S - 1) / 2 in pixel-index coordinates), sampled bilinearly; outside the input,
  the nearest edge pixel. Positive shift_x moves the content right, shift_y down.
  """
  side = tf.cast(tf.shape(image)[0], tf.float32)
  center = (side - 1.0) / 2.0
  angle = tf.cast(angle_degrees, tf.float32) * (math.pi / 180.0)
  zoom = tf.cast(zoom, tf.float32)
  a0 = tf.cos(angle) / zoom
  a1 = tf.sin(angle) / zoom
  b0, b1 = -a1, a0
  # input = A (output - center - shift) + center, written as A output + offset.
  px = center + tf.cast(shift_x, tf.float32)
  py = center + tf.cast(shift_y, tf.float32)
  a2 = center - a0 * px - a1 * py
  b2 = center - b0 * px - b1 * py
  transform = tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), (1, 8))
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='NEAREST')
  return out[0]


def _augment_geometry(image: tf.Tensor, augmentation: Augmentation, key: tf.Tensor):
  u = tf.random.stateless_uniform([4], seed=key, minval=-1.0, maxval=1.0)
  side = tf.cast(tf.shape(image)[0], tf.float32)
  return affine_transform(image, zoom=1.0 + augmentation.scale * u[0],
                          angle_degrees=augmentation.rotate * u[1],
                          shift_x=augmentation.translate * side * u[2],
                          shift_y=augmentation.translate * side * u[3])


def _augment_photometry(image: tf.Tensor, augmentation: Augmentation, key: tf.Tensor):
  u = tf.random.stateless_uniform([2], seed=key, minval=-1.0, maxval=1.0)
  mean = tf.reduce_mean(image, axis=(0, 1), keepdims=True)
  image = mean + (image - mean) * (1.0 + augmentation.contrast * u[0])
  image = image + augmentation.brightness * 255.0 * u[1]
  return tf.clip_by_value(image, 0.0, 255.0)


def split_for_host(info: tfrecord.DatasetInfo, process_index: int, process_count: int,
               by: str = 'records') -> HostSplit:
  """What host `process_index` of `process_count` reads (module docstring, "Hosts")."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if by not in HOST_SPLITS:
    raise ValueError(f"config.data.host_split is {by!r}, expected one of {HOST_SPLITS}")
  paths = tuple(info.shard_paths)
  sizes = tuple(n for _, n in info.shards)
  if by == 'records':
    return HostSplit('records', paths, sizes, info.num_examples, process_index, process_count)
  per_host = [sum(sizes[h::process_count]) for h in range(process_count)]
  if len(paths) < process_count or min(per_host) == 0:
    raise ValueError(f'{info.directory}: {len(paths)} shard files cannot be split over '
                     f'{process_count} hosts (some host would get no example); use '
                     "config.data.host_split='records'")
  return HostSplit('files', paths[process_index::process_count],
                   sizes[process_index::process_count], per_host[process_index],
                   process_index, process_count)


def resume_position(start_step: int, local_batch_size: int,
                    examples_per_epoch: int) -> tuple[int, int]:
  """(epoch, examples of that epoch already consumed) before local batch `start_step`."""
  consumed = start_step * local_batch_size
  return consumed // examples_per_epoch, consumed % examples_per_epoch


def _key(seed, *data) -> tf.Tensor:
  """A stateless RNG key (int64 pair) that is a function of `seed` and `data` only."""
  key = tf.constant([seed, 0x5FACE], tf.int64)
  for value in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
  return key


def _scalar_seed(key: tf.Tensor) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed=key, minval=None, maxval=None, dtype=tf.int64)


def _read_files(paths: tf.Tensor, sizes: tf.Tensor, num_parallel: int) -> tf.data.Dataset:
  """Interleaves files, one record from each in turn: (serialized, file, record index)."""

  def read_one(path, size):
    records = tf.data.TFRecordDataset(path).apply(
        tf.data.experimental.assert_cardinality(size))
    return records.enumerate().map(lambda k, r: (r, path, k))

  return tf.data.Dataset.from_tensor_slices((paths, sizes)).interleave(
      read_one, cycle_length=CYCLE_LENGTH, block_length=1, num_parallel_calls=num_parallel,
      deterministic=True)


def _epoch_records(split: HostSplit, *, seed: int, shuffle_buffer: int, start_epoch: int,
                   skip: int, num_parallel: int, batch_size: int):
  """Returns `epoch -> dataset of that epoch's records`, in this host's order."""
  paths = tf.constant(split.files)
  sizes = tf.constant(split.file_sizes, tf.int64)
  local_batch = batch_size // split.process_count

  def one_epoch(epoch):
    # Dataset.shuffle mixes the process-wide seed of tf.random.set_seed into its own; clear
    # it in this traced function so the order depends on `seed` alone.
    tf.compat.v1.get_default_graph().seed = None
    order_key = _key(seed, _FILE_ORDER, epoch, *split.stream)
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(paths)), order_key)
    records = _read_files(tf.gather(paths, order), tf.gather(sizes, order), num_parallel)
    records = records.shuffle(
        shuffle_buffer, reshuffle_each_iteration=False,
        seed=_scalar_seed(_key(seed, _SHUFFLE_BUFFER, epoch, *split.stream)))
    records = records.enumerate().map(
        lambda i, r: {'serialized': r[0], 'file': r[1], 'record': r[2], 'epoch': epoch,
                      'index': i})
    # Resume: drop what the interrupted run already consumed, before any parsing/decoding.
    records = records.skip(tf.where(epoch == start_epoch, tf.constant(skip, tf.int64), 0))
    if split.by == 'records' and split.process_count > 1:
      # This host's slice of every global batch: stream position p = epoch·N + index.
      def mine(r):
        position = epoch * split.num_examples + r['index']
        return (position % batch_size) // local_batch == split.process_index
      records = records.filter(mine)
    return records

  return one_epoch


def _decode_fn(*, image_size: int, num_classes: int, random_flip: bool,
               augmentation: Augmentation, seed: int, stream: tuple[int, ...]):
  """serialised record -> {'image': float32 (S, S, 3) normalised, 'label': int32}."""

  def decode(r):
    example = tfrecord.parse_example(r['serialized'])
    encoded = example[tfrecord.IMAGE_KEY]
    label = example[tfrecord.LABEL_KEY]
    where = ['file', r['file'], 'record', r['record']]
    is_jpeg = tf.strings.substr(encoded, 0, 3) == images_lib.JPEG_MAGIC
    checks = [
        tf.debugging.Assert(
            tf.logical_or(is_jpeg, tf.strings.substr(encoded, 0, 8) == images_lib.PNG_MAGIC),
            [f'{tfrecord.IMAGE_KEY} is neither JPEG nor PNG:'] + where),
        tf.debugging.Assert(
            tf.logical_and(label >= 0, label < num_classes),
            [f'{tfrecord.LABEL_KEY} outside [0, {num_classes}):', label] + where),
    ]
    with tf.control_dependencies(checks):
      image = images_lib.decode_tf(encoded)  # the decoder evaluation and convert use too
    same_size = tf.reduce_all(tf.shape(image)[:2] == image_size)
    image = tf.cond(
        same_size, lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, (image_size, image_size), antialias=True))
    image = tf.ensure_shape(image, (image_size, image_size, 3))
    if augmentation.geometric:
      image = _augment_geometry(
          image, augmentation, _key(seed, _GEOMETRY, r['epoch'], *stream, r['index']))
    if random_flip:
      image = tf.image.stateless_random_flip_left_right(
          image, seed=_key(seed, _FLIP, r['epoch'], *stream, r['index']))
    if augmentation.photometric:
      image = _augment_photometry(
          image, augmentation, _key(seed, _PHOTOMETRY, r['epoch'], *stream, r['index']))
    return {'image': images_lib.normalize(image), 'label': tf.cast(label, tf.int32)}

  return decode


def make_train_dataset(info: tfrecord.DatasetInfo, *, batch_size: int, image_size: int,
                       seed: int, start_step: int = 0, random_flip: bool = True,
                       augmentation: Augmentation = Augmentation(),
                       shuffle_buffer: int = 20_000, prefetch: int = 2,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None,
                       num_threads: Optional[int] = None,
                       host_split: str = 'records') -> tf.data.Dataset:
  """The endless, batched tf.data pipeline of this host; see `train_dataset`."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the {process_count} hosts')
  if start_step < 0:
    raise ValueError(f'start_step is {start_step}, expected >= 0')
  local_batch = batch_size // process_count
  split = split_for_host(info, process_index, process_count, host_split)
  stream_batch = batch_size if split.by == 'records' else local_batch
  start_epoch, skip = resume_position(start_step, stream_batch, split.num_examples)
  parallel = tf.data.AUTOTUNE if num_threads is None else num_threads

  one_epoch = _epoch_records(split, seed=seed, shuffle_buffer=max(1, shuffle_buffer),
                             start_epoch=start_epoch, skip=skip, num_parallel=parallel,
                             batch_size=batch_size)
  decode = _decode_fn(image_size=image_size, num_classes=info.num_classes,
                      random_flip=random_flip, augmentation=augmentation, seed=seed,
                      stream=split.stream)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
  ds = ds.map(decode, num_parallel_calls=parallel, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(prefetch)

  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if num_threads is not None:
    options.threading.private_threadpool_size = num_threads
  return ds.with_options(options)


def train_dataset(info: tfrecord.DatasetInfo, *, batch_size: int, image_size: int, seed: int,
                  start_step: int = 0, random_flip: bool = True,
                  augmentation: Augmentation = Augmentation(), shuffle_buffer: int = 20_000,
                  prefetch: int = 2, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, num_threads: Optional[int] = None,
                  host_split: str = 'records') -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator over this host's batches, starting at global step `start_step`.

  Yields {'image': float32 (batch_size / process_count, S, S, 3) in (x - 127.5) / 128,
  'label': int32 (batch_size / process_count,)}. `batch_size` is global (all hosts); the
  hosts share the data as `host_split` says ('records' or 'files': module docstring).
  `augmentation`: random transforms besides the flip (`Augmentation`; none by default).
  Global batch k is a pure function of (seed, k) with 'records' (of (seed, k, host count)
  with 'files'); `num_threads` (None: tf.data autotuning) only changes speed, never the
  order. A shard that cannot be read (truncated, corrupt, fewer records than recorded)
  raises `tfrecord.DamagedShardError` naming it and the remedy.
  """
  return _naming_damaged_shards(make_train_dataset(
      info, batch_size=batch_size, image_size=image_size, seed=seed, start_step=start_step,
      random_flip=random_flip, augmentation=augmentation, shuffle_buffer=shuffle_buffer,
      prefetch=prefetch, process_index=process_index, process_count=process_count,
      num_threads=num_threads, host_split=host_split).as_numpy_iterator(), info)


def _naming_damaged_shards(batches: Iterator[dict[str, np.ndarray]],
                           info: tfrecord.DatasetInfo) -> Iterator[dict[str, np.ndarray]]:
  """`batches`, with tf.data's read errors, which name no file ('truncated record at
  637317', 'expected to contain 75 elements'), replaced by one naming the shard (found by
  reading every shard once, `tfrecord.find_damaged_shard`)."""
  try:
    yield from batches
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError):
    damaged = tfrecord.find_damaged_shard(info)
    if damaged is None:
      raise
    raise damaged from None


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's local batch into global arrays (batch = concatenation over hosts).

  Every host calls this with its own `local_batch`; the global batch dimension is
  process_count × local batch, host h's rows at [h·L, (h+1)·L). `sharding` is the training
  step's batch sharding (`sface_jax.sharding.batch_sharding`: the batch axis split over all
  devices, each host's devices contiguous in the mesh, so a host's rows are its devices').
  """
  arrays = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    arrays[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return arrays
