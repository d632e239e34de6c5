"""Pure-PyTorch LSTM written out by hand: the oracle for the tests, the naive baseline for the
benchmarks.

Every step is a handful of small differentiable torch ops, so autograd (including double
backward) differentiates it without any hand-written gradient. That is the point: the fused
kernels and their hand-derived backward (docs/derivation.md) are checked against this file,
and this file is checked against ``torch.nn.LSTM``. It favours readability over speed and
does almost no argument checking.

Shape vocabulary: T time, N batch, I input, H hidden, G = 4H gates in nn.LSTM's order
i, f, g, o, P projection size, Hout = P when projecting, else H.
"""

import torch

__all__ = [
    "input_gate",
    "forget_gate",
    "cell_gate",
    "output_gate",
    "cell_state",
    "hidden_state",
    "lstm_cell",
    "lstm",
]


def input_gate(p_i):
    """i = sigmoid(p_i); p_i (N, H) -> (N, H)."""
    return torch.sigmoid(p_i)


def forget_gate(p_f):
    """f = sigmoid(p_f); p_f (N, H) -> (N, H)."""
    return torch.sigmoid(p_f)


def cell_gate(p_g):
    """Candidate g = tanh(p_g); p_g (N, H) -> (N, H)."""
    return torch.tanh(p_g)


def output_gate(p_o):
    """o = sigmoid(p_o); p_o (N, H) -> (N, H)."""
    return torch.sigmoid(p_o)


def cell_state(i, f, g, c_prev):
    """c_t = f * c_{t-1} + i * g; all (N, H)."""
    return f * c_prev + i * g


def hidden_state(o, c, weight_hr=None):
    """h_t = o * tanh(c_t), then h_t @ weight_hr^T when projecting.

    o, c (N, H); weight_hr (P, H) or None. Returns (N, Hout).
    """
    m = o * torch.tanh(c)
    if weight_hr is None:
        return m
    return m @ weight_hr.t()


def lstm_cell(x, h_prev, c_prev, weight_ih, weight_hh, bias=None, weight_hr=None):
    """One LSTM step.

    x (N, I); h_prev (N, Hout); c_prev (N, H); weight_ih (4H, I); weight_hh (4H, Hout);
    bias (4H,) or None; weight_hr (P, H) or None. Returns h (N, Hout), c (N, H).
    """
    p = x @ weight_ih.t() + h_prev @ weight_hh.t()
    if bias is not None:
        p = p + bias
    p_i, p_f, p_g, p_o = p.chunk(4, dim=1)

    i = input_gate(p_i)
    f = forget_gate(p_f)
    g = cell_gate(p_g)
    o = output_gate(p_o)

    c = cell_state(i, f, g, c_prev)
    h = hidden_state(o, c, weight_hr)
    return h, c


def lstm(
    input,
    h0,
    c0,
    weight_ih,
    weight_hh,
    bias=None,
    *,
    weight_hr=None,
    batch_sizes=None,
    reverse=False,
):
    """Single-layer, single-direction LSTM over a whole sequence.

    Args:
        input: (T, N, I).
        h0: (N, Hout). c0: (N, H).
        weight_ih: (4H, I). weight_hh: (4H, Hout).
        bias: (4H,) = b_ih + b_hh, or None.
        weight_hr: (P, H) or None; when given, h_t = weight_hr @ (o * tanh(c_t)) at every
            step, as nn.LSTM's proj_size does.
        batch_sizes: None, or an int64 CPU tensor (T,), non-increasing, values in [0, N]
            (PackedSequence layout, rows sorted by decreasing length). At step t only rows
            [0, batch_sizes[t]) are active; the other rows keep their h and c and their
            output is zero.
        reverse: process t = T-1 .. 0. Outputs stay at their own time index. With
            batch_sizes, a row is inactive (and so still holds h0, c0) until its own last
            valid step, which is where its reverse pass therefore starts.

    Returns:
        output (T, N, Hout), h_n (N, Hout), c_n (N, H).
    """
    T, N = input.shape[0], input.shape[1]
    if batch_sizes is None:
        active = [N] * T
    else:
        active = [int(b) for b in batch_sizes.tolist()]
        if len(active) != T:
            raise ValueError(f"batch_sizes must have length T = {T}, got {len(active)}")

    h, c = h0, c0
    outputs = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        b = active[t]
        h_new, c_new = lstm_cell(input[t, :b], h[:b], c[:b], weight_ih, weight_hh, bias, weight_hr)
        if b == N:
            h, c = h_new, c_new
            outputs[t] = h_new
        else:
            # Rows [b, N) are inactive at t: they keep their state and output zero.
            h = torch.cat([h_new, h[b:]])
            c = torch.cat([c_new, c[b:]])
            outputs[t] = torch.cat([h_new, h_new.new_zeros(N - b, h_new.shape[1])])

    if T == 0:
        output = input.new_zeros(0, N, h0.shape[1])
    else:
        output = torch.stack(outputs)
    return output, h, c
