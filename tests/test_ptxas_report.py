"""benchmarks/ptxas_report.py's reading of ptxas output (the report itself needs nvcc)."""

import shutil

import pytest

from benchmarks import ptxas_report

# What `nvcc -Xptxas -v` prints for two kernels (mangled names as ptxas gives them).
PTXAS = """\
ptxas info    : Compiling entry function '_ZN8handlstm10persistent25persistent_forward_kernelIfLi4EEEvPT_S3_S3_PKS2_S5_S5_lllb' for 'sm_90'
ptxas info    : Function properties for _ZN8handlstm10persistent25persistent_forward_kernelIfLi4EEEvPT_S3_S3_PKS2_S5_S5_lllb
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 50 registers, used 1 barriers, 424 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN8handlstm12_GLOBAL__N_119cell_forward_kernelIdEEvPT_PKS2_S5_S3_S3_lll' for 'sm_90'
ptxas info    : Function properties for _ZN8handlstm12_GLOBAL__N_119cell_forward_kernelIdEEvPT_PKS2_S5_S3_S3_lll
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 1024 bytes smem, 416 bytes cmem[0]
"""


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs binutils' c++filt")
def test_parse_reads_registers_spills_and_shared_memory_per_kernel():
    rows = ptxas_report.parse(PTXAS)
    assert rows == [["persistent_forward_kernel<float, 4>", 50, 0, 0, 0, 0],
                    ["cell_forward_kernel<double>", 40, 4, 12, 1024, 8]]
