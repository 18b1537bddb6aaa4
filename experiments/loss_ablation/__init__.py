"""Loss ablation: sigmoid vs softmax (contrastive) across batch sizes at matched optimizer steps,
SigLIP's bias / temperature initialisation, and ring vs all-gather.

Every run trains one fixed small ViT CLIP (the `tiny` config's 2x64 towers, 64-d embeddings,
32px images; --layers blocks per tower, 1 in --smoke) on the built-in captioned shapes for the
same number of optimizer steps, and is evaluated on images training never showed: zero-shot
accuracy (48-way colour+shape) and image->text recall@1 on the (shape, colour) pairs training
never showed, zero-shot on the seen pairs. Stages (each run is one JSON under --out/runs; a rerun reuses every run whose settings
are unchanged, so an interrupted study resumes):

  grid      loss x batch (32..1024) x seed on one device, learning rate by the square-root rule
            lr(B) = base_lr * sqrt(B / base_batch) (Adam's rule: Malladi et al. 2022, "On the
            SDEs and scaling rules for adaptive gradient algorithms")
  lr_sweep  the rule's learning rate times each --lr-factors, seed 0: is the rule what decides?
  horizon   the smallest batch trained --steps times each --horizon-factors, every seed: were
            --steps enough for it, and where does its curve flatten (the gain of each doubling)?
  long      the grid again at --steps x --long-factor for the --long-batches, every seed: the
            losses compared at a much longer budget, closer to the small batches' flat curves
  init      SigLIP's Table 4 (Zhai et al. 2023): sigmoid loss, bias init {0, -10} x logit scale
            init {ln 1, ln 10}, at --init-batch, every seed
  ring      ring vs all-gather of both losses on --devices simulated devices, seed 0: the logged
            losses must agree to fp32 noise, measured by the all-gather loss on 1 device vs
            --devices (see statistics.trajectory_differences)
  memory    per-device temporary memory of the whole compiled train step and its step time,
            ring vs all-gather, at per-device batches --memory-batches on --devices devices
  repeat    the first grid run trained again: it must reproduce exactly

  python -m experiments.loss_ablation --update-docs  # the full study, its tables into the docs
  python -m experiments.loss_ablation --quick        # every stage, reduced, in a few minutes
  python -m experiments.loss_ablation --smoke        # every stage at its smallest, about a minute
                                                     # on 2 cores (the CI test runs this one)

Writes summary.json, table.md, accuracy_vs_batch.png, curves.png, lr_sweep.png and horizon.png
into --out; --update-docs rewrites the tables between the loss_ablation markers of
docs/loss_ablation.md (or of the file it names). Modules: settings (flags, run specs, stages),
runs (training one run, the run cache), memory (the memory stage), statistics, report (tables,
the docs writer), plots, study (the whole study from the flags).
"""
