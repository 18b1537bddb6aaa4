"""Image-text losses: single-device references and their `shard_map` versions (see DESIGN.md)."""
from losses.allgather import allgather_contrastive_loss
from losses.allgather import allgather_sigmoid_loss
from losses.distillation import DISTILLATION_LOSSES
from losses.distillation import allgather_distillation_loss
from losses.distillation import distillation_loss
from losses.distillation import make_distillation_loss
from losses.distillation import ring_distillation_loss
from losses.make import LOSSES
from losses.make import check_name
from losses.make import make_loss
from losses.make import takes_bias
from losses.reference import contrastive_loss
from losses.reference import sigmoid_loss
from losses.ring import ring_contrastive_loss
from losses.ring import ring_sigmoid_loss
