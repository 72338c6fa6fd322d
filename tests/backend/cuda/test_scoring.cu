// The scoring kernel's launch shapes, without a GPU: `plan_scoring` picks, for a layer's capacity and a
// step's rows, the cluster size (how many CTAs share a row's blocks), the pipeline's stage count and the
// shared memory; the shapes the performance work relies on are pinned here, and every shape is checked to
// fit and to cover the windows its CTAs score. test_decode_layer*.cu run the kernel against the host.
#include <nosa/cuda.cuh>

#include <doctest/doctest.h>

#include <cstddef>

namespace {

using nosa::detail::plan_scoring;
using nosa::detail::score_device;
using nosa::detail::score_shape;
using nosa::detail::score_traits;
using nosa::detail::score_windows_for_blocks;

/// An H200 as `prepare_scoring` finds it: 132 SMs, 227 KiB of shared memory a CTA may opt into, clusters of
/// up to 16 CTAs.
constexpr score_device h200{132, 227 * 1024, true, 16};

/// Half an SM's shared memory, less the kilobyte the runtime reserves a CTA: what two CTAs an SM may each use.
std::size_t half_sm(const score_device& dev) { return std::size_t(dev.smem_limit) / 2 - 1024; }

/// What every shape must satisfy: a power-of-two cluster within the device's limit, a stage count the
/// traits offer, shared memory within the limit, and logit rows (when in shared memory) long enough for the
/// windows of a CTA's share of the blocks.
template <class E, int D>
void check_shape(const score_shape& shape, const nosa::selection_params& sel, int max_blocks, int group,
                 const score_device& dev) {
  using traits = score_traits<E, D>;
  INFO("cluster " << shape.cluster << ", columns " << shape.columns << ", stages " << shape.stages << ", smem "
                  << shape.smem);
  CHECK(shape.cluster >= 1);
  CHECK(shape.cluster <= (dev.clusters ? dev.max_cluster : 1));
  CHECK((shape.cluster & (shape.cluster - 1)) == 0);
  CHECK((shape.stages == traits::stages || shape.stages == traits::fewer_stages));
  CHECK(shape.smem <= std::size_t(dev.smem_limit));
  if (shape.columns > 0) {
    const int blocks = (max_blocks + shape.cluster - 1) / shape.cluster;
    CHECK(shape.columns >= score_windows_for_blocks(blocks, sel));
    CHECK(shape.columns % nosa::detail::score_tile_windows == 8);  // whole tiles, rows 8 words apart mod 32
    CHECK(shape.smem == std::size_t(shape.stages * traits::stage_bytes + traits::query_bytes) +
                            std::size_t(group + 2) * shape.columns * 4);
  }
}

}  // namespace

TEST_CASE("scoring runs two CTAs an SM with the longest CTAs that allows (bf16, D 128, the paper's selection)") {
  const nosa::selection_params sel{};
  const int max_blocks = 632;  // a 32K context with about 8K tokens to grow
  using traits = score_traits<nosa::bf16, 128>;
  REQUIRE(traits::stages == 4);
  REQUIRE(traits::fewer_stages == 3);
  struct expected {
    const char* what;
    int group, rows, cluster, stages;
  };
  for (const expected& e : {
           expected{"group 16, B 64 x H_kv 2: clusters of 4, four stages (clusters of 2 do not fit two an SM)",
                    16, 128, 4, 4},
           expected{"group 4, B 64 x H_kv 8: one CTA a row beside three stages", 4, 512, 1, 3},
           expected{"group 4, B 16 x H_kv 8: one CTA a row would leave SMs one CTA: clusters of 2, four stages",
                    4, 128, 2, 4},
           expected{"group 16, B 1: the largest cluster spreads two rows over the SMs", 16, 2, 16, 4},
       }) {
    INFO(e.what);
    const score_shape shape = plan_scoring<nosa::bf16, 128>(sel, max_blocks, e.group, e.rows, h200);
    check_shape<nosa::bf16, 128>(shape, sel, max_blocks, e.group, h200);
    CHECK(shape.cluster == e.cluster);
    CHECK(shape.stages == e.stages);
    CHECK(shape.smem <= half_sm(h200));
  }
}

TEST_CASE("every scoring shape fits and covers its windows; capacities beyond a cluster's use the scratch") {
  nosa::selection_params sel{};
  for (const int block_size : {32, 64, 128}) {
    sel.block_size = block_size;
    for (const int group : {1, 4, 16}) {
      for (const int max_blocks : {1, 16, 632, 2100, 8000, 20000}) {
        for (const int rows : {1, 2, 8, 32, 128, 512, 4096}) {
          INFO("block size " << block_size << ", group " << group << ", max blocks " << max_blocks << ", rows "
                             << rows);
          check_shape<nosa::bf16, 128>(plan_scoring<nosa::bf16, 128>(sel, max_blocks, group, rows, h200), sel,
                                       max_blocks, group, h200);
          check_shape<nosa::fp16, 64>(plan_scoring<nosa::fp16, 64>(sel, max_blocks, group, rows, h200), sel,
                                      max_blocks, group, h200);
          check_shape<nosa::bf16, 256>(plan_scoring<nosa::bf16, 256>(sel, max_blocks, group, rows, h200), sel,
                                       max_blocks, group, h200);
          check_shape<float, 128>(plan_scoring<float, 128>(sel, max_blocks, group, rows, h200), sel, max_blocks,
                                  group, h200);
          score_device old = h200;  // before sm_90: clusters of one CTA
          old.clusters = false;
          const score_shape alone = plan_scoring<nosa::bf16, 128>(sel, max_blocks, group, rows, old);
          check_shape<nosa::bf16, 128>(alone, sel, max_blocks, group, old);
          CHECK(alone.cluster == 1);
        }
      }
    }
  }
  sel.block_size = 64;
  // 1.28M tokens of group 16: even 16 CTAs cannot hold a row's logits in shared memory.
  const score_shape scratch = plan_scoring<nosa::bf16, 128>(sel, 20000, 16, 2, h200);
  CHECK(scratch.columns == 0);
  CHECK(scratch.smem == std::size_t(scratch.stages * score_traits<nosa::bf16, 128>::stage_bytes));
}
