// Window geometry against brute force over the definitions of spec §3–§4.
#include <nosa/scorer/windows.hpp>

#include <doctest/doctest.h>

namespace {

bool overlaps(int w, int m, const nosa::selection_params& p) {
  const int w0 = w * p.stride, w1 = w0 + p.window;
  const int m0 = m * p.block_size, m1 = m0 + p.block_size;
  return w0 < m1 && w1 > m0;
}

}  // namespace

TEST_CASE("window_count follows N_c(L)") {
  const nosa::selection_params p{};  // l_c 32, s_c 16
  CHECK(nosa::window_count(0, p) == 0);
  CHECK(nosa::window_count(31, p) == 0);
  CHECK(nosa::window_count(32, p) == 1);
  CHECK(nosa::window_count(47, p) == 1);
  CHECK(nosa::window_count(48, p) == 2);
  CHECK(nosa::window_count(100, p) == 5);
}

TEST_CASE("a token completes window w exactly when the count grows") {
  for (int window : {1, 3, 8, 32, 100}) {
    for (int stride : {1, 2, 5, 16, 64}) {
      nosa::selection_params p{};
      p.window = window;
      p.stride = stride;
      for (int t = 0; t < 400; ++t) {
        const int before = nosa::window_count(t, p), after = nosa::window_count(t + 1, p);
        const int w = nosa::window_completed_at(t, p);
        if (after > before) {
          REQUIRE(w == before);
        } else {
          REQUIRE(w == -1);
        }
      }
    }
  }
}

TEST_CASE("windows overlapping a block match brute force") {
  for (int block : {16, 32, 64, 128}) {
    for (int window : {1, 8, 32, 64, 200}) {
      for (int stride : {1, 4, 16, 48, 160}) {
        nosa::selection_params p{};
        p.block_size = block;
        p.window = window;
        p.stride = stride;
        const int length = 23 * block + 5;
        const int n_windows = nosa::window_count(length, p);
        for (int m = 0; m < nosa::block_count(length, p); ++m) {
          const auto r = nosa::windows_overlapping_block(m, n_windows, p);
          for (int w = 0; w < n_windows; ++w) {
            const bool in = w >= r.first && w < r.last;
            REQUIRE_MESSAGE(in == overlaps(w, m, p), "block " << block << " window " << window << " stride "
                                                               << stride << " m " << m << " w " << w);
          }
        }
      }
    }
  }
}

TEST_CASE("with the defaults block m is overlapped by windows 4m-1 .. 4m+3") {
  const nosa::selection_params p{};
  for (int m = 1; m < 50; ++m) {
    const auto r = nosa::windows_overlapping_block(m, 1000, p);
    CHECK(r.first == 4 * m - 1);
    CHECK(r.last == 4 * m + 4);
  }
}

TEST_CASE("forced blocks: sinks, locals and the current block") {
  const nosa::selection_params p{};  // n_init 1, n_local 16
  const int n_blocks = 40, current = n_blocks - 1;
  int forced = 0;
  for (int m = 0; m < n_blocks; ++m) {
    const bool f = nosa::is_forced_block(m, current, p);
    CHECK(f == (m == 0 || m >= 23));
    forced += f;
  }
  CHECK(forced == 18);
  CHECK(nosa::forced_block_count(n_blocks, p) == 18);
  for (int n = 0; n < 40; ++n) {
    int brute = 0;
    for (int m = 0; m < n; ++m) brute += nosa::is_forced_block(m, n - 1, p);
    CHECK(nosa::forced_block_count(n, p) == brute);
  }
}
