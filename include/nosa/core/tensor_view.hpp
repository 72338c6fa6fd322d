#pragma once
/// \file
/// Non-owning strided views of engine tensors. Layouts are described, not assumed: every extent and stride
/// is explicit (in elements), and only the innermost stride is required to be 1 so rows can be read as
/// contiguous vectors.

#include <nosa/core/config.hpp>
#include <nosa/core/status.hpp>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace nosa {

/// A rank-`Rank` view of `T` with explicit extents and strides, both in elements.
template <class T, int Rank>
struct tensor_view {
  static_assert(Rank >= 1 && Rank <= 4, "tensor_view supports ranks 1 to 4");
  using element_type = T;
  static constexpr int rank = Rank;

  T* data = nullptr;                   ///< element (0, ..., 0); may be null only for an optional input
  std::int64_t extents[Rank] = {};     ///< size of each dimension
  std::int64_t strides[Rank] = {};     ///< distance in elements between neighbours along each dimension

  /// Element at the given multi-index (no bounds check; validation happens once per call).
  template <class... I>
  NOSA_INLINE T& operator()(I... idx) const noexcept {
    static_assert(sizeof...(I) == Rank);
    const std::int64_t ix[Rank] = {static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (int d = 0; d < Rank; ++d) off += ix[d] * strides[d];
    return data[off];
  }

  /// True when no data is attached (an optional input left out).
  NOSA_INLINE bool empty() const noexcept { return data == nullptr; }

  /// The same view with a const element type.
  NOSA_INLINE tensor_view<const T, Rank> as_const() const noexcept {
    tensor_view<const T, Rank> r;
    r.data = data;
    for (int d = 0; d < Rank; ++d) {
      r.extents[d] = extents[d];
      r.strides[d] = strides[d];
    }
    return r;
  }
};

/// A row-major contiguous view over `data` with the given extents.
template <int Rank, class T>
constexpr tensor_view<T, Rank> make_contiguous(T* data, const std::int64_t (&extents)[Rank]) noexcept {
  tensor_view<T, Rank> v;
  v.data = data;
  std::int64_t stride = 1;
  for (int d = Rank - 1; d >= 0; --d) {
    v.extents[d] = extents[d];
    v.strides[d] = stride;
    stride *= extents[d];
  }
  return v;
}

/// A view over `data` with explicit extents and strides (in elements).
template <int Rank, class T>
constexpr tensor_view<T, Rank> make_strided(T* data, const std::int64_t (&extents)[Rank],
                                            const std::int64_t (&strides)[Rank]) noexcept {
  tensor_view<T, Rank> v;
  v.data = data;
  for (int d = 0; d < Rank; ++d) {
    v.extents[d] = extents[d];
    v.strides[d] = strides[d];
  }
  return v;
}

/// Checks a view against the extents a call expects: non-null, aligned to its element, innermost stride 1,
/// no negative strides, extents equal to `expected`. Returns the first violated condition.
template <class T, int Rank>
constexpr status check_view(const tensor_view<T, Rank>& v, const std::int64_t (&expected)[Rank]) noexcept {
  for (int d = 0; d < Rank; ++d) {
    if (v.extents[d] != expected[d]) return status::shape_mismatch;
  }
  bool any_empty = false;
  for (int d = 0; d < Rank; ++d) any_empty = any_empty || expected[d] == 0;
  if (any_empty) return status::success;  // nothing is read or written
  if (v.data == nullptr) return status::null_pointer;
  if (reinterpret_cast<std::uintptr_t>(v.data) % alignof(T) != 0) return status::misaligned_pointer;
  if (v.strides[Rank - 1] != 1 && expected[Rank - 1] > 1) return status::bad_layout;
  for (int d = 0; d < Rank; ++d) {
    if (v.strides[d] < 0) return status::bad_layout;
  }
  return status::success;
}

}  // namespace nosa
