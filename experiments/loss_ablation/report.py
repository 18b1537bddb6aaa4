"""The study's report: its tables (markdown, the text `table.md` and the docs hold) and the docs
writer, which replaces what lies between the loss_ablation markers of docs/loss_ablation.md."""
import math

from clip.formats import files
from experiments.loss_ablation import settings
from experiments.loss_ablation import statistics

DOCS_BEGIN, DOCS_END = '<!-- loss_ablation:begin -->', '<!-- loss_ablation:end -->'


def reach_line(args):
  sums = {b: statistics.learning_rate_sum(b, args.steps, args) for b in args.batch_sizes}
  return ('Adam moves the log temperature t\' by about the learning rate per step at most '
          '(Kingma & Ba 2015, section 2.1): over '
          f'{args.steps} steps, by at most ' + ', '.join(
              f'{v:.2f} (batch {b})' for b, v in sums.items())
          + ', so exp(t\') can grow by a factor of at most ' + ', '.join(
              f'{math.exp(v):.2f}' for v in sums.values()) + '.')


def sign_table(tests):
  lines = ['| metric | sigmoid ahead | contrastive ahead | ties | sign test p |',
           '| --- | ---: | ---: | ---: | ---: |']
  for key, title, _ in statistics.METRICS:
    t = tests[key]
    lines.append(f'| {title.replace(" %", "")} | {t["sigmoid_ahead"]} | '
                 f'{t["contrastive_ahead"]} | {t["ties"]} | {t["p"]:.3f} |')
  return lines


def attribute_table(rows, first='batch'):
  """Held-out zero-shot accuracy per attribute (what the 48-way colour+shape task is made of)
  for the rows whose runs stored their whole evaluation (runs recorded before it have none)."""
  stored = [(row, loss) for row in rows for loss in settings.LOSSES if row[loss]['attributes']]
  if not stored:
    return ['(no run of these rows stored its per-attribute evaluation)']
  chance = stored[0][0][stored[0][1]]['attributes']['chance']
  lines = [f'| {first} | loss | ' + ' | '.join(
      f'{a} % (chance {100 * chance[a]:.1f})' for a in statistics.ATTRIBUTES) + ' |',
           '| ---: | --- |' + ' ---: |' * len(statistics.ATTRIBUTES)]
  for row, loss in stored:
    attrs = row[loss]['attributes']
    lines.append(f'| {row[first]} | {loss} | '
                 + ' | '.join(_pm(attrs[a], 100) for a in statistics.ATTRIBUTES) + ' |')
  return lines


def gains_table(rows):
  lines = ['| steps | loss | seeds | R@1 held-out gain (pp) | zero-shot held-out gain (pp) | '
           'final training loss change |', '| --- | --- | ---: | ---: | ---: | ---: |']
  for r in rows:
    lines.append(f'| {r["from_steps"]} → {r["to_steps"]} | {r["loss"]} | {r["seeds"]} | '
                 f'{_ci(r["recall_at_1_heldout"])} | {_ci(r["zero_shot_heldout"])} | '
                 f'{_ci(r["final_loss"], 1, 3)} |')
  return lines


def _pm(ms, scale, digits=1):
  return f'{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}'


def _ci(d, scale=100, digits=1):
  mean, lo, hi = (v * scale for v in d)
  if math.isnan(lo):
    return f'{mean:+.{digits}f}'
  mark = ' **' if lo > 0 or hi < 0 else ''
  return f'{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}'


def loss_table(rows, seeds, first='batch'):
  """The per-loss table and the sigmoid - contrastive table of `rows`, keyed by `first`."""
  lines = [f'| {first} | lr | loss | zero-shot held-out % | R@1 held-out % | zero-shot seen % '
           '| final loss | last-quarter drop % | final exp(t\') | step ms |',
           '| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for row in rows:
    for loss in settings.LOSSES:
      r = row[loss]
      lines.append(f'| {row[first]} | {row["learning_rate"]:.2g} | {loss} | '
                   f'{_pm(r["zero_shot_heldout"], 100)} | {_pm(r["recall_at_1_heldout"], 100)} '
                   f'| {_pm(r["zero_shot_seen"], 100)} | {_pm(r["final_loss"], 1, 3)} | '
                   f'{_pm(r["last_quarter_drop"], 100)} | {_pm(r["final_scale"], 1)} | '
                   f'{_pm(r["step_s"], 1000, 0)} |')
  lines += ['', f'Sigmoid minus contrastive, mean over {seeds} paired seed(s) with its 95% '
            'Student-t interval (** where the interval excludes 0):', '',
            f'| {first} | zero-shot held-out (pp) | R@1 held-out (pp) | zero-shot seen (pp) |',
            '| ---: | ---: | ---: | ---: |']
  for row in rows:
    lines.append(f'| {row[first]} | ' + ' | '.join(
        _ci(row['sigmoid_minus_contrastive_' + key]) for key, _, _ in statistics.METRICS) + ' |')
  return lines


def sweep_table(rows):
  factors = sorted({f for r in rows for f in r['factors']})
  head = ' | '.join(f'lr x{f:g}' for f in factors)
  lines = [f'| batch | loss | {head} | best by zero-shot | best by R@1 |',
           '| ---: | --- |' + ' ---: |' * (len(factors) + 2)]
  for r in rows:
    zs = dict(zip(r['factors'], r['zero_shot_heldout']))
    r1 = dict(zip(r['factors'], r['recall_at_1_heldout']))
    cells = ' | '.join(f'{100 * zs[f]:.1f} / {100 * r1[f]:.1f}' if f in zs else '–'
                       for f in factors)
    lines.append(f'| {r["batch"]} | {r["loss"]} | {cells} | x{max(zs, key=zs.get):g} | '
                 f'x{max(r1, key=r1.get):g} |')
  return lines


def init_table(rows):
  lines = ['| bias init b | scale init t\' | zero-shot held-out % | R@1 held-out % | '
           'zero-shot seen % | vs the paper\'s choice: zero-shot held-out (pp) | '
           'R@1 held-out (pp) | final exp(t\') | final b |',
           '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in rows:
    paper = (r['init_logit_bias'], r['init_logit_scale']) == settings.INIT_GRID[-1]
    diffs = ('the paper\'s choice', '') if paper else (
        _ci(r['minus_paper_choice_zero_shot_heldout']),
        _ci(r['minus_paper_choice_recall_at_1_heldout']))
    lines.append(f'| {r["init_logit_bias"]:g} | ln {math.exp(r["init_logit_scale"]):.3g} | '
                 f'{_pm(r["zero_shot_heldout"], 100)} | {_pm(r["recall_at_1_heldout"], 100)} | '
                 f'{_pm(r["zero_shot_seen"], 100)} | {diffs[0]} | {diffs[1]} | '
                 f'{r["final_scale"][0]:.1f} | {r["final_logit_bias"][0]:.2f} |')
  return lines


def memory_table(measurements, checks):
  lines = ['| loss | per-device batch | global batch | all-gather temp MiB | ring temp MiB | '
           'all-gather step ms | ring step ms |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  keyed = {(m['loss'], m['implementation'], m['per_device_batch']): m for m in measurements}
  for loss in settings.LOSSES:
    for b in sorted({m['per_device_batch'] for m in measurements}):
      ag, ring = keyed.get((loss, 'all-gather', b)), keyed.get((loss, 'ring', b))
      if ag and ring:
        lines.append(f'| {loss} | {b} | {ag["batch"]} | {ag["temp_mib_per_device"]:.1f} | '
                     f'{ring["temp_mib_per_device"]:.1f} | {1000 * ag["step_s"]:.0f} | '
                     f'{1000 * ring["step_s"]:.0f} |')
  for c in checks:
    zs = ', '.join(f'{k} {100 * v:.1f}%' for k, v in c['zero_shot_heldout'].items()
                   if v is not None)
    lines.append(f'\nRing vs all-gather training ({c["loss"]}, batch {c["batch"]}, '
                 f'{c["devices"]} devices, seed {c["seed"]}): largest relative difference of '
                 f'the logged losses {c["max_rel_diff"]:.1e}, against {c["noise_floor"]:.1e} '
                 f'between all-gather on {c["devices"]} devices and on 1 '
                 f'({"passes" if c["passes"] else "FAILS"}); held-out zero-shot {zs}.')
  return lines


def update_docs(path, table):
  """Replaces what lies between the loss_ablation markers of the markdown file `path` with
  `table`, keeping the rest; ValueError if `path` lacks the markers."""
  with open(path) as f:
    text = f.read()
  if DOCS_BEGIN not in text or DOCS_END not in text:
    raise ValueError(f'{path} has no {DOCS_BEGIN} ... {DOCS_END} markers')
  head, rest = text.split(DOCS_BEGIN, 1)
  _, tail = rest.split(DOCS_END, 1)

  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(f'{head}{DOCS_BEGIN}\n{table}\n{DOCS_END}{tail}')
  files.atomic_write(path, write)


def study_table(args, runs, results):
  """The whole report, markdown: what table.md and the docs' generated section hold."""
  r = results
  caveat = (['One seed: no spread and no intervals (nan). `--quick` is a smoke test of the '
             'pipeline; its numbers mean nothing.', ''] if args.seeds == 1 else [])
  if args.layers != 2:
    caveat += [f'Towers of {args.layers} block(s) each, not the study\'s 2.', '']
  return '\n'.join(
      caveat + loss_table(r['grid'], args.seeds)
      + ['', reach_line(args)]
      + ['', 'Every (batch, seed) pair of the grid at once: which loss is ahead, and the '
         'two-sided sign test:', '']
      + sign_table(r['sign_tests'])
      + ['', f'The smallest batch trained longer (batch {min(args.batch_sizes)}, mean ± std '
         f'over {args.seeds} seed(s)):', '']
      + loss_table(r['horizon'], args.seeds, 'steps')
      + ['', 'What each longer horizon adds (batch '
         f'{min(args.batch_sizes)}; longer minus shorter, paired by seed, 95% interval):', '']
      + gains_table(r['horizon_gains'])
      + ['', f'The long grid: every batch of {args.long_batches} trained '
         f'{args.steps * args.long_factor} steps (mean ± std over {args.seeds} seed(s)):', '']
      + loss_table(r['long'], args.seeds)
      + ['', 'Every (batch, seed) pair of the long grid at once:', '']
      + sign_table(r['long_sign_tests'])
      + ['', 'What the held-out zero-shot task is made of: per-attribute accuracy (mean ± std '
         'over seeds) of the horizon runs and the long grid, the runs that stored it:', '']
      + attribute_table(r['horizon'], 'steps') + ['']
      + attribute_table(r['long'])
      + ['', 'Learning-rate sweep (held-out zero-shot % / R@1 %, seed 0; x1 is the rule\'s):',
         '']
      + sweep_table(r['lr_sweep'])
      + ['', f'SigLIP Table 4 on our data (sigmoid loss, batch {args.init_batch}, mean ± std '
         f'over {args.seeds} seed(s); the difference is paired by seed, 95% interval):', '']
      + init_table(r['init'])
      + ['', f'Ring vs all-gather, {args.devices} simulated devices (per-device temporary '
         'memory of the whole train step; median step time):', '']
      + memory_table(r['memory'], r['trajectory_checks'])
      + ['', f'{len(runs)} training runs ({args.steps} steps each, the horizon stage\'s and '
         f'the long grid\'s longer), their training and evaluation {r["training_hours"]:.2f} h '
         f'of wall time in all on this machine; zero-shot is 48-way colour+shape (chance '
         f'{100 * runs[0]["zero_shot_chance"]:.1f}%). The first grid run, trained again: '
         f'{"identical" if r["repeat_identical"] else "DIFFERENT"}. Diverged runs (a '
         'non-finite training loss), left out of every table and statistic: '
         + (', '.join(r['diverged']) if r['diverged'] else 'none') + '.'])
