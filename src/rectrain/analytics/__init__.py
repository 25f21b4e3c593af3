"""Analyses of trained models: customer segments from user vectors, calibrated probabilities.

* :mod:`rectrain.analytics.user_vectors`: one vector per user (NCF user embedding, two-tower query
  of the whole history) and its definition;
* :mod:`rectrain.analytics.segments`: k-means (scikit-learn) with k given or chosen by silhouette;
  the files it writes for export (``segments.json``/``segments.npz``) and the nearest-centroid
  assignment a scorer repeats live in :mod:`rectrain.artifacts`, as do calibration's;
* :mod:`rectrain.analytics.reports`: segment profiles (size, activity, lift of categories and
  items, popularity), markdown/CSV/PNG, and :func:`~rectrain.analytics.reports.segment_checkpoint`
  (what ``segment.py`` runs);
* :mod:`rectrain.analytics.calibration`: ECE/log loss, Platt scaling with the negative-sampling
  prior correction, :func:`~rectrain.analytics.calibration.calibrate_checkpoint` (what
  ``calibrate.py`` runs) and ``calibration.json`` keyed by checkpoint sha256.

Needs the ``analytics`` extra (scikit-learn, matplotlib) for clustering and pictures; the metrics
and :class:`~rectrain.artifacts.Calibration` are numpy only. A checkpoint is opened with
:func:`rectrain.runs.open_run`. Nothing is imported here,
so ``import rectrain.analytics`` stays cheap.
"""
