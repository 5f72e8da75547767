// The one Python boundary of the native kernels (imported as expert_node._native).
// Every entry point checks dtype, shape, contiguity, writability and index ranges and raises
// ValueError naming the argument, then releases the GIL for the compute. No gRPC, no files here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "attention.h"
#include "formats.h"
#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace moemesh;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const py::array& a) {
    std::ostringstream s;
    s << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
    s << (a.ndim() == 1 ? ",)" : ")");
    return s.str();
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// Checks dtype, C-contiguity and (where given, -1 = any) the exact shape of an argument.
template <typename T>
const T* in_ptr(const py::array& a, const char* name, std::vector<py::ssize_t> shape) {
    if (!a.dtype().is(py::dtype::of<T>()))
        fail(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
             std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) fail(std::string(name) + ": must be C-contiguous");
    bool ok = a.ndim() == py::ssize_t(shape.size());
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(py::ssize_t(i)) == shape[i];
    if (!ok) {
        std::ostringstream s;
        s << name << ": expected shape (";
        for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
        s << "), got " << shape_str(a);
        fail(s.str());
    }
    return static_cast<const T*>(a.data());
}

// An input's pointer made writeable, for an argument the call writes into.
template <typename T>
T* writeable(const py::array& a, const char* name, const T* p) {
    if (!a.writeable()) fail(std::string(name) + ": must be writeable");
    return const_cast<T*>(p);
}

template <typename T>
T* out_ptr(py::array& a, const char* name, std::vector<py::ssize_t> shape) {
    return writeable(a, name, in_ptr<T>(a, name, shape));
}

// Refuses NaN and Inf, floats given as their bits (fp32 or bf16): those whose exponent bits are
// all ones. An integer OR over the array, which the compiler vectorises (a float test per element
// was 2.5% of a prefill), then the search for the first one's index only when there is one.
template <typename Bits>
void check_finite_bits(const Bits* bits, size_t n, Bits exponent, const char* name) {
    uint32_t non_finite = 0;
    for (size_t i = 0; i < n; ++i) non_finite |= uint32_t((bits[i] & exponent) == exponent);
    if (!non_finite) return;
    for (size_t i = 0; i < n; ++i)
        if ((bits[i] & exponent) == exponent)
            fail(std::string(name) + ": contains NaN or Inf at flat index " + std::to_string(i));
}

void check_finite(const float* x, size_t n, const char* name) {
    check_finite_bits(reinterpret_cast<const uint32_t*>(x), n, uint32_t(0x7F800000u), name);
}

void check_no_overlap(const py::array& out, const py::array& in, const char* out_name, const char* in_name) {
    auto lo1 = static_cast<const char*>(out.data()), hi1 = lo1 + out.nbytes();
    auto lo2 = static_cast<const char*>(in.data()), hi2 = lo2 + in.nbytes();
    if (lo1 < hi2 && lo2 < hi1) fail(std::string(out_name) + ": must not overlap " + in_name);
}

const KernelTable& resolve_kernels(const std::optional<std::string>& isa) {
    Isa chosen = active_isa();
    std::string name;
    if (isa) name = *isa;
    else if (const char* env = std::getenv("MOEMESH_ISA"); env && *env) name = env;
    if (!name.empty()) {
        if (!parse_isa(name.c_str(), &chosen)) fail("isa: unknown ISA '" + name + "' (scalar, avx2, avx512, neon)");
        if (!kernel_table(chosen)) fail("isa: '" + name + "' is not available on this CPU or build");
    }
    return *kernel_table(chosen);
}

Precision parse_precision(const std::string& p) {
    if (p == "exact") return Precision::Exact;
    if (p == "fast") return Precision::Fast;
    fail("precision: expected 'exact' or 'fast', got '" + p + "'");
}

py::array_t<float> py_mxfp4_dequant(const py::array& blocks, const py::array& scales) {
    if (blocks.ndim() < 2) fail("blocks: expected shape (..., n_blocks, 16), got " + shape_str(blocks));
    std::vector<py::ssize_t> bshape = shape_of(blocks);
    if (bshape.back() != Mxfp4::kBlockBytes) fail("blocks: last axis must be 16 bytes, got " + shape_str(blocks));
    std::vector<py::ssize_t> sshape(bshape.begin(), bshape.end() - 1);
    const uint8_t* b = in_ptr<uint8_t>(blocks, "blocks", bshape);
    const uint8_t* s = in_ptr<uint8_t>(scales, "scales", sshape);
    const int64_t n_blocks = sshape.back();
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < sshape.size(); ++i) rows *= sshape[i];
    std::vector<py::ssize_t> oshape(sshape.begin(), sshape.end());
    oshape.back() = n_blocks * Mxfp4::kBlock;
    py::array_t<float> out(oshape);
    float* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        mxfp4_dequant(b, s, rows, n_blocks, o);
    }
    return out;
}

void py_bf16_matmul(const py::array& x, const py::array& w, const std::optional<py::array>& bias, py::array& out,
                    const std::optional<std::string>& isa) {
    if (x.ndim() != 2) fail("x: expected shape (T, K), got " + shape_str(x));
    if (w.ndim() != 2) fail("w: expected shape (N, K), got " + shape_str(w));
    const int64_t T = x.shape(0), K = x.shape(1), N = w.shape(0);
    const float* xp = in_ptr<float>(x, "x", {T, K});
    const uint16_t* wp = in_ptr<uint16_t>(w, "w", {N, K});
    const uint16_t* bp = bias ? in_ptr<uint16_t>(*bias, "bias", {N}) : nullptr;
    float* op = out_ptr<float>(out, "out", {T, N});
    check_no_overlap(out, x, "out", "x");
    check_finite(xp, size_t(T * K), "x");
    const KernelTable& kt = resolve_kernels(isa);
    py::gil_scoped_release nogil;
    bf16_matmul(kt, xp, T, K, wp, N, bp, op);
}

void py_attention_softmax(py::array& scores, const py::array& sinks, const py::array& q_pos, const py::array& k_pos,
                          int64_t window, float sqrt_d, const std::optional<std::string>& isa) {
    if (scores.ndim() != 3) fail("scores: expected shape (H, T, S), got " + shape_str(scores));
    const int64_t H = scores.shape(0), T = scores.shape(1), S = scores.shape(2);
    float* sp = out_ptr<float>(scores, "scores", {H, T, S});
    const float* hp = in_ptr<float>(sinks, "sinks", {H});
    const int64_t* qp = in_ptr<int64_t>(q_pos, "q_pos", {T});
    const int64_t* kp = in_ptr<int64_t>(k_pos, "k_pos", {S});
    if (!(sqrt_d > 0.f) || !std::isfinite(sqrt_d)) fail("sqrt_d: must be a positive finite number");
    check_finite(hp, size_t(H), "sinks");
    const KernelTable& kt = resolve_kernels(isa);
    py::gil_scoped_release nogil;
    attention_softmax(kt, sp, H, T, S, hp, qp, kp, window, sqrt_d);
}

void py_attend(const py::array& q, const py::array& k, const py::array& v, const py::array& sinks,
               const py::array& q_pos, const py::array& k_pos, int64_t window, float sqrt_d, py::array& out,
               const std::optional<std::string>& isa) {
    if (q.ndim() != 3) fail("q: expected shape (T, nq, d), got " + shape_str(q));
    if (k.ndim() != 3) fail("k: expected shape (S, nkv, d), got " + shape_str(k));
    const int64_t T = q.shape(0), nq = q.shape(1), d = q.shape(2), S = k.shape(0), nkv = k.shape(1);
    if (nkv < 1 || nq % nkv)
        fail("k: kv heads must divide the " + std::to_string(nq) + " query heads, got " + shape_str(k));
    if (nq / nkv > attention::kMaxGroup)
        fail("k: at most " + std::to_string(attention::kMaxGroup) + " query heads per kv head, got " +
             std::to_string(nq / nkv));
    if (!attention::with_head_dim(d, [](auto) {}))
        fail("q: head dimension must be a multiple of 16 up to " + std::to_string(attention::kMaxHeadDim) + ", got " +
             shape_str(q));
    const float* qp = in_ptr<float>(q, "q", {T, nq, d});
    const float* kp = in_ptr<float>(k, "k", {S, nkv, d});
    const float* vp = in_ptr<float>(v, "v", {S, nkv, d});
    const float* hp = in_ptr<float>(sinks, "sinks", {nq});
    const int64_t* qpos = in_ptr<int64_t>(q_pos, "q_pos", {T});
    const int64_t* kpos = in_ptr<int64_t>(k_pos, "k_pos", {S});
    float* op = out_ptr<float>(out, "out", {T, nq, d});
    check_no_overlap(out, q, "out", "q");
    check_no_overlap(out, k, "out", "k");
    check_no_overlap(out, v, "out", "v");
    if (!(sqrt_d > 0.f) || !std::isfinite(sqrt_d)) fail("sqrt_d: must be a positive finite number");
    check_finite(hp, size_t(nq), "sinks");
    const KernelTable& kt = resolve_kernels(isa);
    py::gil_scoped_release nogil;
    attend(kt, qp, T, nq, d, kp, vp, S, nkv, hp, qpos, kpos, window, sqrt_d, op);
}

py::tuple py_router_topk(const py::array& logits, int64_t k) {
    if (logits.ndim() != 2) fail("logits: expected shape (T, E), got " + shape_str(logits));
    const int64_t T = logits.shape(0), E = logits.shape(1);
    if (k < 1 || k > E) fail("k: must be in [1, " + std::to_string(E) + "], got " + std::to_string(k));
    const float* lp = in_ptr<float>(logits, "logits", {T, E});
    check_finite(lp, size_t(T * E), "logits");
    py::array_t<int32_t> ids({T, k});
    py::array_t<float> weights({T, k});
    int32_t* ip = ids.mutable_data();
    float* wp = weights.mutable_data();
    {
        py::gil_scoped_release nogil;
        router_topk(lp, T, E, k, ip, wp);
    }
    return py::make_tuple(ids, weights);
}

void py_add_experts(const py::array& x, const py::array& outputs, const py::array& weights, py::array& out) {
    if (outputs.ndim() != 3) fail("outputs: expected shape (T, k, H), got " + shape_str(outputs));
    const int64_t T = outputs.shape(0), k = outputs.shape(1), H = outputs.shape(2);
    const float* xp = in_ptr<float>(x, "x", {T, H});
    const float* op = in_ptr<float>(outputs, "outputs", {T, k, H});
    const float* wp = in_ptr<float>(weights, "weights", {T, k});
    float* rp = out_ptr<float>(out, "out", {T, H});
    if (k < 1) fail("outputs: needs at least one expert per token, got shape " + shape_str(outputs));
    check_no_overlap(out, x, "out", "x");  // out's row is built before x is added
    check_no_overlap(out, outputs, "out", "outputs");
    check_no_overlap(out, weights, "out", "weights");
    py::gil_scoped_release nogil;
    add_experts(xp, op, wp, T, k, H, rp);
}

void py_rmsnorm(const py::array& x, const py::array& w, float eps, py::array& out) {
    if (x.ndim() != 2) fail("x: expected shape (T, H), got " + shape_str(x));
    const int64_t T = x.shape(0), H = x.shape(1);
    const float* xp = in_ptr<float>(x, "x", {T, H});
    const float* wp = in_ptr<float>(w, "w", {H});
    float* op = out_ptr<float>(out, "out", {T, H});
    check_no_overlap(out, x, "out", "x");
    if (!(eps >= 0.f) || !std::isfinite(eps)) fail("eps: must be a finite number >= 0");
    py::gil_scoped_release nogil;
    rmsnorm(xp, T, H, wp, eps, op);
}

void py_rope_rotate(py::array& x, const py::array& cos, const py::array& sin) {
    if (x.ndim() != 3 || x.shape(2) % 2) fail("x: expected shape (T, heads, d) with d even, got " + shape_str(x));
    const int64_t T = x.shape(0), heads = x.shape(1), d = x.shape(2);
    float* xp = out_ptr<float>(x, "x", {T, heads, d});
    const float* cp = in_ptr<float>(cos, "cos", {T, d / 2});
    const float* sp = in_ptr<float>(sin, "sin", {T, d / 2});
    py::gil_scoped_release nogil;
    rope_rotate(xp, T, heads, d, cp, sp);
}

// An activation array [..., n] (n a multiple of 32, as the q16 functions need) -> the shape of
// its per-block scales [..., n/32].
std::vector<py::ssize_t> q16_scales_shape(const py::array& a, const char* name) {
    if (a.ndim() < 1 || a.shape(a.ndim() - 1) % Q16Block::kBlock)
        fail(std::string(name) + ": last dimension must be a multiple of 32, got " + shape_str(a));
    std::vector<py::ssize_t> shape = shape_of(a);
    shape.back() /= Q16Block::kBlock;
    return shape;
}

// Activations for q16 [..., n]: n a multiple of 32, float32, contiguous, finite.
const float* q16_input(const py::array& x) {
    q16_scales_shape(x, "x");
    const float* xp = in_ptr<float>(x, "x", shape_of(x));
    check_finite(xp, size_t(x.size()), "x");
    return xp;
}

py::tuple py_q16_quantize(const py::array& x) {
    const std::vector<py::ssize_t> dshape = q16_scales_shape(x, "x");
    const float* xp = q16_input(x);
    const int64_t n = int64_t(x.size());
    py::array_t<int16_t> q(shape_of(x));
    py::array_t<float> d(dshape);
    int16_t* qp = q.mutable_data();
    float* dp = d.mutable_data();
    {
        py::gil_scoped_release nogil;
        q16_quantize_parallel(xp, n, qp, dp);
    }
    return py::make_tuple(q, d);
}

py::array_t<float> py_q16_dequantize(const py::array& q, const py::array& d) {
    const int16_t* qp = in_ptr<int16_t>(q, "q", shape_of(q));
    const float* dp = in_ptr<float>(d, "d", q16_scales_shape(q, "q"));
    py::array_t<float> out(shape_of(q));
    float* op = out.mutable_data();
    const int64_t n = int64_t(q.size());
    py::gil_scoped_release nogil;
    q16_dequantize_parallel(qp, dp, n, op);
    return out;
}

py::array_t<float> py_q16_round(const py::array& x) {
    const float* xp = q16_input(x);
    const int64_t n = int64_t(x.size());
    py::array_t<float> out(shape_of(x));
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        q16_round_parallel(xp, n, op);
    }
    return out;
}

// Largest |value|, inf when any value is NaN or infinite.
float max_abs(const float* x, int64_t n) {
    float peak = 0.f;
    for (int64_t i = 0; i < n; ++i) {
        const float v = std::fabs(x[i]);
        if (!(v <= peak)) peak = std::isnan(v) ? INFINITY : v;
    }
    return peak;
}

// The wire form of q16 activations (protocol.py): every code, then every scale, little-endian, in
// one bytes object, made and read here in one pass. A hop's Python work runs right after the
// kernels streamed tens of MB through the caches, when each numpy call costs ~10x its warm time
// (decoding a token's activations: 137 us through numpy, 16 us for the native part alone).
py::bytes py_q16_encode(const py::array& x) {
    const float* xp = q16_input(x);
    const int64_t n = int64_t(x.size());
    const int64_t code_bytes = n * int64_t(sizeof(int16_t));
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, py::ssize_t(code_bytes + n / Q16Block::kBlock * 4));
    if (!obj) throw py::error_already_set();
    auto bytes = py::reinterpret_steal<py::bytes>(obj);
    char* p = PyBytes_AS_STRING(obj);
    {
        py::gil_scoped_release nogil;
        std::vector<int16_t> q(static_cast<size_t>(n));
        std::vector<float> d(static_cast<size_t>(n / Q16Block::kBlock));
        q16_quantize_parallel(xp, n, q.data(), d.data());
        std::memcpy(p, q.data(), size_t(code_bytes));
        std::memcpy(p + code_bytes, d.data(), d.size() * sizeof(float));
    }
    return bytes;
}

// Its inverse for rows x cols values -> (float32 [rows, cols], the largest |value|: inf when any is
// not finite), so a receiver checks its limits without another pass.
py::tuple py_q16_decode(const py::bytes& data, int64_t rows, int64_t cols) {
    if (rows < 0 || cols < 0 || cols % Q16Block::kBlock)
        fail("shape: " + std::to_string(rows) + " x " + std::to_string(cols) + " is not q16 (columns in blocks of 32)");
    const int64_t n = rows * cols, nb = n / Q16Block::kBlock, code_bytes = n * int64_t(sizeof(int16_t));
    char* p = nullptr;
    py::ssize_t len = 0;
    if (PyBytes_AsStringAndSize(data.ptr(), &p, &len) != 0) throw py::error_already_set();
    if (len != code_bytes + nb * 4)
        fail("data: " + std::to_string(len) + " bytes do not hold q16 [" + std::to_string(rows) + ", " +
             std::to_string(cols) + "]");
    py::array_t<float> out({rows, cols});
    float* op = out.mutable_data();
    float peak = 0.f;
    {
        py::gil_scoped_release nogil;
        std::vector<int16_t> q(static_cast<size_t>(n));  // copies: the bytes carry no alignment promise
        std::vector<float> d(static_cast<size_t>(nb));
        std::memcpy(q.data(), p, size_t(code_bytes));
        std::memcpy(d.data(), p + code_bytes, d.size() * sizeof(float));
        q16_dequantize_parallel(q.data(), d.data(), n, op);
        peak = max_abs(op, n);
    }
    return py::make_tuple(out, peak);
}

float py_max_abs(const py::array& a) {
    const float* p = in_ptr<float>(a, "a", shape_of(a));
    py::gil_scoped_release nogil;
    return max_abs(p, int64_t(a.size()));
}

WeightFormat parse_format(const std::string& name) {
    std::string known;
    for (int f = 0; f < kWeightFormats; ++f) {
        if (name == kFormatInfo[f].name) return WeightFormat(f);
        known += (f ? ", " : "") + std::string(kFormatInfo[f].name);
    }
    fail("format: '" + name + "' is not one of " + known);
}

// A format's stored values and scales, checked: values uint8 (int8 for Q8) [..., block bytes],
// scales uint8 (MXFP4's exponents) or uint16 (fp16) [...].
const uint8_t* values_ptr(const py::array& a, WeightFormat f, const char* name, std::vector<py::ssize_t> shape) {
    shape.push_back(format_info(f).block_bytes);
    if (f == WeightFormat::Q8) return reinterpret_cast<const uint8_t*>(in_ptr<int8_t>(a, name, shape));
    return in_ptr<uint8_t>(a, name, shape);
}
const uint8_t* scales_ptr(const py::array& a, WeightFormat f, const char* name, std::vector<py::ssize_t> shape) {
    if (format_info(f).scale_bytes == 1) return in_ptr<uint8_t>(a, name, shape);
    return reinterpret_cast<const uint8_t*>(in_ptr<uint16_t>(a, name, shape));
}

// The layout a format's values are in for a kernel table: values only make sense to kernels of
// the same layout.
std::string layout_name(const KernelTable& kt, WeightFormat f) { return kt.of(f).weight_layout ? kt.name : "natural"; }
// The layout the kernels read at a precision: the exact ones read values as stored, the fast ones
// in their weight_layout.
std::string layout_read(const KernelTable& kt, WeightFormat f, Precision p) {
    return p == Precision::Exact ? "natural" : layout_name(kt, f);
}

py::tuple py_q8_quantize(const py::array& w, const std::optional<std::string>& isa) {
    if (w.ndim() != 2) fail("w: expected shape (N, K), got " + shape_str(w));
    const int64_t N = w.shape(0), K = w.shape(1);
    if (K % Q8::kBlock) fail("w: K = " + std::to_string(K) + " is not a multiple of 32");
    const uint16_t* wp = in_ptr<uint16_t>(w, "w", {N, K});
    const KernelTable& kt = resolve_kernels(isa);
    py::array_t<int8_t> values({N, K});
    py::array_t<uint16_t> scales({N, K / Q8::kBlock});
    int8_t* vp = values.mutable_data();
    uint16_t* sp = scales.mutable_data();
    {
        py::gil_scoped_release nogil;
        q8_copy(kt, wp, N, K, vp, sp);
    }
    return py::make_tuple(values, scales, layout_name(kt, WeightFormat::Q8));
}

// bf16 rows -> a format's values and scales as stored in a checkpoint (natural order).
void py_quantize(const std::string& format, const py::array& w, py::array& values, py::array& scales) {
    const WeightFormat f = parse_format(format);
    if (w.ndim() != 2) fail("w: expected shape (N, K), got " + shape_str(w));
    const int64_t N = w.shape(0), K = w.shape(1);
    if (K % 32) fail("w: K = " + std::to_string(K) + " is not a multiple of 32");
    const uint16_t* wp = in_ptr<uint16_t>(w, "w", {N, K});
    uint8_t* vp = writeable(values, "values", values_ptr(values, f, "values", {N, K / 32}));
    uint8_t* sp = writeable(scales, "scales", scales_ptr(scales, f, "scales", {N, K / 32}));
    check_finite_bits(wp, size_t(N * K), uint16_t(0x7F80), "w");  // bf16
    py::gil_scoped_release nogil;
    switch (f) {
        case WeightFormat::Mxfp4: mxfp4_quantize(wp, N, K, vp, sp); break;
        case WeightFormat::Q4: q4_quantize(wp, N, K, vp, reinterpret_cast<uint16_t*>(sp)); break;
        case WeightFormat::Q8: q8_quantize(wp, N, K, reinterpret_cast<int8_t*>(vp), reinterpret_cast<uint16_t*>(sp)); break;
    }
}

// Puts a format's values [..., n_blocks, block bytes] in place into the active kernels' order;
// returns that layout's name.
std::string py_weight_layout(const std::string& format, py::array& values, const std::optional<std::string>& isa) {
    const WeightFormat f = parse_format(format);
    if (values.ndim() < 2) fail("values: expected shape (..., n_blocks, block bytes), got " + shape_str(values));
    std::vector<py::ssize_t> shape = shape_of(values);
    shape.pop_back();
    uint8_t* vp = writeable(values, "values", values_ptr(values, f, "values", shape));
    const int64_t n_blocks = values.shape(values.ndim() - 2);
    const KernelTable& kt = resolve_kernels(isa);
    py::gil_scoped_release nogil;
    weight_layout(kt, f, vp, int64_t(values.size()) / (n_blocks * format_info(f).block_bytes), n_blocks);
    return layout_name(kt, f);
}

void py_q8_matmul(const py::array& x, const py::array& values, const py::array& scales, const std::string& layout,
                  py::array& out, const std::string& precision, const std::optional<std::string>& isa) {
    if (x.ndim() != 2) fail("x: expected shape (T, K), got " + shape_str(x));
    if (values.ndim() != 2) fail("values: expected shape (N, K), got " + shape_str(values));
    const int64_t T = x.shape(0), K = x.shape(1), N = values.shape(0);
    if (K % Q8::kBlock) fail("x: K = " + std::to_string(K) + " is not a multiple of 32");
    const float* xp = in_ptr<float>(x, "x", {T, K});
    const int8_t* vp = in_ptr<int8_t>(values, "values", {N, K});
    const uint16_t* sp = in_ptr<uint16_t>(scales, "scales", {N, K / Q8::kBlock});
    float* op = out_ptr<float>(out, "out", {T, N});
    check_no_overlap(out, x, "out", "x");
    check_finite(xp, size_t(T * K), "x");
    const Precision p = parse_precision(precision);
    const KernelTable& kt = resolve_kernels(isa);
    const std::string expected = layout_read(kt, WeightFormat::Q8, p);
    if (layout != expected)
        fail("layout: the copy was made in layout '" + layout + "', the " + kt.name + " kernels read '" + expected +
             "' at " + precision + " precision");
    py::gil_scoped_release nogil;
    quant_matmul(kt, p, WeightFormat::Q8, xp, T, K, reinterpret_cast<const uint8_t*>(vp),
                 reinterpret_cast<const uint8_t*>(sp), N, op);
}

void py_moe_experts(const py::array& x, const py::array& expert_ids, const py::array& gate_up_blocks,
                    const py::array& gate_up_scales, const std::optional<py::array>& gate_up_bias,
                    const py::array& down_blocks, const py::array& down_scales,
                    const std::optional<py::array>& down_bias, py::array& out, const std::string& precision,
                    float swiglu_alpha, float swiglu_limit, const std::string& activation, const std::string& format,
                    const std::string& layout, const std::optional<std::string>& isa) {
    if (activation != "swiglu_clamped" && activation != "swiglu")
        fail("activation: '" + activation + "' is not one of swiglu_clamped, swiglu");
    const WeightFormat f = parse_format(format);
    const int64_t block_bytes = format_info(f).block_bytes;
    if (x.ndim() != 2) fail("x: expected shape (T, H), got " + shape_str(x));
    if (expert_ids.ndim() != 2) fail("expert_ids: expected shape (T, k), got " + shape_str(expert_ids));
    if (gate_up_blocks.ndim() != 4)
        fail("gate_up_blocks: expected shape (E, 2I, H/32, " + std::to_string(block_bytes) + "), got " +
             shape_str(gate_up_blocks));
    const int64_t T = x.shape(0), H = x.shape(1), k = expert_ids.shape(1);
    const int64_t E = gate_up_blocks.shape(0), I2 = gate_up_blocks.shape(1);
    if (H % 32) fail("x: hidden size " + std::to_string(H) + " is not a multiple of 32");
    if (I2 % 2 || (I2 / 2) % 32) fail("gate_up_blocks: 2I = " + std::to_string(I2) + " must be 2 * a multiple of 32");
    const int64_t I = I2 / 2;
    const Precision p = parse_precision(precision);
    const KernelTable& kt = resolve_kernels(isa);
    const std::string expected = layout_read(kt, f, p);
    if (layout != expected)
        fail("layout: the values are in layout '" + layout + "', the " + kt.name + " kernels read " + format +
             " values in '" + expected + "' at " + precision + " precision");
    MoeWeights w;
    w.n_experts = E;
    w.hidden = H;
    w.inter = I;
    w.format = f;
    w.gate_up_values = values_ptr(gate_up_blocks, f, "gate_up_blocks", {E, 2 * I, H / 32});
    w.gate_up_scales = scales_ptr(gate_up_scales, f, "gate_up_scales", {E, 2 * I, H / 32});
    w.gate_up_bias = gate_up_bias ? in_ptr<uint16_t>(*gate_up_bias, "gate_up_bias", {E, 2 * I}) : nullptr;
    w.down_values = values_ptr(down_blocks, f, "down_blocks", {E, H, I / 32});
    w.down_scales = scales_ptr(down_scales, f, "down_scales", {E, H, I / 32});
    w.down_bias = down_bias ? in_ptr<uint16_t>(*down_bias, "down_bias", {E, H}) : nullptr;
    w.swiglu_alpha = swiglu_alpha;
    w.swiglu_limit = swiglu_limit;
    w.clamped = activation == "swiglu_clamped";
    const float* xp = in_ptr<float>(x, "x", {T, H});
    const int32_t* ids = in_ptr<int32_t>(expert_ids, "expert_ids", {T, k});
    float* op = out_ptr<float>(out, "out", {T, k, H});
    check_no_overlap(out, x, "out", "x");
    for (int64_t i = 0; i < T * k; ++i)
        if (ids[i] < -1 || ids[i] >= E)
            fail("expert_ids: id " + std::to_string(ids[i]) + " at flat index " + std::to_string(i) +
                 " is out of range [-1, " + std::to_string(E) + ")");
    check_finite(xp, size_t(T * H), "x");
    py::gil_scoped_release nogil;
    moe_experts(kt, p, w, xp, T, ids, k, op);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "moemesh native kernels: MXFP4 expert FFN, bf16 matmul, MXFP4 dequantization";
    m.def("mxfp4_dequant", &py_mxfp4_dequant, py::arg("blocks"), py::arg("scales"),
          "Decode MXFP4 blocks (..., G, 16) u8 and scales (..., G) u8 into float32 (..., G*32).");
    m.def("bf16_matmul", &py_bf16_matmul, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"),
          py::arg("isa") = py::none(), "out[T, N] = x[T, K] @ w[N, K]^T + bias (w, bias bf16 as uint16).");
    m.def("attention_softmax", &py_attention_softmax, py::arg("scores"), py::arg("sinks"), py::arg("q_pos"),
          py::arg("k_pos"), py::arg("window"), py::arg("sqrt_d"), py::arg("isa") = py::none(),
          "Raw scores [H, T, S] -> attention weights in place: /sqrt_d, causal (and window > 0) mask, "
          "softmax with each head's sink logit in the denominator.");
    m.def("attend", &py_attend, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("sinks"), py::arg("q_pos"),
          py::arg("k_pos"), py::arg("window"), py::arg("sqrt_d"), py::arg("out"), py::arg("isa") = py::none(),
          "Attention of q [T, nq, d] at q_pos over k, v [S, nkv, d] at k_pos, masked as attention_softmax "
          "masks, sinks in the denominator -> out [T, nq, d].");
    m.def("router_topk", &py_router_topk, py::arg("logits"), py::arg("k"),
          "Router logits [T, E] -> (ids int32 [T, k]: the k largest, ties to the lower id; their softmax [T, k]).");
    m.def("add_experts", &py_add_experts, py::arg("x"), py::arg("outputs"), py::arg("weights"), py::arg("out"),
          "out[T, H] = x + sum over slots in order of outputs[T, k, H] * weights[T, k].");
    m.def("rmsnorm", &py_rmsnorm, py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("out"),
          "out[T, H] = x / sqrt(mean(x^2, axis=-1) + eps) * w, float32 (squares summed in double).");
    m.def("rope_rotate", &py_rope_rotate, py::arg("x"), py::arg("cos"), py::arg("sin"),
          "RoPE's half-split rotation of x [T, heads, d] in place by cos, sin [T, d/2].");
    m.def("q16_quantize", &py_q16_quantize, py::arg("x"),
          "Activations float32 [..., n] -> (int16 codes [..., n], float32 scales [..., n/32]); numpy's bits.");
    m.def("q16_dequantize", &py_q16_dequantize, py::arg("q"), py::arg("d"), "The inverse of q16_quantize.");
    m.def("q16_round", &py_q16_round, py::arg("x"), "q16_dequantize(*q16_quantize(x)) in one pass, the same bits.");
    m.def("q16_encode", &py_q16_encode, py::arg("x"), "float32 [..., n] -> q16 wire bytes (codes, then scales).");
    m.def("q16_decode", &py_q16_decode, py::arg("data"), py::arg("rows"), py::arg("cols"),
          "q16 wire bytes -> (float32 [rows, cols], largest |value| or inf).");
    m.def("max_abs", &py_max_abs, py::arg("a"), "Largest |value| of a float32 array; inf if any is NaN or Inf.");
    m.def("quantize", &py_quantize, py::arg("format"), py::arg("w"), py::arg("values"), py::arg("scales"),
          "bf16 rows [N, K] (uint16) -> a format's values [N, K/32, block bytes] and scales [N, K/32] as a "
          "checkpoint stores them: the bytes of formats.mxfp4_quantize, q4_quantize or q8_quantize.");
    m.def("weight_layout", &py_weight_layout, py::arg("format"), py::arg("values"), py::arg("isa") = py::none(),
          "A format's values [..., n_blocks, block bytes] in place into the kernels' order; the layout's name.");
    m.def("q8_quantize", &py_q8_quantize, py::arg("w"), py::arg("isa") = py::none(),
          "The Q8 copy of bf16 w[N, K]: (values int8 [N, K], fp16 scales [N, K/32], layout name).");
    m.def("q8_matmul", &py_q8_matmul, py::arg("x"), py::arg("values"), py::arg("scales"), py::arg("layout"),
          py::arg("out"), py::arg("precision") = "fast", py::arg("isa") = py::none(),
          "out[T, N] = x[T, K] @ W^T over Q8 values [N, K] (int8) and fp16 scales: fast (int16 activation "
          "blocks) over a copy in the kernels' layout, or exact (fp32 activations) over values as stored.");
    m.def("moe_experts", &py_moe_experts, py::arg("x"), py::arg("expert_ids"), py::arg("gate_up_blocks"),
          py::arg("gate_up_scales"), py::arg("gate_up_bias"), py::arg("down_blocks"), py::arg("down_scales"),
          py::arg("down_bias"), py::arg("out"), py::arg("precision") = "exact", py::arg("swiglu_alpha") = 1.702f,
          py::arg("swiglu_limit") = 7.0f, py::arg("activation") = "swiglu_clamped", py::arg("format") = "mxfp4",
          py::arg("layout") = "natural", py::arg("isa") = py::none(),
          "out[t, slot] = unweighted expert FFN of x[t] for expert_ids[t, slot] (-1 = skip, zeros); weights in "
          "`format` (values in `layout`, weight_layout's name), biases optional (None: none).");
    m.def("stream_read", [](const py::buffer& buf, bool prefetch) {
        py::buffer_info info = buf.request();
        const auto* p = static_cast<const uint8_t*>(info.ptr);
        const int64_t n = int64_t(info.size) * int64_t(info.itemsize);
        py::gil_scoped_release nogil;
        return stream_read(p, n, prefetch);
    }, py::arg("buf"), py::arg("prefetch") = true,
          "Read every byte of a buffer with all threads (bandwidth benchmark); xor checksum.");
    m.def("stream_triad", [](py::array_t<float, py::array::c_style> a, py::array_t<float, py::array::c_style> b,
                             py::array_t<float, py::array::c_style> c, float scalar) {
        if (b.size() != a.size() || c.size() != a.size()) fail("stream_triad: a, b and c must have one size");
        float* pa = a.mutable_data();
        const float *pb = b.data(), *pc = c.data();
        const int64_t n = int64_t(a.size());
        py::gil_scoped_release nogil;
        stream_triad(pa, pb, pc, scalar, n);
    }, py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("c").noconvert(), py::arg("scalar"),
          "STREAM triad a = b + scalar * c with all threads (bandwidth benchmark).");
    m.def("set_threads", [](int n) {
        if (n < 0) fail("n: thread count must be >= 0 (0 = all cores)");
        set_global_threads(n);
    }, py::arg("n"));
    m.def("get_threads", [] { return global_pool().size(); });
    m.def("park_workers", [] { global_pool().park(); },
          "Idle kernel threads sleep now rather than spin (call before waiting on the network).");
    m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
    m.attr("TILE_TOKENS") = kTileTokens;  // calls with fewer tokens take the vector kernels
    m.def("matrix_tiles", [] { return kernel_table(active_isa())->of(WeightFormat::Mxfp4).tile_q16 != nullptr; },
          "Whether the active path multiplies many tokens' experts on matrix tiles (AMX; MOEMESH_AMX=0 turns it off).");
    m.def("kernel_variant", [] { return std::string(table_variant(kernel_table(active_isa()))); },
          "The build of the active path: 'vnni' (AVX2 with AVX-VNNI; MOEMESH_AVXVNNI=0 turns it off), 'vbmi' or "
          "'amx' (AVX-512), '' for the ISA's base build.");
    m.def("available_isas", [] {
        std::vector<std::string> names;
        for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon})
            if (kernel_table(isa)) names.push_back(isa_name(isa));
        return names;
    });
}
