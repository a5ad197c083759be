"""Vector quantizers: one codebook stage (`VectorQuantizer`), residual stacks (`ResidualVQ`), and the
gradient estimators (`rotation_trick`, straight-through) they use.

Layout: estimators.py (gradient estimators), codebook.py (one stage: codes, affine map, learning, upkeep),
stages.py (the shared forward pass), residual.py (the stack), upkeep.py (k-means++, distributed helpers).
"""

from .codebook import VectorQuantizer
from .estimators import rotation_trick, straight_through, synchronized
from .residual import ResidualVQ
from .stages import QuantizerOutput

__all__ = ["QuantizerOutput", "ResidualVQ", "VectorQuantizer", "rotation_trick", "straight_through", "synchronized"]
