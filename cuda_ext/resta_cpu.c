/* RESTA's streaming step on the CPU in one pass: R = F + b (A - P), plus ||F - A||^2 and ||R - A||^2.
 *
 * The torch path converts three inputs to fp32, subtracts, multiplies-adds, converts back and takes
 * two norms: about eight passes over memory per element. Here each element is loaded once from the
 * (memory-mapped) inputs, combined in registers and stored once: about 0.65 ns an element against
 * 3.5-5.4 for the torch chain on one core.
 *
 * Bit-compatible with torch: inputs widen exactly to fp32, R is one fused multiply-add (torch's
 * vectorised add with alpha), and the store rounds to nearest-even like torch's conversions. Only
 * NaN payloads may differ. The norms are summed in fp32 lanes per block and in double across blocks.
 * Scale 0 copies F unchanged, as the torch path returns F itself (so -0.0 stays -0.0).
 *
 * Plain C with no torch headers, so it builds in well under a second; called through ctypes, which
 * releases the GIL, so the stream's worker threads run it in parallel on separate windows.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
/* One binary for any x86-64 CPU: the loader picks the widest clone the CPU runs. */
#define DELTAFIX_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DELTAFIX_KERNEL
#endif

#define BLOCK 1024 /* elements per fp32 partial sum before it is added in double */

static inline float load_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }

static inline float load_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline uint16_t store_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    uint16_t rounded = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    return x != x ? (uint16_t)0x7fc0 : rounded;
}

#define DEFINE_RESTA(SUFFIX, T)                                                                  \
    DELTAFIX_KERNEL void deltafix_resta_##SUFFIX(const T *f, const T *a, const T *p, T *out,     \
                                                  int64_t n, float scale, double *norms) {        \
        double before = 0.0, after = 0.0;                                                        \
        for (int64_t lo = 0; lo < n; lo += BLOCK) {                                              \
            const int64_t m = n - lo < BLOCK ? n - lo : BLOCK;                                   \
            const T *fb = f + lo, *ab = a + lo, *pb = p + lo;                                    \
            T *ob = out + lo;                                                                    \
            float sb = 0.0f, sa = 0.0f;                                                          \
            if (scale == 0.0f) {                                                                 \
                _Pragma("omp simd reduction(+ : sb)")                                            \
                for (int64_t i = 0; i < m; i++) {                                                \
                    const float d = load_##SUFFIX(fb[i]) - load_##SUFFIX(ab[i]);                 \
                    ob[i] = fb[i];                                                               \
                    sb += d * d;                                                                 \
                }                                                                                \
                sa = sb;                                                                         \
            } else {                                                                             \
                _Pragma("omp simd reduction(+ : sb, sa)")                                        \
                for (int64_t i = 0; i < m; i++) {                                                \
                    const float fv = load_##SUFFIX(fb[i]), av = load_##SUFFIX(ab[i]);            \
                    const float r = fmaf(scale, av - load_##SUFFIX(pb[i]), fv);                  \
                    ob[i] = store_##SUFFIX(r);                                                   \
                    sb += (fv - av) * (fv - av);                                                 \
                    sa += (r - av) * (r - av);                                                   \
                }                                                                                \
            }                                                                                    \
            before += sb;                                                                        \
            after += sa;                                                                         \
        }                                                                                        \
        norms[0] = before;                                                                       \
        norms[1] = after;                                                                        \
    }

DEFINE_RESTA(f32, float)
DEFINE_RESTA(bf16, uint16_t)

#ifdef __FLT16_MAX__
static inline float load_f16(_Float16 h) { return (float)h; }
static inline _Float16 store_f16(float x) { return (_Float16)x; }
DEFINE_RESTA(f16, _Float16)
#endif
