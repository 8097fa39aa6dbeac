"""The downstream evaluation of a pretrained DCLR backbone, one job a module; ``python -m dclr_dist.eval``
runs them.

- ``features``: clip-averaged video features of a split, in this process or in Ray tasks.
- ``probes``: the protocols on frozen features: linear probe, k-NN retrieval, scene bias; and
  the k-NN monitor of pretraining.
- ``finetune``: the fine-tuning protocol on Ray Train.
- ``report``: report.json, the table of report.txt, the plots.

``EvalError`` lives here, below every module of the package and ``dclr_dist.eval``.
"""


class EvalError(RuntimeError):
    """The evaluation cannot run; the message names what and says what to do."""
