// Raw -> calibrated in one pass over the batch (SPEC section 3), for uint16 detectors.
//
// Per pixel: gain range g = gain_table[((raw >> gain_shift) & gain_bits) << 8 | config byte] (the
// detector model's own decoding, tabulated on the host: DetectorModel.gain_table; -1 invalid; the config
// byte is 0 without has_config), v = raw & data_mask, s = v - pedestal[g], out = s * scale[g]
// (scale = unit factor / gain[g]), good = mask && g valid. Bad pixels are written as 0 in `out`.
// Layout: raw/out/good (events, npix) row-major; pedestal/scale (gains, npix); mask/config_bits (npix);
// gain_table ((gain_bits + 1) * 256) int8, read through the read-only cache (at most a few kB, the few
// entries a batch meets stay in L1: no per-pixel memory traffic).
//
// Work split (all three kernels): a thread takes pixel p (grid-stride over x) and a chunk of
// EVENTS_PER_THREAD consecutive events (grid-stride over y, in chunks). It reads the pixel's mask and
// config bits once per chunk, issues the chunk's raw loads together (each one coalesced across the
// warp, several in flight per thread), and reads the per-range constants from cache after the first
// event. The launch wants grid.y = ceil(events / EVENTS_PER_THREAD) (gpusmall/calib/calibrate.py
// uses the same constant); any grid gives the same result.

#define EVENTS_PER_THREAD 8

// body(p, e0, n): pixel p of events e0 .. e0 + n - 1 (n <= EVENTS_PER_THREAD), for every (pixel, chunk)
// of this thread.
template <class Body>
__device__ __forceinline__ void for_pixel_chunks(long long npix, long long n_events, Body body)
{
    const long long pstride = (long long)gridDim.x * blockDim.x;
    const long long estride = (long long)gridDim.y * EVENTS_PER_THREAD;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += pstride) {
        for (long long e0 = (long long)blockIdx.y * EVENTS_PER_THREAD; e0 < n_events; e0 += estride) {
            const long long left = n_events - e0;
            body(p, e0, left < EVENTS_PER_THREAD ? (int)left : EVENTS_PER_THREAD);
        }
    }
}

// Decodes a chunk of one pixel: for each of its n events the gain range r[j] as the raw word and the
// pixel's config bits give it (-1: invalid bits; may be >= the number of ranges with constants) and
// v[j] = raw & data_mask. The n raw loads are issued before any is used. Returns the pixel's mask bit.
__device__ __forceinline__ bool decode_chunk(const unsigned short* __restrict__ raw,
                                             const unsigned char* __restrict__ mask,
                                             const unsigned char* __restrict__ config_bits, long long p,
                                             long long e0, int n, long long npix,
                                             const signed char* __restrict__ gain_table, int gain_shift,
                                             unsigned int gain_bits, int has_config, unsigned int data_mask,
                                             int* r, float* v)
{
    const unsigned int cbits = has_config ? config_bits[p] : 0u;
    unsigned int w[EVENTS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < EVENTS_PER_THREAD; ++j) w[j] = j < n ? raw[(e0 + j) * npix + p] : 0u;
#pragma unroll
    for (int j = 0; j < EVENTS_PER_THREAD; ++j) {
        r[j] = __ldg(&gain_table[(((w[j] >> gain_shift) & gain_bits) << 8) | cbits]);
        v[j] = (float)(w[j] & data_mask);
    }
    return mask[p] != 0;
}

extern "C" __global__ void calibrate_u16(
    const unsigned short* __restrict__ raw,
    const float* __restrict__ pedestal,
    const float* __restrict__ scale,
    const unsigned char* __restrict__ mask,
    const unsigned char* __restrict__ config_bits,
    float* __restrict__ out,
    bool* __restrict__ good,
    long long n_events,
    long long npix,
    int n_gains,
    const signed char* __restrict__ gain_table,
    int gain_shift,
    unsigned int gain_bits,
    int has_config,
    unsigned int data_mask)
{
    for_pixel_chunks(npix, n_events, [&](long long p, long long e0, int n) {
        int r[EVENTS_PER_THREAD];
        float v[EVENTS_PER_THREAD];
        const bool keep = decode_chunk(raw, mask, config_bits, p, e0, n, npix, gain_table, gain_shift, gain_bits,
                                       has_config, data_mask, r, v);
#pragma unroll
        for (int j = 0; j < EVENTS_PER_THREAD; ++j) {
            if (j < n) {
                const long long i = (e0 + j) * npix + p;
                const bool ok = keep && r[j] >= 0 && r[j] < n_gains;
                const long long k = (long long)(ok ? r[j] : 0) * npix + p;
                out[i] = ok ? __fmul_rn(__fsub_rn(v[j], pedestal[k]), scale[k]) : 0.0f;
                good[i] = ok;
            }
        }
    });
}

// First half of calibrate_u16, for detectors with a common mode: per pixel the gain range g
// (int8, -1 invalid), s = (raw & data_mask) - pedestal[g] (ADU, float32; where g is invalid the
// pedestal of the nearest range: 0 below, the last above) and good = mask && g valid.
// NumPy twin: gpusmall/calib/calibrate.py pedestal_subtract.
extern "C" __global__ void pedestal_u16(
    const unsigned short* __restrict__ raw,
    const float* __restrict__ pedestal,
    const unsigned char* __restrict__ mask,
    const unsigned char* __restrict__ config_bits,
    float* __restrict__ s,
    signed char* __restrict__ gain_index,
    bool* __restrict__ good,
    long long n_events,
    long long npix,
    int n_gains,
    const signed char* __restrict__ gain_table,
    int gain_shift,
    unsigned int gain_bits,
    int has_config,
    unsigned int data_mask)
{
    for_pixel_chunks(npix, n_events, [&](long long p, long long e0, int n) {
        int r[EVENTS_PER_THREAD];
        float v[EVENTS_PER_THREAD];
        const bool keep = decode_chunk(raw, mask, config_bits, p, e0, n, npix, gain_table, gain_shift, gain_bits,
                                       has_config, data_mask, r, v);
#pragma unroll
        for (int j = 0; j < EVENTS_PER_THREAD; ++j) {
            if (j < n) {
                const long long i = (e0 + j) * npix + p;
                const bool valid = r[j] >= 0 && r[j] < n_gains;
                const int gc = valid ? r[j] : (r[j] < 0 ? 0 : n_gains - 1);
                s[i] = __fsub_rn(v[j], pedestal[(long long)gc * npix + p]);
                gain_index[i] = (signed char)(valid ? r[j] : -1);
                good[i] = keep && valid;
            }
        }
    });
}

// Second half: out = good ? s * scale[g] : 0 (float32). NumPy twin: calibrate_reference.
extern "C" __global__ void scale_apply(
    const float* __restrict__ s,
    const signed char* __restrict__ gain_index,
    const bool* __restrict__ good,
    const float* __restrict__ scale,
    float* __restrict__ out,
    long long n_events,
    long long npix)
{
    for_pixel_chunks(npix, n_events, [&](long long p, long long e0, int n) {
#pragma unroll
        for (int j = 0; j < EVENTS_PER_THREAD; ++j) {
            if (j < n) {
                const long long i = (e0 + j) * npix + p;
                const int g = gain_index[i];
                out[i] = good[i] ? __fmul_rn(s[i], scale[(long long)(g < 0 ? 0 : g) * npix + p]) : 0.0f;
            }
        }
    });
}
