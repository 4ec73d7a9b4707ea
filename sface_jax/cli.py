"""What the argparse commands share, so that their flags read alike.

Spelling: argparse commands spell flags with dashes (`--batch-size`); where a command once
took the underscore spelling, that stays accepted as a hidden alias
(`help=argparse.SUPPRESS, default=argparse.SUPPRESS`, the same `dest`). `python -m
sface_jax.main` is absl's and spells them with underscores (`--num_processes`), like its
`--config.<field>` overrides. Flag names keep one meaning everywhere: `--workdir` is a run or
imported-model directory (its newest checkpoint), `--checkpoint` one step of it
(`<workdir>/checkpoints/<step>`), `--torch-checkpoint` a PyTorch file.
"""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """argparse's help with each flag's default shown, except where there is none to show
  (None, '', a switch that is off, a required flag)."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False or action.default == '' or \
        action.required:
      return action.help
    return super()._get_help_string(action)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
  """`HelpFormatter` that prints the description (a module docstring) as written."""

