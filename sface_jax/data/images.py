"""Face images as bytes and as pixels: the formats we store, decoding, and the input scale.

Stored images are JPEG or PNG file bytes, never re-encoded when they already are one of
those (other formats Pillow reads become PNG; 16-bit greyscale stays 16-bit). The networks
see pixels as (x − 127.5) / 128, insightface's MXNet convention (arcface_torch divides by
127.5: a 0.4% scale difference for imported weights, see README).

One decoder, `decode_tf`, turns stored bytes into pixels everywhere: the training pipeline
(inside tf.data), evaluation, `embed`, IJB, the export checks (`decode`, eagerly) and the
converter, which decodes every image it writes with it (`find_undecodable`), so an image
that training could not read is refused at conversion, by name.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np

from sface_jax import arguments

PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0
JPEG_MAGIC = b'\xff\xd8\xff'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
CHECK_RATIO = 8  # JPEG scale-down when only checking that an image decodes (`decode_tf`)
EXTENSIONS = frozenset('.jpg .jpeg .png .pgm .ppm .pbm .pnm .bmp .tif .tiff .webp .gif'.split())


class ImageError(ValueError):
  """An image that cannot be read or stored: '<where>: <reason>', where names the file or
  record (both kept as attributes, for the converter's list of skipped images)."""

  def __init__(self, where: str, reason: str):
    super().__init__(f'{where}: {reason}')
    self.where, self.reason = where, reason

  def __reduce__(self):  # raised in the converter's worker processes
    return type(self), (self.where, self.reason)


@functools.cache
def tensorflow():
  """TensorFlow, imported on first use (it is slow to import) and kept off the accelerators
  that JAX owns: it only decodes images and runs tf.data, on the host."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow already initialised its devices: too late, not fatal.
    pass
  return tf


def normalize(pixels):
  """uint8-range pixels → the network's input, (x − 127.5) / 128 (NumPy, jnp or tf)."""
  return (pixels - PIXEL_MEAN) / PIXEL_SCALE


def image_format(data: bytes) -> str | None:
  """'jpeg', 'png', or None for anything else (by the file's magic bytes)."""
  if data[:3] == JPEG_MAGIC:
    return 'jpeg'
  if data[:8] == PNG_MAGIC:
    return 'png'
  return None


def encode_for_storage(data: bytes, where: str, image_size: int | None = None,
                       expected_size: tuple[int, int] | None = None
                       ) -> tuple[bytes, tuple[int, int]]:
  """The bytes to store for one image file, and its (H, W).

  JPEG/PNG bytes are kept as they are; other formats become PNG. With `image_size`, an image
  of another size is resized (bicubic) to (image_size, image_size) and re-encoded (JPEG
  quality 95 for a JPEG, PNG otherwise). Without it, a size other than `expected_size` is an
  error naming `where`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fmt = image_format(data)
  try:
    img = Image.open(io.BytesIO(data))
    size = (img.height, img.width)
  except Exception as e:  # Pillow raises many types.  pylint: disable=broad-except
    raise ImageError(where, f'not an image Pillow can read ({_pillow_reason(e)})') from None
  target = (image_size, image_size) if image_size else None
  if not target and expected_size is not None and size != tuple(expected_size):
    raise ImageError(where, f'{size[1]}x{size[0]} (WxH) image, but the dataset is '
                     f'{expected_size[1]}x{expected_size[0]}; pass --image-size S to resize '
                     'every image to SxS')
  if fmt is not None and (not target or size == target):
    return data, size
  try:
    img = _storable(img)
    if target and size != target:
      return _save(img.resize((image_size, image_size), Image.BICUBIC),
                   'JPEG' if fmt == 'jpeg' else 'PNG'), target
    return _save(img, 'PNG'), size
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError(where, f'not an image Pillow can read ({_pillow_reason(e)})') from None


def _pillow_reason(error: Exception) -> str:
  """Pillow's error without the `<_io.BytesIO object at 0x…>` it names instead of a file."""
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if isinstance(error, UnidentifiedImageError):
    return 'not a format Pillow recognises'
  return f'{type(error).__name__}: {error}'


def _storable(img):
  """An image in a mode PNG/JPEG store: L (greyscale), RGB, or I;16 (16-bit greyscale, e.g.
  a 16-bit PGM or TIFF, kept 16-bit so that `decode_tf` reduces it to 8 bits as it does a
  16-bit PNG; 32-bit ones are clipped to [0, 65535])."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img.load()
  if img.mode in ('L', 'RGB'):
    return img
  if img.mode.startswith(('I', 'F')):
    pixels = np.clip(np.rint(np.asarray(img, np.float64)), 0, 65535)
    return Image.fromarray(pixels.astype(np.uint16))  # mode I;16
  if img.mode in ('1', 'LA', 'La'):
    return img.convert('L')
  return img.convert('RGB')


def _save(img, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def decode_tf(encoded, fmt: str | None = None, jpeg_ratio: int = 1):
  """The one decoder: JPEG or PNG bytes (a string tensor) → uint8 (H, W, 3) tensor.

  Greyscale becomes 3 equal channels, an alpha channel is dropped, a 16-bit PNG keeps the
  high byte of each sample (libpng's strip: v ↦ ⌊v / 256⌋). JPEG uses libjpeg's accurate
  integer IDCT, not tf.io.decode_image's fast one (up to ~5 levels off): PIL and OpenCV
  decode with the accurate one too, and this matches them exactly. In a tf.data graph the
  format is read from the magic bytes (bytes that are neither fail in the PNG decoder);
  an eager caller that knows it (`image_format`) passes `fmt` and skips the tf.cond.
  `jpeg_ratio` 8 decodes a JPEG at 1/8 scale, twice as fast: libjpeg still decodes every
  coefficient, which is where truncated or corrupt data is found, and skips only most of
  the inverse DCT, so it refuses exactly the images the full decoder refuses (the
  converter's check, `find_undecodable`).
  """
  tf = tensorflow()
  jpeg = lambda: tf.io.decode_jpeg(encoded, channels=3, ratio=jpeg_ratio,
                                   dct_method='INTEGER_ACCURATE')
  png = lambda: tf.io.decode_png(encoded, channels=3)
  if fmt is not None:
    return jpeg() if fmt == 'jpeg' else png()
  return tf.cond(tf.strings.substr(encoded, 0, 3) == JPEG_MAGIC, jpeg, png)


def tf_error_reason(error) -> str:
  """A TensorFlow op error's first line, without its `{{function_node …}}` and
  `[Op:…]` decorations."""
  message = error.message.split('\n')[0]
  message = message.split('}} ', 1)[-1]
  return message.split(' [Op:', 1)[0].strip()


def decode(data: bytes, image_size: int | None = None, where: str = 'image') -> np.ndarray:
  """JPEG/PNG bytes → uint8 (H, W, 3) by `decode_tf`, resized (bilinear, antialiased) to
  (image_size, image_size) when the size differs; errors name `where`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fmt = image_format(data)
  if fmt is None:
    raise ImageError(where, f'not a JPEG or PNG file (starts with {data[:8].hex(" ")})')
  tf = tensorflow()
  try:
    pixels = decode_tf(tf.constant(data), fmt).numpy()
  except tf.errors.OpError as e:
    raise ImageError(where, f'cannot decode ({tf_error_reason(e)})') from None
  if image_size and pixels.shape[:2] != (image_size, image_size):
    pixels = np.asarray(Image.fromarray(pixels).resize((image_size, image_size),
                                                       Image.BILINEAR))
  return pixels


def decode_all(images, image_size: int, name: str = 'images') -> np.ndarray:
  """Decodes a sequence of image files into uint8 (N, S, S, 3); an undecodable one raises an
  error naming `name` and the index."""
  arguments.check_positive(image_size=image_size)
  out = np.empty((len(images), image_size, image_size, 3), np.uint8)
  for i, data in enumerate(images):
    out[i] = decode(data, image_size, where=f'{name}: image {i}')
  return out


@functools.cache
def _decode_batch():
  """A traced function decoding a batch of image files with `decode_tf`, one at a time:
  their (H, W, 3) shapes; fails as a whole if any one fails."""
  tf = tensorflow()

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def shapes(encoded):
    return tf.map_fn(lambda image: tf.shape(decode_tf(image, jpeg_ratio=CHECK_RATIO)),
                     encoded, fn_output_signature=tf.int32, parallel_iterations=1)

  return shapes


def find_undecodable(encoded: Sequence[bytes]) -> dict[int, str]:
  """{index: why} for the images that `decode_tf`, hence training, cannot decode.

  The converter's check of every image it writes (JPEGs at 1/8 scale: see `decode_tf`). A
  batch is decoded in one traced call (no Python per image); only a batch that fails is
  decoded again image by image, to name the culprits.
  """
  bad = {i: f'not a JPEG or PNG file (starts with {data[:8].hex(" ")})'
         for i, data in enumerate(encoded) if image_format(data) is None}
  rest = [i for i in range(len(encoded)) if i not in bad]
  if not rest:
    return bad
  tf = tensorflow()
  try:
    _decode_batch()(tf.constant([encoded[i] for i in rest]))
    return bad
  except tf.errors.OpError:
    pass
  for i in rest:
    try:
      decode_tf(tf.constant(encoded[i]), image_format(encoded[i]), CHECK_RATIO)
    except tf.errors.OpError as e:
      bad[i] = f'cannot decode ({tf_error_reason(e)})'
  return dict(sorted(bad.items()))
