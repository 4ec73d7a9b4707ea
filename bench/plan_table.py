"""README's memory table: `python -m sface_jax.plan` over datasets × device counts × layouts.

  python bench/plan_table.py                     # IR-50, 128 per device, ~30 compiles
  python bench/plan_table.py --devices 8 --datasets ms1mv2

Each cell is one planner run in its own process (the forced device count is fixed when jax
starts): the real train step of sface_jax/configs/webface42m_r50_pfc.py (IR-50 + CosFace, bf16
backbone, SGD momentum) with the class count, device count and sample rate of the row.
"""

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
DATASETS = {  # identities (sface_jax/configs/base.py DATASETS; 29M: insightface's Partial FC test)
    'ms1mv2': 85_742, 'glint360k': 360_232, 'webface42m': 2_059_906, '29m': 29_000_000,
}


def plan(num_classes: int, devices: int, sample_rate: float, batch_per_device: int) -> dict:
  command = [sys.executable, '-m', 'sface_jax.plan', '--config',
             'webface42m_r50_pfc', '--num-classes', str(num_classes),
             '--devices', str(devices), '--batch-per-device', str(batch_per_device),
             '--sample-rate', str(sample_rate), '--json']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def _gb(value: float) -> str:
  return f'{value / 1e9:.2f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--datasets', default=','.join(DATASETS))
  parser.add_argument('--devices', default='8,32,64')
  parser.add_argument('--sample-rates', default='1.0,0.1')
  parser.add_argument('--batch-per-device', type=int, default=128)
  args = parser.parse_args()
  print('| identities | devices | r | centres + momentum / device (GB) | backbone + its '
        'state (GB) | step temporaries (GB) | est. peak (GB) | collectives / step (GB) |')
  print('|---|---|---|---|---|---|---|---|')
  for name in args.datasets.split(','):
    for devices in (int(d) for d in args.devices.split(',')):
      for rate in (float(r) for r in args.sample_rates.split(',')):
        row = plan(DATASETS[name], devices, rate, args.batch_per_device)
        centres = 2 * row['class_center_bytes']  # the centres and their momentum
        backbone = row['backbone_bytes'] + row['optimizer_bytes'] - row['class_center_bytes']
        print(f'| {name} {DATASETS[name]:,} | {devices} | {rate:g} | {_gb(centres)} | '
              f'{_gb(backbone)} | {_gb(row["temp_bytes"])} | '
              f'{_gb(row["peak_estimate_bytes"])} | '
              f'{_gb(sum(row["collective_bytes"].values()))} |', flush=True)


if __name__ == '__main__':
  main()
