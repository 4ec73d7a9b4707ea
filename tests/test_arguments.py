"""Size arguments refused where they enter: each command's flags (argparse, exit 2, the flag
named) and each API (ValueError naming the argument), before any work is done.

Before, a negative batch size made `identification` return uninitialised memory as results,
0 ended in a bare `range()` error, and `embed --batch-size 0` silently used the default.
"""

import numpy as np
import pytest

from sface_jax import arguments
from sface_jax import embed
from sface_jax import evaluate
from sface_jax.data import convert
from sface_jax.data import images as images_lib
from sface_jax.evaluation import embedding
from sface_jax.evaluation import identification
from sface_jax.evaluation import ijb
from sface_jax.tools import convert as convert_cli

WEIGHTS = ['--workdir', 'unused']


@pytest.mark.parametrize('main,argv,flag', [
    (embed.main, WEIGHTS + ['--images', 'x', '--output', 'e.npy', '--batch-size', '-2'],
     '--batch-size'),
    (embed.main, WEIGHTS + ['--images', 'x', '--output', 'e.npy', '--batch-size', '0'],
     '--batch-size'),
    (identification.main, ['--embeddings', 'e.npy', '--batch-size', '-5'], '--batch-size'),
    (identification.main, ['--embeddings', 'e.npy', '--batch-size', '0'], '--batch-size'),
    (identification.main, ['--embeddings', 'e.npy', '--gallery-per-identity', '0'],
     '--gallery-per-identity'),
    (identification.main, ['--embeddings', 'e.npy', '--non-mated-identities', '-1'],
     '--non-mated-identities'),
    (ijb.main, WEIGHTS + ['--ijb-dir', 'x', '--batch-size', '0'], '--batch-size'),
    (ijb.main, WEIGHTS + ['--ijb-dir', 'x', '--workers', '0'], '--workers'),
    (evaluate.main, WEIGHTS + ['--batch-size', '-1'], '--batch-size'),
    (convert_cli.main, ['--input', 'x', '--output', 'y', '--workers', '0'], '--workers'),
    (convert_cli.main, ['--input', 'x', '--output', 'y', '--num-shards', '-3'],
     '--num-shards'),
    (convert_cli.main, ['--input', 'x', '--output', 'y', '--image-size', '0'],
     '--image-size'),
    (convert_cli.main, ['--input', 'x', '--output', 'y', '--num-classes', 'ten'],
     '--num-classes'),
])
def test_commands_refuse_sizes_below_one(main, argv, flag, capsys):
  with pytest.raises(SystemExit) as exited:
    main(argv)
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert f'argument {flag}: ' in err and ('positive' in err or 'negative' in err
                                          or 'not an integer' in err), err


def test_apis_refuse_sizes_below_one(tmp_path):
  images = np.zeros((3, 8, 8, 3), np.uint8)
  apply = lambda variables, x, train: x.reshape(x.shape[0], -1)
  for bad in (0, -2):
    with pytest.raises(ValueError, match=rf'batch_size must be 1 or more; got {bad}'):
      embedding.embed(apply, {}, images, batch_size=bad)
    with pytest.raises(ValueError, match='batch_size must be 1 or more'):
      embedding.embed_batches(apply, {}, [images], batch_size=bad)  # at the call, not later
    with pytest.raises(ValueError, match='batch_size must be 1 or more'):
      embed.embed_files(apply, {}, embed.ImageList('x', ('a',), ('a',)), image_size=8,
                        batch_size=bad, output=str(tmp_path / 'e.npy'))
  gallery = np.eye(4, dtype=np.float32)
  labels = np.arange(4)
  with pytest.raises(ValueError, match='batch_size must be 1 or more; got -5'):
    identification.identification_metrics(gallery, labels, gallery, labels, batch_size=-5)
  with pytest.raises(ValueError, match='ranks\\[0\\] must be 1 or more; got 0'):
    identification.identification_metrics(gallery, labels, gallery, labels, ranks=(0, 5))
  with pytest.raises(ValueError, match='batch_size must be 1 or more; got 0'):
    identification.Gallery(gallery).search(gallery, 1, batch_size=0)
  with pytest.raises(ValueError, match='chunk_rows must be 1 or more'):
    identification.Gallery(gallery, chunk_rows=0)
  with pytest.raises(ValueError, match='workers must be 1 or more; got 0'):
    ijb.evaluate_ijb(apply, {}, str(tmp_path), 'IJBC', 112, workers=0)
  with pytest.raises(ValueError, match='batch_size must be 1 or more; got 0'):
    ijb.image_features(apply, {}, None, 112, batch_size=0)
  with pytest.raises(ValueError, match='num_shards must be 1 or more; got 0'):
    convert.convert(tmp_path, tmp_path / 'out', num_shards=0)
  with pytest.raises(ValueError, match='image_size must be 1 or more; got 0'):
    images_lib.decode_all([], 0)
  with pytest.raises(ValueError, match='workers must be an integer'):
    arguments.check_positive(workers=2.5)
  arguments.check_positive(batch_size=None, workers=np.int64(3))  # None: the default
