// A small CUDA execution model on the CPU, so that the kernels of kernels/*.cu run in the tests of a
// machine without a GPU (see cuda_cpu/__init__.py). Compiled with g++ -std=c++20 in front of a kernel
// source; not part of the package.
//
// Model: blocks of a launch are spread over a few OS threads; the threads of one block run as fibers
// on one OS thread. Warp after warp, each thread runs until it reaches a barrier it may not pass yet
// or returns; warps and the threads inside a warp go in an order the test chooses (forward, reverse or
// shuffled per round), so that a result depending on the order of threads between two barriers (a
// missing or too weak barrier) shows as a difference between orders. Barriers are
// counted per thread: a thread passes its n-th __syncthreads() once every live thread of the block
// has reached its n-th, and its n-th __syncwarp() once every live thread of its warp (32 consecutive
// threads) has reached its n-th __syncwarp(); other warps go on meanwhile. Exited threads leave the
// barriers (as on sm_70+). A round in which no thread can move is a deadlock (divergent barriers):
// the launch fails. Dynamic shared memory is filled with 0xFF bytes (NaN floats, -1 ints) before each
// block, so reading it before writing shows, and is followed by guard bytes checked after the block.
// Global atomics are real atomics (blocks run in parallel). Float arithmetic is IEEE single/double
// without contraction (-ffp-contract=off): the __f*_rn intrinsics are the plain operators.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>
#if !defined(__x86_64__) || defined(CUDACPU_UCONTEXT)
#include <ucontext.h>
#define CUDACPU_USE_UCONTEXT 1
#endif

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace cudacpu {

struct Fiber;
struct BlockState;

// per OS thread: the fiber running now and the block it belongs to
inline thread_local Fiber* current = nullptr;
inline thread_local BlockState* block_state = nullptr;

struct Launch {
    dim3 grid, block;
    size_t shared_bytes = 0;
    int order = 0;          // 0 forward, 1 reverse, 2 shuffled per phase
    unsigned seed = 1;
    bool uses_barrier = true;
    std::function<void()> body;
};

constexpr size_t GUARD = 64;
constexpr size_t STACK = 64 * 1024;

#ifndef CUDACPU_USE_UCONTEXT
// Callee-saved registers on the stack, then swap stack pointers (System V x86-64).
extern "C" void cudacpu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl cudacpu_switch
    .hidden cudacpu_switch
    .type cudacpu_switch,@function
cudacpu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cudacpu_switch,.-cudacpu_switch
)");
#endif

struct Fiber {
    dim3 tid;
    BlockState* block = nullptr;   // the block it runs in (block_state, without a thread_local look-up)
    bool done = false;
    int waiting = 0;               // 0 running / not started, 1 at __syncthreads, 2 at __syncwarp
    unsigned long long block_arrivals = 0, warp_arrivals = 0;
    std::vector<unsigned char> stack;
#ifdef CUDACPU_USE_UCONTEXT
    ucontext_t ctx;
#else
    void* sp = nullptr;
#endif
};

struct BlockState {
    const Launch* launch = nullptr;
    dim3 bid;
    unsigned n_threads = 0;
    // reached[n]: threads that reached their n-th __syncthreads; done_at[a]: threads that returned
    // after a of them (so a thread may pass barrier n when reached[n] + done below n == n_threads)
    std::vector<unsigned> reached, done_at;
    std::vector<unsigned char> shared;
    std::vector<unsigned long long> lanes;  // one slot per thread: what warp shuffles and votes exchange
#ifdef CUDACPU_USE_UCONTEXT
    ucontext_t scheduler;
#else
    void* scheduler_sp = nullptr;
#endif
};

inline void to_scheduler(Fiber* f)
{
#ifdef CUDACPU_USE_UCONTEXT
    swapcontext(&f->ctx, &f->block->scheduler);
#else
    cudacpu_switch(&f->sp, f->block->scheduler_sp);
#endif
}

inline void count(std::vector<unsigned>& v, unsigned long long i)
{
    if (v.size() <= i) v.resize(i + 1, 0);
    ++v[i];
}

inline void fiber_main()
{
    block_state->launch->body();
    Fiber* f = current;
    f->done = true;
    count(f->block->done_at, f->block_arrivals);
    to_scheduler(f);
    __builtin_trap();  // a finished fiber is never resumed
}

#ifdef CUDACPU_USE_UCONTEXT
inline void fiber_entry_uc() { fiber_main(); }
#endif

inline void start_fiber(Fiber& f)
{
    f.done = false;
    f.waiting = 0;
    f.block_arrivals = f.warp_arrivals = 0;
    if (f.stack.empty()) f.stack.resize(STACK);
#ifdef CUDACPU_USE_UCONTEXT
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry_uc, 0);
#else
    // top of stack, 16-byte aligned; fiber_main is entered by `ret` as if called (rsp = 8 mod 16)
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack.data()) + f.stack.size()) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 16);
    *sp = reinterpret_cast<void*>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    f.sp = sp;
#endif
}

// `cur` is this OS thread's `current` (looked up once by the caller)
inline void resume(Fiber& f, Fiber*& cur)
{
    cur = &f;
#ifdef CUDACPU_USE_UCONTEXT
    swapcontext(&f.block->scheduler, &f.ctx);
#else
    cudacpu_switch(&f.block->scheduler_sp, f.sp);
#endif
    cur = nullptr;
}

// Puts v in the launch's order: 0 as it is (ascending), 1 reversed, 2 shuffled.
inline void arrange(std::vector<unsigned>& v, int order, std::mt19937& rng)
{
    std::sort(v.begin(), v.end());
    if (order == 1) std::reverse(v.begin(), v.end());
    if (order == 2) std::shuffle(v.begin(), v.end(), rng);
}

// Whether fiber t may go past the barrier it waits at (see the model at the top). warp_low[w] is a lower
// bound of the __syncwarp() count of the live threads of warp w (counts only grow, exited threads leave):
// a thread at its n-th __syncwarp with n <= warp_low[w] may pass without a look at its warp.
inline bool may_pass(const BlockState& b, const std::vector<Fiber>& fibers, std::vector<unsigned long long>& warp_low,
                     unsigned t)
{
    const Fiber& f = fibers[t];
    if (f.waiting == 1) {
        const unsigned long long n = f.block_arrivals;
        unsigned there = n < b.reached.size() ? b.reached[n] : 0;
        for (unsigned long long a = 0; a < n && a < b.done_at.size(); ++a) there += b.done_at[a];
        return there == b.n_threads;
    } else if (f.waiting == 2) {
        unsigned long long& low = warp_low[t / 32];
        if (f.warp_arrivals <= low) return true;
        const unsigned w0 = t / 32 * 32, w1 = std::min<unsigned>(w0 + 32, (unsigned)fibers.size());
        unsigned long long least = ~0ULL;
        for (unsigned k = w0; k < w1; ++k)
            if (!fibers[k].done) least = std::min(least, fibers[k].warp_arrivals);
        low = least;
        return f.warp_arrivals <= low;
    }
    return true;
}

// Runs the blocks handed out by `next`; 0 done, 1 a block overran its shared memory, 2 a deadlock.
inline int run_blocks(const Launch& L, std::atomic<long long>& next, long long n_blocks)
{
    const unsigned nt = L.block.x * L.block.y * L.block.z;
    std::vector<Fiber> fibers(L.uses_barrier ? nt : 1);
    BlockState bs;
    bs.launch = &L;
    block_state = &bs;
    bs.shared.resize(L.shared_bytes + GUARD);
    bs.lanes.assign(nt, 0);
    std::mt19937 rng(L.seed);
    Fiber*& cur = current;
    bool ok = true, deadlock = false;
    for (long long b = next++; b < n_blocks && !deadlock; b = next++) {
        bs.bid.x = unsigned(b % L.grid.x);
        bs.bid.y = unsigned((b / L.grid.x) % L.grid.y);
        bs.bid.z = unsigned(b / ((long long)L.grid.x * L.grid.y));
        std::fill(bs.shared.begin(), bs.shared.end(), 0xFF);
        bs.n_threads = nt;
        bs.reached.assign(1, 0);
        bs.done_at.assign(1, 0);
        if (!L.uses_barrier) {  // no __syncthreads in the kernel: threads run one after another
            Fiber& f = fibers[0];
            current = &f;
            for (unsigned t = 0; t < nt; ++t) {
                f.tid.x = t % L.block.x;
                f.tid.y = (t / L.block.x) % L.block.y;
                f.tid.z = t / (L.block.x * L.block.y);
                L.body();
            }
            current = nullptr;
        } else {
            for (unsigned t = 0; t < nt; ++t) {
                Fiber& f = fibers[t];
                f.tid.x = t % L.block.x;
                f.tid.y = (t / L.block.x) % L.block.y;
                f.tid.z = t / (L.block.x * L.block.y);
                f.block = &bs;
                start_fiber(f);
            }
            // One round: warp after warp (in the chosen order), each as far as its threads can go, i.e.
            // to a __syncthreads that others have not reached yet, or to the end; warps drift apart as
            // far as the barriers let them, so a __syncwarp standing in for a __syncthreads shows.
            const unsigned n_warps = (nt + 31) / 32;
            std::vector<unsigned> warps(n_warps), lanes;
            std::vector<unsigned long long> warp_low(n_warps, 0);
            for (unsigned w = 0; w < n_warps; ++w) warps[w] = w;
            for (bool live = true; live;) {
                arrange(warps, L.order, rng);
                bool moved = false;
                live = false;
                for (unsigned w : warps) {
                    lanes.clear();
                    for (unsigned t = w * 32; t < std::min(nt, w * 32 + 32); ++t) lanes.push_back(t);
                    arrange(lanes, L.order, rng);
                    for (bool again = true; again;) {
                        again = false;
                        for (unsigned t : lanes) {
                            Fiber& f = fibers[t];
                            if (!f.done && may_pass(bs, fibers, warp_low, t)) {
                                resume(f, cur);
                                moved = again = true;
                            }
                        }
                    }
                    for (unsigned t : lanes) live = live || !fibers[t].done;
                }
                if (live && !moved) {
                    deadlock = true;
                    break;
                }
            }
        }
        for (size_t k = 0; k < GUARD; ++k)
            if (bs.shared[L.shared_bytes + k] != 0xFF) ok = false;
    }
    block_state = nullptr;
    return deadlock ? 2 : (ok ? 0 : 1);
}

// 0: done; 1: a block wrote past its dynamic shared memory; 2: a block deadlocked at its barriers
inline int launch(Launch& L, int workers)
{
    const long long n_blocks = (long long)L.grid.x * L.grid.y * L.grid.z;
    std::atomic<long long> next{0};
    workers = int(std::max(1LL, std::min<long long>(workers, n_blocks)));
    std::atomic<int> rc{0};
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) {
        Launch* lp = &L;
        pool.emplace_back([lp, &next, n_blocks, &rc, w] {
            Launch mine = *lp;
            mine.seed = lp->seed + 7919u * unsigned(w);
            const int r = run_blocks(mine, next, n_blocks);
            if (r > rc) rc = r;
        });
    }
    const int r = run_blocks(L, next, n_blocks);
    if (r > rc) rc = r;
    for (auto& t : pool) t.join();
    return rc;
}

inline void* dynamic_shared() { return block_state->shared.data(); }

template <class T>
inline T atomic_add(T* p, T v)
{
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}

template <class T>
inline T atomic_cas(T* p, T compare, T val)  // the old value, as CUDA's atomicCAS
{
    std::atomic_ref<T>(*p).compare_exchange_strong(compare, val, std::memory_order_seq_cst);
    return compare;
}

}  // namespace cudacpu

// ---- what kernels see ----------------------------------------------------------------------------------
#define threadIdx (cudacpu::current->tid)
#define blockIdx (cudacpu::block_state->bid)
#define blockDim (cudacpu::block_state->launch->block)
#define gridDim (cudacpu::block_state->launch->grid)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

inline void __syncthreads()
{
    cudacpu::Fiber* f = cudacpu::current;
    f->waiting = 1;
    cudacpu::count(f->block->reached, ++f->block_arrivals);
    cudacpu::to_scheduler(f);
    f->waiting = 0;
}
namespace cudacpu {
inline void syncwarp(Fiber* f)
{
    f->waiting = 2;
    ++f->warp_arrivals;
    to_scheduler(f);
    f->waiting = 0;
}
}  // namespace cudacpu
inline void __syncwarp(unsigned int = 0xffffffffu)  // the full warp only (no partial masks here)
{
    cudacpu::syncwarp(cudacpu::current);
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
template <class T> inline T __ldg(const T* p) { return *p; }  // the read-only cache: a plain load
inline double __dadd_rn(double a, double b) { return a + b; }
// Warp shuffles and votes (full warps only, as the kernels use them): each lane puts its value in its
// slot, the warp meets (a __syncwarp), each lane reads its source lane's slot, and the warp meets again
// before a slot is reused. A lane outside the warp reads its own value, as CUDA does.
namespace cudacpu {
inline unsigned linear_tid(const Fiber* f)
{
    const dim3& t = f->tid;
    const dim3& b = f->block->launch->block;
    return t.x + b.x * (t.y + b.y * t.z);
}

template <class T>
inline T shuffle_from(T v, int (*source)(int lane, int arg), int arg)
{
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
    Fiber* f = current;
    BlockState* bs = f->block;
    const unsigned me = linear_tid(f), base = me / 32 * 32, lane = me % 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bs->lanes[me] = bits;
    syncwarp(f);
    const int src = source(int(lane), arg);
    T r = v;
    if (src >= 0 && src < 32 && base + src < bs->n_threads)
        std::memcpy(&r, &bs->lanes[base + src], sizeof(T));
    syncwarp(f);
    return r;
}
inline int lane_xor(int lane, int m) { return lane ^ m; }
inline int lane_is(int, int src) { return src; }
}  // namespace cudacpu

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) { return cudacpu::shuffle_from(v, cudacpu::lane_xor, lane_mask); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane) { return cudacpu::shuffle_from(v, cudacpu::lane_is, src_lane & 31); }
inline unsigned __ballot_sync(unsigned, int predicate)
{
    cudacpu::Fiber* f = cudacpu::current;
    cudacpu::BlockState* bs = f->block;
    const unsigned me = cudacpu::linear_tid(f), base = me / 32 * 32;
    bs->lanes[me] = predicate != 0;
    cudacpu::syncwarp(f);
    unsigned bits = 0;
    for (unsigned k = 0; k < 32 && base + k < bs->n_threads; ++k)
        if (bs->lanes[base + k]) bits |= 1u << k;
    cudacpu::syncwarp(f);
    return bits;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline int atomicAdd(int* p, int v) { return cudacpu::atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return cudacpu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return cudacpu::atomic_add(p, v); }
inline float atomicAdd(float* p, float v) { return cudacpu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return cudacpu::atomic_add(p, v); }
inline int atomicCAS(int* p, int compare, int val) { return cudacpu::atomic_cas(p, compare, val); }
inline unsigned int atomicCAS(unsigned int* p, unsigned int compare, unsigned int val)
{
    return cudacpu::atomic_cas(p, compare, val);
}

