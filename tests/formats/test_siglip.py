"""What every SigLIP release shares (clip/formats/siglip.py): the architecture its shapes give,
with the head counts and activations said, is the one transformers' config.json states."""
from clip.formats import hf
from clip.formats import siglip
from experiments import checkpoint_families


def test_shapes_give_the_config_transformers_states():
  model = checkpoint_families.hf_siglip(seed=5)  # MLP widths 112 and 96: not 4 x 64
  flat = hf.to_ours({k: v.numpy() for k, v in model.state_dict().items()}, 'siglip')
  stated = hf.config_from_hf(model.config.to_dict())
  got = siglip.siglip_from_shapes(flat, stated.vision.heads, stated.text.heads,
                                  stated.vision.mlp, stated.text.mlp)
  assert got == stated
  assert (got.vision.mlp_dim, got.text.mlp_dim) == (112, 96)

