"""Vehicle trajectory forecasting on handlstm_cuda.LSTM (and torch.nn.LSTM for comparison).

Run ``python -m examples.trajectory --help`` from the repository root; see README.md here.
"""
