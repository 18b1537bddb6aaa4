"""The layout set at native aspect ratio: determinism, what the pixels show, held-out pairs, its
NaFlex and fixed-resolution batches, and its evaluation per bucket and sequence length."""
# pylint: disable=redefined-outer-name,protected-access
import chex
import jax
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

import clip
from data import naflex_batching
from data import synthetic
from data import synthetic_layout as layout
from data import synthetic_layout_eval
from data.synthetic_layout import LayoutCaptions

SIGLIP = clip.PreprocessConfig((0.5,) * 3, (0.5,) * 3, 'squash', 'bilinear')
COLOUR_TOLERANCE = 13   # object colours are drawn within +-12 of their palette entry


def tokenize(texts):
  """OpenAI's tokenizer at 32 tokens, a tokenizer as the pipelines take it."""
  return clip.tokenize(texts, context_length=32)


def test_deterministic_and_random_access():
  ds = LayoutCaptions(seed=7, resolution=32)
  batch = ds.get(np.arange(30, 45))
  again = LayoutCaptions(seed=7, resolution=32).get(np.arange(30, 45))
  chex.assert_trees_all_equal(batch, again)
  one = ds.get([37])
  np.testing.assert_array_equal(one['image'][0], batch['image'][7])
  assert one['caption'][0] == batch['caption'][7]
  assert {k: v[0] for k, v in one.items() if k in layout.LABELS} == {
      k: batch[k][7] for k in layout.LABELS}
  other = LayoutCaptions(seed=8, resolution=32).get(np.arange(30, 45))
  assert other['caption'] != batch['caption']


def test_pixels_show_what_the_caption_says():
  """Each scene is its bucket's size on a plain background; each object one connected region of
  about its area, of its colour on average, in one colour if solid and two if striped; the first
  left of (above) the second by more than they are apart across; the caption, parsed back,
  names the labels and the relation of the scene's axis."""
  ds = LayoutCaptions(seed=0, resolution=64, split='all')
  s = ds.get(np.arange(50))
  area = np.pi * (layout.RADIUS * 64) ** 2
  for i, image in enumerate(s['image']):
    w, h = layout.BUCKETS[i % 5]
    assert image.shape == (*layout.bucket_size(i % 5, 64), 3)
    assert s['axis'][i] == (0 if w > h else 1 if w < h else s['axis'][i])
    objects, count = ndimage.label(np.any(image != image[0, 0], -1))
    assert count == 2, (i, s['caption'][i])
    centres = []
    for slot in ('first', 'second'):
      colour = layout.SHADE * synthetic.RGB[s[f'colour_{slot}'][i]]
      mean_colour = [np.mean(image[objects == k], 0) for k in (1, 2)]
      k = 1 + int(np.argmin([np.abs(m - colour).max() for m in mean_colour]))
      assert np.abs(mean_colour[k - 1] - colour).max() < COLOUR_TOLERANCE
      assert 0.4 * area < (objects == k).sum() < 1.6 * area
      distinct = len(np.unique(image[objects == k], axis=0))
      assert distinct == 1 + s[f'pattern_{slot}'][i], (i, slot, s['caption'][i])
      centres.append(ndimage.center_of_mass(objects == k))
    along, across = (1, 0) if s['axis'][i] == 0 else (0, 1)
    gap = np.subtract(centres[1], centres[0])
    assert gap[along] > abs(gap[across]), (i, s['caption'][i])
    parsed = LayoutCaptions.parse_caption(s['caption'][i])
    template = layout.TEMPLATES[s['template'][i]]
    for key, value in parsed.items():
      named = key in ('axis', 'swap') or '{' + key.split('_')[0] in template
      assert value == (s[key][i] if named else -1), (key, s['caption'][i])
  with pytest.raises(ValueError, match='not a layout caption'):
    LayoutCaptions.parse_caption('a red circle next to a blue square.')
  with pytest.raises(ValueError, match='not a layout caption'):
    LayoutCaptions.parse_caption('a red circle left of a big blue square.')


def test_squashing_a_wide_scene_erases_its_stripes_native_patches_keep_them():
  """The set's point: squashed to R x R (its long side halved by PIL's bilinear filter), a 4:1
  scene with striped objects equals the same scene drawn solid inside the objects' outlines (to
  2 uint8 levels), where the native pixels differ by a third of the colour; its NaFlex patches at
  the same budget, (R/P)^2, are the scene's own pixels, stripes and all."""
  ds = LayoutCaptions(seed=2, resolution=64, split='all')
  idx = np.arange(4, 200, 5)   # the 4:1 bucket
  attrs = ds.attributes(idx)
  striped = ds._draw(idx, attrs)
  solid = ds._draw(idx, {**attrs, 'pattern_first': 0 * idx, 'pattern_second': 0 * idx})
  squash = lambda x: np.asarray(Image.fromarray(x).resize((64, 64), Image.Resampling.BILINEAR),
                                np.int32)
  checked = 0
  for i in np.flatnonzero(attrs['pattern_first'] | attrs['pattern_second']):
    native_gap = np.abs(striped[i].astype(np.int32) - solid[i]).max(-1)
    # Squashed pixels whose filter (4 columns, 2 rows) reads only an object's inside.
    inside = ndimage.binary_erosion(np.any(solid[i] != solid[i][0, 0], -1), np.ones((3, 5)))
    inside_64 = inside[np.arange(64) // 2][:, 2 * np.arange(64)] & inside[np.arange(64) // 2][
        :, 2 * np.arange(64) + 1]
    squashed_gap = np.abs(squash(striped[i]) - squash(solid[i])).max(-1)
    assert native_gap.max() > 20
    assert squashed_gap[inside_64].max(initial=0) <= 2, (i, ds.captions(attrs)[i])
    checked += inside_64.any()
    patches, _, shapes = clip.naflex_preprocess([striped[i]], 8, 64, SIGLIP)
    np.testing.assert_array_equal(shapes, [[4, 16]])
    native = striped[i].reshape(4, 8, 16, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
    np.testing.assert_allclose(patches[0], native / np.float32(127.5) - 1, atol=1e-6)
  assert checked > 10


def test_heldout_pairs_only_in_their_split():
  def pairs(split):
    a = LayoutCaptions(1, 32, split).attributes(np.arange(3000))
    return {frozenset(p) for p in zip(a['shape_first'], a['shape_second'])}
  heldout = {frozenset(p) for p in layout.HELDOUT_PAIRS}
  assert set().union(*heldout) == set(range(len(layout.SHAPES)))
  assert not pairs('train') & heldout
  assert pairs('heldout') == heldout
  assert pairs('train') | heldout == pairs('all')
  assert len(pairs('all')) == 15


def test_naflex_batches_follow_the_plan_and_equal_naflex_preprocess():
  """Step g has the plan's (B, S) and samples [examples_before(g), ... + B); its patches are
  `clip.naflex_preprocess` of those scenes; a resumed stream continues it; two processes' shares
  make the global batch."""
  ds = LayoutCaptions(3, 32)
  plan = naflex_batching.NaFlexBatching(patch_size=8, seq_lengths=(8, 16), tokens_per_batch=64,
                                        batch_multiple=2, seed=1)
  kwargs = dict(tokenize=tokenize, preprocess=SIGLIP)
  stream = ds.batches_naflex(plan, process_index=0, process_count=1, **kwargs)
  steps = [next(stream) for _ in range(4)]
  assert {plan.step_shape(g)[1] for g in range(4)} == {8, 16}
  for g, batch in enumerate(steps):
    size, length = plan.step_shape(g)
    first = plan.examples_before(g)
    raw = ds.get(np.arange(first, first + size))
    patches, mask, shapes = clip.naflex_preprocess(raw['image'], 8, length, SIGLIP)
    chex.assert_trees_all_equal(batch, {'patches': patches, 'spatial_shapes': shapes,
                                        'tokens': tokenize(raw['caption'])})
    assert mask.sum() == shapes.prod(1).sum()
  resumed = ds.batches_naflex(plan, start_step=2, process_index=0, process_count=1, **kwargs)
  chex.assert_trees_all_equal(next(resumed), steps[2])
  halves = [next(ds.batches_naflex(plan, start_step=3, process_index=p, process_count=2,
                                   **kwargs)) for p in range(2)]
  chex.assert_trees_all_equal(steps[3], jax.tree.map(lambda *x: np.concatenate(x), *halves))


def test_fixed_batches_are_the_squashed_scenes():
  """The baseline's view: each scene squashed to R x R (PIL's bilinear resize, normalised with
  mean and std 0.5), samples from `start_example` (or `start_step * B`), shared by processes."""
  ds = LayoutCaptions(3, 32)
  kwargs = dict(tokenize=tokenize, preprocess=SIGLIP, process_count=1, process_index=0)
  batch = next(ds.batches(10, start_example=7, **kwargs))
  raw = ds.get(np.arange(7, 17))
  squashed = [np.asarray(Image.fromarray(x).resize((32, 32), Image.Resampling.BILINEAR))
              for x in raw['image']]
  chex.assert_trees_all_close(batch['image'], np.stack(squashed) / np.float32(127.5) - 1,
                              atol=1e-6)
  np.testing.assert_array_equal(batch['tokens'], tokenize(raw['caption']))
  stream = ds.batches(4, start_step=1, **kwargs)
  next(stream)
  chex.assert_trees_all_equal(next(stream), next(ds.batches(4, start_example=8, **kwargs)))
  halves = [next(ds.batches(10, start_example=7, tokenize=tokenize, preprocess=SIGLIP,
                            process_index=p, process_count=2)) for p in range(2)]
  chex.assert_trees_all_equal(batch, jax.tree.map(lambda *x: np.concatenate(x), *halves))
  with pytest.raises(ValueError, match='multiple of the process count'):
    ds.batches(5, tokenize=tokenize, preprocess=SIGLIP, process_index=0, process_count=2)


@pytest.fixture(scope='module')
def tiny_siglip():
  cfg = clip.CLIPConfig(
      embed_dim=16, vision=clip.VisionConfig('vit', width=32, layers=1, heads=2,
                                             image_resolution=32, patch_size=8, pool='map'),
      text=clip.TextConfig(width=32, layers=1, heads=2, context_length=16),
      logit_bias=True, preprocess=SIGLIP)
  return clip.init(jax.random.PRNGKey(0), cfg), cfg


def test_evaluate_per_bucket_at_each_length(tiny_siglip):
  """Every split, task and bucket at two lengths. A square scene at S = (R/P)^2 patches is the
  fixed-resolution image itself, and the NaFlex tower then runs the fixed one's computation: its
  bucket's numbers equal the fixed-resolution evaluation's (two independent image paths)."""
  params, cfg = tiny_siglip
  run = lambda **kw: synthetic_layout_eval.evaluate(params, cfg, 10, 1, batch_size=16, **kw)
  naflex, fixed = run(seq_lengths=(8, 16)), run()
  for split in ('train', 'heldout'):
    for bucket in layout.BUCKET_NAMES:
      for length in (8, 16):
        for task in ('layout', 'colours', 'patterns', 'order'):
          assert 0 <= naflex[f'{split}/len{length}/{bucket}/{task}_top1'] <= 1
        assert 0 <= naflex[f'{split}/len{length}/{bucket}/image_to_text_R@1'] <= 1
      # Two scenes per bucket: retrieval among them is a choice of one in two.
      assert naflex[f'{split}/len16/{bucket}/text_to_image_R@5'] == 1
    square = {k.split('/', 2)[-1]: v for k, v in naflex.items()
              if k.startswith(f'{split}/len16/1x1/')}
    assert len(square) == 12   # 4 tasks' top1 and chance, 4 recalls
    assert square == {k.split('/', 1)[-1]: v for k, v in fixed.items()
                      if k.startswith(f'{split}/1x1/')}
    assert fixed[f'{split}/layout_chance'] == 1 / 60
  with pytest.raises(ValueError, match='non-empty sequence'):
    synthetic_layout_eval.evaluate(params, cfg, 10, 1, seq_lengths=())
  with pytest.raises(ValueError, match='a scene per aspect-ratio'):
    synthetic_layout_eval.evaluate(params, cfg, 4, 1)


def test_prompts_name_each_class_both_ways_round():
  first = synthetic_layout_eval.prompts('layout')[0]
  assert first == ['a circle left of a square.', 'a square right of a circle.']
  assert synthetic_layout_eval.prompts('colours')[-1] == [
      'a white shape above a pink shape.', 'a pink shape below a white shape.']
  s = LayoutCaptions(0, 32).get(np.arange(20))
  names = synthetic_layout_eval.prompts('layout')
  for i, label in enumerate(synthetic_layout_eval.labels(s, 'layout')):
    parsed = LayoutCaptions.parse_caption(names[label][0])
    assert (parsed['shape_first'], parsed['shape_second'], parsed['axis']) == (
        s['shape_first'][i], s['shape_second'][i], s['axis'][i])


PLAN = naflex_batching.NaFlexBatching(patch_size=8, seq_lengths=(16,), batch_size=3)


@pytest.mark.parametrize('call, error, match', [
    (lambda: LayoutCaptions(split='test'), ValueError, 'split must be one of'),
    (lambda: LayoutCaptions(resolution=24), ValueError, 'resolution must be an int >= 32'),
    (lambda: LayoutCaptions().get([-1]), ValueError, 'indices must be >= 0'),
    (lambda: LayoutCaptions().batches_naflex(PLAN, tokenize=tokenize, preprocess=SIGLIP,
                                             process_index=0, process_count=2),
     ValueError, 'multiple of the process count 2'),
    (lambda: LayoutCaptions().batches_naflex(PLAN, tokenize=tokenize, preprocess=None),
     TypeError, 'preprocess'),
    (lambda: LayoutCaptions().batches(4, tokenize=tokenize, preprocess=clip.PreprocessConfig()),
     ValueError, "'shortest' centre-crops"),
])
def test_bad_arguments(call, error, match):
  """Refused when called, before any batch is drawn (or anything compiled)."""
  with pytest.raises(error, match=match):
    call()
