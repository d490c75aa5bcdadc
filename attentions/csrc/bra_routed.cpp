// Routed token attention of BRA (steps 4-5 of attentions/bra.py) and its local context enhancement (LCE), on CPU,
// without materialising the gathered keys and values. Built by attentions/bra_native.py with the machine's C++
// compiler (-O3 -march=native) and called through ctypes; it uses no torch headers.
//
// For one image b, query region r and head h, with Q_r the region's T query tokens, the routed regions
// g_1..g_k = index[b, r, :] and K_g, V_g their n key/value tokens each:
//     O_r = softmax(scale · Q_r [K_g1; …; K_gk]ᵀ) [V_g1; …; V_gk]                     (BiFormer eq. 5-6)
// Tokens are addressed through row tables, so one kernel serves the region-major layout of bra_kernels'
// RoutedAttention (rows r·T + t) and the image's own raster order (rows y·W + x): element d of head h of token
// row `row` of image b sits at base + b·image_stride + row·row_stride + h·head_dim + d. The gradients of both
// (HeadBackward, local_context_param_grads) follow the forward code below.
//
// The logits are kept transposed (keys × query lanes), so the softmax over keys is element-wise across rows and the
// values are read straight from their rows. Where a region has few queries (4 at BiFormer-T's stage 3, 1 at stage
// 4), the lanes hold (query, head) pairs of a group of heads, so more of each vector is used (all of it at
// BiFormer's shapes); the keys are then read from a transpose of the image's keys in which a token's element d of
// the group's heads sit side by side. The copies are Q's transpose, T·head_dim values per region and head, and,
// where heads share the lanes, that of the keys, once per image and thread.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
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

// from[0 … G) repeated across a vector's lanes. A chunk of 8 or 16 bytes is splatted as one integer (a single
// broadcast instruction on x86), a wider one is loaded whole and shuffled; the shuffle of a narrow chunk would go
// through the stack.
template <typename S, int G, size_t... Lane>
inline typename Lanes<S>::vec tiled_lanes(const S* from, std::index_sequence<Lane...>) {
#if defined(__clang__) || __GNUC__ >= 12
  typedef S chunk __attribute__((vector_size(sizeof(S) * G)));
  chunk part;
  __builtin_memcpy(&part, from, sizeof(part));
  return __builtin_shufflevector(part, part, (Lane % G)...);
#else  // no __builtin_shufflevector before GCC 12: lane by lane
  return typename Lanes<S>::vec{from[Lane % G]...};
#endif
}
template <typename Word, typename V, typename S> inline V splat_bytes(const S* from) {
  typedef Word words __attribute__((vector_size(sizeof(V))));
  Word word;
  __builtin_memcpy(&word, from, sizeof(word));
  const words repeated = words{} + word;
  V value;
  __builtin_memcpy(&value, &repeated, sizeof(value));
  return value;
}
template <typename S, int G> inline typename Lanes<S>::vec tiled(const S* from) {
  using V = typename Lanes<S>::vec;
  static_assert(Lanes<S>::count % G == 0, "G divides the lane count");
  constexpr size_t bytes = sizeof(S) * G;
  if constexpr (G == 1) return splat<V>(*from);
  else if constexpr (G == Lanes<S>::count) return load<V>(from);
  else if constexpr (bytes == 8) return splat_bytes<uint64_t, V>(from);
  else if constexpr (bytes == 16) return splat_bytes<unsigned __int128, V>(from);
  else return tiled_lanes<S, G>(from, std::make_index_sequence<Lanes<S>::count>{});
}

// One thread's attention over its (image, region) items. G heads share the lanes (G divides the head count and the
// lane count): lane m = i·G + u holds query i of head g·G + u in head group g, so a region of few queries (4 at
// BiFormer-T's stage 3, 1 at stage 4) uses more of each vector. For G > 1 each image's keys are transposed once into
// keys_t (key table position, d, head), where element d of the G heads of a group sits side by side; for G = 1 the
// keys are read where they lie. Key element d of head h is at key_ptr[j] + d·key_d_stride + h·key_head_stride.
template <typename S, int G> struct RegionAttention {
  using V = typename Lanes<S>::vec;
  static constexpr int L = Lanes<S>::count;

  const Shape& shape;
  const int64_t *query_rows, *key_rows, *index;
  Operand q, k, v;
  S scale;
  S* out;
  int64_t out_image, out_row;
  int64_t vectors, keys;             // T·G lanes in `vectors` vectors; topk·n routed keys
  int64_t key_d_stride, key_head_stride;
  std::vector<V> query_t, logits_t;  // (head_dim, query vectors), (routed keys, query vectors)
  std::vector<S> keys_t, inverse_sum;
  int64_t keys_t_image = -1;         // the image whose keys keys_t holds
  std::vector<const S*> key_ptr, value_ptr;
  std::vector<S*> out_rows;

  RegionAttention(const Shape& s, const int64_t* qr, const int64_t* kr, const int64_t* ix, Operand q_, Operand k_,
                  Operand v_, S scale_, S* out_, int64_t oi, int64_t orow)
      : shape(s), query_rows(qr), key_rows(kr), index(ix), q(q_), k(k_), v(v_), scale(scale_), out(out_),
        out_image(oi), out_row(orow), vectors((s.tokens * G + L - 1) / L), keys(s.topk * s.keys_per_region),
        key_d_stride(G > 1 ? s.heads : 1), key_head_stride(G > 1 ? 1 : s.head_dim_qk) {
    query_t.resize(s.head_dim_qk * vectors);
    logits_t.resize(keys * vectors);
    if (G > 1) keys_t.resize(s.regions * s.keys_per_region * s.head_dim_qk * s.heads);
    inverse_sum.resize(vectors * L);
    key_ptr.resize(keys);
    value_ptr.resize(keys);
    out_rows.resize(s.tokens);
  }

  // keys_t[position, d, h] = key[key_rows[position], h, d] for every key table position of image b
  void transpose_keys(int64_t b) {
    const int64_t dq = shape.head_dim_qk, heads = shape.heads;
    const S* k_image = static_cast<const S*>(k.data) + b * k.image;
    for (int64_t position = 0; position < shape.regions * shape.keys_per_region; ++position) {
      const S* row = k_image + key_rows[position] * k.row;
      S* target = keys_t.data() + position * dq * heads;
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < dq; ++d) target[d * heads + h] = row[h * dq + d];
    }
    keys_t_image = b;
  }

  // logits_t[j, lanes] += Σ_d key_j[d, group's heads] · query_t[d, lanes], for JB keys and TQ query vectors at a time
  template <int TQ, int JB>
  void logits_tile(int64_t first_key, int64_t first_vector, int64_t first_head) {
    V acc[JB][TQ] = {};
    const int64_t dq = shape.head_dim_qk, head_offset = first_head * key_head_stride;
    for (int64_t d = 0; d < dq; ++d) {
      V query[TQ];
      for (int t = 0; t < TQ; ++t) query[t] = query_t[d * vectors + first_vector + t];
      for (int j = 0; j < JB; ++j) {
        const V key = tiled<S, G>(key_ptr[first_key + j] + d * key_d_stride + head_offset);
        for (int t = 0; t < TQ; ++t) acc[j][t] += key * query[t];
      }
    }
    for (int j = 0; j < JB; ++j)
      for (int t = 0; t < TQ; ++t) logits_t[(first_key + j) * vectors + first_vector + t] = acc[j][t];
  }

  // all keys from `first_key` on, JB at a time, the rest in blocks of JB/2, JB/4, … (JB a power of two)
  template <int TQ, int JB>
  void logits_columns(int64_t first_vector, int64_t first_head, int64_t first_key = 0) {
    int64_t j = first_key;
    for (; j + JB <= keys; j += JB) logits_tile<TQ, JB>(j, first_vector, first_head);
    if constexpr (JB > 1)
      if (j < keys) logits_columns<TQ, JB / 2>(first_vector, first_head, j);
  }

  // out[i, h, e..] = Σ_j p[j, lane i·G + u] · value_j[h, e..] for head h = group·G + u: IB queries, UB heads and EV
  // value vectors at a time (the queries of one head share each value load)
  template <int IB, int UB, int EV>
  void values_tile(const S* probs_t, int64_t first_query, int64_t first_head, int64_t first_u, int64_t e) {
    const int64_t dv = shape.head_dim_v;
    V acc[UB][IB][EV] = {};
    for (int64_t j = 0; j < keys; ++j) {
      const S* p = probs_t + j * vectors * L + first_query * G + first_u;
      for (int u = 0; u < UB; ++u) {
        V value[EV];
        for (int w = 0; w < EV; ++w) value[w] = load<V>(value_ptr[j] + (first_head + u) * dv + e + w * L);
        for (int i = 0; i < IB; ++i) {
          const V weight = splat<V>(p[i * G + u]);
          for (int w = 0; w < EV; ++w) acc[u][i][w] += weight * value[w];
        }
      }
    }
    for (int u = 0; u < UB; ++u)
      for (int i = 0; i < IB; ++i)
        for (int w = 0; w < EV; ++w)
          store(out_rows[first_query + i] + (first_head + u) * dv + e + w * L,
                acc[u][i][w] * inverse_sum[(first_query + i) * G + first_u + u]);
  }

  // every query from `first_query` on, IB at a time, the rest in blocks of IB/2, IB/4, … (IB a power of two)
  template <int IB, int UB, int EV>
  void values_queries(const S* probs_t, int64_t first_head, int64_t first_u, int64_t e, int64_t first_query = 0) {
    int64_t i = first_query;
    for (; i + IB <= shape.tokens; i += IB) values_tile<IB, UB, EV>(probs_t, i, first_head, first_u, e);
    if constexpr (IB > 1)
      if (i < shape.tokens) values_queries<IB / 2, UB, EV>(probs_t, first_head, first_u, e, i);
  }

  // the group's output, UB heads at a time, 8 to 16 accumulators per tile
  template <int UB>
  void values_group(const S* probs_t, int64_t group) {
    const int64_t dv = shape.head_dim_v, T = shape.tokens;
    for (int64_t u = 0; u < G; u += UB) {
      const int64_t h = group * G + u;
      int64_t e = 0;
      for (; e + 2 * L <= dv; e += 2 * L) values_queries<(UB >= 4 ? 1 : 8 / UB), UB, 2>(probs_t, h, u, e);
      for (; e + L <= dv; e += L) values_queries<(UB >= 4 ? 2 : 16 / UB), UB, 1>(probs_t, h, u, e);
      for (; e < dv; ++e)  // a head width that is not a multiple of the vector width: the rest one by one
        for (int64_t uu = u; uu < u + UB; ++uu)
          for (int64_t i = 0; i < T; ++i) {
            S acc = 0;
            for (int64_t j = 0; j < keys; ++j)
              acc += probs_t[j * vectors * L + i * G + uu] * value_ptr[j][(group * G + uu) * dv + e];
            out_rows[i][(group * G + uu) * dv + e] = acc * inverse_sum[i * G + uu];
          }
    }
  }

  void run(int64_t b, int64_t r) {
    const Shape& s = shape;
    const int64_t T = s.tokens, dq = s.head_dim_qk;
    if (G > 1 && keys_t_image != b) transpose_keys(b);
    const S* q_image = static_cast<const S*>(q.data) + b * q.image;
    const S* k_image = static_cast<const S*>(k.data) + b * k.image;
    const S* v_image = static_cast<const S*>(v.data) + b * v.image;
    const int64_t* routed = index + (b * s.regions + r) * s.topk;
    for (int64_t t = 0; t < T; ++t) out_rows[t] = out + b * out_image + query_rows[r * T + t] * out_row;
    for (int64_t g = 0; g < s.topk; ++g)
      for (int64_t t = 0; t < s.keys_per_region; ++t) {
        const int64_t position = routed[g] * s.keys_per_region + t;
        key_ptr[g * s.keys_per_region + t] =
            G > 1 ? keys_t.data() + position * dq * s.heads : k_image + key_rows[position] * k.row;
        value_ptr[g * s.keys_per_region + t] = v_image + key_rows[position] * v.row;
      }
    for (int64_t group = 0; group < s.heads / G; ++group) {
      S* flat_query_t = reinterpret_cast<S*>(query_t.data());
      std::fill(flat_query_t, flat_query_t + dq * vectors * L, S(0));
      for (int64_t t = 0; t < T; ++t) {
        const S* row = q_image + query_rows[r * T + t] * q.row + group * G * dq;
        for (int64_t u = 0; u < G; ++u)
          for (int64_t d = 0; d < dq; ++d) flat_query_t[d * vectors * L + t * G + u] = row[u * dq + d] * scale;
      }
      int64_t first = 0;
      for (; first + 4 <= vectors; first += 4) logits_columns<4, 4>(first, group * G);
      if (vectors - first == 3) logits_columns<3, 4>(first, group * G);
      if (vectors - first == 2) logits_columns<2, 8>(first, group * G);
      if (vectors - first == 1) logits_columns<1, 8>(first, group * G);

      for (int64_t w = 0; w < vectors; ++w) {  // softmax over keys, lane-wise; 1/sum applied to the output
        V top = logits_t[w];
        for (int64_t j = 1; j < keys; ++j) top = logits_t[j * vectors + w] > top ? logits_t[j * vectors + w] : top;
        V sum = {};
        for (int64_t j = 0; j < keys; ++j) {
          const V e = exp_nonpositive(logits_t[j * vectors + w] - top);
          logits_t[j * vectors + w] = e;
          sum += e;
        }
        for (int lane = 0; lane < L; ++lane) inverse_sum[w * L + lane] = S(1) / sum[lane];
      }
      const S* probs_t = reinterpret_cast<const S*>(logits_t.data());
      // few queries per region: the tiles span heads too, so they still hold enough independent sums
      if (T >= 8 || G == 1) values_group<1>(probs_t, group);
      else if (T >= 2 || G == 2) values_group<(G >= 2 ? 2 : 1)>(probs_t, group);
      else values_group<(G >= 4 ? 4 : 1)>(probs_t, group);
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

// The LCE's parameter gradients: grad_taps[dy·side + dx, c] = Σ_{b,y,x} grad_out[b, y, x, c] · v[b, y + dy − p,
// x + dx − p, c] (zero outside the map) and grad_bias[c] = Σ_{b,y,x} grad_out[b, y, x, c]. Each thread sums its rows
// of the batch's maps into its own (side² + 1, channels) buffer; the buffers are added after the threads join. (The
// input's gradient is the forward conv of grad_out with the kernel flipped: local_context_add.)
template <typename S>
void local_context_param_grads(int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t side,
                               Operand grad_out, Operand v, S* grad_taps, S* grad_bias, int threads) {
  using V = typename Lanes<S>::vec;
  constexpr int L = Lanes<S>::count;
  const int64_t pad = side / 2, taps = side * side, items = batch * height;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  std::vector<std::vector<S>> partial(parts, std::vector<S>((taps + 1) * channels, S(0)));
  on_threads(parts, [&](int part) {
    S* sums = partial[part].data();  // (taps + 1, channels): the taps, then the bias
    for (int64_t item = items * part / parts; item < items * (part + 1) / parts; ++item) {
      const int64_t b = item / height, y = item % height;
      const S* go_row = static_cast<const S*>(grad_out.data) + b * grad_out.image + y * width * grad_out.row;
      const S* v_image = static_cast<const S*>(v.data) + b * v.image;
      int64_t c = 0;
      for (; c + L <= channels; c += L) {
        V bias_sum = {};
        for (int64_t x = 0; x < width; ++x) bias_sum += load<V>(go_row + x * grad_out.row + c);
        store(sums + taps * channels + c, load<V>(sums + taps * channels + c) + bias_sum);
        for (int64_t dy = 0; dy < side; ++dy) {
          const int64_t yy = y + dy - pad;
          if (yy < 0 || yy >= height) continue;
          const S* v_row = v_image + yy * width * v.row + c;
          for (int64_t dx = 0; dx < side; ++dx) {
            const int64_t first = std::max<int64_t>(0, pad - dx), last = std::min<int64_t>(width, width + pad - dx);
            const int64_t shift = dx - pad;
            V acc[4] = {};
            int64_t x = first;
            for (; x + 4 <= last; x += 4)
              for (int i = 0; i < 4; ++i)
                acc[i] += load<V>(go_row + (x + i) * grad_out.row + c) * load<V>(v_row + (x + i + shift) * v.row);
            for (; x < last; ++x)
              acc[0] += load<V>(go_row + x * grad_out.row + c) * load<V>(v_row + (x + shift) * v.row);
            S* target = sums + (dy * side + dx) * channels + c;
            store(target, load<V>(target) + ((acc[0] + acc[1]) + (acc[2] + acc[3])));
          }
        }
      }
      for (; c < channels; ++c) {  // channels beyond the last full vector, one by one
        for (int64_t x = 0; x < width; ++x) sums[taps * channels + c] += go_row[x * grad_out.row + c];
        for (int64_t dy = 0; dy < side; ++dy)
          for (int64_t dx = 0; dx < side; ++dx)
            for (int64_t x = 0; x < width; ++x) {
              const int64_t yy = y + dy - pad, xx = x + dx - pad;
              if (yy >= 0 && yy < height && xx >= 0 && xx < width)
                sums[(dy * side + dx) * channels + c] +=
                    go_row[x * grad_out.row + c] * v_image[(yy * width + xx) * v.row + c];
            }
      }
    }
  });
  for (int64_t e = 0; e < taps * channels; ++e) {
    S total = 0;
    for (int part = 0; part < parts; ++part) total += partial[part][e];
    grad_taps[e] = total;
  }
  for (int64_t c = 0; c < channels; ++c) {
    S total = 0;
    for (int part = 0; part < parts; ++part) total += partial[part][taps * channels + c];
    grad_bias[c] = total;
  }
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

template <typename S, int G>
void routed_attention_grouped(const Shape& shape, const int64_t* query_rows, const int64_t* key_rows,
                              const int64_t* index, Operand q, Operand k, Operand v, double scale, S* out,
                              int64_t out_image, int64_t out_row, int threads) {
  over_items(shape.batch * shape.regions, threads, [&](int64_t begin, int64_t end) {
    RegionAttention<S, G> region(shape, query_rows, key_rows, index, q, k, v, static_cast<S>(scale), out, out_image,
                                 out_row);  // this thread's scratch
    for (int64_t item = begin; item < end; ++item) region.run(item / shape.regions, item % shape.regions);
  });
}

// C[m, v·L …] = Σ_kk A[m·a_m + kk·a_k] · B[kk·ldb + v·L …] for MB rows and NB vectors of C at a time: the small
// matrix products of the backward, every operand in a packed scratch buffer whose rows are whole vectors. A's element
// is read through two strides, so a transposed A (dSᵀ, Pᵀ) costs nothing.
template <typename S, int MB, int NB>
inline void product_tile(const S* a, int64_t a_m, int64_t a_k, const S* b, int64_t ldb, S* c, int64_t ldc,
                         int64_t depth) {
  using V = typename Lanes<S>::vec;
  constexpr int L = Lanes<S>::count;
  V acc[MB][NB] = {};
  for (int64_t kk = 0; kk < depth; ++kk) {
    V row[NB];
    for (int n = 0; n < NB; ++n) row[n] = load<V>(b + kk * ldb + n * L);
    for (int m = 0; m < MB; ++m) {
      const V weight = splat<V>(a[m * a_m + kk * a_k]);
      for (int n = 0; n < NB; ++n) acc[m][n] += weight * row[n];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) store(c + m * ldc + n * L, acc[m][n]);
}

// rows `first` … rows-1 of C, MB at a time, the rest in blocks of MB/2, MB/4, … (MB a power of two)
template <typename S, int MB, int NB>
void product_rows(int64_t rows, const S* a, int64_t a_m, int64_t a_k, const S* b, int64_t ldb, S* c, int64_t ldc,
                  int64_t depth, int64_t first = 0) {
  int64_t m = first;
  for (; m + MB <= rows; m += MB) product_tile<S, MB, NB>(a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, depth);
  if constexpr (MB > 1)
    if (m < rows) product_rows<S, MB / 2, NB>(rows, a, a_m, a_k, b, ldb, c, ldc, depth, m);
}

// C (rows × vectors·L) = A (rows × depth, strides a_m, a_k) · B (depth × vectors·L, row stride ldb), 16 accumulators
// per tile where the shape allows
template <typename S>
void product(int64_t rows, int64_t vectors, int64_t depth, const S* a, int64_t a_m, int64_t a_k, const S* b,
             int64_t ldb, S* c, int64_t ldc) {
  constexpr int L = Lanes<S>::count;
  int64_t v = 0;
  for (; v + 4 <= vectors; v += 4) product_rows<S, 4, 4>(rows, a, a_m, a_k, b + v * L, ldb, c + v * L, ldc, depth);
  for (; v + 2 <= vectors; v += 2) product_rows<S, 8, 2>(rows, a, a_m, a_k, b + v * L, ldb, c + v * L, ldc, depth);
  for (; v < vectors; ++v) product_rows<S, 8, 1>(rows, a, a_m, a_k, b + v * L, ldb, c + v * L, ldc, depth);
}

inline int64_t whole_vectors(int64_t count, int lanes) { return (count + lanes - 1) / lanes; }

// The gradient of the routed attention for one image and head, region by region (BiFormer eq. 5-6 differentiated as
// in FlashAttention's backward, Dao et al. 2022, Alg. 2, with the probabilities recomputed from Q and K):
//     P = softmax(scale · Q Kᵀ),  dP = dO Vᵀ,  D_i = Σ_j P_ij dP_ij,  dS = P ∘ (dP − D)
//     dQ = scale · dS K,  dK += scale · dSᵀ Q,  dV += Pᵀ dO
// Each query row belongs to one region, so dQ is written; a key may be routed to many regions, so dK and dV are
// summed, and one thread owns an (image, head) pair's columns of them, so no two threads write the same element.
// Every operand is packed per region into scratch whose rows are whole vectors (zero beyond the head width, and
// beyond the routed keys in the transposed ones), so the products need no tails.
// What the backward reads and writes, shared by its two layouts: the forward's inputs and row tables, the output
// gradient, and the gradients of q, k and v (each element (b, row, h, d) addressed as in an Operand).
template <typename S> struct Written {
  S* data;
  int64_t image, row;
  S* at(int64_t b, int64_t row_index) const { return data + b * image + row_index * row; }
};
template <typename S> struct BackwardProblem {
  Shape shape;
  const int64_t *query_rows, *key_rows, *index;
  Operand q, k, v, grad_out;
  S scale;
  Written<S> grad_q, grad_k, grad_v;
};

template <typename S> struct HeadBackward {
  static constexpr int L = Lanes<S>::count;
  const BackwardProblem<S>& p;
  int64_t keys, dq_pad, dv_pad, keys_pad;  // routed keys; padded widths, multiples of L
  // (T, dq_pad) scaled queries, (T, dv_pad) output gradient, (keys, dq_pad) keys, (dq, keys_pad) keys transposed,
  // (dv, keys_pad) values transposed, (T, keys_pad) probabilities and dS, (T | keys, ·) gradient products
  std::vector<S> query, grad_output, key, key_t, value_t, probs, grad_logits, product_q, product_k, product_v;
  std::vector<int64_t> key_row;

  explicit HeadBackward(const BackwardProblem<S>& problem)
      : p(problem), keys(problem.shape.topk * problem.shape.keys_per_region),
        dq_pad(whole_vectors(problem.shape.head_dim_qk, L) * L), dv_pad(whole_vectors(problem.shape.head_dim_v, L) * L),
        keys_pad(whole_vectors(keys, L) * L) {
    const Shape& s = problem.shape;
    const int64_t T = s.tokens;
    query.assign(T * dq_pad, S(0));
    grad_output.assign(T * dv_pad, S(0));
    key.assign(keys * dq_pad, S(0));
    key_t.assign(s.head_dim_qk * keys_pad, S(0));
    value_t.assign(s.head_dim_v * keys_pad, S(0));
    probs.assign(T * keys_pad, S(0));
    grad_logits.assign(T * keys_pad, S(0));
    product_q.resize(T * dq_pad);
    product_k.resize(keys * dq_pad);
    product_v.resize(keys * dv_pad);
    key_row.resize(keys);
  }

  // one query's row: p ← softmax(p) over the routed keys, dp ← p ∘ (dp − Σ_j p_j dp_j); both zero on the padding
  void softmax_and_grad(S* p, S* dp) const {
    using V = typename Lanes<S>::vec;
    const int64_t vectors = keys_pad / L;
    for (int64_t j = keys; j < keys_pad; ++j) p[j] = std::numeric_limits<S>::lowest();
    V top_lanes = load<V>(p);
    for (int64_t w = 1; w < vectors; ++w) top_lanes = load<V>(p + w * L) > top_lanes ? load<V>(p + w * L) : top_lanes;
    S top = top_lanes[0];
    for (int lane = 1; lane < L; ++lane) top = std::max(top, S(top_lanes[lane]));
    V sum = {};
    for (int64_t w = 0; w < vectors; ++w) {
      const V e = exp_nonpositive(load<V>(p + w * L) - top);
      store(p + w * L, e);
      sum += e;
    }
    S total = 0;
    for (int lane = 0; lane < L; ++lane) total += sum[lane];
    for (int64_t j = keys; j < keys_pad; ++j) total -= p[j];  // the padding's e^(lowest − top), then zeroed
    for (int64_t j = keys; j < keys_pad; ++j) p[j] = 0;
    const S inverse = S(1) / total;
    V dot = {};
    for (int64_t w = 0; w < vectors; ++w) {
      const V probability = load<V>(p + w * L) * inverse;
      store(p + w * L, probability);
      dot += probability * load<V>(dp + w * L);
    }
    S d = 0;
    for (int lane = 0; lane < L; ++lane) d += dot[lane];
    for (int64_t w = 0; w < vectors; ++w) store(dp + w * L, load<V>(p + w * L) * (load<V>(dp + w * L) - d));
  }

  void run(int64_t b, int64_t h) {
    const Shape& s = p.shape;
    const int64_t T = s.tokens, dq = s.head_dim_qk, dv = s.head_dim_v, positions = s.regions * s.keys_per_region;
    const S* q_image = static_cast<const S*>(p.q.data) + b * p.q.image + h * dq;
    const S* k_image = static_cast<const S*>(p.k.data) + b * p.k.image + h * dq;
    const S* v_image = static_cast<const S*>(p.v.data) + b * p.v.image + h * dv;
    const S* go_image = static_cast<const S*>(p.grad_out.data) + b * p.grad_out.image + h * dv;
    S* gk_image_h = p.grad_k.at(b, 0) + h * dq;
    S* gv_image_h = p.grad_v.at(b, 0) + h * dv;
    for (int64_t position = 0; position < positions; ++position) {  // this (image, head)'s share of dK, dV
      std::fill_n(gk_image_h + p.key_rows[position] * p.grad_k.row, dq, S(0));
      std::fill_n(gv_image_h + p.key_rows[position] * p.grad_v.row, dv, S(0));
    }
    for (int64_t r = 0; r < s.regions; ++r) {
      const int64_t* routed = p.index + (b * s.regions + r) * s.topk;
      for (int64_t g = 0; g < s.topk; ++g)
        for (int64_t t = 0; t < s.keys_per_region; ++t)
          key_row[g * s.keys_per_region + t] = p.key_rows[routed[g] * s.keys_per_region + t];
      for (int64_t i = 0; i < T; ++i) {
        const int64_t row = p.query_rows[r * T + i];
        for (int64_t d = 0; d < dq; ++d) query[i * dq_pad + d] = q_image[row * p.q.row + d] * p.scale;
        for (int64_t e = 0; e < dv; ++e) grad_output[i * dv_pad + e] = go_image[row * p.grad_out.row + e];
      }
      for (int64_t j = 0; j < keys; ++j) {
        const S* key_j = k_image + key_row[j] * p.k.row;
        const S* value_j = v_image + key_row[j] * p.v.row;
        for (int64_t d = 0; d < dq; ++d) key[j * dq_pad + d] = key_t[d * keys_pad + j] = key_j[d];
        for (int64_t e = 0; e < dv; ++e) value_t[e * keys_pad + j] = value_j[e];
      }
      const int64_t key_vectors = keys_pad / L;
      product<S>(T, key_vectors, dq, query.data(), dq_pad, 1, key_t.data(), keys_pad, probs.data(), keys_pad);
      product<S>(T, key_vectors, dv, grad_output.data(), dv_pad, 1, value_t.data(), keys_pad, grad_logits.data(),
                 keys_pad);
      for (int64_t i = 0; i < T; ++i) softmax_and_grad(probs.data() + i * keys_pad, grad_logits.data() + i * keys_pad);
      product<S>(T, dq_pad / L, keys, grad_logits.data(), keys_pad, 1, key.data(), dq_pad, product_q.data(), dq_pad);
      product<S>(keys, dq_pad / L, T, grad_logits.data(), 1, keys_pad, query.data(), dq_pad, product_k.data(),
                 dq_pad);
      product<S>(keys, dv_pad / L, T, probs.data(), 1, keys_pad, grad_output.data(), dv_pad, product_v.data(),
                 dv_pad);
      for (int64_t i = 0; i < T; ++i) {
        S* target = p.grad_q.at(b, p.query_rows[r * T + i]) + h * dq;
        for (int64_t d = 0; d < dq; ++d) target[d] = p.scale * product_q[i * dq_pad + d];
      }
      for (int64_t j = 0; j < keys; ++j) {
        S* target_k = gk_image_h + key_row[j] * p.grad_k.row;
        S* target_v = gv_image_h + key_row[j] * p.grad_v.row;
        for (int64_t d = 0; d < dq; ++d) target_k[d] += product_k[j * dq_pad + d];
        for (int64_t e = 0; e < dv; ++e) target_v[e] += product_v[j * dv_pad + e];
      }
    }
  }
};

// The same gradient where a region has few queries (heads_in_lanes G > 1), in RegionAttention's layout: one thread per
// (image, group of G heads), lane m = i·G + u holding query i of head group·G + u, so the logits, dP, dS and dQ fill
// the vectors, and the group's keys and values are transposed once per (image, group) into (position, d, u) where
// tiled<S, G> spreads element d of the G heads across the lanes. dK and dV take, per routed key and head, the sum over
// the region's queries of dS (or P) times that query's row of Q (or dO), read from row-packed copies.
template <typename S, int G> struct GroupBackward {
  using V = typename Lanes<S>::vec;
  static constexpr int L = Lanes<S>::count;
  const BackwardProblem<S>& p;
  int64_t vectors, keys, positions, dq_pad, dv_pad;  // T·G lanes in `vectors` vectors; routed keys; key positions
  std::vector<S> keys_t, values_t;          // (positions, dq, G), (positions, dv, G)
  std::vector<S> grad_keys, grad_values;    // (positions, G, dq_pad), (positions, G, dv_pad): summed over regions
  std::vector<S> query_packed, grad_out_packed;  // (T·G, dq_pad), (T·G, dv_pad): scaled Q and dO rows, lane order
  std::vector<V> query_t, grad_out_t, logits_t, grad_logits_t, grad_query_t;  // (dq | dv | keys | dq, vectors)
  std::vector<const S*> key_ptr, value_ptr;
  std::vector<int64_t> position;

  explicit GroupBackward(const BackwardProblem<S>& problem)
      : p(problem), vectors(whole_vectors(problem.shape.tokens * G, L)),
        keys(problem.shape.topk * problem.shape.keys_per_region),
        positions(problem.shape.regions * problem.shape.keys_per_region),
        dq_pad(whole_vectors(problem.shape.head_dim_qk, L) * L),
        dv_pad(whole_vectors(problem.shape.head_dim_v, L) * L) {
    const Shape& s = problem.shape;
    keys_t.resize(positions * s.head_dim_qk * G);
    values_t.resize(positions * s.head_dim_v * G);
    grad_keys.resize(positions * G * dq_pad);
    grad_values.resize(positions * G * dv_pad);
    query_packed.assign(s.tokens * G * dq_pad, S(0));
    grad_out_packed.assign(s.tokens * G * dv_pad, S(0));
    query_t.assign(s.head_dim_qk * vectors, V{});
    grad_out_t.assign(s.head_dim_v * vectors, V{});
    logits_t.resize(keys * vectors);
    grad_logits_t.resize(keys * vectors);
    grad_query_t.resize(s.head_dim_qk * vectors);
    key_ptr.resize(keys);
    value_ptr.resize(keys);
    position.resize(keys);
  }

  // out[j, w…] = Σ_d tiled(rows[j] + d·G) · lanes_t[d, w…] for JB keys and TW vectors at a time
  template <int JB, int TW>
  void dots_tile(const V* lanes_t, const S* const* rows, int64_t depth, int64_t j, int64_t w, V* out) const {
    V acc[JB][TW] = {};
    for (int64_t d = 0; d < depth; ++d) {
      V x[TW];
      for (int t = 0; t < TW; ++t) x[t] = lanes_t[d * vectors + w + t];
      for (int jb = 0; jb < JB; ++jb) {
        const V row = tiled<S, G>(rows[j + jb] + d * G);
        for (int t = 0; t < TW; ++t) acc[jb][t] += row * x[t];
      }
    }
    for (int jb = 0; jb < JB; ++jb)
      for (int t = 0; t < TW; ++t) out[(j + jb) * vectors + w + t] = acc[jb][t];
  }
  template <int TW> void dots_vectors(const V* lanes_t, const S* const* rows, int64_t depth, int64_t w, V* out) const {
    int64_t j = 0;
    for (; j + 4 <= keys; j += 4) dots_tile<4, TW>(lanes_t, rows, depth, j, w, out);
    for (; j < keys; ++j) dots_tile<1, TW>(lanes_t, rows, depth, j, w, out);
  }
  // out (keys, vectors) = the routed rows (keys × depth, through `rows`) times lanes_t (depth, vectors)
  void dots(const V* lanes_t, const S* const* rows, int64_t depth, V* out) const {
    int64_t w = 0;
    for (; w + 4 <= vectors; w += 4) dots_vectors<4>(lanes_t, rows, depth, w, out);
    for (; w + 2 <= vectors; w += 2) dots_vectors<2>(lanes_t, rows, depth, w, out);
    for (; w < vectors; ++w) dots_vectors<1>(lanes_t, rows, depth, w, out);
  }

  // grad_query_t[d, w…] = Σ_j dS_t[j, w…] · tiled(key_j + d·G), DB key elements and TW vectors at a time
  template <int DB, int TW> void grad_query_tile(int64_t d, int64_t w) {
    V acc[DB][TW] = {};
    for (int64_t j = 0; j < keys; ++j) {
      V ds[TW];
      for (int t = 0; t < TW; ++t) ds[t] = grad_logits_t[j * vectors + w + t];
      for (int db = 0; db < DB; ++db) {
        const V key = tiled<S, G>(key_ptr[j] + (d + db) * G);
        for (int t = 0; t < TW; ++t) acc[db][t] += key * ds[t];
      }
    }
    for (int db = 0; db < DB; ++db)
      for (int t = 0; t < TW; ++t) grad_query_t[(d + db) * vectors + w + t] = acc[db][t];
  }
  template <int TW> void grad_query_vectors(int64_t w) {
    int64_t d = 0;
    for (; d + 4 <= p.shape.head_dim_qk; d += 4) grad_query_tile<4, TW>(d, w);
    for (; d < p.shape.head_dim_qk; ++d) grad_query_tile<1, TW>(d, w);
  }

  // into (position, u, ·) of `sums`: Σ_i weights_t[j, i·G + u] · packed[i·G + u, ·] for every routed key j and head u
  void accumulate_rows(const S* weights_t, const S* packed, int64_t width_pad, S* sums) const {
    const int64_t T = p.shape.tokens;
    for (int64_t j = 0; j < keys; ++j) {
      const S* weight = weights_t + j * vectors * L;
      for (int64_t u = 0; u < G; ++u) {
        S* target = sums + (position[j] * G + u) * width_pad;
        for (int64_t x = 0; x < width_pad; x += L) {
          V acc = load<V>(target + x);
          for (int64_t i = 0; i < T; ++i) acc += weight[i * G + u] * load<V>(packed + (i * G + u) * width_pad + x);
          store(target + x, acc);
        }
      }
    }
  }

  void run(int64_t b, int64_t group) {
    const Shape& s = p.shape;
    const int64_t T = s.tokens, dq = s.head_dim_qk, dv = s.head_dim_v, lanes = vectors * L;
    const S* q_image = static_cast<const S*>(p.q.data) + b * p.q.image + group * G * dq;
    const S* k_image = static_cast<const S*>(p.k.data) + b * p.k.image + group * G * dq;
    const S* v_image = static_cast<const S*>(p.v.data) + b * p.v.image + group * G * dv;
    const S* go_image = static_cast<const S*>(p.grad_out.data) + b * p.grad_out.image + group * G * dv;
    for (int64_t slot = 0; slot < positions; ++slot) {
      const S* key_row = k_image + p.key_rows[slot] * p.k.row;
      const S* value_row = v_image + p.key_rows[slot] * p.v.row;
      for (int64_t u = 0; u < G; ++u) {
        for (int64_t d = 0; d < dq; ++d) keys_t[(slot * dq + d) * G + u] = key_row[u * dq + d];
        for (int64_t e = 0; e < dv; ++e) values_t[(slot * dv + e) * G + u] = value_row[u * dv + e];
      }
    }
    std::fill(grad_keys.begin(), grad_keys.end(), S(0));
    std::fill(grad_values.begin(), grad_values.end(), S(0));
    S* flat_query_t = reinterpret_cast<S*>(query_t.data());
    S* flat_grad_out_t = reinterpret_cast<S*>(grad_out_t.data());
    for (int64_t r = 0; r < s.regions; ++r) {
      const int64_t* routed = p.index + (b * s.regions + r) * s.topk;
      for (int64_t g = 0; g < s.topk; ++g)
        for (int64_t t = 0; t < s.keys_per_region; ++t) {
          const int64_t j = g * s.keys_per_region + t;
          position[j] = routed[g] * s.keys_per_region + t;
          key_ptr[j] = keys_t.data() + position[j] * dq * G;
          value_ptr[j] = values_t.data() + position[j] * dv * G;
        }
      for (int64_t i = 0; i < T; ++i) {  // padded lanes stay zero: their dO is 0, so their dS is 0
        const int64_t row = p.query_rows[r * T + i];
        for (int64_t u = 0; u < G; ++u) {
          const int64_t lane = i * G + u;
          for (int64_t d = 0; d < dq; ++d)
            flat_query_t[d * lanes + lane] = query_packed[lane * dq_pad + d] =
                q_image[row * p.q.row + u * dq + d] * p.scale;
          for (int64_t e = 0; e < dv; ++e)
            flat_grad_out_t[e * lanes + lane] = grad_out_packed[lane * dv_pad + e] =
                go_image[row * p.grad_out.row + u * dv + e];
        }
      }
      dots(query_t.data(), key_ptr.data(), dq, logits_t.data());
      dots(grad_out_t.data(), value_ptr.data(), dv, grad_logits_t.data());
      for (int64_t w = 0; w < vectors; ++w) {  // softmax over keys, lane-wise; dS = P ∘ (dP − D)
        V top = logits_t[w];
        for (int64_t j = 1; j < keys; ++j) top = logits_t[j * vectors + w] > top ? logits_t[j * vectors + w] : top;
        V sum = {};
        for (int64_t j = 0; j < keys; ++j) {
          logits_t[j * vectors + w] = exp_nonpositive(logits_t[j * vectors + w] - top);
          sum += logits_t[j * vectors + w];
        }
        const V inverse = S(1) / sum;
        V dot = {};
        for (int64_t j = 0; j < keys; ++j) {
          logits_t[j * vectors + w] *= inverse;
          dot += logits_t[j * vectors + w] * grad_logits_t[j * vectors + w];
        }
        for (int64_t j = 0; j < keys; ++j)
          grad_logits_t[j * vectors + w] = logits_t[j * vectors + w] * (grad_logits_t[j * vectors + w] - dot);
      }
      int64_t w = 0;
      for (; w + 4 <= vectors; w += 4) grad_query_vectors<4>(w);
      for (; w + 2 <= vectors; w += 2) grad_query_vectors<2>(w);
      for (; w < vectors; ++w) grad_query_vectors<1>(w);
      const S* flat_grad_query_t = reinterpret_cast<const S*>(grad_query_t.data());
      for (int64_t i = 0; i < T; ++i) {
        S* target = p.grad_q.at(b, p.query_rows[r * T + i]) + group * G * dq;
        for (int64_t u = 0; u < G; ++u)
          for (int64_t d = 0; d < dq; ++d) target[u * dq + d] = p.scale * flat_grad_query_t[d * lanes + i * G + u];
      }
      accumulate_rows(reinterpret_cast<const S*>(grad_logits_t.data()), query_packed.data(), dq_pad,
                      grad_keys.data());
      accumulate_rows(reinterpret_cast<const S*>(logits_t.data()), grad_out_packed.data(), dv_pad,
                      grad_values.data());
    }
    for (int64_t slot = 0; slot < positions; ++slot) {  // this (image, group)'s columns of dK and dV, all written
      S* target_k = p.grad_k.at(b, p.key_rows[slot]) + group * G * dq;
      S* target_v = p.grad_v.at(b, p.key_rows[slot]) + group * G * dv;
      for (int64_t u = 0; u < G; ++u) {
        for (int64_t d = 0; d < dq; ++d) target_k[u * dq + d] = grad_keys[(slot * G + u) * dq_pad + d];
        for (int64_t e = 0; e < dv; ++e) target_v[u * dv + e] = grad_values[(slot * G + u) * dv_pad + e];
      }
    }
  }
};

template <typename S, int G> void routed_attention_backward_grouped(const BackwardProblem<S>& problem, int threads) {
  const int64_t groups = problem.shape.heads / G;
  over_items(problem.shape.batch * groups, threads, [&](int64_t begin, int64_t end) {
    if constexpr (G == 1) {
      HeadBackward<S> head(problem);  // this thread's scratch
      for (int64_t item = begin; item < end; ++item) head.run(item / groups, item % groups);
    } else {
      GroupBackward<S, G> heads(problem);
      for (int64_t item = begin; item < end; ++item) heads.run(item / groups, item % groups);
    }
  });
}

// G, the heads that share the lanes: 1 where a region's queries fill two vectors or more (at BiFormer-T's stage 1,
// 64 queries, G = 2 measured 650-700 µs per image against 590 with G = 1), else the largest power of two dividing
// the head count, at most the lane count.
template <typename S> int64_t heads_in_lanes(const Shape& shape) {
  if (shape.tokens >= 2 * Lanes<S>::count) return 1;
  return std::min<int64_t>(shape.heads & -shape.heads, Lanes<S>::count);
}

// Calls run(std::integral_constant<int, G>{}) with G = heads_in_lanes<S>(shape), the kernels' compile-time G.
template <typename S, typename F> void with_heads_in_lanes(const Shape& shape, F run) {
  const int64_t group = heads_in_lanes<S>(shape);
  if constexpr (Lanes<S>::count == 16) {
    if (group == 16) return run(std::integral_constant<int, 16>{});
  }
  if (group == 8) run(std::integral_constant<int, 8>{});
  else if (group == 4) run(std::integral_constant<int, 4>{});
  else if (group == 2) run(std::integral_constant<int, 2>{});
  else run(std::integral_constant<int, 1>{});
}

// one thread per (image, head) where a region's queries fill the vectors, per (image, group of G heads) otherwise
template <typename S> void routed_attention_backward(const BackwardProblem<S>& problem, int threads) {
  with_heads_in_lanes<S>(problem.shape, [&](auto heads_in_lanes) {
    routed_attention_backward_grouped<S, decltype(heads_in_lanes)::value>(problem, threads);
  });
}

template <typename S>
void routed_attention(const Shape& shape, const int64_t* query_rows, const int64_t* key_rows, const int64_t* index,
                      Operand q, Operand k, Operand v, double scale, S* out, int64_t out_image, int64_t out_row,
                      int threads) {
  with_heads_in_lanes<S>(shape, [&](auto heads_in_lanes) {
    routed_attention_grouped<S, decltype(heads_in_lanes)::value>(shape, query_rows, key_rows, index, q, k, v, scale,
                                                                 out, out_image, out_row, threads);
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
  extern "C" int attnbench_bra_routed_attention_backward_##SUFFIX(                                                  \
      const int64_t* dims, const int64_t* query_rows, const int64_t* key_rows, const int64_t* index, const S* q,     \
      int64_t q_image, int64_t q_row, const S* k, int64_t k_image, int64_t k_row, const S* v, int64_t v_image,      \
      int64_t v_row, const S* grad_out, int64_t go_image, int64_t go_row, double scale, S* grad_q, int64_t gq_image, \
      int64_t gq_row, S* grad_k, int64_t gk_image, int64_t gk_row, S* grad_v, int64_t gv_image, int64_t gv_row,      \
      int threads) {                                                                                                 \
    const Shape shape{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7]};                      \
    return guarded([&] {                                                                                             \
      const BackwardProblem<S> problem{shape, query_rows, key_rows, index, Operand{q, q_image, q_row},               \
                                       Operand{k, k_image, k_row}, Operand{v, v_image, v_row},                       \
                                       Operand{grad_out, go_image, go_row}, static_cast<S>(scale),                   \
                                       Written<S>{grad_q, gq_image, gq_row}, Written<S>{grad_k, gk_image, gk_row},   \
                                       Written<S>{grad_v, gv_image, gv_row}};                                        \
      routed_attention_backward<S>(problem, threads);                                                                \
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
  extern "C" int attnbench_bra_local_context_param_grads_##SUFFIX(                                                   \
      int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t side, const S* grad_out,                \
      int64_t go_image, int64_t go_row, const S* v, int64_t v_image, int64_t v_row, S* grad_taps, S* grad_bias,       \
      int threads) {                                                                                                 \
    return guarded([&] {                                                                                             \
      local_context_param_grads<S>(batch, height, width, channels, side, Operand{grad_out, go_image, go_row},        \
                                   Operand{v, v_image, v_row}, grad_taps, grad_bias, threads);                       \
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
