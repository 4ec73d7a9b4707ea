"""The one image decoder (sface_jax.data.images.decode_tf) and the converter's check."""

import io

import numpy as np
from PIL import Image

from sface_jax.data import images as images_lib


def test_the_conversion_check_refuses_exactly_what_the_full_decoder_refuses():
  """The check decodes JPEGs at 1/8 scale: it must refuse the same corrupt files (cut short,
  a byte changed, baseline and progressive) as the full decode training and evaluation do."""
  rng = np.random.default_rng(0)
  variants = []
  for progressive in (False, True):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        buf, 'JPEG', quality=85, progressive=progressive)
    data = buf.getvalue()
    variants += [data[:cut] for cut in np.linspace(50, len(data) - 1, 40).astype(int)]
    for _ in range(150):
      changed = bytearray(data)
      changed[rng.integers(2, len(data))] = rng.integers(0, 256)
      variants.append(bytes(changed))
  refused_by_check = images_lib.find_undecodable(variants)
  refused_by_decode = set()
  for i, data in enumerate(variants):
    try:
      images_lib.decode(data)
    except images_lib.ImageError:
      refused_by_decode.add(i)
  assert 60 < len(refused_by_decode) < len(variants) - 60  # both kinds, many of each
  assert set(refused_by_check) == refused_by_decode
