"""Every configuration field, its default, declared once.

Recipes (the other files in this folder) start from `get_config()` here and override a few
fields; nothing else in the code base invents a field or a default (no `config.get(key,
default)`), so a typo in an override (`--config.head.nmae=...`) is an error, not a silent
new key.

Units: the schedule is written in epochs (what papers and insightface report) and turned
into steps from the dataset's `num_examples` and `batch_size`; `num_steps > 0` overrides
`num_epochs` (tests, the demo).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- data -------------------------------------------------------------------------
  # `data.dir` holds the converter's output: TFRecord shards, `dataset_info.json` and a
  # `verification/` folder of pair sets (python -m sface_jax.tools.convert); '' means
  # `<workdir>/data`.
  config.data = ml_collections.ConfigDict()
  config.data.dir = ''
  config.data.num_classes = -1  # -1: read from dataset_info.json; otherwise checked.
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

  # ---- head (loss) ------------------------------------------------------------------
  # `head.name` picks one loss; each loss keeps its own hyper-parameters below, with the
  # paper's defaults, so `--config.head.name=cosface` gets CosFace's margin, not ArcFace's.
  config.head = ml_collections.ConfigDict()
  config.head.name = 'arcface'
  config.head.scale = 64.0
  config.head.arcface = dict(m=0.5, easy_margin=False, insightface_grad=False)
  config.head.cosface = dict(m=0.35)
  config.head.combined = dict(m1=1.0, m2=0.3, m3=0.2)
  config.head.sphereface = dict(m=4, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
  config.head.sface = dict(k=80.0, a=0.8, b=1.23)
  config.head.quality_sface = dict(k=80.0, a=0.8, b=1.23, shift=0.1, h=0.333, momentum=0.01)
  config.head.adaface = dict(m=0.4, h=0.333, momentum=0.01)
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
  config.optimizer.grad_clip_norm = 0.0  # 0: no clipping.

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'piecewise'  # piecewise | polynomial | cosine | constant
  config.schedule.learning_rate = 0.1  # peak, reached after warm-up
  config.schedule.warmup_epochs = 0.0
  config.schedule.boundaries_epochs = (10.0, 18.0, 22.0)  # piecewise: lr *= decay_factor
  config.schedule.decay_factor = 0.1
  config.schedule.power = 2.0  # polynomial (insightface arcface_torch uses 2)
  config.schedule.end_learning_rate = 0.0

  config.batch_size = 512  # global, over all devices and hosts
  config.num_epochs = 24.0
  config.num_steps = -1  # > 0 overrides num_epochs

  # ---- mesh -------------------------------------------------------------------------
  # Axis sizes of the device mesh; -1 takes the remaining devices. The batch is split over
  # `data`; the class centres are split over `model` (1 until the scale-out work).
  config.mesh = dict(data=-1, model=1)

  # ---- evaluation, logging, checkpoints ---------------------------------------------
  config.eval = ml_collections.ConfigDict()
  config.eval.sets = ('lfw', 'cfp_fp', 'agedb_30')  # names in data.dir/verification, or paths
  config.eval.every_steps = 2000  # 0: only at the end
  config.eval.batch_size = 256

  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  return config
