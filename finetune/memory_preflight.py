"""Training memory preflight: estimate the per-GPU memory of a fine-tuning run before loading the model, and warn
with concrete settings to change when it will not fit."""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.formats import FORMATS
from .data.formats.base import EncodingLimits
from .methods import method_named, method_options
from .methods.base import mixed_precision_dtype
from .model.configuration import ChatGLMConfig
from .model.loss import DEFAULT_CHUNK_TOKENS
from .model.shapes import base_parameter_count, layer_linear_weights, layer_small_parameters, linear_shapes
from .quantization import COMPUTE_DTYPE, QUANTIZATION_BITS
from .recompute import RECOMPUTE_AUTO, RECOMPUTE_FULL, RECOMPUTE_MLP, RECOMPUTE_NONE, RecomputePlan

logger = logging.getLogger(__name__)

GIB = 1024**3
# Fraction of the free device memory an estimate may use: the rest covers allocator fragmentation and workspaces.
USABLE_FRACTION = 0.9
# Quantized linear weights also keep one fp32 scale per block of 64 weights.
QUANTIZATION_SCALE_BYTES_PER_PARAM = 4 / 64
# Mixed-precision full fine-tuning keeps an fp32 master copy of every trainable parameter.
MASTER_WEIGHT_BYTES = 4
# AdamW's two moments per trained parameter: fp32, or 8-bit with an 8-bit optimizer (finetune.trainer's disk-space
# check of a checkpoint uses these figures too).
ADAMW_STATE_BYTES = 8
ADAMW_8BIT_STATE_BYTES = 2
# Adapters (prefix encoder, LoRA) are trained in fp32 whatever the base model's dtype.
ADAPTER_BYTES = 4
# Logits of one loss chunk at the peak of its backward pass: the 16-bit projection, its fp32 copy, the fp32
# log-probabilities cross-entropy keeps and their fp32 gradient (measured: about 14 bytes per entry in all at
# chatglm3-6b's vocabulary; tests/unit/finetune/test_memory_preflight.py).
LOGITS_BYTES_PER_ENTRY_EXTRA = 4 + 4 + 4
ZERO3_OFFLOAD_CONFIG = "ds_configs/zero3_offload.json"

_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class TrainingSetup:
    """The settings of a run that decide its memory, besides the model shape. `options` are the method's options,
    which only the method reads: the run's ModelArguments, or a mapping such as {"lora_rank": 8} for
    finetune.methods.method_options (default: the method's defaults)."""

    method: str
    batch_size: int
    seq_length: int
    options: object = None
    weight_dtype: torch.dtype = torch.bfloat16
    quantization_bit: int | None = None
    gradient_checkpointing: bool = False
    recompute: RecomputePlan = dataclasses.field(default_factory=RecomputePlan)
    # Packed rows: attention's one-example-per-row layout, prefix included, holds this many times the tokens
    # (finetune.data.collator.packed_attention_stretch); None for unpacked rows.
    attention_stretch: float | None = None
    optimizer_8bit: bool = False
    zero_stage: int = 0
    num_gpus: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    logits_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    # Preference tuning: rows per example (2: the chosen and the rejected side of a pair, batch_size counts pairs),
    # and whether each step first runs the reference forward pass without gradients.
    sequences_per_example: int = 1
    reference_pass: bool = False
    # The most tokens of a row that carry a label (the chunked loss projects only those); None: every token may.
    labelled_tokens: int | None = None
    # Where the step runs ("cuda" or "cpu"): a few kernels keep different tensors for their backward pass there.
    device_type: str = "cuda"

    def __post_init__(self) -> None:
        try:
            method = method_named(self.method)
        except ValueError as error:
            raise ValueError(f"TrainingSetup.method: {error}") from error
        if self.options is None or isinstance(self.options, dict):
            object.__setattr__(self, "options", method_options(self.method, **(self.options or {})))
        method.check_options(self.options)
        if self.quantization_bit is not None and self.quantization_bit not in QUANTIZATION_BITS:
            raise ValueError(f"TrainingSetup.quantization_bit is {self.quantization_bit}; use 4, 8 or None")
        if method.trains_base_weights and self.quantization_bit:
            raise ValueError(f"{self.method} fine-tuning cannot train quantized weights: drop quantization_bit")
        if self.weight_dtype not in _DTYPE_BYTES:
            raise ValueError(f"TrainingSetup.weight_dtype {self.weight_dtype} is not one of float32/bfloat16/float16")
        if self.batch_size < 1 or self.seq_length < 1 or self.num_gpus < 1:
            raise ValueError(
                f"batch_size ({self.batch_size}), seq_length ({self.seq_length}) and num_gpus ({self.num_gpus}) "
                "must be positive"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"TrainingSetup.zero_stage is {self.zero_stage}; DeepSpeed ZeRO stages are 0-3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("parameter offload needs ZeRO stage 3")

    @property
    def prefix_tokens(self) -> int:
        """Virtual tokens the method adds to every row's attention (P-Tuning v2's prefix)."""
        return method_named(self.method).prefix_tokens(self.options)

    @property
    def rows(self) -> int:
        """Sequences in one micro-batch: batch_size examples times the sequences of each."""
        return self.batch_size * self.sequences_per_example

    @property
    def layer_modes(self) -> tuple[int, int]:
        """(layers recomputed whole, layers recomputing their MLP); --gradient_checkpointing means every layer whole."""
        if self.gradient_checkpointing:
            return -1, 0
        return self.recompute.full_layers, self.recompute.mlp_layers


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated memory of one training process, in bytes (GPU unless named cpu_)."""

    setup: TrainingSetup
    total_parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    cpu_offload: int
    # One layer's activations and their gradients while its backward pass runs (recomputed first if planned so).
    layer_backward: int
    reference: int = 0
    num_layers: int = 0
    device_memory: int | None = None
    advice: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """Everything held on the GPU at the peak of a training step. The loss's backward pass (the logits chunk) ends
        before the last layer's begins, so the larger of the two counts, on top of every layer's kept activations."""
        backward_peak = max(self.logits, self.layer_backward)
        return self.weights + self.gradients + self.optimizer_states + self.activations + backward_peak + self.reference

    @property
    def fits(self) -> bool | None:
        """Whether the total fits the usable part of the device memory; None when the device memory is unknown."""
        if self.device_memory is None:
            return None
        return self.total <= USABLE_FRACTION * self.device_memory

    def summary(self) -> str:
        """A multi-line, human-readable breakdown in GiB."""
        setup = self.setup
        counts = f"{_count(self.total_parameters)} total, {_count(self.trainable_parameters)} trainable"
        lines = [
            f"Memory estimate per GPU for {setup.method} (batch {setup.batch_size}"
            + (f" pairs = {setup.rows} rows" if setup.sequences_per_example > 1 else "")
            + f" x {setup.seq_length} tokens, "
            f"{str(setup.weight_dtype).removeprefix('torch.')}"
            + (f", {setup.quantization_bit}-bit weights" if setup.quantization_bit else "")
            + (", gradient checkpointing" if setup.gradient_checkpointing else "")
            + (f", recompute {setup.recompute.describe(self.num_layers)}" if setup.recompute != RecomputePlan() else "")
            + (f", ZeRO-{setup.zero_stage} on {setup.num_gpus} GPU(s)" if setup.zero_stage else "")
            + "):",
            f"  parameters      {counts}",
            f"  weights         {_size(self.weights):>10}",
            f"  gradients       {_size(self.gradients):>10}",
            f"  optimizer       {_size(self.optimizer_states):>10}",
            f"  activations     {_size(self.activations):>10}",
            f"  logits chunk    {_size(self.logits):>10}",
            f"  layer backward  {_size(self.layer_backward):>10}  (only the larger of these two counts)",
            *([f"  reference pass  {_size(self.reference):>10}"] if setup.reference_pass else []),
            f"  total           {_size(self.total):>10}",
        ]
        if self.cpu_offload:
            lines.append(f"  offloaded to CPU RAM {_size(self.cpu_offload)}")
        if self.device_memory is not None:
            lines.append(
                f"  device memory   {_size(self.device_memory):>10} free "
                f"({USABLE_FRACTION:.0%} usable: {_size(int(USABLE_FRACTION * self.device_memory))})"
            )
        return "\n".join(lines)


def _count(number: int) -> str:
    """A parameter count in B, M or K, with three significant digits."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= scale:
            return f"{number / scale:.3g} {unit}"
    return str(number)


def _size(size: int) -> str:
    """A byte count in GiB, or in MiB below 1 GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 1024**2:.1f} MiB"


def layer_activation_bytes(
    config: ChatGLMConfig, setup: TrainingSetup, mode: str, trained: bool | None = None
) -> float:
    """Bytes one GLM block keeps for its backward pass, per token, when it recomputes `mode` (none, mlp or full).

    A frozen linear layer keeps nothing (its input gradient needs only the weight); the norms keep their input and one
    fp32 scale; attention keeps query, key, value, output and the log-sum-exp (queries and keys the method's prefix
    tokens longer; packed rows `attention_stretch` times their tokens); SwiGLU keeps the up-projection (2 x
    ffn_hidden_size); an adapted layer keeps what its method's `adapter_input_bytes` says; a block whose linear weights
    train (`trained`; default: when the method trains every block) keeps every linear layer's input.
    tests/unit/finetune/test_recompute.py checks these counts against the tensors autograd really saves.
    """
    element = _DTYPE_BYTES[setup.weight_dtype]
    norm = config.hidden_size * element + 4
    if mode == RECOMPUTE_FULL:
        return norm
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_groups, config.kv_channels
    stretch = setup.attention_stretch
    if stretch is None:
        stretch = (setup.seq_length + setup.prefix_tokens) / setup.seq_length
    attention = stretch * (2 * heads * head_dim * element + 2 * groups * head_dim * element + heads * 4)
    shapes = linear_shapes(config)
    method = method_named(setup.method)
    if trained is None:
        trained = method.trained_layer_count(config, setup.options) == config.num_layers
    adapted = set(method.adapted_modules(config, setup.options))

    def linear_input(name: str) -> float:
        fan_in = shapes[name][0]
        if trained:
            return fan_in * element
        return method.adapter_input_bytes(setup.options, fan_in, element, setup.device_type) if name in adapted else 0

    attention_side = norm + linear_input("query_key_value") + attention + linear_input("dense")
    mlp_input_side = 2 * config.ffn_hidden_size * element + linear_input("dense_h_to_4h")
    mlp_output_side = linear_input("dense_4h_to_h")
    if mode == RECOMPUTE_MLP:
        return attention_side + norm + mlp_output_side
    if mode == RECOMPUTE_NONE:
        return attention_side + norm + mlp_input_side + mlp_output_side
    raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_NONE}, {RECOMPUTE_MLP}, {RECOMPUTE_FULL}")


def _activation_bytes(config: ChatGLMConfig, setup: TrainingSetup) -> int:
    """Activations kept for the backward pass of one micro-batch: what the layers keep, the embedding output and final
    norm, and the prefix keys/values (one layer's backward working set is `_layer_backward_bytes`)."""
    element_bytes = _DTYPE_BYTES[setup.weight_dtype]
    tokens = setup.rows * setup.seq_length
    full_layers, mlp_layers = setup.layer_modes
    full_layers = config.num_layers if full_layers < 0 else full_layers
    first_trained = config.num_layers - method_named(setup.method).trained_layer_count(config, setup.options)

    def mode_of(index: int) -> str:
        if index < full_layers:
            return RECOMPUTE_FULL
        return RECOMPUTE_MLP if index < full_layers + mlp_layers else RECOMPUTE_NONE

    per_token = sum(
        layer_activation_bytes(config, setup, mode_of(index), trained=index >= first_trained)
        for index in range(config.num_layers)
    )
    embedding_and_final_norm = 3 * config.hidden_size * element_bytes
    activations = tokens * (per_token + embedding_and_final_norm)
    prefix_keys_values = (
        setup.rows
        * config.num_layers
        * 2
        * config.num_key_value_groups
        * config.kv_channels
        * setup.prefix_tokens
    ) * element_bytes
    return int(activations) + prefix_keys_values


def _layer_backward_bytes(config: ChatGLMConfig, setup: TrainingSetup) -> int:
    """One layer's backward pass: its activations (recomputed if planned so) and their gradients, and with a quantized
    base the weight bitsandbytes dequantizes to multiply by (the block's largest linear layer in 16 bits)."""
    trained = method_named(setup.method).trained_layer_count(config, setup.options) > 0
    activations = 2 * setup.rows * setup.seq_length * layer_activation_bytes(config, setup, RECOMPUTE_NONE, trained)
    dequantized = 0
    if setup.quantization_bit:
        largest = max(fan_in * fan_out for fan_in, fan_out in linear_shapes(config).values())
        dequantized = largest * _DTYPE_BYTES[COMPUTE_DTYPE]
    return int(activations) + dequantized


def _logits_bytes(config: ChatGLMConfig, setup: TrainingSetup) -> int:
    """Peak memory of one chunk of the chunked loss: vocabulary logits of at most `logits_chunk_tokens` labelled
    tokens."""
    labelled = min(setup.seq_length, setup.labelled_tokens or setup.seq_length)
    chunk = min(setup.logits_chunk_tokens, setup.rows * labelled)
    per_entry = _DTYPE_BYTES[setup.weight_dtype] + LOGITS_BYTES_PER_ENTRY_EXTRA
    return chunk * config.padded_vocab_size * per_entry


def _reference_pass_bytes(config: ChatGLMConfig, setup: TrainingSetup) -> int:
    """Working memory of the reference forward pass (no gradients, so nothing is kept between layers): one layer's
    activations for every row, while the next layer's input is formed. Counted on top of the training step's peak
    (an upper bound: the pass runs before the step's own forward keeps its activations)."""
    if not setup.reference_pass:
        return 0
    tokens = setup.rows * setup.seq_length
    return int(2 * tokens * layer_activation_bytes(config, setup, RECOMPUTE_NONE, trained=False))


def _base_weight_bytes(config: ChatGLMConfig, setup: TrainingSetup) -> int:
    """Bytes of the base model's weights: 16/32-bit, or 4/8-bit block-quantized linear layers inside the blocks.

    With quantization, the embedding and output layer stay in bf16 and the other unquantized weights (norms, biases)
    are kept in fp32, as finetune.methods.apply_method leaves them.
    """
    if not setup.quantization_bit:
        return base_parameter_count(config) * _DTYPE_BYTES[setup.weight_dtype]
    linear = config.num_layers * layer_linear_weights(config)
    embeddings = 2 * config.padded_vocab_size * config.hidden_size
    rest = base_parameter_count(config) - linear - embeddings
    quantized = int(linear * (setup.quantization_bit / 8 + QUANTIZATION_SCALE_BYTES_PER_PARAM))
    return quantized + embeddings * 2 + rest * 4


def estimate_training_memory(config: ChatGLMConfig, setup: TrainingSetup) -> MemoryEstimate:
    """Estimate the peak memory of one training process for a ChatGLM3-shaped `config` and a run's `setup`."""
    base_parameters = base_parameter_count(config)
    method = method_named(setup.method)
    trainable = method.trainable_parameter_count(config, setup.options)
    # Full fine-tuning trains the base in its own dtype; every other method adds fp32 parameters (freeze tuning's
    # fp32 copies of its layers are counted on top of the base, a slight overestimate).
    full = method.trains_base_weights
    total_parameters = base_parameters if full else base_parameters + trainable

    parameter_bytes = _DTYPE_BYTES[setup.weight_dtype] if full else ADAPTER_BYTES
    weights = _base_weight_bytes(config, setup) + (0 if full else trainable * ADAPTER_BYTES)
    gradients = trainable * parameter_bytes
    state_bytes = ADAMW_8BIT_STATE_BYTES if setup.optimizer_8bit else ADAMW_STATE_BYTES
    master_bytes = MASTER_WEIGHT_BYTES if full and setup.weight_dtype != torch.float32 else 0
    optimizer_states = trainable * (state_bytes + master_bytes)

    gpus = setup.num_gpus
    element_bytes = _DTYPE_BYTES[setup.weight_dtype]
    # ZeRO works block by block: the gathered weights (or gradient buckets) of two blocks are on the GPU at once.
    working_set = 2 * (layer_linear_weights(config) + layer_small_parameters(config)) * element_bytes
    cpu_offload = 0
    if setup.zero_stage >= 1:
        optimizer_states //= gpus
    if setup.zero_stage >= 2:
        gradients //= gpus
    if setup.zero_stage >= 1 and setup.offload_optimizer:
        # The optimizer steps on the CPU, on fp32 gradient partitions kept there.
        cpu_offload += optimizer_states + trainable // gpus * MASTER_WEIGHT_BYTES
        optimizer_states = 0
        gradients = min(gradients, working_set)
    if setup.zero_stage == 3:
        partition = weights // gpus
        if setup.offload_params:
            cpu_offload += partition
            partition = 0
        weights = partition + working_set

    return MemoryEstimate(
        setup=setup,
        total_parameters=total_parameters,
        trainable_parameters=trainable,
        weights=weights,
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations=_activation_bytes(config, setup),
        logits=_logits_bytes(config, setup),
        layer_backward=_layer_backward_bytes(config, setup),
        cpu_offload=cpu_offload,
        reference=_reference_pass_bytes(config, setup),
        num_layers=config.num_layers,
    )


def plan_recompute(config: ChatGLMConfig, setup: TrainingSetup, budget: float) -> RecomputePlan:
    """The plan with the least recomputation whose estimate fits `budget` bytes (all layers `full` if none fits).

    Per byte saved, recomputing a layer's MLP input side costs fewer FLOPs than recomputing the rest of the layer,
    so layers first move from none to mlp, then from mlp to full.
    """
    layers = config.num_layers
    candidates = [RecomputePlan(mlp_layers=count) for count in range(layers + 1)]
    candidates += [RecomputePlan(full_layers=count, mlp_layers=layers - count) for count in range(1, layers + 1)]
    for plan in candidates:
        candidate = dataclasses.replace(setup, gradient_checkpointing=False, recompute=plan)
        if estimate_training_memory(config, candidate).total <= budget:
            return plan
    return RecomputePlan(full_layers=layers)


def _usable(device_memory: int) -> float:
    return USABLE_FRACTION * device_memory


def recompute_budget(memory_budget_gib: float | None, device_memory: int | None) -> float | None:
    """Bytes `--recompute auto` plans for: the explicit budget, else the usable free device memory; None on CPU."""
    if memory_budget_gib:
        return memory_budget_gib * GIB
    return _usable(device_memory) if device_memory is not None else None


def memory_advice(config: ChatGLMConfig, setup: TrainingSetup, device_memory: int) -> list[str]:
    """Concrete changes to the training flags that lower the estimate, each with its new estimate (the launchers
    name their own variables for these flags; see scripts/_common.sh)."""
    usable = _usable(device_memory)

    def estimate(**changes) -> MemoryEstimate:
        return estimate_training_memory(config, dataclasses.replace(setup, **changes))

    def verdict(result: MemoryEstimate) -> str:
        state = "fits" if result.total <= usable else "still too much"
        return f"estimated {result.total / GIB:.1f} GiB, {state}"

    advice = []
    combined: dict[str, object] = {}
    if setup.batch_size > 1:
        fitting = [size for size in range(setup.batch_size - 1, 0, -1) if estimate(batch_size=size).total <= usable]
        size = fitting[0] if fitting else 1
        advice.append(
            f"lower --per_device_train_batch_size to {size} and raise --gradient_accumulation_steps by "
            f"{setup.batch_size / size:g}x to keep the effective batch size ({verdict(estimate(batch_size=size))})"
        )
        combined["batch_size"] = size
    if not setup.gradient_checkpointing:
        advice.append(
            "enable gradient checkpointing: --gradient_checkpointing "
            f"({verdict(estimate(gradient_checkpointing=True))})"
        )
        combined["gradient_checkpointing"] = True
    quantized_method = method_named(setup.method).quantized_variant()
    if quantized_method and not setup.quantization_bit:
        advice.append(
            "load the base model quantized: --quantization_bit 4 "
            f"({verdict(estimate(quantization_bit=4, method=quantized_method))})"
        )
        combined.update(quantization_bit=4, method=quantized_method)
    if method_named(setup.method).trains_base_weights and not (
        setup.zero_stage == 3 and setup.offload_optimizer and setup.offload_params
    ):
        offloaded = estimate(zero_stage=3, offload_optimizer=True, offload_params=True)
        advice.append(
            f"use DeepSpeed ZeRO-3 with CPU offload of optimizer and parameters: --deepspeed {ZERO3_OFFLOAD_CONFIG} "
            f"({verdict(offloaded)}; needs about "
            f"{offloaded.cpu_offload / GIB:.0f} GiB of CPU RAM per process)"
        )
        combined.update(zero_stage=3, offload_optimizer=True, offload_params=True)
    if len(combined) > 1 and len(advice) > 1:
        advice.append(f"all of the above together: {verdict(estimate(**combined))}")
    best = estimate(**combined)
    if best.total > usable:
        shorter = _longest_fitting_sequence(config, best.setup, usable)
        if shorter:
            advice.append(
                f"{'with all of the above, also ' if combined else ''}lower --max_seq_length (or --max_source_length "
                f"+ --max_target_length) to at most {shorter} tokens"
            )
        else:
            advice.append(
                "even one short sequence does not fit: use a GPU with more memory, or several GPUs (torchrun) with "
                f"--deepspeed {ZERO3_OFFLOAD_CONFIG}"
            )
    return advice


def _longest_fitting_sequence(config: ChatGLMConfig, setup: TrainingSetup, usable: float) -> int | None:
    """The longest sequence length below setup.seq_length whose estimate fits `usable` bytes, or None."""
    low, high = 0, setup.seq_length - 1
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_training_memory(config, dataclasses.replace(setup, seq_length=middle)).total <= usable:
            low = middle
        else:
            high = middle - 1
    return low or None


def _deepspeed_settings(deepspeed: object) -> tuple[int, bool, bool]:
    """ZeRO stage and optimizer/parameter offload from a DeepSpeed config (dict or JSON file path)."""
    if not deepspeed:
        return 0, False, False
    if isinstance(deepspeed, dict):
        config = deepspeed
    else:
        path = Path(str(deepspeed))
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the DeepSpeed config {path}: {error}; pass a valid JSON file") from error
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))

    def offloaded(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")

    return stage, offloaded("offload_optimizer"), stage == 3 and offloaded("offload_param")


def _data_limits(data_args: object) -> EncodingLimits:
    """The truncation lengths of (duck-typed) data arguments; a length they lack is None."""
    names = ("max_source_length", "max_target_length", "max_seq_length")
    return EncodingLimits(*(getattr(data_args, name, None) for name in names))


def longest_row(data_args: object, data_format: str | None = None) -> int | None:
    """The longest training row the data arguments allow, or None when they bound nothing.

    Each data format says its bound (input_output: [gMASK] sop + prompt + response + eos; conversations:
    max_seq_length); packed rows are packing_length long. With the format unknown, the largest bound counts.
    """
    if getattr(data_args, "packing", False) and getattr(data_args, "packing_length", None):
        return data_args.packing_length
    data_format = data_format or getattr(data_args, "data_format", None)
    limits = _data_limits(data_args)
    if data_format in FORMATS and FORMATS[data_format].longest_row(limits):
        return FORMATS[data_format].longest_row(limits)
    bounds = [bound for known in FORMATS.values() if (bound := known.longest_row(limits))]
    return max(bounds) if bounds else None


def longest_labelled(data_args: object, data_format: str | None = None) -> int | None:
    """The most labelled tokens of a training row the data arguments allow, or None when they bound nothing (packed
    rows, a format whose every token may be learned, or a format not known and not all bounded)."""
    if getattr(data_args, "packing", False):
        return None
    data_format = data_format or getattr(data_args, "data_format", None)
    limits = _data_limits(data_args)
    if data_format in FORMATS:
        return FORMATS[data_format].longest_labelled(limits)
    bounds = [known.longest_labelled(limits) for known in FORMATS.values()]
    return None if None in bounds else max(bounds, default=None)


def setup_from_arguments(
    config: ChatGLMConfig,
    model_args: object,
    data_args: object,
    training_args: object,
    seq_length: int | None = None,
    attention_stretch: float | None = None,
    sequences_per_example: int = 1,
    reference_pass: bool = False,
    labelled_tokens: int | None = None,
) -> TrainingSetup:
    """Derive the TrainingSetup from the run's model, data and training arguments (read duck-typed).

    `seq_length` is the longest row the run will see (e.g. measured on the encoded data); without it, the data
    arguments' bound (see `longest_row`) or else the model's seq_length is used. `attention_stretch`: see
    TrainingSetup (packed rows). `labelled_tokens`: the most labelled tokens of a row (measured on the encoded data);
    without it, the data arguments' bound (see `longest_labelled`).
    """
    method = model_args.method
    seq_length = seq_length or longest_row(data_args) or config.seq_length
    weight_dtype = mixed_precision_dtype(training_args)
    zero_stage, offload_optimizer, offload_params = _deepspeed_settings(getattr(training_args, "deepspeed", None))
    recompute_mode = getattr(model_args, "recompute", RECOMPUTE_AUTO)
    recompute = RecomputePlan()
    if recompute_mode != RECOMPUTE_AUTO:
        recompute = RecomputePlan.uniform(recompute_mode, config.num_layers)
    return TrainingSetup(
        method=method,
        batch_size=getattr(training_args, "per_device_train_batch_size", 1),
        seq_length=seq_length,
        weight_dtype=weight_dtype,
        options=model_args,
        quantization_bit=getattr(model_args, "quantization_bit", None) or None,
        gradient_checkpointing=bool(getattr(training_args, "gradient_checkpointing", False)),
        recompute=recompute,
        attention_stretch=attention_stretch,
        optimizer_8bit="8bit" in str(getattr(training_args, "optim", "")),
        zero_stage=zero_stage,
        num_gpus=max(1, int(getattr(training_args, "world_size", 1))),
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        sequences_per_example=sequences_per_example,
        reference_pass=reference_pass,
        labelled_tokens=labelled_tokens or longest_labelled(data_args),
        device_type="cpu" if getattr(training_args, "use_cpu", False) or not torch.cuda.is_available() else "cuda",
    )


def free_device_memory() -> int | None:
    """Free memory of the current CUDA device in bytes, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return free


def run_preflight(
    model_config: ChatGLMConfig,
    model_args: object,
    data_args: object,
    training_args: object,
    device_memory: int | None = None,
    seq_length: int | None = None,
    attention_stretch: float | None = None,
    sequences_per_example: int = 1,
    reference_pass: bool = False,
    labelled_tokens: int | None = None,
) -> MemoryEstimate:
    """Estimate the run's memory, plan `--recompute auto`, log it, and warn with advice when it will not fit.

    `device_memory` (bytes) defaults to the free memory of the CUDA device; on CPU the estimate is only logged.
    `seq_length`: the longest training row when known (see `setup_from_arguments`). The returned estimate's
    `setup.recompute` is the plan to apply (finetune.recompute.apply_recompute_plan). `attention_stretch`: see
    TrainingSetup (packed rows). `labelled_tokens`: the most labelled tokens of a row when known.
    """
    setup = setup_from_arguments(
        model_config, model_args, data_args, training_args, seq_length, attention_stretch, sequences_per_example,
        reference_pass, labelled_tokens,
    )
    if device_memory is None and not getattr(training_args, "use_cpu", False):
        device_memory = free_device_memory()
    budget = recompute_budget(getattr(model_args, "memory_budget_gib", None), device_memory)
    planned = getattr(model_args, "recompute", RECOMPUTE_AUTO) == RECOMPUTE_AUTO and not setup.gradient_checkpointing
    if planned and budget is not None:
        setup = dataclasses.replace(setup, recompute=plan_recompute(model_config, setup, budget))
    estimate = estimate_training_memory(model_config, setup)
    estimate = dataclasses.replace(estimate, device_memory=device_memory)
    if estimate.fits is False:
        estimate = dataclasses.replace(estimate, advice=tuple(memory_advice(model_config, setup, device_memory)))
    if getattr(training_args, "process_index", 0) != 0:
        return estimate
    logger.info("%s", estimate.summary())
    if estimate.fits is False:
        logger.warning(
            "The run will probably not fit: it needs about %.1f GiB per GPU but only %.1f GiB of %.1f GiB free are "
            "usable. Try:\n%s",
            estimate.total / GIB,
            _usable(device_memory) / GIB,
            device_memory / GIB,
            "\n".join(f"  - {line}" for line in estimate.advice),
        )
    return estimate
