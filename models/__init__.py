"""vims.models: anomaly detectors on system-call sequences, their calibration, streaming and safe files.

- Detectors (scikit-learn outlier API: ``fit``, ``score_samples`` higher = more normal,
  ``decision_function`` negative = anomalous, ``predict`` +1/-1, plus ``anomaly_score`` and ``update``):
  :class:`~vims.models.stide.Stide`, :class:`~vims.models.ngram.NGram` (Kneser-Ney),
  :class:`~vims.models.knn.KNN` (hashed n-gram TF-IDF), :class:`~vims.models.mlp.MLPNextCall`,
  :class:`~vims.models.ensemble.Ensemble`; by name through :mod:`vims.models.registry`.
- :mod:`vims.models.calibration`: thresholds for a target false-alarm rate from out-of-fold scores.
- Streaming: every per-call detector (:class:`~vims.models.base.CallDetector`) scores a stream of
  calls piece by piece (``init_state``, ``score_calls``, ``score_streams``), equal to batch scoring;
  the A-VM's scorer (:mod:`vims.avm.scoring`) builds its per-process scores of event batches on it.
- :mod:`vims.models.persist`: skops files with trusted types only, and a JSON model card.
- :mod:`vims.models.modelset`: one detector per program with a fallback.
- :func:`as_flat` / :class:`Flat`: traces (a trace table or sequences of numbers) as one array of calls
  plus offsets, the layout every detector takes.

Models take whatever integers they are given: ADFA-LD is 32-bit x86 numbering, the guest's events are
x86-64; never score one with a model fitted on the other. Numbers unseen in training are pooled.
"""

from vims.models._seq import Flat, as_flat

__all__ = ["Flat", "as_flat"]
