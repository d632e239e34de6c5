"""A small forward + backward of handlstm_cuda on the GPU, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python3 -m benchmarks.sanitize_case

Odd sizes (so no tile divides them evenly), then reverse=True and a ragged batch_sizes, then the
persistent time loops (single-block and cooperative designs, float32 and bfloat16), then the
multi-layer bidirectional module. Without the caching allocator every tensor is its own
allocation, so memcheck sees an access one past a tensor's end. Exits non-zero when the
results disagree with the reference loop, so a run that computes garbage does not pass as clean.

Shape vocabulary: T time, N batch, I input, H hidden.
"""

import sys

import torch


def _case(hl, ref, device, T, N, I, H, dtype, reverse=False, batch_sizes=None):  # noqa: E741
    gen = torch.Generator(device=device).manual_seed(T * 1000 + N * 10 + H)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, device=device, dtype=dtype, generator=gen) * scale
        return t.requires_grad_()

    args = [rand(T, N, I), rand(N, H), rand(N, H), rand(4 * H, I, scale=0.2),
            rand(4 * H, H, scale=0.2), rand(4 * H)]
    grad = torch.randn(T, N, H, device=device, dtype=dtype, generator=gen)
    results = []
    for fn in (hl.lstm, ref.lstm):
        for a in args:
            a.grad = None
        out, h_n, c_n = fn(*args, batch_sizes=batch_sizes, reverse=reverse)
        (out * grad).sum().add(h_n.sum()).add(c_n.sum()).backward()
        results.append([out.detach().float()] + [a.grad.float() for a in args])
    worst = max(
        ((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(*results)
    )
    tag = f"T={T} N={N} I={I} H={H} {dtype} reverse={reverse} packed={batch_sizes is not None}"
    print(f"{tag}: max relative error vs reference {worst:.2e}")
    return worst < (1e-4 if dtype == torch.float32 else 3e-2)


def _expect_loop(hl, device, name):
    """Whether the latest call's forward and backward both ran the `name` time loop (CUDA)."""
    loops = getattr(hl._ext._C, "_cuda_last_loops", None)
    if loops is None or device != "cuda":
        return True
    got = loops()
    print(f"  time loops of that call: {got}")
    return got == (name, name)


def main(argv):
    import handlstm_cuda as hl
    from handlstm_cuda import reference as ref

    device = argv[0] if argv else "cuda"  # "cpu" only to try this script without a GPU
    if device == "cuda" and not (torch.cuda.is_available() and hl.has_cuda_kernels()):
        print("sanitize_case: needs a CUDA device and handlstm_cuda built with CUDA kernels")
        return 2
    if hasattr(hl, "set_cuda_kernels_enabled"):
        # The kernels are what the sanitizers are here to check, whatever the default is.
        hl.set_cuda_kernels_enabled(True)
    # Compare in IEEE float32: cuDNN would otherwise use TF32 in the nn.LSTM comparison.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    ok = _case(hl, ref, device, T=5, N=3, I=7, H=33, dtype=torch.float32)
    ok &= _case(hl, ref, device, T=4, N=5, I=12, H=64, dtype=torch.float32, reverse=True,
                batch_sizes=torch.tensor([5, 4, 2, 1]))
    if hasattr(hl, "set_cuda_persistent_enabled"):
        # The persistent time loops (shared memory, __syncthreads) are racecheck's main target.
        before = hl.cuda_time_loop() if hasattr(hl, "cuda_time_loop") else "generic"
        hl.set_cuda_persistent_enabled(True)
        print("persistent CUDA loops on:")
        ok &= _case(hl, ref, device, T=6, N=11, I=5, H=33, dtype=torch.float32)
        ok &= _expect_loop(hl, device, "single-block")
        ok &= _case(hl, ref, device, T=3, N=9, I=4, H=16, dtype=torch.bfloat16, reverse=True)
        ok &= _expect_loop(hl, device, "single-block")
        # The cooperative design (W_hh split across blocks, a grid barrier per step): H = 300
        # is beyond one block in float32; N = 11 spans two row tiles.
        ok &= _case(hl, ref, device, T=4, N=11, I=5, H=300, dtype=torch.float32)
        ok &= _expect_loop(hl, device, "cooperative")
        if hasattr(hl._ext._C, "_set_cuda_persistent_cooperative_only"):
            hl._ext._C._set_cuda_persistent_cooperative_only(True)
            ok &= _case(hl, ref, device, T=3, N=5, I=4, H=37, dtype=torch.bfloat16,
                        reverse=True)
            ok &= _expect_loop(hl, device, "cooperative")
            hl._ext._C._set_cuda_persistent_cooperative_only(False)
        if hasattr(hl, "set_cuda_time_loop"):
            hl.set_cuda_time_loop(before)
        else:
            hl.set_cuda_persistent_enabled(False)
    if hasattr(hl, "LSTM"):
        torch.manual_seed(0)
        base = torch.nn.LSTM(7, 17, num_layers=3, bidirectional=True).to(device)
        ours = hl.LSTM(7, 17, num_layers=3, bidirectional=True).to(device)
        ours.load_state_dict(base.state_dict(), strict=True)
        x = torch.randn(5, 3, 7, device=device, requires_grad=True)
        y_ours, _ = ours(x)
        y_ours.sum().backward()
        y_base, _ = base(x)
        err = ((y_ours - y_base).norm() / y_base.norm()).item()
        print(f"LSTM(7, 17, num_layers=3, bidirectional=True): relative error vs nn.LSTM {err:.2e}")
        ok &= err < 1e-4
    else:
        print("handlstm_cuda.LSTM does not exist yet: module case not run")
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitize_case: " + ("results agree" if ok else "RESULTS DISAGREE"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
