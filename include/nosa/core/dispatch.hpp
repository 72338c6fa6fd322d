#pragma once
/// \file
/// Turns run-time choices (head dimension, dtype, bias mode, ...) into template arguments with one fold
/// expression instead of a ladder of cases. Values outside the compiled list give `not_supported`.

#include <nosa/core/numeric.hpp>
#include <nosa/core/status.hpp>

#include <type_traits>

namespace nosa {

/// Carries a type through a generic lambda: `f(type_tag<T>{})`, then `typename decltype(tag)::type`.
template <class T>
struct type_tag {
  using type = T;
};

/// Calls `f(std::integral_constant<decltype(V), V>{})` for the `V` in `Values...` equal to `value`.
/// \returns what `f` returned, or `status::not_supported` when `value` is not in the list.
template <auto... Values, class Value, class F>
[[nodiscard]] status dispatch_value(Value value, F&& f) {
  status result = status::not_supported;
  static_cast<void>(((value == Values ? (result = f(std::integral_constant<decltype(Values), Values>{}), true) : false) ||
                     ...));
  return result;
}

/// Calls `f(type_tag<T>{})` for the storage element `T` named by `d`, if `T` is among `Elements...`.
template <storage_element... Elements, class F>
[[nodiscard]] status dispatch_element(dtype d, F&& f) {
  status result = status::not_supported;
  static_cast<void>(((d == dtype_of<Elements> ? (result = f(type_tag<Elements>{}), true) : false) || ...));
  return result;
}

}  // namespace nosa
