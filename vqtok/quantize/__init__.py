"""Vector quantizers: one codebook stage (`VectorQuantizer`), residual stacks (`ResidualVQ`), and the
gradient estimators (`rotation_trick`, straight-through) they use.

Layout: estimators.py (gradient estimators), codebook.py (one stage: codes, affine map, learning, upkeep),
stages.py (the shared forward pass), residual.py (the stack), upkeep.py (k-means++, distributed helpers).
"""

from vqtok.quantize.codebook import VectorQuantizer
from vqtok.quantize.estimators import rotation_trick, straight_through, synchronized
from vqtok.quantize.residual import ResidualVQ
from vqtok.quantize.stages import QuantizerOutput

__all__ = ["QuantizerOutput", "ResidualVQ", "VectorQuantizer", "rotation_trick", "straight_through", "synchronized"]
