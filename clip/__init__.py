"""CLIP in plain JAX: pure functions over nested dicts keyed like OpenAI's torch state dict."""
from clip.configs import CLIPConfig
from clip.configs import IMAGE_MEAN
from clip.configs import IMAGE_STD
from clip.configs import MODELS
from clip.configs import TextConfig
from clip.configs import VisionConfig
from clip.configs import get_config
from clip.configs import normalize_image
from clip.model import apply
from clip.model import encode_image
from clip.model import encode_text
from clip.model import init
from clip.model import split_batch_stats
from clip.model import update_batch_stats
