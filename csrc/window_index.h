// Index arithmetic of (shifted) window attention, shared by the CUDA kernels and the CPU test
// (csrc/tests/index_check.cpp, driven by tests/test_cuda_build.py). Everything here is plain integer
// math on host and device; it is the only place where pad / roll / partition / shift-mask / relative
// position semantics live, so the CPU test of this header is the evidence that the kernels address
// the map like the eager reference (esvit_kernels/reference/window.py).
#pragma once

#if defined(__CUDACC__)
#define ESVIT_HD __host__ __device__ __forceinline__
#else
#define ESVIT_HD inline
#endif

namespace esvit {

// Geometry of the map layout: an (H, W) map, windows (Wh, Ww), shifts (sh, sw) with 0 <= s < window,
// padded right/bottom to (Hp, Wp) = multiples of the window, nWh x nWw windows per image.
struct MapGeom {
  int H, W, Wh, Ww, sh, sw, Hp, Wp, nWh, nWw;
  bool roll_before_pad;  // false: official Swin/EsViT (pad, then roll); true: timm (roll, then pad)
};

ESVIT_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

inline MapGeom make_map_geom(int H, int W, int Wh, int Ww, int sh, int sw, bool roll_before_pad) {
  MapGeom g;
  g.H = H; g.W = W; g.Wh = Wh; g.Ww = Ww; g.sh = sh; g.sw = sw;
  g.nWh = ceil_div(H, Wh); g.nWw = ceil_div(W, Ww);
  g.Hp = g.nWh * Wh; g.Wp = g.nWw * Ww;
  g.roll_before_pad = roll_before_pad;
  return g;
}

// Source pixel of the token at position (ys, xs) of the padded, shifted map (ys = window row * Wh + r,
// xs = window col * Ww + c). Returns false for a padding token (its q/k/v come from the pad vector and
// its output is discarded); otherwise sets (y, x) in [0, H) x [0, W), where the output is written.
//   official: rolled[ys] = padded[(ys + sh) % Hp]; a padding row when that source row is >= H.
//   timm:     padded[ys] = rolled[ys] for ys < H, where rolled[ys] = map[(ys + sh) % H].
ESVIT_HD bool map_source(const MapGeom& g, int ys, int xs, int& y, int& x) {
  if (g.roll_before_pad) {
    if (ys >= g.H || xs >= g.W) return false;
    y = (ys + g.sh) % g.H;
    x = (xs + g.sw) % g.W;
    return true;
  }
  y = (ys + g.sh) % g.Hp;
  x = (xs + g.sw) % g.Wp;
  return y < g.H && x < g.W;
}

// Band of a position along one axis of the padded, shifted map (length L, window w, shift s):
// [0, L-w) -> 0, [L-w, L-s) -> 1, [L-s, L) -> 2; every position is band 0 when s == 0.
ESVIT_HD int shift_band(int pos, int L, int w, int s) {
  if (s == 0) return 0;
  return (pos >= L - w ? 1 : 0) + (pos >= L - s ? 1 : 0);
}

// Region label (0..8) of a position of the padded, shifted map. Two tokens of one window attend with
// -100 added when their labels differ; all labels are 0 without shift, so no mask then.
ESVIT_HD int region_label(const MapGeom& g, int ys, int xs) {
  return 3 * shift_band(ys, g.Hp, g.Wh, g.sh) + shift_band(xs, g.Wp, g.Ww, g.sw);
}

// Everything a kernel needs about token n (0 <= n < Wh*Ww) of window `win` (0 <= win < nWh*nWw, row-major
// over the window grid of one image): its source pixel index y*W + x (-1 for a padding token) and label.
struct TokenInfo {
  int pix;    // y * W + x, or -1 for a padding token
  int label;  // shift region label (0..8)
};

ESVIT_HD TokenInfo map_token(const MapGeom& g, int win, int n) {
  const int wr = win / g.nWw, wc = win - wr * g.nWw;
  const int r = n / g.Ww, c = n - r * g.Ww;
  const int ys = wr * g.Wh + r, xs = wc * g.Ww + c;
  TokenInfo t;
  int y = 0, x = 0;
  t.pix = map_source(g, ys, xs, y, x) ? y * g.W + x : -1;
  t.label = region_label(g, ys, xs);
  return t;
}

// Relative-position bias: the table has (2Wh-1)(2Ww-1) rows; the pair (query i, key j), token
// n -> (r, c) = (n / Ww, n % Ww), uses row (r_i - r_j + Wh - 1) * (2Ww - 1) + (c_i - c_j + Ww - 1).
// It splits as rel_query_base(i) - rel_key_offset(j), so kernels keep one int per token.
ESVIT_HD int rel_table_size(int Wh, int Ww) { return (2 * Wh - 1) * (2 * Ww - 1); }

ESVIT_HD int rel_key_offset(int j, int Ww) {
  const int r = j / Ww, c = j - r * Ww;
  return r * (2 * Ww - 1) + c;
}

ESVIT_HD int rel_query_base(int i, int Wh, int Ww) {
  const int r = i / Ww, c = i - r * Ww;
  return (r + Wh - 1) * (2 * Ww - 1) + (c + Ww - 1);
}

ESVIT_HD int rel_index(int i, int j, int Wh, int Ww) {
  return rel_query_base(i, Wh, Ww) - rel_key_offset(j, Ww);
}

// The pairs of one (BQ x BK) tile that use bias-table row t, for the deterministic bias gradient: one
// owner thread per table row sums dS over exactly these pairs, in a fixed order. Row t means
// (r_i - r_j, c_i - c_j) = (dr, dc), i.e. i = j + dr*Ww + dc with c_j + dc inside [0, Ww); for a tile
// that is the contiguous key range computed below, each key checked for the column condition.
struct RelDelta {
  int delta;  // i - j
  int dc;     // c_i - c_j
};

ESVIT_HD RelDelta rel_delta(int t, int Wh, int Ww) {
  const int dr = t / (2 * Ww - 1) - (Wh - 1);
  const int dc = t % (2 * Ww - 1) - (Ww - 1);
  RelDelta d;
  d.delta = dr * Ww + dc;
  d.dc = dc;
  return d;
}

// Calls f(i, j) for every query i in [q0, q0+BQ) and key j in [k0, k0+BK), both < N, with
// rel_index(i, j) == t, keys in increasing order.
template <class F>
ESVIT_HD void for_each_pair_of_row(int t, int q0, int BQ, int k0, int BK, int N, int Wh, int Ww, F&& f) {
  const RelDelta d = rel_delta(t, Wh, Ww);
  int lo = k0 > q0 - d.delta ? k0 : q0 - d.delta;
  int hi = k0 + BK < q0 + BQ - d.delta ? k0 + BK : q0 + BQ - d.delta;  // exclusive
  if (hi > N) hi = N;
  if (hi > N - d.delta) hi = N - d.delta;
  if (lo < 0) lo = 0;
  if (lo < -d.delta) lo = -d.delta;
  for (int j = lo; j < hi; ++j) {
    const int cj = j % Ww + d.dc;
    if (cj >= 0 && cj < Ww) f(j + d.delta, j);
  }
}

}  // namespace esvit
