"""Loss heads: pure functions of cosines (or embeddings), labels and hyper-parameters.

One loss family per module; `get_head(config.head)` wraps any of them behind one calling
convention for the training step (see `head.py`), which also runs them on a block of the
classes per device (`head_inputs`, Partial FC's sampling in `partial_fc.py`). `ClassCenters`
is the only Flax module: it owns the class-centre matrix; everything else here is a pure,
jittable function in float32.
"""

from sface_jax.heads.adaface import adaface_logits
from sface_jax.heads.adaface import adaface_logits_with_target
from sface_jax.heads.adaface import init_norm_stats
from sface_jax.heads.adaface import norm_quality
from sface_jax.heads.adaface import update_norm_stats
from sface_jax.heads.center import center_loss
from sface_jax.heads.center import update_centers
from sface_jax.heads.classifier import ClassCenters
from sface_jax.heads.classifier import cosine_logits
from sface_jax.heads.common import accuracy
from sface_jax.heads.common import angle_stats
from sface_jax.heads.curricularface import curricular_logits
from sface_jax.heads.curricularface import curricular_logits_with_target
from sface_jax.heads.elasticface import elastic_logits_with_target
from sface_jax.heads.elasticface import elastic_margins
from sface_jax.heads.head import Head
from sface_jax.heads.head import HeadInputs
from sface_jax.heads.head import head_inputs
from sface_jax.heads.head import HEAD_NAMES
from sface_jax.heads.head import get_head
from sface_jax.heads.lsoftmax import lsoftmax_logits
from sface_jax.heads.lsoftmax import lsoftmax_logits_with_target
from sface_jax.heads.magface import magface_logits
from sface_jax.heads.magface import magface_logits_with_target
from sface_jax.heads.margin import margin_logits
from sface_jax.heads.margin import margin_logits_with_target
from sface_jax.heads.margin import margin_target
from sface_jax.heads.sface import quality_intra_center
from sface_jax.heads.sface import quality_intra_height
from sface_jax.heads.sface import quality_sface_loss
from sface_jax.heads.sface import quality_sface_v2_loss
from sface_jax.heads.sface import sface_loss
from sface_jax.heads.sface import sface_loss_terms
from sface_jax.heads.softmax import cross_entropy
from sface_jax.heads.softmax import linear_logits
from sface_jax.heads.sphereface import sphereface_lambda
from sface_jax.heads.sphereface import sphereface_logits
from sface_jax.heads.sphereface import sphereface_logits_with_target
from sface_jax.heads.sphereface import sphereface_psi
from sface_jax.heads.triplet import batch_hard_triplet_loss

__all__ = [
    'ClassCenters', 'HEAD_NAMES', 'Head', 'HeadInputs', 'head_inputs', 'accuracy', 'adaface_logits',
    'adaface_logits_with_target', 'angle_stats', 'batch_hard_triplet_loss', 'center_loss',
    'cosine_logits', 'cross_entropy', 'curricular_logits', 'curricular_logits_with_target',
    'elastic_logits_with_target', 'elastic_margins', 'get_head', 'init_norm_stats',
    'linear_logits', 'lsoftmax_logits', 'lsoftmax_logits_with_target', 'magface_logits',
    'magface_logits_with_target', 'margin_logits', 'margin_logits_with_target', 'margin_target', 'norm_quality',
    'quality_intra_center', 'quality_intra_height', 'quality_sface_loss',
    'quality_sface_v2_loss', 'sface_loss', 'sface_loss_terms',
    'sphereface_lambda', 'sphereface_logits', 'sphereface_logits_with_target',
    'sphereface_psi', 'update_centers', 'update_norm_stats',
]
