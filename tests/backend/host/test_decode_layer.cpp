// The host decode layer against the independent reference: every policy combination on random ragged
// batches (fp32 storage).
#include "harness.hpp"

#include <doctest/doctest.h>

namespace {

using nosa::bf16;
using nosa::bias_mode;
using nosa::fp16;
using nosa_test::check_combination;
using nosa_test::combo;
using nosa_test::property_spec;
using nosa_test::run_against_reference;
using nosa_test::run_spec;
using nosa_test::small_config;

}  // namespace

TEST_CASE_TEMPLATE("every policy combination matches the reference (fp32)", P,
                   combo<float, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>,
                   combo<float, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::before_scale>,
                   combo<float, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::none>,
                   combo<float, nosa::eviction_score_pooling, nosa::resident_store, bias_mode::after_scale>,
                   combo<float, nosa::eviction_score_pooling, nosa::resident_store, bias_mode::before_scale>,
                   combo<float, nosa::eviction_score_pooling, nosa::resident_store, bias_mode::none>,
                   combo<float, nosa::no_query_agnostic, nosa::offload_store, bias_mode::after_scale>,
                   combo<float, nosa::no_query_agnostic, nosa::offload_store, bias_mode::before_scale>,
                   combo<float, nosa::no_query_agnostic, nosa::offload_store, bias_mode::none>,
                   combo<float, nosa::no_query_agnostic, nosa::resident_store, bias_mode::after_scale>,
                   combo<float, nosa::no_query_agnostic, nosa::resident_store, bias_mode::before_scale>,
                   combo<float, nosa::no_query_agnostic, nosa::resident_store, bias_mode::none>) {
  check_combination<P>(11);
}

