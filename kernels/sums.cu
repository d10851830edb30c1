// Run sums of a batch (SPEC 6 `sums`): every sum of a detector in one read of the calibrated batch.
// NumPy twin: gpusmall.funcs.sums.run_sums_numpy. One thread per pixel walks the batch's events.
//   data   (events, npix) float32, calibrated values (bad pixels are 0)
//   keep   (events,) bool, the events that enter the sums (damaged ones do not)
//   kinds  (n_sums,) int32: 0 calib (sum of v), 1 square (sum of v*v in double), 2 max,
//          3 nhits (count of v >= thres), 4 nhits without a threshold (count of v > thres, thres = 0)
//   thres  (n_sums,) float32: calib/square/max take v where v >= thres (else 0); -inf: no threshold, every
//          v, NaN as well (a NaN makes the sum NaN, and the max: NumPy's maximum over events and batches)
//   acc    (n_sums, npix) float64, updated in place: added to, or for max the maximum taken
// n_sums <= MAX_SUMS (the caller launches once per group of MAX_SUMS sums).
#define MAX_SUMS 8

extern "C" __global__ void run_sums(const float* __restrict__ data, const bool* __restrict__ keep,
                                    long long events, long long npix, int n_sums,
                                    const int* __restrict__ kinds, const float* __restrict__ thres,
                                    double* __restrict__ acc)
{
    int kind[MAX_SUMS];
    float t[MAX_SUMS];
#pragma unroll
    for (int k = 0; k < MAX_SUMS; ++k) {
        kind[k] = k < n_sums ? kinds[k] : -1;
        t[k] = k < n_sums ? thres[k] : 0.0f;
    }
    const float no_thres = -__int_as_float(0x7f800000);  // -inf: the sum has no threshold
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += stride) {
        double a[MAX_SUMS];
#pragma unroll
        for (int k = 0; k < MAX_SUMS; ++k) a[k] = kind[k] == 2 ? -__longlong_as_double(0x7ff0000000000000LL) : 0.0;
        for (long long e = 0; e < events; ++e) {
            if (!keep[e]) continue;
            const float v = data[e * npix + p];
            const double d = (double)v;
#pragma unroll
            for (int k = 0; k < MAX_SUMS; ++k) {
                const double x = (v >= t[k] || t[k] == no_thres) ? d : 0.0;  // no threshold: NaN stays
                if (kind[k] == 0) a[k] += x;
                else if (kind[k] == 1) a[k] += x * x;
                else if (kind[k] == 2) a[k] = (x > a[k] || x != x) ? x : a[k];  // np.maximum: NaN wins
                else if (kind[k] == 3) a[k] += v >= t[k] ? 1.0 : 0.0;
                else if (kind[k] == 4) a[k] += v > t[k] ? 1.0 : 0.0;
            }
        }
        for (int k = 0; k < n_sums && k < MAX_SUMS; ++k) {
            double* out = acc + (long long)k * npix + p;
            *out = kind[k] == 2 ? ((a[k] > *out || a[k] != a[k]) ? a[k] : *out) : *out + a[k];
        }
    }
}

// Cube sums of a batch (SPEC 10 `cube`): each event's calibrated frame added to its bin's row.
// NumPy twin: gpusmall.producer.cube.cube_add_numpy. One thread per pixel walks the batch's events in order;
// consecutive events of the same row are summed in a register and added once.
//   data   (events, npix) float32, calibrated values
//   rows   (splits, events) int32: the accumulator row of each event in each split, -1 = not in the cube
//   sum    (n_rows, npix) float64, sq (n_rows, npix) float64 (with_square), updated in place
extern "C" __global__ void cube_add(const float* __restrict__ data, const int* __restrict__ rows,
                                    long long events, int splits, long long npix,
                                    double* __restrict__ sum, double* __restrict__ sq, int with_square)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += stride) {
        for (int s = 0; s < splits; ++s) {
            int row = -1;
            double a = 0.0, a2 = 0.0;
            for (long long e = 0; e < events; ++e) {
                const int r = rows[(long long)s * events + e];
                if (r != row) {
                    if (row >= 0) {
                        sum[(long long)row * npix + p] += a;
                        if (with_square) sq[(long long)row * npix + p] += a2;
                    }
                    row = r;
                    a = 0.0;
                    a2 = 0.0;
                }
                if (r >= 0) {
                    const double v = (double)data[e * npix + p];
                    a += v;
                    a2 += v * v;
                }
            }
            if (row >= 0) {
                sum[(long long)row * npix + p] += a;
                if (with_square) sq[(long long)row * npix + p] += a2;
            }
        }
    }
}
