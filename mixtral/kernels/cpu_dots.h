// Entry points of cpu_dots.cpp: x is prepared once per call (int16 blocks or bf16 rows, nullptr when
// this build or CPU lacks the instructions), then multiplied into weight rows [n0, n1) for rows
// [m0, m0 + rows) of x, writing y[m * ldy + n] in fp32, as rows_dot in cpu_kernels.cpp does.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <memory>

namespace mixtral_dots {

bool has_w8a16();     // int8 weights × int16 activations, AVX-512 VNNI (MIXTRAL_NO_W8A16=1 turns it off)
bool has_bf16_dot();  // bf16 weights × bf16 activations, AVX512-BF16

std::shared_ptr<void> prepare_int8_x(const float* x, int64_t M, int64_t K);
std::shared_ptr<void> prepare_bf16_x(const float* x, int64_t M, int64_t K);

void int8_dot(int rows, const void* prepared, int64_t m0, const int8_t* w, const float* scale, float* y,
              int64_t ldy, int64_t n0, int64_t n1);
void bf16_dot(int rows, const void* prepared, int64_t m0, const at::BFloat16* w, float* y, int64_t ldy,
              int64_t n0, int64_t n1);

}  // namespace mixtral_dots
