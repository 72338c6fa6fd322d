#pragma once
/// \file
/// Umbrella header of the host-side library: policies, the pipeline, the host backend and the eviction-head
/// primitive. Includes no CUDA header.

#include <nosa/version.hpp>

#include <nosa/core/backend.hpp>
#include <nosa/core/concepts.hpp>
#include <nosa/core/dispatch.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>

#include <nosa/attention/prefill.hpp>
#include <nosa/attention/sparse_attention.hpp>
#include <nosa/scorer/eviction_head.hpp>
#include <nosa/scorer/query_agnostic.hpp>
#include <nosa/scorer/query_aware.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/selector/forced_topk.hpp>
#include <nosa/selector/select_blocks.hpp>
#include <nosa/store/kv_format.hpp>
#include <nosa/store/layout.hpp>
#include <nosa/store/page_pool.hpp>
#include <nosa/store/policies.hpp>
#include <nosa/store/sizing.hpp>
#include <nosa/store/slot_cache_model.hpp>

#include <nosa/pipeline.hpp>

#include <nosa/backend/host/arena.hpp>
#include <nosa/backend/host/decode_layer.hpp>
#include <nosa/backend/host/eviction_head.hpp>
