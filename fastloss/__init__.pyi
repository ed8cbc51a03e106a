# Type stubs for the public API of fastloss.
from typing import Any, Literal, Sequence, TextIO

import numpy as np
import numpy.typing as npt

from fastloss import reference as reference

__version__: str

_Reduction = Literal["mean", "sum", "none"]
_Axis = int | Sequence[int] | None
_Loss = np.floating[Any] | npt.NDArray[np.floating[Any]]
_Array = npt.ArrayLike

def show_config(file: TextIO | None = ...) -> None: ...
def config() -> dict[str, Any]: ...
def set_num_threads(n: int | None) -> None: ...
def get_num_threads() -> int: ...

def mse_loss(input: _Array, target: _Array, *, weight: _Array | None = ..., reduction: _Reduction = ...,
             axis: _Axis = ..., num_threads: int | None = ...) -> _Loss: ...
def l1_loss(input: _Array, target: _Array, *, weight: _Array | None = ..., reduction: _Reduction = ...,
            axis: _Axis = ..., num_threads: int | None = ...) -> _Loss: ...
def huber_loss(input: _Array, target: _Array, *, delta: float = ..., weight: _Array | None = ...,
               reduction: _Reduction = ..., axis: _Axis = ..., num_threads: int | None = ...) -> _Loss: ...
def smooth_l1_loss(input: _Array, target: _Array, *, beta: float = ..., weight: _Array | None = ...,
                   reduction: _Reduction = ..., axis: _Axis = ..., num_threads: int | None = ...) -> _Loss: ...
def rmse(input: _Array, target: _Array, *, weight: _Array | None = ..., axis: _Axis = ...,
         num_threads: int | None = ...) -> _Loss: ...

def mse_loss_with_grad(input: _Array, target: _Array, *, weight: _Array | None = ...,
                       reduction: _Reduction = ..., axis: _Axis = ..., num_threads: int | None = ...,
                       grad_out: npt.NDArray[Any] | None = ...) -> tuple[_Loss, npt.NDArray[Any]]: ...
def l1_loss_with_grad(input: _Array, target: _Array, *, weight: _Array | None = ...,
                      reduction: _Reduction = ..., axis: _Axis = ..., num_threads: int | None = ...,
                      grad_out: npt.NDArray[Any] | None = ...) -> tuple[_Loss, npt.NDArray[Any]]: ...
def huber_loss_with_grad(input: _Array, target: _Array, *, delta: float = ..., weight: _Array | None = ...,
                         reduction: _Reduction = ..., axis: _Axis = ..., num_threads: int | None = ...,
                         grad_out: npt.NDArray[Any] | None = ...) -> tuple[_Loss, npt.NDArray[Any]]: ...
def smooth_l1_loss_with_grad(input: _Array, target: _Array, *, beta: float = ...,
                             weight: _Array | None = ..., reduction: _Reduction = ..., axis: _Axis = ...,
                             num_threads: int | None = ...,
                             grad_out: npt.NDArray[Any] | None = ...) -> tuple[_Loss, npt.NDArray[Any]]: ...
def rmse_with_grad(input: _Array, target: _Array, *, weight: _Array | None = ..., axis: _Axis = ...,
                   num_threads: int | None = ...,
                   grad_out: npt.NDArray[Any] | None = ...) -> tuple[_Loss, npt.NDArray[Any]]: ...

mse = mse_loss
mae = l1_loss

# cross-entropy family (fastloss.classification)
def cross_entropy(logits: _Array, target: _Array, *, weight: _Array | None = ..., sample_weight: _Array | None = ...,
                  ignore_index: int = ..., reduction: _Reduction = ..., label_smoothing: float = ...,
                  z_loss: float = ..., softcap: float | None = ..., axis: int = ...,
                  num_threads: int | None = ...) -> _Loss: ...
def cross_entropy_with_grad(logits: _Array, target: _Array, *, weight: _Array | None = ...,
                            sample_weight: _Array | None = ..., ignore_index: int = ...,
                            reduction: _Reduction = ..., label_smoothing: float = ..., z_loss: float = ...,
                            softcap: float | None = ..., axis: int = ..., num_threads: int | None = ...,
                            grad_out: npt.NDArray[Any] | None = ...) -> tuple[_Loss, npt.NDArray[Any]]: ...
def log_softmax(x: _Array, axis: int = ..., *, out: npt.NDArray[Any] | None = ...,
                num_threads: int | None = ...) -> npt.NDArray[Any]: ...
def softmax(x: _Array, axis: int = ..., *, out: npt.NDArray[Any] | None = ...,
            num_threads: int | None = ...) -> npt.NDArray[Any]: ...
def logsumexp(x: _Array, axis: int = ..., *, num_threads: int | None = ...) -> npt.NDArray[np.floating[Any]]: ...
def nll_loss(log_probs: _Array, target: _Array, *, weight: _Array | None = ..., ignore_index: int = ...,
             reduction: _Reduction = ..., num_threads: int | None = ...) -> _Loss: ...
def perplexity(logits: _Array, target: _Array, *, ignore_index: int = ...,
               num_threads: int | None = ...) -> np.floating[Any]: ...
