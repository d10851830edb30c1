// Azimuthal integration by atomic histogramming: one thread per (event, pixel).
// NumPy twin: gpusmall.funcs.azav.histogram_numpy.
//   data  (events, pixels) float32, calibrated values (thresholds already applied)
//   good  (events, pixels) bool, False = bad pixel in that event
//   bin   (pixels,) int32, combined (phi, radial) bin, -1 = outside every bin
//   c     (pixels,) float32, polarization * solid angle
//   num, den (events, nbins) float64; cnt (events, nbins) int32; all zeroed by the caller
extern "C" __global__ void azav_histogram(const float* __restrict__ data, const bool* __restrict__ good,
                                          const int* __restrict__ bin, const float* __restrict__ c,
                                          long long events, long long pixels, int nbins,
                                          double* num, double* den, int* cnt)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= events * pixels) return;
    long long e = i / pixels;
    long long p = i - e * pixels;
    int b = bin[p];
    if (b < 0 || !good[i]) return;
    long long o = e * nbins + b;
    atomicAdd(num + o, (double)data[i]);
    atomicAdd(den + o, (double)c[p]);
    atomicAdd(cnt + o, 1);
}
