"""handlstm_cuda: a fused LSTM for PyTorch with a hand-derived backward, on CPU and CUDA.

    import handlstm_cuda
    output, h_n, c_n = handlstm_cuda.lstm(input, h0, c0, weight_ih, weight_hh, bias)

See README.md for the API, the drop-in modules and the benchmarks.
"""

from . import reference
from ._ext import cpu_pointwise_path, has_cuda_kernels
from ._ops import (CUDA_TIME_LOOPS, LSTMFunction, clear_cuda_graphs, cuda_kernels_enabled,
                   cuda_persistent_enabled, cuda_time_loop, load_cuda_crossovers, lstm,
                   set_cuda_kernels_enabled, set_cuda_persistent_enabled, set_cuda_time_loop)
from .modules import LSTM, LSTMCell

__all__ = ["lstm", "LSTMFunction", "LSTM", "LSTMCell", "reference", "has_cuda_kernels",
           "cpu_pointwise_path", "cuda_kernels_enabled", "set_cuda_kernels_enabled",
           "cuda_persistent_enabled", "set_cuda_persistent_enabled", "CUDA_TIME_LOOPS",
           "cuda_time_loop", "set_cuda_time_loop", "load_cuda_crossovers", "clear_cuda_graphs"]
__version__ = "0.1.0"
