"""Drop-in replacements for ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` on the fused op.

Shape vocabulary: T time, N batch, I input, H hidden, G = 4H gates in the order i, f, g, o,
P projection size, Hout = P when projecting, else H, L layers, D directions (1 or 2).

Both modules keep nn's constructor, attributes, parameter names, shapes, registration order
and initialisation, so checkpoints move between them and ``torch.nn`` with ``strict=True``.
Every layer and direction is one call of :func:`handlstm_cuda.lstm`; there is no Python loop
over time. Parameters are looked up by name on every call, so ``torch.func.functional_call``
and reassigned weights take effect without any cache to refresh.
"""

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ._ops import _autocast_active, lstm

__all__ = ["LSTM", "LSTMCell"]


def _autocast_dtype(device_type):
    """The autocast dtype in force for ``device_type``, or None outside autocast (and on
    device types without an autocast rule for the op, such as meta)."""
    if _autocast_active(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _check_autocast_float64(owner, input_dtype, weight_dtype, cast):
    """Under autocast to `cast`: autocast leaves float64 alone and casts every other floating
    tensor, so float64 on one side only (input or weights) can never match; nn.LSTM and
    nn.LSTMCell fail there, and so do we, naming both dtypes."""
    if (input_dtype == torch.float64) != (weight_dtype == torch.float64):
        raise RuntimeError(f"{owner}: input dtype ({input_dtype}) does not match weight dtype "
                           f"({weight_dtype}): autocast to {cast} casts neither float64 nor "
                           f"to it")


def _check_state_pair(hx, owner, shapes):
    """hx must be a pair (h, c) of tensors; say so plainly instead of failing deep inside.

    shapes: the expected shapes of h_0 and c_0, named in the message for a lone tensor.
    """
    if not isinstance(hx, (tuple, list)):
        got = (f"a Tensor of shape {tuple(hx.shape)}" if isinstance(hx, torch.Tensor)
               else type(hx).__name__)
        raise TypeError(f"{owner}: hx must be a tuple (h_0, c_0) of two tensors of shapes "
                        f"{tuple(shapes[0])} and {tuple(shapes[1])}, got {got}")
    if len(hx) != 2:
        raise RuntimeError(f"{owner}: hx must be a tuple (h_0, c_0) of two tensors, got a "
                           f"{type(hx).__name__} of {len(hx)}")
    for idx, value in enumerate(hx):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: hx[{idx}] must be a tensor, got {type(value).__name__}")


def _not_scriptable(owner):
    """What torch.jit.script meets (through __prepare_scriptable__, which it calls on every
    module it is given, submodules included) instead of a TorchScript error from deep inside
    the Python forward."""
    raise RuntimeError(f"handlstm_cuda.{owner} does not support torch.jit.script: its forward "
                       "is Python that TorchScript cannot compile. Use torch.compile (it "
                       "compiles with fullgraph=True) or torch.export.")


def _packed_positions(batch_sizes, device):
    """Rows of the flattened padded (T*N) layout that a packed sequence's data occupies.

    batch_sizes: int64 CPU (T,), non-increasing, with N = batch_sizes[0]. Packed data is
    time-major with rows 0..batch_sizes[t]-1 at step t, which is the order in which a
    row-major (T, N) mask lists its true entries.
    """
    N = int(batch_sizes[0])
    active = torch.arange(N).unsqueeze(0) < batch_sizes.unsqueeze(1)
    return active.flatten().nonzero().squeeze(1).to(device), N


class LSTM(nn.Module):
    """Multi-layer LSTM with nn.LSTM's interface, running on the fused op.

    Args (as nn.LSTM): input_size I, hidden_size H, num_layers L, bias, batch_first,
    dropout (between layers, training only), bidirectional, proj_size P, device, dtype.

    forward(input, hx=None) -> (output, (h_n, c_n)):
        input: (T, N, I), (N, T, I) with batch_first, unbatched (T, I), or a PackedSequence.
        hx: (h_0 (L*D, N, Hout), c_0 (L*D, N, H)), 2-D when unbatched; zeros when None.
            batch_first never applies to hx.
        output: (T, N, D*Hout) laid out like input, features [forward | reverse];
            a PackedSequence when input was packed.
        h_n: (L*D, N, Hout), c_n: (L*D, N, H), layer-major and direction-minor.
    """

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size"]

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        # Checked in nn.LSTM's order, so a call with several bad arguments fails the same way.
        if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Number)
                or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=2)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(
                f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(
                f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(
                f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        G = 4 * hidden_size
        Hout = proj_size if proj_size > 0 else hidden_size

        # Names of each (layer, direction)'s parameters, in nn.LSTM's registration order:
        # layer-major, then direction, then w_ih, w_hh, [b_ih, b_hh], [w_hr].
        self._all_weights = []
        self._flat_weights_names = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else D * Hout
            for direction in range(D):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih" + sfx, (G, layer_in)), ("weight_hh" + sfx, (G, Hout))]
                if bias:
                    shapes += [("bias_ih" + sfx, (G,)), ("bias_hh" + sfx, (G,))]
                if proj_size > 0:
                    shapes.append(("weight_hr" + sfx, (proj_size, hidden_size)))
                for name, shape in shapes:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                names = [name for name, _ in shapes]
                self._all_weights.append(names)
                self._flat_weights_names.extend(names)

        self.reset_parameters()

    def reset_parameters(self):
        """Every parameter from U(-1/sqrt(H), 1/sqrt(H)), in registration order."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self):
        """No-op: the fused op takes each parameter as it is, so there is nothing to repack."""

    def __prepare_scriptable__(self):
        _not_scriptable("LSTM")

    @property
    def _flat_weights(self):
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def all_weights(self):
        """Per (layer, direction), the list [w_ih, w_hh, (b_ih, b_hh), (w_hr)]."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s

    # Validation, with nn.LSTM's exception types and messages.

    def _check_input(self, input, packed):
        weight_dtype = self.weight_ih_l0.dtype
        cast = _autocast_dtype(input.device.type)
        if input.dtype != weight_dtype and cast is None:
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: "
                f"model.to({input.dtype})")
        if cast is not None:
            _check_autocast_float64("LSTM", input.dtype, weight_dtype, cast)
        expected_dim = 2 if packed else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError("input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")

    def _state_sizes(self, N):
        LD = self.num_layers * (2 if self.bidirectional else 1)
        Hout = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (LD, N, Hout), (LD, N, self.hidden_size)

    def _check_states(self, h0, c0, N, ref, unbatched=False):
        """Sizes with nn.LSTM's message, then dtypes, which nn.LSTM leaves to its backend.

        h0, c0: the 3-D states (unbatched ones after unsqueeze(1)); ref: the input (or packed
        data), whose dtype they must share outside autocast (which casts them along with the
        input). For unbatched states nn.LSTM's message shows the unsqueezed shape, so the
        shape the caller passed is added after it.
        """
        h_size, c_size = self._state_sizes(N)
        for idx, (state, expected) in enumerate(((h0, h_size), (c0, c_size))):
            if state.size() != expected:
                hint = ""
                if self.batch_first and state.size() == (expected[1], expected[0], expected[2]):
                    hint = ("; hx is (num_layers * num_directions, N, H) even with "
                            "batch_first=True")
                if unbatched:
                    given = tuple(state.squeeze(1).shape)
                    hint = (f"; for unbatched input hx[{idx}] must have shape "
                            f"{(expected[0], expected[2])}, got {given}")
                raise RuntimeError(
                    f"Expected hidden[{idx}] size {expected}, got {list(state.size())}{hint}")
        autocast = _autocast_dtype(ref.device.type) is not None
        for idx, state in enumerate((h0, c0)):
            if not state.is_floating_point() or (not autocast and state.dtype != ref.dtype):
                raise RuntimeError(f"Expected hidden[{idx}] dtype {ref.dtype} (the input's), "
                                   f"got {state.dtype}")

    # nn.RNNBase's public checks and state permutation, with its signatures and messages.
    # forward calls check_forward_args and permute_hidden where nn.LSTM.forward does (after
    # its own checks above, which fail first with more to say), so subclasses that override
    # them keep working. input is as the caller passed it (batch-first when batch_first).

    def check_input(self, input, batch_sizes):
        self._check_input(input, packed=batch_sizes is not None)

    def get_expected_hidden_size(self, input, batch_sizes):
        return self._state_sizes(self._batch_of(input, batch_sizes))[0]

    def get_expected_cell_size(self, input, batch_sizes):
        return self._state_sizes(self._batch_of(input, batch_sizes))[1]

    def check_hidden_size(self, hx, expected_hidden_size, msg="Expected hidden size {}, got {}"):
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx, permutation):
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)

    def _batch_of(self, input, batch_sizes):
        if batch_sizes is not None:
            return int(batch_sizes[0])
        return input.size(0) if self.batch_first else input.size(1)

    # Forward.

    def _stack(self, x, h0, c0, batch_sizes):
        """All layers and directions. x (T, N, I) time-major; h0 (L*D, N, Hout); c0 (L*D, N, H).

        Returns output (T, N, D*Hout), h_n (L*D, N, Hout), c_n (L*D, N, H).
        """
        D = 2 if self.bidirectional else 1
        # nn.LSTM is on autocast's lower-precision list on CPU and CUDA alike; lstm() applies
        # that cast to every argument, so layer outputs are already in the autocast dtype.
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, p=self.dropout, training=True)
            outs = []
            for direction in range(D):
                k = layer * D + direction
                w = [getattr(self, name) for name in self._all_weights[k]]
                w_ih, w_hh = w[0], w[1]
                bias = w[2] + w[3] if self.bias else None
                w_hr = w[-1] if self.proj_size > 0 else None
                out, h, c = lstm(x, h0[k], c0[k], w_ih, w_hh, bias, weight_hr=w_hr,
                                 batch_sizes=batch_sizes, reverse=direction == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if D == 1 else torch.cat(outs, dim=2)
        return x, torch.stack(h_n), torch.stack(c_n)

    def _zero_state(self, ref, N):
        h_size, c_size = self._state_sizes(N)
        return (torch.zeros(h_size, dtype=ref.dtype, device=ref.device),
                torch.zeros(c_size, dtype=ref.dtype, device=ref.device))

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)

        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        x = input.transpose(0, 1) if self.batch_first else input
        N = x.size(1)
        self._check_input(x, packed=False)

        if hx is None:
            h0, c0 = self._zero_state(x, N)
        else:
            h_size, c_size = self._state_sizes(N)
            _check_state_pair(hx, "LSTM", (h_size, c_size) if batched else
                              (h_size[::2], c_size[::2]))
            h0, c0 = hx
            rank = 3 if batched else 2
            if h0.dim() != rank or c0.dim() != rank:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {rank}-D but got "
                                   f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            self._check_states(h0, c0, N, x, unbatched=not batched)
        self.check_forward_args(input, (h0, c0), None)

        out, h_n, c_n = self._stack(x, h0, c0, None)

        if self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def _forward_packed(self, packed, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        self._check_input(data, packed=True)
        rows, N = _packed_positions(batch_sizes, data.device)
        T = batch_sizes.numel()

        if hx is None:
            h0, c0 = self._zero_state(data, N)
        else:
            _check_state_pair(hx, "LSTM", self._state_sizes(N))
            h0, c0 = hx
            if h0.dim() != 3 or c0.dim() != 3:
                raise RuntimeError("For packed input, hx and cx should be 3-D but got "
                                   f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            self._check_states(h0, c0, N, data)
            h0, c0 = self.permute_hidden((h0, c0), sorted_indices)
        self.check_forward_args(data, (h0, c0), batch_sizes)

        # Padded time-major (T, N, I) in sorted order; the op's batch_sizes keeps each row to
        # its own length, and reverse starts each row at its own last step.
        x = data.new_zeros(T * N, data.size(1)).index_copy(0, rows, data).view(T, N, -1)
        out, h_n, c_n = self._stack(x, h0, c0, batch_sizes)
        out_data = out.reshape(T * N, out.size(2)).index_select(0, rows)

        output = PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices)
        return output, self.permute_hidden((h_n, c_n), unsorted_indices)


class LSTMCell(nn.Module):
    """One LSTM step with nn.LSTMCell's interface: the fused op with T = 1.

    forward(input, hx=None) -> (h_1, c_1):
        input: (N, I) or unbatched (I,).
        hx: (h_0 (N, H), c_0 (N, H)), 1-D when unbatched; zeros when None.
        h_1, c_1: (N, H), or (H,) when unbatched.
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        G = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((G, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((G, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s

    def __prepare_scriptable__(self):
        _not_scriptable("LSTMCell")

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        N, H = input.size(0), self.hidden_size
        if input.size(1) != self.input_size:
            raise RuntimeError(f"LSTMCell: input has inconsistent input_size: got "
                               f"{input.size(1)}, expected {self.input_size}")

        if hx is None:
            h0 = torch.zeros(N, H, dtype=input.dtype, device=input.device)
            c0 = h0
        else:
            _check_state_pair(hx, "LSTMCell", ((N, H), (N, H)) if batched else ((H,), (H,)))
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got "
                                     f"{value.dim()}D instead")
            h0, c0 = hx
            rank = 2 if batched else 1
            if h0.dim() != rank or c0.dim() != rank:
                kind = "batched 2-D" if batched else "unbatched 1-D"
                want = (N, H) if batched else (H,)
                raise RuntimeError(f"LSTMCell: for {kind} input, hx[0] and hx[1] should also be "
                                   f"{rank}-D, of shape {want}, but got ({h0.dim()}-D, "
                                   f"{c0.dim()}-D) tensors of shapes {tuple(h0.shape)} and "
                                   f"{tuple(c0.shape)}")
            if not batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
            for idx, state in enumerate((h0, c0)):
                if state.size() != (N, H):
                    got = list(state.size() if batched else state.size()[1:])
                    want = (N, H) if batched else (H,)
                    raise RuntimeError(f"LSTMCell: Expected hx[{idx}] size {want}, got {got}")
            # Autocast casts floating states with the input; nothing makes an integer state valid.
            autocast = _autocast_dtype(input.device.type) is not None
            for idx, state in enumerate((h0, c0)):
                if not state.is_floating_point() or (not autocast and state.dtype != input.dtype):
                    raise RuntimeError(f"LSTMCell: Expected hx[{idx}] dtype {input.dtype} (the "
                                       f"input's), got {state.dtype}")

        w_ih, w_hh = self.weight_ih, self.weight_hh
        bias = self.bias_ih + self.bias_hh if self.bias_ih is not None else None
        device_type = input.device.type
        cast = _autocast_dtype(device_type)
        if cast is None and input.dtype != w_ih.dtype:
            raise RuntimeError(f"LSTMCell: input dtype ({input.dtype}) does not match "
                               f"weight dtype ({w_ih.dtype})")
        if cast is None or device_type == "cuda":
            # nn.LSTMCell is on CUDA autocast's lower-precision list; lstm() casts like it.
            _, h1, c1 = lstm(input.unsqueeze(0), h0, c0, w_ih, w_hh, bias)
        else:
            # Elsewhere it is not: nn.LSTMCell's gate products follow autocast and its state
            # update runs in c_0's dtype promoted with theirs. Run the whole step in the
            # weights' dtype (at least as precise) and return the dtype nn.LSTMCell returns.
            _check_autocast_float64("LSTMCell", input.dtype, w_ih.dtype, cast)
            out_dtype = torch.promote_types(cast, c0.dtype)
            dtype = w_ih.dtype
            with torch.autocast(device_type, enabled=False):
                _, h1, c1 = lstm(input.to(dtype).unsqueeze(0), h0.to(dtype), c0.to(dtype),
                                 w_ih, w_hh, bias)
            h1, c1 = h1.to(out_dtype), c1.to(out_dtype)
        if not batched:
            h1, c1 = h1.squeeze(0), c1.squeeze(0)
        return h1, c1
