// CPU check of csrc/window_index.h (g++ only, no CUDA): driven by tests/test_cuda_build.py.
//
//   index_check tables H W Wh Ww sh sw roll_before_pad tile
//       prints the token table of every window ("tok win n pix label"), the relative index
//       ("rel i j t") and the bias-gradient pair enumeration of every (tile x tile) block
//       ("pair qb kb t i j"), for the test to compare with the eager reference.
//   index_check map IN OUT tile / index_check win IN OUT tile
//       a double-precision emulation of the window-attention kernels' math (forward, lse, backward,
//       bias gradient through the tile-owner enumeration, pad-vector gradient) that addresses its
//       inputs only through window_index.h; IN/OUT are raw little-endian float64 files (layout below).
//   index_check lse IN OUT
//       replays the region-loss forward / backward of one row with online_lse.h exactly as the kernel
//       splits it (256 threads x 8-element vectors, xor-shuffle merges per warp, then the 8 warps in order).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../online_lse.h"
#include "../window_index.h"

using esvit::MapGeom;
using Vec = std::vector<double>;

namespace {

int tables(int argc, char** argv) {
  if (argc != 10) return 2;
  const int H = atoi(argv[2]), W = atoi(argv[3]), Wh = atoi(argv[4]), Ww = atoi(argv[5]);
  const int sh = atoi(argv[6]), sw = atoi(argv[7]), rbp = atoi(argv[8]), tile = atoi(argv[9]);
  const MapGeom g = esvit::make_map_geom(H, W, Wh, Ww, sh, sw, rbp != 0);
  const int N = Wh * Ww, T = esvit::rel_table_size(Wh, Ww);
  for (int win = 0; win < g.nWh * g.nWw; ++win)
    for (int n = 0; n < N; ++n) {
      const esvit::TokenInfo ti = esvit::map_token(g, win, n);
      printf("tok %d %d %d %d\n", win, n, ti.pix, ti.label);
    }
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) printf("rel %d %d %d\n", i, j, esvit::rel_index(i, j, Wh, Ww));
  const int nb = esvit::ceil_div(N, tile);
  for (int qb = 0; qb < nb; ++qb)
    for (int kb = 0; kb < nb; ++kb)
      for (int t = 0; t < T; ++t)
        esvit::for_each_pair_of_row(t, qb * tile, tile, kb * tile, tile, N, Wh, Ww,
                                    [&](int i, int j) { printf("pair %d %d %d %d %d\n", qb, kb, t, i, j); });
  return 0;
}

struct Reader {
  FILE* f;
  double scalar() {
    double v;
    if (fread(&v, sizeof v, 1, f) != 1) { fprintf(stderr, "short input\n"); exit(3); }
    return v;
  }
  Vec array(size_t n) {
    Vec v(n);
    if (n && fread(v.data(), sizeof(double), n, f) != n) { fprintf(stderr, "short input\n"); exit(3); }
    return v;
  }
};

// Attention of one (window, head) given its tokens' q, k, v (N x hd), additive logit term add(i, j)
// (bias + mask), and dO; returns out, lse and dq, dk, dv, dS (the kernels' formulas, base 2 with
// online_lse.h's softmax-row rules, so a query whose logits are all -inf gets output 0 and lse +inf:
// out_i = sum_j weight(x_ij, m_i) v_j * out_scale(l_i), P = 2^(x - lse2) in the backward, D_i = dO_i . O_i,
// dS = P * (dP - D), dq = scale * dS K, dk = scale * dS^T Q, dv = P^T dO).
struct Item {
  int N, hd;
  Vec q, k, v, dout, out, lse, dq, dk, dv, ds;
};

template <class Add>
void attend(Item& it, double scale, Add add) {
  const double log2e = 1.4426950408889634, ln2 = 0.6931471805599453;
  const int N = it.N, hd = it.hd;
  it.out.assign(N * hd, 0); it.lse.assign(N, 0); it.dq.assign(N * hd, 0); it.dk.assign(N * hd, 0);
  it.dv.assign(N * hd, 0); it.ds.assign(N * N, 0);
  Vec x(N * N), p(N * N);
  for (int i = 0; i < N; ++i) {
    double m = -INFINITY;
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int d = 0; d < hd; ++d) s += it.q[i * hd + d] * it.k[j * hd + d];
      x[i * N + j] = (s * scale + add(i, j)) * log2e;
      m = std::fmax(m, x[i * N + j]);
    }
    double l = 0;
    for (int j = 0; j < N; ++j) l += esvit::softmax_weight(x[i * N + j], m);
    const double lse2 = esvit::softmax_lse2(m, l), out_scale = esvit::softmax_out_scale(l);
    it.lse[i] = lse2 * ln2;
    for (int j = 0; j < N; ++j) {
      const double w = esvit::softmax_weight(x[i * N + j], m) * out_scale;
      for (int d = 0; d < hd; ++d) it.out[i * hd + d] += w * it.v[j * hd + d];
      p[i * N + j] = esvit::exp2_of(x[i * N + j] - lse2);  // what the backward kernel recomputes
    }
  }
  for (int i = 0; i < N; ++i) {
    double D = 0;
    for (int d = 0; d < hd; ++d) D += it.dout[i * hd + d] * it.out[i * hd + d];
    for (int j = 0; j < N; ++j) {
      double dp = 0;
      for (int d = 0; d < hd; ++d) dp += it.dout[i * hd + d] * it.v[j * hd + d];
      const double ds = p[i * N + j] * (dp - D);
      it.ds[i * N + j] = ds;
      for (int d = 0; d < hd; ++d) {
        it.dq[i * hd + d] += scale * ds * it.k[j * hd + d];
        it.dk[j * hd + d] += scale * ds * it.q[i * hd + d];
        it.dv[j * hd + d] += p[i * N + j] * it.dout[i * hd + d];
      }
    }
  }
}

// dbias row t of one item, summed like the kernel: tile by tile, each row's pairs from the enumeration.
void add_dbias(const Item& it, int Wh, int Ww, int tile, double* dbias_col, int heads) {
  const int N = it.N, T = esvit::rel_table_size(Wh, Ww), nb = esvit::ceil_div(N, tile);
  for (int kb = 0; kb < nb; ++kb)
    for (int qb = 0; qb < nb; ++qb)
      for (int t = 0; t < T; ++t)
        esvit::for_each_pair_of_row(t, qb * tile, tile, kb * tile, tile, N, Wh, Ww,
                                    [&](int i, int j) { dbias_col[t * heads] += it.ds[i * N + j]; });
}

void write(FILE* f, const Vec& v) { fwrite(v.data(), sizeof(double), v.size(), f); }

// IN: B H W C3 heads Wh Ww sh sw rbp has_bias has_pad scale, qkv (B,H,W,3C), bias (T,heads) if has_bias,
// pad (3C) if has_pad, dout (B,H,W,C). OUT: out (B,H,W,C), lse (B*nW,heads,N), dqkv, dbias (T,heads),
// dpad (3C).
int emulate_map(Reader& in, FILE* out, int tile) {
  const int B = (int)in.scalar(), H = (int)in.scalar(), W = (int)in.scalar(), C3 = (int)in.scalar();
  const int heads = (int)in.scalar(), Wh = (int)in.scalar(), Ww = (int)in.scalar();
  const int sh = (int)in.scalar(), sw = (int)in.scalar(), rbp = (int)in.scalar();
  const int has_bias = (int)in.scalar(), has_pad = (int)in.scalar();
  const double scale = in.scalar();
  const int C = C3 / 3, hd = C / heads, N = Wh * Ww, T = esvit::rel_table_size(Wh, Ww);
  const MapGeom g = esvit::make_map_geom(H, W, Wh, Ww, sh, sw, rbp != 0);
  const int nW = g.nWh * g.nWw;
  const Vec qkv = in.array((size_t)B * H * W * C3);
  const Vec bias = has_bias ? in.array((size_t)T * heads) : Vec((size_t)T * heads, 0.0);
  const Vec pad = has_pad ? in.array(C3) : Vec(C3, 0.0);
  const Vec dout = in.array((size_t)B * H * W * C);
  Vec o((size_t)B * H * W * C, NAN), lse((size_t)B * nW * heads * N), dqkv(qkv.size(), NAN);
  Vec dbias((size_t)T * heads, 0.0), dpad(C3, 0.0);
  for (int b = 0; b < B; ++b)
    for (int win = 0; win < nW; ++win)
      for (int h = 0; h < heads; ++h) {
        std::vector<esvit::TokenInfo> tok(N);
        for (int n = 0; n < N; ++n) tok[n] = esvit::map_token(g, win, n);
        Item it{N, hd, Vec(N * hd), Vec(N * hd), Vec(N * hd), Vec(N * hd, 0.0), {}, {}, {}, {}, {}, {}};
        for (int n = 0; n < N; ++n)
          for (int d = 0; d < hd; ++d) {
            const int ch = h * hd + d;
            const size_t row = ((size_t)b * H * W + tok[n].pix) * C3;
            it.q[n * hd + d] = tok[n].pix >= 0 ? qkv[row + ch] : pad[ch];
            it.k[n * hd + d] = tok[n].pix >= 0 ? qkv[row + C + ch] : pad[C + ch];
            it.v[n * hd + d] = tok[n].pix >= 0 ? qkv[row + 2 * C + ch] : pad[2 * C + ch];
            if (tok[n].pix >= 0) it.dout[n * hd + d] = dout[((size_t)b * H * W + tok[n].pix) * C + ch];
          }
        attend(it, scale, [&](int i, int j) {
          const double bv = bias[(size_t)(esvit::rel_query_base(i, Wh, Ww) - esvit::rel_key_offset(j, Ww)) * heads + h];
          return bv + (tok[i].label != tok[j].label ? -100.0 : 0.0);
        });
        for (int n = 0; n < N; ++n) {
          lse[(((size_t)b * nW + win) * heads + h) * N + n] = it.lse[n];
          for (int d = 0; d < hd; ++d) {
            const int ch = h * hd + d;
            if (tok[n].pix >= 0) {
              const size_t pix = (size_t)b * H * W + tok[n].pix;
              o[pix * C + ch] = it.out[n * hd + d];
              dqkv[pix * C3 + ch] = it.dq[n * hd + d];
              dqkv[pix * C3 + C + ch] = it.dk[n * hd + d];
              dqkv[pix * C3 + 2 * C + ch] = it.dv[n * hd + d];
            } else {
              dpad[ch] += it.dq[n * hd + d];
              dpad[C + ch] += it.dk[n * hd + d];
              dpad[2 * C + ch] += it.dv[n * hd + d];
            }
          }
        }
        add_dbias(it, Wh, Ww, tile, &dbias[h], heads);
      }
  write(out, o); write(out, lse); write(out, dqkv); write(out, dbias); write(out, dpad);
  return 0;
}

// IN: BW heads N hd Wh Ww nW_mask has_bias scale, q, k, v (BW,heads,N,hd), bias (T,heads) if has_bias,
// mask (nW_mask,N,N) if nW_mask > 0, dout. OUT: out, lse (BW,heads,N), dq, dk, dv, dbias.
int emulate_win(Reader& in, FILE* out, int tile) {
  const int BW = (int)in.scalar(), heads = (int)in.scalar(), N = (int)in.scalar(), hd = (int)in.scalar();
  const int Wh = (int)in.scalar(), Ww = (int)in.scalar(), nWm = (int)in.scalar();
  const int has_bias = (int)in.scalar();
  const double scale = in.scalar();
  const int T = esvit::rel_table_size(Wh, Ww);
  const size_t sz = (size_t)BW * heads * N * hd;
  const Vec q = in.array(sz), k = in.array(sz), v = in.array(sz);
  const Vec bias = has_bias ? in.array((size_t)T * heads) : Vec((size_t)T * heads, 0.0);
  const Vec mask = nWm > 0 ? in.array((size_t)nWm * N * N) : Vec();
  const Vec dout = in.array(sz);
  Vec o(sz), lse((size_t)BW * heads * N), dq(sz), dk(sz), dv(sz), dbias((size_t)T * heads, 0.0);
  for (int w = 0; w < BW; ++w)
    for (int h = 0; h < heads; ++h) {
      const size_t base = ((size_t)w * heads + h) * N * hd;
      Item it{N, hd, Vec(q.begin() + base, q.begin() + base + N * hd), Vec(k.begin() + base, k.begin() + base + N * hd),
              Vec(v.begin() + base, v.begin() + base + N * hd), Vec(dout.begin() + base, dout.begin() + base + N * hd),
              {}, {}, {}, {}, {}, {}};
      attend(it, scale, [&](int i, int j) {
        double a = bias[(size_t)esvit::rel_index(i, j, Wh, Ww) * heads + h];
        if (nWm > 0) a += mask[((size_t)(w % nWm) * N + i) * N + j];
        return a;
      });
      std::copy(it.out.begin(), it.out.end(), o.begin() + base);
      std::copy(it.dq.begin(), it.dq.end(), dq.begin() + base);
      std::copy(it.dk.begin(), it.dk.end(), dk.begin() + base);
      std::copy(it.dv.begin(), it.dv.end(), dv.begin() + base);
      std::copy(it.lse.begin(), it.lse.end(), lse.begin() + ((size_t)w * heads + h) * N);
      add_dbias(it, Wh, Ww, tile, &dbias[h], heads);
    }
  write(out, o); write(out, lse); write(out, dq); write(out, dk); write(out, dv); write(out, dbias);
  return 0;
}

// IN: K student_temp teacher_temp, s (K), t (K), c (K). OUT: lse2(x), lse2(u), CE, dCE/ds (K) in float32
// arithmetic, the kernel's formulas (CE = ln2 (lse2(x) - acc / l), grad = (2^(x - lse2 x) - 2^(u - lse2 u)) / ts).
int replay_region_loss(Reader& in, FILE* out) {
  constexpr int kThreads = 256, kVec = 8;
  const int K = (int)in.scalar();
  const float ts = (float)in.scalar(), tt = (float)in.scalar();
  const Vec s = in.array(K), t = in.array(K), c = in.array(K);
  const float log2e = 1.4426950408889634f, xs_scale = log2e / ts, u_scale = log2e / tt;
  std::vector<esvit::Lse> ls(kThreads, esvit::lse_empty()), lt(kThreads, esvit::lse_empty());
  std::vector<float> acc(kThreads, 0.f), unused(kThreads, 0.f);
  for (int tid = 0; tid < kThreads; ++tid)
    for (int k0 = tid * kVec; k0 < K; k0 += kThreads * kVec)
      for (int q = 0; q < kVec && k0 + q < K; ++q) {
        const float x = (float)s[k0 + q] * xs_scale;
        esvit::lse_push(ls[tid], x);
        esvit::lse_push(lt[tid], acc[tid], ((float)t[k0 + q] - (float)c[k0 + q]) * u_scale, x);
      }
  for (int o = 16; o > 0; o >>= 1) {  // every lane merges its xor partner's state of the previous round
    const auto ls0 = ls, lt0 = lt;
    const auto acc0 = acc;
    for (int tid = 0; tid < kThreads; ++tid) {
      const int p = tid ^ o;
      esvit::lse_merge(ls[tid], unused[tid], ls0[p], 0.f);
      esvit::lse_merge(lt[tid], acc[tid], lt0[p], acc0[p]);
    }
  }
  for (int w = 1; w < kThreads / 32; ++w) {
    esvit::lse_merge(ls[0], unused[0], ls[32 * w], 0.f);
    esvit::lse_merge(lt[0], acc[0], lt[32 * w], acc[32 * w]);
  }
  const float lse_x = ls[0].m + log2f(ls[0].l), lse_u = lt[0].m + log2f(lt[0].l);
  Vec res{lse_x, lse_u, 0.6931471805599453f * (lse_x - acc[0] / lt[0].l)};
  for (int k = 0; k < K; ++k)
    res.push_back((exp2f((float)s[k] * xs_scale - lse_x) - exp2f(((float)t[k] - (float)c[k]) * u_scale - lse_u)) / ts);
  write(out, res);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && !strcmp(argv[1], "tables")) return tables(argc, argv);
  if (argc == 4 && !strcmp(argv[1], "lse")) {
    Reader in{fopen(argv[2], "rb")};
    FILE* out = fopen(argv[3], "wb");
    if (!in.f || !out) { perror("open"); return 3; }
    const int rc = replay_region_loss(in, out);
    fclose(out);
    return rc;
  }
  if (argc == 5 && (!strcmp(argv[1], "map") || !strcmp(argv[1], "win"))) {
    Reader in{fopen(argv[2], "rb")};
    FILE* out = fopen(argv[3], "wb");
    if (!in.f || !out) { perror("open"); return 3; }
    const int rc = !strcmp(argv[1], "map") ? emulate_map(in, out, atoi(argv[4])) : emulate_win(in, out, atoi(argv[4]));
    fclose(out);
    return rc;
  }
  fprintf(stderr, "usage: index_check tables H W Wh Ww sh sw roll_before_pad tile | map|win IN OUT tile | lse IN OUT\n");
  return 2;
}
