// The tensor-level kernels of this library that other translation units call directly (no dispatcher):
// defined in cpu_kernels.cpp (float / per-row int8 weights) and cpu_qgroup.cpp (group-quantized).
#pragma once

#include <torch/extension.h>

#include <vector>

torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale);
torch::Tensor moe(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w1, torch::Tensor w3,
                  torch::Tensor w2, c10::optional<torch::Tensor> s1, c10::optional<torch::Tensor> s3,
                  c10::optional<torch::Tensor> s2);
torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t bits);
std::vector<torch::Tensor> qlinear_many(torch::Tensor x, const std::vector<torch::Tensor>& qs,
                                        const std::vector<torch::Tensor>& ss, int64_t bits);
torch::Tensor qmoe(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w1, torch::Tensor w3,
                   torch::Tensor w2, torch::Tensor s1, torch::Tensor s3, torch::Tensor s2, int64_t bits);
