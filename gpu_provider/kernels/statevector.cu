// Statevector kernels for gpu_provider, compiled at run time by NVRTC through
// cupy.RawModule (see gpu_provider/engine/kernels.py, which names every
// template instance). The source includes no headers: NVRTC's built-ins
// (float2/double2, __shfl_down_sync, __ldg) are all it needs, so it compiles
// the same with or without a CUDA toolkit on the machine.
//
// Conventions shared by every kernel:
// - The state is a flat array of 2^n amplitudes, float2 (complex64) or
//   double2 (complex128): .x real, .y imaginary. Indices are 64-bit.
// - A "bit" is a physical bit position of the flat index (0 = least significant).
// - Target lists travel packed, 6 bits per entry (entry j in bits 6j..6j+5), so a
//   launch needs no device array for them.
// - Every loop over the state is grid-stride: the host sizes the grid to what
//   the device keeps resident, and each block loads its small operands
//   (matrix, diagonal) into shared memory once.

typedef unsigned long long index_t;

template <typename R> struct complex_of;
template <> struct complex_of<float> { typedef float2 type; };
template <> struct complex_of<double> { typedef double2 type; };

template <typename R>
__device__ __forceinline__ typename complex_of<R>::type make_complex(R re, R im) {
    typename complex_of<R>::type z;
    z.x = re;
    z.y = im;
    return z;
}

__device__ __forceinline__ int unpack6(index_t packed, int j) {
    return (int)((packed >> (6 * j)) & 63u);
}

// x with a zero bit inserted at position p (bits >= p move up by one).
__device__ __forceinline__ index_t insert_zero_bit(index_t x, int p) {
    index_t low = x & ((1ull << p) - 1ull);
    return ((x >> p) << (p + 1)) | low;
}

__device__ __forceinline__ int insert_zero_bit32(int x, int p) {
    int low = x & ((1 << p) - 1);
    return ((x >> p) << (p + 1)) | low;
}

// start ^ (mask[j] for each bit j set in c): a group member's index or slot.
// With c a compile-time constant (unrolled loops) it folds to a few XORs.
template <typename I, int K>
__device__ __forceinline__ I combine(int c, const I* mask, I start) {
    I out = start;
#pragma unroll
    for (int j = 0; j < K; ++j)
        if ((c >> j) & 1) out ^= mask[j];
    return out;
}

// Output rows unrolled per group: all of them for small matrices; for wide
// ones only the columns are, since unrolling D x D complex MACs spills.
template <int K>
__host__ __device__ constexpr int row_unroll() { return K <= 2 ? (1 << K) : 1; }

// out = sum_c m[row * D + c] * v[c], the row of a dense matrix-vector product.
template <typename R, int D>
__device__ __forceinline__ typename complex_of<R>::type matrix_row(
        const typename complex_of<R>::type* m, const typename complex_of<R>::type* v, int row) {
    // Four independent accumulators: twice the FMA chains of a plain (re, im) pair.
    R re_xx = 0, re_yy = 0, im_xy = 0, im_yx = 0;
#pragma unroll
    for (int c = 0; c < D; ++c) {
        typename complex_of<R>::type a = m[row * D + c];
        re_xx = fma(a.x, v[c].x, re_xx);
        re_yy = fma(a.y, v[c].y, re_yy);
        im_xy = fma(a.x, v[c].y, im_xy);
        im_yx = fma(a.y, v[c].x, im_yx);
    }
    return make_complex<R>(re_xx - re_yy, im_xy + im_yx);
}

// The strided kernels' packed targets, unpacked: the targets ascending (where a
// group's base index gets its zero bits) and each target's bit as a mask.
template <int K>
__device__ __forceinline__ void unpack_group_targets(index_t packed_targets, index_t packed_sorted, int* sorted, index_t* mask) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
        sorted[j] = unpack6(packed_sorted, j);
        mask[j] = 1ull << unpack6(packed_targets, j);
    }
}

// ---------------------------------------------------------------------------
// apply_matrix<R, K>: a dense 2^K x 2^K matrix on K targets, one group per thread.
//
// Group g becomes its base index by inserting a zero bit at each target
// (ascending); its 2^K members are base | offset(c), where bit j of c selects
// target j (matrix index bit j <-> targets[j]). The thread holds the 2^K inputs
// in registers and writes each output row straight back, so it runs in place.
// Consecutive threads differ in the lowest non-target bits, so a warp's loads
// are contiguous runs of 2^(lowest target) amplitudes: the host uses this path
// when those runs fill whole 128-byte lines, and apply_matrix_low otherwise.
template <typename R, int K>
__global__ void __launch_bounds__(256) apply_matrix(
        typename complex_of<R>::type* __restrict__ state,
        const typename complex_of<R>::type* __restrict__ matrix,
        index_t groups, index_t packed_targets, index_t packed_sorted) {
    typedef typename complex_of<R>::type cplx;
    constexpr int D = 1 << K;
    __shared__ cplx m[D * D];
    for (int i = threadIdx.x; i < D * D; i += blockDim.x) m[i] = __ldg(matrix + i);

    int sorted[K];
    index_t mask[K];
    unpack_group_targets<K>(packed_targets, packed_sorted, sorted, mask);
    __syncthreads();

    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t g = (index_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        index_t base = g;
#pragma unroll
        for (int j = 0; j < K; ++j) base = insert_zero_bit(base, sorted[j]);
        cplx v[D];
#pragma unroll
        for (int c = 0; c < D; ++c) v[c] = state[base | combine<index_t, K>(c, mask, 0ull)];
#pragma unroll(row_unroll<K>())
        for (int r = 0; r < D; ++r) state[base | combine<index_t, K>(r, mask, 0ull)] = matrix_row<R, D>(m, v, r);
    }
}

// ---------------------------------------------------------------------------
// apply_matrix_multi<R, K, G>: apply_matrix with G groups per thread, so that
// each matrix element read from shared memory feeds 4 G FMAs instead of 4.
// At k = 5 the strided kernel issues one shared-memory load per complex
// multiply-add, which (not the FMAs, not DRAM) limits it.
//
// Per grid-stride step a thread takes groups g + i * stride, i = 0..G-1
// (stride = the grid's threads, the step is G * stride), so for each i
// consecutive threads still take consecutive groups and a warp's accesses are
// the same contiguous runs as apply_matrix's. For each output row the thread
// reads the row's elements once (float: two complex64 elements per 16-byte
// load) and adds each one's products to all G groups' accumulators, in the
// order matrix_row adds them: the results are bit for bit apply_matrix's. A
// step's groups past `groups` (the last step of a count not divisible by
// G * stride) read group g's amplitudes again and store nothing. In place, as
// apply_matrix: all inputs sit in registers before the first row is stored.
template <typename R> struct matrix_unit;  // the 16-byte unit of the shared matrix
template <> struct matrix_unit<float> {
    typedef float4 type;
    static constexpr int PER_UNIT = 2;  // complex64 elements per 16-byte load
    __device__ static __forceinline__ void split(const float4& q, float2* out) {
        out[0] = make_complex<float>(q.x, q.y);
        out[1] = make_complex<float>(q.z, q.w);
    }
};
template <> struct matrix_unit<double> {
    typedef double2 type;
    static constexpr int PER_UNIT = 1;
    __device__ static __forceinline__ void split(const double2& q, double2* out) { out[0] = q; }
};

// out[i] = sum_c m[row * D + c] * v[i][c] for each of the G groups, each
// element read once; per group the same four FMA chains as matrix_row.
template <typename R, int D, int G>
__device__ __forceinline__ void matrix_row_multi(
        const typename matrix_unit<R>::type* m, const typename complex_of<R>::type (&v)[G][D], int row,
        typename complex_of<R>::type (&out)[G]) {
    typedef typename complex_of<R>::type cplx;
    constexpr int P = matrix_unit<R>::PER_UNIT;
    R re_xx[G], re_yy[G], im_xy[G], im_yx[G];
#pragma unroll
    for (int i = 0; i < G; ++i) re_xx[i] = re_yy[i] = im_xy[i] = im_yx[i] = 0;
#pragma unroll
    for (int u = 0; u < D / P; ++u) {
        cplx a[P];
        matrix_unit<R>::split(m[(row * D) / P + u], a);
#pragma unroll
        for (int e = 0; e < P; ++e) {
            const int c = u * P + e;
#pragma unroll
            for (int i = 0; i < G; ++i) {
                re_xx[i] = fma(a[e].x, v[i][c].x, re_xx[i]);
                re_yy[i] = fma(a[e].y, v[i][c].y, re_yy[i]);
                im_xy[i] = fma(a[e].x, v[i][c].y, im_xy[i]);
                im_yx[i] = fma(a[e].y, v[i][c].x, im_yx[i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < G; ++i) out[i] = make_complex<R>(re_xx[i] - re_yy[i], im_xy[i] + im_yx[i]);
}

// Threads per block, and the resident blocks per SM asked of the register
// allocator: for the instances the host builds (G = 2; K = 3..5 in float,
// 3..4 in double), what ptxas (CUDA 13, sm_90) meets without spilling, each
// the occupancy the uncapped count gives anyway (float K = 3, 4, 5: 75, 114,
// 166 registers; double K = 3, 4: 122, 192). Asking for one block more
// spills (float K = 3 at 8 blocks, K = 4 at 5; double K = 3 at 5, K = 4 at 3). Double K = 5 with G = 2 holds 64 complex128
// inputs, 256 registers, and spills even at 255: it is not built.
template <typename R> struct multi_traits;
template <> struct multi_traits<float> {
    __host__ __device__ static constexpr int min_blocks(int k) { return k == 3 ? 6 : k == 4 ? 4 : 3; }
};
template <> struct multi_traits<double> {
    __host__ __device__ static constexpr int min_blocks(int k) { return k == 3 ? 4 : 2; }
};
template <typename R, int K, int G> struct multi_shape {
    static constexpr int BLOCK = 128;
    static constexpr int MIN_BLOCKS = G == 2 ? multi_traits<R>::min_blocks(K) : 1;
};

template <typename R, int K, int G>
__global__ void __launch_bounds__(multi_shape<R, K, G>::BLOCK, multi_shape<R, K, G>::MIN_BLOCKS) apply_matrix_multi(
        typename complex_of<R>::type* __restrict__ state,
        const typename complex_of<R>::type* __restrict__ matrix,
        index_t groups, index_t packed_targets, index_t packed_sorted) {
    typedef typename complex_of<R>::type cplx;
    typedef typename matrix_unit<R>::type unit;
    constexpr int D = 1 << K;
    constexpr int UNITS = D * D / matrix_unit<R>::PER_UNIT;
    static_assert(D % matrix_unit<R>::PER_UNIT == 0, "a row is whole 16-byte units");
    __shared__ unit m[UNITS];  // the matrix row-major, in 16-byte units for 16-byte loads
    // Filled one element at a time: the matrix in global memory may be only 8-byte aligned.
    cplx* elements = reinterpret_cast<cplx*>(m);
    for (int i = threadIdx.x; i < D * D; i += blockDim.x) elements[i] = __ldg(matrix + i);

    int sorted[K];
    index_t mask[K];
    unpack_group_targets<K>(packed_targets, packed_sorted, sorted, mask);
    __syncthreads();

    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t g = (index_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += G * stride) {
        index_t base[G];
        bool live[G];
#pragma unroll
        for (int i = 0; i < G; ++i) {
            const index_t gi = g + i * stride;
            live[i] = i == 0 || gi < groups;
            base[i] = live[i] ? gi : g;
#pragma unroll
            for (int j = 0; j < K; ++j) base[i] = insert_zero_bit(base[i], sorted[j]);
        }
        cplx v[G][D];
#pragma unroll
        for (int i = 0; i < G; ++i)
#pragma unroll
            for (int c = 0; c < D; ++c) v[i][c] = state[base[i] | combine<index_t, K>(c, mask, 0ull)];
#pragma unroll(row_unroll<K>())
        for (int r = 0; r < D; ++r) {
            cplx out[G];
            matrix_row_multi<R, D, G>(m, v, r, out);
            const index_t offset = combine<index_t, K>(r, mask, 0ull);
#pragma unroll
            for (int i = 0; i < G; ++i)
                if (live[i]) state[base[i] | offset] = out[i];
        }
    }
}

// ---------------------------------------------------------------------------
// apply_matrix_low<R, K>: the same product through a shared-memory tile, for
// targets among the low bits, where one group per thread would make every
// warp access strided.
//
// A tile is 2^(L + h) amplitudes: all 2^L values of the low bits 0..L-1 times
// all 2^h values of the h targets at or above L ("high targets"). Every group
// lies inside one tile. Tile-local index s: bits 0..L-1 are the global low
// bits, bit L + i is high target i (ascending). The block loads a tile with
// contiguous, coalesced reads (runs of 2^L amplitudes), applies the matrix to
// each group from shared memory, and stores the tile back the same way. The
// host picks L so that L + h = min(TILE_LOG, n); with n >= TILE_LOG that makes
// L >= TILE_LOG - 5 >= 6, runs of at least 64 amplitudes.
//
// Shared-memory slots are swizzled so that the 8 (double2) or 16 (float2)
// lanes that share a bank cycle mostly hit distinct banks: the low
// SLOT_BITS of s are XORed with a linear function of the next five bits (found
// by exhaustive search over all target sets of up to 5 bits; contiguous low
// target sets are conflict free, no set is worse than 2-way).
template <typename R> struct tile_traits;
template <> struct tile_traits<float> {
    static constexpr int TILE_LOG = 12;   // 4096 x 8 B = 32 KiB
    static constexpr int SLOT_BITS = 4;   // 16 lanes x 8 B fill the 32 banks
    // apply_matrix_low's resident blocks per SM for k = 1..5: register caps that
    // ptxas meets without spilling for sm_80/sm_90 (56-122 registers).
    __host__ __device__ static constexpr int low_min_blocks(int k) { return k == 4 ? 3 : 4; }
    __device__ static __forceinline__ int fold(int x) {
        return ((x & 1) ? 0x7 : 0) ^ ((x & 2) ? 0xd : 0) ^ ((x & 4) ? 0xb : 0) ^ ((x & 8) ? 0xe : 0) ^
               ((x & 16) ? 0x9 : 0);
    }
};
template <> struct tile_traits<double> {
    static constexpr int TILE_LOG = 11;   // 2048 x 16 B = 32 KiB
    static constexpr int SLOT_BITS = 3;   // 8 lanes x 16 B fill the 32 banks
    __host__ __device__ static constexpr int low_min_blocks(int k) { return k == 2 ? 2 : 4; }
    __device__ static __forceinline__ int fold(int x) {
        return ((x & 1) ? 0x7 : 0) ^ ((x & 2) ? 0x5 : 0) ^ ((x & 4) ? 0x3 : 0) ^ ((x & 8) ? 0x1 : 0) ^
               ((x & 16) ? 0x6 : 0);
    }
};

// Linear (over XOR) bijection of tile slots; linearity lets a group's slots be
// built from the swizzled base and swizzled per-target masks.
template <typename R>
__device__ __forceinline__ int swizzle(int s) {
    constexpr int S = tile_traits<R>::SLOT_BITS;
    return s ^ tile_traits<R>::fold((s >> S) & 31);
}

// The tiled kernel's shape for a full tile: BLOCK threads (one group each at
// k = 5 in float, 256 otherwise at most), each moving PER_THREAD amplitudes per
// tile; MIN_BLOCKS asks the register allocator for that many resident blocks
// per multiprocessor (64 registers a thread for k <= 3, where the products are
// cheap and latency hiding needs threads; wide products get what they need).
template <typename R, int K> struct low_shape {
    static constexpr int TILE = 1 << tile_traits<R>::TILE_LOG;
    static constexpr int BLOCK = (TILE >> K) < 256 ? (TILE >> K) : 256;
    static constexpr int PER_THREAD = TILE / BLOCK;
    static constexpr int CHUNK = PER_THREAD < 8 ? PER_THREAD : 8;  // loads in flight per thread
    static constexpr int MIN_BLOCKS = tile_traits<R>::low_min_blocks(K);
};

// The global index of tile slot s (before swizzling): the low bits of s are the
// state's low bits, bit low_bits + i of s is high target i.
template <int K>
__device__ __forceinline__ index_t tile_index(index_t base, int s, int low_bits, index_t low_mask,
                                              int high_count, const int* high_sorted) {
    index_t index = base | ((index_t)s & low_mask);
    const int high = s >> low_bits;
#pragma unroll
    for (int j = 0; j < K; ++j)
        if (j < high_count && ((high >> j) & 1)) index |= 1ull << high_sorted[j];
    return index;
}

// The global index of tile t's slot 0 (its low bits and high targets zero).
template <int K>
__device__ __forceinline__ index_t tile_base(index_t t, int low_bits, int high_count, const int* high_sorted) {
    index_t base = t << low_bits;
#pragma unroll
    for (int j = 0; j < K; ++j)
        if (j < high_count) base = insert_zero_bit(base, high_sorted[j]);
    return base;
}

// The tiled kernels' packed target arguments, unpacked: the high targets in
// ascending order, and each target's tile-local bit (sorted, and as a
// swizzled slot mask).
template <typename R, int K>
__device__ __forceinline__ void unpack_tile_targets(index_t packed_high_sorted, index_t packed_local_targets, index_t packed_local_sorted,
                                                    int* high_sorted, int* local_sorted, int* slot_mask) {
#pragma unroll
    for (int j = 0; j < K; ++j) high_sorted[j] = unpack6(packed_high_sorted, j);
#pragma unroll
    for (int j = 0; j < K; ++j) {
        local_sorted[j] = unpack6(packed_local_sorted, j);
        slot_mask[j] = swizzle<R>(1 << unpack6(packed_local_targets, j));
    }
}

// The matrix applied to every group of a tile in shared memory, one group per
// thread at a time; each group's products in matrix_row's order.
template <typename R, int K>
__device__ __forceinline__ void apply_to_tile(typename complex_of<R>::type* tile, const typename complex_of<R>::type* m, int groups,
                                              const int* local_sorted, const int* slot_mask) {
    typedef typename complex_of<R>::type cplx;
    constexpr int D = 1 << K;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        int local = g;
#pragma unroll
        for (int j = 0; j < K; ++j) local = insert_zero_bit32(local, local_sorted[j]);
        const int slot = swizzle<R>(local);
        cplx v[D];
#pragma unroll
        for (int c = 0; c < D; ++c) v[c] = tile[combine<int, K>(c, slot_mask, slot)];
#pragma unroll(row_unroll<K>())
        for (int r = 0; r < D; ++r) tile[combine<int, K>(r, slot_mask, slot)] = matrix_row<R, D>(m, v, r);
    }
}

template <typename R, int K>
__global__ void __launch_bounds__(low_shape<R, K>::BLOCK, low_shape<R, K>::MIN_BLOCKS) apply_matrix_low(
        typename complex_of<R>::type* __restrict__ state,
        const typename complex_of<R>::type* __restrict__ matrix,
        index_t tiles, int low_bits, int high_count,
        index_t packed_high_sorted, index_t packed_local_targets, index_t packed_local_sorted) {
    typedef typename complex_of<R>::type cplx;
    typedef low_shape<R, K> shape;
    constexpr int D = 1 << K;
    __shared__ cplx m[D * D];
    __shared__ cplx tile[shape::TILE];
    for (int i = threadIdx.x; i < D * D; i += blockDim.x) m[i] = __ldg(matrix + i);

    int high_sorted[K];  // h <= K of them
    int local_sorted[K];
    int slot_mask[K];
    unpack_tile_targets<R, K>(packed_high_sorted, packed_local_targets, packed_local_sorted, high_sorted, local_sorted, slot_mask);
    const int tile_size = 1 << (low_bits + high_count);
    const int groups = tile_size >> K;
    const index_t low_mask = (1ull << low_bits) - 1ull;
    // A full tile with the planned block: every loop below has a compile-time
    // trip count, so each thread issues all its PER_THREAD loads before the
    // first shared-memory store waits for one (memory-level parallelism). Small
    // states (fewer amplitudes than a tile) take the same steps in plain loops.
    const bool full = tile_size == shape::TILE && blockDim.x == shape::BLOCK;
    __syncthreads();

    for (index_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        const index_t base = tile_base<K>(t, low_bits, high_count, high_sorted);

        if (full) {
#pragma unroll 1
            for (int i0 = 0; i0 < shape::PER_THREAD; i0 += shape::CHUNK) {
                cplx staged[shape::CHUNK];
#pragma unroll
                for (int i = 0; i < shape::CHUNK; ++i)
                    staged[i] = state[tile_index<K>(base, threadIdx.x + (i0 + i) * shape::BLOCK, low_bits, low_mask, high_count, high_sorted)];
#pragma unroll
                for (int i = 0; i < shape::CHUNK; ++i) tile[swizzle<R>(threadIdx.x + (i0 + i) * shape::BLOCK)] = staged[i];
            }
        } else {
            for (int s = threadIdx.x; s < tile_size; s += blockDim.x)
                tile[swizzle<R>(s)] = state[tile_index<K>(base, s, low_bits, low_mask, high_count, high_sorted)];
        }
        __syncthreads();

        apply_to_tile<R, K>(tile, m, groups, local_sorted, slot_mask);
        __syncthreads();

        if (full) {
#pragma unroll 8
            for (int i = 0; i < shape::PER_THREAD; ++i) {
                const int s = threadIdx.x + i * shape::BLOCK;
                state[tile_index<K>(base, s, low_bits, low_mask, high_count, high_sorted)] = tile[swizzle<R>(s)];
            }
        } else {
            for (int s = threadIdx.x; s < tile_size; s += blockDim.x)
                state[tile_index<K>(base, s, low_bits, low_mask, high_count, high_sorted)] = tile[swizzle<R>(s)];
        }
        __syncthreads();  // the next tile's loads overwrite this one
    }
}

// ---------------------------------------------------------------------------
// apply_matrix_low_async<R, K>: apply_matrix_low as a persistent,
// double-buffered loop. Each block walks its tiles (grid-stride over tiles, the
// grid at most what the device keeps resident) with two tile buffers in shared
// memory: while it applies the matrix to tile i in one buffer and stores it,
// the asynchronous copy of its next tile (i + gridDim.x) fills the other, so a
// tile's global reads are in flight during the previous tile's arithmetic and
// stores instead of after them.
//
// Per tile: wait for this thread's copies of tile i; barrier (all of tile i
// is in shared memory, and every thread has finished storing tile i - 1 from
// the other buffer); issue the copies of tile i + 1 into that other buffer;
// apply the matrix to each group of tile i (the same slots, swizzle and
// matrix_row arithmetic as apply_matrix_low, so the results are bit for bit
// its results); barrier; store tile i. Two barriers a tile. In place: tiles are
// disjoint and a block reads and writes only its own, so the copy of tile
// i + 1 never reads what another block writes, and it overlaps only the store
// of tile i, a different tile.
//
// The copies go global -> shared without registers: on sm_80 and later
// cp.async (cp.async.cg, 16 bytes through L2 only, for complex128; complex64
// amplitudes move 8 bytes each through cp.async.ca, the only form below 16
// bytes, because the swizzle moves single complex64 slots: two neighbouring
// amplitudes are not always one 16-byte unit in the tile), grouped per tile by
// cp.async.commit_group and awaited by cp.async.wait_group 0. Older
// architectures (and the host emulation in the tests) copy synchronously; the
// loop and its barriers are the same.
//
// Two tiles must fit the 48 KiB of static shared memory with the matrix, so
// the tile is half apply_matrix_low's: ASYNC_TILE_LOG = 11 in float (2 x 16 KiB
// + 8 KiB matrix at k = 5), 10 in double (2 x 16 KiB + 16 KiB); with
// n >= ASYNC_TILE_LOG the low bits still number at least ASYNC_TILE_LOG - 5 >= 5,
// runs of 32 amplitudes (256 or 512 bytes).
template <typename R> struct async_traits;
template <> struct async_traits<float> {
    static constexpr int TILE_LOG = 11;
    // Resident blocks per SM asked of the register allocator (see low_async_shape).
    __host__ __device__ static constexpr int min_blocks(int k) { return k == 2 ? 4 : k == 5 ? 5 : 6; }
};
template <> struct async_traits<double> {
    static constexpr int TILE_LOG = 10;
    __host__ __device__ static constexpr int min_blocks(int k) { return k == 2 ? 2 : k == 5 ? 4 : 6; }
};

// The shape: BLOCK threads, one group each at most (as low_shape, on the
// smaller tile); MIN_BLOCKS asks the register allocator for the resident
// blocks per multiprocessor that shared memory allows on sm_90 (228 KiB: six
// blocks of 33-37 KiB at k <= 4, five of 41 KiB in float and four of 49 KiB in
// double at k = 5), which ptxas (CUDA 13, sm_80 and sm_90) meets without
// spilling: float k = 1, 3, 4 in 36-38, 40, 75-79 registers, k = 5 in 125-146;
// double k = 1, 3 in 40 and 80, k = 4, 5 in 128-156 and 198-228. k = 2 keeps its
// 16 matrix elements in registers across the group loop (as apply_matrix_low
// does): it asks for four blocks in float (64 registers) and two in double
// (126-128), since one block more spills (48 registers: 40 bytes; 80: 120).
template <typename R, int K> struct low_async_shape {
    static constexpr int TILE = 1 << async_traits<R>::TILE_LOG;
    static constexpr int BLOCK = (TILE >> K) < 256 ? (TILE >> K) : 256;
    static constexpr int MIN_BLOCKS = async_traits<R>::min_blocks(K);
};

// One amplitude global -> shared, asynchronously where the architecture has cp.async.
template <typename R>
__device__ __forceinline__ void copy_to_shared(typename complex_of<R>::type* shared_slot,
                                               const typename complex_of<R>::type* global) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(shared_slot));
    if constexpr (sizeof(typename complex_of<R>::type) == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(global) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(address), "l"(global) : "memory");
#else
    *shared_slot = *global;
#endif
}

// Close this thread's copies issued so far into one group.
__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Wait until every copy group this thread committed has landed in shared memory.
__device__ __forceinline__ void copy_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}


template <typename R, int K>
__global__ void __launch_bounds__(low_async_shape<R, K>::BLOCK, low_async_shape<R, K>::MIN_BLOCKS) apply_matrix_low_async(
        typename complex_of<R>::type* __restrict__ state,
        const typename complex_of<R>::type* __restrict__ matrix,
        index_t tiles, int low_bits, int high_count,
        index_t packed_high_sorted, index_t packed_local_targets, index_t packed_local_sorted) {
    typedef typename complex_of<R>::type cplx;
    typedef low_async_shape<R, K> shape;
    constexpr int D = 1 << K;
    __shared__ cplx m[D * D];
    __shared__ cplx buffers[2][shape::TILE];
    for (int i = threadIdx.x; i < D * D; i += blockDim.x) m[i] = __ldg(matrix + i);

    int high_sorted[K];  // h <= K of them
    int local_sorted[K];
    int slot_mask[K];
    unpack_tile_targets<R, K>(packed_high_sorted, packed_local_targets, packed_local_sorted, high_sorted, local_sorted, slot_mask);
    const int tile_size = 1 << (low_bits + high_count);
    const int groups = tile_size >> K;
    const index_t low_mask = (1ull << low_bits) - 1ull;

    // The first tile's copies; the loop below waits for them.
    index_t t = blockIdx.x;
    if (t < tiles) {
        const index_t base = tile_base<K>(t, low_bits, high_count, high_sorted);
        for (int s = threadIdx.x; s < tile_size; s += blockDim.x)
            copy_to_shared<R>(buffers[0] + swizzle<R>(s), state + tile_index<K>(base, s, low_bits, low_mask, high_count, high_sorted));
    }
    copy_commit();

    for (int buffer = 0; t < tiles; t += gridDim.x, buffer ^= 1) {
        copy_wait_all();
        // Tile t is in buffers[buffer]; every thread is done storing the
        // previous tile from buffers[buffer ^ 1] (and, the first time, the
        // matrix is in m).
        __syncthreads();
        const index_t next = t + gridDim.x;
        if (next < tiles) {
            const index_t next_base = tile_base<K>(next, low_bits, high_count, high_sorted);
            cplx* const incoming = buffers[buffer ^ 1];
#pragma unroll 4
            for (int s = threadIdx.x; s < tile_size; s += blockDim.x)
                copy_to_shared<R>(incoming + swizzle<R>(s), state + tile_index<K>(next_base, s, low_bits, low_mask, high_count, high_sorted));
        }
        copy_commit();

        cplx* const tile = buffers[buffer];
        apply_to_tile<R, K>(tile, m, groups, local_sorted, slot_mask);
        __syncthreads();

        const index_t base = tile_base<K>(t, low_bits, high_count, high_sorted);
#pragma unroll 4
        for (int s = threadIdx.x; s < tile_size; s += blockDim.x)
            state[tile_index<K>(base, s, low_bits, low_mask, high_count, high_sorted)] = tile[swizzle<R>(s)];
    }
}

// ---------------------------------------------------------------------------
// apply_matrix_warp<R, L, H>: the same product for target sets with L targets
// among bits 0..4 ("lane targets") and H above them, through registers and
// warp shuffles: no shared-memory tile, no block barrier.
//
// A warp owns a unit of 32 x 2^H amplitudes: the 32 consecutive values of
// bits 0..4 (lane = those bits, so every load and store is one contiguous
// 256- or 512-byte run) times the 2^H values of the high targets (register j of
// a lane: bit i of j is high target i, ascending). Units are the values of the
// remaining bits (grid-stride over warps, uniform within a warp). For each of
// the 2^L values c of the lane targets, a lane fetches the 2^H values of the
// lane whose lane-target bits equal c (one shuffle each) and adds their
// column's share to its own 2^H outputs; its row is its own lane-target bits
// and register j. The matrix sits in shared memory with a padded row stride,
// so the 2^L rows a warp reads at once fall in distinct banks.
template <typename R>
__device__ __forceinline__ typename complex_of<R>::type shuffle(typename complex_of<R>::type v, int lane) {
    return make_complex<R>(__shfl_sync(0xffffffffu, v.x, lane), __shfl_sync(0xffffffffu, v.y, lane));
}

template <typename R, int L, int H>
__global__ void __launch_bounds__(256) apply_matrix_warp(
        typename complex_of<R>::type* __restrict__ state,
        const typename complex_of<R>::type* __restrict__ matrix,
        index_t units, index_t packed_lane_bits, index_t packed_lane_pos,
        index_t packed_high_sorted, index_t packed_high_pos) {
    typedef typename complex_of<R>::type cplx;
    constexpr int K = L + H;
    constexpr int D = 1 << K;
    constexpr int DL = 1 << L;
    constexpr int DH = 1 << H;
    constexpr int STRIDE = D + 1;  // padded row stride of the shared matrix
    __shared__ cplx m[D * STRIDE];
    for (int i = threadIdx.x; i < D * D; i += blockDim.x) m[(i / D) * STRIDE + i % D] = __ldg(matrix + i);

    const int lane = threadIdx.x & 31;
    // Lane target i: its bit (0..4) and its matrix index bit.
    int lane_bit_mask = 0;
    int row_lane = 0;           // this lane's own row bits from its lane-target bits
    int src_part[L > 0 ? L : 1];  // lane bit of lane target i
    int col_part_low[L > 0 ? L : 1];
#pragma unroll
    for (int i = 0; i < L; ++i) {
        const int bit = unpack6(packed_lane_bits, i);
        const int pos = unpack6(packed_lane_pos, i);
        src_part[i] = 1 << bit;
        col_part_low[i] = 1 << pos;
        lane_bit_mask |= 1 << bit;
        if ((lane >> bit) & 1) row_lane |= 1 << pos;
    }
    int high_bit[H > 0 ? H : 1];
    index_t high_offset[H > 0 ? H : 1];
    int col_part_high[H > 0 ? H : 1];
#pragma unroll
    for (int i = 0; i < H; ++i) {
        high_bit[i] = unpack6(packed_high_sorted, i);
        high_offset[i] = 1ull << high_bit[i];
        col_part_high[i] = 1 << unpack6(packed_high_pos, i);
    }
    __syncthreads();

    const index_t warp = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const index_t warps = ((index_t)gridDim.x * blockDim.x) >> 5;
    for (index_t u = warp; u < units; u += warps) {
        index_t base = u << 5;
#pragma unroll
        for (int i = 0; i < H; ++i) base = insert_zero_bit(base, high_bit[i]);
        base |= (index_t)lane;
        cplx v[DH];
#pragma unroll
        for (int j = 0; j < DH; ++j) v[j] = state[base | combine<index_t, H>(j, high_offset, 0ull)];
        R re[DH], im[DH];
#pragma unroll
        for (int j = 0; j < DH; ++j) re[j] = im[j] = 0;
#pragma unroll
        for (int c = 0; c < DL; ++c) {
            const int src = (lane & ~lane_bit_mask) | combine<int, L>(c, src_part, 0);
            const int col_low = combine<int, L>(c, col_part_low, 0);
#pragma unroll
            for (int jp = 0; jp < DH; ++jp) {
                const cplx w = shuffle<R>(v[jp], src);
                const int col = col_low | combine<int, H>(jp, col_part_high, 0);
#pragma unroll
                for (int j = 0; j < DH; ++j) {
                    const cplx a = m[(row_lane | combine<int, H>(j, col_part_high, 0)) * STRIDE + col];
                    re[j] = fma(a.x, w.x, fma(-a.y, w.y, re[j]));
                    im[j] = fma(a.x, w.y, fma(a.y, w.x, im[j]));
                }
            }
        }
#pragma unroll
        for (int j = 0; j < DH; ++j) state[base | combine<index_t, H>(j, high_offset, 0ull)] = make_complex<R>(re[j], im[j]);
    }
}

// ---------------------------------------------------------------------------
// The streaming kernels (apply_diagonal, probability_one, collapse) move whole
// "vectors" of V consecutive amplitudes: V = 2 in float (one 16-byte float4
// access; the host runs V = 1 when the state is not 16-byte aligned), V = 1 in
// double (a double2 is already 16 bytes). Each thread takes STREAM_UNROLL
// vectors per grid-stride step, one grid apart (so every load instruction of a
// warp is still one contiguous run), and issues all their loads before it uses
// the first: several independent 16-byte loads in flight per thread instead of
// one 8-byte load in complex64. The host sizes the grid for
// vectors / STREAM_UNROLL threads (engine/kernels.py STREAM_UNROLL must match).
constexpr int STREAM_UNROLL = 4;

template <typename R, int V> struct vector_io;
template <typename R> struct vector_io<R, 1> {
    typedef typename complex_of<R>::type cplx;
    static __device__ __forceinline__ void load(const cplx* p, index_t v, cplx* out) { out[0] = p[v]; }
    static __device__ __forceinline__ void store(cplx* p, index_t v, const cplx* in) { p[v] = in[0]; }
};
template <> struct vector_io<float, 2> {
    static __device__ __forceinline__ void load(const float2* p, index_t v, float2* out) {
        const float4 q = reinterpret_cast<const float4*>(p)[v];
        out[0] = make_complex<float>(q.x, q.y);
        out[1] = make_complex<float>(q.z, q.w);
    }
    static __device__ __forceinline__ void store(float2* p, index_t v, const float2* in) {
        float4 q;
        q.x = in[0].x;
        q.y = in[0].y;
        q.z = in[1].x;
        q.w = in[1].y;
        reinterpret_cast<float4*>(p)[v] = q;
    }
};

template <int V> struct log2_of;
template <> struct log2_of<1> { static constexpr int value = 0; };
template <> struct log2_of<2> { static constexpr int value = 1; };

// ---------------------------------------------------------------------------
// apply_diagonal<R, V>: state[i] *= diagonal[sub(i)], where bit j of sub(i) is
// bit targets[j] of i (up to 10 targets; the diagonal sits in shared memory).
// The amplitudes of one vector differ only in bits below log2(V): sub(i) is
// sub of the vector's first index OR sub of the position inside the vector.
template <typename R, int V>
__global__ void __launch_bounds__(256) apply_diagonal(
        typename complex_of<R>::type* __restrict__ state,
        const typename complex_of<R>::type* __restrict__ diagonal,
        index_t size, int count, index_t packed_targets) {
    typedef typename complex_of<R>::type cplx;
    constexpr int U = STREAM_UNROLL;
    __shared__ cplx d[1 << 10];
    for (int i = threadIdx.x; i < (1 << count); i += blockDim.x) d[i] = __ldg(diagonal + i);
    int targets[10];
#pragma unroll
    for (int j = 0; j < 10; ++j) targets[j] = unpack6(packed_targets, j);
    int lane_sub[V];  // sub(e) for the position e inside a vector
#pragma unroll
    for (int e = 0; e < V; ++e) {
        lane_sub[e] = 0;
#pragma unroll
        for (int j = 0; j < 10; ++j)
            if (j < count && targets[j] < 6) lane_sub[e] |= ((e >> targets[j]) & 1) << j;
    }
    __syncthreads();

    const index_t vectors = size / V;
    const index_t threads = (index_t)gridDim.x * blockDim.x;
    for (index_t v0 = (index_t)blockIdx.x * blockDim.x + threadIdx.x; v0 < vectors; v0 += U * threads) {
        cplx a[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const index_t v = v0 + u * threads;
            if (v < vectors) vector_io<R, V>::load(state, v, a[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const index_t v = v0 + u * threads;
            if (v < vectors) {
                const index_t i = v * V;
                int sub = 0;
#pragma unroll
                for (int j = 0; j < 10; ++j)
                    if (j < count) sub |= (int)((i >> targets[j]) & 1ull) << j;
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const cplx f = d[sub | lane_sub[e]];
                    const cplx x = a[u][e];
                    a[u][e] = make_complex<R>(x.x * f.x - x.y * f.y, x.x * f.y + x.y * f.x);
                }
                vector_io<R, V>::store(state, v, a[u]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// probability_one<R, V>: partial[block] = sum of |amp|^2 over this block's share of
// the amplitudes whose bit `bit` is 1, accumulated in double for both
// precisions. The host adds the per-block partials: with a fixed grid the
// result is deterministic, and no accumulator needs zeroing first.
//
// For bit >= log2(V) the ones come in runs of 2^bit >= V amplitudes, so they
// fill whole vectors: the q-th of them is vector insert_zero_bit(q, vbit) |
// 2^vbit, vbit = bit - log2(V), and all its amplitudes count. For bit 0 with
// V = 2 every vector is one (bit = 0, bit = 1) pair and only its odd half counts.
template <typename R, int V>
__global__ void __launch_bounds__(256) probability_one(
        const typename complex_of<R>::type* __restrict__ state,
        index_t half, int bit, double* __restrict__ partial) {
    typedef typename complex_of<R>::type cplx;
    constexpr int U = STREAM_UNROLL;
    constexpr int LOGV = log2_of<V>::value;
    __shared__ double warp_sums[32];
    const bool whole = bit >= LOGV;
    const int vbit = whole ? bit - LOGV : 0;
    const index_t vone = 1ull << vbit;
    const index_t vectors = whole ? half / V : half;
    double acc = 0.0;
    const index_t threads = (index_t)gridDim.x * blockDim.x;
    for (index_t v0 = (index_t)blockIdx.x * blockDim.x + threadIdx.x; v0 < vectors; v0 += U * threads) {
        cplx a[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const index_t q = v0 + u * threads;
            if (q < vectors) vector_io<R, V>::load(state, whole ? (insert_zero_bit(q, vbit) | vone) : q, a[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (v0 + u * threads < vectors) {
#pragma unroll
                for (int e = 0; e < V; ++e)
                    if (whole || ((e >> bit) & 1))
                        acc += (double)a[u][e].x * (double)a[u][e].x + (double)a[u][e].y * (double)a[u][e].y;
            }
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        acc = lane < warps ? warp_sums[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
        if (lane == 0) partial[blockIdx.x] = acc;
    }
}

// ---------------------------------------------------------------------------
// collapse<R, V>: per pair (bit `bit` = 0, 1), keep the `outcome` amplitude times
// `scale` and zero the other; with `flip` (reset) the kept amplitude lands on
// bit = 0. For bit >= log2(V) both halves are whole vectors (the pair of vector
// q is insert_zero_bit(q, vbit) and that | 2^vbit) and only the kept one is
// read; for bit 0 with V = 2 each vector is one pair, read and written whole.
template <typename R, int V>
__global__ void __launch_bounds__(256) collapse(
        typename complex_of<R>::type* __restrict__ state,
        index_t half, int bit, int outcome, R scale, int flip) {
    typedef typename complex_of<R>::type cplx;
    constexpr int U = STREAM_UNROLL;
    constexpr int LOGV = log2_of<V>::value;
    static_assert(V == 1 || V == 2, "vectors of one or two amplitudes");
    const bool whole = bit >= LOGV;
    const int vbit = whole ? bit - LOGV : 0;
    const index_t vone = 1ull << vbit;
    const index_t vectors = whole ? half / V : half;
    const cplx zero = make_complex<R>(0, 0);
    const bool keep_low = flip || outcome == 0;
    const index_t threads = (index_t)gridDim.x * blockDim.x;
    for (index_t v0 = (index_t)blockIdx.x * blockDim.x + threadIdx.x; v0 < vectors; v0 += U * threads) {
        cplx a[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const index_t q = v0 + u * threads;
            if (q < vectors) {
                const index_t source = whole ? (insert_zero_bit(q, vbit) | (outcome ? vone : 0ull)) : q;
                vector_io<R, V>::load(state, source, a[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const index_t q = v0 + u * threads;
            if (q < vectors) {
                cplx low_half[V], high_half[V];
                if (whole) {
#pragma unroll
                    for (int e = 0; e < V; ++e) {
                        const cplx k = make_complex<R>(a[u][e].x * scale, a[u][e].y * scale);
                        low_half[e] = keep_low ? k : zero;
                        high_half[e] = keep_low ? zero : k;
                    }
                    const index_t low = insert_zero_bit(q, vbit);
                    vector_io<R, V>::store(state, low, low_half);
                    vector_io<R, V>::store(state, low | vone, high_half);
                } else if constexpr (V == 2) {
                    const cplx x = outcome ? a[u][1] : a[u][0];
                    const cplx k = make_complex<R>(x.x * scale, x.y * scale);
                    low_half[0] = keep_low ? k : zero;
                    low_half[1] = keep_low ? zero : k;
                    vector_io<R, V>::store(state, q, low_half);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// pauli_expectation<R>: one X-mask group of Pauli terms in one pass.
// partial[2 * block] (+1 for the imaginary part) = this block's share of
//     sum_i f(i) * conj(state[i ^ x_mask]) * state[i],
//     f(i) = sum_t weights[t] * (-1)^popcount(i & z_masks[t]),
// accumulated in double for both precisions; with a fixed grid the host's sum
// of the partials is deterministic. Masks are physical bit positions; up to
// 256 terms per launch (they sit in shared memory).
template <typename R>
__global__ void __launch_bounds__(256) pauli_expectation(
        const typename complex_of<R>::type* __restrict__ state,
        index_t size, index_t x_mask,
        const index_t* __restrict__ z_masks, const double2* __restrict__ weights, int count,
        double* __restrict__ partial) {
    typedef typename complex_of<R>::type cplx;
    __shared__ index_t zs[256];
    __shared__ double2 ws[256];
    __shared__ double warp_re[32];
    __shared__ double warp_im[32];
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
        zs[t] = z_masks[t];
        ws[t] = weights[t];
    }
    __syncthreads();
    double re = 0.0, im = 0.0;
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < size; i += stride) {
        const cplx a = state[i];
        const cplx b = state[i ^ x_mask];
        // conj(b) * a
        const double pr = (double)b.x * (double)a.x + (double)b.y * (double)a.y;
        const double pi = (double)b.x * (double)a.y - (double)b.y * (double)a.x;
        double fr = 0.0, fi = 0.0;
        for (int t = 0; t < count; ++t) {
            const double sign = (__popcll(i & zs[t]) & 1) ? -1.0 : 1.0;
            fr += sign * ws[t].x;
            fi += sign * ws[t].y;
        }
        re += fr * pr - fi * pi;
        im += fr * pi + fi * pr;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        re += __shfl_down_sync(0xffffffffu, re, offset);
        im += __shfl_down_sync(0xffffffffu, im, offset);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        warp_re[warp] = re;
        warp_im[warp] = im;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        re = lane < warps ? warp_re[lane] : 0.0;
        im = lane < warps ? warp_im[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) {
            re += __shfl_down_sync(0xffffffffu, re, offset);
            im += __shfl_down_sync(0xffffffffu, im, offset);
        }
        if (lane == 0) {
            partial[2 * blockIdx.x] = re;
            partial[2 * blockIdx.x + 1] = im;
        }
    }
}

// ---------------------------------------------------------------------------
// run_small_circuits<R, N>: whole circuits of at most N qubits, many per launch.
// A block takes one circuit at a time (grid-stride over circuits), keeps its
// 2^n amplitudes in dynamic shared memory, starts from |0...0>, applies the
// circuit's ops with a barrier after each, and writes the final amplitudes to
// global memory in canonical order (bit q of the index is qubit q). One launch
// replaces a launch per gate per circuit: small circuits in bulk are bound by
// launches, not by memory.
//
// The launch sizes the shared state for its widest circuit: 2^shared_qubits
// amplitudes (shared_mem = 2^shared_qubits * sizeof(cplx) bytes), so a chunk
// of narrow circuits takes little shared memory and many blocks fit a
// multiprocessor. N is the widest the engine ever asks for (SMALL_MAX_QUBITS
// in engine/kernels.py: 14 in float, 13 in double, 128 KiB, which needs the
// device's opt-in beyond the default 48 KiB per block; the host caps it by
// the device's limit).
//
// headers[SMALL_HEADER_WORDS * c ...]: circuit c's first op and op count in
// `ops`, its number of qubits n <= shared_qubits, and the offset of its 2^n
// amplitudes in `out`. An op is SMALL_OP_WORDS words:
//   [0] kind | k << 8, kind SMALL_MATRIX, SMALL_DIAGONAL or SMALL_PHASE
//   [1] the k targets, packed (matrix or diagonal index bit j <-> target j)
//   [2] the same targets packed in ascending order (matrices: group bases)
//   [3] offset of its numbers in `pool`: a 2^k x 2^k row-major matrix, a
//       2^k diagonal, or one phase factor
//   [4] control mask, [5] control value: a matrix acts only on the groups
//       whose index & mask == value (controls are never targets)
// Matrices (k = 1..5) go one group per thread as in apply_matrix, on 32-bit
// shared-memory indices, with the matrix read through the read-only cache;
// diagonals (k <= 10) and phases one amplitude per thread. The bounds (512
// threads, one block) cap registers at 128, as two blocks of 256 would
// (ptxas, sm_80/sm_90: float needs no more and spills nothing; double spills
// ~270 bytes, all of it the k = 5 case: without it, 128 registers and no
// spills); the host runs 512 threads only where a block's state leaves room
// for one block per multiprocessor (SMALL_BLOCK_* in engine/kernels.py).
constexpr int SMALL_HEADER_WORDS = 4;
constexpr int SMALL_OP_WORDS = 6;
constexpr int SMALL_MATRIX = 0;
constexpr int SMALL_DIAGONAL = 1;
constexpr int SMALL_PHASE = 2;

template <typename R, int K>
__device__ __forceinline__ void small_matrix(typename complex_of<R>::type* s, const typename complex_of<R>::type* m, int n,
                                             index_t packed_targets, index_t packed_sorted, int control_mask, int control_value) {
    typedef typename complex_of<R>::type cplx;
    constexpr int D = 1 << K;
    int sorted[K];
    int mask[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
        sorted[j] = unpack6(packed_sorted, j);
        mask[j] = 1 << unpack6(packed_targets, j);
    }
    const int groups = 1 << (n - K);
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        int base = g;
#pragma unroll
        for (int j = 0; j < K; ++j) base = insert_zero_bit32(base, sorted[j]);
        if ((base & control_mask) != control_value) continue;
        cplx v[D];
#pragma unroll
        for (int c = 0; c < D; ++c) v[c] = s[combine<int, K>(c, mask, base)];
#pragma unroll(row_unroll<K>())
        for (int r = 0; r < D; ++r) s[combine<int, K>(r, mask, base)] = matrix_row<R, D>(m, v, r);
    }
}

// One gate op of a small circuit (SMALL_MATRIX, SMALL_DIAGONAL or SMALL_PHASE;
// any other kind is left to the caller) on the 2^n amplitudes in shared memory.
// The caller puts a barrier after it.
template <typename R>
__device__ __forceinline__ void small_gate(typename complex_of<R>::type* s, const index_t* op,
                                           const typename complex_of<R>::type* __restrict__ pool, int n) {
    typedef typename complex_of<R>::type cplx;
    const int size = 1 << n;
    const int word = (int)__ldg(op);
    const int kind = word & 0xff;
    const int k = word >> 8;
    const index_t targets = __ldg(op + 1);
    const cplx* numbers = pool + __ldg(op + 3);
    if (kind == SMALL_MATRIX) {
        const index_t sorted = __ldg(op + 2);
        const int control_mask = (int)__ldg(op + 4);
        const int control_value = (int)__ldg(op + 5);
        switch (k) {
            case 1: small_matrix<R, 1>(s, numbers, n, targets, sorted, control_mask, control_value); break;
            case 2: small_matrix<R, 2>(s, numbers, n, targets, sorted, control_mask, control_value); break;
            case 3: small_matrix<R, 3>(s, numbers, n, targets, sorted, control_mask, control_value); break;
            case 4: small_matrix<R, 4>(s, numbers, n, targets, sorted, control_mask, control_value); break;
            case 5: small_matrix<R, 5>(s, numbers, n, targets, sorted, control_mask, control_value); break;
            default: break;  // the host sends k = 1..5 only
        }
    } else if (kind == SMALL_DIAGONAL) {
        int bit[10];
#pragma unroll
        for (int j = 0; j < 10; ++j) bit[j] = unpack6(targets, j);
        for (int i = threadIdx.x; i < size; i += blockDim.x) {
            int sub = 0;
#pragma unroll
            for (int j = 0; j < 10; ++j)
                if (j < k) sub |= ((i >> bit[j]) & 1) << j;
            const cplx f = __ldg(numbers + sub);
            const cplx x = s[i];
            s[i] = make_complex<R>(x.x * f.x - x.y * f.y, x.x * f.y + x.y * f.x);
        }
    } else if (kind == SMALL_PHASE) {
        const cplx f = __ldg(numbers);
        for (int i = threadIdx.x; i < size; i += blockDim.x) {
            const cplx x = s[i];
            s[i] = make_complex<R>(x.x * f.x - x.y * f.y, x.x * f.y + x.y * f.x);
        }
    }
}

template <typename R, int N>
__global__ void __launch_bounds__(512, 1) run_small_circuits(
        typename complex_of<R>::type* __restrict__ out,
        const index_t* __restrict__ headers,
        const index_t* __restrict__ ops,
        const typename complex_of<R>::type* __restrict__ pool,
        index_t circuits, int shared_qubits) {
    typedef typename complex_of<R>::type cplx;
    // The launch's dynamic shared memory, typed per instance through a byte
    // array (extern __shared__ arrays of different types in one module clash).
    extern __shared__ __align__(16) unsigned char small_shared[];
    cplx* const s = reinterpret_cast<cplx*>(small_shared);
    const int capacity = shared_qubits < N ? shared_qubits : N;
    for (index_t c = blockIdx.x; c < circuits; c += gridDim.x) {
        const index_t* header = headers + SMALL_HEADER_WORDS * c;
        const index_t first = __ldg(header);
        const index_t count = __ldg(header + 1);
        const int n = (int)__ldg(header + 2);
        const index_t offset = __ldg(header + 3);
        if (n < 0 || n > capacity) continue;  // never from the host's packing; uniform in the block, so no barrier is skipped by some threads only
        const int size = 1 << n;
        for (int i = threadIdx.x; i < size; i += blockDim.x) s[i] = make_complex<R>(i == 0 ? 1 : 0, 0);
        __syncthreads();

        for (index_t o = first; o < first + count; ++o) {
            small_gate<R>(s, ops + SMALL_OP_WORDS * o, pool, n);
            __syncthreads();
        }

        cplx* target = out + offset;
        for (int i = threadIdx.x; i < size; i += blockDim.x) target[i] = s[i];
        __syncthreads();  // the next circuit's |0...0> overwrites these amplitudes
    }
}

// ---------------------------------------------------------------------------
// run_small_shots<R, N>: the shots of one small circuit that measures
// mid-circuit, resets or branches, one shot per block at a time (grid-stride
// over the shots), many shots per launch. A block keeps its shot's 2^n
// amplitudes and clbits in dynamic shared memory and runs the circuit's flat
// op stream: the gate ops of run_small_circuits, and
//   SMALL_MEASURE    [1] qubit, [2] clbit: p1 = the block's sum of |a|^2 over
//                    the amplitudes with the qubit's bit set (in double, in a
//                    fixed order: the same in every thread and every run), the
//                    outcome is u < p1 for the shot's next uniform u, the state
//                    collapses to it (renormalized) and the clbit takes it;
//   SMALL_RESET      [1] qubit: the same draw, then the kept half moves to
//                    the qubit's 0 (no clbit);
//   SMALL_JUMP       [1] the op to go on at (an index into the stream);
//   SMALL_JUMP_IF    [1] the op, [2] offset of 2W words in `words` (W masks,
//                    W patterns), [3] negate: jump where ((clbits & mask) ==
//                    pattern) != negate, word by word over the W clbit words;
//   SMALL_LOOP_ENTER [1] slot: the while loop's iteration count starts at 0;
//   SMALL_LOOP_COUNT [1] slot: one more iteration begins; past
//                    max_iterations the shot stops with status 1.
// Conditions, loops and switches are flattened to these by the host
// (engine/small_shots.py), so every thread of a block follows the same path.
//
// The uniforms: Philox4x64-10 (Random123; NumPy's Philox bit generator is the
// same function), key (key0, key1), counter (draw, shot, 0, 0), the first
// 64-bit word's top 53 bits as a double in [0, 1): a shot's stream depends on
// the key and its index only, never on the launch's shape or the other shots.
//
// out[(W + 1) * (shot - first_shot) ...]: the shot's W clbit words (clbit c
// is bit c % 64 of word c / 64), then its status: 0, 1 (a while loop ran past
// max_iterations) or 2 (a measured qubit's outcome had zero probability).
// Dynamic shared memory: the 2^shared_qubits amplitudes, 32 doubles of warp
// partials, then W words of clbits (small_shots_shared_bytes in kernels.py).
constexpr int SMALL_MEASURE = 3;
constexpr int SMALL_RESET = 4;
constexpr int SMALL_JUMP = 5;
constexpr int SMALL_JUMP_IF = 6;
constexpr int SMALL_LOOP_ENTER = 7;
constexpr int SMALL_LOOP_COUNT = 8;
constexpr int SMALL_LOOP_SLOTS = 8;

__device__ __forceinline__ void philox_mulhilo(index_t a, index_t b, index_t& hi, index_t& lo) {
    lo = a * b;
    hi = __umul64hi(a, b);
}

// Philox4x64-10's first output word for (counter, key).
__device__ __forceinline__ index_t philox4x64_first(index_t c0, index_t c1, index_t c2, index_t c3, index_t k0, index_t k1) {
    for (int round = 0; round < 10; ++round) {
        if (round) {
            k0 += 0x9E3779B97F4A7C15ull;
            k1 += 0xBB67AE8584CAA73Bull;
        }
        index_t hi0, lo0, hi1, lo1;
        philox_mulhilo(0xD2E7470EE14C6C93ull, c0, hi0, lo0);
        philox_mulhilo(0xCA5A826395121157ull, c2, hi1, lo1);
        const index_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return c0;
}

// The block's sum of |s[i]|^2 over the i with `bit` set, in every thread (same order everywhere).
template <typename R>
__device__ __forceinline__ double small_probability_one(const typename complex_of<R>::type* s, double* partials, int n, int bit) {
    const int half = 1 << (n - 1);
    double sum = 0.0;
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
        const typename complex_of<R>::type a = s[insert_zero_bit32(p, bit) | (1 << bit)];
        sum += (double)a.x * (double)a.x + (double)a.y * (double)a.y;
    }
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if ((threadIdx.x & 31) == 0) partials[threadIdx.x >> 5] = sum;
    __syncthreads();
    double total = 0.0;
    const int warps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < warps; ++w) total += partials[w];
    return total;
}

template <typename R, int N>
__global__ void __launch_bounds__(512, 1) run_small_shots(
        index_t* __restrict__ out,
        const index_t* __restrict__ ops,
        const typename complex_of<R>::type* __restrict__ pool,
        const index_t* __restrict__ words,
        index_t count, int n, index_t first_shot, index_t shots,
        index_t key0, index_t key1, int clbit_words, index_t max_iterations) {
    typedef typename complex_of<R>::type cplx;
    extern __shared__ __align__(16) unsigned char small_shared[];
    if (n < 1 || n > N) return;  // never from the host; uniform in the launch
    const int size = 1 << n;
    cplx* const s = reinterpret_cast<cplx*>(small_shared);
    double* const partials = reinterpret_cast<double*>(small_shared + sizeof(cplx) * size);
    index_t* const clbits = reinterpret_cast<index_t*>(partials + 32);
    for (index_t shot = first_shot + blockIdx.x; shot < first_shot + shots; shot += gridDim.x) {
        for (int i = threadIdx.x; i < size; i += blockDim.x) s[i] = make_complex<R>(i == 0 ? 1 : 0, 0);
        for (int w = threadIdx.x; w < clbit_words; w += blockDim.x) clbits[w] = 0;
        __syncthreads();
        index_t iterations[SMALL_LOOP_SLOTS];
        index_t draws = 0;
        int status = 0;
        index_t o = 0;
        while (o < count) {
            const index_t* op = ops + SMALL_OP_WORDS * o;
            const int kind = (int)__ldg(op) & 0xff;
            ++o;
            if (kind <= SMALL_PHASE) {
                small_gate<R>(s, op, pool, n);
            } else if (kind == SMALL_MEASURE || kind == SMALL_RESET) {
                const int bit = (int)__ldg(op + 1);
                double p1 = small_probability_one<R>(s, partials, n, bit);
                p1 = p1 < 0.0 ? 0.0 : (p1 > 1.0 ? 1.0 : p1);
                const index_t x = philox4x64_first(draws, shot, 0, 0, key0, key1);
                ++draws;
                const double u = (double)(x >> 11) * (1.0 / 9007199254740992.0);
                const int outcome = u < p1 ? 1 : 0;
                const double probability = outcome ? p1 : 1.0 - p1;
                if (probability <= 0.0) {
                    status = 2;
                    break;  // uniform in the block: every thread computed the same p1 and u
                }
                const R scale = (R)(1.0 / sqrt(probability));
                const bool reset = kind == SMALL_RESET;
                const cplx zero = make_complex<R>(0, 0);
                for (int p = threadIdx.x; p < (size >> 1); p += blockDim.x) {
                    const int i0 = insert_zero_bit32(p, bit), i1 = i0 | (1 << bit);
                    const cplx kept = outcome ? s[i1] : s[i0];
                    const cplx scaled = make_complex<R>(kept.x * scale, kept.y * scale);
                    if (reset || !outcome) {
                        s[i0] = scaled;
                        s[i1] = zero;
                    } else {
                        s[i0] = zero;
                        s[i1] = scaled;
                    }
                }
                if (!reset && threadIdx.x == 0) {
                    const int clbit = (int)__ldg(op + 2);
                    const index_t one = 1ull << (clbit & 63);
                    clbits[clbit >> 6] = outcome ? (clbits[clbit >> 6] | one) : (clbits[clbit >> 6] & ~one);
                }
            } else if (kind == SMALL_JUMP) {
                o = __ldg(op + 1);
            } else if (kind == SMALL_JUMP_IF) {
                const index_t* masks = words + __ldg(op + 2);
                bool match = true;
                for (int w = 0; w < clbit_words; ++w)
                    if ((clbits[w] & __ldg(masks + w)) != __ldg(masks + clbit_words + w)) match = false;
                if (match != (__ldg(op + 3) != 0)) o = __ldg(op + 1);
            } else if (kind == SMALL_LOOP_ENTER) {
                iterations[__ldg(op + 1) % SMALL_LOOP_SLOTS] = 0;
            } else if (kind == SMALL_LOOP_COUNT) {
                const int slot = (int)(__ldg(op + 1) % SMALL_LOOP_SLOTS);
                if (++iterations[slot] > max_iterations) {
                    status = 1;
                    break;
                }
            }
            __syncthreads();
        }
        __syncthreads();  // a break above skips the op's barrier: the clbits are all written after this one
        index_t* const target = out + (index_t)(clbit_words + 1) * (shot - first_shot);
        for (int w = threadIdx.x; w < clbit_words; w += blockDim.x) target[w] = clbits[w];
        if (threadIdx.x == 0) target[clbit_words] = (index_t)status;
        __syncthreads();  // the next shot's |0...0> and clbits overwrite these
    }
}
