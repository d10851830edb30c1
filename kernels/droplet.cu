// Droplet pixels of a batch (gpusmall.funcs.droplet, steps 1 and 3 before labelling) in one pass:
// a seed is a good pixel with v >= thr; with grow, a good pixel with v >= thr_low that is not a seed
// joins when one of its 4 neighbours in the same panel is a seed. With use_rms both thresholds are
// factors of the pixel's noise (thr = noise * threshold, rounded to float32 as NumPy does).
// NumPy twin: gpusmall.funcs.droplet.droplet_mask. One thread per (frame, row, col), grid-stride.
//   data   (n = frames * rows * cols) float32, frames = events * panels, calibrated values
//   good   (n) bool, False = bad pixel in that event
//   noise  (npix = panels * rows * cols) float32 ADU rms; read only with use_rms
//   mask   (n) bool, out
__device__ __forceinline__ float pixel_threshold(const float* __restrict__ noise, long long pix, float factor,
                                                 int use_rms)
{
    return use_rms ? __fmul_rn(noise[pix], factor) : factor;
}

__device__ __forceinline__ bool is_seed(const float* __restrict__ data, const bool* __restrict__ good,
                                        const float* __restrict__ noise, long long i, long long pix,
                                        float threshold, int use_rms)
{
    return good[i] && data[i] >= pixel_threshold(noise, pix, threshold, use_rms);
}

extern "C" __global__ void droplet_mask(const float* __restrict__ data, const bool* __restrict__ good,
                                        const float* __restrict__ noise, float threshold, float threshold_low,
                                        int use_rms, long long n, int rows, int cols, long long npix, int grow,
                                        bool* __restrict__ mask)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long pix = i % npix;
        bool m = is_seed(data, good, noise, i, pix, threshold, use_rms);
        if (!m && grow && good[i] && data[i] >= pixel_threshold(noise, pix, threshold_low, use_rms)) {
            const int c = (int)(i % cols);
            const int r = (int)((i / cols) % rows);
            m = (r > 0 && is_seed(data, good, noise, i - cols, pix - cols, threshold, use_rms)) ||
                (r + 1 < rows && is_seed(data, good, noise, i + cols, pix + cols, threshold, use_rms)) ||
                (c > 0 && is_seed(data, good, noise, i - 1, pix - 1, threshold, use_rms)) ||
                (c + 1 < cols && is_seed(data, good, noise, i + 1, pix + 1, threshold, use_rms));
        }
        mask[i] = m;
    }
}
