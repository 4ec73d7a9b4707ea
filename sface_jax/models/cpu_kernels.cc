// The kernel gradient of a grouped 2-D convolution (float32), as an XLA FFI handler for the
// CPU: MobileFaceNet's depthwise layers, its grouped stem and its global depthwise
// convolution. cpu_kernels.py builds, loads and calls it, and says why.
//
// The channels come with the group innermost: x (B, H, W, group_in, groups),
// dy (B, P, Q, group_out, groups), dkernel (kh, kw, group_in, group_out, groups), so that
//
//   dkernel[i, j, c, u, g] = sum over b, p, q of
//       x[b, s*p + i - pad_top, s*q + j - pad_left, c, g] * dy[b, p, q, u, g]
//
// (x zero outside the image) has the groups as its innermost loop, contiguous in all three
// arrays, which the compiler vectorises: for a depthwise layer (group_in = group_out = 1)
// that is one fused multiply-add per (position, tap, channel), reading x and dy once per
// tap from cache. Images are split among the threads of XLA's intra-op pool; each image's
// sum is formed on its own, then added to its thread's total, and the threads' totals are
// added last (float32 throughout, in a fixed order for a given thread count).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Array5 = ffi::Buffer<ffi::F32, 5>;  // float32, rank 5

namespace {

struct Geometry {
  int64_t batch, height, width, group_in;  // x
  int64_t out_height, out_width, group_out;  // dy
  int64_t groups, kernel_height, kernel_width, stride, pad_top, pad_left;

  int64_t in_pixel() const { return group_in * groups; }
  int64_t out_pixel() const { return group_out * groups; }
  int64_t tap_size() const { return group_in * group_out * groups; }
  int64_t kernel_size() const { return kernel_height * kernel_width * tap_size(); }
};

// The output columns [first, end) whose tap j falls inside the image:
// 0 <= s*q + j - pad_left < width.
void Columns(const Geometry& g, int64_t j, int64_t* first, int64_t* end) {
  const int64_t below = g.pad_left - j, last = g.width - 1 + g.pad_left - j;
  *first = below <= 0 ? 0 : (below + g.stride - 1) / g.stride;
  *end = last < 0 ? 0 : std::min(g.out_width, last / g.stride + 1);
}

// Accumulators held in registers while a tap runs along an output row: one block of groups.
constexpr int64_t kBlock = 16;

// sum[i, j, c, u, g] = the kernel gradient's terms from image b alone (sum is overwritten).
// For each output row, tap and block of groups, the row's terms are summed in registers and
// then added to sum: two loads per multiply-add, no store.
void ImageKernelGrad(const Geometry& g, const float* x, const float* dy, int64_t b,
                     float* sum) {
  std::fill(sum, sum + g.kernel_size(), 0.0f);
  const int64_t groups = g.groups, x_step = g.stride * g.in_pixel(), dy_step = g.out_pixel();
  for (int64_t p = 0; p < g.out_height; ++p) {
    const float* dy_row = dy + (b * g.out_height + p) * g.out_width * g.out_pixel();
    for (int64_t i = 0; i < g.kernel_height; ++i) {
      const int64_t h = g.stride * p + i - g.pad_top;
      if (h < 0 || h >= g.height) continue;
      const float* x_row = x + (b * g.height + h) * g.width * g.in_pixel();
      for (int64_t j = 0; j < g.kernel_width; ++j) {
        int64_t first, end;
        Columns(g, j, &first, &end);
        const float* x_first = x_row + (g.stride * first + j - g.pad_left) * g.in_pixel();
        const float* dy_first = dy_row + first * dy_step;
        float* tap = sum + (i * g.kernel_width + j) * g.tap_size();
        for (int64_t c = 0; c < g.group_in; ++c) {
          for (int64_t u = 0; u < g.group_out; ++u) {
            const float* x_c = x_first + c * groups;
            const float* dy_u = dy_first + u * groups;
            float* t = tap + (c * g.group_out + u) * groups;
            int64_t k0 = 0;
            for (; k0 + kBlock <= groups; k0 += kBlock) {
              float acc[kBlock] = {};
              for (int64_t q = 0; q < end - first; ++q) {
                const float* xq = x_c + q * x_step + k0;
                const float* dq = dy_u + q * dy_step + k0;
                for (int64_t k = 0; k < kBlock; ++k) acc[k] += xq[k] * dq[k];
              }
              for (int64_t k = 0; k < kBlock; ++k) t[k0 + k] += acc[k];
            }
            for (; k0 < groups; ++k0) {  // groups not a multiple of kBlock
              for (int64_t q = 0; q < end - first; ++q) {
                t[k0] += x_c[q * x_step + k0] * dy_u[q * dy_step + k0];
              }
            }
          }
        }
      }
    }
  }
}

// Images [begin, end) added into total.
void KernelGradRange(const Geometry& g, const float* x, const float* dy, int64_t begin,
                     int64_t end, float* total) {
  std::vector<float> sum(g.kernel_size());
  for (int64_t b = begin; b < end; ++b) {
    ImageKernelGrad(g, x, dy, b, sum.data());
    for (int64_t k = 0; k < g.kernel_size(); ++k) total[k] += sum[k];
  }
}

// Work shared between the calling thread and the pool: chunk k covers images
// [k * batch / chunks, (k + 1) * batch / chunks) and writes partial[k]. Whoever takes a chunk
// index first runs it, so the caller never waits for a task that has not started (the pool's
// threads may all be busy, or waiting like this one).
struct Chunks {
  Geometry geometry;
  const float* x;
  const float* dy;
  int64_t count;
  std::vector<std::vector<float>> partial;
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int64_t done = 0;

  // Runs chunks until none is left to take.
  void Work() {
    const int64_t batch = geometry.batch;
    for (int64_t k = next++; k < count; k = next++) {
      KernelGradRange(geometry, x, dy, k * batch / count, (k + 1) * batch / count,
                      partial[k].data());
      std::lock_guard<std::mutex> lock(mutex);
      if (++done == count) finished.notify_all();
    }
  }
};

ffi::Error GroupedConvKernelGrad(ffi::ThreadPool pool, Array5 x, Array5 dy,
                                 ffi::Result<Array5> dkernel, int64_t stride,
                                 int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), dyd = dy.dimensions(), kd = dkernel->dimensions();
  const Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], dyd[3], xd[4], kd[0], kd[1],
                   stride, pad_top, pad_left};
  if (dyd[0] != g.batch || dyd[4] != g.groups || kd[2] != g.group_in ||
      kd[3] != g.group_out || kd[4] != g.groups || stride < 1) {
    return ffi::Error::InvalidArgument(
        "grouped_conv_kernel_grad: x (B, H, W, group_in, groups), dy (B, P, Q, group_out, "
        "groups) and dkernel (kh, kw, group_in, group_out, groups) do not agree");
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->geometry = g;
  chunks->x = x.typed_data();
  chunks->dy = dy.typed_data();
  chunks->count = std::max<int64_t>(1, std::min<int64_t>(g.batch, pool.num_threads()));
  chunks->partial.assign(chunks->count, std::vector<float>(g.kernel_size(), 0.0f));
  for (int64_t k = 1; k < chunks->count; ++k) pool.Schedule([chunks] { chunks->Work(); });
  chunks->Work();
  {
    std::unique_lock<std::mutex> lock(chunks->mutex);
    chunks->finished.wait(lock, [&] { return chunks->done == chunks->count; });
  }
  float* out = dkernel->typed_data();
  std::copy(chunks->partial[0].begin(), chunks->partial[0].end(), out);
  for (int64_t k = 1; k < chunks->count; ++k) {
    for (int64_t e = 0; e < g.kernel_size(); ++e) out[e] += chunks->partial[k][e];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SfaceGroupedConvKernelGrad, GroupedConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array5>()
                                  .Arg<Array5>()
                                  .Ret<Array5>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
