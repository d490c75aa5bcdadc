// Routed token attention of BRA (steps 4-5 of attentions/bra.py) and its local context enhancement (LCE), on CPU,
// without materialising the gathered keys and values. Built by attentions/bra_native.py with the machine's C++
// compiler (-O3 -march=native) and called through ctypes; it uses no torch headers.
//
// For one image b, query region r and head h, with Q_r the region's T query tokens, the routed regions
// g_1..g_k = index[b, r, :] and K_g, V_g their n key/value tokens each:
//     O_r = softmax(scale · Q_r [K_g1; …; K_gk]ᵀ) [V_g1; …; V_gk]                     (BiFormer eq. 5-6)
// Tokens are addressed through row tables, so one kernel serves the region-major layout of bra_kernels'
// RoutedAttention (rows r·T + t) and the image's own raster order (rows y·W + x): element d of head h of token
// row `row` of image b sits at base + b·image_stride + row·row_stride + h·head_dim + d.
//
// The logits are kept transposed (keys × query lanes), so the softmax over keys is element-wise across rows and the
// values are read straight from their rows: the only copy is Q's transpose, T·head_dim values per region and head.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <typename S> struct Lanes;
template <> struct Lanes<float> { typedef f32x16 vec; static constexpr int count = 16; };
template <> struct Lanes<double> { typedef f64x8 vec; static constexpr int count = 8; };

template <typename V, typename S> inline V splat(S value) { return V{} + value; }

// unaligned vector load and store (rows of an operand need not sit on vector boundaries)
template <typename V, typename S> inline V load(const S* from) {
  V value;
  __builtin_memcpy(&value, from, sizeof(V));
  return value;
}
template <typename V, typename S> inline void store(S* to, V value) { __builtin_memcpy(to, &value, sizeof(V)); }

// e^x for x ≤ 0 (logits minus their maximum), 16 lanes: Cephes' expf (range reduction by ln 2, degree-5
// polynomial), about 1 ulp on that range; inputs below -87.3 give 2^-126·e^r, not 0, which is far below anything
// that survives the sum.
inline f32x16 exp_nonpositive(f32x16 x) {
  x = x < -87.3f ? splat<f32x16>(-87.3f) : x;
  const f32x16 t = x * 1.44269504088896341f - 0.5f;
  const i32x16 n = __builtin_convertvector(t, i32x16);  // truncation of t - 1/2 rounds t ≤ 0 to nearest
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  f32x16 r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  f32x16 p = splat<f32x16>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x16 bits = (n + 127) << 23;
  f32x16 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline f64x8 exp_nonpositive(f64x8 x) {  // float64 is the checking precision: the C library's exp, lane by lane
  for (int lane = 0; lane < 8; ++lane) x[lane] = std::exp(x[lane]);
  return x;
}

struct Shape {
  int64_t batch, regions, tokens, keys_per_region, topk, heads, head_dim_qk, head_dim_v;
};

struct Operand {  // element (b, row, h, d) at data + b·image + row·row + h·head_dim + d
  const void* data;
  int64_t image, row;
};

template <typename S> struct RegionAttention {
  using V = typename Lanes<S>::vec;
  static constexpr int L = Lanes<S>::count;

  const Shape& shape;
  const int64_t *query_rows, *key_rows, *index;
  Operand q, k, v;
  S scale;
  S* out;
  int64_t out_image, out_row;
  std::vector<V> query_t, logits_t;  // (head_dim, query vectors), (routed keys, query vectors)
  std::vector<const S*> key_ptr, value_ptr;

  RegionAttention(const Shape& s, const int64_t* qr, const int64_t* kr, const int64_t* ix, Operand q_, Operand k_,
                  Operand v_, S scale_, S* out_, int64_t oi, int64_t orow)
      : shape(s), query_rows(qr), key_rows(kr), index(ix), q(q_), k(k_), v(v_), scale(scale_), out(out_),
        out_image(oi), out_row(orow) {
    const int64_t vectors = (s.tokens + L - 1) / L, keys = s.topk * s.keys_per_region;
    query_t.resize(s.head_dim_qk * vectors);
    logits_t.resize(keys * vectors);
    key_ptr.resize(keys);
    value_ptr.resize(keys);
  }

  // logits_t[j, lanes] += Σ_d key_j[d] · query_t[d, lanes], for JB keys and TQ query vectors at a time
  template <int TQ, int JB>
  void logits_tile(int64_t first_key, int64_t first_vector, int64_t vectors) {
    V acc[JB][TQ] = {};
    const int64_t dq = shape.head_dim_qk;
    for (int64_t d = 0; d < dq; ++d) {
      V query[TQ];
      for (int t = 0; t < TQ; ++t) query[t] = query_t[d * vectors + first_vector + t];
      for (int j = 0; j < JB; ++j) {
        const V key = splat<V>(key_ptr[first_key + j][d]);
        for (int t = 0; t < TQ; ++t) acc[j][t] += key * query[t];
      }
    }
    for (int j = 0; j < JB; ++j)
      for (int t = 0; t < TQ; ++t) logits_t[(first_key + j) * vectors + first_vector + t] = acc[j][t];
  }

  template <int TQ, int JB>
  void logits_columns(int64_t first_vector, int64_t vectors, int64_t keys) {
    int64_t j = 0;
    for (; j + JB <= keys; j += JB) logits_tile<TQ, JB>(j, first_vector, vectors);
    for (; j < keys; ++j) logits_tile<TQ, 1>(j, first_vector, vectors);
  }

  // out[i, e..] = Σ_j p[j, i] · value_j[e..], for IB queries and EV value vectors at a time
  template <int IB, int EV>
  void values_tile(S* const* rows, const S* probs_t, int64_t first_query, int64_t e, int64_t vectors, int64_t keys,
                   const S* inverse_sum) {
    V acc[IB][EV] = {};
    for (int64_t j = 0; j < keys; ++j) {
      V value[EV];
      for (int u = 0; u < EV; ++u) value[u] = load<V>(value_ptr[j] + e + u * L);
      const S* p = probs_t + j * vectors * L + first_query;
      for (int i = 0; i < IB; ++i) {
        const V weight = splat<V>(p[i]);
        for (int u = 0; u < EV; ++u) acc[i][u] += weight * value[u];
      }
    }
    for (int i = 0; i < IB; ++i)
      for (int u = 0; u < EV; ++u)
        store(rows[first_query + i] + e + u * L, acc[i][u] * inverse_sum[first_query + i]);
  }

  template <int IB, int EV>
  void values_rows(S* const* rows, const S* probs_t, int64_t e, int64_t vectors, int64_t keys, const S* inverse_sum) {
    int64_t i = 0;
    for (; i + IB <= shape.tokens; i += IB) values_tile<IB, EV>(rows, probs_t, i, e, vectors, keys, inverse_sum);
    for (; i < shape.tokens; ++i) values_tile<1, EV>(rows, probs_t, i, e, vectors, keys, inverse_sum);
  }

  void run(int64_t b, int64_t r) {
    const Shape& s = shape;
    const int64_t T = s.tokens, vectors = (T + L - 1) / L, keys = s.topk * s.keys_per_region;
    const int64_t dq = s.head_dim_qk, dv = s.head_dim_v;
    const S* q_image = static_cast<const S*>(q.data) + b * q.image;
    const S* k_image = static_cast<const S*>(k.data) + b * k.image;
    const S* v_image = static_cast<const S*>(v.data) + b * v.image;
    const int64_t* routed = index + (b * s.regions + r) * s.topk;
    std::vector<S*> out_rows(T);
    std::vector<S> inverse_sum(vectors * L);
    for (int64_t h = 0; h < s.heads; ++h) {
      S* flat_query_t = reinterpret_cast<S*>(query_t.data());
      std::fill(flat_query_t, flat_query_t + dq * vectors * L, S(0));
      for (int64_t t = 0; t < T; ++t) {
        const S* row = q_image + query_rows[r * T + t] * q.row + h * dq;
        for (int64_t d = 0; d < dq; ++d) flat_query_t[d * vectors * L + t] = row[d] * scale;
        out_rows[t] = out + b * out_image + query_rows[r * T + t] * out_row + h * dv;
      }
      for (int64_t g = 0; g < s.topk; ++g)
        for (int64_t t = 0; t < s.keys_per_region; ++t) {
          const int64_t row = key_rows[routed[g] * s.keys_per_region + t];
          key_ptr[g * s.keys_per_region + t] = k_image + row * k.row + h * dq;
          value_ptr[g * s.keys_per_region + t] = v_image + row * v.row + h * dv;
        }
      int64_t first = 0;
      for (; first + 4 <= vectors; first += 4) logits_columns<4, 3>(first, vectors, keys);
      if (vectors - first == 3) logits_columns<3, 4>(first, vectors, keys);
      if (vectors - first == 2) logits_columns<2, 6>(first, vectors, keys);
      if (vectors - first == 1) logits_columns<1, 8>(first, vectors, keys);

      for (int64_t u = 0; u < vectors; ++u) {  // softmax over keys, lane-wise; 1/sum applied to the output
        V top = logits_t[u];
        for (int64_t j = 1; j < keys; ++j) top = logits_t[j * vectors + u] > top ? logits_t[j * vectors + u] : top;
        V sum = {};
        for (int64_t j = 0; j < keys; ++j) {
          const V e = exp_nonpositive(logits_t[j * vectors + u] - top);
          logits_t[j * vectors + u] = e;
          sum += e;
        }
        for (int lane = 0; lane < L; ++lane) inverse_sum[u * L + lane] = S(1) / sum[lane];
      }
      const S* probs_t = reinterpret_cast<const S*>(logits_t.data());
      int64_t e = 0;
      for (; e + 2 * L <= dv; e += 2 * L) values_rows<6, 2>(out_rows.data(), probs_t, e, vectors, keys, inverse_sum.data());
      for (; e + L <= dv; e += L) values_rows<12, 1>(out_rows.data(), probs_t, e, vectors, keys, inverse_sum.data());
      for (; e < dv; ++e)  // a head width that is not a multiple of the vector width: the rest one by one
        for (int64_t i = 0; i < T; ++i) {
          S acc = 0;
          for (int64_t j = 0; j < keys; ++j) acc += probs_t[j * vectors * L + i] * value_ptr[j][e];
          out_rows[i][e] = acc * inverse_sum[i];
        }
    }
  }
};

// Calls fn(part) for part = 0 … threads-1, on this thread and threads-1 others. Every started thread is joined
// before returning; an exception in any part (or a thread that cannot start) is rethrown here, after the joins.
template <typename F> void on_threads(int threads, F fn) {
  std::atomic<bool> failed{false};
  auto part_guarded = [&](int part) {
    try {
      fn(part);
    } catch (...) {
      failed = true;
    }
  };
  std::vector<std::thread> others;
  try {
    for (int part = 1; part < threads; ++part) others.emplace_back(part_guarded, part);
  } catch (...) {
    failed = true;
  }
  part_guarded(0);
  for (auto& thread : others) thread.join();
  if (failed) throw std::runtime_error("a part of the kernel failed");
}

// Splits items 0 … items-1 into up to `threads` contiguous ranges and calls fn(begin, end) for each on its own thread.
template <typename F> void over_items(int64_t items, int threads, F fn) {
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  on_threads(parts, [&](int part) { fn(items * part / parts, items * (part + 1) / parts); });
}

// out[b, y, x, c] += bias[c] + Σ_{dy,dx} weight[dy, dx, c] · v[b, y + dy - p, x + dx - p, c], zero outside the map
// (p = side / 2): the LCE's depthwise conv, rows in raster order (row = y·width + x). XB pixels of a row share each
// weight load; the taps that fall outside the map are skipped.
template <typename S, int XB>
inline void local_context_pixels(int64_t y, int64_t x, int64_t c, int64_t height, int64_t width, int64_t channels,
                                 int64_t side, const S* v_image, int64_t v_row, const S* weight, const S* bias,
                                 S* out_image, int64_t out_row) {
  using V = typename Lanes<S>::vec;
  const int64_t pad = side / 2;
  V acc[XB];
  for (int i = 0; i < XB; ++i) acc[i] = load<V>(bias + c);
  const bool inside = x - pad >= 0 && x + XB - 1 + pad < width;
  for (int64_t dy = 0; dy < side; ++dy) {
    const int64_t yy = y + dy - pad;
    if (yy < 0 || yy >= height) continue;
    const S* v_row_start = v_image + yy * width * v_row + c;
    for (int64_t dx = 0; dx < side; ++dx) {
      const V w = load<V>(weight + (dy * side + dx) * channels + c);
      const int64_t first = x + dx - pad;
      for (int i = 0; i < XB; ++i)
        if (inside || (first + i >= 0 && first + i < width)) acc[i] += w * load<V>(v_row_start + (first + i) * v_row);
    }
  }
  for (int i = 0; i < XB; ++i) {
    S* target = out_image + (y * width + x + i) * out_row + c;
    store(target, load<V>(target) + acc[i]);
  }
}

template <typename S>
void local_context_add(int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t side, Operand v,
                       const S* weight, const S* bias, S* out, int64_t out_image, int64_t out_row, int threads) {
  constexpr int L = Lanes<S>::count, XB = 4;
  const int64_t pad = side / 2;
  over_items(batch * height, threads, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / height, y = item % height;
      const S* v_image = static_cast<const S*>(v.data) + b * v.image;
      S* out_map = out + b * out_image;
      int64_t c = 0;
      for (; c + L <= channels; c += L) {
        int64_t x = 0;
        for (; x + XB <= width; x += XB)
          local_context_pixels<S, XB>(y, x, c, height, width, channels, side, v_image, v.row, weight, bias, out_map,
                                      out_row);
        for (; x < width; ++x)
          local_context_pixels<S, 1>(y, x, c, height, width, channels, side, v_image, v.row, weight, bias, out_map,
                                     out_row);
      }
      for (; c < channels; ++c)  // channels beyond the last full vector, one by one
        for (int64_t x = 0; x < width; ++x) {
          S acc = bias[c];
          for (int64_t dy = 0; dy < side; ++dy)
            for (int64_t dx = 0; dx < side; ++dx) {
              const int64_t yy = y + dy - pad, xx = x + dx - pad;
              if (yy >= 0 && yy < height && xx >= 0 && xx < width)
                acc += weight[(dy * side + dx) * channels + c] * v_image[(yy * width + xx) * v.row + c];
            }
          out_map[(y * width + x) * out_row + c] += acc;
        }
    }
  });
}

// means[b, r, c] = mean over the T rows of region r of x[b, row, c], c < width: the region queries and keys of
// BRA's routing (step 2), read where they lie.
template <typename S>
void region_means(int64_t batch, int64_t regions, int64_t tokens, int64_t width, const int64_t* rows, Operand x,
                  S* means, int threads) {
  using V = typename Lanes<S>::vec;
  constexpr int L = Lanes<S>::count;
  over_items(batch * regions, threads, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / regions, r = item % regions;
      const S* image = static_cast<const S*>(x.data) + b * x.image;
      S* target = means + item * width;
      const S inverse = S(1) / S(tokens);
      int64_t c = 0;
      for (; c + L <= width; c += L) {
        V sum = {};
        for (int64_t t = 0; t < tokens; ++t) sum += load<V>(image + rows[r * tokens + t] * x.row + c);
        store(target + c, sum * inverse);
      }
      for (; c < width; ++c) {
        S sum = 0;
        for (int64_t t = 0; t < tokens; ++t) sum += image[rows[r * tokens + t] * x.row + c];
        target[c] = sum * inverse;
      }
    }
  });
}

template <typename S>
void routed_attention(const Shape& shape, const int64_t* query_rows, const int64_t* key_rows, const int64_t* index,
                      Operand q, Operand k, Operand v, double scale, S* out, int64_t out_image, int64_t out_row,
                      int threads) {
  over_items(shape.batch * shape.regions, threads, [&](int64_t begin, int64_t end) {
    RegionAttention<S> region(shape, query_rows, key_rows, index, q, k, v, static_cast<S>(scale), out, out_image,
                              out_row);  // this thread's scratch
    for (int64_t item = begin; item < end; ++item) region.run(item / shape.regions, item % shape.regions);
  });
}

}  // namespace

// dims: batch, regions, tokens per query region, key tokens per region, topk, heads, head width of q/k, of v.
// Each operand: pointer, image stride, row stride (in elements). Each returns 0, or 1 when a C++ exception (out of
// memory, a thread that could not start) stopped it: no exception crosses into the caller.
template <typename F> int guarded(F fn) {
  try {
    fn();
    return 0;
  } catch (...) {
    return 1;
  }
}

#define ATTNBENCH_EXPORT(S, SUFFIX)                                                                                  \
  extern "C" int attnbench_bra_routed_attention_##SUFFIX(                                                           \
      const int64_t* dims, const int64_t* query_rows, const int64_t* key_rows, const int64_t* index, const S* q,     \
      int64_t q_image, int64_t q_row, const S* k, int64_t k_image, int64_t k_row, const S* v, int64_t v_image,      \
      int64_t v_row, double scale, S* out, int64_t out_image, int64_t out_row, int threads) {                       \
    const Shape shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7]};                      \
    return guarded([&] {                                                                                             \
      routed_attention<S>(shape, query_rows, key_rows, index, Operand{q, q_image, q_row},                            \
                          Operand{k, k_image, k_row}, Operand{v, v_image, v_row}, scale, out, out_image, out_row,    \
                          threads);                                                                                  \
    });                                                                                                              \
  }                                                                                                                  \
  extern "C" int attnbench_bra_local_context_add_##SUFFIX(                                                           \
      int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t side, const S* v, int64_t v_image,     \
      int64_t v_row, const S* weight, const S* bias, S* out, int64_t out_image, int64_t out_row, int threads) {      \
    return guarded([&] {                                                                                             \
      local_context_add<S>(batch, height, width, channels, side, Operand{v, v_image, v_row}, weight, bias, out,      \
                           out_image, out_row, threads);                                                             \
    });                                                                                                              \
  }                                                                                                                  \
  extern "C" int attnbench_bra_region_means_##SUFFIX(int64_t batch, int64_t regions, int64_t tokens, int64_t width,  \
                                                     const int64_t* rows, const S* x, int64_t x_image, int64_t x_row, \
                                                     S* means, int threads) {                                        \
    return guarded([&] { region_means<S>(batch, regions, tokens, width, rows, Operand{x, x_image, x_row}, means,    \
                                         threads); });                                                               \
  }

ATTNBENCH_EXPORT(float, f32)
ATTNBENCH_EXPORT(double, f64)
