"""The forecaster: an LSTM encoder over the history and an MLP head for K future offsets.

The LSTM class is a parameter so the same network runs on ``handlstm_cuda.LSTM`` or on
``torch.nn.LSTM``. Shapes: N batch, Th history steps, D input features, H hidden, K horizon.
"""

from __future__ import annotations

import torch
from torch import nn

LSTM_CHOICES = ("handlstm", "torch")


def handlstm_unavailable_reason() -> str | None:
    """None when ``handlstm_cuda.LSTM`` can be used, else a sentence saying why not."""
    try:
        import handlstm_cuda
    except Exception as exc:  # an unbuilt extension can fail with more than ImportError
        return (
            f"import handlstm_cuda failed ({type(exc).__name__}: {exc}); "
            "build it with `make build`"
        )
    if not hasattr(handlstm_cuda, "LSTM"):
        return "handlstm_cuda has no LSTM class yet"
    return None


def lstm_class(name: str) -> type[nn.Module]:
    """'torch' -> torch.nn.LSTM; 'handlstm' -> handlstm_cuda.LSTM (imported only here)."""
    if name == "torch":
        return nn.LSTM
    if name == "handlstm":
        reason = handlstm_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"--lstm handlstm is not usable: {reason}. Use --lstm torch.")
        import handlstm_cuda

        return handlstm_cuda.LSTM
    raise ValueError(f"lstm must be one of {LSTM_CHOICES}, got {name!r}")


def resolve_lstm_name(name: str) -> str:
    """'auto' -> 'handlstm' when usable, else 'torch'; other names pass through."""
    if name == "auto":
        return "handlstm" if handlstm_unavailable_reason() is None else "torch"
    return name


class TrajectoryForecaster(nn.Module):
    """features (N, Th, D) -> offsets (N, K, 2), in the units of the scaled targets.

    The head sees the encoder's last hidden state and the last observed input step directly,
    which lets the recent motion skip the recurrence.
    """

    def __init__(
        self,
        lstm_cls: type[nn.Module],
        input_size: int,
        hidden_size: int = 64,
        num_layers: int = 1,
        head_size: int = 64,
        horizon: int = 5,
    ):
        super().__init__()
        self.horizon = horizon
        self.encoder = lstm_cls(input_size, hidden_size, num_layers=num_layers)
        self.head = nn.Sequential(
            nn.Linear(hidden_size + input_size, head_size),
            nn.ReLU(),
            nn.Linear(head_size, 2 * horizon),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The encoder is used time-major (T, N, D) so it needs no batch_first support.
        _, (h_n, _) = self.encoder(features.transpose(0, 1).contiguous())
        z = torch.cat([h_n[-1], features[:, -1]], dim=-1)
        return self.head(z).view(-1, self.horizon, 2)


def build_model(lstm: str, seed: int, **kwargs) -> TrajectoryForecaster:
    """A forecaster whose initial weights depend only on ``seed``, whichever LSTM runs it.

    The weights are drawn with torch.nn.LSTM and, for 'handlstm', moved into a model built on
    handlstm_cuda.LSTM with a strict state-dict load, so both variants start identical.
    """
    torch.manual_seed(seed)
    model = TrajectoryForecaster(nn.LSTM, **kwargs)
    if lstm == "torch":
        return model
    ours = TrajectoryForecaster(lstm_class(lstm), **kwargs)
    ours.load_state_dict(model.state_dict(), strict=True)
    return ours
