/* The walk of `_introsort` in C: the partitions torch's CPU sort (libstdc++'s std::sort) and topk
 * (std::nth_element) make along the segments that hold the places lo and hi, followed for a few
 * entries. The rules, and the numpy walk this one must agree with, are in _introsort.py; the tests run
 * both against torch. Optional: where this module is not built, the numpy walk runs.
 *
 * walk(keys, lo, hi, final, tied, origin, kept, ids) -> bool
 *   keys    writable contiguous int16 or int32 (itemsize 2 or 4), scrambled as the sort scrambles it
 *   tied    a tuple of the one or two keys of the followed entries
 *   origin  int64, the followed entries' places, ascending
 *   kept    writable uint8, one per followed entry: set to 1 where the entry ends in [lo, hi)
 *   ids     writable int32, room for the numbers of a segment's entries (`WALK_IDS`): segments that fit
 *           are walked with them (the caller's memory: `_introsort.scratch` reuses it; n / 2 entries)
 * False where a segment that decides would be heapsorted (kept is then incomplete); RuntimeError where
 * `origin` is not every entry holding a tied key.
 *
 * histogram(keys, counts): counts[key + 32768] += 1 for each int16 key (65536 int64 counts), for
 * `_select.histogram16` (`_introsort.keys_at`, the `index` cuts): 0.5 ns an entry, where torch's bincount of the keys
 * widened to int32 took 3-4 (and one int64 histogram 0.67).
 *
 * vectors(on) -> bool: the stops found with AVX2 (where the CPU has it) or not from now on (tests).
 *
 * The followed entries of a segment are a run of `Entry` (place, number) sorted by place. A place moves
 * at most once in a partition, and left stops rise while right stops fall, so a moved entry is found
 * in the run by a cursor from each end (a binary search per move cost a third of the walk where 1 in
 * 70 entries is followed); the runs of the two parts are merged from the entries that stayed and
 * those moved in, which come in order. That costs O(followed) a partition, and most partitions keep
 * nearly all of them (they share one key, and only a pivot of that key splits them), so once a segment
 * fits the caller's `ids` (half the entries) its numbers ride beside its keys instead (`WALK_IDS`):
 * every move moves an int32 too, and nothing is looked up or merged. Held: 49 bytes a followed entry
 * (three runs and a flag), and the caller's ids.
 * Measured (one thread, AVX2 stops; 2.9M bf16 magnitudes, 1 in 70 followed, half kept): the whole
 * `_introsort.select` (histogram and ties found) 11-12 ms with runs only (15.5 before the AVX2 stops),
 * numpy's 32; of that walk, for 6.8M entries partitioned in 19 partitions: the stops 1.5-2.5 ms, 1.67M
 * pairs swapped 3.5-5.5 ms, the 118k pairs that moved a followed key 1.1-1.6, the runs merged 1.0-1.5.
 * With ids from half the entries and a settled part's stops copied, not swapped: 16 walks of 4 of the
 * 168M job's tensors (bf16, 1M to 33M entries, top 20/50/90 % and breadcrumbs' two ends) 420-434 ms
 * against 577 with runs only (a quarter of the entries: 452-467; all of them: 526-531, the ids' fresh
 * pages cleared by the kernel). */
#ifdef KEY_T

/* The steps both walks share, on their own locals (macros: the loops stay one function's, their state in
   registers). MEDIAN: `__move_median_to_first(first, first + 1, mid, last - 1)`'s choice, comp(x, y) = x > y.
   REFILL_STOPS: a side's stops found for its next block once it has paired all it had (`STOPS_LEFT`,
   `STOPS_RIGHT`: AVX2 compares, or a loop without branches: one that branches on each key mispredicts half
   of them, 13 ns an entry), `continue` after it; `break` with `cut` set where the partition ends. PAIRS: the
   pairs of the two blocks' stops, MOVE(tied) made for each, in a loop that branches only where they cross.
   PAIRED: the scans moved past the pairs made (the last pair swapped: they stop short of it), `break` with
   `cut` set where they crossed. */
#define MEDIAN()                                                                                    \
    int64_t mid = start + (end - start) / 2, median;                                                \
    KEY_T x = keys[start + 1], y = keys[mid], z = keys[end - 1];                                    \
    if (x > y)                                                                                      \
        median = y > z ? mid : x > z ? end - 1 : start + 1;                                         \
    else                                                                                            \
        median = x > z ? start + 1 : y > z ? end - 1 : mid;
#define REFILL_STOPS()                                                                              \
    if (il == nl) {                                                                                 \
        if (seen_left >= last_) {                                                                   \
            cut = last_;                                                                            \
            break;                                                                                  \
        }                                                                                           \
        int64_t stop = seen_left + BLOCK < last_ ? seen_left + BLOCK : last_;                       \
        nl = STOPS_LEFT(keys + seen_left, (int)(stop - seen_left), pivot, stops_left);              \
        il = 0;                                                                                     \
        base_left = seen_left;                                                                      \
        seen_left = stop;                                                                           \
        continue;                                                                                   \
    }                                                                                               \
    if (ir == nr) {                                                                                 \
        if (seen_right <= first_) {                                                                 \
            int64_t left = base_left + stops_left[il];                                              \
            cut = left < last_ ? left : last_;                                                      \
            break;                                                                                  \
        }                                                                                           \
        int64_t begin = seen_right - BLOCK > first_ ? seen_right - BLOCK : first_;                  \
        nr = STOPS_RIGHT(keys + begin, (int)(seen_right - begin), pivot, stops_right);              \
        ir = 0;                                                                                     \
        base_right = begin;                                                                         \
        seen_right = begin;                                                                         \
        continue;                                                                                   \
    }
#define PAIRS(MOVE, tied)                                     \
    for (; t < pairs; t++) {                                  \
        left = base_left + stops_left[il + t];                \
        right = base_right + stops_right[ir + t];             \
        if (!(left < right)) {                                \
            crossed = 1;                                      \
            break;                                            \
        }                                                     \
        MOVE(tied)                                            \
    }
#define PAIRED()                                                                                    \
    il += t;                                                                                        \
    ir += t;                                                                                        \
    if (t) {                                                                                        \
        first_ = base_left + stops_left[il - 1] + 1;                                                \
        last_ = base_right + stops_right[ir - 1];                                                   \
    }                                                                                               \
    if (crossed) {                                                                                  \
        cut = left < last_ ? left : last_;                                                          \
        break;                                                                                      \
    }

/* The final insertion sort of a segment of at most 16 entries, stable, descending: values[i] is the key that
   ends at its offset i, from[i] the offset it came from. */
static inline void SORT_FINAL(const KEY_T *keys, int64_t length, KEY_T *values, int64_t *from)
{
    for (int64_t i = 0; i < length; i++) {
        KEY_T v = keys[i];
        int64_t j = i;
        while (j > 0 && v > values[j - 1]) {
            values[j] = values[j - 1];
            from[j] = from[j - 1];
            j--;
        }
        values[j] = v;
        from[j] = i;
    }
}

/* The walk of the segment [start0, end0) with its followed entries' numbers carried beside the keys:
   `ids[p - start0]` is the number of the followed entry at place p (read only where keys[p] is tied),
   moved with every key the partitions move, so a move costs a load and a store more and nothing is
   looked up or merged (the runs cost O(followed) a partition: a quarter of the walk). Held: 4 bytes an
   entry of the segment, so `WALK` hands a segment over once it fits `ids`. A segment's
   followed count is carried on the stack: a settled part has none, else the left part is counted. */
static int WALK_IDS(KEY_T *keys, int64_t start0, int64_t end0, int budget0, int64_t count0, int64_t lo, int64_t hi,
                    int64_t final, KEY_T tied0, KEY_T tied1, int32_t *ids, uint8_t *kept)
{
#define TIED(k) ((k) == tied0 || (k) == tied1)
#define ID(p) ids[(p) - start0]
    uint16_t stops_left[BLOCK + 16], stops_right[BLOCK + 16];
    Segment stack[256];
    int top = 0;
    stack[top++] = (Segment){start0, end0, budget0, count0, 0};
    while (top) {
        Segment s = stack[--top];
        int64_t start = s.start, end = s.end, count = s.a;
        if (!count || end <= lo || hi <= start)
            continue;
        if (lo <= start && end <= hi) {  /* kept whole */
            for (int64_t p = start; p < end; p++)
                if (TIED(keys[p]))
                    kept[ID(p)] = 1;
            continue;
        }
        if (end - start <= final) {  /* the final insertion sort: stable, descending */
            KEY_T values[16];
            int64_t from[16], length = end - start;
            SORT_FINAL(keys + start, length, values, from);
            for (int64_t i = 0; i < length; i++)  /* (the entry first at start + from[i] ends at start + i) */
                if (TIED(values[i]))
                    kept[ID(start + from[i])] = lo <= start + i && start + i < hi;
            continue;
        }
        if (s.budget == 0)
            return 0;
        MEDIAN()
        KEY_T first = keys[start];
        int32_t first_id = ID(start);
        keys[start] = keys[median];
        ID(start) = ID(median);
        keys[median] = first;
        ID(median) = first_id;
        KEY_T pivot = keys[start];
        int settled = tied0 < pivot && tied1 < pivot ? SETTLED_LEFT : tied0 > pivot && tied1 > pivot ? SETTLED_RIGHT : 0;
        int64_t first_ = start + 1, last_ = end, seen_left = first_, seen_right = end, cut;
        int64_t nl = 0, il = 0, nr = 0, ir = 0, base_left = 0, base_right = 0;
        for (;;) {
            REFILL_STOPS()
            int64_t pairs = nl - il < nr - ir ? nl - il : nr - ir, left = 0, right = 0, crossed = 0, t = 0;
#define TO_RIGHT(_) keys[right] = keys[left]; ID(right) = ID(left);
#define TO_LEFT(_) keys[left] = keys[right]; ID(left) = ID(right);
#define SWAP(_)                                                                                     \
        KEY_T k = keys[left];                                                                       \
        int32_t i = ID(left);                                                                       \
        keys[left] = keys[right];                                                                   \
        ID(left) = ID(right);                                                                       \
        keys[right] = k;                                                                            \
        ID(right) = i;
            if (settled == SETTLED_LEFT) {
                PAIRS(TO_RIGHT, _)
            } else if (settled == SETTLED_RIGHT) {
                PAIRS(TO_LEFT, _)
            } else {
                PAIRS(SWAP, _)
            }
#undef TO_RIGHT
#undef TO_LEFT
#undef SWAP
            PAIRED()
        }
        int64_t in_left = settled == SETTLED_LEFT ? 0 : settled == SETTLED_RIGHT ? count : -1;
        if (in_left < 0) {  /* (the pivot a followed key, or between two: the left part's followed counted) */
            in_left = 0;
            for (int64_t p = start; p < cut; p++)
                in_left += TIED(keys[p]);
        }
        if (top + 2 > 256)
            return 0;
        stack[top++] = (Segment){start, cut, s.budget - 1, in_left, 0};
        stack[top++] = (Segment){cut, end, s.budget - 1, count - in_left, 0};
    }
    return 1;
#undef TIED
#undef ID
}

static int WALK(KEY_T *keys, int64_t n, int64_t lo, int64_t hi, int64_t final, const KEY_T *tied, int ntied,
                Entry *run, int64_t m, Entry *scratch, Entry *merged, uint8_t *gone, uint8_t *kept, int32_t *ids,
                int64_t ids_size)
{
#define TIED(k) ((k) == tied0 || (k) == tied1)
#define ONE_TIED(k) ((k) == tied0)
    const KEY_T tied0 = tied[0], tied1 = ntied > 1 ? tied[1] : tied[0];  /* (locals: stores to keys may alias tied) */
    int depth = 0;
    for (int64_t size = n; size > 1; size >>= 1)
        depth++;
    uint16_t stops_left[BLOCK + 16], stops_right[BLOCK + 16];  /* (+16: a vector store may run past the last) */
    uint16_t moved[BLOCK];
    Segment stack[256];
    int top = 0;
    stack[top++] = (Segment){0, n, 2 * depth, 0, m};
    while (top) {
        Segment s = stack[--top];
        int64_t start = s.start, end = s.end, a = s.a, b = s.b, count = b - a;
        if (!count || end <= lo || hi <= start)
            continue;  /* nothing followed, or dropped whole */
        if (lo <= start && end <= hi) {  /* kept whole */
            for (int64_t i = a; i < b; i++)
                kept[run[i].number] = 1;
            continue;
        }
        if (end - start <= ids_size && end - start > final) {  /* the rest carried beside the keys */
            int64_t held = 0;  /* (every tied key's id must be written: a missing one would index past kept) */
            for (int64_t p = start; p < end; p += 1 << 20) {  /* (int32 sums of chunks: a vectorized loop) */
                int32_t chunk = 0;
                for (int64_t q = p, e = end - p < 1 << 20 ? end : p + (1 << 20); q < e; q++)
                    chunk += (keys[q] == tied0) | (keys[q] == tied1);
                held += chunk;
            }
            if (held != count)
                return -1;
            for (int64_t i = a; i < b; i++)
                ids[run[i].place - start] = (int32_t)run[i].number;
            int done = WALK_IDS(keys, start, end, s.budget, count, lo, hi, final, tied0, tied1, ids, kept);
            if (done <= 0)
                return done;
            continue;
        }
        if (end - start <= final) {  /* the final insertion sort: stable, descending */
            KEY_T values[16];
            int64_t from[16], rank[16], length = end - start;
            SORT_FINAL(keys + start, length, values, from);
            for (int64_t i = 0; i < length; i++) {
                keys[start + i] = values[i];
                rank[from[i]] = i;
            }
            for (int64_t i = a; i < b; i++) {
                int64_t place = start + rank[run[i].place - start];
                kept[run[i].number] = lo <= place && place < hi;
            }
            continue;
        }
        if (s.budget == 0)
            return 0;
        /* __move_median_to_first(first, first + 1, mid, last - 1), comp(x, y) = x > y */
        MEDIAN()
        KEY_T first = keys[start], chosen = keys[median];
        keys[start] = chosen;
        keys[median] = first;
        Entry *r = run + a;
        int followed_first = TIED(first) && r[0].place == start;
        int64_t at_median = TIED(chosen) ? find(r, count, median) : -1;
        if (TIED(chosen) && at_median < 0)
            return -1;
        if (followed_first && at_median >= 0) {
            int64_t number = r[0].number;
            r[0].number = r[at_median].number;
            r[at_median].number = number;
        } else if (followed_first) {
            replace(r, count, 0, median);
        } else if (at_median >= 0) {
            replace(r, count, at_median, start);
        }
        /* __unguarded_partition(first + 1, last, first), its stops found a block at a time (`STOPS_LEFT`, `STOPS_RIGHT`:
           AVX2 compares, or a loop without branches: one that branches on each key mispredicts half
           of them, 13 ns an entry) and then paired: Lₜ and Rₜ swap while Lₜ < Rₜ; the left part ends
           at min(Lₜ, Rₜ₋₁) for the first t where not. Entries not yet swapped: [first, last); scanned
           for stops: [first, seen_left), [seen_right, last). A stop is an offset from its block's start. */
        KEY_T pivot = keys[start];
        /* which part is settled whole, its order no longer read (`_walk.Followed.settles`): the left one
           where every followed key is below the pivot (its entries are all above them: the right part
           holds every followed entry and the left lies before the range's end), the right one where
           every followed key is above it */
        int settled = tied0 < pivot && tied1 < pivot ? SETTLED_LEFT : tied0 > pivot && tied1 > pivot ? SETTLED_RIGHT : 0;
        int64_t first_ = start + 1, last_ = end, seen_left = first_, seen_right = end, cut;
        int64_t in_left = 0, in_right = 0, nl = 0, il = 0, nr = 0, ir = 0, at_left = 0, at_right = count - 1;
        int64_t base_left = 0, base_right = 0;
        for (;;) {
            REFILL_STOPS()
            /* the pairs of these two blocks' stops, in a loop that branches only where they cross; the
               pairs that moved a followed key are noted (without a branch: 1 in 14 pairs here, a
               branch on them mispredicted a third of the loop's time) and followed after. Where a part
               is settled whole (`settled`), the stop on its side is only copied into the other part. */
            int64_t pairs = nl - il < nr - ir ? nl - il : nr - ir, left = 0, right = 0, crossed = 0, t = 0;
            int noted = 0;
#define SWAP(tied)                                            \
        moved[noted] = (uint16_t)t;                           \
        KEY_T from_left = keys[left], from_right = keys[right]; \
        keys[left] = from_right;                              \
        keys[right] = from_left;                              \
        noted += tied(from_right) | tied(from_left);
#define TO_RIGHT(tied)                                        \
        moved[noted] = (uint16_t)t;                           \
        KEY_T from_left = keys[left];                         \
        keys[right] = from_left;                              \
        noted += tied(from_left);
#define TO_LEFT(tied)                                         \
        moved[noted] = (uint16_t)t;                           \
        KEY_T from_right = keys[right];                       \
        keys[left] = from_right;                              \
        noted += tied(from_right);
            if (settled == SETTLED_LEFT) {
                if (tied0 == tied1) { PAIRS(TO_RIGHT, ONE_TIED) } else { PAIRS(TO_RIGHT, TIED) }
            } else if (settled == SETTLED_RIGHT) {
                if (tied0 == tied1) { PAIRS(TO_LEFT, ONE_TIED) } else { PAIRS(TO_LEFT, TIED) }
            } else if (tied0 == tied1) {  /* (one key followed: one compare a key, 1.5 times as fast) */
                PAIRS(SWAP, ONE_TIED)
            } else {
                PAIRS(SWAP, TIED)
            }
#undef SWAP
#undef TO_RIGHT
#undef TO_LEFT
            for (int i = 0; i < noted; i++) {
                int64_t to_left = base_left + stops_left[il + moved[i]];
                int64_t to_right = base_right + stops_right[ir + moved[i]];
                /* (came from the right; right stops fall: a cursor from the run's end. A settled side's
                   place was not written: its key is stale) */
                if (settled != SETTLED_LEFT && TIED(keys[to_left])) {
                    while (at_right >= 0 && r[at_right].place > to_right)
                        at_right--;
                    if (at_right < 0 || r[at_right].place != to_right)
                        return -1;
                    gone[a + at_right] = 1;
                    scratch[a + in_left++] = (Entry){to_left, r[at_right].number};
                }
                if (settled != SETTLED_RIGHT && TIED(keys[to_right])) {  /* (came from the left: a cursor from the start) */
                    while (at_left < count && r[at_left].place < to_left)
                        at_left++;
                    if (at_left >= count || r[at_left].place != to_left)
                        return -1;
                    gone[a + at_left] = 1;
                    scratch[b - 1 - in_right++] = (Entry){to_right, r[at_left].number};
                }
            }
            PAIRED()
        }
        /* the parts' runs: the entries that stayed merged with those moved in (left places rise as they
           are filled, right places fall: scratch holds the right part's from b down) */
        Entry *split = merge_part(run, a, b, gone, cut, 0, scratch + a, in_left, merged + a);
        merge_part(run, a, b, gone, cut, 1, scratch + b - in_right, in_right, split);
        memset(gone + a, 0, (size_t)count);
        memcpy(run + a, merged + a, (size_t)count * sizeof(Entry));
        if (top + 2 > 256)
            return 0;
        stack[top++] = (Segment){start, cut, s.budget - 1, a, split - merged};
        stack[top++] = (Segment){cut, end, s.budget - 1, split - merged, b};
    }
    return 1;
#undef TIED
#undef ONE_TIED
}

#undef MEDIAN
#undef REFILL_STOPS
#undef PAIRS
#undef PAIRED

#else  /* the module */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct { int64_t place, number; } Entry;
typedef struct { int64_t start, end; int budget; int64_t a, b; } Segment;
#define BLOCK 512  /* entries scanned for stops at once */
enum { SETTLED_LEFT = 1, SETTLED_RIGHT = 2 };

/* The index in run[0, count) (sorted by place) of the entry at `place`, or -1 (a broken walk). */
static int64_t find(const Entry *run, int64_t count, int64_t place)
{
    int64_t low = 0, high = count;
    while (low < high) {
        int64_t mid = low + (high - low) / 2;
        if (run[mid].place < place)
            low = mid + 1;
        else
            high = mid;
    }
    return low < count && run[low].place == place ? low : -1;
}

/* Move the followed entry at run index j to `place` and keep the run sorted. */
static void replace(Entry *run, int64_t count, int64_t j, int64_t place)
{
    Entry moved = {place, run[j].number};
    while (j + 1 < count && run[j + 1].place < place) {
        run[j] = run[j + 1];
        j++;
    }
    while (j > 0 && run[j - 1].place > place) {
        run[j] = run[j - 1];
        j--;
    }
    run[j] = moved;
}

/* Appends to out the entries of run[a, b) that stayed (gone[i] == 0) on one side of cut (right: at or
   past it), merged by place with `moved` (count of them, in place order); returns the new end. */
static Entry *merge_part(const Entry *run, int64_t a, int64_t b, const uint8_t *gone, int64_t cut, int right,
                         const Entry *moved, int64_t count, Entry *out)
{
    int64_t i = a, j = 0;
    for (;;) {
        while (i < b && (gone[i] || (run[i].place >= cut) != right))
            i++;
        if (i >= b)
            break;
        while (j < count && moved[j].place < run[i].place)
            *out++ = moved[j++];
        *out++ = run[i++];
    }
    while (j < count)
        *out++ = moved[j++];
    return out;
}

/* The stops of a block, as offsets from its start: left stops (keys not above the pivot) ascending,
   right stops (keys not below it) descending. Returns how many. */
#define SCALAR_STOPS(name, type)                                                           \
    static int name##_left(const type *keys, int from, int count, type pivot, uint16_t *out) \
    {                                                                                       \
        int n = 0;                                                                          \
        for (int i = from; i < count; i++) { /* (from: a vector loop's tail) */               \
            out[n] = (uint16_t)i;                                                           \
            n += !(keys[i] > pivot);                                                        \
        }                                                                                   \
        return n;                                                                           \
    }                                                                                       \
    static int name##_right(const type *keys, int count, type pivot, uint16_t *out)         \
    {                                                                                       \
        int n = 0;                                                                          \
        for (int i = count - 1; i >= 0; i--) {                                              \
            out[n] = (uint16_t)i;                                                           \
            n += !(pivot > keys[i]);                                                        \
        }                                                                                   \
        return n;                                                                           \
    }
SCALAR_STOPS(stops16, int16_t)
SCALAR_STOPS(stops32, int32_t)

#if defined(__x86_64__) && defined(__GNUC__)
/* With AVX2: 16 (8) keys compared at once, their stops written from a table of each byte's set bits
   (`ascending`: the bits' places rising; `descending`: 7 − place, falling), 8 at a time. Measured on a
   2.9M bf16 task vector, one partition: 0.79 ns an entry against 2.0 for the scalar stops. */
#include <immintrin.h>
#define FAST_STOPS 1
static uint16_t ascending[256][8], descending[256][8];
static uint8_t bits[256];
static int have_avx2;

static void tables(void)
{
    for (int m = 0; m < 256; m++) {
        int up = 0, down = 0;
        for (int b = 0; b < 8; b++)
            if (m >> b & 1)
                ascending[m][up++] = (uint16_t)b;
        for (int b = 7; b >= 0; b--)
            if (m >> b & 1)
                descending[m][down++] = (uint16_t)(7 - b);
        bits[m] = (uint8_t)up;
    }
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");
}

/* `mask`'s 8 bits from bit `shift` of 16-lane masks: entries place..place + 7 (left) or place..place − 7 */
#define PUT_UP(mask, place)                                                                               \
    _mm_storeu_si128((__m128i *)(out + n), _mm_add_epi16(_mm_loadu_si128((const __m128i *)ascending[mask]), \
                                                         _mm_set1_epi16((short)(place))));                  \
    n += bits[mask]
#define PUT_DOWN(mask, place)                                                                             \
    _mm_storeu_si128((__m128i *)(out + n), _mm_sub_epi16(_mm_set1_epi16((short)(place)),                  \
                                                         _mm_loadu_si128((const __m128i *)descending[mask]))); \
    n += bits[mask]

__attribute__((target("avx2"))) static int fast16_left(const int16_t *keys, int count, int16_t pivot, uint16_t *out)
{
    __m256i p = _mm256_set1_epi16(pivot);
    int n = 0, i = 0;
    for (; i + 16 <= count; i += 16) {
        __m256i above = _mm256_cmpgt_epi16(_mm256_loadu_si256((const __m256i *)(keys + i)), p);
        unsigned m = ~(unsigned)_mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(above),
                                                                  _mm256_extracti128_si256(above, 1))) & 0xFFFF;
        PUT_UP(m & 255, i);
        PUT_UP(m >> 8, i + 8);
    }
    return n + stops16_left(keys, i, count, pivot, out + n);
}

__attribute__((target("avx2"))) static int fast16_right(const int16_t *keys, int count, int16_t pivot, uint16_t *out)
{
    __m256i p = _mm256_set1_epi16(pivot);
    int n = 0, i = count;
    for (; i >= 16; i -= 16) {
        __m256i below = _mm256_cmpgt_epi16(p, _mm256_loadu_si256((const __m256i *)(keys + i - 16)));
        unsigned m = ~(unsigned)_mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(below),
                                                                  _mm256_extracti128_si256(below, 1))) & 0xFFFF;
        PUT_DOWN(m >> 8, i - 1);
        PUT_DOWN(m & 255, i - 9);
    }
    return n + stops16_right(keys, i, pivot, out + n);
}

__attribute__((target("avx2"))) static int fast32_left(const int32_t *keys, int count, int32_t pivot, uint16_t *out)
{
    __m256i p = _mm256_set1_epi32(pivot);
    int n = 0, i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256i above = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(keys + i)), p);
        unsigned m = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(above)) & 255;
        PUT_UP(m, i);
    }
    return n + stops32_left(keys, i, count, pivot, out + n);
}

__attribute__((target("avx2"))) static int fast32_right(const int32_t *keys, int count, int32_t pivot, uint16_t *out)
{
    __m256i p = _mm256_set1_epi32(pivot);
    int n = 0, i = count;
    for (; i >= 8; i -= 8) {
        __m256i below = _mm256_cmpgt_epi32(p, _mm256_loadu_si256((const __m256i *)(keys + i - 8)));
        unsigned m = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(below)) & 255;
        PUT_DOWN(m, i - 1);
    }
    return n + stops32_right(keys, i, pivot, out + n);
}
/* the offsets of a block's keys equal to t0 or t1, ascending (`places`) */
__attribute__((target("avx2"))) static int fast16_equal(const int16_t *keys, int count, int16_t t0, int16_t t1,
                                                        uint16_t *out)
{
    __m256i a = _mm256_set1_epi16(t0), b = _mm256_set1_epi16(t1);
    int n = 0, i = 0;
    for (; i + 16 <= count; i += 16) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(keys + i));
        __m256i hit = _mm256_or_si256(_mm256_cmpeq_epi16(k, a), _mm256_cmpeq_epi16(k, b));
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(hit),
                                                                 _mm256_extracti128_si256(hit, 1))) & 0xFFFF;
        PUT_UP(m & 255, i);
        PUT_UP(m >> 8, i + 8);
    }
    for (; i < count; i++) {
        out[n] = (uint16_t)i;
        n += keys[i] == t0 || keys[i] == t1;
    }
    return n;
}
#define LEFT(size, keys, count, pivot, out) \
    (have_avx2 ? fast##size##_left(keys, count, pivot, out) : stops##size##_left(keys, 0, count, pivot, out))
#define RIGHT(size, keys, count, pivot, out) \
    (have_avx2 ? fast##size##_right(keys, count, pivot, out) : stops##size##_right(keys, count, pivot, out))
#else
#define LEFT(size, keys, count, pivot, out) stops##size##_left(keys, 0, count, pivot, out)
#define RIGHT(size, keys, count, pivot, out) stops##size##_right(keys, count, pivot, out)
#endif

#define KEY_T int16_t
#define WALK walk16
#define WALK_IDS walk16_ids
#define SORT_FINAL sort_final16
#define STOPS_LEFT(keys, count, pivot, out) LEFT(16, keys, count, pivot, out)
#define STOPS_RIGHT(keys, count, pivot, out) RIGHT(16, keys, count, pivot, out)
#include "_follow.c"
#undef KEY_T
#undef WALK
#undef WALK_IDS
#undef SORT_FINAL
#undef STOPS_LEFT
#undef STOPS_RIGHT
#define KEY_T int32_t
#define WALK walk32
#define WALK_IDS walk32_ids
#define SORT_FINAL sort_final32
#define STOPS_LEFT(keys, count, pivot, out) LEFT(32, keys, count, pivot, out)
#define STOPS_RIGHT(keys, count, pivot, out) RIGHT(32, keys, count, pivot, out)
#include "_follow.c"
#undef KEY_T

static PyObject *walk(PyObject *self, PyObject *args)
{
    Py_buffer keys, origin, kept, room;
    Py_ssize_t lo, hi, final;
    PyObject *tied_keys;
    if (!PyArg_ParseTuple(args, "w*nnnO!y*w*w*", &keys, &lo, &hi, &final, &PyTuple_Type, &tied_keys, &origin, &kept,
                          &room))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t ntied = PyTuple_GET_SIZE(tied_keys), m = origin.len / 8;
    Py_ssize_t n = keys.itemsize ? keys.len / keys.itemsize : 0;
    long long tied[2] = {0, 0};
    Entry *run = NULL, *scratch = NULL, *merged = NULL;
    uint8_t *gone = NULL;
    if ((keys.itemsize != 2 && keys.itemsize != 4) || ntied < 1 || ntied > 2 || kept.len != m || final > 16
        || origin.len % 8 || room.itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "walk: int16 or int32 keys, one or two tied keys, int64 origin, "
                                          "a uint8 kept per followed entry, final ≤ 16, int32 ids");
        goto done;
    }
    for (Py_ssize_t i = 0; i < ntied; i++) {
        tied[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tied_keys, i));
        if (tied[i] == -1 && PyErr_Occurred())
            goto done;
    }
    int32_t *ids = room.buf;  /* segments up to its size carried with ids (`WALK_IDS`); numbers fit int32 */
    int64_t ids_size = m <= INT32_MAX ? room.len / 4 : 0;
    run = PyMem_RawMalloc((size_t)(m ? m : 1) * sizeof(Entry));
    scratch = PyMem_RawMalloc((size_t)(m ? m : 1) * sizeof(Entry));
    merged = PyMem_RawMalloc((size_t)(m ? m : 1) * sizeof(Entry));
    gone = PyMem_RawCalloc((size_t)(m ? m : 1), 1);
    if (!run || !scratch || !merged || !gone) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *places = origin.buf;
    for (Py_ssize_t i = 0; i < m; i++)
        run[i] = (Entry){places[i], i};
    memset(kept.buf, 0, (size_t)m);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    if (keys.itemsize == 2) {
        int16_t t[2] = {(int16_t)tied[0], (int16_t)tied[1]};
        ok = walk16(keys.buf, n, lo, hi, final, t, (int)ntied, run, m, scratch, merged, gone, kept.buf, ids, ids_size);
    } else {
        int32_t t[2] = {(int32_t)tied[0], (int32_t)tied[1]};
        ok = walk32(keys.buf, n, lo, hi, final, t, (int)ntied, run, m, scratch, merged, gone, kept.buf, ids, ids_size);
    }
    Py_END_ALLOW_THREADS
    if (ok < 0)
        PyErr_SetString(PyExc_RuntimeError, "walk: a moved entry was not found among the followed ones");
    else
        result = PyBool_FromLong(ok);
done:
    PyMem_RawFree(run);
    PyMem_RawFree(scratch);
    PyMem_RawFree(merged);
    PyMem_RawFree(gone);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&origin);
    PyBuffer_Release(&kept);
    PyBuffer_Release(&room);
    return result;
}

static PyObject *histogram(PyObject *self, PyObject *args)
{
    Py_buffer keys, counts;
    if (!PyArg_ParseTuple(args, "y*w*", &keys, &counts))
        return NULL;
    if (keys.itemsize != 2 || counts.len != 65536 * 8) {
        PyErr_SetString(PyExc_ValueError, "histogram: int16 keys and 65536 int64 counts");
        PyBuffer_Release(&keys);
        PyBuffer_Release(&counts);
        return NULL;
    }
    const uint16_t *k = keys.buf;
    int64_t *c = counts.buf;
    Py_ssize_t n = keys.len / 2;
    /* two uint32 histograms, even and odd entries, added in after: a bin's increments then wait less on
       the last one's store (33M bf16 magnitudes in blocks of 2²⁰: 0.48 ns an entry against 0.67) */
    uint32_t *h = n > UINT32_MAX ? NULL : PyMem_RawCalloc(2 << 16, sizeof(uint32_t));
    Py_BEGIN_ALLOW_THREADS
    if (h) {
        Py_ssize_t i = 0;
        for (; i + 1 < n; i += 2) {
            h[(uint16_t)(k[i] ^ 0x8000)]++;
            h[(1 << 16) + (uint16_t)(k[i + 1] ^ 0x8000)]++;
        }
        if (i < n)
            h[(uint16_t)(k[i] ^ 0x8000)]++;
        for (int j = 0; j < 1 << 16; j++)
            c[j] += (int64_t)h[j] + h[(1 << 16) + j];
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            c[(uint16_t)(k[i] ^ 0x8000)]++;
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(h);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

/* vectors(on) -> bool: whether the stops are found with AVX2 from now on (on: where the CPU has it;
   off: the scalar loop, for the tests), returning whether they were. */
static PyObject *vectors(PyObject *self, PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p", &on))
        return NULL;
#ifdef FAST_STOPS
    int was = have_avx2;
    have_avx2 = on && __builtin_cpu_supports("avx2");
    return PyBool_FromLong(was);
#else
    Py_RETURN_FALSE;
#endif
}

/* places(keys, tied, out) -> int: the places of the int16 keys equal to one of the one or two `tied`, ascending,
   into int64 `out`; returns how many there are (only the first len(out) are written). With AVX2 16 keys
   compared at once and their places written from a table (`_introsort.Ends`: 0.1 ns an entry against 0.4 for
   numpy's compare and flatnonzero). */
static PyObject *places(PyObject *self, PyObject *args)
{
    Py_buffer keys, out;
    PyObject *tied_keys;
    if (!PyArg_ParseTuple(args, "y*O!w*", &keys, &PyTuple_Type, &tied_keys, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t ntied = PyTuple_GET_SIZE(tied_keys);
    long t[2] = {0, 0};
    if (keys.itemsize != 2 || out.itemsize != 8 || ntied < 1 || ntied > 2) {
        PyErr_SetString(PyExc_ValueError, "places: int16 keys, one or two tied keys, int64 out");
        goto done;
    }
    for (Py_ssize_t i = 0; i < ntied; i++)
        if ((t[i] = PyLong_AsLong(PyTuple_GET_ITEM(tied_keys, i))) == -1 && PyErr_Occurred())
            goto done;
    int16_t t0 = (int16_t)t[0], t1 = (int16_t)t[ntied - 1];
    const int16_t *k = keys.buf;
    int64_t *o = out.buf, n = keys.len / 2, capacity = out.len / 8, found = 0;
    Py_BEGIN_ALLOW_THREADS
    uint16_t offsets[BLOCK + 16];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = (int)(n - start < BLOCK ? n - start : BLOCK), hits = 0;
#ifdef FAST_STOPS
        if (have_avx2)
            hits = fast16_equal(k + start, count, t0, t1, offsets);
        else
#endif
            for (int i = 0; i < count; i++) {
                offsets[hits] = (uint16_t)i;
                hits += k[start + i] == t0 || k[start + i] == t1;
            }
        for (int i = 0; i < hits; i++, found++)
            if (found < capacity)
                o[found] = start + offsets[i];
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(found);
done:
    PyBuffer_Release(&keys);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"vectors", vectors, METH_VARARGS, "vectors(on) -> bool: AVX2 stops from now on (where the CPU has it)"},
    {"walk", walk, METH_VARARGS, "walk(keys, lo, hi, final, tied, origin, kept, ids) -> bool: see _follow.c"},
    {"places", places, METH_VARARGS, "places(keys, tied, out) -> int: the places of the tied keys, see _follow.c"},
    {"histogram", histogram, METH_VARARGS, "histogram(keys, counts): counts[key + 32768] += 1 for int16 keys"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_follow", NULL, -1, methods};

PyMODINIT_FUNC PyInit__follow(void)
{
#ifdef FAST_STOPS
    tables();
#endif
    return PyModule_Create(&module);
}

#endif
