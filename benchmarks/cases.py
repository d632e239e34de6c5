"""Workloads and presets of the benchmark sweep.

Shape vocabulary: T time, N batch, I input, H hidden, L layers, D directions (1 or 2).
"""

from dataclasses import dataclass, field

MODES = ("infer", "train-fwd", "fwd+bwd")
"""infer: forward under torch.no_grad(); train-fwd: forward with autograd recording (the
activations for backward are kept); fwd+bwd: forward, then backward of a fixed random
grad_output into every parameter and the input."""


@dataclass(frozen=True)
class Case:
    group: str
    T: int
    N: int
    I: int  # noqa: E741 -- the shape vocabulary's name for the input size
    H: int
    layers: int = 1
    bidirectional: bool = False
    # The seed's workload reads real trajectory windows when ../shared/data is present.
    real_data: bool = False
    # Also time the pure-PyTorch reference loop (single layer only; it is slow).
    reference: bool = False
    # Lower runs first, so that a time budget cuts the least important cases.
    priority: int = 1

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    @property
    def single_layer(self):
        return self.layers == 1 and not self.bidirectional

    @property
    def name(self):
        s = f"{self.group} T{self.T} N{self.N} I{self.I} H{self.H}"
        if self.layers > 1:
            s += f" L{self.layers}"
        if self.bidirectional:
            s += " bi"
        return s


@dataclass(frozen=True)
class Timing:
    """How long to measure each (case, mode, implementation, dtype) point."""

    cpu_min_run_time: float  # seconds of timed calls per implementation, at least
    cpu_min_reps: int  # timed blocks (samples) per implementation, at least
    cpu_max_time: float  # seconds per point (all implementations); still at least 3 rounds
    cuda_warmup: float  # seconds of untimed calls before the timed ones (at least 3 calls)
    cuda_target: float  # seconds of timed calls, bounded by the two counts below
    cuda_min_reps: int
    cuda_max_reps: int


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    cases: tuple
    timing: Timing
    modes: tuple = MODES
    cuda_extra: tuple = field(default=())  # cases run only on CUDA (too slow on a small CPU)


SEED = Case("seed", T=62, N=64, I=12, H=64, real_data=True, reference=True, priority=0)
FASTRNNS = Case("fastrnns", T=100, N=64, I=512, H=512, reference=True, priority=0)


def latency(Ts, Ns=(1, 8, 32), Hs=(64, 256, 512, 1024), priority=1):
    """Small-batch latency cases with I = H (so the H and N sweeps share shapes)."""
    return tuple(
        Case("latency", T=T, N=N, I=H, H=H, priority=priority) for T in Ts for N in Ns for H in Hs
    )


def large_batch(Hs, N=256, T=100, priority=1):
    return tuple(Case("large-batch", T=T, N=N, I=H, H=H, priority=priority) for H in Hs)


def stacked(H, N=64, T=100):
    return Case("stacked", T=T, N=N, I=H, H=H, layers=3, bidirectional=True)


PRESETS = {
    "smoke": Preset(
        "smoke",
        "tiny shapes for the test suite; the numbers mean nothing",
        cases=(SEED,)
        + tuple(Case("latency", T=10, N=N, I=H, H=H) for N in (1, 4) for H in (8, 16))
        + (Case("stacked", T=6, N=4, I=12, H=16, layers=3, bidirectional=True),),
        timing=Timing(0.005, 3, 5.0, 0.01, 0.01, 5, 50),
    ),
    "quick": Preset(
        "quick",
        "the two target workloads plus one point of each sweep (about 1 min on 2 CPU cores)",
        cases=(SEED, FASTRNNS)
        + (Case("latency", T=100, N=1, I=256, H=256), Case("latency", T=100, N=32, I=256, H=256))
        + (stacked(64),),
        timing=Timing(0.2, 5, 15.0, 0.03, 0.05, 10, 200),
    ),
    "default": Preset(
        "default",
        "targets, small-batch latency at T=100, large batch at H=512, stacked H=256",
        cases=(SEED, FASTRNNS) + latency((100,)) + large_batch((512,)) + (stacked(256),),
        timing=Timing(0.4, 5, 20.0, 0.05, 0.1, 20, 300),
        # Last in line on CUDA: every dtype's main sweep comes before these under a budget.
        cuda_extra=large_batch((1024,), priority=2) + latency((1000,), priority=2),
    ),
    "full": Preset(
        "full",
        "everything: latency at T=100 and T=1000, large batch H=512/1024, stacked H=256/512",
        cases=(SEED, FASTRNNS)
        + latency((100, 1000))
        + large_batch((512, 1024))
        + (stacked(256), stacked(512)),
        timing=Timing(1.0, 10, 60.0, 0.1, 0.3, 50, 1000),
    ),
}
