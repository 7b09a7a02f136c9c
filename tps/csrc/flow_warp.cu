// CUDA kernels of tps.warp.flow_warp: backward warping of (B, C, H, W) maps by a (B, 2, H, W) flow in pixels,
// bilinear (or nearest) with each neighbour clamped into the image, forward and backward.
// Compiled on first use by tps.warp.build_cuda_extension (torch.utils.cpp_extension.load_inline), which declares
// warp_forward / warp_backward to Python; nbs/01_warp.ipynb explains the maths and tests it against a reference.

// light headers only (not torch/extension.h): this file is most of the build time
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <vector>

namespace {
constexpr int CPT = 8;        // channels per thread
constexpr int THREADS = 256;

template <typename acc_t>
__device__ __forceinline__ int64_t clamp_index(acc_t f, int64_t n) {
  // f is an integral value (floor), possibly huge or NaN: clamp before converting
  if (!(f > (acc_t)0)) return 0;
  if (f >= (acc_t)(n - 1)) return n - 1;
  return (int64_t)f;
}

template <typename scalar_t, typename acc_t>
__global__ void warp_forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ flow,
                                    scalar_t* __restrict__ out, int64_t B, int64_t C, int64_t H, int64_t W,
                                    int64_t nchunk, bool nearest) {
  const int64_t HW = H * W, total = B * nchunk * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = i % HW, r = i / HW, chunk = r % nchunk, b = r / nchunk;
    const int64_t py = p / W, px = p - py * W;
    const acc_t gx = (acc_t)px + flow[(2 * b) * HW + p];
    const acc_t gy = (acc_t)py + flow[(2 * b + 1) * HW + p];
    const int64_t c0 = chunk * CPT;
    const int cn = (int)min((int64_t)CPT, C - c0);
    const scalar_t* xb = x + (b * C + c0) * HW;
    scalar_t* ob = out + (b * C + c0) * HW + p;
    if (nearest) {
      const int64_t q = clamp_index(floor(gx + (acc_t)0.5), W) + W * clamp_index(floor(gy + (acc_t)0.5), H);
      for (int k = 0; k < cn; ++k) ob[k * HW] = xb[k * HW + q];
    } else {
      const acc_t x0f = floor(gx), y0f = floor(gy);
      const acc_t ax = gx - x0f, ay = gy - y0f;
      const int64_t x0 = clamp_index(x0f, W), x1 = clamp_index(x0f + 1, W);
      const int64_t y0 = clamp_index(y0f, H) * W, y1 = clamp_index(y0f + 1, H) * W;
      const acc_t w00 = (1 - ax) * (1 - ay), w01 = ax * (1 - ay), w10 = (1 - ax) * ay, w11 = ax * ay;
      for (int k = 0; k < cn; ++k) {
        const scalar_t* xc = xb + k * HW;
        const acc_t v = (acc_t)xc[y0 + x0] * w00 + (acc_t)xc[y0 + x1] * w01 + (acc_t)xc[y1 + x0] * w10
                      + (acc_t)xc[y1 + x1] * w11;
        ob[k * HW] = (scalar_t)v;
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void warp_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                     const acc_t* __restrict__ flow, acc_t* __restrict__ grad_x,
                                     acc_t* __restrict__ grad_flow, int64_t B, int64_t C, int64_t H, int64_t W,
                                     int64_t nchunk, bool nearest) {
  const int64_t HW = H * W, total = B * nchunk * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = i % HW, r = i / HW, chunk = r % nchunk, b = r / nchunk;
    const int64_t py = p / W, px = p - py * W;
    const acc_t gx = (acc_t)px + flow[(2 * b) * HW + p];
    const acc_t gy = (acc_t)py + flow[(2 * b + 1) * HW + p];
    const int64_t c0 = chunk * CPT;
    const int cn = (int)min((int64_t)CPT, C - c0);
    const int64_t base = (b * C + c0) * HW;
    const scalar_t* gb = grad + base + p;
    const scalar_t* xb = x + base;
    acc_t* gxb = grad_x + base;
    if (nearest) {
      const int64_t q = clamp_index(floor(gx + (acc_t)0.5), W) + W * clamp_index(floor(gy + (acc_t)0.5), H);
      for (int k = 0; k < cn; ++k) atomicAdd(gxb + k * HW + q, (acc_t)gb[k * HW]);
    } else {
      const acc_t x0f = floor(gx), y0f = floor(gy);
      const acc_t ax = gx - x0f, ay = gy - y0f;
      const int64_t x0 = clamp_index(x0f, W), x1 = clamp_index(x0f + 1, W);
      const int64_t y0 = clamp_index(y0f, H) * W, y1 = clamp_index(y0f + 1, H) * W;
      const acc_t w00 = (1 - ax) * (1 - ay), w01 = ax * (1 - ay), w10 = (1 - ax) * ay, w11 = ax * ay;
      acc_t gu = 0, gv = 0;
      for (int k = 0; k < cn; ++k) {
        const acc_t g = (acc_t)gb[k * HW];
        acc_t* gxc = gxb + k * HW;
        atomicAdd(gxc + y0 + x0, g * w00); atomicAdd(gxc + y0 + x1, g * w01);
        atomicAdd(gxc + y1 + x0, g * w10); atomicAdd(gxc + y1 + x1, g * w11);
        const scalar_t* xc = xb + k * HW;
        const acc_t v00 = (acc_t)xc[y0 + x0], v01 = (acc_t)xc[y0 + x1];
        const acc_t v10 = (acc_t)xc[y1 + x0], v11 = (acc_t)xc[y1 + x1];
        gu += g * ((v01 - v00) * (1 - ay) + (v11 - v10) * ay);
        gv += g * ((v10 - v00) * (1 - ax) + (v11 - v01) * ax);
      }
      if (nchunk == 1) {
        grad_flow[(2 * b) * HW + p] = gu; grad_flow[(2 * b + 1) * HW + p] = gv;
      } else {
        atomicAdd(grad_flow + (2 * b) * HW + p, gu); atomicAdd(grad_flow + (2 * b + 1) * HW + p, gv);
      }
    }
  }
}

void check_args(const at::Tensor& x, const at::Tensor& flow) {
  TORCH_CHECK(x.is_cuda() && flow.is_cuda(), "tps flow_warp (CUDA): x and flow must be CUDA tensors");
  TORCH_CHECK(x.device() == flow.device(), "tps flow_warp (CUDA): x and flow must be on one device");
  TORCH_CHECK(x.dim() == 4 && flow.dim() == 4 && flow.size(1) == 2 && flow.size(0) == x.size(0) &&
              flow.size(2) == x.size(2) && flow.size(3) == x.size(3),
              "tps flow_warp (CUDA): expected x (B,C,H,W) and flow (B,2,H,W), got ", x.sizes(), " and ", flow.sizes());
}

int64_t num_blocks(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + THREADS - 1) / THREADS, (int64_t)1 << 22));
}
}  // namespace

at::Tensor warp_forward(at::Tensor x, at::Tensor flow, bool nearest) {
  check_args(x, flow);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto xc = x.contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto fc = flow.to(acc_type).contiguous();
  auto out = at::empty(xc.sizes(), xc.options());   // contiguous NCHW
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), nchunk = (C + CPT - 1) / CPT;
  const int64_t total = B * nchunk * H * W;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tps_flow_warp_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    warp_forward_kernel<scalar_t, acc_t><<<num_blocks(total), THREADS, 0, stream>>>(
        xc.data_ptr<scalar_t>(), fc.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, C, H, W, nchunk, nearest);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> warp_backward(at::Tensor grad, at::Tensor x, at::Tensor flow, bool nearest) {
  check_args(x, flow);
  TORCH_CHECK(grad.sizes() == x.sizes(), "tps flow_warp (CUDA): grad must have the shape of x");
  at::globalContext().alertNotDeterministic("tps::flow_warp_cuda backward (atomicAdd)");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto gc = grad.to(x.scalar_type()).contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto fc = flow.to(acc_type).contiguous();
  auto grad_x = at::zeros(xc.sizes(), xc.options().dtype(acc_type));
  auto grad_flow = at::zeros(fc.sizes(), fc.options());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), nchunk = (C + CPT - 1) / CPT;
  const int64_t total = B * nchunk * H * W;
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tps_flow_warp_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      warp_backward_kernel<scalar_t, acc_t><<<num_blocks(total), THREADS, 0, stream>>>(
          gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), fc.data_ptr<acc_t>(), grad_x.data_ptr<acc_t>(),
          grad_flow.data_ptr<acc_t>(), B, C, H, W, nchunk, nearest);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_x.to(x.scalar_type()), grad_flow.to(flow.scalar_type())};
}
