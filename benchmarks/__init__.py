"""Benchmarks for handlstm_cuda against torch.nn.LSTM (cuDNN / oneDNN) and the reference loop.

Run ``python -m benchmarks.bench --help``; ``benchmarks/README.md`` explains the presets and
how to read the output.
"""
