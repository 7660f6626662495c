"""samtone-kernels: fused in-batch contrastive losses with same-tower negatives for dual encoders.

>>> from samtone_kernels import fused_samtone_loss, SamToNeLoss
"""

from ._choice import backend_choices
from .loss import fused_samtone_loss, triton_available
from .module import SamToNeLoss

__version__ = "0.1.0"
__all__ = ["SamToNeLoss", "backend_choices", "fused_samtone_loss", "triton_available", "__version__"]
