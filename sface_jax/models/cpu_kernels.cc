// Kernel gradients of 2-D convolutions (float32), as XLA FFI handlers for the CPU.
// cpu_kernels.py builds, loads and calls them, and says why.
//
// Both compute, for x (B, H, W, ...) and dy (B, P, Q, ...) in the layouts below,
//
//   dkernel[i, j, ...] = sum over b, p, q of x[b, s*p + i - pad_top, s*q + j - pad_left, ...]
//                                            * dy[b, p, q, ...]
//
// (x zero outside the image), and split the images among the threads of XLA's intra-op pool
// (`Chunks`): each thread sums its images into its own total, and the threads' totals are
// added last (float32 throughout, in a fixed order for a given thread count).
//
// SfaceGroupedConvKernelGrad, for grouped convolutions (MobileFaceNet's depthwise layers, its
// grouped stem and its global depthwise convolution), takes the channels with the group
// innermost: x (B, H, W, group_in, groups), dy (B, P, Q, group_out, groups), dkernel
// (kh, kw, group_in, group_out, groups). The groups are then the innermost loop, contiguous
// in all three arrays, which the compiler vectorises: for a depthwise layer that is one fused
// multiply-add per (position, tap, channel), reading x and dy once per tap from cache.
//
// SfaceConvKernelGrad, for dense convolutions (IResNet's), takes NHWC x (B, H, W, C_in) and
// dy (B, P, Q, C_out) and returns dkernel (kh, kw, C_in, C_out). For one tap, dkernel[i, j]
// is a matrix product x_tapᵀ · dy over the positions: each position adds the outer product
// of its C_in values of x and its C_out values of dy. It runs like a GEMM: a block of
// positions is packed into contiguous panels (`DenseBlock` says how), and a tile of 6 input ×
// 16 output channels is summed in 12 vector registers while it walks a tap's positions: per
// position two vector loads of dy, six broadcasts of x and twelve fused multiply-adds, so
// that the loop runs at the machine's multiply-add rate from cache.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

// The outputs [*first, *end) of a dimension whose tap falls inside the input:
// 0 <= stride * q + offset < size, q < out_size (offset = tap - padding).
void Inside(int64_t size, int64_t out_size, int64_t stride, int64_t offset, int64_t* first,
            int64_t* end) {
  const int64_t last = size - 1 - offset;
  *first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  *end = last < 0 ? 0 : std::min(out_size, last / stride + 1);
}

// Adds the terms of images [begin, end) into total.
using AddImages = std::function<void(int64_t begin, int64_t end, float* total)>;

// Work shared between the calling thread and the pool: chunk k covers images
// [k * batch / count, (k + 1) * batch / count), which `add_images` adds into partial[k].
// Whoever takes a chunk index first runs it, so the caller never waits for a task that has
// not started (the pool's threads may all be busy, or waiting like this one).
struct Chunks {
  AddImages add_images;
  int64_t batch, count;
  std::vector<std::vector<float>> partial;
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int64_t done = 0;

  // Runs chunks until none is left to take.
  void Work() {
    for (int64_t k = next++; k < count; k = next++) {
      add_images(k * batch / count, (k + 1) * batch / count, partial[k].data());
      std::lock_guard<std::mutex> lock(mutex);
      if (++done == count) finished.notify_all();
    }
  }
};

// out (size floats) = the sum over all images of what add_images adds, the images split
// over the pool.
void SumOverImages(ffi::ThreadPool& pool, int64_t batch, int64_t size, AddImages add_images,
                   float* out) {
  auto chunks = std::make_shared<Chunks>();
  chunks->add_images = std::move(add_images);
  chunks->batch = batch;
  chunks->count = std::max<int64_t>(1, std::min<int64_t>(batch, pool.num_threads()));
  chunks->partial.assign(chunks->count, std::vector<float>(size, 0.0f));
  for (int64_t k = 1; k < chunks->count; ++k) pool.Schedule([chunks] { chunks->Work(); });
  chunks->Work();
  {
    std::unique_lock<std::mutex> lock(chunks->mutex);
    chunks->finished.wait(lock, [&] { return chunks->done == chunks->count; });
  }
  std::copy(chunks->partial[0].begin(), chunks->partial[0].end(), out);
  for (int64_t k = 1; k < chunks->count; ++k) {
    for (int64_t e = 0; e < size; ++e) out[e] += chunks->partial[k][e];
  }
}

// ---------------------------------------------------------------- grouped convolutions

// Accumulators held in registers while a tap runs along an output row: one block of groups.
constexpr int64_t kGroupBlock = 16;

// Adds image b's terms into total (kh, kw, group_in, group_out, groups). For each output
// row, tap and block of groups, the row's terms are summed in registers and then added to
// total: two loads per multiply-add, no store.
void GroupedImage(const Geometry& g, const float* x, const float* dy, int64_t b,
                  float* total) {
  const int64_t groups = g.groups, x_step = g.stride * g.in_pixel(), dy_step = g.out_pixel();
  for (int64_t p = 0; p < g.out_height; ++p) {
    const float* dy_row = dy + (b * g.out_height + p) * g.out_width * g.out_pixel();
    for (int64_t i = 0; i < g.kernel_height; ++i) {
      const int64_t h = g.stride * p + i - g.pad_top;
      if (h < 0 || h >= g.height) continue;
      const float* x_row = x + (b * g.height + h) * g.width * g.in_pixel();
      for (int64_t j = 0; j < g.kernel_width; ++j) {
        int64_t first, end;
        Inside(g.width, g.out_width, g.stride, j - g.pad_left, &first, &end);
        const float* x_first = x_row + (g.stride * first + j - g.pad_left) * g.in_pixel();
        const float* dy_first = dy_row + first * dy_step;
        float* tap = total + (i * g.kernel_width + j) * g.tap_size();
        for (int64_t c = 0; c < g.group_in; ++c) {
          for (int64_t u = 0; u < g.group_out; ++u) {
            const float* x_c = x_first + c * groups;
            const float* dy_u = dy_first + u * groups;
            float* t = tap + (c * g.group_out + u) * groups;
            int64_t k0 = 0;
            for (; k0 + kGroupBlock <= groups; k0 += kGroupBlock) {
              float acc[kGroupBlock] = {};
              for (int64_t q = 0; q < end - first; ++q) {
                const float* xq = x_c + q * x_step + k0;
                const float* dq = dy_u + q * dy_step + k0;
                for (int64_t k = 0; k < kGroupBlock; ++k) acc[k] += xq[k] * dq[k];
              }
              for (int64_t k = 0; k < kGroupBlock; ++k) t[k0 + k] += acc[k];
            }
            for (; k0 < groups; ++k0) {  // groups not a multiple of kGroupBlock
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

using Array5 = ffi::Buffer<ffi::F32, 5>;  // float32, rank 5

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
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  SumOverImages(pool, g.batch, g.kernel_size(),
                [&g, x_data, dy_data](int64_t begin, int64_t end, float* total) {
                  for (int64_t b = begin; b < end; ++b) GroupedImage(g, x_data, dy_data, b, total);
                },
                dkernel->typed_data());
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ dense convolutions

typedef float Vec __attribute__((vector_size(32)));  // 8 floats: one AVX register
constexpr int64_t kLanes = 8;

Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// Positions in a strided array: `images` × `rows` × `cols`, `image`, `row` and `col` floats
// apart.
struct Grid {
  int64_t images, rows, cols, image, row, col;
};

// panel[k * W + l] = a[position k of the grid + l] for l < W, positions in the grid's order:
// a strided block of channels copied into one contiguous panel.
template <int64_t W>
void PackOf(const float* a, const Grid& grid, float* panel) {
  for (int64_t n = 0; n < grid.images; ++n) {
    for (int64_t r = 0; r < grid.rows; ++r) {
      const float* src = a + n * grid.image + r * grid.row;
      for (int64_t q = 0; q < grid.cols; ++q, src += grid.col, panel += W) {
        std::memcpy(panel, src, W * sizeof(float));
      }
    }
  }
}

// x's panel of W input channels for a block of images and output rows, split by the phase
// of the stride: plane (a, b) holds x[s*r + a - pad_top, s*c + b - pad_left] at (r, c), so
// that tap (i, j) of output (p, q) is plane (i % s, j % s) at (p + i / s, q + j / s): every
// tap a walk with the same strides. Places outside the image are left unwritten: the walks
// cover only the outputs whose tap falls inside (`TapRange`).
struct XPlanes {
  int64_t phases_h, phases_w, rows, cols, images;
  int64_t plane() const { return images * rows * cols; }
  int64_t size() const { return phases_h * phases_w * plane(); }
};

template <int64_t W>
void PackPlanesOf(const Geometry& g, const float* x, int64_t b0, int64_t p0,
                  const XPlanes& planes, float* panel) {
  const int64_t c_in = g.group_in, s = g.stride;
  for (int64_t a = 0; a < planes.phases_h; ++a) {
    for (int64_t b = 0; b < planes.phases_w; ++b) {
      for (int64_t n = 0; n < planes.images; ++n) {
        for (int64_t r = 0; r < planes.rows; ++r) {
          const int64_t h = s * (p0 + r) + a - g.pad_top;
          const bool row_inside = 0 <= h && h < g.height;
          const float* row = x + ((b0 + n) * g.height + h) * g.width * c_in;
          for (int64_t c = 0; c < planes.cols; ++c, panel += W) {
            const int64_t w = s * c + b - g.pad_left;
            if (row_inside && 0 <= w && w < g.width) {  // outside: never read (TapRange)
              std::memcpy(panel, row + w * c_in, W * sizeof(float));
            }
          }
        }
      }
    }
  }
}

// Tables of the packing functions by panel width: entry W - 1 copies W = 1 ... 16 channels
// (each width its own instantiation, so that the copies have a fixed size).
template <int64_t... W>
constexpr auto PackGridByWidth(std::integer_sequence<int64_t, W...>) {
  return std::array{&PackOf<W + 1>...};
}

template <int64_t... W>
constexpr auto PackPlanesByWidth(std::integer_sequence<int64_t, W...>) {
  return std::array{&PackPlanesOf<W + 1>...};
}

constexpr auto kPackGrid = PackGridByWidth(std::make_integer_sequence<int64_t, 16>());
constexpr auto kPackPlanes = PackPlanesByWidth(std::make_integer_sequence<int64_t, 16>());

// One tap's walk over packed panels, counted in positions (a panel of W channels holds W
// floats per position): x and dy advance by one position along an output row, by x_row and
// dy_row positions from one output row to the next, by x_image and dy_image from one image
// to the next.
struct Walk {
  int64_t images, rows, cols, x_image, x_row, dy_image, dy_row;
};

// out[m, v*8 + l] += sum over the walk's positions of x[m] * dy[v*8 + l], for M input
// channels and V vectors of output channels, into out (M, V*8), summed in M × V registers.
template <int64_t M, int64_t V>
void Tile(const float* x, const float* dy, const Walk& w, float* out) {
  Vec acc[M][V] = {};
  for (int64_t n = 0; n < w.images; ++n) {
    for (int64_t r = 0; r < w.rows; ++r) {
      const float* xq = x + (n * w.x_image + r * w.x_row) * M;
      const float* dq = dy + (n * w.dy_image + r * w.dy_row) * V * kLanes;
      for (int64_t q = 0; q < w.cols; ++q, xq += M, dq += V * kLanes) {
        Vec d[V];
        for (int64_t v = 0; v < V; ++v) d[v] = Load(dq + v * kLanes);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t v = 0; v < V; ++v) acc[m][v] += xq[m] * d[v];
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t v = 0; v < V; ++v) {
      float* o = out + (m * V + v) * kLanes;
      Store(o, Load(o) + acc[m][v]);
    }
  }
}

constexpr int64_t kTileIn = 6, kTileOut = 2;  // input channels, vectors of output channels
using TileFunction = void (*)(const float*, const float*, const Walk&, float*);

template <int64_t... M>
constexpr std::array<TileFunction, sizeof...(M)> TilesOf(int64_t v_count) {
  return v_count == 1 ? std::array<TileFunction, sizeof...(M)>{&Tile<M, 1>...}
                      : std::array<TileFunction, sizeof...(M)>{&Tile<M, 2>...};
}

// kTiles[v - 1][m - 1]: the tile for m input channels and v vectors of output channels.
const std::array<TileFunction, kTileIn> kTiles[kTileOut] = {TilesOf<1, 2, 3, 4, 5, 6>(1),
                                                            TilesOf<1, 2, 3, 4, 5, 6>(2)};

// Blocking, as in a GEMM: a block of output positions (whole images where they are small,
// rows of one image where they are large) is packed, dy into panels of 16 output channels
// and x into panels of 6 input channels, each panel contiguous (so that no stride of a wide
// layer makes its rows collide in the cache). One block of x panels stays in the core's L2
// cache and one dy panel in L1 while the tiles walk them; the tiles' sums leave the
// registers once per block and tap. Where output rows are long, dy is packed once per block
// and x once per block into phase planes (`XPlanes`), and each tap walks them row by row;
// where they are short (`kShortRow`), a walk row by row loses its time in loop ends, so each
// tap's positions are packed on their own and walked in one run.
constexpr int64_t kBlockPositions = 384;
constexpr int64_t kBlockInBytes = 192 * 1024;
constexpr int64_t kShortRow = 12;

// Panels of one block, reused from block to block.
struct Panels {
  std::vector<float> x, dy;
};

// Input channels per block: as many as keep `positions` of them in kBlockInBytes.
int64_t InBlock(int64_t positions) {
  return std::max<int64_t>(
      kTileIn, kBlockInBytes / (positions * int64_t{sizeof(float)}) / kTileIn * kTileIn);
}

// Packs dy's output channels at the grid's positions into panels.dy, 16 channels a panel.
void PackDy(const float* dy, const Grid& grid, int64_t c_out, Panels& panels) {
  const int64_t positions = grid.images * grid.rows * grid.cols;
  panels.dy.resize(positions * c_out);
  for (int64_t o = 0; o < c_out; o += kTileOut * kLanes) {
    const int64_t width = std::min(kTileOut * kLanes, c_out - o);
    kPackGrid[width - 1](dy + o, grid, &panels.dy[o * positions]);
  }
}

// Every tile of one tap and one block of input channels [c0, c1): the x panel of channels
// [c, c + 6) starts at (c - c0) * x_panel floats, the dy panel of [o, o + 16) at
// o * dy_panel; both walks start `x_start` and `dy_start` positions in.
void Tiles(const Panels& panels, int64_t c0, int64_t c1, int64_t c_in, int64_t c_out,
           int64_t x_panel, int64_t dy_panel, int64_t x_start, int64_t dy_start,
           const Walk& walk, float* tap) {
  for (int64_t o = 0; o < c_out; o += kTileOut * kLanes) {
    const int64_t vectors = std::min(kTileOut, (c_out - o) / kLanes);
    for (int64_t c = c0; c < c1; c += kTileIn) {
      const int64_t width = std::min(kTileIn, c1 - c);
      kTiles[vectors - 1][width - 1](
          &panels.x[(c - c0) * x_panel + x_start * width],
          &panels.dy[o * dy_panel + dy_start * vectors * kLanes], walk,
          tap + o * c_in + c * vectors * kLanes);
    }
  }
}

// The output rows and columns of a block that tap (i, j) reaches inside the image.
bool TapRange(const Geometry& g, int64_t i, int64_t j, int64_t p0, int64_t p1,
              int64_t* row_first, int64_t* row_end, int64_t* first, int64_t* end) {
  Inside(g.height, g.out_height, g.stride, i - g.pad_top, row_first, row_end);
  Inside(g.width, g.out_width, g.stride, j - g.pad_left, first, end);
  *row_first = std::max(*row_first, p0);
  *row_end = std::min(*row_end, p1);
  return *row_first < *row_end && *first < *end;
}

// Adds the terms of images [b0, b1) and output rows [p0, p1) into total, which holds each
// tap's (C_in, C_out) in tiles: for each block of 16 output channels [o, o + 16), a
// contiguous (C_in, 16) at offset o * C_in (so that a tile's sums are one contiguous run).
void DenseBlock(const Geometry& g, const float* x, const float* dy, int64_t b0, int64_t b1,
                int64_t p0, int64_t p1, Panels& panels, float* total) {
  const int64_t c_in = g.group_in, c_out = g.group_out, s = g.stride;
  const int64_t images = b1 - b0, cols = g.out_width;
  const int64_t x_image = g.height * g.width * c_in, dy_image = g.out_height * cols * c_out;
  int64_t row_first, row_end, first, end;
  if (cols < kShortRow) {  // each tap's positions packed on their own
    for (int64_t i = 0; i < g.kernel_height; ++i) {
      for (int64_t j = 0; j < g.kernel_width; ++j) {
        if (!TapRange(g, i, j, p0, p1, &row_first, &row_end, &first, &end)) continue;
        const Grid dy_grid{images, row_end - row_first, end - first, dy_image, cols * c_out,
                           c_out};
        const Grid x_grid{images, row_end - row_first, end - first, x_image,
                          s * g.width * c_in, s * c_in};
        const int64_t positions = images * (row_end - row_first) * (end - first);
        PackDy(dy + ((b0 * g.out_height + row_first) * cols + first) * c_out, dy_grid, c_out,
               panels);
        const float* x_tap = x + ((b0 * g.height + s * row_first + i - g.pad_top) * g.width +
                                  s * first + j - g.pad_left) * c_in;
        const int64_t in_block = InBlock(positions);
        for (int64_t c0 = 0; c0 < c_in; c0 += in_block) {
          const int64_t c1 = std::min(c_in, c0 + in_block);
          panels.x.resize(positions * (c1 - c0));
          for (int64_t c = c0; c < c1; c += kTileIn) {
            kPackGrid[std::min(kTileIn, c1 - c) - 1](x_tap + c, x_grid,
                                                     &panels.x[(c - c0) * positions]);
          }
          Tiles(panels, c0, c1, c_in, c_out, positions, positions, 0, 0,
                Walk{1, 1, positions, 0, 0, 0, 0}, total + (i * g.kernel_width + j) * c_in * c_out);
        }
      }
    }
    return;
  }
  const int64_t rows = p1 - p0;
  PackDy(dy + (b0 * g.out_height + p0) * cols * c_out,
         Grid{images, rows, cols, dy_image, cols * c_out, c_out}, c_out, panels);
  const XPlanes planes{std::min(s, g.kernel_height), std::min(s, g.kernel_width),
                       rows + (g.kernel_height - 1) / s, cols + (g.kernel_width - 1) / s, images};
  const int64_t in_block = InBlock(planes.size());
  for (int64_t c0 = 0; c0 < c_in; c0 += in_block) {
    const int64_t c1 = std::min(c_in, c0 + in_block);
    panels.x.resize(planes.size() * (c1 - c0));
    for (int64_t c = c0; c < c1; c += kTileIn) {
      kPackPlanes[std::min(kTileIn, c1 - c) - 1](g, x + c, b0, p0, planes,
                                                 &panels.x[(c - c0) * planes.size()]);
    }
    for (int64_t i = 0; i < g.kernel_height; ++i) {
      for (int64_t j = 0; j < g.kernel_width; ++j) {
        if (!TapRange(g, i, j, p0, p1, &row_first, &row_end, &first, &end)) continue;
        // x's plane of this tap's phase, at output (row_first, first) of the first image
        const int64_t x_start = ((i % s) * planes.phases_w + j % s) * planes.plane() +
                                (row_first - p0 + i / s) * planes.cols + first + j / s;
        const Walk walk{images, row_end - row_first, end - first, planes.rows * planes.cols,
                        planes.cols, rows * cols, cols};
        Tiles(panels, c0, c1, c_in, c_out, planes.size(), images * rows * cols, x_start,
              (row_first - p0) * cols + first, walk,
              total + (i * g.kernel_width + j) * c_in * c_out);
      }
    }
  }
}

// Adds the terms of images [begin, end) into total, block by block.
void DenseImages(const Geometry& g, const float* x, const float* dy, int64_t begin,
                 int64_t end, float* total) {
  Panels panels;
  const int64_t image = g.out_height * g.out_width;
  if (image >= kBlockPositions) {  // rows of one image at a time
    const int64_t rows = std::max<int64_t>(1, kBlockPositions / g.out_width);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t p = 0; p < g.out_height; p += rows) {
        DenseBlock(g, x, dy, b, b + 1, p, std::min(g.out_height, p + rows), panels, total);
      }
    }
  } else {  // whole images
    const int64_t images = kBlockPositions / image;
    for (int64_t b = begin; b < end; b += images) {
      DenseBlock(g, x, dy, b, std::min(end, b + images), 0, g.out_height, panels, total);
    }
  }
}

using Array4 = ffi::Buffer<ffi::F32, 4>;  // float32, rank 4

ffi::Error ConvKernelGrad(ffi::ThreadPool pool, Array4 x, Array4 dy,
                          ffi::Result<Array4> dkernel, int64_t stride, int64_t pad_top,
                          int64_t pad_left) {
  const auto xd = x.dimensions(), dyd = dy.dimensions(), kd = dkernel->dimensions();
  const Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], dyd[3], 1, kd[0], kd[1],
                   stride, pad_top, pad_left};
  if (dyd[0] != g.batch || kd[2] != g.group_in || kd[3] != g.group_out || stride < 1 ||
      g.group_out % kLanes != 0) {
    return ffi::Error::InvalidArgument(
        "conv_kernel_grad: x (B, H, W, C_in), dy (B, P, Q, C_out) and dkernel "
        "(kh, kw, C_in, C_out) do not agree, or C_out is not a multiple of 8");
  }
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  std::vector<float> tiled(g.kernel_size());
  SumOverImages(pool, g.batch, g.kernel_size(),
                [&g, x_data, dy_data](int64_t begin, int64_t end, float* total) {
                  DenseImages(g, x_data, dy_data, begin, end, total);
                },
                tiled.data());
  // tiled (taps, C_out / 16, C_in, 16) → dkernel (taps, C_in, C_out)
  float* out = dkernel->typed_data();
  const int64_t c_in = g.group_in, c_out = g.group_out, block = kTileOut * kLanes;
  for (int64_t t = 0; t < g.kernel_height * g.kernel_width; ++t) {
    for (int64_t o = 0; o < c_out; o += block) {
      const int64_t width = std::min(block, c_out - o);
      for (int64_t c = 0; c < c_in; ++c) {
        std::copy_n(&tiled[(t * c_out + o) * c_in + c * width], width,
                    out + (t * c_in + c) * c_out + o);
      }
    }
  }
  return ffi::Error::Success();
}

// Both handlers' signature: the pool, x and dy of rank R, dkernel, the window's attributes.
template <typename Array>
auto KernelGradBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<Array>()
      .template Arg<Array>()
      .template Ret<Array>()
      .template Attr<int64_t>("stride")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SfaceGroupedConvKernelGrad, GroupedConvKernelGrad,
                              KernelGradBinding<Array5>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SfaceConvKernelGrad, ConvKernelGrad, KernelGradBinding<Array4>());
