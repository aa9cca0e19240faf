/* NF4 dequantization for XLA:CPU, called through the XLA FFI C API.
 *
 * out[b, i] = dtype(table[code(b, i)] * scales[b, i / block_size]) where code(b, i)
 * is the high nibble of packed[b, i / 2] for even i and the low nibble for odd i
 * (bitsandbytes' byte order). One float32 multiply, then one rounding to the
 * output dtype (round to nearest even), bit-exact with jqlora's pure-jnp path.
 *
 *   args:  packed uint8[..., P], scales float32[..., NB], table float32[16]
 *   rets:  out float32 or bfloat16 [..., N]
 *   attrs: block_size (int64)
 *
 * Work is split over threads by blocks. The AVX-512 and AVX2 paths compute each
 * block's 16 possible outputs once and then look codes up in registers, 32
 * elements per step; portable C handles block tails (and other CPUs, where
 * jqlora prefers XLA: see jqlora_nf4_isa). Large outputs are advised onto
 * transparent huge pages before they are first touched (see huge_pages).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "xla/ffi/api/c_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define JQ_X86 1
#endif

typedef struct {
  const uint8_t* packed;
  const float* scales;
  const float* table;
  void* out;
  int64_t items, n, p, nb, block_size;
  int bf16;
  int64_t first, last; /* global block range [first, last) over items * nb */
} Job;

static inline uint16_t to_bf16(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Elements [start, end) of one item, all in one block with scale s. */
static void decode_scalar(const Job* j, const uint8_t* packed, float s, void* out,
                          int64_t start, int64_t end) {
  for (int64_t i = start; i < end; ++i) {
    uint8_t byte = packed[i >> 1];
    float v = j->table[(i & 1) ? (byte & 15) : (byte >> 4)] * s;
    if (j->bf16) ((uint16_t*)out)[i] = to_bf16(v);
    else ((float*)out)[i] = v;
  }
}

#ifdef JQ_X86
/* The codes of 32 elements from 16 bytes, in element order: 16 per register. */
static inline void split_codes(const uint8_t* bytes, __m128i* first, __m128i* second) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m128i b = _mm_loadu_si128((const __m128i*)bytes);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble), lo = _mm_and_si128(b, nibble);
  *first = _mm_unpacklo_epi8(hi, lo);
  *second = _mm_unpackhi_epi8(hi, lo);
}

/* Each SIMD path first computes the block's 16 possible outputs, table[c] * s
 * rounded to the output dtype (the same float32 product and rounding as every
 * element would get), then only looks codes up in them, 32 elements per step. */

__attribute__((target("avx512f,avx512bw")))
static __m512i bf16_bits_avx512(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                          _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* Elements [start, start + count) of one block (start and count multiples of 32). */
__attribute__((target("avx512f,avx512bw")))
static void decode_avx512(const Job* j, const uint8_t* packed, float s, void* out,
                          int64_t start, int64_t count) {
  const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(j->table), _mm512_set1_ps(s));
  const __m512i halves = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(bf16_bits_avx512(values)));
  for (int64_t i = start; i < start + count; i += 32) {
    __m128i first, second;
    split_codes(packed + (i >> 1), &first, &second);
    if (j->bf16) {
      __m512i codes = _mm512_cvtepu8_epi16(_mm256_set_m128i(second, first));
      _mm512_storeu_si512((uint16_t*)out + i, _mm512_permutexvar_epi16(codes, halves));
    } else {
      _mm512_storeu_ps((float*)out + i, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(first), values));
      _mm512_storeu_ps((float*)out + i + 16,
                       _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(second), values));
    }
  }
}

__attribute__((target("avx2")))
static __m256i bf16_bits_avx2(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                   _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}

/* As decode_avx512. bfloat16: byte shuffles on the low and high bytes of the 16
 * outputs; float32: two 8-lane permutes blended on bit 3 of the code. */
__attribute__((target("avx2")))
static void decode_avx2(const Job* j, const uint8_t* packed, float s, void* out,
                        int64_t start, int64_t count) {
  const __m256 scale = _mm256_set1_ps(s);
  const __m256 low = _mm256_mul_ps(_mm256_loadu_ps(j->table), scale);
  const __m256 high = _mm256_mul_ps(_mm256_loadu_ps(j->table + 8), scale);
  const __m256i halves = _mm256_permute4x64_epi64(
      _mm256_packus_epi32(bf16_bits_avx2(low), bf16_bits_avx2(high)), 0xD8);
  const __m128i a = _mm256_castsi256_si128(halves), b = _mm256_extracti128_si256(halves, 1);
  const __m128i byte = _mm_set1_epi16(0xFF);
  const __m128i low_bytes = _mm_packus_epi16(_mm_and_si128(a, byte), _mm_and_si128(b, byte));
  const __m128i high_bytes = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
  for (int64_t i = start; i < start + count; i += 32) {
    __m128i codes[2];
    split_codes(packed + (i >> 1), &codes[0], &codes[1]);
    for (int h = 0; h < 2; ++h) {
      if (j->bf16) {
        __m128i l = _mm_shuffle_epi8(low_bytes, codes[h]), u = _mm_shuffle_epi8(high_bytes, codes[h]);
        uint16_t* dst = (uint16_t*)out + i + 16 * h;
        _mm_storeu_si128((__m128i*)dst, _mm_unpacklo_epi8(l, u));
        _mm_storeu_si128((__m128i*)(dst + 8), _mm_unpackhi_epi8(l, u));
        continue;
      }
      for (int q = 0; q < 2; ++q) {
        __m256i idx = _mm256_cvtepu8_epi32(q ? _mm_srli_si128(codes[h], 8) : codes[h]);
        __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, idx),
                                    _mm256_permutevar8x32_ps(high, idx), pick);
        _mm256_storeu_ps((float*)out + i + 16 * h + 8 * q, v);
      }
    }
  }
}
#endif

#ifdef JQ_X86
/* 2 if the CPU and OS support AVX-512 F+BW, 1 for AVX2, else 0 (CPUID + XGETBV). */
static int cpu_isa(void) {
  unsigned a, b, c, d, xcr0_lo, xcr0_hi;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1) || !((c >> 28) & 1)) return 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6) != 0x6 || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  if (((b >> 16) & 1) && ((b >> 30) & 1) && (xcr0_lo & 0xE6) == 0xE6) return 2;
  return (b >> 5) & 1;
}
#endif

/* The widest path in use: 2 AVX-512, 1 AVX2, 0 portable C. A cap >= 0 lowers
 * (or restores) the widest path allowed, for tests; -1 only queries. */
static int isa_cap = 2, isa_cpu = -1;

int jqlora_nf4_isa(int cap) {
  if (cap >= 0) isa_cap = cap;
#ifdef JQ_X86
  if (isa_cpu < 0) isa_cpu = cpu_isa(); /* CPUID traps in VMs: ask once */
  return isa_cpu < isa_cap ? isa_cpu : isa_cap;
#else
  return 0;
#endif
}

/* Asks for transparent huge pages on the 2 MiB-aligned interior of a large
 * output not yet touched: first-touch faults, one per 4 KiB page, otherwise
 * dominate the call. Best effort; a no-op where THP is off or unsupported,
 * or with JQLORA_NATIVE_THP=0. */
static int thp_allowed(void) {
  const char* flag = getenv("JQLORA_NATIVE_THP");
  return !(flag && flag[0] == '0');
}

static void huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  if (bytes < 4 * huge || !thp_allowed()) return;
  uintptr_t first = ((uintptr_t)data + huge - 1) & ~(huge - 1);
  uintptr_t last = ((uintptr_t)data + bytes) & ~(huge - 1);
  if (last > first) madvise((void*)first, last - first, MADV_HUGEPAGE);
#else
  (void)data; (void)bytes;
#endif
}

static void* run_job(void* arg) {
  const Job* j = (const Job*)arg;
  const int isa = jqlora_nf4_isa(-1);
  const size_t elem = j->bf16 ? 2 : 4;
  for (int64_t g = j->first; g < j->last; ++g) {
    int64_t item = g / j->nb, block = g % j->nb;
    const uint8_t* packed = j->packed + item * j->p;
    void* out = (char*)j->out + (size_t)(item * j->n) * elem;
    float s = j->scales[g];
    int64_t start = block * j->block_size;
    int64_t end = start + j->block_size < j->n ? start + j->block_size : j->n;
    int64_t done = start;
#ifdef JQ_X86
    int64_t count = (end - start) & ~(int64_t)31;
    if (isa == 2) decode_avx512(j, packed, s, out, start, count);
    if (isa == 1) decode_avx2(j, packed, s, out, start, count);
    if (isa) done += count;
#endif
    decode_scalar(j, packed, s, out, done, end);
  }
  return NULL;
}

static XLA_FFI_Error* fail(const XLA_FFI_Api* api, const char* message) {
  XLA_FFI_Error_Create_Args args;
  memset(&args, 0, sizeof(args));
  args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  args.message = message;
  args.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
  return api->XLA_FFI_Error_Create(&args);
}

static int64_t elements(const XLA_FFI_Buffer* b) {
  int64_t count = 1;
  for (int64_t d = 0; d < b->rank; ++d) count *= b->dims[d];
  return count;
}

static int64_t last_dim(const XLA_FFI_Buffer* b) { return b->rank ? b->dims[b->rank - 1] : 1; }

#define MAX_THREADS 64
#define MIN_ELEMENTS_PER_THREAD (1 << 18)

XLA_FFI_Error* jqlora_nf4_dequantize(XLA_FFI_CallFrame* call) {
  /* XLA asks for the handler's metadata first: report the API version we were built with. */
  /* (The extension's type name changed between XLA versions; its layout did not.) */
  if (call->extension_start && call->extension_start->type == XLA_FFI_Extension_Metadata) {
    XLA_FFI_Metadata* meta = ((XLA_FFI_Metadata_Extension*)call->extension_start)->metadata;
    meta->api_version.major_version = XLA_FFI_API_MAJOR;
    meta->api_version.minor_version = XLA_FFI_API_MINOR;
    meta->traits = 0;
    return NULL;
  }
  if (call->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
  const XLA_FFI_Api* api = call->api;
  if (call->args.size != 3 || call->rets.size != 1 || call->attrs.size != 1)
    return fail(api, "jqlora_nf4_dequantize: expected 3 arguments, 1 result, 1 attribute");
  for (int k = 0; k < 3; ++k)
    if (call->args.types[k] != XLA_FFI_ArgType_BUFFER)
      return fail(api, "jqlora_nf4_dequantize: arguments must be buffers");
  const XLA_FFI_Buffer* packed = (const XLA_FFI_Buffer*)call->args.args[0];
  const XLA_FFI_Buffer* scales = (const XLA_FFI_Buffer*)call->args.args[1];
  const XLA_FFI_Buffer* table = (const XLA_FFI_Buffer*)call->args.args[2];
  const XLA_FFI_Buffer* out = (const XLA_FFI_Buffer*)call->rets.rets[0];
  const XLA_FFI_Scalar* bs = (const XLA_FFI_Scalar*)call->attrs.attrs[0];
  if (call->attrs.types[0] != XLA_FFI_AttrType_SCALAR || bs->dtype != XLA_FFI_DataType_S64)
    return fail(api, "jqlora_nf4_dequantize: block_size must be an int64 scalar");
  if (packed->dtype != XLA_FFI_DataType_U8 || scales->dtype != XLA_FFI_DataType_F32 ||
      table->dtype != XLA_FFI_DataType_F32 || elements(table) < 16)
    return fail(api, "jqlora_nf4_dequantize: expected uint8 codes, float32 scales, float32[16] table");
  if (out->dtype != XLA_FFI_DataType_F32 && out->dtype != XLA_FFI_DataType_BF16)
    return fail(api, "jqlora_nf4_dequantize: output must be float32 or bfloat16");

  Job job;
  job.packed = (const uint8_t*)packed->data;
  job.scales = (const float*)scales->data;
  job.table = (const float*)table->data;
  job.out = out->data;
  job.n = last_dim(out);
  job.p = last_dim(packed);
  job.nb = last_dim(scales);
  job.block_size = *(const int64_t*)bs->value;
  job.bf16 = out->dtype == XLA_FFI_DataType_BF16;
  job.items = job.n ? elements(out) / job.n : 0;
  if (job.block_size < 32 || job.block_size % 32 || job.p * 2 < job.n ||
      job.nb * job.block_size < job.n || elements(packed) != job.items * job.p ||
      elements(scales) != job.items * job.nb) {
    char message[256]; /* copied by XLA */
    snprintf(message, sizeof(message),
             "jqlora_nf4_dequantize: %lld bytes and %lld scales per item do not fit %lld "
             "outputs per item in blocks of %lld (a multiple of 32)",
             (long long)job.p, (long long)job.nb, (long long)job.n, (long long)job.block_size);
    return fail(api, message);
  }

  int64_t blocks = job.items * job.nb;
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
#ifdef __linux__
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) cpus = CPU_COUNT(&allowed);
#endif
  int64_t threads = (job.items * job.n) / MIN_ELEMENTS_PER_THREAD;
  if (threads > cpus) threads = cpus;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > blocks) threads = blocks;
  if (threads < 1) threads = 1;

  huge_pages(job.out, (size_t)(job.items * job.n) * (job.bf16 ? 2 : 4));
  Job jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int64_t t = 0; t < threads; ++t) {
    jobs[t] = job;
    jobs[t].first = blocks * t / threads;
    jobs[t].last = blocks * (t + 1) / threads;
    if (t > 0) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
  }
  run_job(&jobs[0]);
  for (int64_t t = 1; t < threads; ++t) {
    if (started[t]) pthread_join(ids[t], NULL);
    else run_job(&jobs[t]); /* thread creation failed: do its share here */
  }
  return NULL;
}
