// A small CUDA execution model on the CPU, so that the kernels of kernels/*.cu run in the tests of a
// machine without a GPU (see cuda_cpu/__init__.py). Compiled with g++ -std=c++20 in front of a kernel
// source; not part of the package.
//
// Model: blocks of a launch are spread over a few OS threads; the threads of one block run as fibers
// on one OS thread, each until it reaches __syncthreads() or returns, in an order the test chooses
// (forward, reverse or shuffled per phase) so that a result depending on the order of threads inside
// a phase (a missing barrier) shows as a difference between orders. Exited threads leave the barrier
// (as on sm_70+). Dynamic shared memory is filled with 0xFF bytes (NaN floats, -1 ints) before each
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
    bool done = false;
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
    std::vector<unsigned char> shared;
#ifdef CUDACPU_USE_UCONTEXT
    ucontext_t scheduler;
#else
    void* scheduler_sp = nullptr;
#endif
};

inline void to_scheduler()
{
    Fiber* f = current;
#ifdef CUDACPU_USE_UCONTEXT
    swapcontext(&f->ctx, &block_state->scheduler);
#else
    cudacpu_switch(&f->sp, block_state->scheduler_sp);
#endif
}

inline void fiber_main()
{
    block_state->launch->body();
    current->done = true;
    to_scheduler();
    __builtin_trap();  // a finished fiber is never resumed
}

#ifdef CUDACPU_USE_UCONTEXT
inline void fiber_entry_uc() { fiber_main(); }
#endif

inline void start_fiber(Fiber& f)
{
    f.done = false;
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

inline void resume(Fiber& f)
{
    current = &f;
#ifdef CUDACPU_USE_UCONTEXT
    swapcontext(&block_state->scheduler, &f.ctx);
#else
    cudacpu_switch(&block_state->scheduler_sp, f.sp);
#endif
    current = nullptr;
}

// Runs the blocks handed out by `next`; returns false when a block overran its shared memory.
inline bool run_blocks(const Launch& L, std::atomic<long long>& next, long long n_blocks)
{
    const unsigned nt = L.block.x * L.block.y * L.block.z;
    std::vector<Fiber> fibers(L.uses_barrier ? nt : 1);
    std::vector<unsigned> order(nt);
    BlockState bs;
    bs.launch = &L;
    block_state = &bs;
    bs.shared.resize(L.shared_bytes + GUARD);
    std::mt19937 rng(L.seed);
    bool ok = true;
    for (long long b = next++; b < n_blocks; b = next++) {
        bs.bid.x = unsigned(b % L.grid.x);
        bs.bid.y = unsigned((b / L.grid.x) % L.grid.y);
        bs.bid.z = unsigned(b / ((long long)L.grid.x * L.grid.y));
        std::fill(bs.shared.begin(), bs.shared.end(), 0xFF);
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
                start_fiber(f);
                order[t] = t;
            }
            for (unsigned live = nt; live > 0;) {  // one phase: every live fiber runs to its next barrier
                if (L.order == 1) std::reverse(order.begin(), order.end());
                if (L.order == 2) std::shuffle(order.begin(), order.end(), rng);
                live = 0;
                for (unsigned t : order) {
                    Fiber& f = fibers[t];
                    if (f.done) continue;
                    resume(f);
                    if (!f.done) ++live;
                }
                if (L.order == 1) std::reverse(order.begin(), order.end());
            }
        }
        for (size_t k = 0; k < GUARD; ++k)
            if (bs.shared[L.shared_bytes + k] != 0xFF) ok = false;
    }
    block_state = nullptr;
    return ok;
}

// 0: done; 1: a block wrote past its dynamic shared memory
inline int launch(Launch& L, int workers)
{
    const long long n_blocks = (long long)L.grid.x * L.grid.y * L.grid.z;
    std::atomic<long long> next{0};
    workers = int(std::max(1LL, std::min<long long>(workers, n_blocks)));
    std::atomic<bool> ok{true};
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) {
        Launch* lp = &L;
        pool.emplace_back([lp, &next, n_blocks, &ok, w] {
            Launch mine = *lp;
            mine.seed = lp->seed + 7919u * unsigned(w);
            if (!run_blocks(mine, next, n_blocks)) ok = false;
        });
    }
    if (!run_blocks(L, next, n_blocks)) ok = false;
    for (auto& t : pool) t.join();
    return ok ? 0 : 1;
}

inline void* dynamic_shared() { return block_state->shared.data(); }

template <class T>
inline T atomic_add(T* p, T v)
{
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
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

inline void __syncthreads() { cudacpu::to_scheduler(); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline int atomicAdd(int* p, int v) { return cudacpu::atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return cudacpu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return cudacpu::atomic_add(p, v); }
inline float atomicAdd(float* p, float v) { return cudacpu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return cudacpu::atomic_add(p, v); }

