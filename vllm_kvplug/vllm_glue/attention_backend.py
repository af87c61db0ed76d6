"""vLLM attention backend for the quantized paged KV cache (INT4 / INT2 / INT8 pages).

Registered as vLLM's `CUSTOM` backend. The cache of a layer is one uint8 tensor
`[num_blocks, page_bytes]` laid out as `vllm_kvplug.quant.paged.PagedLayout`. On CUDA the
write (fused rotate + quantize + scatter) and the paged attention (dequantization inside
the kernel) are the Triton kernels of `vllm_kvplug.triton_kernels`; on CPU the same format
is written and read by the PyTorch reference, so the CPU engine serves real models with
quantized KV (slowly; it is the correctness path).

With `quantization.key_offsets` the cache write subtracts a static per-(layer, KV head)
offset from K (`vllm_kvplug.quant.key_offsets`); attention reads the cache unchanged. The
metadata builder, which vLLM creates with the layer names and the device after the KV
cache is set up and before any CUDA graph is captured, gives each layer its offset.

With an eviction profile the layers' spec is `EvictingKVSpec`; the builder then attaches
the step's request rows (`eviction_rows.current_rows`) to the metadata. On CPU the forward
runs `eviction_rows.attend` (evict when a prompt completes, attend over the head-packed
layout afterwards; docs/eviction.md); on CUDA the builder also fills the kernel's per-row
tables (`eviction_cuda.plan_step`, persistent buffers: decode steps replay full CUDA
graphs) and the forward is `eviction_cuda.forward` (one launch, then the prefill rows'
eviction work).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm_kvplug.profiles.schema import QuantizationSection
from vllm_kvplug.quant.key_offsets import KeyOffsetsError, kv_head_range, load_key_offsets
from vllm_kvplug.quant.paged import PagedLayout, attention_reference, write_reference
from vllm_kvplug.quant.recipe import KVRecipe
from vllm_kvplug.vllm_glue.engine_args import resolve_from_additional_config

logger = logging.getLogger("vllm.kvplug")

SUPPORTED_HEAD_SIZES = (64, 128, 256)
# Split-K (flash-decoding) scratch, in (decode token, split) rows: a batch of T decode
# tokens may split up to SPLIT_ROWS // T ways (16 MiB for 32 query heads of size 128).
SPLIT_ROWS = 1024

_active_recipe: KVRecipe | None = None


def quantization_from_config(vllm_config) -> QuantizationSection:
    """The quantization section of the profile carried in `additional_config`."""
    resolved = resolve_from_additional_config(vllm_config.additional_config)
    if resolved is None:
        raise RuntimeError("the vllm-kvplug attention backend is selected but no "
                           "kv_compression profile is configured")
    return resolved.profile.quantization


def recipe_from_config(vllm_config) -> KVRecipe:
    """The KV recipe of the profile carried in `additional_config` (one per engine)."""
    global _active_recipe
    _active_recipe = KVRecipe.from_section(quantization_from_config(vllm_config))
    return _active_recipe


def bind_key_offsets(layer_names, vllm_config, device: torch.device) -> None:
    """Give every layer of ours in `layer_names` its K offset on `device` (no-op without
    `quantization.key_offsets`). Runs once per builder, before CUDA-graph capture."""
    path = quantization_from_config(vllm_config).key_offsets
    if not path:
        return
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )
    from vllm.model_executor.models.utils import extract_layer_index

    offsets = load_key_offsets(path)
    model_config = vllm_config.model_config
    offsets.check_model(model_config.get_total_num_hidden_layers(),
                        model_config.get_total_num_kv_heads(), model_config.get_head_size())
    first, count = kv_head_range(offsets.num_kv_heads, get_tensor_model_parallel_world_size(),
                                 get_tensor_model_parallel_rank())
    layers = vllm_config.compilation_config.static_forward_context
    bound = 0
    for name in layer_names:
        impl = getattr(layers.get(name), "impl", None)
        if not isinstance(impl, QuantizedKVImpl):
            continue
        try:
            index = extract_layer_index(name)
        except AssertionError:
            raise KeyOffsetsError(f"K offsets {path}: cannot tell the layer index of "
                                  f"attention layer {name!r}") from None
        if count != impl.num_kv_heads:
            raise KeyOffsetsError(f"K offsets {path}: this rank holds {impl.num_kv_heads} "
                                  f"KV heads of layer {name!r}, expected {count}")
        impl.key_offset = offsets.for_layer(index, first, count).to(device).contiguous()
        bound += 1
    logger.info("vllm-kvplug: K offsets of %d layers (KV heads %d..%d) on %s from %s",
                bound, first, first + count - 1, device, path)


def layout_for(vllm_config, num_kv_heads: int, head_size: int, block_size: int
               ) -> PagedLayout:
    return PagedLayout(recipe_from_config(vllm_config), num_kv_heads, head_size, block_size)


def _active_layout(num_kv_heads: int, head_size: int, block_size: int) -> PagedLayout:
    recipe = _active_recipe
    if recipe is None:
        from vllm.config import get_current_vllm_config

        recipe = recipe_from_config(get_current_vllm_config())
    return PagedLayout(recipe, num_kv_heads, head_size, block_size)


class QuantizedKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16",
                                                      "float32"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[QuantizedKVImpl]:
        return QuantizedKVImpl

    @staticmethod
    def get_builder_cls() -> type[QuantizedKVMetadataBuilder]:
        return QuantizedKVMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return num_blocks, _active_layout(num_kv_heads, head_size, block_size).page_bytes

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class QuantizedKVMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    workspace: object | None  # triton_kernels.AttentionWorkspace on CUDA
    # eviction profiles: (policy, num_layers, eviction_rows.BatchRows) of this step on CPU,
    # an eviction_cuda.StepEviction on CUDA
    eviction: object | None = None


class QuantizedKVMetadataBuilder(AttentionMetadataBuilder[QuantizedKVMetadata]):
    # Decode-only batches may run inside full CUDA graphs: the kernels read every
    # per-batch value from the runner's persistent tensors and size grids from host ints.
    _cudagraph_support: ClassVar[AttentionCGSupport] = \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        bind_key_offsets(layer_names, vllm_config, device)
        from vllm_kvplug.vllm_glue.kv_spec import EvictingKVSpec

        self.eviction = None
        self.eviction_tables = None
        if isinstance(kv_cache_spec, EvictingKVSpec):
            from vllm_kvplug.vllm_glue.eviction_rows import patch_model_runner

            patch_model_runner()  # before the first real step (builders are made first)
            self.eviction = (kv_cache_spec.policy(), kv_cache_spec.num_layers)
            if device.type == "cuda":
                from vllm_kvplug.vllm_glue.eviction_cuda import EvictionTables

                sched = vllm_config.scheduler_config
                # rows of padded batches too (a CUDA-graph batch pads rows, never past
                # its token count)
                rows = max(sched.max_num_seqs, sched.max_num_batched_tokens)
                self.eviction_tables = EvictionTables(
                    kv_cache_spec.num_layers, rows, kv_cache_spec.num_kv_heads, device)
        self.workspace = None
        if device.type == "cuda":
            from vllm_kvplug.triton_kernels import AttentionWorkspace

            model_config = vllm_config.model_config
            num_heads = model_config.get_num_attention_heads(vllm_config.parallel_config)
            self.workspace = AttentionWorkspace(
                max_rows=SPLIT_ROWS, num_heads=num_heads,
                head_size=kv_cache_spec.head_size, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> QuantizedKVMetadata:
        m = common_attn_metadata
        eviction = None
        if self.eviction is not None:
            from vllm_kvplug.vllm_glue.eviction_rows import BatchRows, current_rows

            rows = current_rows()
            if self.eviction_tables is not None:
                from vllm_kvplug.vllm_glue.eviction_cuda import plan_step

                # dummy runs and CUDA-graph captures have no rows: empty tables, but
                # the launch is the evicting kernel the replays need
                seq_lens_cpu = m.seq_lens_cpu_upper_bound  # exact without spec decode
                if seq_lens_cpu is None and rows is not None:
                    seq_lens_cpu = m.seq_lens.cpu()
                eviction = plan_step(
                    rows if rows is not None else BatchRows((), ()), *self.eviction,
                    self.kv_cache_spec.block_size, m.query_start_loc_cpu, seq_lens_cpu,
                    self.eviction_tables)
            elif rows is not None:
                eviction = (*self.eviction, rows)
        return QuantizedKVMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len, query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens, block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping, workspace=self.workspace, eviction=eviction)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata
                                    ) -> QuantizedKVMetadata:
        metadata = self.build(0, common_attn_metadata)
        metadata.seq_lens.fill_(1)  # capture fast; replays read the real lengths
        return metadata


class QuantizedKVImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "attention sinks": extra.get("sinks") is not None,
        }
        named = [name for name, present in unsupported.items() if present]
        if named:
            raise NotImplementedError(
                f"vllm-kvplug quantized KV does not support {', '.join(named)} (this model "
                "needs it); serve it with a profile whose quantization.method is 'none'")
        from vllm.config import get_current_vllm_config

        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.recipe = recipe_from_config(get_current_vllm_config())
        self.recipe.check_head_size(head_size)
        self._layout: PagedLayout | None = None
        # quantization.key_offsets: this layer's float32 [num_kv_heads, head_size] offset,
        # set on the cache's device by bind_key_offsets.
        self.key_offsets_path = quantization_from_config(get_current_vllm_config()).key_offsets
        self.key_offset: torch.Tensor | None = None

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False

    def _layout_for(self, kv_cache: torch.Tensor) -> PagedLayout:
        layout = self._layout
        if layout is None or layout.page_bytes != kv_cache.shape[1]:
            bytes_per_token = self.num_kv_heads * self.recipe.bytes_per_token_head(
                self.head_size)
            block_size = kv_cache.shape[1] // bytes_per_token
            layout = PagedLayout(self.recipe, self.num_kv_heads, self.head_size, block_size)
            self._layout = layout
        return layout

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        layout = self._layout_for(kv_cache)
        n = slot_mapping.shape[0]
        if self.key_offsets_path and self.key_offset is None:
            raise RuntimeError(f"K offsets {self.key_offsets_path} were not bound to layer "
                               f"{getattr(layer, 'layer_name', '?')} before its cache write")
        if kv_cache.device.type == "cpu":
            write_reference(kv_cache, key[:n], value[:n], slot_mapping, layout,
                            key_offset=self.key_offset)
        else:
            from vllm_kvplug.triton_kernels import write_kv

            write_kv(kv_cache, key[:n], value[:n], slot_mapping, layout,
                     key_offset=self.key_offset)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: QuantizedKVMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the "
                                      "vllm-kvplug backend")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        m = attn_metadata
        n = m.num_actual_tokens
        layout = self._layout_for(kv_cache)
        if kv_cache.device.type == "cpu":
            if m.eviction is not None:
                from vllm.model_executor.models.utils import extract_layer_index

                from vllm_kvplug.vllm_glue.eviction_rows import attend

                policy, num_layers, rows = m.eviction
                output[:n] = attend(policy, num_layers, extract_layer_index(layer.layer_name),
                                    rows, query[:n], kv_cache, m.block_table, m.seq_lens,
                                    m.query_start_loc, layout, self.scale)
                return output
            output[:n] = attention_reference(query[:n], kv_cache, m.block_table, m.seq_lens,
                                             m.query_start_loc, layout, self.scale)
            return output
        if m.eviction is not None:
            from vllm.model_executor.models.utils import extract_layer_index

            from vllm_kvplug.vllm_glue.eviction_cuda import forward

            forward(m.eviction, extract_layer_index(layer.layer_name), query, kv_cache, m,
                    layout, self.scale, output)
            return output
        from vllm_kvplug.triton_kernels import paged_attention

        # split counts are capped by the preallocated scratch (never allocated in a graph)
        paged_attention(query, kv_cache, m.block_table, m.seq_lens, m.query_start_loc,
                        layout, self.scale, output, max_query_len=m.max_query_len,
                        max_seq_len=m.max_seq_len, workspace=m.workspace)
        return output
