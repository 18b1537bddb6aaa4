"""Evaluation: `zero_shot` (prompt-ensembled classifiers), `retrieval` (recall@k), `metrics`
(clip_benchmark's classification metrics and the one ranking rule), `linear_probe`, `generation`
(captions and caption scores of a captioning decoder)."""
