"""`python -m mixtral.kernels`: build (or find) the CPU decode kernels now and say where they are."""

import sys

from mixtral.kernels import ops

if ops.available():
    print(f"mixtral CPU kernels ready: {ops.build_dir()} (AVX512-BF16 dot products: {ops.has_bf16_dot()}, "
          f"int8 x int16 VNNI: {ops.has_w8a16()})")  # fmt: skip
    sys.exit(0)
print("mixtral CPU kernels unavailable here (no C++ compiler, or MIXTRAL_NO_KERNELS=1): torch paths are used")
sys.exit(1)
