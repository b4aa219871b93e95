// esvit_kernels._C: the esvit_cuda::* operators (schemas, input checks, CUDA implementations).
//
// The schemas are the contract of esvit_kernels/ops/window_attention.py (window ops) and
// esvit_kernels/ops/cuda_losses.py (region ops), which register the fake (meta) implementations and the
// autograd formulas in Python; set_python_module tells torch where those live.
//
// Headers are kept light for compile time: no torch/extension.h (pybind11 + the whole C++ API) and no
// ATen/cuda/CUDAContext.h (it needs the cuBLAS / cuSPARSE headers; this builds with nvcc + cudart only).
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace esvit {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void require_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (esvit_cuda ops run on CUDA devices only), got ",
              t.device());
}

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  require_cuda(t, name);
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the inputs are on ", like.device());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row the kernels touch starts 16-byte aligned and hd is a multiple of the vector width.
bool vec_ok(int hd, int64_t elem, std::initializer_list<const Tensor*> tensors) {
  if ((hd * elem) % 16) return false;
  for (const Tensor* t : tensors) {
    if (!t || !t->defined() || t->numel() == 0) continue;
    if (!aligned16(t->data_ptr())) return false;
    for (int d = 0; d + 1 < t->dim(); ++d)
      if ((t->stride(d) * elem) % 16) return false;
  }
  return true;
}

void check_window(int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  TORCH_CHECK(wh >= 1 && ww >= 1, "window must be >= 1, got (", wh, ", ", ww, ")");
  TORCH_CHECK(wh * ww <= 1024, "the CUDA window-attention kernels support up to 1024 tokens per window, got ",
              wh, " x ", ww);
  TORCH_CHECK(0 <= sh && sh < wh && 0 <= sw && sw < ww, "shift must satisfy 0 <= shift < window, got shift (", sh,
              ", ", sw, ") for window (", wh, ", ", ww, ")");
}

// bias_table: ((2Wh-1)(2Ww-1), heads), any float dtype -> float32 contiguous (the kernels read fp32).
Tensor prep_bias(const OptTensor& bias, int64_t wh, int64_t ww, int64_t heads, const Tensor& like) {
  if (!bias.has_value()) return Tensor();
  const Tensor& b = *bias;
  check_cuda(b, "bias_table", like);
  dtype_of(b, "bias_table");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == (2 * wh - 1) * (2 * ww - 1) && b.size(1) == heads,
              "bias_table must have shape ((2Wh-1)(2Ww-1), heads) = (", (2 * wh - 1) * (2 * ww - 1), ", ", heads,
              "), got ", b.sizes());
  return b.to(at::kFloat).contiguous();
}

void check_head_dim(int64_t hd) {
  TORCH_CHECK(hd >= 1 && hd <= 128, "the CUDA window-attention kernels support head_dim 1..128, got ", hd);
}

void check_smem(int64_t bytes, const char* what) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= optin, what, " needs ", bytes, " bytes of shared memory per block for this window / head "
              "dim, more than this device's ", optin, "; use the triton backend for this shape");
}

void* stream_ptr() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

// The bias-table / pad-vector gradient: sums over all windows, so zeros when there are none (B = 0: the
// kernels do not run); otherwise the kernels write every entry.
Tensor grad_sum_buffer(at::IntArrayRef sizes, int bw, const at::TensorOptions& options) {
  return bw == 0 ? at::zeros(sizes, options) : at::empty(sizes, options);
}

// Common map-layout arguments of swa_fwd / swa_bwd.
WinArgs map_args(const Tensor& qkv, const Tensor& bias32, const Tensor& pad, int64_t heads, int64_t wh, int64_t ww,
                 int64_t sh, int64_t sw, double scale, bool roll_before_pad) {
  TORCH_CHECK(qkv.dim() == 4, "qkv must be (B, H, W, 3C), got ", qkv.sizes());
  TORCH_CHECK(heads >= 1 && heads <= 65535, "num_heads must be in [1, 65535], got ", heads);
  TORCH_CHECK(qkv.size(3) % (3 * heads) == 0, "qkv's last dim (", qkv.size(3), ") must be 3 * num_heads * head_dim");
  check_window(wh, ww, sh, sw);
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C = qkv.size(3) / 3;
  check_head_dim(C / heads);
  TORCH_CHECK(B * H * W * 3 * C < (int64_t(1) << 62) && H * W < (int64_t(1) << 31), "qkv is too large");
  WinArgs a{};
  a.map = true;
  a.geom = make_map_geom((int)H, (int)W, (int)wh, (int)ww, (int)sh, (int)sw, roll_before_pad);
  a.nW = a.geom.nWh * a.geom.nWw;
  TORCH_CHECK(B * a.nW * heads < (int64_t(1) << 31), "too many (window, head) pairs");
  a.bw = (int)(B * a.nW);
  a.heads = (int)heads;
  a.hd = (int)(C / heads);
  a.C = (int)C;
  a.Wh = (int)wh;
  a.Ww = (int)ww;
  a.N = (int)(wh * ww);
  a.T = rel_table_size(a.Wh, a.Ww);
  a.scale = (float)scale;
  a.dtype = dtype_of(qkv, "qkv");
  a.qkv = qkv.data_ptr();
  a.pad = pad.defined() ? pad.data_ptr() : nullptr;
  a.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  return a;
}

Tensor prep_pad(const OptTensor& pad, const Tensor& qkv) {
  if (!pad.has_value()) return Tensor();
  check_cuda(*pad, "pad_qkv", qkv);
  TORCH_CHECK(pad->dim() == 1 && pad->size(0) == qkv.size(3), "pad_qkv must have shape (", qkv.size(3), ",), got ",
              pad->sizes());
  dtype_of(*pad, "pad_qkv");
  return pad->to(qkv.scalar_type()).contiguous();
}

std::tuple<Tensor, Tensor> swa_fwd(const Tensor& qkv_in, const OptTensor& bias_table, const OptTensor& pad_qkv,
                                   int64_t num_heads, int64_t window_h, int64_t window_w, int64_t shift_h,
                                   int64_t shift_w, double scale, bool roll_before_pad) {
  require_cuda(qkv_in, "qkv");
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const Tensor qkv = qkv_in.contiguous();
  const Tensor bias32 = prep_bias(bias_table, window_h, window_w, num_heads, qkv);
  const Tensor pad = prep_pad(pad_qkv, qkv);
  WinArgs a = map_args(qkv, bias32, pad, num_heads, window_h, window_w, shift_h, shift_w, scale, roll_before_pad);
  Tensor out = at::empty({qkv.size(0), qkv.size(1), qkv.size(2), a.C}, qkv.options());
  Tensor lse = at::empty({a.bw, a.heads, a.N}, qkv.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.vec = vec_ok(a.hd, qkv.element_size(), {&qkv, &pad, &out});
  check_smem(window_attention_fwd_smem(a), "swa_fwd");
  launch_window_attention_fwd(a, stream_ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> swa_bwd(const Tensor& dout_in, const Tensor& qkv_in, const Tensor& out_in,
                                           const Tensor& lse_in, const OptTensor& bias_table,
                                           const OptTensor& pad_qkv, int64_t num_heads, int64_t window_h,
                                           int64_t window_w, int64_t shift_h, int64_t shift_w, double scale,
                                           bool roll_before_pad, bool need_dbias, bool need_dpad) {
  require_cuda(qkv_in, "qkv");
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const Tensor qkv = qkv_in.contiguous();
  check_cuda(dout_in, "dout", qkv);
  check_cuda(out_in, "out", qkv);
  check_cuda(lse_in, "lse", qkv);
  const Tensor dout = dout_in.to(qkv.scalar_type()).contiguous();
  const Tensor out = out_in.to(qkv.scalar_type()).contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const Tensor bias32 = prep_bias(bias_table, window_h, window_w, num_heads, qkv);
  const Tensor pad = prep_pad(pad_qkv, qkv);
  WinArgs a = map_args(qkv, bias32, pad, num_heads, window_h, window_w, shift_h, shift_w, scale, roll_before_pad);
  const std::vector<int64_t> out_shape{qkv.size(0), qkv.size(1), qkv.size(2), a.C};
  TORCH_CHECK(dout.sizes() == out_shape && out.sizes() == out_shape, "dout and out must be (B, H, W, C) = ",
              out_shape, ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.numel() == (int64_t)a.bw * a.heads * a.N, "lse must be (B*nW, heads, N) = (", a.bw, ", ", a.heads,
              ", ", a.N, "), got ", lse.sizes());
  const bool want_dbias = need_dbias && bias32.defined();
  Tensor dqkv = at::empty_like(qkv);
  const Tensor none = at::empty({0}, lse.options());
  Tensor dbias = want_dbias ? grad_sum_buffer(bias32.sizes(), a.bw, bias32.options()) : none;
  Tensor dpad = need_dpad ? grad_sum_buffer({qkv.size(3)}, a.bw, lse.options()) : none;
  a.out_c = out.data_ptr();
  a.dout = dout.data_ptr();
  a.dqkv = dqkv.data_ptr();
  a.lse = const_cast<float*>(lse.data_ptr<float>());
  a.vec = vec_ok(a.hd, qkv.element_size(), {&qkv, &pad, &out, &dout, &dqkv});
  check_smem(window_attention_bwd_smem(a), "swa_bwd");
  Tensor work = at::empty({window_attention_bwd_workspace(a, want_dbias, need_dpad)}, lse.options());
  launch_window_attention_bwd(a, want_dbias, need_dpad, want_dbias ? dbias.data_ptr<float>() : nullptr,
                              need_dpad ? dpad.data_ptr<float>() : nullptr, work.data_ptr<float>(), stream_ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dqkv, dbias, dpad};
}

Tensor unit_last_stride(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void set_strides(int64_t* dst, const Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

// (B*nW, heads, N, hd) laid out as empty(B*nW, N, heads, hd).transpose(1, 2).
Tensor windows_layout(const Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// Common windows-layout arguments of wa_fwd / wa_bwd (q, k, v and mask already unit-last-stride).
WinArgs win_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias32, const Tensor& mask,
                 int64_t wh, int64_t ww, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must be (B*nW, heads, N, head_dim), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must have one shape, got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must have one dtype");
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  check_window(wh, ww, 0, 0);
  TORCH_CHECK(q.size(2) == wh * ww, "q has N=", q.size(2), " tokens per window but window (", wh, ", ", ww, ") has ",
              wh * ww);
  TORCH_CHECK(q.size(1) >= 1 && q.size(1) <= 65535, "heads must be in [1, 65535], got ", q.size(1));
  check_head_dim(q.size(3));
  TORCH_CHECK(q.size(0) * q.size(1) < (int64_t(1) << 31), "too many (window, head) pairs");
  WinArgs a{};
  a.map = false;
  a.bw = (int)q.size(0);
  a.heads = (int)q.size(1);
  a.hd = (int)q.size(3);
  a.C = a.heads * a.hd;
  a.nW = 1;
  a.Wh = (int)wh;
  a.Ww = (int)ww;
  a.N = (int)q.size(2);
  a.T = rel_table_size(a.Wh, a.Ww);
  a.scale = (float)scale;
  a.dtype = dtype_of(q, "q");
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  set_strides(a.sq, q);
  set_strides(a.sk, k);
  set_strides(a.sv, v);
  a.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  if (mask.defined()) {
    check_cuda(mask, "mask", q);
    TORCH_CHECK(mask.dim() == 3 && mask.size(1) == a.N && mask.size(2) == a.N && mask.size(0) >= 1 &&
                    a.bw % mask.size(0) == 0,
                "mask must have shape (nW, ", a.N, ", ", a.N, ") with nW dividing B*nW=", a.bw, ", got ",
                mask.sizes());
    a.mask = mask.data_ptr();
    a.mask_dtype = (int)dtype_of(mask, "mask");
    a.mask_nw = (int)mask.size(0);
    a.smask[0] = mask.stride(0);
    a.smask[1] = mask.stride(1);
  }
  return a;
}

Tensor prep_mask(const OptTensor& mask) { return mask.has_value() ? unit_last_stride(*mask) : Tensor(); }

std::tuple<Tensor, Tensor> wa_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                  const OptTensor& bias_table, const OptTensor& mask_in, int64_t window_h,
                                  int64_t window_w, double scale) {
  require_cuda(q_in, "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Tensor mask = prep_mask(mask_in);
  TORCH_CHECK(q.dim() == 4, "q must be (B*nW, heads, N, head_dim), got ", q.sizes());
  const Tensor bias32 = prep_bias(bias_table, window_h, window_w, q.size(1), q);
  WinArgs a = win_args(q, k, v, bias32, mask, window_h, window_w, scale);
  Tensor out = windows_layout(q);
  Tensor lse = at::empty({a.bw, a.heads, a.N}, q.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  set_strides(a.so, out);
  a.lse = lse.data_ptr<float>();
  a.vec = vec_ok(a.hd, q.element_size(), {&q, &k, &v, &out});
  check_smem(window_attention_fwd_smem(a), "wa_fwd");
  launch_window_attention_fwd(a, stream_ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> wa_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                  const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                  const OptTensor& bias_table, const OptTensor& mask_in,
                                                  int64_t window_h, int64_t window_w, double scale,
                                                  bool need_dbias) {
  require_cuda(q_in, "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  check_cuda(dout_in, "dout", q);
  check_cuda(out_in, "out", q);
  check_cuda(lse_in, "lse", q);
  const Tensor dout = unit_last_stride(dout_in.to(q.scalar_type()));
  const Tensor out = unit_last_stride(out_in.to(q.scalar_type()));
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const Tensor mask = prep_mask(mask_in);
  TORCH_CHECK(q.dim() == 4, "q must be (B*nW, heads, N, head_dim), got ", q.sizes());
  const Tensor bias32 = prep_bias(bias_table, window_h, window_w, q.size(1), q);
  WinArgs a = win_args(q, k, v, bias32, mask, window_h, window_w, scale);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape ", q.sizes(),
              ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.numel() == (int64_t)a.bw * a.heads * a.N, "lse must be (B*nW, heads, N), got ", lse.sizes());
  const bool want_dbias = need_dbias && bias32.defined();
  Tensor dq = windows_layout(q), dk = windows_layout(q), dv = windows_layout(q);
  Tensor dbias = want_dbias ? grad_sum_buffer(bias32.sizes(), a.bw, bias32.options())
                            : at::empty({0}, lse.options());
  a.out_c = out.data_ptr();
  set_strides(a.soc, out);
  a.dout = dout.data_ptr();
  set_strides(a.sdo, dout);
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  set_strides(a.so, dq);
  a.lse = const_cast<float*>(lse.data_ptr<float>());
  a.vec = vec_ok(a.hd, q.element_size(), {&q, &k, &v, &out, &dout, &dq, &dk, &dv});
  check_smem(window_attention_bwd_smem(a), "wa_bwd");
  Tensor work = at::empty({window_attention_bwd_workspace(a, want_dbias, false)}, lse.options());
  launch_window_attention_bwd(a, want_dbias, false, want_dbias ? dbias.data_ptr<float>() : nullptr, nullptr,
                              work.data_ptr<float>(), stream_ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, dbias};
}

Tensor region_match(const Tensor& student_in, const Tensor& teacher_in) {
  require_cuda(student_in, "student");
  check_cuda(teacher_in, "teacher", student_in);
  const c10::cuda::CUDAGuard guard(student_in.device());
  TORCH_CHECK(student_in.dim() == 3 && teacher_in.dim() == 3, "student (B, Ts, D) and teacher (B, Tt, D) must be 3-D, "
              "got ", student_in.sizes(), " and ", teacher_in.sizes());
  TORCH_CHECK(student_in.size(0) == teacher_in.size(0) && student_in.size(2) == teacher_in.size(2),
              "student (B, Ts, D) and teacher (B, Tt, D) must agree on B and D, got ", student_in.sizes(), " and ",
              teacher_in.sizes());
  TORCH_CHECK(teacher_in.size(1) >= 1 || student_in.size(1) == 0, "teacher must have at least one token");
  dtype_of(student_in, "student");
  dtype_of(teacher_in, "teacher");
  // Mixed dtypes compare in float32 (as the reference does); one dtype is read as is.
  const bool same = student_in.scalar_type() == teacher_in.scalar_type();
  const Tensor s = (same ? student_in : student_in.to(at::kFloat)).contiguous();
  const Tensor t = (same ? teacher_in : teacher_in.to(at::kFloat)).contiguous();
  TORCH_CHECK(s.size(0) < (int64_t(1) << 31) / 64 && s.size(1) < (int64_t(1) << 31) &&
                  t.size(1) < (int64_t(1) << 31) && s.size(2) < (int64_t(1) << 31),
              "region_match input too large");
  Tensor out = at::empty({s.size(0), s.size(1)}, s.options().dtype(at::kLong));
  launch_region_match(s.data_ptr(), t.data_ptr(), out.data_ptr<int64_t>(), (int)s.size(0), (int)s.size(1),
                      (int)t.size(1), (int)s.size(2), dtype_of(s, "student"), stream_ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Region loss: the inputs the kernels read, checked and made contiguous (center -> float32 (K,), match ->
// int64). Student and teacher must share a dtype (the Python wrapper upcasts mixed pairs to float32).
RegionLossArgs region_loss_args(const Tensor& student, const Tensor& teacher, const Tensor& match,
                                const Tensor& center, double student_temp, double teacher_temp) {
  require_cuda(student, "student_logits");
  check_cuda(teacher, "teacher_logits", student);
  check_cuda(match, "match_index", student);
  check_cuda(center, "center", student);
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, "student (B, Ts, K) and teacher (B, Tt, K) must be 3-D, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(teacher.size(0) == student.size(0) && teacher.size(2) == student.size(2),
              "teacher_logits must be (B, Tt, K) with the student's B and K, got ", teacher.sizes(), " for ",
              student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "student and teacher logits must have one dtype");
  TORCH_CHECK(match.dim() == 2 && match.size(0) == student.size(0) && match.size(1) == student.size(1),
              "match_index must be (B, Ts), got ", match.sizes());
  TORCH_CHECK(match.scalar_type() == at::kLong || match.scalar_type() == at::kInt, "match_index must be int64 or "
              "int32");
  TORCH_CHECK(center.numel() == student.size(2), "center must have K=", student.size(2), " elements, got ",
              center.sizes());
  TORCH_CHECK(student_temp > 0 && teacher_temp > 0, "temperatures must be > 0");
  TORCH_CHECK(student.size(2) < (int64_t(1) << 31) && teacher.size(1) < (int64_t(1) << 31) &&
                  student.size(0) * student.size(1) < (int64_t(1) << 31),
              "region_loss input too large");
  TORCH_CHECK(teacher.size(1) >= 1 || student.size(1) == 0, "teacher_logits must have at least one token");
  RegionLossArgs a{};
  a.dtype = dtype_of(student, "student_logits");
  a.rows = student.size(0) * student.size(1);
  a.Ts = (int)student.size(1);
  a.Tt = (int)teacher.size(1);
  a.K = (int)student.size(2);
  a.student_temp = (float)student_temp;
  a.teacher_temp = (float)teacher_temp;
  return a;
}

struct RegionLossInputs {
  Tensor student, teacher, match, center;
};

RegionLossInputs region_loss_inputs(const Tensor& student, const Tensor& teacher, const Tensor& match,
                                    const Tensor& center, RegionLossArgs& a) {
  RegionLossInputs in{student.contiguous(), teacher.contiguous(), match.to(at::kLong).contiguous(),
                      center.to(at::kFloat).reshape({-1}).contiguous()};
  a.student = in.student.data_ptr();
  a.teacher = in.teacher.data_ptr();
  a.match = in.match.data_ptr<int64_t>();
  a.center = in.center.data_ptr<float>();
  a.vec = (a.K * in.student.element_size()) % 16 == 0 && aligned16(a.student) && aligned16(a.teacher);
  return in;
}

std::tuple<Tensor, Tensor> region_loss_fwd(const Tensor& student, const Tensor& teacher, const Tensor& match,
                                           const Tensor& center, double student_temp, double teacher_temp) {
  RegionLossArgs a = region_loss_args(student, teacher, match, center, student_temp, teacher_temp);
  const c10::cuda::CUDAGuard guard(student.device());
  const RegionLossInputs in = region_loss_inputs(student, teacher, match, center, a);
  const auto f32 = student.options().dtype(at::kFloat);
  Tensor row_loss = at::empty({a.rows}, f32);
  Tensor stats = at::empty({a.rows, 2}, f32);
  launch_region_loss_fwd(a, row_loss.data_ptr<float>(), stats.data_ptr<float>(), stream_ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {at::mean(row_loss), stats};
}

Tensor region_loss_bwd(const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, const Tensor& match,
                       const Tensor& center, const Tensor& stats, double student_temp, double teacher_temp) {
  RegionLossArgs a = region_loss_args(student, teacher, match, center, student_temp, teacher_temp);
  const c10::cuda::CUDAGuard guard(student.device());
  check_cuda(grad_loss, "grad_loss", student);
  check_cuda(stats, "stats", student);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar");
  TORCH_CHECK(stats.numel() == 2 * a.rows, "stats must be (B*Ts, 2), got ", stats.sizes());
  const RegionLossInputs in = region_loss_inputs(student, teacher, match, center, a);
  const Tensor g = grad_loss.to(at::kFloat).contiguous();
  const Tensor st = stats.to(at::kFloat).contiguous();
  Tensor dstudent = at::empty_like(in.student);
  a.vec = a.vec && aligned16(dstudent.data_ptr());
  launch_region_loss_bwd(a, g.data_ptr<float>(), st.data_ptr<float>(), dstudent.data_ptr(), stream_ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dstudent;
}

}  // namespace
}  // namespace esvit

// Window-attention ops: fakes and autograd in esvit_kernels/ops/window_attention.py.
TORCH_LIBRARY(esvit_cuda, m) {
  m.set_python_module("esvit_kernels.ops.window_attention");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("swa_fwd(Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, int num_heads, int window_h, int window_w, "
        "int shift_h, int shift_w, float scale, bool roll_before_pad) -> (Tensor out, Tensor lse)",
        tags);
  m.def("swa_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor? bias_table, Tensor? pad_qkv, "
        "int num_heads, int window_h, int window_w, int shift_h, int shift_w, float scale, bool roll_before_pad, "
        "bool need_dbias, bool need_dpad) -> (Tensor dqkv, Tensor dbias, Tensor dpad)",
        tags);
  m.def("wa_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? mask, int window_h, int window_w, "
        "float scale) -> (Tensor out, Tensor lse)",
        tags);
  m.def("wa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias_table, "
        "Tensor? mask, int window_h, int window_w, float scale, bool need_dbias) -> "
        "(Tensor dq, Tensor dk, Tensor dv, Tensor dbias)",
        tags);
}

// Region ops: fakes and autograd in esvit_kernels/ops/cuda_losses.py.
TORCH_LIBRARY_FRAGMENT(esvit_cuda, m) {
  m.set_python_module("esvit_kernels.ops.cuda_losses");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("region_match(Tensor student, Tensor teacher) -> Tensor", tags);
  m.def("region_loss_fwd(Tensor student, Tensor teacher, Tensor match, Tensor center, float student_temp, "
        "float teacher_temp) -> (Tensor loss, Tensor stats)",
        tags);
  m.def("region_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor match, Tensor center, "
        "Tensor stats, float student_temp, float teacher_temp) -> Tensor",
        tags);
}

TORCH_LIBRARY_IMPL(esvit_cuda, CUDA, m) {
  m.impl("swa_fwd", &esvit::swa_fwd);
  m.impl("swa_bwd", &esvit::swa_bwd);
  m.impl("wa_fwd", &esvit::wa_fwd);
  m.impl("wa_bwd", &esvit::wa_bwd);
  m.impl("region_match", &esvit::region_match);
  m.impl("region_loss_fwd", &esvit::region_loss_fwd);
  m.impl("region_loss_bwd", &esvit::region_loss_bwd);
}

// The Python module only has to exist: importing it loads the library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                            "esvit-kernels CUDA kernels; the operators are torch.ops.esvit_cuda.*", -1, nullptr};
  return PyModule_Create(&def);
}
