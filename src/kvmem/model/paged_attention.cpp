// kvmem: decode attention that reads a sequence's KV blocks where they lie in the pool (CPU).
//
// One query token per row (decoding). For row b and KV head h, the query heads of its group
// attend to the row's segments in order (pool blocks, or dense [H, n, D] runs), of which only
// slots [lo, lo + count) hold tokens, and then to the row's new token. A segment is either full
// precision (float32 or bfloat16, like the queries) or a KIVI block decoded on the fly: keys per
// channel and values per token, 2/4/8-bit codes with float16 scale and zero per group (the
// buffer layout of kvmem.compress.kivi). As in flash-decoding, a row's segments are cut into
// jobs that run in parallel, each keeping an online softmax (max, sum, weighted values) in
// float32; the jobs of a row are merged at the end. Registered with PyTorch as the operator
// kvmem::paged_decode, run on PyTorch's own thread pool (at::parallel_for); built on first use by
// kvmem.model.kernel with torch.utils.cpp_extension.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr float kLow = -1e30f;  // below any logit: a finite "minus infinity" (built with -ffast-math)
constexpr int kChunk = 64;      // tokens whose logits are computed before they are folded in
constexpr int64_t kJobSlots = 512;  // slots per job (flash-decoding split)

inline float bf16_to_float(uint16_t x) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#endif
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                ++e;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline void to_float(const float* src, float* dst, int n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void to_float(const uint16_t* src, float* dst, int n) {
#pragma omp simd
    for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}
inline void from_float(const float* src, float* dst, int n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void from_float(const float* src, uint16_t* dst, int n) {
    for (int i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

inline float dot(const float* a, const float* b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

struct Kivi {  // geometry of a KIVI block (kvmem.compress.kivi.BlockLayout)
    int heads, bs, dim, bits, kgroup, vgroup, kgroups, vgroups;
    int64_t kstats, vstats, kbytes, vbytes, kcodes;
    Kivi(const int* g, int d)
        : heads(g[0]), bs(g[1]), dim(d), bits(g[2]), kgroup(g[3]), vgroup(g[4]) {
        kgroups = kgroup ? bs / kgroup : 0;
        vgroups = vgroup ? d / vgroup : 0;
        kstats = static_cast<int64_t>(heads) * d * kgroups;
        vstats = static_cast<int64_t>(heads) * bs * vgroups;
        kbytes = static_cast<int64_t>(kgroup) * bits / 8;
        vbytes = static_cast<int64_t>(vgroup) * bits / 8;
        kcodes = kstats * kbytes;
    }
};

// codes j = 0..n of a group, little-endian within each byte, as floats
inline void unpack(const uint8_t* bytes, int bits, int n, float* out) {
    if (bits == 4) {
        for (int j = 0; j < n / 2; ++j) {
            out[2 * j] = static_cast<float>(bytes[j] & 15);
            out[2 * j + 1] = static_cast<float>(bytes[j] >> 4);
        }
    } else if (bits == 2) {
        for (int j = 0; j < n / 4; ++j) {
            uint8_t b = bytes[j];
            out[4 * j] = static_cast<float>(b & 3);
            out[4 * j + 1] = static_cast<float>((b >> 2) & 3);
            out[4 * j + 2] = static_cast<float>((b >> 4) & 3);
            out[4 * j + 3] = static_cast<float>(b >> 6);
        }
    } else {
        for (int j = 0; j < n; ++j) out[j] = static_cast<float>(bytes[j]);
    }
}

struct State {  // online softmax of G query heads: running max, sum, weighted values [G, D]
    int G, D;
    std::vector<float> m, l, acc;
    State(int g, int d) : G(g), D(d), m(g, kLow), l(g, 0.f), acc(static_cast<size_t>(g) * d, 0.f) {}
};

struct Scratch {
    std::vector<float> logits, kbuf, vbuf, codes;
    Scratch(int G, int D, int bs)
        : logits(static_cast<size_t>(G) * std::max(kChunk, bs)),
          kbuf(static_cast<size_t>(std::max(kChunk, bs)) * D),
          vbuf(static_cast<size_t>(std::max(kChunk, bs)) * D),
          codes(static_cast<size_t>(std::max(D, bs)) * std::max(D, bs)) {}
};

// fold n tokens into the state: logits [G, stride], values rows of vbuf [n, D]
inline void absorb(State& st, const float* logits, int stride, const float* values, int n) {
    int D = st.D;
    for (int g = 0; g < st.G; ++g) {
        const float* lg = logits + static_cast<size_t>(g) * stride;
        float mx = st.m[g];
        for (int t = 0; t < n; ++t) mx = std::max(mx, lg[t]);
        float correction = std::exp(st.m[g] - mx);
        float* a = &st.acc[static_cast<size_t>(g) * D];
        if (correction != 1.f) {
#pragma omp simd
            for (int d = 0; d < D; ++d) a[d] *= correction;
        }
        float l = st.l[g] * correction;
        for (int t = 0; t < n; ++t) {
            float p = std::exp(lg[t] - mx);
            l += p;
            const float* v = values + static_cast<size_t>(t) * D;
#pragma omp simd
            for (int d = 0; d < D; ++d) a[d] += p * v[d];
        }
        st.m[g] = mx;
        st.l[g] = l;
    }
}

// tokens [first, last) of a full-precision run: keys and values [slots, D] of one head
template <typename T>
void full_run(State& st, Scratch& sc, const float* q, const T* kp, const T* vp, int64_t first, int64_t last) {
    int G = st.G, D = st.D;
    for (int64_t t0 = first; t0 < last; t0 += kChunk) {
        int n = static_cast<int>(std::min<int64_t>(kChunk, last - t0));
        to_float(kp + t0 * D, sc.kbuf.data(), n * D);
        to_float(vp + t0 * D, sc.vbuf.data(), n * D);
        for (int t = 0; t < n; ++t) {
            const float* k = &sc.kbuf[static_cast<size_t>(t) * D];
            for (int g = 0; g < G; ++g) sc.logits[static_cast<size_t>(g) * kChunk + t] = dot(q + g * D, k, D);
        }
        absorb(st, sc.logits.data(), kChunk, sc.vbuf.data(), n);
    }
}

// tokens [first, last) of head h of a KIVI block
void kivi_block(State& st, Scratch& sc, const Kivi& kv, const float* q, const uint8_t* buf, int h, int first,
                int last) {
    int G = st.G, D = st.D, bs = kv.bs, n = last - first;
    const uint16_t* kscale = reinterpret_cast<const uint16_t*>(buf);
    const uint16_t* kzero = kscale + kv.kstats;
    const uint16_t* vscale = kzero + kv.kstats;
    const uint16_t* vzero = vscale + kv.vstats;
    const uint8_t* kcodes = buf + 4 * (kv.kstats + kv.vstats);
    const uint8_t* vcodes = kcodes + kv.kcodes;
    // keys: codes [D, bs] of this head; logit[g, t] = sum_d q[g, d] (c[d, t] s[d, grp] + z[d, grp])
    float* codes = sc.codes.data();
    for (int d = 0; d < D; ++d)
        for (int grp = 0; grp < kv.kgroups; ++grp) {
            int64_t stat = (static_cast<int64_t>(h) * D + d) * kv.kgroups + grp;
            unpack(kcodes + stat * kv.kbytes, kv.bits, kv.kgroup, codes + static_cast<size_t>(d) * bs + grp * kv.kgroup);
        }
    float* ks = sc.kbuf.data();  // the head's key scales and zero points as floats: [kgroups, D] each
    float* kz = ks + static_cast<size_t>(kv.kgroups) * D;
    for (int d = 0; d < D; ++d)
        for (int grp = 0; grp < kv.kgroups; ++grp) {
            int64_t stat = (static_cast<int64_t>(h) * D + d) * kv.kgroups + grp;
            ks[grp * D + d] = half_to_float(kscale[stat]);
            kz[grp * D + d] = half_to_float(kzero[stat]);
        }
    for (int g = 0; g < G; ++g) {
        float* lg = &sc.logits[static_cast<size_t>(g) * bs];
        std::fill(lg, lg + bs, 0.f);
        const float* qg = q + g * D;
        for (int grp = 0; grp < kv.kgroups; ++grp) {
            int t0 = grp * kv.kgroup, t1 = t0 + kv.kgroup;
            if (t1 <= first || t0 >= last) continue;
            float bias = dot(qg, kz + grp * D, D);
            for (int d = 0; d < D; ++d) {
                float a = qg[d] * ks[grp * D + d];
                const float* c = codes + static_cast<size_t>(d) * bs;
#pragma omp simd
                for (int t = t0; t < t1; ++t) lg[t] += a * c[t];
            }
#pragma omp simd
            for (int t = t0; t < t1; ++t) lg[t] += bias;
        }
    }
    // values: token t's row [D], groups of vgroup channels
    for (int t = first; t < last; ++t) {
        float* v = &sc.vbuf[static_cast<size_t>(t - first) * D];
        for (int grp = 0; grp < kv.vgroups; ++grp) {
            int64_t stat = (static_cast<int64_t>(h) * bs + t) * kv.vgroups + grp;
            float s = half_to_float(vscale[stat]), z = half_to_float(vzero[stat]);
            float* row = v + grp * kv.vgroup;
            unpack(vcodes + stat * kv.vbytes, kv.bits, kv.vgroup, row);
#pragma omp simd
            for (int j = 0; j < kv.vgroup; ++j) row[j] = row[j] * s + z;
        }
    }
    absorb(st, sc.logits.data() + first, bs, sc.vbuf.data(), n);
}

struct Job {
    int b, h;
    int64_t seg_begin, seg_end, offset;  // segments [seg_begin, seg_end), the first's slot in the row
};

template <typename T>
void decode(int B, int H, int G, int D, float scale, const T* q, const T* new_k, const T* new_v, const int64_t* rows,
            const int64_t* seg, const int* geometry, bool parallel, T* out) {
    Kivi kivi(geometry, D);
    std::vector<Job> jobs;
    std::vector<int64_t> first_job(static_cast<size_t>(B) * H + 1, 0);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
            first_job[static_cast<size_t>(b) * H + h] = static_cast<int64_t>(jobs.size());
            int64_t s = rows[4 * b], end = rows[4 * b + 1], offset = 0;
            while (s < end) {  // segments of about kJobSlots slots per job
                int64_t start = s, start_offset = offset, slots = 0;
                while (s < end && (slots == 0 || slots + seg[5 * s + 3] <= kJobSlots)) {
                    slots += seg[5 * s + 3];
                    ++s;
                }
                offset += slots;
                jobs.push_back({b, h, start, s, start_offset});
            }
        }
    first_job[static_cast<size_t>(B) * H] = static_cast<int64_t>(jobs.size());
    int64_t J = static_cast<int64_t>(jobs.size());
    std::vector<float> part_m(J * G), part_l(J * G), part_acc(J * G * D);
    int bs = std::max(kivi.bs, 1);

    // the jobs, on PyTorch's threads (or this one), each with scratch of its own
    auto run_jobs = [&](int64_t begin, int64_t end) {
        Scratch sc(G, D, bs);
        std::vector<float> qf(static_cast<size_t>(G) * D);
        for (int64_t j = begin; j < end; ++j) {
            const Job& job = jobs[j];
            to_float(q + (static_cast<int64_t>(job.b) * H * G + job.h * G) * D, qf.data(), G * D);
            for (float& x : qf) x *= scale;
            State st(G, D);
            int64_t lo = rows[4 * job.b + 2], hi = lo + rows[4 * job.b + 3], offset = job.offset;
            for (int64_t s = job.seg_begin; s < job.seg_end; ++s) {
                const int64_t* e = seg + 5 * s;  // kind, key pointer (or buffer), value pointer, slots, head stride
                int64_t size = e[3];
                int64_t first = std::max<int64_t>(lo - offset, 0), last = std::min<int64_t>(hi - offset, size);
                offset += size;
                if (first >= last) continue;
                if (e[0] == 0) {
                    const T* kp = reinterpret_cast<const T*>(e[1]) + job.h * e[4];
                    const T* vp = reinterpret_cast<const T*>(e[2]) + job.h * e[4];
                    full_run<T>(st, sc, qf.data(), kp, vp, first, last);
                } else {
                    kivi_block(st, sc, kivi, qf.data(), reinterpret_cast<const uint8_t*>(e[1]), job.h,
                               static_cast<int>(first), static_cast<int>(last));
                }
            }
            std::copy(st.m.begin(), st.m.end(), part_m.begin() + j * G);
            std::copy(st.l.begin(), st.l.end(), part_l.begin() + j * G);
            std::copy(st.acc.begin(), st.acc.end(), part_acc.begin() + j * G * D);
        }
    };
    // each row and head: its new token, then its jobs merged in order (the same sums on any threads)
    auto merge_rows = [&](int64_t begin, int64_t end) {
        Scratch sc(G, D, bs);
        std::vector<float> qf(static_cast<size_t>(G) * D);
        for (int64_t bh = begin; bh < end; ++bh) {
            int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
            to_float(q + (static_cast<int64_t>(b) * H * G + h * G) * D, qf.data(), G * D);
            for (float& x : qf) x *= scale;
            State st(G, D);  // the new token, then every job of the row merged in
            to_float(new_k + (static_cast<int64_t>(b) * H + h) * D, sc.kbuf.data(), D);
            to_float(new_v + (static_cast<int64_t>(b) * H + h) * D, sc.vbuf.data(), D);
            for (int g = 0; g < G; ++g) sc.logits[static_cast<size_t>(g) * kChunk] = dot(qf.data() + g * D, sc.kbuf.data(), D);
            absorb(st, sc.logits.data(), kChunk, sc.vbuf.data(), 1);
            for (int64_t j = first_job[bh]; j < first_job[bh + 1]; ++j)
                for (int g = 0; g < G; ++g) {
                    float pm = part_m[j * G + g], mx = std::max(st.m[g], pm);
                    float a = std::exp(st.m[g] - mx), c = std::exp(pm - mx);
                    float* acc = &st.acc[static_cast<size_t>(g) * D];
                    const float* other = &part_acc[(j * G + g) * D];
#pragma omp simd
                    for (int d = 0; d < D; ++d) acc[d] = acc[d] * a + other[d] * c;
                    st.l[g] = st.l[g] * a + part_l[j * G + g] * c;
                    st.m[g] = mx;
                }
            for (int g = 0; g < G; ++g) {
                float inv = 1.f / st.l[g];
                float* acc = &st.acc[static_cast<size_t>(g) * D];
                for (int d = 0; d < D; ++d) acc[d] *= inv;
                from_float(acc, out + (static_cast<int64_t>(b) * H * G + h * G + g) * D, D);
            }
        }
    };
    int64_t rows_heads = static_cast<int64_t>(B) * H;
    if (parallel) {
        at::parallel_for(0, J, 1, run_jobs);
        at::parallel_for(0, rows_heads, 1, merge_rows);
    } else {
        run_jobs(0, J);
        merge_rows(0, rows_heads);
    }
}

}  // namespace

// q: [B, H*G, D]; new_keys, new_values: [B, H, D], float32 or bfloat16, contiguous; rows: [B, 4] int64
// (first segment, end segment, lo, count); segments: [S, 5] int64 (kind 0 full / 1 KIVI, key address or
// KIVI buffer, value address, slots, head stride in elements); geometry: KIVI heads, block size, bits,
// key group, value group (unused without KIVI segments). -> [B, H*G, D], the dtype of q.
// The blocks are read at the addresses in `segments`: the caller keeps them alive for the call.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& new_keys, const at::Tensor& new_values,
                        const at::Tensor& rows, const at::Tensor& segments, at::IntArrayRef geometry, double scale,
                        bool parallel) {
    TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && new_keys.dim() == 3 && new_values.sizes() == new_keys.sizes(),
                "paged_decode: q [B, H*G, D] and new keys/values [B, H, D] on the CPU");
    TORCH_CHECK(q.is_contiguous() && new_keys.is_contiguous() && new_values.is_contiguous(),
                "paged_decode: contiguous q and new keys/values");
    TORCH_CHECK(new_keys.scalar_type() == q.scalar_type() && new_values.scalar_type() == q.scalar_type(),
                "paged_decode: q and new keys/values of one dtype");
    TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 2 && rows.size(1) == 4 &&
                    rows.size(0) == q.size(0),
                "paged_decode: rows [B, 4] int64");
    TORCH_CHECK(segments.scalar_type() == at::kLong && segments.is_contiguous() && segments.dim() == 2 &&
                    segments.size(1) == 5,
                "paged_decode: segments [S, 5] int64");
    TORCH_CHECK(geometry.size() == 5, "paged_decode: geometry of 5 integers");
    int B = static_cast<int>(q.size(0)), H = static_cast<int>(new_keys.size(1)), D = static_cast<int>(q.size(2));
    TORCH_CHECK(H > 0 && q.size(1) % H == 0 && new_keys.size(0) == B && new_keys.size(2) == D,
                "paged_decode: query heads a multiple of KV heads");
    int G = static_cast<int>(q.size(1)) / H;
    int shape[5];
    for (int i = 0; i < 5; ++i) shape[i] = static_cast<int>(geometry[i]);
    at::Tensor out = at::empty_like(q);
    const int64_t* r = rows.data_ptr<int64_t>();
    const int64_t* s = segments.data_ptr<int64_t>();
    float sc = static_cast<float>(scale);
    if (q.scalar_type() == at::kFloat) {
        decode<float>(B, H, G, D, sc, q.data_ptr<float>(), new_keys.data_ptr<float>(), new_values.data_ptr<float>(),
                      r, s, shape, parallel, out.data_ptr<float>());
    } else {
        TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_decode: float32 or bfloat16");
        auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
        decode<uint16_t>(B, H, G, D, sc, bits(q), bits(new_keys), bits(new_values), r, s, shape, parallel, bits(out));
    }
    return out;
}


TORCH_LIBRARY(kvmem, m) {
    m.def(
        "paged_decode(Tensor q, Tensor new_keys, Tensor new_values, Tensor rows, Tensor segments, int[] geometry, "
        "float scale, bool parallel) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvmem, CPU, m) { m.impl("paged_decode", &paged_decode); }
