// 4-connected labelling of the labelled pixels of a batch, on the compact list of their flat indices
// (gpusmall.funcs.droplet.label_pixels; NumPy twin: scipy.ndimage.label of the whole mask, read at the
// same pixels). Union-find over positions in that list: the root of a droplet is its smallest position,
// i.e. its first pixel in row-major order of the batch, so numbering the roots in order numbers the
// droplets as scipy does. No frame-sized array is read or written.
//   idx     (m,) int64, sorted flat indices into (frames, rows, cols), frames = events * panels
//   parent  (m,) int32, starts as 0..m-1; label_union links, label_flatten leaves every entry at its root
// A pixel joins its left and upper neighbours (same frame) when they are labelled: the left one is at
// position k-1 when idx[k-1] == idx[k]-1; the upper one, idx[k]-cols, lies within the cols positions
// before k (idx is sorted and unique), found by binary search.

__device__ __forceinline__ int find_root(int* parent, int k)
{
    int p = *(volatile int*)(parent + k);
    while (p != k) {
        k = p;
        p = *(volatile int*)(parent + k);
    }
    return k;
}

// Joins the sets of positions a and b; the smaller root becomes the parent (so roots are minima).
__device__ __forceinline__ void unite(int* parent, int a, int b)
{
    while (true) {
        a = find_root(parent, a);
        b = find_root(parent, b);
        if (a == b) return;
        if (a < b) {
            const int old = atomicCAS(parent + b, b, a);
            if (old == b) return;
            b = old;
        } else {
            const int old = atomicCAS(parent + a, a, b);
            if (old == a) return;
            a = old;
        }
    }
}

extern "C" __global__ void label_union(const long long* __restrict__ idx, int* parent, long long m, int rows,
                                       int cols)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < m; k += stride) {
        const long long q = idx[k];
        const int c = (int)(q % cols);
        const int r = (int)((q / cols) % rows);
        if (c > 0 && k > 0 && idx[k - 1] == q - 1) unite(parent, (int)k, (int)(k - 1));
        if (r > 0) {
            const long long want = q - cols;
            long long lo = k > cols ? k - cols : 0, hi = k;  // search [lo, hi)
            while (lo < hi) {
                const long long mid = (lo + hi) / 2;
                if (idx[mid] < want) lo = mid + 1;
                else hi = mid;
            }
            if (lo < k && idx[lo] == want) unite(parent, (int)k, (int)lo);
        }
    }
}

extern "C" __global__ void label_flatten(int* parent, long long m)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < m; k += stride)
        parent[k] = find_root(parent, (int)k);
}
