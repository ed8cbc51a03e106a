"""fastloss: fast, numerically careful loss functions and gradients for CPUs.

NumPy arrays in, NumPy arrays and scalars out; names and keywords follow
``torch.nn.functional``.  The kernels are C (src_c/), compiled for several ISAs
and chosen at import from the CPU (override with ``FASTLOSS_ISA``), threaded
with OpenMP, and release the GIL.

>>> import numpy as np, fastloss
>>> fastloss.mse_loss(np.ones(4, np.float32), np.zeros(4, np.float32))
np.float32(1.0)
"""
__version__ = "0.1.0"

try:
    from fastloss import _core  # noqa: F401  (the compiled extension)
except ImportError as _exc:
    # Imported from a source checkout that has no compiled extension (e.g. `python -m fastloss`
    # run in the repository after `pip install .`): use the installed build's modules.
    from fastloss._source_tree import installed_package_dir

    __path__[:] = [installed_package_dir(__path__[0], _exc)]
    from fastloss import _core  # noqa: F401

from fastloss._config import _select_isa_from_env

_select_isa_from_env()

from fastloss import reference  # noqa: E402
from fastloss._capi import get_cflags, get_include, get_ldflags, get_library, get_library_dir  # noqa: E402
from fastloss._config import config, get_num_threads, set_num_threads, show_config  # noqa: E402
from fastloss.classification import (cross_entropy, cross_entropy_with_grad, log_softmax, logsumexp,  # noqa: E402
                                     nll_loss, perplexity, softmax)
from fastloss.distillation import kl_div_logits, kl_div_logits_with_grad  # noqa: E402
from fastloss.linear import linear_cross_entropy, linear_cross_entropy_with_grad  # noqa: E402
from fastloss.margin import (multi_margin_loss, multi_margin_loss_with_grad, triplet_margin_loss,  # noqa: E402
                             triplet_margin_loss_with_grad)
from fastloss.sequence import (dpo_loss, dpo_loss_with_grad, info_nce_loss, info_nce_loss_with_grad,  # noqa: E402
                               sequence_log_probs, sequence_log_probs_with_grad)
from fastloss.elementwise import (binary_cross_entropy, binary_cross_entropy_with_grad,  # noqa: E402
                                  binary_cross_entropy_with_logits, binary_cross_entropy_with_logits_with_grad,
                                  hinge_loss, hinge_loss_with_grad, kl_div, kl_div_with_grad, sigmoid_focal_loss,
                                  sigmoid_focal_loss_with_grad)
from fastloss.regression import (huber_loss, huber_loss_with_grad, l1_loss, l1_loss_with_grad,  # noqa: E402
                                 mae, mse, mse_loss, mse_loss_with_grad, rmse, rmse_with_grad,
                                 smooth_l1_loss, smooth_l1_loss_with_grad)

__all__ = [
    "__version__", "show_config", "config", "set_num_threads", "get_num_threads", "reference",
    "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "rmse", "mse", "mae",
    "mse_loss_with_grad", "l1_loss_with_grad", "huber_loss_with_grad", "smooth_l1_loss_with_grad",
    "rmse_with_grad",
    "cross_entropy", "cross_entropy_with_grad", "log_softmax", "softmax", "logsumexp", "nll_loss", "perplexity",
]
__all__ += ["multi_margin_loss", "multi_margin_loss_with_grad", "triplet_margin_loss", "triplet_margin_loss_with_grad",
            "kl_div_logits", "kl_div_logits_with_grad"]
__all__ += ["sequence_log_probs", "sequence_log_probs_with_grad", "dpo_loss", "dpo_loss_with_grad", "info_nce_loss",
            "info_nce_loss_with_grad"]
__all__ += ["binary_cross_entropy", "binary_cross_entropy_with_grad", "binary_cross_entropy_with_logits",
            "binary_cross_entropy_with_logits_with_grad", "sigmoid_focal_loss", "sigmoid_focal_loss_with_grad",
            "hinge_loss", "hinge_loss_with_grad", "kl_div", "kl_div_with_grad"]
__all__ += ["get_include", "get_library", "get_library_dir", "get_cflags", "get_ldflags"]
__all__ += ["linear_cross_entropy", "linear_cross_entropy_with_grad"]
