# The Triton kernels of impl="triton" (launchers, validation and block sizes live in triton_launch.py).
#
# Forward, buckets (bs_rows_forward_kernel; the launcher's choice for k > 128), one program per row,
# streaming the vocabulary in blocks of BLOCK_V logits (upcast to float32, or float64 for float64 input):
#   1. online log-sum-exp: m = running max, s = sum exp(z - m); per block one max reduction, one exp per element
#      and one exp to rescale s. A row that has seen only -inf so far uses 0 as the shift, so -inf - -inf never forms.
#   2. top-k: every logit becomes one int64 key, (order-preserving integer of the value) << index bits | index.
#      Comparing keys compares values, ties broken by index, so a sorting network over keys (which, like tl.topk /
#      tl.sort, moves values only) carries the index along for free. float32 keys: 32 value bits above 32 index
#      bits (exact; 16-bit input is exact in float32). float64 keys: the order-preserving int64 of the double with
#      its low 20 bits replaced by the index (two logits closer than about 2^-32 relative may swap rank; the values
#      written out are re-read from the logits, so they are exact).
#      The running top (K_PAD = next power of two >= k slots, sorted descending) is merged block by block, and only
#      keys above the current k-th best can change the top k, so each block takes the cheapest sufficient path:
#        - no candidate: skip (most late blocks: a block at offset j holds about k * BLOCK_V / j new candidates);
#          decided first from the block's max alone, then from the keys;
#        - at most MAX_ROUNDS candidates in each of BUCKETS contiguous buckets: rounds of "every bucket's best
#          candidate", each through the top-k network on BUCKETS keys instead of BLOCK_V (one round when each
#          bucket holds at most one candidate, as in most blocks after the first few);
#        - otherwise the network runs on the whole block (the first block of a row, or ascending data).
#      The network (_top_keys) is tl.topk's algorithm, bitonic top-k on the [2] * log2(n) hypercube, written here
#      with a sum-based partner exchange instead of tl.topk's xor_sum: same instructions compiled, but the Triton
#      interpreter runs xor_sum element by element in Python (minutes per test) and a sum as one numpy call.
#      Merge: the block's top sorted ascending against the running top sorted descending: their elementwise max
#      is the K_PAD largest of both, a bitonic sequence, sorted by log2(K_PAD) compare-exchange passes.
#   3. z_y is one scalar load; the k belief values are re-read from the logits at the selected ids.
#   Cost: one read of the logits, one exp per logit, O(k) writes per row; the top-k network costs about
#   (log2(K_PAD)^2 / 2 + log2(n / K_PAD) * (log2(K_PAD) + 1)) compare-exchange passes over n = BLOCK_V (or BUCKETS)
#   keys, only on blocks with candidates. Limits: k <= 1024 (K_PAD <= BLOCK_V), V < 2^31 for 16/32-bit input and
#   V <= 2^20 for float64 (index bits); one program per row (a few rows of a huge vocabulary use few SMs); loads are
#   16 bytes wide only when V and the row stride are multiples of 16 (Triton specialises on that), else 2 bytes.
#   Compiled for sm_90 (bf16, k = 20, BLOCK_V = 4096, 16 warps, the default): 86 registers with Triton 3.9, 112 with
#   3.6, no spills (benchmarks/RESULTS.md).
#
# Forward, per lane (bs_rows_forward_lanes_kernel; the launcher's choice for k <= 64 when the rows alone keep HBM
# busy): one program of one warp (or a few) per row; each of its LANES lanes streams GROUPS 16-byte vectors of VEC
# logits per step.
#   1. log-sum-exp: every lane keeps its own running max and sum, in base 2 (exp2((z - m) * log2 e) is an FADD, an
#      FMUL and one MUFU, where exp is a MUFU plus range fix-ups; z - m first, since z * log2 e - m * log2 e would
#      round both products at the ulp of z: 5e-4 at |z| = 1e4); the lanes' partials are combined once per row.
#      No cross-lane work per step, so no barrier and no shuffle in the loop.
#   2. top-k: the same keys as above, kept UNSORTED in K slots (distinct placeholders below every real key until
#      filled); the k-th best is their minimum. A lane whose block max is below the k-th best's value holds no
#      candidate. The others are visited roughly best first (32-bit tickets: a lane's max, truncated, and its id):
#      the lane's PER_LANE logits are re-read (L1 hits) as keys spread over the warp, and offered best first while
#      they beat the k-th best, each replacing it. A streaming top-k is exact whatever the order of offers, as long
#      as every logit that could still enter is offered: those never offered were below the k-th best when their
#      lane was tested, and the k-th best only rises. Cost per offer: a few warp reductions.
#      Warm start (k <= LANES): in the first whole block, the k-th largest of the lanes' maxima bounds the offers
#      from below (k distinct logits are at least that large), so the empty top is not filled with ~k ln(BLOCK_V / k)
#      keys that are evicted within the block.
#      The top is sorted once per row at the end (bitonic, K_PAD keys).
#   Compiled for sm_90 (bf16, k = 20, 4 groups x 32 lanes x 8 = 1024 logits per step, 1 warp): ~64 registers, no
#   spills, no BAR in the loop; ~7-8 lane-instructions per logit per block plus ~40 per lane visited and ~24 per
#   key accepted (benchmarks/triton_cost.py, benchmarks/RESULTS.md).
#
# Forward, split vocabulary (bs_rows_forward_split_kernel + bs_rows_merge_kernel; the launcher's choice for k <= 64
# when rows are few): grid (row, slice), each program runs the per-lane loop above over one slice of whole blocks and
# writes its partials: the slice's max m_s and sum of exp(z - m_s), and its k best keys (global column ids) unsorted.
# The merge (one program per row) combines the (max, sum) pairs as the lanes' are combined, takes the k best of the
# S * k keys (bitonic top-k; a logit of the row's top k is in its slice's top k), and stores the row as the other
# forwards do (z_y and the belief values re-read from the logits). Extra traffic: S * (8 + 8 k) bytes per row,
# written and read once.
#   Limits as above.
#
# Backward, grid (row, column block), two launches:
#   dense: grad = exp(z - m) * (-grad_row * exp(-log_sum)) for every logit (= -grad_row * pi; the second factor once
#          per program, <= 1) (one read, one write, one exp per element); rows with
#          grad_row == 0 (ignored) write zeros without reading the logits.
#   fixup: one program per row rewrites the <= k + 1 entries that also carry a target term:
#          grad[y] = grad_row * (1 - lam) + grad_row * (w_y - pi_y), grad[h] = grad_row * (w_h - pi_h) on the beliefs
#          (w = belief_weights from epilogue.finish_rows, w_y the label's own belief weight if it is a belief).
#          Recomputing each value from its logit (gathered by the launcher before the dense launch, so inplace works)
#          rounds every entry once, as the dense part does; adding a term to an already rounded bf16 value would not.
#          (Under the interpreter, float32 -> bfloat16 truncates where the GPU rounds to nearest: one ulp apart.)
#   Cost: one read + one write of the logits plus O(k) per row.
#
# Every pointer offset is formed in int64 (N * V passes 2^31 at 16k rows of a 128k vocabulary).

import triton
import triton.language as tl

try:
    # Reductions are written as tl.reduce with Triton's own sum / max combine functions rather than tl.sum / tl.max:
    # compiled, the two are the same code; interpreted, tl.sum is a nested jit call that costs milliseconds each,
    # while tl.reduce with exactly these combine functions runs as one numpy call (any other combine function runs
    # element by element in Python). This makes the interpreter tests several times faster.
    from triton.language.standard import _elementwise_max as _max_combine
    from triton.language.standard import _elementwise_min as _min_combine
    from triton.language.standard import _sum_combine
except ImportError:  # a Triton without these private names: same results, slower interpreter

    @triton.jit
    def _sum_combine(a, b):
        return a + b

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _min_combine(a, b):
        return tl.minimum(a, b)


MIN_KEY = tl.constexpr(-(2**63))
MAX_KEY = tl.constexpr(2**63 - 1)
MIN_TICKET = tl.constexpr(-(2**31))
LOG2E = tl.constexpr(1.4426950408889634)
FP64_INDEX_MASK = tl.constexpr(0xFFFFF)
FP64_VALUE_MASK = tl.constexpr(-(1 << 20))
# A block whose fullest bucket holds more candidates than this runs the network on all BLOCK_V keys at once; else
# one bucket round per candidate of the fullest bucket (a round costs about a fifth of the full network at 4096 keys).
MAX_ROUNDS = tl.constexpr(4)


@triton.jit
def _pack_keys(z, cols, IS_FP64: tl.constexpr):
    """int64 keys ordered like (z, cols): the value's order-preserving integer above the column index."""
    if IS_FP64:
        bits = z.to(tl.int64, bitcast=True)
        # Negative floats order backwards as integers: flip their magnitude bits.
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
        return (ordered & FP64_VALUE_MASK) | cols.to(tl.int64)
    else:
        bits = z.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        return (ordered.to(tl.int64) << 32) | cols.to(tl.int64)


@triton.jit
def _bitonic_merge(h, STAGE: tl.constexpr, ORDER: tl.constexpr, N_DIMS: tl.constexpr):
    """Sort every run of 2^STAGE keys of the hypercube h, each run being bitonic.

    ORDER 0: all runs ascending, 1: all descending, 2: alternating with index bit STAGE (ascending where it is 0).
    Compare-exchange partners differ in one index bit; the partner of each key is the pair's sum minus the key
    (int64 arithmetic wraps, so this is exact). tl.sort's xor_sum does the same exchange, but the Triton interpreter
    runs a custom-combine reduction element by element in Python, and a sum reduction as one numpy call.
    """
    # Index bits as 0/1 tensors of shape [1, .., 2, .., 1] (bit 0 is the innermost axis); written inline because
    # the interpreter pays a few milliseconds per nested jit call.
    if ORDER == 2:
        descending_run = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - STAGE) + [2] + [1] * STAGE)
    else:
        descending_run = ORDER
    # Pass i compares along index bit STAGE - 1 - i, i.e. hypercube axis N_DIMS - STAGE + i (written out inline:
    # a name assigned in a jit function is a run-time value, and axes and shapes must be compile-time constants).
    for i in tl.static_range(STAGE):
        partner = tl.reduce(h, N_DIMS - STAGE + i, _sum_combine, keep_dims=True) - h
        # The upper key of a pair keeps the max in an ascending run, the lower one in a descending run.
        is_upper = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - STAGE + i) + [2] + [1] * (STAGE - 1 - i))
        keeps_max = (is_upper ^ descending_run) != 0
        h = tl.where(keeps_max, tl.maximum(h, partner), tl.minimum(h, partner))
    return h


@triton.jit
def _top_keys(keys, LOG_N: tl.constexpr, LOG_K: tl.constexpr, DESCENDING: tl.constexpr):
    """The 2^LOG_K largest of 2^LOG_N int64 keys, sorted (bitonic top-k: sort runs of 2^LOG_K with alternating
    directions; then, while more than one run is left, keep the elementwise max of each ascending/descending pair
    of runs (the larger half of the pair, bitonic) and re-sort the halves). About (LOG_K^2 / 2 + 2 LOG_K) passes."""
    if LOG_K == 0:
        top = tl.zeros([1], tl.int64) + tl.reduce(keys, 0, _max_combine)
    else:
        h = tl.reshape(keys, [2] * LOG_N)
        for stage in tl.static_range(1, LOG_K + 1):
            h = _bitonic_merge(h, stage, 2 if stage < LOG_N else DESCENDING, LOG_N)
        # Step s halves the LOG_N - s + LOG_K + 1 axes left by reducing the axis of index bit LOG_K.
        for step in tl.static_range(LOG_K + 1, LOG_N + 1):
            h = tl.reduce(h, LOG_N - step, _max_combine)
            h = _bitonic_merge(h, LOG_K, 2 if step < LOG_N else DESCENDING, LOG_N - step + LOG_K)
        top = tl.reshape(h, [1 << LOG_K])
    return top


@triton.jit
def _merge_top(top_keys, block_top, LOG_K_PAD: tl.constexpr):
    """The 2^LOG_K_PAD largest of top_keys (sorted descending) and block_top (sorted ascending), sorted descending.

    Their elementwise max holds exactly those keys as a bitonic sequence; log2(K_PAD) compare-exchange passes sort it.
    """
    merged = tl.maximum(top_keys, block_top)
    if LOG_K_PAD > 0:
        merged = tl.reshape(
            _bitonic_merge(tl.reshape(merged, [2] * LOG_K_PAD), LOG_K_PAD, 1, LOG_K_PAD), [1 << LOG_K_PAD]
        )
    return merged


@triton.jit
def _store_row(
    row,
    row_ptr,
    row_max,
    log_sum,
    top_keys,
    labels_ptr,
    row_max_ptr,
    log_sum_ptr,
    label_logits_ptr,
    belief_logits_ptr,
    belief_ids_ptr,
    K: tl.constexpr,
    LOG_K_PAD: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """A forward's per-row outputs: m and log_sum (lse = m + log_sum is never formed: it rounds to the ulp of m),
    z_y (one scalar load) and, from top_keys (sorted descending), the belief ids
    from the low key bits and their values re-read from the logits (exact, whatever the key's value precision)."""
    compute_dtype = tl.float64 if IS_FP64 else tl.float32
    tl.store(row_max_ptr + row, row_max)
    tl.store(log_sum_ptr + row, log_sum)
    label = tl.load(labels_ptr + row)
    tl.store(label_logits_ptr + row, tl.load(row_ptr + tl.maximum(label, 0)).to(compute_dtype))
    if K > 0:
        if IS_FP64:
            belief_ids = top_keys & FP64_INDEX_MASK
        else:
            # The low 32 bits; indices are < 2^31, so the int32 truncation is non-negative.
            belief_ids = top_keys.to(tl.int32).to(tl.int64)
        slots = tl.arange(0, 1 << LOG_K_PAD)
        is_belief = slots < K
        belief_logits = tl.load(row_ptr + belief_ids, mask=is_belief, other=0.0).to(compute_dtype)
        tl.store(belief_ids_ptr + row * K + slots, belief_ids, mask=is_belief)
        tl.store(belief_logits_ptr + row * K + slots, belief_logits, mask=is_belief)


@triton.jit
def bs_rows_forward_kernel(
    logits_ptr,  # [N, V] any float dtype, unit stride along V
    labels_ptr,  # [N] int64, -1 = ignored
    row_max_ptr,  # [N] out, compute dtype
    log_sum_ptr,  # [N] out, compute dtype
    label_logits_ptr,  # [N] out, compute dtype
    belief_logits_ptr,  # [N, K] out, compute dtype, contiguous
    belief_ids_ptr,  # [N, K] out, int64, contiguous
    vocab_size,
    logits_row_stride,
    K: tl.constexpr,  # number of beliefs, 0 = forget log-probs only
    LOG_K_PAD: tl.constexpr,  # K_PAD = 2^LOG_K_PAD >= K slots in the running top
    LOG_BLOCK_V: tl.constexpr,  # BLOCK_V = 2^LOG_BLOCK_V logits per step
    LOG_BUCKETS: tl.constexpr,  # LOG_K_PAD <= LOG_BUCKETS <= LOG_BLOCK_V
    IS_FP64: tl.constexpr,
):
    K_PAD: tl.constexpr = 1 << LOG_K_PAD
    BLOCK_V: tl.constexpr = 1 << LOG_BLOCK_V
    BUCKETS: tl.constexpr = 1 << LOG_BUCKETS
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    block_cols = tl.arange(0, BLOCK_V)
    compute_dtype = tl.float64 if IS_FP64 else tl.float32

    running_max = tl.full([], float("-inf"), compute_dtype)
    running_sum = tl.zeros([], compute_dtype)
    slots = tl.arange(0, K_PAD)
    top_keys = tl.full([K_PAD], MIN_KEY, tl.int64)  # sorted descending; slots >= K are scratch
    kth_key = tl.full([], MIN_KEY, tl.int64)

    for start in range(0, vocab_size, BLOCK_V):
        cols = start + block_cols
        in_row = cols < vocab_size
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(compute_dtype)

        # 1. online log-sum-exp
        block_max = tl.reduce(z, 0, _max_combine)
        new_max = tl.maximum(running_max, block_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max).to(compute_dtype)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.reduce(tl.exp(z - shift), 0, _sum_combine)
        running_max = new_max

        # 2. running top-k over packed keys
        if K > 0:
            # No key of the block exceeds pack(block max, V - 1): when that bound is not above the k-th best key,
            # no logit of the block can enter the top k and its keys are never formed (the common case late in a
            # row, decided from the max that the log-sum-exp needs anyway).
            if _pack_keys(block_max, vocab_size - 1, IS_FP64) > kth_key:
                keys = tl.where(in_row, _pack_keys(z, cols, IS_FP64), MIN_KEY)
                # Row b of this [BUCKETS, BLOCK_V // BUCKETS] view is bucket b (contiguous logits); non-candidates are
                # MIN_KEY.
                candidates = tl.reshape(tl.where(keys > kth_key, keys, MIN_KEY), [BUCKETS, BLOCK_V // BUCKETS])
                per_bucket = tl.reduce((candidates != MIN_KEY).to(tl.int32), 1, _sum_combine)
                if tl.reduce(per_bucket, 0, _max_combine) > MAX_ROUNDS:
                    block_top = _top_keys(tl.reshape(candidates, [BLOCK_V]), LOG_BLOCK_V, LOG_K_PAD, 0)
                    top_keys = _merge_top(top_keys, block_top, LOG_K_PAD)
                    kth_key = tl.reduce(tl.where(slots == K - 1, top_keys, MIN_KEY), 0, _max_combine)
                else:
                    # Each round takes every bucket's best candidate: the top K_PAD of those are merged, and the
                    # rest of them are below K_PAD merged keys, so below the new k-th best: all can be dropped.
                    best = tl.reduce(tl.reduce(candidates, 1, _max_combine), 0, _max_combine)
                    while best != MIN_KEY:
                        bucket_best = tl.reduce(candidates, 1, _max_combine)
                        block_top = _top_keys(bucket_best, LOG_BUCKETS, LOG_K_PAD, 0)
                        top_keys = _merge_top(top_keys, block_top, LOG_K_PAD)
                        kth_key = tl.reduce(tl.where(slots == K - 1, top_keys, MIN_KEY), 0, _max_combine)
                        taken = candidates == bucket_best[:, None]
                        candidates = tl.where(taken | (candidates <= kth_key), MIN_KEY, candidates)
                        best = tl.reduce(tl.reduce(candidates, 1, _max_combine), 0, _max_combine)

    # A row of only -inf has running_sum = 0: m = -inf, log_sum = log(0) = -inf (epilogue.finish_rows handles it).
    _store_row(
        row,
        row_ptr,
        running_max,
        tl.log(running_sum),
        top_keys,
        labels_ptr,
        row_max_ptr,
        log_sum_ptr,
        label_logits_ptr,
        belief_logits_ptr,
        belief_ids_ptr,
        K,
        LOG_K_PAD,
        IS_FP64,
    )


@triton.jit
def _clear_index(key, IS_FP64: tl.constexpr):
    """The smallest key with the value field of ``key`` (its index bits cleared)."""
    if IS_FP64:
        return key & FP64_VALUE_MASK
    else:
        return (key >> 32) << 32


@triton.jit
def _lanes_block(
    row_ptr,
    start,
    end,
    block_cols,
    lane_ids,
    lane_offsets,
    lane_max,
    lane_sum,
    top_keys,
    kth_key,
    MASKED: tl.constexpr,
    WARM: tl.constexpr,
    K: tl.constexpr,
    LOG_K_PAD: tl.constexpr,
    LOG_LANES: tl.constexpr,
    VEC: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """One block of the per-lane loop over columns [start, start + BLOCK_V) of a row (MASKED: the partial last block
    of [.., end), bounds-checked). Only keys above ``bound``, the k-th best key kept so far, are offered. WARM (the
    first full block of a row or slice, K <= LANES): the bound starts just below the k-th largest lane maximum: K
    distinct logits of the block are at least that large, so no logit below it can be in the top k (and after the
    block the k-th best kept is above it: the bound is the k-th best again)."""
    compute_dtype = tl.float64 if IS_FP64 else tl.float32
    LANES: tl.constexpr = 1 << LOG_LANES
    # The block's base pointer once, then constant offsets (immediates in the loads)
    block_ptrs = (row_ptr + start) + block_cols
    if MASKED:
        z = tl.load(block_ptrs, mask=start + block_cols < end, other=float("-inf")).to(compute_dtype)
    else:
        z = tl.load(block_ptrs).to(compute_dtype)

    # 1. per-lane online log-sum-exp in base 2: z - m first (exact), then one FMUL and one exp2 per logit, no
    # cross-lane work
    block_lane_max = tl.reduce(tl.reduce(z, 2, _max_combine), 0, _max_combine)
    new_max = tl.maximum(lane_max, block_lane_max)
    # A lane that has seen only -inf shifts by 0, so -inf - -inf never forms.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max).to(compute_dtype)
    exps = tl.exp2((z - shift[None, :, None]) * LOG2E)
    lane_sum = lane_sum * tl.exp2((lane_max - shift) * LOG2E) + tl.reduce(
        tl.reduce(exps, 2, _sum_combine), 0, _sum_combine
    )
    lane_max = new_max

    # 2. top-k: a lane whose max is below the bound's value holds no candidate. The others are visited best
    # lane first; each re-reads its PER_LANE logits as keys and offers them, best first, to the unsorted top (a key
    # above the bound replaces the k-th best). Any order of offers yields the exact top k.
    if K > 0:
        lane_keys = _pack_keys(block_lane_max, lane_ids, IS_FP64)
        if WARM:
            # The k-th largest lane maximum, its index bits cleared, minus one: below every key of its value.
            lane_top = _top_keys(lane_keys, LOG_LANES, LOG_K_PAD, 1)
            lane_kth = tl.reduce(tl.where(tl.arange(0, 1 << LOG_K_PAD) == K - 1, lane_top, MIN_KEY), 0, _max_combine)
            floor = _clear_index(lane_kth, IS_FP64) - 1
        else:
            floor = MIN_KEY  # a constant: the maxima below fold away
        bound = tl.maximum(kth_key, floor)
        # Lanes are picked by 32-bit tickets (an int32 max is one warp instruction on sm_80+, an int64 one five
        # shuffle rounds): the top 32 bits of the lane max's key (the value field for 16/32-bit input) with the low
        # LOG_LANES bits replaced by the lane. Tickets order lanes roughly (any order of offers is exact); the test
        # that a lane may hold a key above the bound rounds its ticket up, so it never skips one.
        bound_high = (bound >> 32).to(tl.int32)
        lane_high = (lane_keys >> 32).to(tl.int32)
        pending = tl.where(lane_high >= bound_high, (lane_high & -LANES) | lane_ids, MIN_TICKET)
        ticket = tl.reduce(pending, 0, _max_combine)
        while (ticket != MIN_TICKET) & ((ticket | (LANES - 1)) >= bound_high):
            lane = ticket & (LANES - 1)
            pending = tl.where(lane_ids == lane, MIN_TICKET, pending)
            lane_cols = start + lane * VEC + lane_offsets
            in_row = lane_cols < end
            lane_z = tl.load(row_ptr + lane_cols, mask=in_row, other=0.0).to(compute_dtype)
            offers = tl.where(in_row, _pack_keys(lane_z, lane_cols, IS_FP64), MIN_KEY)
            offer = tl.reduce(offers, 0, _max_combine)
            while offer > bound:
                top_keys = tl.where(top_keys == kth_key, offer, top_keys)
                kth_key = tl.reduce(top_keys, 0, _min_combine)
                bound = tl.maximum(kth_key, floor)
                offers = tl.where(offers == offer, MIN_KEY, offers)
                offer = tl.reduce(offers, 0, _max_combine)
            bound_high = (bound >> 32).to(tl.int32)
            ticket = tl.reduce(pending, 0, _max_combine)
    return lane_max, lane_sum, top_keys, kth_key


@triton.jit
def _lanes_slice(
    row_ptr,
    start,
    end,
    K: tl.constexpr,
    LOG_K_PAD: tl.constexpr,
    LOG_GROUPS: tl.constexpr,
    LOG_LANES: tl.constexpr,
    LOG_VEC: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """Columns [start, end) of a row through the per-lane loop (start a multiple of 16 elements, for 16-byte loads):
    the lanes' running max and sum (sum of exp(z - max)), and K keys in the unsorted top's first K slots (the k best
    of the slice, or distinct placeholders below every real key where the slice holds fewer than k logits)."""
    GROUPS: tl.constexpr = 1 << LOG_GROUPS
    LANES: tl.constexpr = 1 << LOG_LANES
    VEC: tl.constexpr = 1 << LOG_VEC
    PER_LANE: tl.constexpr = GROUPS * VEC
    BLOCK_V: tl.constexpr = GROUPS * LANES * VEC
    K_PAD: tl.constexpr = 1 << LOG_K_PAD
    compute_dtype = tl.float64 if IS_FP64 else tl.float32
    lane_ids = tl.arange(0, LANES)
    # [GROUPS, LANES, VEC]: lane l holds GROUPS vectors of VEC contiguous logits, one 16-byte load each.
    block_cols = (
        tl.arange(0, GROUPS)[:, None, None] * (LANES * VEC)
        + lane_ids[None, :, None] * VEC
        + tl.arange(0, VEC)[None, None, :]
    )
    # One lane's logits as a [PER_LANE] vector spread over the lanes (re-read, from L1, when the lane has candidates).
    lane_elements = tl.arange(0, PER_LANE)
    lane_offsets = (lane_elements // VEC) * (LANES * VEC) + lane_elements % VEC

    lane_max = tl.full([LANES], float("-inf"), compute_dtype)
    lane_sum = tl.zeros([LANES], compute_dtype)
    slots = tl.arange(0, K_PAD)
    # Unsorted top: distinct placeholders below every real key in the K slots (so that the slot of the minimum is
    # unique), MAX_KEY in the padding (never the minimum).
    top_keys = tl.where(slots < K, MIN_KEY + 1 + slots.to(tl.int64), MAX_KEY)
    kth_key = tl.reduce(top_keys, 0, _min_combine)

    # The first whole block (with the warm start where k <= the lane count), the other whole blocks without bounds
    # checks, then the partial block, if any, with them.
    # (first_end is start + BLOCK_V or start written as a product, so that Triton still sees a multiple of 16.)
    full_blocks_end = end - (end - start) % BLOCK_V
    has_full_block = full_blocks_end > start
    first_end = start + has_full_block.to(tl.int32) * BLOCK_V
    if has_full_block:
        lane_max, lane_sum, top_keys, kth_key = _lanes_block(
            row_ptr,
            start,
            end,
            block_cols,
            lane_ids,
            lane_offsets,
            lane_max,
            lane_sum,
            top_keys,
            kth_key,
            False,
            K <= LANES,
            K,
            LOG_K_PAD,
            LOG_LANES,
            VEC,
            IS_FP64,
        )
    for block_start in range(first_end, full_blocks_end, BLOCK_V):
        lane_max, lane_sum, top_keys, kth_key = _lanes_block(
            row_ptr,
            block_start,
            end,
            block_cols,
            lane_ids,
            lane_offsets,
            lane_max,
            lane_sum,
            top_keys,
            kth_key,
            False,
            False,
            K,
            LOG_K_PAD,
            LOG_LANES,
            VEC,
            IS_FP64,
        )
    if full_blocks_end < end:
        lane_max, lane_sum, top_keys, kth_key = _lanes_block(
            row_ptr,
            full_blocks_end,
            end,
            block_cols,
            lane_ids,
            lane_offsets,
            lane_max,
            lane_sum,
            top_keys,
            kth_key,
            True,
            False,
            K,
            LOG_K_PAD,
            LOG_LANES,
            VEC,
            IS_FP64,
        )
    return lane_max, lane_sum, top_keys


@triton.jit
def _combine_lanes(lane_max, lane_sum, IS_FP64: tl.constexpr):
    """The max and the sum of exp(z - max) of the logits behind several (max, sum) partials (lanes or slices); a
    set of only -inf gives (-inf, 0)."""
    compute_dtype = tl.float64 if IS_FP64 else tl.float32
    row_max = tl.reduce(lane_max, 0, _max_combine)
    row_shift = tl.where(row_max == float("-inf"), 0.0, row_max).to(compute_dtype)
    return row_max, tl.reduce(lane_sum * tl.exp2((lane_max - row_shift) * LOG2E), 0, _sum_combine)


@triton.jit
def bs_rows_forward_lanes_kernel(
    logits_ptr,  # [N, V] any float dtype, unit stride along V
    labels_ptr,  # [N] int64, -1 = ignored
    row_max_ptr,  # [N] out, compute dtype
    log_sum_ptr,  # [N] out, compute dtype
    label_logits_ptr,  # [N] out, compute dtype
    belief_logits_ptr,  # [N, K] out, compute dtype, contiguous
    belief_ids_ptr,  # [N, K] out, int64, contiguous
    vocab_size,
    logits_row_stride,
    K: tl.constexpr,  # number of beliefs, 0 = forget log-probs only
    LOG_K_PAD: tl.constexpr,  # K_PAD = 2^LOG_K_PAD >= K slots
    LOG_GROUPS: tl.constexpr,  # vectors per lane per step
    LOG_LANES: tl.constexpr,  # lanes (threads) per row: 32 * num_warps
    LOG_VEC: tl.constexpr,  # contiguous logits per lane per vector (16 bytes)
    IS_FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    lane_max, lane_sum, top_keys = _lanes_slice(
        row_ptr, 0, vocab_size, K, LOG_K_PAD, LOG_GROUPS, LOG_LANES, LOG_VEC, IS_FP64
    )
    # The lanes' partials, combined once per row. A row of only -inf has row_sum = 0: log_sum = log(0) = -inf.
    row_max, row_sum = _combine_lanes(lane_max, lane_sum, IS_FP64)
    # 3. beliefs: the unsorted top sorted descending once per row (padding slots last)
    if K > 0:
        slots = tl.arange(0, 1 << LOG_K_PAD)
        top_keys = _top_keys(tl.where(slots < K, top_keys, MIN_KEY), LOG_K_PAD, LOG_K_PAD, 1)
    _store_row(
        row,
        row_ptr,
        row_max,
        tl.log(row_sum),
        top_keys,
        labels_ptr,
        row_max_ptr,
        log_sum_ptr,
        label_logits_ptr,
        belief_logits_ptr,
        belief_ids_ptr,
        K,
        LOG_K_PAD,
        IS_FP64,
    )


@triton.jit
def bs_rows_forward_split_kernel(
    logits_ptr,  # [N, V] any float dtype, unit stride along V
    partial_max_ptr,  # [N, S] out, compute dtype: the slice's max
    partial_sum_ptr,  # [N, S] out, compute dtype: the slice's sum of exp(z - max)
    partial_keys_ptr,  # [N, S, K] out, int64: the slice's k best keys (global column ids), unsorted
    vocab_size,
    logits_row_stride,
    slice_len,  # columns per slice, a multiple of BLOCK_V; slice s is [s * slice_len, (s + 1) * slice_len) & [0, V)
    K: tl.constexpr,
    LOG_K_PAD: tl.constexpr,
    LOG_GROUPS: tl.constexpr,
    LOG_LANES: tl.constexpr,
    LOG_VEC: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """The split-vocabulary forward, grid (row, slice): the per-lane loop over one slice of a row; the partials go
    to bs_rows_merge_kernel."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    slices = tl.num_programs(1)
    start = part * slice_len
    end = tl.minimum(start + slice_len, vocab_size)
    lane_max, lane_sum, top_keys = _lanes_slice(
        logits_ptr + row * logits_row_stride, start, end, K, LOG_K_PAD, LOG_GROUPS, LOG_LANES, LOG_VEC, IS_FP64
    )
    slice_max, slice_sum = _combine_lanes(lane_max, lane_sum, IS_FP64)
    partial = row * slices + part
    tl.store(partial_max_ptr + partial, slice_max)
    tl.store(partial_sum_ptr + partial, slice_sum)
    if K > 0:
        slots = tl.arange(0, 1 << LOG_K_PAD)
        tl.store(partial_keys_ptr + partial * K + slots, top_keys, mask=slots < K)


@triton.jit
def bs_rows_merge_kernel(
    logits_ptr,  # [N, V] any float dtype, unit stride along V (z_y and the belief values are re-read from it)
    labels_ptr,  # [N] int64, -1 = ignored
    partial_max_ptr,  # [N, S] from bs_rows_forward_split_kernel
    partial_sum_ptr,  # [N, S]
    partial_keys_ptr,  # [N, S, K]
    row_max_ptr,  # [N] out, compute dtype
    log_sum_ptr,  # [N] out, compute dtype
    label_logits_ptr,  # [N] out, compute dtype
    belief_logits_ptr,  # [N, K] out, compute dtype, contiguous
    belief_ids_ptr,  # [N, K] out, int64, contiguous
    logits_row_stride,
    slices,  # S
    K: tl.constexpr,
    LOG_K_PAD: tl.constexpr,
    LOG_SLICES_PAD: tl.constexpr,  # 2^LOG_SLICES_PAD >= S
    IS_FP64: tl.constexpr,
):
    """One program per row: the slices' (max, sum) partials combined as the lanes' are, and the k best of the
    S * k candidate keys (each slice's k best hold the row's: a logit of the row's top k is in its slice's top k)."""
    row = tl.program_id(0).to(tl.int64)
    compute_dtype = tl.float64 if IS_FP64 else tl.float32
    parts = tl.arange(0, 1 << LOG_SLICES_PAD)
    in_row = parts < slices
    partial_max = tl.load(partial_max_ptr + row * slices + parts, mask=in_row, other=float("-inf"))
    partial_sum = tl.load(partial_sum_ptr + row * slices + parts, mask=in_row, other=0.0)
    row_max, row_sum = _combine_lanes(partial_max.to(compute_dtype), partial_sum.to(compute_dtype), IS_FP64)
    top_keys = tl.zeros([1 << LOG_K_PAD], tl.int64)
    if K > 0:
        slots = tl.arange(0, 1 << LOG_K_PAD)
        offsets = (row * slices + parts[:, None]) * K + slots[None, :]
        keys = tl.load(partial_keys_ptr + offsets, mask=in_row[:, None] & (slots[None, :] < K), other=MIN_KEY)
        top_keys = _top_keys(
            tl.reshape(keys, [1 << (LOG_SLICES_PAD + LOG_K_PAD)]), LOG_SLICES_PAD + LOG_K_PAD, LOG_K_PAD, 1
        )
    _store_row(
        row,
        logits_ptr + row * logits_row_stride,
        row_max,
        tl.log(row_sum),
        top_keys,
        labels_ptr,
        row_max_ptr,
        log_sum_ptr,
        label_logits_ptr,
        belief_logits_ptr,
        belief_ids_ptr,
        K,
        LOG_K_PAD,
        IS_FP64,
    )


@triton.jit
def bs_rows_backward_kernel(
    grad_ptr,  # [N, V] out, the logits' dtype (may be the logits' own storage)
    logits_ptr,  # [N, V]
    row_max_ptr,  # [N] compute dtype, finite
    log_sum_ptr,  # [N] compute dtype, finite
    grad_rows_ptr,  # [N] compute dtype, 0 on ignored rows
    vocab_size,
    logits_row_stride,
    grad_row_stride,
    BLOCK_V: tl.constexpr,
):
    """grad[i, :] = -exp((z_i - m_i) - log_sum_i) * grad_rows[i]; the target terms are added by the fixup kernel."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < vocab_size
    grad_row = tl.load(grad_rows_ptr + row)
    out_ptrs = grad_ptr + row * grad_row_stride + cols
    if grad_row == 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=in_row)
    else:
        row_max = tl.load(row_max_ptr + row)
        scale = -grad_row * tl.exp(-tl.load(log_sum_ptr + row))
        z = tl.load(logits_ptr + row * logits_row_stride + cols, mask=in_row, other=float("-inf")).to(row_max.dtype)
        # exp(-inf - m) = 0: masked vocabulary entries get a zero gradient, never a NaN.
        grad = tl.exp(z - row_max) * scale
        tl.store(out_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def bs_rows_backward_fixup_kernel(
    grad_ptr,  # [N, V] the dense kernel's output
    labels_ptr,  # [N] int64, -1 = ignored
    row_max_ptr,  # [N] compute dtype
    log_sum_ptr,  # [N] compute dtype
    grad_rows_ptr,  # [N] compute dtype
    label_coefs_ptr,  # [N] compute dtype: grad_row * (1 - lam)
    label_logits_ptr,  # [N] compute dtype: z_y gathered before the dense launch
    belief_ids_ptr,  # [N, K] int64, contiguous
    belief_weights_ptr,  # [N, K] compute dtype, contiguous
    belief_logits_ptr,  # [N, K] compute dtype, contiguous, gathered before the dense launch
    grad_row_stride,
    K,
    K_PAD: tl.constexpr,
):
    """Rewrite the label and belief entries: grad = grad_row * (target weight - pi), each rounded once."""
    row = tl.program_id(0).to(tl.int64)
    grad_row = tl.load(grad_rows_ptr + row)
    label = tl.load(labels_ptr + row)
    if grad_row != 0:
        row_max = tl.load(row_max_ptr + row)
        log_sum = tl.load(log_sum_ptr + row)
        out_row_ptr = grad_ptr + row * grad_row_stride
        slots = tl.arange(0, K_PAD)
        is_belief = slots < K
        belief_ids = tl.load(belief_ids_ptr + row * K + slots, mask=is_belief, other=-1)
        belief_weights = tl.load(belief_weights_ptr + row * K + slots, mask=is_belief, other=0.0)
        belief_logits = tl.load(belief_logits_ptr + row * K + slots, mask=is_belief, other=float("-inf"))
        belief_grads = (belief_weights - tl.exp((belief_logits - row_max) - log_sum)) * grad_row
        # The label's entry is written once, below, with its belief weight folded in (two stores to one address
        # from different threads of a program would race).
        is_label = belief_ids == label
        tl.store(
            out_row_ptr + belief_ids,
            belief_grads.to(grad_ptr.dtype.element_ty),
            mask=is_belief & (belief_ids != label),
        )
        if label >= 0:
            label_belief_weight = tl.sum(tl.where(is_belief & is_label, belief_weights, 0.0), 0)
            label_logit = tl.load(label_logits_ptr + row)
            label_pi = tl.exp((label_logit - row_max) - log_sum)
            label_grad = tl.load(label_coefs_ptr + row) + (label_belief_weight - label_pi) * grad_row
            tl.store(out_row_ptr + label, label_grad.to(grad_ptr.dtype.element_ty))
