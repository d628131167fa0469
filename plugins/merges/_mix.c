/* The task-vector methods' per-entry steps, each in one pass over the entries with torch's roundings (the
 * same bytes as the torch path). Chief among them task arithmetic's block step (`_mixing.mix_block`: wᵢ·τᵢ,
 * TIES' sign-consensus mean or a plain sum, λ, the base), where the torch path makes up to a dozen passes
 * (products, stacked sums in float32, sign bits, relu, masks, a division, λ, the base), each rounding to
 * the dtype where it does; then SCE's variances and squares and the random drops' L1 sums (at the end).
 * Optional: where this module is not built, the torch path runs; the tests hold the two equal.
 *
 * mix(rule, deltas, weights, normalize, divisor, tail, dtype, out, base, scale, weigh[, masks, factors])
 *   rule       "sum": TIES' sign election (below); "none": Σ δᵢ (task arithmetic, DARE-linear, breadcrumbs);
 *              "sce": SCE's erase, TIES' election with the weights after it (below)
 *   deltas     a tuple of 1 to 16 same-length contiguous buffers (bf16 as int16 bits, or float32)
 *   weights    a tuple of as many floats (the dtype-rounded wᵢ: exact in float32)
 *   normalize  "sum": divide by Σᵢ [δᵢ agrees]·wᵢ (0 becomes 1); "none": by `divisor`
 *   divisor    "none" with normalize: the dtype-rounded Σ wᵢ (1 where |Σ wᵢ| < 1e-8), torch's own sum
 *   tail       the last `tail` entries are summed as torch sums a stack's last entries (more than 4
 *              parts: four interleaved partial sums, `_base.interleaved_tail`)
 *   dtype      "bfloat16" or "float32"
 *   out        writable, the deltas' length and type
 *   base       None, or a buffer like out: out = R(base + R(λ·mixed)), task arithmetic's last step
 *   scale      λ (1: no product)
 *   weigh      the deltas are τᵢ, each first weighted: δᵢ = R(wᵢ·τᵢ) (else they are δᵢ)
 *   masks, factors  (optional) the deltas are the models: τᵢ = R(modelᵢ − base), its entries whose bit
 *              is 0 in maskᵢ = (packed little-order bits, the bit of the block's first entry) set to
 *              +0, then τᵢ = R(τᵢ·factorᵢ); a mask or factor of None: none (DARE's drops and rescale,
 *              read from the models once instead of a torch pass for each step). A mask (above,
 *              below, chosen) drops by magnitude instead, as `_sparsify.Ranked` (TIES' cut); a buffer
 *              of one byte an entry, 0 or 1, is multiplied in (τᵢ·keep, SCE's selection)
 *
 * For each entry (R: round to the dtype, to nearest even; every sum from +0 in float32, part after
 * part):  σ = sign bit of R(Σ δᵢ);  kᵢ = relu(σ·δᵢ);  mixed = σ·R(Σ kᵢ);
 *         with normalize:  d = R(Σ [kᵢ > 0]·wᵢ), d = 1 where d = 0, mixed = R(mixed / d).
 * "sce" (weigh ignored):  mixed = R(Σ R(wᵢ·kᵢ)), σ applied where mixed ≠ 0, d = max(d, R(1e-6)).
 * Each product and sum is exact in float32 before its one rounding where torch's is (wᵢ·τᵢ of two bf16,
 * [kᵢ > 0]·wᵢ), or rounded in float32 first exactly as torch's float32 opmath rounds it (λ·mixed,
 * base + mixed).
 * Measured: three bf16 inputs of 2¹⁷ entries with a base, one thread: 2.6 ns an entry with the AVX2
 * copy, against 15 for the torch path (`_mixing.mix_block`).
 *
 * variance(models, base, dtype, out): SCE's per-entry variance of τᵢ = R(modelᵢ − base) (`sce.variance`).
 * squares(model, base, keep, dtype, out): SCE's R(R(τ·keep)²) into float32 `out` (keep: None or bytes).
 * l1(model, base, bits, first, dtype): (Σ |τ|, Σ kept |τ|) of τ = R(model − base) as floats, summed in float64
 *   in a fixed order (`_sparsify.l1_factor`); kept: the entries whose bit is set in `bits` from bit `first`
 *   (None: all).
 * ranked(keys, draws, thresholds, out): DELLA's drops put in place (`_magprune.draw_keep`) as packed little-order bits:
 *   keys (rows × n, int32 or int64), each row sorted ascending, a magnitude's bit pattern·2ᵏ + its column (k = 16 or
 *   32); draws (rows × n uint32) in rank order; thresholds (n uint32). Bit r·n + column of `out` is set where row r's
 *   draw at the column's rank k is below thresholds[k]: numpy's compare, torch's scatter of the mask to the columns
 *   and numpy's packbits in one pass.
 * magprune(model, base, state, thresholds, out, block): DELLA's drops of rows × n entries of τ = R(model − base)
 *   (bf16) as `ranked` puts them, and each block's (Σ |τ|, Σ kept |τ|) as `l1` sums it (a list, a pair a block of
 *   `block` entries, whole rows and bytes), in one pass from the models: each row's |τ| ranked by counting its bf16
 *   patterns, its draws made by numpy's SFC64 from `state` (4 uint64: a, b, c, counter; advanced in place) as
 *   `_draws.uniform32` makes a block's, compared with `thresholds` (n uint32) in rank order, and the bits into
 *   `out` (those of rows × n entries, the last byte's spare bits 0).
 * tangent(units, mean, dots, weights, dtype, out): multislerp's tangent, out = R(Σᵢ R(wᵢ·R(uᵢ − R(dᵢ·m)))) for
 *   up to four units (the sum from +0 in float32, `stacked_sum`'s), and spherical_end(mean, row, cos, sin, scale,
 *   base, dtype, out): its last step, out = R(R(R(R(m·cos) + R(v·sin))·scale) + base) (base None: no sum), each in
 *   one pass where torch makes four and five (`multislerp.py`).
 * norm(x, dtype): ‖x‖₂ of x converted to float32, as torch's norm kernel takes it (`vector_norm(x.float())`), as a
 *   float (at the end).
 * nearswap(base, other, t, dtype, out): NearSwap's blend in one pass (at the end); False where an input is an inf or
 *   a NaN (out then to be redone).
 * dots(mean, inputs, norms): karcher's ⟨m, R(xᵢ/nᵢ)⟩ of bf16 buffers of one length, in float32 as torch's `dot` sums
 *   them (at the end), a float an input, or None where the sum may not be torch's.
 * keys(model, base, descending, keys, counts): the keys of |τ|, τ = R(model − base) in bf16, and their histogram,
 *   for mergekit's magnitude cuts (`_introsort.keys_of`, `_select.histogram16`, in one pass): keys (int16, the
 *   models' length) the bits of |τ|, every NaN 0x7F81 (after +inf), negated where not `descending`; counts
 *   (65536 int64) += how many of each key (counts[key + 32768]). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")  /* (no fused multiply-add where FMA is enabled: torch rounds twice) */
#endif

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)  /* an AVX2 copy where the CPU has it, chosen at load: 1.4 ns an entry, not 2.4 */
#define CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif

#define MAX_PARTS 16
#define INTERLEAVED 4

static inline float from_bf16(uint16_t bits)
{
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* a float32's bits rounded to bf16's to nearest even, in the high half (the low half 0); on plain words or
   vectors of them (NaNs aside) */
#define BF16_ROUNDED(u) (((u) + 0x7FFFu + (((u) >> 16) & 1u)) & 0xFFFF0000u)

/* torch's vectorized rounding to bf16 (`cvtfp32_bf16`): to nearest even, every NaN to 0xFFFF (its
   scalar path, c10::BFloat16, makes 0x7FC0: a NaN vote elects − in the bulk of a tensor, + in a tail) */
static inline uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t rounded = (uint16_t)(BF16_ROUNDED(u) >> 16);
    return f != f ? 0xFFFF : rounded;  /* (a select: the loops over it vectorize) */
}

#define CHUNK 256  /* entries a step at a time: each step a loop the compiler vectorizes */
#ifdef __GNUC__
#define ALWAYS_INLINE inline __attribute__((always_inline))  /* (into the AVX2 copy too) */
#else
#define ALWAYS_INLINE inline
#endif

/* total[j] = Σᵢ parts[i][j] as torch's stack-sum adds them: part after part from +0, or (interleaved, a
   stack's last entries) in four partial sums p_k = Σ parts[4i + k] over the whole groups of four, the
   rest added to p₀, then ((p₀ + p₁) + p₂) + p₃. */
static ALWAYS_INLINE void sum_parts(float *total, float (*parts)[CHUNK], int n, int count, int interleaved)
{
    float p[INTERLEAVED][CHUNK];
    float *sums[INTERLEAVED] = {total, p[1], p[2], p[3]};
    int groups = interleaved ? n / INTERLEAVED * INTERLEAVED : 0, used = interleaved ? INTERLEAVED : 1;
    for (int k = 0; k < used; k++)
        for (int j = 0; j < count; j++)
            sums[k][j] = 0.0f;
    for (int i = 0; i < n; i++) {
        float *into = sums[i < groups ? i % INTERLEAVED : 0];
        for (int j = 0; j < count; j++)
            into[j] += parts[i][j];
    }
    for (int k = 1; k < used; k++)
        for (int j = 0; j < count; j++)
            total[j] += sums[k][j];
}

static inline float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

typedef struct {
    const void *parts[MAX_PARTS];
    float weight[MAX_PARTS];
    int n, normalize, bf16, weigh, plain;  /* plain: no sign election, Σ δᵢ (÷ divisor) */
    int late;  /* SCE's erase ("sce"): the agreeing kᵢ weighted after the election, +0 kept, a divisor ≥ 1e-6 */
    const void *base;  /* NULL: none */
    float scale, divisor;
    /* parts that are the models (`mix_inputs`): τᵢ = R(partᵢ − base), entries whose bit is 0 in maskᵢ
       set to +0, then τᵢ = R(τᵢ·factorᵢ) */
    int models;
    const uint8_t *mask[MAX_PARTS];  /* NULL: every entry kept */
    const uint8_t *keep[MAX_PARTS];  /* or one byte an entry, 0 or 1, multiplied in (SCE's selection: τ·0) */
    int64_t mask_start[MAX_PARTS];   /* the bit of the block's first entry */
    int has_factor[MAX_PARTS];
    float factor[MAX_PARTS];
    /* or drops by magnitude (`_sparsify.Ranked`): τ kept where not −above ≤ τ ≤ above (a NaN too), then
       dropped where not |τ| < below, and kept again at the chosen places (offsets in the block, sorted) */
    int ranked[MAX_PARTS], has_above[MAX_PARTS], has_below[MAX_PARTS];
    float above[MAX_PARTS], below[MAX_PARTS];
    const int64_t *chosen[MAX_PARTS];
    Py_ssize_t chosen_count[MAX_PARTS];
    Py_ssize_t next_chosen[MAX_PARTS];  /* the first chosen place not yet passed (`mix_chunk` goes in order) */
} Mix;

/* τ after the magnitude drops of part i (+0 where dropped). Without a branch on τ, as `keep_bits`. */
static inline float ranked_keep(const Mix *m, int i, float tau)
{
    uint32_t drop = ((uint32_t)m->has_above[i] & (uint32_t)(tau >= -m->above[i]) & (uint32_t)(tau <= m->above[i]))
                    | ((uint32_t)m->has_below[i] & (uint32_t)!(fabsf(tau) < m->below[i]));
    return bits_float(float_bits(tau) & (drop - 1u));
}

/* All ones where the entry's bit is set, else 0: ANDed into τ's bits it keeps τ or makes +0. (A select
   compiled to a branch on the bit, mispredicted half the time at density 0.5: 13 ns an entry for three
   DARE inputs, against 1.) */
static inline uint32_t keep_bits(const uint8_t *mask, int64_t bit)
{
    return 0u - (uint32_t)(mask[bit >> 3] >> (bit & 7) & 1);
}

/* R(x): to the dtype, to nearest even (bf16), or x (float32) */
static ALWAYS_INLINE float rounded(float x, int bf16)
{
    return bf16 ? from_bf16(to_bf16(x)) : x;
}

/* a chunk of bf16 or float32 entries as floats, and back (rounded to bf16 there). (`mix_chunk` keeps its own
   loops: with these in it, the 168M TIES merge took 10% longer, A/B medians of 6.) */
static ALWAYS_INLINE void load_chunk(float *values, const void *from, Py_ssize_t start, int count, int bf16)
{
    if (bf16)
        for (int j = 0; j < count; j++)
            values[j] = from_bf16(((const uint16_t *)from)[start + j]);
    else
        memcpy(values, (const float *)from + start, (size_t)count * sizeof(float));
}

static ALWAYS_INLINE void store_chunk(void *to, const float *values, Py_ssize_t start, int count, int bf16)
{
    if (bf16)
        for (int j = 0; j < count; j++)
            ((uint16_t *)to)[start + j] = to_bf16(values[j]);
    else
        memcpy((float *)to + start, values, (size_t)count * sizeof(float));
}

/* |τ|'s bf16 pattern, τ = R(model − base): 0 … 0x7F80, every NaN 0x7FFF */
static ALWAYS_INLINE uint16_t magnitude_bits(uint16_t model, uint16_t base)
{
    return to_bf16(from_bf16(model) - from_bf16(base)) & 0x7FFF;
}

/* how many entries the chunk from `start` holds */
static inline int chunk_count(Py_ssize_t entries, Py_ssize_t start)
{
    return entries - start < CHUNK ? (int)(entries - start) : CHUNK;
}

/* τ = R(model − base) for entries [start, start + count) as floats */
static ALWAYS_INLINE void task_vector(float *tau, const void *model, const void *base, Py_ssize_t start, int count,
                                      int bf16)
{
    if (bf16) {
        const uint16_t *t = (const uint16_t *)model + start, *b = (const uint16_t *)base + start;
        for (int j = 0; j < count; j++)
            tau[j] = from_bf16(to_bf16(from_bf16(t[j]) - from_bf16(b[j])));
    } else {
        const float *t = (const float *)model + start, *b = (const float *)base + start;
        for (int j = 0; j < count; j++)
            tau[j] = t[j] - b[j];
    }
}

/* Each byte's eight bits as eight masks (all ones where the bit is set): `drop_by_bits`' whole bytes ANDed with
   one row of it in a loop that vectorizes (the bits shifted out one by one compiled to scalar steps: a third of
   DELLA's mix). Made at import. */
static uint32_t byte_masks[256][8];

static void make_byte_masks(void)
{
    for (int byte = 0; byte < 256; byte++)
        for (int t = 0; t < 8; t++)
            byte_masks[byte][t] = 0u - (uint32_t)(byte >> t & 1);
}

/* values[j] set to +0 where bit first + j of `bits` is 0 (ANDed in: no branch on the bit) */
static ALWAYS_INLINE void drop_by_bits(float *values, const uint8_t *bits, int64_t first, int count)
{
    if (!(first & 7) && !(count & 7))  /* (whole bytes: eight entries a byte) */
        for (int j = 0; j < count; j += 8) {
            const uint32_t *mask = byte_masks[bits[(first + j) >> 3]];
#ifdef __GNUC__  /* (eight lanes at once: gcc did not vectorize the loop below) */
            typedef uint32_t lanes __attribute__((vector_size(32)));
            lanes v, m;
            memcpy(&v, values + j, sizeof v);
            memcpy(&m, mask, sizeof m);
            v &= m;
            memcpy(values + j, &v, sizeof v);
#else
            for (int t = 0; t < 8; t++)
                values[j + t] = bits_float(float_bits(values[j + t]) & mask[t]);
#endif
        }
    else
        for (int j = 0; j < count; j++)
            values[j] = bits_float(float_bits(values[j]) & keep_bits(bits, first + j));
}

/* Entries [start, start + count) (count ≤ CHUNK), step by step: the deltas (made from the models,
   weighted), the votes and their sign bits, the kept values and agreeing weights, their sums (`interleaved`:
   a stack's last entries), the quotient, the scale and base. */
CLONES static void mix_chunk(Mix *m, Py_ssize_t start, int count, int interleaved, void *out)
{
    float delta[MAX_PARTS][CHUNK], agree[MAX_PARTS][CHUNK], votes[CHUNK], mixed[CHUNK], divisor[CHUNK];
    uint32_t sign[CHUNK];
    int n = m->n, bf16 = m->bf16;
    for (int i = 0; i < n; i++) {
        if (m->models) {  /* τᵢ from the model and the base, its mask, its factor */
            task_vector(delta[i], m->parts[i], m->base, start, count, bf16);
            if (m->mask[i])
                drop_by_bits(delta[i], m->mask[i], m->mask_start[i] + start, count);
            if (m->keep[i]) {  /* (exact: τ or ±0, inf·0 a NaN, as torch's product) */
                const uint8_t *keep = m->keep[i] + start;
                for (int j = 0; j < count; j++)
                    delta[i][j] *= (float)keep[j];
            }
            if (m->ranked[i]) {
                for (int j = 0; j < count; j++)
                    delta[i][j] = ranked_keep(m, i, delta[i][j]);
                /* the chosen ties' τ made again (a ranked part has no other drop). The chunks come in order,
                   so the chosen are followed by a cursor: a binary search for each chunk's first, and a
                   copy of τ to restore them from, took a quarter of TIES' mix (2.9M entries, 3 models) */
                const int64_t *chosen = m->chosen[i];
                Py_ssize_t c = m->next_chosen[i];
                for (; c < m->chosen_count[i] && chosen[c] < start + count; c++)
                    task_vector(delta[i] + (chosen[c] - start), m->parts[i], m->base, chosen[c], 1, bf16);
                m->next_chosen[i] = c;
            }
            if (m->has_factor[i]) {
                float f = m->factor[i];
                for (int j = 0; j < count; j++)
                    delta[i][j] *= f;
                if (bf16)
                    for (int j = 0; j < count; j++)
                        delta[i][j] = from_bf16(to_bf16(delta[i][j]));
            }
        } else if (bf16) {
            const uint16_t *d = (const uint16_t *)m->parts[i] + start;
            for (int j = 0; j < count; j++)
                delta[i][j] = bits_float((uint32_t)d[j] << 16);
        } else {
            memcpy(delta[i], (const float *)m->parts[i] + start, (size_t)count * sizeof(float));
        }
        if (m->weigh) {
            float w = m->weight[i];
            if (bf16)
                for (int j = 0; j < count; j++)
                    delta[i][j] = from_bf16(to_bf16(delta[i][j] * w));
            else
                for (int j = 0; j < count; j++)
                    delta[i][j] *= w;
        }
    }
    sum_parts(votes, delta, n, count, interleaved);
    if (m->plain) {
        for (int j = 0; j < count; j++)
            mixed[j] = bf16 ? from_bf16(to_bf16(votes[j])) : votes[j];
        if (m->normalize) {
            for (int j = 0; j < count; j++)
                mixed[j] = mixed[j] / m->divisor;
            if (bf16)
                for (int j = 0; j < count; j++)
                    mixed[j] = from_bf16(to_bf16(mixed[j]));
        }
        goto finish;
    }
    for (int j = 0; j < count; j++)
        sign[j] = (bf16 ? (uint32_t)to_bf16(votes[j]) << 16 : float_bits(votes[j])) & 0x80000000u;
    for (int i = 0; i < n; i++) {
        float w = m->weight[i];
        for (int j = 0; j < count; j++) {
            float k = bits_float(float_bits(delta[i][j]) ^ sign[j]);
            delta[i][j] = k <= 0.0f ? 0.0f : k;  /* relu: a NaN stays */
            agree[i][j] = k > 0.0f ? w : 0.0f;  /* ([kᵢ > 0]·wᵢ: exact, and +0 + −0 = +0) */
        }
        if (m->late) {
            for (int j = 0; j < count; j++)
                delta[i][j] *= w;
            if (bf16)
                for (int j = 0; j < count; j++)
                    delta[i][j] = from_bf16(to_bf16(delta[i][j]));
        }
    }
    sum_parts(mixed, delta, n, count, interleaved);
    sum_parts(divisor, agree, n, count, interleaved);
    if (bf16)
        for (int j = 0; j < count; j++) {
            mixed[j] = from_bf16(to_bf16(mixed[j]));
            divisor[j] = from_bf16(to_bf16(divisor[j]));
        }
    for (int j = 0; j < count; j++)  /* (SCE's keeps a sum of +0 as +0) */
        mixed[j] = bits_float(float_bits(mixed[j]) ^ (m->late && mixed[j] == 0.0f ? 0u : sign[j]));
    if (m->late)  /* clamp(min=1e-6): a NaN stays (1e-6 rounds to the dtype's nearest, which no sum lies below and over) */
        for (int j = 0; j < count; j++)
            divisor[j] = divisor[j] < 1e-6f ? (bf16 ? from_bf16(to_bf16(1e-6f)) : 1e-6f) : divisor[j];
    else
        for (int j = 0; j < count; j++)
            divisor[j] += (float)(divisor[j] == 0.0f);  /* 0 becomes 1, as torch's add */
    if (m->normalize) {
        for (int j = 0; j < count; j++)
            mixed[j] = mixed[j] / divisor[j];
        if (bf16)
            for (int j = 0; j < count; j++)
                mixed[j] = from_bf16(to_bf16(mixed[j]));
    }
finish:
    if (m->scale != 1.0f) {
        float scale = m->scale;
        for (int j = 0; j < count; j++)
            mixed[j] *= scale;
        if (bf16)
            for (int j = 0; j < count; j++)
                mixed[j] = from_bf16(to_bf16(mixed[j]));
    }
    if (m->base) {
        if (bf16) {
            const uint16_t *base = (const uint16_t *)m->base + start;
            for (int j = 0; j < count; j++)
                mixed[j] += bits_float((uint32_t)base[j] << 16);
        } else {
            const float *base = (const float *)m->base + start;
            for (int j = 0; j < count; j++)
                mixed[j] += base[j];
        }
    }
    if (bf16)
        for (int j = 0; j < count; j++)
            ((uint16_t *)out)[start + j] = to_bf16(mixed[j]);
    else
        memcpy((float *)out + start, mixed, (size_t)count * sizeof(float));
}

static PyObject *mix_blocks(PyObject *self, PyObject *args)
{
    PyObject *deltas, *weights, *base_object, *masks = Py_None, *factors = Py_None;
    int normalize, weigh;
    Py_ssize_t tail;
    double scale, divisor;
    const char *rule, *dtype;
    Py_buffer out, base = {0}, parts[MAX_PARTS], mask_buffers[MAX_PARTS];
    int mask_held[MAX_PARTS] = {0};
    Mix mix = {0};
    if (!PyArg_ParseTuple(args, "sO!O!pdnsw*Odp|OO", &rule, &PyTuple_Type, &deltas, &PyTuple_Type, &weights,
                          &normalize, &divisor, &tail, &dtype, &out, &base_object, &scale, &weigh, &masks, &factors))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(deltas), held = 0;
    int bf16 = strcmp(dtype, "bfloat16") == 0, size = bf16 ? 2 : 4, have_base = 0, plain = strcmp(rule, "none") == 0,
        late = strcmp(rule, "sce") == 0;
    PyObject *result = NULL;
    if (n < 1 || n > MAX_PARTS || PyTuple_GET_SIZE(weights) != n || (!bf16 && strcmp(dtype, "float32"))
        || out.len % size || tail < 0 || (!plain && !late && strcmp(rule, "sum"))) {
        PyErr_SetString(PyExc_ValueError, "mix: rule sum, sce or none, 1 to 16 deltas and as many weights, dtype "
                                          "bfloat16 or float32, a tail ≥ 0");
        goto done;
    }
    if (base_object != Py_None) {
        if (PyObject_GetBuffer(base_object, &base, PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        have_base = 1;
        if (base.len != out.len) {
            PyErr_SetString(PyExc_ValueError, "mix: the base and out differ in length");
            goto done;
        }
    }
    while (held < n) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(deltas, held), &parts[held], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        mix.parts[held] = parts[held].buf;
        held++;
        mix.weight[held - 1] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(weights, held - 1));
        if (PyErr_Occurred())
            goto done;
        if (parts[held - 1].len != out.len) {
            PyErr_SetString(PyExc_ValueError, "mix: the deltas and out differ in length");
            goto done;
        }
    }
    if (masks != Py_None || factors != Py_None) {  /* the parts are the models: τᵢ made here (`mix_inputs`) */
        if (!have_base || !PyTuple_Check(masks) || !PyTuple_Check(factors) || PyTuple_GET_SIZE(masks) != n
            || PyTuple_GET_SIZE(factors) != n) {
            PyErr_SetString(PyExc_ValueError, "mix: models need a base, and a mask and a factor (or None) each");
            goto done;
        }
        mix.models = 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *mask = PyTuple_GET_ITEM(masks, i), *factor = PyTuple_GET_ITEM(factors, i), *bits;
            long long first;
            if (mask != Py_None && PyTuple_Check(mask) && PyTuple_GET_SIZE(mask) == 3) {
                /* (above or None, below or None, chosen offsets: sorted int64 in [0, block)) */
                PyObject *above = PyTuple_GET_ITEM(mask, 0), *below = PyTuple_GET_ITEM(mask, 1);
                if (PyObject_GetBuffer(PyTuple_GET_ITEM(mask, 2), &mask_buffers[i], PyBUF_C_CONTIGUOUS) < 0)
                    goto done;
                mask_held[i] = 1;
                Py_ssize_t count = mask_buffers[i].len / 8, entries = out.len / size;
                const int64_t *chosen = mask_buffers[i].buf;
                for (Py_ssize_t c = 0; c < count; c++)
                    if (chosen[c] < 0 || chosen[c] >= entries || (c && chosen[c] <= chosen[c - 1])) {
                        PyErr_SetString(PyExc_ValueError, "mix: chosen places not sorted within the block");
                        goto done;
                    }
                mix.ranked[i] = 1;
                mix.chosen[i] = chosen;
                mix.chosen_count[i] = count;
                if ((mix.has_above[i] = above != Py_None))
                    mix.above[i] = (float)PyFloat_AsDouble(above);
                if ((mix.has_below[i] = below != Py_None))
                    mix.below[i] = (float)PyFloat_AsDouble(below);
                if (PyErr_Occurred())
                    goto done;
            } else if (mask != Py_None && !PyTuple_Check(mask)) {  /* a byte an entry, 0 or 1 */
                if (PyObject_GetBuffer(mask, &mask_buffers[i], PyBUF_C_CONTIGUOUS) < 0)
                    goto done;
                mask_held[i] = 1;
                if (mask_buffers[i].len != out.len / size) {
                    PyErr_SetString(PyExc_ValueError, "mix: a keep mask of another length than its block");
                    goto done;
                }
                mix.keep[i] = mask_buffers[i].buf;
            } else if (mask != Py_None) {  /* (bits, the bit of the block's first entry) */
                if (!PyArg_ParseTuple(mask, "OL", &bits, &first))
                    goto done;
                if (PyObject_GetBuffer(bits, &mask_buffers[i], PyBUF_C_CONTIGUOUS) < 0)
                    goto done;
                mask_held[i] = 1;
                if (first < 0 || (first + out.len / size + 7) / 8 > mask_buffers[i].len) {
                    PyErr_SetString(PyExc_ValueError, "mix: a mask shorter than its block");
                    goto done;
                }
                mix.mask[i] = mask_buffers[i].buf;
                mix.mask_start[i] = first;
            }
            if (factor != Py_None) {
                mix.factor[i] = (float)PyFloat_AsDouble(factor);
                if (PyErr_Occurred())
                    goto done;
                mix.has_factor[i] = 1;
            }
        }
    }
    mix.n = (int)n;
    mix.normalize = normalize;
    mix.bf16 = bf16;
    mix.weigh = weigh && !late;  /* (SCE weighs after the election) */
    mix.late = late;
    mix.base = have_base ? base.buf : NULL;
    mix.scale = (float)scale;  /* (torch's float32 opmath takes a Python float scalar as this float) */
    mix.plain = plain;
    mix.divisor = (float)divisor;  /* (the dtype-rounded Σ wᵢ: exact) */
    Py_ssize_t entries = out.len / size, bulk = entries - (n > INTERLEAVED ? (tail < entries ? tail : entries) : 0);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0, stop; start < entries; start = stop) {
        Py_ssize_t end = start < bulk ? bulk : entries;  /* (the bulk, then the interleaved tail) */
        stop = end - start < CHUNK ? end : start + CHUNK;
        mix_chunk(&mix, start, (int)(stop - start), start >= bulk, out.buf);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&parts[i]);
    for (int i = 0; i < MAX_PARTS; i++)
        if (mask_held[i])
            PyBuffer_Release(&mask_buffers[i]);
    if (have_base)
        PyBuffer_Release(&base);
    PyBuffer_Release(&out);
    return result;
}


/* SCE's variances (`sce.variance`, torch's CPU kernel's Welford updates in float64, one input after the
   other): mean₁ = τ₁, m2₁ = 0; δ = τᵢ − meanᵢ₋₁, meanᵢ = meanᵢ₋₁ + δ/i, m2ᵢ = m2ᵢ₋₁ + δ·(τᵢ − meanᵢ);
   var = m2ₙ/n, to float32, to the dtype. */
CLONES static void variance_chunk(const void *const *models, int n, const void *base, Py_ssize_t start, int count,
                                  int bf16, void *out)
{
    double mean[CHUNK], m2[CHUNK];
    float tau[CHUNK];
    task_vector(tau, models[0], base, start, count, bf16);
    for (int j = 0; j < count; j++) {
        mean[j] = tau[j];
        m2[j] = 0.0;
    }
    for (int i = 1; i < n; i++) {
        double k = i + 1, inverse = 1.0 / k;
        task_vector(tau, models[i], base, start, count, bf16);
        if ((i + 1) & i)  /* (k a power of two: δ·(1/k) is δ/k exactly, a product instead of a division) */
            for (int j = 0; j < count; j++) {
                double x = tau[j], delta = x - mean[j];
                mean[j] += delta / k;
                m2[j] += delta * (x - mean[j]);
            }
        else
            for (int j = 0; j < count; j++) {
                double x = tau[j], delta = x - mean[j];
                mean[j] += delta * inverse;
                m2[j] += delta * (x - mean[j]);
            }
    }
    for (int j = 0; j < count; j++) {
        float var = (float)(m2[j] / n);
        if (bf16)
            ((uint16_t *)out)[start + j] = to_bf16(var);
        else
            ((float *)out)[start + j] = var;
    }
}

/* R(R(τ·keep)²) for entries [start, start + count), into float32 */
CLONES static void squares_chunk(const void *model, const void *base, const uint8_t *keep, Py_ssize_t start,
                                 int count, int bf16, float *out)
{
    float tau[CHUNK];
    task_vector(tau, model, base, start, count, bf16);
    if (keep)
        for (int j = 0; j < count; j++)
            tau[j] = bf16 ? from_bf16(to_bf16(tau[j] * (float)keep[start + j])) : tau[j] * (float)keep[start + j];
    for (int j = 0; j < count; j++)
        out[start + j] = bf16 ? from_bf16(to_bf16(tau[j] * tau[j])) : tau[j] * tau[j];
}

/* Buffers of one length (in entries of `size` bytes) from a tuple; the count held */
static int get_buffers(PyObject *objects, Py_buffer *buffers, int most, Py_ssize_t length, int size)
{
    Py_ssize_t n = PyTuple_GET_SIZE(objects);
    if (n < 1 || n > most) {
        PyErr_Format(PyExc_ValueError, "1 to %d inputs, got %zd", most, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(objects, i), &buffers[i], PyBUF_C_CONTIGUOUS) < 0) {
            while (i--)
                PyBuffer_Release(&buffers[i]);
            return -1;
        }
        if (buffers[i].len != length * size) {
            PyErr_SetString(PyExc_ValueError, "buffers of different lengths");
            while (i >= 0)
                PyBuffer_Release(&buffers[i--]);
            return -1;
        }
    }
    return (int)n;
}

/* 1: `object`'s buffer got (release it), 0: it is None, -1: an error set */
static int optional_buffer(PyObject *object, Py_buffer *buffer)
{
    if (object == Py_None)
        return 0;
    return PyObject_GetBuffer(object, buffer, PyBUF_C_CONTIGUOUS) == 0 ? 1 : -1;
}

static int dtype_size(const char *dtype)
{
    if (strcmp(dtype, "bfloat16") == 0)
        return 2;
    if (strcmp(dtype, "float32") == 0)
        return 4;
    PyErr_SetString(PyExc_ValueError, "dtype bfloat16 or float32");
    return 0;
}


/* sums[j mod 4] += values[j] in float64, j rising: in four locals (through `sums` itself, each addition waited
   for the last one's store, 2.6 ns an entry for the whole L1 pass) */
static ALWAYS_INLINE void add_fours(double *sums, const float *values, int count)
{
    double s0 = sums[0], s1 = sums[1], s2 = sums[2], s3 = sums[3];
    int j = 0;
    for (; j + 4 <= count; j += 4) {
        s0 += values[j];
        s1 += values[j + 1];
        s2 += values[j + 2];
        s3 += values[j + 3];
    }
    double *tail[3] = {&s0, &s1, &s2};
    for (; j < count; j++)
        *tail[j & 3] += values[j];
    sums[0] = s0, sums[1] = s1, sums[2] = s2, sums[3] = s3;
}

/* The float64 sums of |τ| and of its kept entries over entries [start, start + count): four partial sums
   each, entry j into sum j mod 4, added ((s₀ + s₁) + (s₂ + s₃)) by the caller */
CLONES static void l1_chunk(const void *model, const void *base, const uint8_t *bits, int64_t first, Py_ssize_t start,
                            int count, int bf16, double *all, double *kept)
{
    float tau[CHUNK];
    task_vector(tau, model, base, start, count, bf16);
    for (int j = 0; j < count; j++)
        tau[j] = fabsf(tau[j]);
    add_fours(all, tau, count);
    if (bits)
        drop_by_bits(tau, bits, first + start, count);
    add_fours(kept, tau, count);
}

static PyObject *l1_sums(PyObject *self, PyObject *args)
{
    Py_buffer model, base, bits = {0};
    PyObject *bits_object;
    Py_ssize_t first;
    const char *dtype;
    if (!PyArg_ParseTuple(args, "y*y*Ons", &model, &base, &bits_object, &first, &dtype))
        return NULL;
    int size = dtype_size(dtype), held = size ? optional_buffer(bits_object, &bits) : 0;
    Py_ssize_t entries = model.len / (size ? size : 1);
    PyObject *result = NULL;
    if (held < 0)
        size = held = 0;
    if (size && (model.len % size || base.len != model.len || (held && (first < 0 || (first + entries + 7) / 8 > bits.len))))
        PyErr_SetString(PyExc_ValueError, "l1: a model and base of one length, and bits holding them");
    else if (size) {
        double all[4] = {0}, kept[4] = {0};
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < entries; start += CHUNK)
            l1_chunk(model.buf, base.buf, held ? bits.buf : NULL, first, start,
                     chunk_count(entries, start), size == 2, all, kept);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("dd", (all[0] + all[1]) + (all[2] + all[3]), (kept[0] + kept[1]) + (kept[2] + kept[3]));
    }
    if (held)
        PyBuffer_Release(&bits);
    PyBuffer_Release(&model);
    PyBuffer_Release(&base);
    return result;
}

static PyObject *sce_variance(PyObject *self, PyObject *args)
{
    PyObject *models;
    const char *dtype;
    Py_buffer base, out, parts[MAX_PARTS];
    if (!PyArg_ParseTuple(args, "O!y*sw*", &PyTuple_Type, &models, &base, &dtype, &out))
        return NULL;
    int size = dtype_size(dtype), n = 0;
    Py_ssize_t entries = out.len / (size ? size : 1);
    PyObject *result = NULL;
    if (size && (base.len != out.len || out.len % size))
        PyErr_SetString(PyExc_ValueError, "variance: the base and out differ in length");
    else if (size && (n = get_buffers(models, parts, MAX_PARTS, entries, size)) > 0) {
        const void *bufs[MAX_PARTS];
        for (int i = 0; i < n; i++)
            bufs[i] = parts[i].buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < entries; start += CHUNK)
            variance_chunk(bufs, n, base.buf, start, chunk_count(entries, start), size == 2, out.buf);
        Py_END_ALLOW_THREADS
        for (int i = 0; i < n; i++)
            PyBuffer_Release(&parts[i]);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&base);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *sce_squares(PyObject *self, PyObject *args)
{
    PyObject *keep_object;
    const char *dtype;
    Py_buffer model, base, keep = {0}, out;
    if (!PyArg_ParseTuple(args, "y*y*Osw*", &model, &base, &keep_object, &dtype, &out))
        return NULL;
    int size = dtype_size(dtype), held = size ? optional_buffer(keep_object, &keep) : 0;
    Py_ssize_t entries = model.len / (size ? size : 1);
    PyObject *result = NULL;
    if (held < 0)
        size = held = 0;
    if (size && (model.len % size || base.len != model.len || out.len != entries * 4 || (held && keep.len != entries)))
        PyErr_SetString(PyExc_ValueError, "squares: a model, base, keep mask and float32 out of one length");
    else if (size) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < entries; start += CHUNK)
            squares_chunk(model.buf, base.buf, held ? keep.buf : NULL, start,
                          chunk_count(entries, start), size == 2, out.buf);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    if (held)
        PyBuffer_Release(&keep);
    PyBuffer_Release(&model);
    PyBuffer_Release(&base);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *ranked_bits(PyObject *self, PyObject *args)
{
    Py_buffer keys, draws, thresholds, out;
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &keys, &draws, &thresholds, &out))
        return NULL;
    Py_ssize_t n = thresholds.len / 4, size = keys.itemsize, entries = draws.len / 4;
    PyObject *result = NULL;
    if ((size != 4 && size != 8) || draws.itemsize != 4 || thresholds.itemsize != 4 || !n || keys.len != entries * size
        || entries % n || out.len != (entries + 7) / 8 || (size == 4 && n > 65536))
        PyErr_SetString(PyExc_ValueError, "ranked: rows × n int32 or int64 keys (int32: n ≤ 65536), as many uint32 "
                                          "draws, n uint32 thresholds and the bits of rows × n entries");
    else {
        const uint32_t *d = draws.buf, *t = thresholds.buf;
        uint8_t *bits = out.buf;
        Py_BEGIN_ALLOW_THREADS
        memset(bits, 0, (size_t)out.len);
        for (Py_ssize_t row = 0; row < entries; row += n)
            for (Py_ssize_t k = 0; k < n; k++) {
                uint64_t column = size == 4 ? ((const uint32_t *)keys.buf)[row + k] & 0xFFFFu
                                            : ((const uint64_t *)keys.buf)[row + k] & 0xFFFFFFFFu;
                Py_ssize_t at = row + (Py_ssize_t)column;
                bits[at >> 3] |= (uint8_t)((d[row + k] < t[k]) << (at & 7));
            }
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&keys);
    PyBuffer_Release(&draws);
    PyBuffer_Release(&thresholds);
    PyBuffer_Release(&out);
    return result;
}

/* |τ|'s keys of a chunk (`magnitude_keys`): a loop that vectorizes */
CLONES static void keys_chunk(const uint16_t *model, const uint16_t *base, int count, int descending, int16_t *out)
{
    for (int j = 0; j < count; j++) {
        uint16_t magnitude = magnitude_bits(model[j], base[j]);
        magnitude = magnitude > 0x7F80 ? 0x7F81 : magnitude;  /* (every NaN one key, after +inf) */
        out[j] = descending ? (int16_t)magnitude : (int16_t)-magnitude;
    }
}

static PyObject *magnitude_keys(PyObject *self, PyObject *args)
{
    Py_buffer model, base, keys, counts;
    int descending;
    if (!PyArg_ParseTuple(args, "y*y*pw*w*", &model, &base, &descending, &keys, &counts))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = model.len / 2;
    uint32_t *h = NULL;
    if (model.itemsize != 2 || base.len != model.len || keys.len != model.len || keys.itemsize != 2
        || counts.len != 65536 * 8)
        PyErr_SetString(PyExc_ValueError, "keys: bf16 model and base (int16 bits), int16 keys of their length, "
                                          "65536 int64 counts");
    else if (!(h = PyMem_RawCalloc(2 << 16, sizeof(uint32_t))))
        PyErr_NoMemory();
    else {
        int64_t *c = counts.buf;
        const uint16_t *k = keys.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < n; start += CHUNK) {
            int count = chunk_count(n, start);
            keys_chunk((const uint16_t *)model.buf + start, (const uint16_t *)base.buf + start, count, descending,
                       (int16_t *)keys.buf + start);
            int j = 0;  /* (two histograms, even and odd entries, as `_follow.c`'s: uint32 counts of a chunk's
                           entries, added into the int64 ones every 2³¹ entries) */
            for (; j + 1 < count; j += 2) {
                h[(uint16_t)(k[start + j] ^ 0x8000)]++;
                h[(1 << 16) + (uint16_t)(k[start + j + 1] ^ 0x8000)]++;
            }
            if (j < count)
                h[(uint16_t)(k[start + j] ^ 0x8000)]++;
            if ((start / CHUNK + 1) % ((Py_ssize_t)1 << 23) == 0 || start + CHUNK >= n)
                for (int b = 0; b < 1 << 16; b++) {
                    c[b] += (int64_t)h[b] + h[(1 << 16) + b];
                    h[b] = h[(1 << 16) + b] = 0;
                }
        }
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyMem_RawFree(h);
    PyBuffer_Release(&model);
    PyBuffer_Release(&base);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&counts);
    return result;
}

/* numpy's SFC64 (`numpy.random.SFC64`'s next 64 bits; s: its state a, b, c, counter) */
static inline uint64_t sfc64_next(uint64_t *s)
{
    uint64_t tmp = s[0] + s[1] + s[3]++;
    s[0] = s[1] ^ (s[1] >> 11);
    s[1] = s[2] + (s[2] << 3);
    s[2] = ((s[2] << 24) | (s[2] >> 40)) + tmp;
    return tmp;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HOST_LITTLE_ENDIAN 1
#else
#define HOST_LITTLE_ENDIAN 0
#endif

typedef struct {  /* one call's working memory, a row's worth */
    uint64_t *state, raw;  /* the generator, and its last 64 bits: entry e draws their low half (e even), high */
    uint16_t *key, *bucket;
    uint32_t *draws, *counts;
    uint8_t *keep, *kept;
    float *magnitude, *left;  /* |τ| and its kept entries (+0 where dropped) */
    double all[4], sums[4];  /* Σ |τ| and Σ kept |τ|, entry e into sum e mod 4, as `l1_chunk`'s */
} Prune;

/* DELLA's drops of one row of n entries (`magprune`), its |τ| ranked by counting: the rank of an entry is how
   many entries of the row have a smaller bf16 pattern of |τ|, or the same one at an earlier column (numpy's sort
   of pattern·2¹⁶ + column gave the same ranks). The counts span only the row's patterns, zero apart (a row's
   nonzero magnitudes lie within a few binades: 1,000-1,700 patterns in the 168M job's rows of 1024 and 2816);
   every NaN is 0x7FFF, after +inf. A 1024 × 1024 input, one thread: 2.6-3.0 ns an entry, the sums included.
   Each step a loop of its own; only the counts and the ranks' look-ups do not vectorize. */
CLONES static void magprune_row(const uint16_t *model, const uint16_t *base, Py_ssize_t n, const uint32_t *thresholds,
                                Prune *p, uint8_t *bits, Py_ssize_t at)
{
    uint16_t *key = p->key, *bucket = p->bucket;
    for (Py_ssize_t j = 0; j < n; j++)
        key[j] = magnitude_bits(model[j], base[j]);
    uint16_t lo = 0xFFFF, hi = 0;
    for (Py_ssize_t j = 0; j < n; j++)
        hi = key[j] > hi ? key[j] : hi;
    for (Py_ssize_t j = 0; j < n; j++)  /* the smallest nonzero pattern, less 1 (0 wraps to 0xFFFF) */
        lo = (uint16_t)(key[j] - 1) < lo ? (uint16_t)(key[j] - 1) : lo;
    lo = lo >= hi ? 0 : lo;  /* (all zero) */
    uint16_t top = (uint16_t)(hi - lo);  /* bucket 0: the zeros; pattern k: bucket k − lo (1 … top) */
    for (Py_ssize_t j = 0; j < n; j++)
        bucket[j] = key[j] ? (uint16_t)(key[j] - lo) : 0;
    uint32_t *counts = p->counts, sum = 0;
    memset(counts, 0, ((size_t)top + 1) * sizeof(uint32_t));
    for (Py_ssize_t j = 0; j < n; j++)
        counts[bucket[j]]++;
    Py_ssize_t b = 0;  /* the counts' sums before each bucket */
#if defined(__GNUC__) && !defined(__clang__)  /* (four at a time, two shifted sums in a vector: 2.9 → 2.7 ns an
                                                  entry for the whole row) */
    typedef uint32_t four __attribute__((vector_size(16)));
    const four zero = {0, 0, 0, 0}, by_one = {3, 4, 5, 6}, by_two = {2, 3, 4, 5};
    for (; b + 4 <= (Py_ssize_t)top + 1; b += 4) {
        four x;
        memcpy(&x, counts + b, sizeof x);
        x += __builtin_shuffle(zero, x, by_one);  /* (x₀, x₀ + x₁, x₁ + x₂, x₂ + x₃) */
        x += __builtin_shuffle(zero, x, by_two);  /* the sums through each */
        four before = __builtin_shuffle(zero, x, by_one) + sum;
        memcpy(counts + b, &before, sizeof before);
        sum += x[3];
    }
#endif
    for (; b <= top; b++) {
        uint32_t c = counts[b];
        counts[b] = sum;
        sum += c;
    }
    uint8_t *restrict keep = p->keep, *restrict kept = p->kept;
    uint64_t state[4] = {p->state[0], p->state[1], p->state[2], p->state[3]}, raw = p->raw;
    uint32_t *restrict draws = p->draws;  /* in rank order, `_draws.uniform32`'s: entry e's are the low (e even)
                                             or high half of 64 bits; made first, compared in a loop that vectorizes */
    Py_ssize_t r = 0;
    if ((at & 1) && n)  /* (the high half of the last row's last 64 bits) */
        draws[r++] = (uint32_t)(raw >> 32);
    for (; r + 2 <= n; r += 2) {
        raw = sfc64_next(state);
        if (HOST_LITTLE_ENDIAN)  /* (one store: the low half first) */
            memcpy(draws + r, &raw, 8);
        else
            draws[r] = (uint32_t)raw, draws[r + 1] = (uint32_t)(raw >> 32);
    }
    if (r < n) {
        raw = sfc64_next(state);
        draws[r] = (uint32_t)raw;
    }
    for (int t = 0; t < 4; t++)
        p->state[t] = state[t];
    p->raw = raw;
    for (r = 0; r < n; r++)  /* the draw at each rank against the ramp's threshold there */
        keep[r] = draws[r] < thresholds[r];
    for (Py_ssize_t j = 0; j < n; j++)
        kept[j] = keep[counts[bucket[j]]++];
    float *restrict magnitude = p->magnitude, *restrict left = p->left;
    for (Py_ssize_t j = 0; j < n; j++) {
        magnitude[j] = from_bf16(key[j]);
        left[j] = bits_float(float_bits(magnitude[j]) & (0u - kept[j]));
    }
    Py_ssize_t j = (4 - (at & 3)) & 3;  /* (entry e into sum e mod 4: the row's first entries, then fours) */
    for (Py_ssize_t t = 0; t < j && t < n; t++) {
        p->all[(at + t) & 3] += magnitude[t];
        p->sums[(at + t) & 3] += left[t];
    }
    double a[4] = {p->all[0], p->all[1], p->all[2], p->all[3]}, s[4] = {p->sums[0], p->sums[1], p->sums[2], p->sums[3]};
    for (; j + 4 <= n; j += 4)
        for (int t = 0; t < 4; t++) {
            a[t] += magnitude[j + t];
            s[t] += left[j + t];
        }
    for (int t = 0; t < 4; t++)
        p->all[t] = a[t], p->sums[t] = s[t];
    for (; j < n; j++) {
        p->all[(at + j) & 3] += magnitude[j];
        p->sums[(at + j) & 3] += left[j];
    }
    j = 0;
    if (!(at & 7) && HOST_LITTLE_ENDIAN)  /* (whole bytes) */
        for (; j + 8 <= n; j += 8) {
            uint64_t eight;  /* eight bytes of 0 or 1, little-endian: byte t's bit to bit 56 + t */
            memcpy(&eight, kept + j, 8);
            bits[(at + j) >> 3] = (uint8_t)((eight * 0x0102040810204080u) >> 56);
        }
    for (; j < n; j++) {
        Py_ssize_t e = at + j;
        bits[e >> 3] = (uint8_t)((bits[e >> 3] & ~(1u << (e & 7))) | (uint32_t)kept[j] << (e & 7));
    }
}

static PyObject *magprune(PyObject *self, PyObject *args)
{
    Py_buffer model, base, state, thresholds, out;
    Py_ssize_t block;
    if (!PyArg_ParseTuple(args, "y*y*w*y*w*n", &model, &base, &state, &thresholds, &out, &block))
        return NULL;
    Py_ssize_t n = thresholds.len / 4, entries = model.len / 2, blocks = block > 0 ? (entries + block - 1) / block : 0;
    PyObject *result = NULL;
    Prune p = {.state = state.buf};
    char *memory = NULL;
    double *sums = NULL;
    if (model.itemsize != 2 || base.len != model.len || state.len != 32 || thresholds.itemsize != 4 || !n
        || entries % n || n > 0xFFFFFFFF || out.len != (entries + 7) / 8 || block <= 0 || block % n
        || (block % 8 && block < entries))
        PyErr_SetString(PyExc_ValueError, "magprune: rows × n bf16 model and base (int16 bits), SFC64's state (4 "
                                          "uint64), n uint32 thresholds, the bits of rows × n entries and blocks of "
                                          "whole rows and bytes");
    else if (!(memory = PyMem_RawMalloc((size_t)n * 18 + (0x7FFF + 1) * sizeof(uint32_t)))
             || !(sums = PyMem_RawMalloc((size_t)(blocks ? blocks : 1) * 2 * sizeof(double))))
        PyErr_NoMemory();
    else {
        p.draws = (uint32_t *)memory, p.counts = p.draws + n, p.magnitude = (float *)(p.counts + 0x7FFF + 1);
        p.left = p.magnitude + n, p.key = (uint16_t *)(p.left + n), p.bucket = p.key + n;
        p.keep = (uint8_t *)(p.bucket + n), p.kept = p.keep + n;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < blocks; k++) {  /* each block as a call of its own: its draws from an even entry */
            Py_ssize_t first = k * block, end = first + block < entries ? first + block : entries;
            for (int t = 0; t < 4; t++)
                p.all[t] = p.sums[t] = 0.0;
            for (Py_ssize_t row = first; row < end; row += n)
                magprune_row((const uint16_t *)model.buf + row, (const uint16_t *)base.buf + row, n, thresholds.buf,
                             &p, (uint8_t *)out.buf + first / 8, row - first);
            sums[2 * k] = (p.all[0] + p.all[1]) + (p.all[2] + p.all[3]);
            sums[2 * k + 1] = (p.sums[0] + p.sums[1]) + (p.sums[2] + p.sums[3]);
        }
        if (entries & 7)  /* (the last byte's bits past the entries: 0, as numpy's packbits leaves them) */
            ((uint8_t *)out.buf)[entries >> 3] &= (uint8_t)((1u << (entries & 7)) - 1);
        Py_END_ALLOW_THREADS
        if ((result = PyList_New(blocks)))
            for (Py_ssize_t k = 0; k < blocks; k++) {
                PyObject *pair = Py_BuildValue("dd", sums[2 * k], sums[2 * k + 1]);
                if (!pair) {
                    Py_CLEAR(result);
                    break;
                }
                PyList_SET_ITEM(result, k, pair);
            }
    }
    PyMem_RawFree(memory);
    PyMem_RawFree(sums);
    PyBuffer_Release(&model);
    PyBuffer_Release(&base);
    PyBuffer_Release(&state);
    PyBuffer_Release(&thresholds);
    PyBuffer_Release(&out);
    return result;
}

/* multislerp's tangent (`tangent`): out = R(Σᵢ R(wᵢ·R(uᵢ − R(dᵢ·m)))), the sum from +0 in float32 */
CLONES static void tangent_chunk(const void **units, int n, const void *mean, const float *dots, const float *weights,
                                 Py_ssize_t start, int count, int bf16, void *out)
{
    float m[CHUNK], u[CHUNK], total[CHUNK];
    load_chunk(m, mean, start, count, bf16);
    for (int j = 0; j < count; j++)
        total[j] = 0.0f;
    for (int i = 0; i < n; i++) {
        float d = dots[i], w = weights[i];
        load_chunk(u, units[i], start, count, bf16);
        if (bf16)
            for (int j = 0; j < count; j++)
                total[j] += rounded(w * rounded(u[j] - rounded(d * m[j], 1), 1), 1);
        else
            for (int j = 0; j < count; j++)
                total[j] += w * (u[j] - d * m[j]);
    }
    store_chunk(out, total, start, count, bf16);
}

/* multislerp's last step (`spherical_end`): out = R(R(R(R(m·cos) + R(v·sin))·scale) + base) (no base: no sum) */
CLONES static void end_chunk(const void *mean, const void *row, float c, float s, float scale, const void *base,
                             Py_ssize_t start, int count, int bf16, void *out)
{
    float m[CHUNK], v[CHUNK], b[CHUNK];
    load_chunk(m, mean, start, count, bf16);
    load_chunk(v, row, start, count, bf16);
    if (base)
        load_chunk(b, base, start, count, bf16);
    for (int j = 0; j < count; j++) {
        float part = rounded(rounded(rounded(m[j] * c, bf16) + rounded(v[j] * s, bf16), bf16) * scale, bf16);
        m[j] = base ? part + b[j] : part;
    }
    store_chunk(out, m, start, count, bf16);
}

static PyObject *tangent(PyObject *self, PyObject *args)
{
    PyObject *units, *dots, *weights;
    const char *dtype;
    Py_buffer mean, out, parts[INTERLEAVED];
    if (!PyArg_ParseTuple(args, "O!y*O!O!sw*", &PyTuple_Type, &units, &mean, &PyTuple_Type, &dots, &PyTuple_Type,
                          &weights, &dtype, &out))
        return NULL;
    int size = dtype_size(dtype), n = 0;
    Py_ssize_t entries = out.len / (size ? size : 1);
    PyObject *result = NULL;
    float d[INTERLEAVED], w[INTERLEAVED];
    if (size && (mean.len != out.len || out.len % size || PyTuple_GET_SIZE(dots) != PyTuple_GET_SIZE(units)
                 || PyTuple_GET_SIZE(weights) != PyTuple_GET_SIZE(units)))
        PyErr_SetString(PyExc_ValueError, "tangent: units, a mean and out of one length, a dot and weight a unit");
    else if (size && (n = get_buffers(units, parts, INTERLEAVED, entries, size)) > 0) {
        const void *bufs[INTERLEAVED];
        for (int i = 0; i < n; i++) {
            bufs[i] = parts[i].buf;
            d[i] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(dots, i));
            w[i] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(weights, i));
        }
        if (!PyErr_Occurred()) {
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t start = 0; start < entries; start += CHUNK)
                tangent_chunk(bufs, n, mean.buf, d, w, start, chunk_count(entries, start),
                              size == 2, out.buf);
            Py_END_ALLOW_THREADS
            result = Py_None;
            Py_INCREF(result);
        }
        for (int i = 0; i < n; i++)
            PyBuffer_Release(&parts[i]);
    }
    PyBuffer_Release(&mean);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *spherical_end(PyObject *self, PyObject *args)
{
    PyObject *base_object;
    const char *dtype;
    double c, s, scale;
    Py_buffer mean, row, base = {0}, out;
    if (!PyArg_ParseTuple(args, "y*y*dddOsw*", &mean, &row, &c, &s, &scale, &base_object, &dtype, &out))
        return NULL;
    int size = dtype_size(dtype), held = size ? optional_buffer(base_object, &base) : 0;
    Py_ssize_t entries = out.len / (size ? size : 1);
    PyObject *result = NULL;
    if (held < 0)
        size = held = 0;
    if (size && (mean.len != out.len || row.len != out.len || out.len % size || (held && base.len != out.len)))
        PyErr_SetString(PyExc_ValueError, "spherical_end: a mean, a row, a base and out of one length");
    else if (size) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < entries; start += CHUNK)
            end_chunk(mean.buf, row.buf, (float)c, (float)s, (float)scale, held ? base.buf : NULL, start,
                      chunk_count(entries, start), size == 2, out.buf);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    if (held)
        PyBuffer_Release(&base);
    PyBuffer_Release(&mean);
    PyBuffer_Release(&row);
    PyBuffer_Release(&out);
    return result;
}

/* ‖x‖₂ of x in float32 as torch's norm kernel takes it along a contiguous last axis of a float32 tensor
   (`norm_two_reduce_step`; its AVX2 build, which an AVX-512 CPU runs too): eight float32 lanes, lane l adding
   x[8k + l]² in turn over the entries before the last n mod 8, each square rounded before it is added; then the
   lanes added in order, and the last entries' squares as its compiled loop adds them: four at a time rounded,
   then each fused with the sum (FMA); then √ in float32. Found by trying each way on float32 entries (without
   the fused ones, 2 of 3000 norms differed; bf16 squares are exact) and checked against torch before use
   (`_norm.py`). */
CLONES static void lane_squares(float *lanes, const void *x, Py_ssize_t start, int count, int bf16)
{
    float values[CHUNK];
    load_chunk(values, x, start, count, bf16);
#ifdef __GNUC__  /* (as the loops below, gcc gathered each lane's entries: 0.83 ns an entry, not 0.12) */
    typedef float eight __attribute__((vector_size(32)));
    eight acc, v;
    memcpy(&acc, lanes, sizeof acc);
    for (int j = 0; j < count; j += 8) {
        memcpy(&v, values + j, sizeof v);
        acc += v * v;
    }
    memcpy(lanes, &acc, sizeof acc);
#else
    for (int j = 0; j < count; j += 8)
        for (int l = 0; l < 8; l++)
            lanes[l] += values[j + l] * values[j + l];
#endif
}

static PyObject *norm(PyObject *self, PyObject *args)
{
    Py_buffer x;
    const char *dtype;
    if (!PyArg_ParseTuple(args, "y*s", &x, &dtype))
        return NULL;
    int size = dtype_size(dtype);
    Py_ssize_t entries = x.len / (size ? size : 1), whole = entries - entries % 8;
    PyObject *result = NULL;
    if (size && x.len % size)
        PyErr_SetString(PyExc_ValueError, "norm: a buffer of whole entries");
    else if (size) {
        float lanes[8] = {0}, rest[8], total;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < whole; start += CHUNK)
            lane_squares(lanes, x.buf, start, chunk_count(whole, start), size == 2);
        total = lanes[0];
        for (int l = 1; l < 8; l++)
            total += lanes[l];
        int tail = (int)(entries - whole), k = 0;
        load_chunk(rest, x.buf, whole, tail, size == 2);
        for (; k < (tail & ~3); k++)
            total += rest[k] * rest[k];
        for (; k < tail; k++)
            total = fmaf(rest[k], rest[k], total);
        Py_END_ALLOW_THREADS
        result = PyFloat_FromDouble(sqrtf(total));
    }
    PyBuffer_Release(&x);
    return result;
}

/* ⟨m, R(xᵢ/nᵢ)⟩ of bf16 vectors longer than 4096 entries as torch's `dot` gives it on a CPU with AVX-512 BF16:
   there torch hands it to oneDNN as a 1×n by n×1 bf16 matmul (brgemm, avx512_core_bf16) whose one output lane
   takes the entries in chunks of 512 from the first: a chunk's sum from +0 in float32, pair after pair, each pair's
   odd entry's product added before its even one's (the products of two bf16 are exact in float32), then each
   chunk's sum added to the total in turn. Found by trying each way on sums built to land on a bf16 rounding
   boundary (every other chunk size, no chunks, the even entry first: 20-40% of them differ) and probed against
   torch before use (`_norm.py`). The same for every thread count (1 to 16 tried): oneDNN splits no K of one dot.
   The unit vector R(x/n) is torch's division of the bf16 input by a float32 norm, rounded to nearest even
   (n = 0: zeros, as karcher makes them), made here in registers and never stored.
   The instruction flushes subnormal inputs, products and sums to zero; where every nonzero operand is at least
   2⁻⁵⁰ no subnormal arises (every partial sum is a multiple of 2⁻¹²³), so an input with a smaller nonzero
   operand, an inf or a NaN is not summed here (None: the caller asks torch).
   The one output lane adds 512 entries one after another (a chain of 4-cycle additions: 2.2 ns an entry, the
   division not counted); here 16 chunks are added side by side, one to a lane, each input's pairs transposed to
   chunk-major through 16 KB on the stack: three inputs of 33M entries, 0.6 ns an entry and input with the AVX-512
   copy, division included, against 2.9 for torch's divisions and dots. */
#define DOT_CHUNK 512
#define DOT_LANES 16
#define DOT_PAIRS (DOT_CHUNK / 2)
#define DOT_TINY 0x26800000u  /* 2⁻⁵⁰'s float32 bits */
/* 1 where a magnitude's bits `a` (a word, or a vector of them) are nonzero and below 2⁻⁵⁰, or an inf or a NaN, else
   0: from sign bits, no compares (gcc made 16-lane compares scalar code in the AVX2 copy, 7× the time) */
#define DOT_UNUSUAL(a) (((((a) - DOT_TINY) & ~((a) - 1u)) | ~((a) - 0x7F800000u)) >> 31)
#if defined(__x86_64__) && defined(__has_attribute) && defined(__GNUC__)
#if __has_attribute(target_clones)
#define DOT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef DOT_CLONES
#define DOT_CLONES
#endif

#ifdef __GNUC__
#pragma GCC diagnostic ignored "-Wpsabi"  /* (16-lane values passed between inlined helpers: no call, no ABI) */
typedef float dot_floats __attribute__((vector_size(4 * DOT_LANES)));
typedef uint32_t dot_words __attribute__((vector_size(4 * DOT_LANES)));

/* rows[k][j] = the pair k (entries 2k and 2k + 1, as one little-endian word) of chunk j */
static ALWAYS_INLINE void chunk_major(uint32_t (*rows)[DOT_LANES], const uint16_t *x)
{
    for (int j = 0; j < DOT_LANES; j++)
        for (int k = 0; k < DOT_PAIRS; k++)
            memcpy(&rows[k][j], x + (j * DOT_CHUNK + 2 * k), 4);
}

static ALWAYS_INLINE dot_words unusual(dot_words bits)  /* DOT_UNUSUAL of a lane's magnitude */
{
    dot_words a = bits & 0x7FFFFFFFu;
    return DOT_UNUSUAL(a);
}

static ALWAYS_INLINE dot_floats as_floats(dot_words w)
{
    dot_floats f;
    memcpy(&f, &w, sizeof f);
    return f;
}

/* 16 chunks' sums of input x against the mean's chunk-major pairs `mean_rows` into sums; *flag |= unusual */
DOT_CLONES static void lane_dots(const uint32_t (*mean_rows)[DOT_LANES], const uint16_t *x, float norm, int zero,
                                 float *sums, uint32_t *flag)
{
    uint32_t rows[DOT_PAIRS][DOT_LANES];
    chunk_major(rows, x);
    dot_floats acc = {0};
    dot_words odd, even, m, p, bad = {0};
    for (int k = 0; k < DOT_PAIRS; k++) {
        memcpy(&m, mean_rows[k], sizeof m);
        memcpy(&p, rows[k], sizeof p);
        dot_floats q1 = as_floats(p & 0xFFFF0000u) / norm, q0 = as_floats(p << 16) / norm;
        memcpy(&odd, &q1, sizeof odd);
        memcpy(&even, &q0, sizeof even);
        odd = zero ? odd & 0u : BF16_ROUNDED(odd);  /* R(q) */
        even = zero ? even & 0u : BF16_ROUNDED(even);
        bad |= unusual(m & 0xFFFF0000u) | unusual(m << 16) | unusual(odd) | unusual(even);
        acc += as_floats(m & 0xFFFF0000u) * as_floats(odd);
        acc += as_floats(m << 16) * as_floats(even);
    }
    memcpy(sums, &acc, sizeof acc);
    for (int j = 0; j < DOT_LANES; j++)
        *flag |= bad[j];
}
#endif

/* one chunk of `count` entries the plain way (the last chunks, and compilers without vector types) */
static float chunk_dot(const uint16_t *m, const uint16_t *x, Py_ssize_t count, float norm, int zero, uint32_t *flag)
{
    float acc = 0.0f;
    for (Py_ssize_t k = 0; k < count; k += 2)
        for (int h = k + 1 < count; h >= 0; h--) {  /* the odd entry first */
            uint16_t u = zero ? 0 : to_bf16(from_bf16(x[k + h]) / norm);
            uint32_t a = float_bits(from_bf16(m[k + h])) & 0x7FFFFFFFu, b = float_bits(from_bf16(u)) & 0x7FFFFFFFu;
            *flag |= DOT_UNUSUAL(a) | DOT_UNUSUAL(b);
            acc += from_bf16(m[k + h]) * from_bf16(u);
        }
    return acc;
}

/* totals (from +0: a chunk's sum is never −0, so the same as starting from the first) and flags of every input */
static void unit_dots_of(const uint16_t *m, const uint16_t *const *xs, const float *norms, int n, Py_ssize_t entries,
                         float *totals, uint32_t *flags)
{
    Py_ssize_t start = 0;
#ifdef __GNUC__
    uint32_t mean_rows[DOT_PAIRS][DOT_LANES];
    for (; start + DOT_CHUNK * DOT_LANES <= entries; start += DOT_CHUNK * DOT_LANES) {
        chunk_major(mean_rows, m + start);
        for (int i = 0; i < n; i++) {
            float sums[DOT_LANES];
            lane_dots((const uint32_t (*)[DOT_LANES])mean_rows, xs[i] + start, norms[i], norms[i] == 0.0f, sums,
                      &flags[i]);
            for (int j = 0; j < DOT_LANES; j++)
                totals[i] += sums[j];
        }
    }
#endif
    for (; start < entries; start += DOT_CHUNK) {
        Py_ssize_t count = entries - start < DOT_CHUNK ? entries - start : DOT_CHUNK;
        for (int i = 0; i < n; i++) {
            totals[i] += chunk_dot(m + start, xs[i] + start, count, norms[i], norms[i] == 0.0f, &flags[i]);
        }
    }
}

static PyObject *unit_dots(PyObject *self, PyObject *args)
{
    PyObject *inputs, *norm_values;
    Py_buffer mean, parts[MAX_PARTS];
    if (!PyArg_ParseTuple(args, "y*O!O!", &mean, &PyTuple_Type, &inputs, &PyTuple_Type, &norm_values))
        return NULL;
    Py_ssize_t entries = mean.len / 2;
    PyObject *result = NULL;
    int n = 0;
    if (mean.len % 2 || PyTuple_GET_SIZE(norm_values) != PyTuple_GET_SIZE(inputs))
        PyErr_SetString(PyExc_ValueError, "dots: a bf16 mean, and a norm an input");
    else if ((n = get_buffers(inputs, parts, MAX_PARTS, entries, 2)) > 0) {
        const uint16_t *xs[MAX_PARTS];
        float norms[MAX_PARTS], totals[MAX_PARTS] = {0};
        uint32_t flags[MAX_PARTS] = {0};
        for (int i = 0; i < n; i++) {
            xs[i] = parts[i].buf;
            norms[i] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(norm_values, i));
        }
        if (!PyErr_Occurred()) {
            Py_BEGIN_ALLOW_THREADS
            unit_dots_of(mean.buf, xs, norms, n, entries, totals, flags);
            Py_END_ALLOW_THREADS
            result = PyTuple_New(n);
            for (int i = 0; result && i < n; i++) {
                PyObject *value = flags[i] ? (Py_INCREF(Py_None), Py_None) : PyFloat_FromDouble(totals[i]);
                if (!value) {
                    Py_CLEAR(result);
                    break;
                }
                PyTuple_SET_ITEM(result, i, value);
            }
        }
        for (int i = 0; i < n; i++)
            PyBuffer_Release(&parts[i]);
    }
    PyBuffer_Release(&mean);
    return result;
}

/* R(x) in 32-bit operations only (gcc vectorizes none of nearswap's loops with `rounded`'s 16-bit steps); no NaN
   rule: a NaN here comes from an input the caller redoes with torch */
static ALWAYS_INLINE float round32(float x, int bf16)
{
    return bf16 ? bits_float(BF16_ROUNDED(float_bits(x))) : x;
}

/* the clamps compare bits (c and w are ≥ 0: the float order): float compares in a select made gcc keep branches */
static ALWAYS_INLINE void nearswap_steps(const float *b, const float *o, float t, float floor, int count, int bf16,
                                         float *r)
{
    uint32_t least = float_bits(floor), one = float_bits(1.0f);
    for (int j = 0; j < count; j++) {
        uint32_t c = float_bits(round32(b[j] - o[j], bf16)) & 0x7FFFFFFFu;
        c = c < least ? least : c;
        uint32_t w = float_bits(round32(round32(1.0f / bits_float(c), bf16) * t, bf16));
        w = (int32_t)w < 0 ? 0u : w;
        w = w > one ? one : w;
        r[j] = round32(bits_float(w) * o[j], bf16) + round32(round32(1.0f - bits_float(w), bf16) * b[j], bf16);
    }
}

/* NearSwap per entry in torch's operations and roundings (`nearswap.py`): d = R(θ₀ − θ₁), c = max(|d|, floor) (floor:
   1e-6 in the dtype, as torch's clamp takes it), w = clamp(R(R(1/c)·t), 0, 1) (torch's t / c is reciprocal(c)·t),
   out = R(R(w·θ₁) + R(R(1 − w)·θ₀)): one pass where torch makes nine. Sets *odd where an input is an inf or a NaN
   (whose bit patterns torch's steps may give otherwise; the caller redoes those with torch). */
CLONES static void nearswap_chunk(const void *base, const void *other, float t, float floor, Py_ssize_t start,
                                  int count, int bf16, void *out, int *odd)
{
    float b[CHUNK], o[CHUNK], r[CHUNK];
    load_chunk(b, base, start, count, bf16);
    load_chunk(o, other, start, count, bf16);
    uint32_t bad = 0;
    for (int j = 0; j < count; j++)
        bad |= ((float_bits(b[j]) & 0x7F800000u) == 0x7F800000u) | ((float_bits(o[j]) & 0x7F800000u) == 0x7F800000u);
    if (bf16)
        nearswap_steps(b, o, t, floor, count, 1, r);
    else
        nearswap_steps(b, o, t, floor, count, 0, r);
    store_chunk(out, r, start, count, bf16);
    *odd |= bad != 0;
}

static PyObject *nearswap(PyObject *self, PyObject *args)
{
    Py_buffer base, other, out;
    double t;
    const char *dtype;
    if (!PyArg_ParseTuple(args, "y*y*dsw*", &base, &other, &t, &dtype, &out))
        return NULL;
    int size = dtype_size(dtype), odd = 0;
    PyObject *result = NULL;
    if (size && (base.len != out.len || other.len != out.len || out.len % size))
        PyErr_SetString(PyExc_ValueError, "nearswap: a base, other and out of one length");
    else if (size) {
        Py_ssize_t entries = out.len / size;
        float floor = (float)1e-6, tf = (float)t;
        floor = size == 2 ? from_bf16(to_bf16(floor)) : floor;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < entries; start += CHUNK)
            nearswap_chunk(base.buf, other.buf, tf, floor, start, chunk_count(entries, start), size == 2, out.buf,
                           &odd);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(!odd);
    }
    PyBuffer_Release(&base);
    PyBuffer_Release(&other);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"mix", mix_blocks, METH_VARARGS,
     "mix(rule, deltas, weights, normalize, divisor, tail, dtype, out, base, scale, weigh[, masks, factors]): "
     "see _mix.c"},
    {"variance", sce_variance, METH_VARARGS, "variance(models, base, dtype, out): see _mix.c"},
    {"squares", sce_squares, METH_VARARGS, "squares(model, base, keep, dtype, out): see _mix.c"},
    {"l1", l1_sums, METH_VARARGS, "l1(model, base, bits, first, dtype): see _mix.c"},
    {"ranked", ranked_bits, METH_VARARGS, "ranked(keys, draws, thresholds, out): see _mix.c"},
    {"magprune", magprune, METH_VARARGS, "magprune(model, base, state, thresholds, out, block): see _mix.c"},
    {"tangent", tangent, METH_VARARGS, "tangent(units, mean, dots, weights, dtype, out): see _mix.c"},
    {"spherical_end", spherical_end, METH_VARARGS,
     "spherical_end(mean, row, cos, sin, scale, base, dtype, out): see _mix.c"},
    {"norm", norm, METH_VARARGS, "norm(x, dtype): see _mix.c"},
    {"dots", unit_dots, METH_VARARGS, "dots(mean, inputs, norms): see _mix.c"},
    {"nearswap", nearswap, METH_VARARGS, "nearswap(base, other, t, dtype, out): see _mix.c"},
    {"keys", magnitude_keys, METH_VARARGS, "keys(model, base, descending, keys, counts): see _mix.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mix", NULL, -1, methods};

PyMODINIT_FUNC PyInit__mix(void)
{
    make_byte_masks();
    return PyModule_Create(&module);
}
