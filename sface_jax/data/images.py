"""Face images as bytes and as pixels: the formats we store, decoding, and the input scale.

Stored images are JPEG or PNG file bytes, never re-encoded when they already are one of
those (other formats Pillow reads become PNG). The networks see pixels as
(x − 127.5) / 128, insightface's MXNet convention (arcface_torch divides by 127.5: a 0.4%
scale difference for imported weights, see README).
"""

from __future__ import annotations

import io

import numpy as np

PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0
JPEG_MAGIC = b'\xff\xd8\xff'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
EXTENSIONS = frozenset('.jpg .jpeg .png .pgm .ppm .pbm .pnm .bmp .tif .tiff .webp .gif'.split())


class ImageError(ValueError):
  """An image that cannot be read or stored; the message names the file or record."""


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
    raise ImageError(f'{where}: not an image Pillow can read ({type(e).__name__}: {e})') \
        from None
  target = (image_size, image_size) if image_size else None
  if not target and expected_size is not None and size != tuple(expected_size):
    raise ImageError(f'{where}: {size[1]}x{size[0]} (WxH) image, but the dataset is '
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
    raise ImageError(f'{where}: not an image Pillow can read ({type(e).__name__}: {e})') \
        from None


def _storable(img):
  """An image in a mode PNG/JPEG store as 8-bit: L (greyscale) or RGB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img.load()
  if img.mode in ('L', 'RGB'):
    return img
  if img.mode.startswith(('I', 'F')):  # 16/32-bit greyscale (e.g. 16-bit PGM)
    pixels = np.asarray(img, np.float64)
    scale = 255 / 65535 if pixels.max() > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), 'L')
  if img.mode in ('1', 'LA', 'La'):
    return img.convert('L')
  return img.convert('RGB')


def _save(img, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def decode(data: bytes, image_size: int | None = None, where: str = 'image') -> np.ndarray:
  """JPEG/PNG bytes → uint8 (H, W, 3); greyscale becomes 3 equal channels; resized
  (bilinear, antialiased) to (image_size, image_size) when the size differs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.format not in ('JPEG', 'PNG'):
        raise ImageError(f'{where}: {img.format} image, expected JPEG or PNG')
      img = img.convert('RGB')
      if image_size and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
      return np.asarray(img, dtype=np.uint8)
  except ImageError:
    raise
  except Exception as e:  # PIL raises many types for corrupt data.  pylint: disable=broad-except
    raise ImageError(f'{where}: cannot decode ({type(e).__name__}: {e})') from None


def decode_all(images, image_size: int, name: str = 'images') -> np.ndarray:
  """Decodes a sequence of image files into uint8 (N, S, S, 3); an undecodable one raises an
  error naming `name` and the index."""
  out = np.empty((len(images), image_size, image_size, 3), np.uint8)
  for i, data in enumerate(images):
    out[i] = decode(data, image_size, where=f'{name}: image {i}')
  return out
