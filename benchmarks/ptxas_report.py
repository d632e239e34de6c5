"""Register, spill and shared-memory use of every CUDA kernel, from ptxas (`nvcc -Xptxas -v`).

Needs nvcc and a CUDA build of torch, no GPU. Compiles each CUDA source of the extension for
one architecture with the build's flags (setup.py, torch's common nvcc flags) and prints a
markdown table: kernel, registers per thread, spill stores/loads, static shared memory, stack
frame. The persistent and cooperative kernels run 256 threads per block (__launch_bounds__),
so they have up to 255 registers per thread; any spill is a finding.

    python -m benchmarks.ptxas_report                      # sm_90 (H100/H200), to stdout
    python -m benchmarks.ptxas_report --arch 80 --out benchmarks/results/ptxas-sm80.md
"""

import argparse
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["csrc/lstm_cuda.cu", "csrc/lstm_cuda_persistent.cu", "csrc/lstm_cuda_cooperative.cu"]

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def nvcc_command(source, arch, out_dir):
    from torch.utils import cpp_extension

    # The include folders setup.py's nvidia_pip_include_dirs adds (setup.py runs its build on
    # import, so the few lines are repeated here).
    nvidia = []
    for entry in sys.path:
        nv = Path(entry) / "nvidia"
        if nv.is_dir():
            nvidia += [p for p in sorted(nv.glob("*/include")) if (p / "cublas_v2.h").exists()]
    nvcc = str(Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc")
    includes = [ROOT / "csrc", *nvidia, *cpp_extension.include_paths(device_type="cuda")]
    return [nvcc, "-c", str(ROOT / source), "-o", str(Path(out_dir) / (Path(source).stem + ".o")),
            "-O3", "-std=c++20", "-DHANDLSTM_WITH_CUDA", *cpp_extension.COMMON_NVCC_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
            "--compiler-options", "-fPIC", *[f"-I{p}" for p in includes]]


def demangle(names):
    """C++ names from mangled ones with binutils' c++filt; as given where it is missing."""
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def parse(text):
    """One row per entry function: [name, registers, spill stores, spill loads, smem, stack]."""
    rows, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = [m.group(1), None, None, None, 0, None]
            rows.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current[5], current[2], current[3] = (int(g) for g in m.groups())
        elif current is not None and (m := USED.search(line)):
            current[1] = int(m.group(1))
            current[4] = int(m.group(2) or 0)
    names = demangle([r[0] for r in rows])
    for row, name in zip(rows, names):
        # Drop the namespaces and the parameter list: kernel<type, R> is what tells them apart.
        name = re.sub(r"handlstm::(persistent::|\(anonymous namespace\)::)?", "", name)
        row[0] = name.split("(")[0].removeprefix("void ")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90", help="compute capability without the dot (90)")
    ap.add_argument("--out", help="write the table here instead of stdout")
    args = ap.parse_args(argv)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            cmd = nvcc_command(source, args.arch, tmp)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
            rows = parse(done.stdout + done.stderr)
            sections.append((source, sorted(rows)))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    nvcc_version = subprocess.run([cmd[0], "--version"], capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
    lines = [f"# ptxas report, sm_{args.arch}", "",
             f"{datetime.date.today().isoformat()}, commit {commit}, {nvcc_version}. "
             "Made by `python -m benchmarks.ptxas_report` (compiled only; no GPU involved).", ""]
    for source, rows in sections:
        spills = sum(1 for r in rows if r[2] or r[3])
        lines += [f"## {source}", "",
                  f"{len(rows)} kernels, most registers {max(r[1] for r in rows)}, "
                  f"{spills} with spills.", "",
                  "| kernel | registers | spill stores (B) | spill loads (B) | static smem (B) "
                  "| stack (B) |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| `{r[0]}` | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} |" for r in rows]
        lines.append("")
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
