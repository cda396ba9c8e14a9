"""DeCLIP's loss terms, one table read by everything that names them.

`DeCLIP` builds a term's heads and tracker from its entry and weighs it by its
weight argument; the presets, `train`'s options and the plain-CLIP baseline
take their weights from here; the gradient diagnostics and the logs use the
term's name. A new term is its loss function (`declip_keras.models.losses`),
one entry here, and its branch in `DeCLIP.call` and
`DeCLIP.compute_loss_terms`. Imports nothing, so the command line reads it
before Keras loads.
"""

from __future__ import annotations

import dataclasses

from declip_keras.data.batch_format import IMAGE_2, MLM_TARGETS


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One term of `L = sum(weight * term)`.

    Attributes:
        name: the logged name (`fit` history, TensorBoard, diagnostics).
        weight: the `DeCLIP` argument, preset field and `declip-keras train`
            option that weighs it; 0 removes the term, its heads and its
            computation.
        default: its weight in the released YFCC15M configs.
        clip_baseline: its weight in the plain-CLIP baseline.
        inputs: the batch keys it needs besides the first image view and the
            caption.
        summary: what it compares, for `--help`.

    Example:
    >>> [term.weight for term in LOSS_TERMS if term.clip_baseline]
    ['clip_weight']
    """

    name: str
    weight: str
    default: float
    clip_baseline: float
    inputs: tuple[str, ...]
    summary: str


LOSS_TERMS = (
    # The loss weights apply to MVS directly, as in the released code.
    LossTerm(
        "clip_loss",
        "clip_weight",
        0.4,
        1.0,
        (),
        "the contrastive loss over 2 image x 2 text views (MVS)",
    ),
    LossTerm(
        "ss_loss", "ss_weight", 0.2, 0.0, (IMAGE_2,), "SimSiam between two image views"
    ),
    LossTerm(
        "mlm_loss",
        "mlm_weight",
        0.2,
        0.0,
        MLM_TARGETS,
        "masked language modelling on the caption",
    ),
    LossTerm(
        "nn_loss",
        "nn_weight",
        0.2,
        0.0,
        (),
        "the contrastive loss against nearest-neighbour captions (NNS)",
    ),
)

# The weight fields, in the table's order.
LOSS_WEIGHTS = tuple(term.weight for term in LOSS_TERMS)
DEFAULT_WEIGHTS = {term.weight: term.default for term in LOSS_TERMS}
