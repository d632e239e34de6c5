"""Where a PyTorch user reaches: torch.compile, opcheck, double backward, eval-mode backward,
autocast and GradScaler, determinism, DistributedDataParallel, torch.func, save/load and export.

docs/works-with.md lists each point with its test. Shapes are tiny: the suite runs on two CPU
cores, and torch.compile dominates its time.
Shape vocabulary: T time, N batch, I input, H hidden, G = 4H, P projection size.
"""

import copy
import io
import pickle

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call, grad, vjp

import _ddp_worker
import handlstm_cuda as hl
from conftest import device_params, make_args, packed_batch_sizes

F64 = torch.float64


def _pair(*args, device="cpu", dtype=torch.float32, seed=0, **kwargs):
    """nn.LSTM and our LSTM with the same weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(*args, device=device, dtype=dtype, **kwargs)
    ours = hl.LSTM(*args, device=device, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _loss_and_grads(model, x, hx=None):
    """A loss touching output, h_n and c_n, and its gradients w.r.t. x and every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, (h, c) = model(x, hx)
    loss = (out.float() ** 2).sum() + h.float().sum() + (c.float() * 0.5).sum()
    loss.backward()
    return loss.detach(), [x.grad] + [p.grad for p in model.parameters()]


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


# --------------------------------------------------------------------------------------------
# torch.compile: one graph, no breaks, forward and backward equal to eager
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dynamic", [
    pytest.param("cpu", False, id="cpu-static"),
    pytest.param("cpu", True, id="cpu-dynamic"),
    pytest.param("cuda", False, id="cuda-static", marks=pytest.mark.cuda),
])
def test_compile_fullgraph_matches_eager(device, dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    _, model = _pair(3, 4, 2, device=device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend=counter)
    # With dynamic=True a second (T, N) must reuse the first graph: the fake kernels are
    # symbolic in every size. (T, N, I) all differ, or duck sizing would tie N to I = 3.
    # fullgraph=True makes any graph break an error.
    shapes = [(2, 4), (6, 5)] if dynamic else [(4, 2)]
    for T, N in shapes:
        x = torch.randn(T, N, 3, device=device)
        loss_c, grads_c = _loss_and_grads(compiled, x)
        loss_e, grads_e = _loss_and_grads(model, x)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if T == shapes[0][0]:
            compiled_graphs = counter.frame_count
    assert counter.frame_count == compiled_graphs  # no recompilation for the second shape


# --------------------------------------------------------------------------------------------
# torch.library.opcheck and the autograd registrations
# --------------------------------------------------------------------------------------------

OP_CASES = [
    pytest.param(dict(P=0, packed=False, reverse=False, dtype=torch.float32), id="f32"),
    pytest.param(dict(P=2, packed=True, reverse=True, dtype=F64), id="f64-proj-packed-rev"),
]


def _op_args(device, P, packed, reverse, dtype, requires_grad):
    args = make_args(3, 3, 4, 3, P, dtype=dtype, device=device, requires_grad=requires_grad)
    bs = packed_batch_sizes([3, 2, 1]) if packed else None
    return list(args) + [bs, reverse]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", OP_CASES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_lstm_forward(device, case, requires_grad):
    torch.library.opcheck(torch.ops.handlstm.lstm_forward.default,
                          _op_args(device, requires_grad=requires_grad, **case))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck_lstm_backward(device, case):
    """Inputs do not require grad: lstm_backward is deliberately not differentiable alone
    (test_lstm_backward_alone_refuses_to_be_differentiated); LSTMFunction supplies the
    second derivatives."""
    args = _op_args(device, requires_grad=False, **case)
    x, h0, c0, w_ih, w_hh, b, w_hr, bs, reverse = args
    out, h_n, c_n, gates, cells, proj_in = torch.ops.handlstm.lstm_forward(*args)
    bargs = [torch.randn_like(out), None, torch.randn_like(c_n), x, h0, c0, w_ih, w_hh, w_hr,
             out, gates, cells, proj_in, bs, reverse]
    torch.library.opcheck(torch.ops.handlstm.lstm_backward.default, bargs)
    # Partial output masks: the fake kernel's (0,) placeholders must match the real ones.
    for mask in ([False, True, True, True, True], [True, False, False, False, False]):
        torch.library.opcheck(torch.ops.handlstm.lstm_backward.default, bargs + [mask])


def test_lstm_backward_alone_refuses_to_be_differentiated():
    args = _op_args("cpu", requires_grad=True, P=0, packed=False, reverse=False, dtype=F64)
    x, h0, c0, w_ih, w_hh, b, w_hr, bs, reverse = args
    with torch.no_grad():
        out, h_n, c_n, gates, cells, proj_in = torch.ops.handlstm.lstm_forward(*args)
    grads = torch.ops.handlstm.lstm_backward(torch.ones_like(out), None, None, x, h0, c0, w_ih,
                                             w_hh, w_hr, out, gates, cells, proj_in, bs, reverse)
    with pytest.raises(RuntimeError, match="cannot be differentiated on its own"):
        grads[0].sum().backward()


def test_lstm_uses_lstm_function_and_the_bare_op_has_the_same_gradients():
    args = make_args(3, 2, 4, 5, 0)
    out = hl.lstm(*args[:6])[0]
    assert type(out.grad_fn).__name__ == "LSTMFunctionBackward"
    g_fn = torch.autograd.grad(out.sum(), args[:6])
    out_op = torch.ops.handlstm.lstm_forward(*args, None, False)[0]
    g_op = torch.autograd.grad(out_op.sum(), args[:6])
    for a, b in zip(g_fn, g_op):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Double backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", [
    pytest.param(dict(P=0, packed=False, reverse=False), id="plain"),
    pytest.param(dict(P=2, packed=True, reverse=True), id="proj-packed-rev"),
])
def test_gradgradcheck_op(device, case):
    args = make_args(3, 3, 2, 3, case["P"], device=device)
    bs = packed_batch_sizes([3, 2, 1]) if case["packed"] else None
    inputs = [t for t in args if t is not None]

    def f(x, h0, c0, w_ih, w_hh, b, *w_hr):
        return hl.lstm(x, h0, c0, w_ih, w_hh, b, weight_hr=w_hr[0] if w_hr else None,
                       batch_sizes=bs, reverse=case["reverse"])

    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("device", device_params())
def test_gradgradcheck_module(device):
    _, ours = _pair(2, 3, 2, device=device, dtype=F64, bidirectional=True, proj_size=2)
    names = [n for n, _ in ours.named_parameters()]
    g = torch.Generator().manual_seed(1)
    x, h0, c0 = (torch.randn(*s, generator=g, dtype=F64).to(device).requires_grad_()
                 for s in [(3, 2, 2), (4, 2, 2), (4, 2, 3)])
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def f(x, h0, c0, *params):
        out, (h, c) = functional_call(ours, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    # fast_mode checks a random projection: the full Jacobian of the Hessian-vector products
    # costs ~15x more here, and the op-level test above runs the full check.
    assert torch.autograd.gradgradcheck(f, (x, h0, c0, *params), fast_mode=True)


def test_second_derivatives_match_nn_lstm():
    """A gradient penalty (the gradient of |d loss / d x|^2 w.r.t. the parameters) equals
    nn.LSTM's on CPU, where nn.LSTM supports double backward."""
    ref, ours = _pair(3, 4, 2, dtype=F64, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64)
    penalties = []
    for model in (ref, ours):
        xx = x.clone().requires_grad_()
        out, (h, c) = model(xx)
        (gx,) = torch.autograd.grad((out ** 2).sum() + (h * c).sum(), xx, create_graph=True)
        penalties.append(torch.autograd.grad((gx ** 2).sum(), list(model.parameters())))
    for a, b in zip(*penalties):
        torch.testing.assert_close(a, b)


def test_double_backward_through_compiled_model_is_an_error_not_a_wrong_number():
    """AOTAutograd cannot differentiate its compiled backward; PyTorch says so."""
    torch._dynamo.reset()
    _, ours = _pair(3, 4, dtype=F64)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 3, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad((compiled(x)[0] ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (gx ** 2).sum().backward()


# --------------------------------------------------------------------------------------------
# Backward in eval() mode (cuDNN's RNN refuses it)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", device_params())
def test_backward_in_eval_mode(device):
    ref, ours = _pair(3, 4, 2, dtype=F64, dropout=0.5)
    ref.eval()
    ours.to(device).eval()
    x = torch.randn(5, 2, 3, dtype=F64)
    # nn.LSTM on CPU is the oracle for both devices (on CUDA it would be cuDNN, which raises).
    loss_r, grads_r = _loss_and_grads(ref, x)
    loss_o, grads_o = _loss_and_grads(ours, x.to(device))
    torch.testing.assert_close(loss_o.cpu(), loss_r)
    for a, b in zip(grads_o, grads_r):
        torch.testing.assert_close(a.cpu(), b)


# --------------------------------------------------------------------------------------------
# Autocast and GradScaler
# --------------------------------------------------------------------------------------------

AUTOCAST_CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-f16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
def test_autocast_module_runs_low_precision_like_nn_lstm(device, dtype):
    ref, ours = _pair(3, 16, 2, device=device, seed=2)
    truth, _ = _pair(3, 16, 2, device=device, dtype=F64, seed=2)
    x = torch.randn(6, 3, 3, device=device)
    with torch.no_grad():
        out_truth = truth(x.double())[0]
    with torch.autocast(device, dtype=dtype):
        out_r, (h_r, c_r) = ref(x)
        out, (h, c) = ours(x)
        out_mixed, _ = ours(x.to(dtype))  # low-precision input, float32 weights: allowed
    assert (out.dtype, h.dtype, c.dtype, out_mixed.dtype) == (dtype,) * 4
    if not (device == "cuda" and dtype == torch.bfloat16):
        # nn.LSTM's cuDNN autocast rule casts to float16 whatever the autocast dtype; ours
        # follows the autocast dtype, so only the other cases can match it.
        assert (out_r.dtype, h_r.dtype, c_r.dtype) == (dtype,) * 3
    # Our error against float64 within a small factor of nn.LSTM's (floor: one ulp at 1).
    err = (out.double() - out_truth).abs().max().item()
    err_ref = (out_r.double() - out_truth).abs().max().item()
    assert err <= 4 * max(err_ref, torch.finfo(dtype).eps), (err, err_ref)

    # Gradients come back in the parameters' dtype.
    (out.float().sum() + h.float().sum()).backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())

    # Outside autocast, the dtype check is back, with nn.LSTM's message.
    with pytest.raises(ValueError, match="input dtype"):
        ours(x.to(dtype))


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
def test_autocast_function_and_bare_op(device, dtype):
    """lstm() and the bare op cast like autocast's lower-precision ops; the casts are recorded,
    so float32 leaves get float32 gradients close to the float32 run's."""
    args = make_args(4, 2, 3, 5, 0, dtype=torch.float32, device=device)
    grads32 = torch.autograd.grad(hl.lstm(*args[:6])[0].sum(), args[:6])
    for call in (lambda: hl.lstm(*args[:6])[0],
                 lambda: torch.ops.handlstm.lstm_forward(*args, None, False)[0]):
        with torch.autocast(device, dtype=dtype):
            out = call()
        assert out.dtype == dtype
        grads = torch.autograd.grad(out.float().sum(), args[:6])
        for g, g32 in zip(grads, grads32):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, g32, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-f16", marks=pytest.mark.cuda),
])
def test_grad_scaler(device, dtype):
    torch.manual_seed(3)
    rnn = hl.LSTM(3, 8, 2, device=device)
    head = nn.Linear(8, 1, device=device)
    x = torch.randn(5, 4, 3, device=device)
    y = torch.randn(4, 1, device=device)
    params = list(rnn.parameters()) + list(head.parameters())

    def loss_fn():
        with torch.autocast(device, dtype=dtype):
            out, _ = rnn(x)
            return nn.functional.mse_loss(head(out[-1]).float(), y)

    loss_fn().backward()
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # A power-of-two scale is exact, so unscaled gradients match the plain ones.
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    opt = torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    scaler.scale(loss_fn()).backward()
    scaler.unscale_(opt)
    for p, g in zip(params, plain):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g, rtol=1e-2, atol=1e-4)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no inf/nan found, so the step was taken
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


# --------------------------------------------------------------------------------------------
# Determinism and dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", device_params())
def test_deterministic_runs_are_bitwise_identical(device, deterministic, monkeypatch):
    # cuBLAS needs a fixed workspace for deterministic results; torch checks the variable.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _, ours = _pair(5, 16, 3, device=device, bidirectional=True, dropout=0.3)
    ours.train()
    x = torch.randn(7, 4, 5, device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(_loss_and_grads(ours, x))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_dropout_masks_follow_manual_seed():
    _, ours = _pair(3, 8, 3, dropout=0.5)
    x = torch.randn(4, 2, 3)
    outs = {}
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.setdefault(seed, []).append(ours(x)[0])
    assert torch.equal(outs[0][0], outs[0][1])
    assert not torch.equal(outs[0][0], outs[1][0])
    # The masks are drawn from torch's default generator: a forked RNG state replays them.
    with torch.random.fork_rng():
        replay = ours(x)[0]
    assert torch.equal(replay, ours(x)[0])


# --------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, two CPU processes)
# --------------------------------------------------------------------------------------------


def test_ddp_gloo_matches_single_process_on_combined_batch(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    out_path = tmp_path / "ddp_state.pt"
    mp.spawn(_ddp_worker.run, args=(2, str(tmp_path / "rendezvous"), str(out_path)),
             nprocs=2, join=True)
    ddp_state = torch.load(out_path)

    model, x, y = _ddp_worker.make_model_and_batch()
    initial = copy.deepcopy(model.state_dict())
    single_state = _ddp_worker.train(model, x, y).state_dict()
    for name, value in single_state.items():
        assert not torch.equal(value, initial[name]), name  # training did move it
        torch.testing.assert_close(ddp_state[name], value, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------------------------


def test_functional_call_grad_and_vjp_match_nn_lstm():
    ref, ours = _pair(3, 4, 2, dtype=F64, bidirectional=True, proj_size=2)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=F64)
    h0, c0 = torch.randn(4, 2, 2, dtype=F64), torch.randn(4, 2, 4, dtype=F64)

    def run(model):
        return lambda p, x: functional_call(model, p, (x, (h0, c0)))

    def loss(model):
        return lambda p, x: sum((t ** 2).sum() for t in torch.utils._pytree.tree_leaves(
            run(model)(p, x)))

    out_r, out_o = run(ref)(params, x), run(ours)(params, x)
    torch.testing.assert_close(out_o, out_r)

    g_r = grad(loss(ref), argnums=(0, 1))(params, x)
    g_o = grad(loss(ours), argnums=(0, 1))(params, x)
    torch.testing.assert_close(g_o, g_r)

    primal_r, vjp_r = vjp(lambda p: run(ref)(p, x)[0], params)
    primal_o, vjp_o = vjp(lambda p: run(ours)(p, x)[0], params)
    cotangent = torch.randn_like(primal_r)
    torch.testing.assert_close(primal_o, primal_r)
    torch.testing.assert_close(vjp_o(cotangent), vjp_r(cotangent))


# --------------------------------------------------------------------------------------------
# Save / load / export
# --------------------------------------------------------------------------------------------


class _Forecaster(nn.Module):
    """LSTM and a linear head on the last step: (N, T, I) -> (N, 1)."""

    def __init__(self):
        super().__init__()
        self.rnn = hl.LSTM(3, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_torch_save_and_pickle_round_trip():
    torch.manual_seed(4)
    model = _Forecaster()
    x = torch.randn(2, 5, 3)
    expected = model(x)

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), expected)

    unpickled = pickle.loads(pickle.dumps(model))
    assert torch.equal(unpickled(x), expected)

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _Forecaster()
    fresh.load_state_dict(torch.load(buf), strict=True)
    assert torch.equal(fresh(x), expected)


def test_export_runs_round_trips_and_trains():
    torch.manual_seed(5)
    model = _Forecaster()
    batch, time = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("time", min=1)
    program = torch.export.export(model, (torch.randn(2, 5, 3),),
                                  dynamic_shapes={"x": {0: batch, 1: time}})
    assert any(node.target is torch.ops.handlstm.lstm_forward.default
               for node in program.graph.nodes)

    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    x = torch.randn(3, 7, 3)  # other sizes than the example
    torch.testing.assert_close(loaded(x), model(x))

    # The graph calls the bare op, which has its own autograd formula: it trains too.
    loaded(x).sum().backward()
    model(x).sum().backward()
    ours = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad)


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("mode,loop,H", [("generic", "generic", 40),
                                         ("persistent", "single-block", 40),
                                         ("persistent", "cooperative", 300),
                                         ("graph", "generic", 40)])
def test_cuda_graph_replays_training_step_like_eager(mode, loop, H):
    """A forward + backward captured whole in a torch.cuda.CUDAGraph (no host syncs inside the
    op, scratch from the graph's pool) replays with new input data to the eager results, for
    each time loop. The graph loop's own graphs cannot nest in the user's capture: under it
    the op runs the generic loop (captured by the user's graph like any other)."""
    C = hl._ext._C
    T, N, I = 12, 4, 6
    torch.manual_seed(0)
    w_ih, w_hh, b = (torch.randn(4 * H, I, device="cuda") * 0.2,
                     torch.randn(4 * H, H, device="cuda") * 0.2,
                     torch.randn(4 * H, device="cuda") * 0.2)
    params = [p.requires_grad_() for p in (w_ih, w_hh, b)]
    x = torch.randn(T, N, I, device="cuda")
    h0, c0 = torch.zeros(N, H, device="cuda"), torch.zeros(N, H, device="cuda")
    grad_out = torch.randn(T, N, H, device="cuda")

    def step():
        out, _, _ = hl.lstm(x, h0, c0, *params)
        out.backward(grad_out)
        return out

    before = hl.cuda_time_loop()
    hl.set_cuda_time_loop(mode)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
            for _ in range(2):
                for p in params:
                    p.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        assert C._cuda_last_loops() == (loop, loop)
        x.copy_(torch.randn(T, N, I, device="cuda"))
        graph.replay()
        replayed = [static_out.clone()] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        eager = [step().detach()] + [p.grad for p in params]
    finally:
        hl.set_cuda_time_loop(before)
        hl.clear_cuda_graphs()
    # Not bitwise: cuBLAS may pick other kernels under capture (its workspace is per stream).
    for a, e in zip(replayed, eager):
        torch.testing.assert_close(a, e)
