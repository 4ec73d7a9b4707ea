"""Studies built on the library: each a `python -m sface_jax.experiments.<name>` command.

  label_noise   ArcFace, CosFace, SFace and quality-aware SFace under 0/20/40% flipped labels
                on the ORL faces, evaluated on held-out people (issue 17).
"""
