"""The "graph" CUDA time loop (csrc/lstm_cuda_graph.cpp): the generic loop captured in a CUDA
graph once per call signature and replayed, against the eager generic loop.

A replay reads the graph's own copies of the inputs and writes its own outputs, so what can go
wrong is staleness: a replay that computes on the previous call's values, or a returned tensor
that a later replay overwrites. Every test therefore calls with fresh values several times and
compares each call with the eager loop on the same values, and checks which loop served the
call: the first two calls of a signature run eagerly (the second also captures), later ones
replay.
Shape vocabulary: T time, N batch, I input, H hidden, G = 4H, P projection size.
"""

import pytest
import torch

import handlstm_cuda as hl
from conftest import make_args, outputs_and_grads

_C = hl._ext._C


def test_graph_is_a_time_loop_choice_and_clearing_works_without_a_gpu():
    """The switch and the cache exist in every build (a CPU-only one included)."""
    assert "graph" in hl.CUDA_TIME_LOOPS
    before = hl.cuda_time_loop()
    try:
        hl.set_cuda_time_loop("graph")
        assert hl.cuda_time_loop() == "graph"
        # CPU tensors are not affected by the CUDA time loop.
        args = make_args(3, 2, 4, 5, requires_grad=False)
        torch.testing.assert_close(hl.lstm(*args[:6])[0],
                                   hl.reference.lstm(*args[:6])[0])
    finally:
        hl.set_cuda_time_loop(before)
    hl.clear_cuda_graphs()
    assert _C._cuda_graph_cache()[0] == 0


@pytest.fixture
def graph_loop():
    before = (hl.cuda_time_loop(), torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    hl.clear_cuda_graphs()
    hl.set_cuda_time_loop("graph")
    yield
    hl.set_cuda_time_loop(before[0])
    torch.backends.cuda.matmul.allow_tf32 = before[1]
    hl.clear_cuda_graphs()


def _eager(args, **kw):
    hl.set_cuda_time_loop("generic")
    try:
        return outputs_and_grads(args, **kw)
    finally:
        hl.set_cuda_time_loop("graph")


CASES = [  # (T, N, I, H, P)
    (1, 1, 1, 1, 0), (62, 64, 12, 64, 0), (5, 13, 7, 33, 0), (7, 3, 4, 20, 5), (4, 2, 3, 300, 0),
]
CASE_IDS = ["T1-N1-H1", "seed", "N13-H33", "proj", "H300"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("T,N,I,H,P", CASES, ids=CASE_IDS)
def test_replays_equal_the_eager_loop_on_fresh_values(graph_loop, T, N, I, H, P, reverse, dtype):
    returned = []  # (what each call returned, a copy taken at once)
    for call in range(4):
        args = make_args(T, N, I, H, P, dtype=dtype, device="cuda", seed=call)
        ours = outputs_and_grads(args, reverse=reverse)
        assert _C._cuda_last_loops() == (("generic",) * 2 if call < 2 else ("graph",) * 2)
        returned.append((ours, [t.clone() for t in ours]))
        eager = _eager(args, reverse=reverse)
        # The same kernels on the same values; cuBLAS may pick another algorithm under
        # capture (its workspace is per stream), so not bitwise in general.
        for a, e in zip(ours, eager):
            torch.testing.assert_close(a, e)
    # No later replay overwrote what an earlier call returned.
    for ours, copy in returned:
        for a, c in zip(ours, copy):
            assert torch.equal(a, c)
    assert _C._cuda_graph_cache()[0] == 2  # the forward's signature and the backward's


@pytest.mark.cuda
def test_a_backward_without_grad_output_is_its_own_signature(graph_loop):
    for call in range(3):
        args = make_args(9, 4, 3, 24, dtype=torch.float64, device="cuda", seed=call)
        for loss in ("h_n", "all", "h_n"):
            ours = outputs_and_grads(args, loss=loss)
            eager = _eager(args, loss=loss)
            for a, e in zip(ours, eager):
                torch.testing.assert_close(a, e)
    assert _C._cuda_graph_cache()[0] == 3  # one forward, two backward signatures


@pytest.mark.cuda
def test_gradcheck_through_replays(graph_loop):
    """gradcheck calls the op many times with perturbed values of one signature: every call
    after the first is a replay."""
    args = make_args(4, 2, 3, 5, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda *a: hl.lstm(*a), args[:6])
    assert _C._cuda_last_loops()[0] == "graph"


@pytest.mark.cuda
def test_module_training_steps_match_the_eager_loop(graph_loop):
    """Three optimizer steps of a two-layer bidirectional module (weights updated in place
    between replays, so the graph must read them afresh every call)."""
    def train(mode):
        hl.set_cuda_time_loop(mode)
        torch.manual_seed(0)
        model = hl.LSTM(6, 16, num_layers=2, bidirectional=True, batch_first=True,
                        dtype=torch.float64, device="cuda")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            x = torch.randn(5, 11, 6, dtype=torch.float64, device="cuda")
            loss = model(x)[0].square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses, [p.detach().clone() for p in model.parameters()]

    eager = train("generic")
    ours = train("graph")
    assert _C._cuda_last_loops() == ("graph", "graph")
    for a, e in zip(ours[0] + ours[1], eager[0] + eager[1]):
        torch.testing.assert_close(a, e)


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_packed_calls_replay_once_per_packing(graph_loop, reverse):
    """batch_sizes fix each step's rows, so they are part of the signature: a packing seen
    before replays, a new one runs eagerly (and is captured on its second call)."""
    from conftest import packed_batch_sizes

    packings = [packed_batch_sizes([7, 5, 2]), packed_batch_sizes([7, 5, 2]),
                packed_batch_sizes([7, 5, 2]), packed_batch_sizes([7, 7, 1]),
                packed_batch_sizes([7, 5, 2])]
    expected = ["generic", "generic", "graph", "generic", "graph"]
    for call, (bs, loop) in enumerate(zip(packings, expected)):
        args = make_args(7, 3, 4, 6, dtype=torch.float64, device="cuda", seed=call)
        ours = outputs_and_grads(args, batch_sizes=bs, reverse=reverse)
        assert _C._cuda_last_loops() == (loop, loop), call
        for a, e in zip(ours, _eager(args, batch_sizes=bs, reverse=reverse)):
            torch.testing.assert_close(a, e)
    assert _C._cuda_graph_cache()[0] == 2  # one packing's forward and backward


@pytest.mark.cuda
def test_packed_module_calls_match_the_eager_loop(graph_loop):
    x = torch.randn(7, 3, 4, dtype=torch.float64, device="cuda")
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [7, 5, 2])
    model = hl.LSTM(4, 6, dtype=torch.float64, device="cuda")
    for call in range(3):
        out = model(packed)[0].data
        out.sum().backward()
        loop = "graph" if call == 2 else "generic"
        assert _C._cuda_last_loops() == (loop, loop)
    hl.set_cuda_time_loop("generic")
    torch.testing.assert_close(out, model(packed)[0].data)


@pytest.mark.cuda
def test_calls_from_two_streams_see_their_own_values(graph_loop):
    """Back-to-back calls on two streams, with nothing ordering them but the cached graph's own
    event: each use of its buffers must wait for the previous one, or a call computes on the
    other's inputs. A long T makes each replay slow enough for the overlap to show."""
    T, N, I, H = 400, 2, 3, 40
    args = [make_args(T, N, I, H, dtype=torch.float32, device="cuda", seed=k,
                      requires_grad=False) for k in range(8)]
    hl.set_cuda_time_loop("generic")
    expected = [hl.lstm(*a[:6])[0] for a in args]
    hl.set_cuda_time_loop("graph")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    for a in args[:2]:  # capture the signature; the first replay follows at once, elsewhere
        hl.lstm(*a[:6])
    outs = []
    for k, a in enumerate(args):
        with torch.cuda.stream(streams[k % 2]):
            outs.append(hl.lstm(*a[:6])[0])
    assert _C._cuda_last_loops()[0] == "graph"
    torch.cuda.synchronize()
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, e)


@pytest.mark.cuda
def test_a_signature_first_met_under_inference_mode_then_trains(graph_loop):
    """The graph's buffers are plain tensors even when captured under torch.inference_mode():
    a later training call copies into them and gets its gradients."""
    model = hl.LSTM(5, 12, dtype=torch.float64, device="cuda")
    x = torch.randn(6, 3, 5, dtype=torch.float64, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    assert _C._cuda_last_loops()[0] == "graph"
    for _ in range(3):
        model.zero_grad()
        out = model(x)[0]
        out.square().sum().backward()
    assert _C._cuda_last_loops()[0] == "graph"
    grads = [p.grad.clone() for p in model.parameters()]
    hl.set_cuda_time_loop("generic")
    model.zero_grad()
    model(x)[0].square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.cuda
def test_a_cached_graph_keeps_no_autograd_history_alive(graph_loop):
    """The graph's copies of the inputs are detached: the first calls' autograd graphs (and
    what they saved) are freed with the caller's tensors."""
    import gc
    import weakref

    base = torch.randn(4, 2, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    args = make_args(4, 2, 3, 6, dtype=torch.float64, device="cuda")
    x = base * 2  # not a leaf: it carries the history of the multiplication
    for _ in range(2):
        hl.lstm(x, *args[1:6])[0].sum().backward()
    alive = weakref.ref(base)
    del base, x
    gc.collect()
    assert alive() is None
    assert _C._cuda_graph_cache()[0] == 2


@pytest.mark.cuda
def test_changing_tf32_does_not_replay_a_graph_captured_without_it(graph_loop):
    args = make_args(5, 3, 4, 32, dtype=torch.float32, device="cuda", requires_grad=False)
    for _ in range(3):
        hl.lstm(*args[:6])
    assert _C._cuda_last_loops()[0] == "graph"
    torch.backends.cuda.matmul.allow_tf32 = True
    hl.lstm(*args[:6])
    assert _C._cuda_last_loops()[0] == "generic"  # a new signature, seen once


@pytest.mark.cuda
def test_the_cache_keeps_the_most_recently_used_and_clear_empties_it(graph_loop):
    capacity = _C._cuda_graph_cache()[1]
    assert capacity >= 8

    def call(H):  # noqa: N803
        args = make_args(3, 2, 2, H, dtype=torch.float32, device="cuda", requires_grad=False)
        hl.lstm(*args[:6])
        return _C._cuda_last_loops()[0]

    for H in range(1, capacity + 4):  # forward signatures only, each captured on its 2nd call
        assert [call(H), call(H)] == ["generic", "generic"]
    assert _C._cuda_graph_cache()[0] == capacity
    assert call(capacity + 3) == "graph"   # the latest is kept
    assert call(1) == "generic"            # the oldest were dropped (and are new again)
    hl.clear_cuda_graphs()
    assert _C._cuda_graph_cache()[0] == 0
    assert [call(5), call(5), call(5)] == ["generic", "generic", "graph"]


@pytest.mark.cuda
def test_a_call_too_large_to_copy_is_never_captured(graph_loop):
    """Gates alone of T=1100, N=64, H=256 in float32 are 275 MiB: past the 256 MiB a call's
    copies may take, so it stays eager (the GPU sets the pace there, not the host)."""
    args = make_args(1100, 64, 8, 256, dtype=torch.float32, device="cuda", requires_grad=False)
    for _ in range(3):
        hl.lstm(*args[:6])
        assert _C._cuda_last_loops()[0] == "generic"
    assert _C._cuda_graph_cache()[0] == 0


@pytest.mark.cuda
def test_tf32_set_through_the_new_precision_api(graph_loop):
    """torch.backends.cuda.matmul.fp32_precision (the API after allow_tf32): the legacy TF32
    getters throw once it is used, so the key must not read them; the call replays, and the
    other setting is another signature."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    args = make_args(5, 3, 4, 32, dtype=torch.float32, device="cuda", requires_grad=False)
    try:
        matmul.fp32_precision = "tf32"
        for _ in range(3):
            hl.lstm(*args[:6])
        assert _C._cuda_last_loops()[0] == "graph"
        matmul.fp32_precision = "ieee"
        hl.lstm(*args[:6])
        assert _C._cuda_last_loops()[0] == "generic"
    finally:
        matmul.fp32_precision = before


@pytest.mark.cuda
def test_deterministic_mode_runs_eagerly(graph_loop):
    args = make_args(5, 3, 4, 32, dtype=torch.float64, device="cuda", requires_grad=False)
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for _ in range(3):
            hl.lstm(*args[:6])
            assert _C._cuda_last_loops()[0] == "generic"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert _C._cuda_graph_cache()[0] == 0


@pytest.mark.cuda
def test_a_high_priority_stream_is_its_own_signature(graph_loop):
    """Graph kernels keep the priority of their capture stream: a call from a high-priority
    stream must not replay a graph captured for a normal one."""
    args = make_args(5, 3, 4, 32, dtype=torch.float64, device="cuda", requires_grad=False)
    for _ in range(3):
        hl.lstm(*args[:6])
    assert _C._cuda_last_loops()[0] == "graph"
    high = torch.cuda.Stream(priority=-1)
    high.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(high):
        out = hl.lstm(*args[:6])[0]
        assert _C._cuda_last_loops()[0] == "generic"
    torch.cuda.synchronize()
    hl.set_cuda_time_loop("generic")
    torch.testing.assert_close(out, hl.lstm(*args[:6])[0])


@pytest.mark.cuda
def test_a_graph_whose_cublas_workspace_was_cleared_is_dropped(graph_loop):
    """torch can free every stream's cuBLAS workspaces (torch.compile's CUDA graph trees do):
    a graph still writing to the old ones must not replay; the call runs eagerly, and the
    signature is captured afresh."""
    args = make_args(5, 3, 4, 32, dtype=torch.float32, device="cuda", requires_grad=False)
    for _ in range(3):
        hl.lstm(*args[:6])
    assert _C._cuda_last_loops()[0] == "graph"
    hl.set_cuda_time_loop("generic")
    expected = hl.lstm(*args[:6])[0]
    hl.set_cuda_time_loop("graph")
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    loops = []
    for _ in range(3):
        torch.testing.assert_close(hl.lstm(*args[:6])[0], expected)
        loops.append(_C._cuda_last_loops()[0])
    # The check sees a workspace made anew (wherever it lands) and drops the graph; the
    # signature is then seen once, captured, replayed.
    assert loops == ["generic", "generic", "graph"]
