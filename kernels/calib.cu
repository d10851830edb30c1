// Raw -> calibrated in one pass over the batch (SPEC section 3), for uint16 detectors.
//
// Per pixel: gain range g from the raw word (family: 0 single range, 1 ePix10ka, 2 JUNGFRAU),
// v = raw & data_mask, s = v - pedestal[g], out = s * scale[g] (scale = unit factor / gain[g]),
// good = mask && g valid. Bad pixels are written as 0 in `out`.
// Layout: raw/out/good (events, npix) row-major; pedestal/scale (gains, npix); mask/config_bits (npix).
// Each thread handles pixels of several events, so constants are read once per pixel per block.

#define FAMILY_SINGLE 0
#define FAMILY_EPIX10KA 1
#define FAMILY_JUNGFRAU 2

__device__ __forceinline__ int epix10ka_range(unsigned int c, unsigned int d)
{
    const unsigned int b = c | (d << 5);
    if ((b & 28u) == 28u) return 0;  // FH
    if ((b & 28u) == 12u) return 1;  // FM
    if ((b & 12u) == 8u) return 2;   // FL
    if ((b & 60u) == 16u) return 3;  // AHL-H
    if ((b & 60u) == 0u) return 4;   // AML-M
    if ((b & 60u) == 48u) return 5;  // AHL-L
    if ((b & 60u) == 32u) return 6;  // AML-L
    return -1;
}

__device__ __forceinline__ int gain_range(int family, unsigned int raw, int has_config, unsigned int cbits)
{
    if (family == FAMILY_EPIX10KA) {
        const unsigned int d = (raw >> 14) & 1u;
        if (!has_config) return d ? 5 : 3;
        return epix10ka_range(cbits, d);
    }
    if (family == FAMILY_JUNGFRAU) {
        const unsigned int bits = (raw >> 14) & 3u;
        return bits == 0u ? 0 : (bits == 1u ? 1 : (bits == 3u ? 2 : -1));
    }
    return 0;
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
    int family,
    int has_config,
    unsigned int data_mask)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += stride) {
        const bool keep = mask[p] != 0;
        const unsigned int cb = has_config ? config_bits[p] : 0u;
        for (long long e = blockIdx.y; e < n_events; e += gridDim.y) {
            const long long i = e * npix + p;
            const unsigned int w = raw[i];
            const int g = gain_range(family, w, has_config, cb);
            const bool ok = keep && g >= 0 && g < n_gains;
            float value = 0.0f;
            if (ok) {
                const long long k = (long long)g * npix + p;
                const float v = (float)(w & data_mask);
                value = (v - pedestal[k]) * scale[k];
            }
            out[i] = value;
            good[i] = ok;
        }
    }
}

// First half of calibrate_u16, for detectors with a common mode: per pixel the gain range g
// (int8, -1 invalid), s = (raw & data_mask) - pedestal[g] (ADU, float32, 0 where g is invalid) and
// good = mask && g valid. NumPy twin: gpusmall/calib/calibrate.py pedestal_subtract.
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
    int family,
    int has_config,
    unsigned int data_mask)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += stride) {
        const bool keep = mask[p] != 0;
        const unsigned int cb = has_config ? config_bits[p] : 0u;
        for (long long e = blockIdx.y; e < n_events; e += gridDim.y) {
            const long long i = e * npix + p;
            const unsigned int w = raw[i];
            const int g = gain_range(family, w, has_config, cb);
            const bool valid = g >= 0 && g < n_gains;
            const int gc = valid ? g : (g < 0 ? 0 : n_gains - 1);
            const float v = (float)(w & data_mask);
            s[i] = __fsub_rn(v, pedestal[(long long)gc * npix + p]);
            gain_index[i] = (signed char)(valid ? g : -1);
            good[i] = keep && valid;
        }
    }
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
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += stride) {
        for (long long e = blockIdx.y; e < n_events; e += gridDim.y) {
            const long long i = e * npix + p;
            const int g = gain_index[i];
            out[i] = good[i] ? __fmul_rn(s[i], scale[(long long)(g < 0 ? 0 : g) * npix + p]) : 0.0f;
        }
    }
}
