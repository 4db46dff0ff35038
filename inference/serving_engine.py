"""Continuous-batching generation engine: requests join the running batch at the next decoding step and leave when done.

One engine owns one loaded model (a base, possibly wrapped by PEFT with several LoRA adapters) and runs a single
worker thread. Each step it:
  1. prefills the newly submitted requests, those of one prefix length in one left-padded batch (the 2-D attention
     mask marks the padding, so every row computes what it would alone), samples their first tokens, then merges their
     KV cache into the running batch (rows are left-padded to a common length);
  2. decodes one token for every running row;
  3. drops rows that finished or were cancelled and trims cache columns that only padding uses.
Rows are grouped by P-Tuning prefix length (0 = no prefix): each group is one batch, and a prefix is per-row K/V put
in front of the row's keys. LoRA adapters are routed per row with PEFT's `adapter_names`.

Prompts, sampling (`sample_token`) and the stop ids (`reply_stop_ids`) come from finetune.generation; this engine
only runs the step loop, and applies the stop rule (a reply ends at its first stop id) to each new token.

Failures stay with the requests they hit: a request whose own preparation (its seed's generator, its sampling) fails
ends with "error: ..." alone; when a batched forward fails (a bad row, CUDA out of memory, a model that cannot run
here), each of its rows is retried alone from the cache as it was before the step, and only the rows that fail alone
end with the error. Every failure is logged with its traceback.
"""

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import nn

from finetune.generation import GREEDY_TEMPERATURE, sample_token
from finetune.model.prefix_encoder import PrefixEncoder

BASE_ADAPTER = "__base__"
LOG = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """The failure GenerationRequest.fail_after_tokens asks for (a test hook, see there)."""


@dataclass(frozen=True)
class Variant:
    """What a row runs with on the shared base: a LoRA adapter name, a P-Tuning prefix encoder, or neither."""

    adapter: str | None = None
    prefix: PrefixEncoder | None = None


@dataclass
class GenerationRequest:
    """One prompt to continue. `on_token(token_id)` gets every generated id; `on_finish(reason)` ends it once.

    `stop_ids` are finetune.generation's stop ids of the tokenizer (`reply_stop_ids`).
    reason: "stop" (a stop id was generated; it is not passed to on_token), "length" (max_new_tokens reached),
    "cancelled" (cancel() was called) or "error: ..." (running this request failed; the reason follows).
    `fail_after_tokens` is a test hook for fault tests: once the row has generated that many tokens, every batched
    forward that includes it raises InjectedFault (the server sets it only under CHATGLM_SERVER_TEST_FAULT).
    """

    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    variant: Variant = Variant()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    fail_after_tokens: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (frees the batch slot)."""
        self.cancelled.set()


class RowCache:
    """A KV cache the model updates through `update` / `get_seq_length` (per layer: keys, values (B, H, L, D))."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.layers = layers or []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached length (columns, padding included)."""
        return self.layers[layer_idx][0].shape[2] if self.layers else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values of one layer and return the whole cached keys/values."""
        if layer_idx == len(self.layers):
            self.layers.append((key, value))
        else:
            past_key, past_value = self.layers[layer_idx]
            self.layers[layer_idx] = (torch.cat((past_key, key), dim=2), torch.cat((past_value, value), dim=2))
        return self.layers[layer_idx]


class RowPrefixes(nn.Module):
    """Stands in for the model's prefix encoder during one forward: per-row prefix K/V already stacked."""

    def __init__(self, key_values: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.key_values = key_values

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stacked per-layer (key, value), each (batch, kv_heads, pre_seq_len, head_dim)."""
        return [(key.to(dtype), value.to(dtype)) for key, value in self.key_values]


@dataclass
class Row:
    """A request in the running batch."""

    request: GenerationRequest
    generator: torch.Generator | None
    next_token: int
    position: int
    generated: int = 1


@dataclass
class Group:
    """Rows sharing a prefix length: one batch with one cache and one attention mask."""

    rows: list[Row] = field(default_factory=list)
    cache: RowCache = field(default_factory=RowCache)
    mask: torch.Tensor | None = None


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` at the start of `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat((tensor.new_zeros(shape), tensor), dim=dim)


class ServingEngine:
    """Runs generation requests for one model with continuous batching on a worker thread."""

    def __init__(self, model: nn.Module, max_batch_size: int = 16):
        self.model = model
        self.inner = model.get_base_model() if isinstance(model, PeftModel) else model
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.pending: queue.Queue[GenerationRequest | None] = queue.Queue()
        self.waiting: list[GenerationRequest] = []
        self.groups: dict[int, Group] = {}
        self.prefix_cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.steps = 0
        self.after_step: Callable[[], None] | None = None
        self._stopping = False
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="serving-engine", daemon=True)

    def start(self) -> "ServingEngine":
        """Start the worker thread."""
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything still queued or running and stop the worker thread."""
        self._stopping = True
        self.pending.put(None)
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        if self._stopping:
            raise RuntimeError("the serving engine is stopping; no new requests are accepted")
        self.pending.put(request)

    @property
    def running(self) -> int:
        """Rows in the batch now."""
        return sum(len(group.rows) for group in list(self.groups.values()))

    def _run(self) -> None:
        reason = "cancelled"
        try:
            with torch.inference_mode():
                while self._take_pending(block=self.running == 0 and not self.waiting):
                    self._admit()
                    self._decode()
                    self._notify()
        except BaseException as error:  # a bug in the engine itself: end every request with it, then re-raise
            LOG.exception("the serving engine stopped")
            self.failure = f"the serving engine stopped: {type(error).__name__}: {error}"
            reason = f"error: {self.failure}"
            raise
        finally:
            self._fail_all(reason)
            self._notify()

    def _notify(self) -> None:
        """Tell the listener that this step's callbacks are done (lets it deliver them in one go)."""
        if self.after_step is not None:
            self.after_step()

    def _take_pending(self, block: bool) -> bool:
        """Move submitted requests to the waiting list; False when the engine is stopping."""
        try:
            item = self.pending.get(block=block)
            while True:
                if item is None or self._stopping:
                    return False
                self.waiting.append(item)
                item = self.pending.get_nowait()
        except queue.Empty:
            return True

    @staticmethod
    def _fail(request: GenerationRequest, error: BaseException, where: str) -> None:
        """End one request with the error that hit it, and log it."""
        LOG.error("a request failed during %s: %s: %s", where, type(error).__name__, error, exc_info=error)
        request.on_finish(f"error: {type(error).__name__}: {error}")

    def _fail_all(self, reason: str) -> None:
        """End every submitted request (queued, waiting or running) with `reason`."""
        while True:
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.waiting.append(item)
        for request in self.waiting:
            request.on_finish(reason)
        self.waiting = []
        for group in self.groups.values():
            for row in group.rows:
                row.request.on_finish(reason)
        self.groups = {}

    def _prefix_key_values(self, encoder: PrefixEncoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer prefix (key, value) of one encoder for a single row, computed once."""
        if id(encoder) not in self.prefix_cache:
            self.prefix_cache[id(encoder)] = [(k.contiguous(), v.contiguous()) for k, v in encoder(1, torch.float32)]
        return self.prefix_cache[id(encoder)]

    def _forward(self, rows: list[Row] | list[GenerationRequest], input_ids, attention_mask, position_ids, cache):
        """One model forward with each row's prefix and adapter; returns the last position's logits (batch, vocab)."""
        for row in rows:
            if isinstance(row, Row) and row.request.fail_after_tokens is not None:
                if row.generated >= row.request.fail_after_tokens:
                    raise InjectedFault(f"injected fault after {row.generated} tokens (test hook fail_after_tokens)")
        variants = [row.request.variant if isinstance(row, Row) else row.variant for row in rows]
        encoders = [variant.prefix for variant in variants]
        if encoders[0] is None:
            self.inner.transformer.prefix_encoder = None
            self.inner.config.pre_seq_len = None
        else:
            per_row = [self._prefix_key_values(encoder) for encoder in encoders]
            stacked = [
                (torch.cat([row[layer][0] for row in per_row]), torch.cat([row[layer][1] for row in per_row]))
                for layer in range(len(per_row[0]))
            ]
            self.inner.transformer.prefix_encoder = RowPrefixes(stacked)
            self.inner.config.pre_seq_len = encoders[0].pre_seq_len
        kwargs = {}
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [variant.adapter or BASE_ADAPTER for variant in variants]
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return outputs.logits[:, -1, :]

    def _admit(self) -> None:
        """Prefill waiting requests while the batch has room, those of one prefix length together, and merge them into
        their groups."""
        admitted: dict[int, list[GenerationRequest]] = {}
        room = self.max_batch_size - self.running
        while self.waiting and room > 0:
            request = self.waiting.pop(0)
            if request.cancelled.is_set():
                request.on_finish("cancelled")
                continue
            prefix = request.variant.prefix
            admitted.setdefault(prefix.pre_seq_len if prefix is not None else 0, []).append(request)
            room -= 1
        for key, requests in admitted.items():
            self._prefill(key, requests)

    def _prefill(self, key: int, requests: list[GenerationRequest]) -> None:
        """Prefill `requests` together; when the batch fails, each alone (only those that fail alone get the error)."""
        generators = {}
        for request in list(requests):
            try:
                seed = request.seed
                generators[id(request)] = None if seed is None else torch.Generator().manual_seed(seed)
            except (RuntimeError, ValueError, TypeError) as error:
                self._fail(request, error, "its preparation (the seed's generator)")
                requests.remove(request)
        if not requests:
            return
        try:
            logits, new = self._prefill_batch(requests)
        except Exception as error:  # reported: to the request when it fails alone, else retried row by row
            if len(requests) == 1:
                self._fail(requests[0], error, "the prefill")
                return
            name = type(error).__name__
            LOG.warning("a prefill of %d requests failed (%s: %s); retrying each alone", len(requests), name, error)
            for request in requests:
                self._prefill(key, [request])
            return
        live = []
        for index, request in enumerate(requests):
            generator = generators[id(request)]
            row = Row(request=request, generator=generator, next_token=-1, position=len(request.prompt_ids))
            new.rows.append(row)
            try:
                row.next_token = sample_token(logits[index], request.temperature, request.top_p, generator)
            except (RuntimeError, ValueError) as error:
                self._fail(request, error, "sampling")
                continue
            if self._emit(row, row.next_token):
                live.append(index)
        self._keep(new, live)
        if new.rows:
            self._merge(key, new)

    def _prefill_batch(self, requests: list[GenerationRequest]) -> tuple[torch.Tensor, Group]:
        """One left-padded forward of the prompts of `requests`: their last logits and a group (no rows yet) with the
        cache and mask of every request, in order."""
        length = max(len(request.prompt_ids) for request in requests)
        padding = [length - len(request.prompt_ids) for request in requests]
        input_ids = torch.tensor(
            [[0] * pad + request.prompt_ids for pad, request in zip(padding, requests, strict=True)],
            device=self.device,
        )
        mask = torch.tensor([[0] * pad + [1] * (length - pad) for pad in padding], device=self.device)
        positions = torch.tensor([[0] * pad + list(range(length - pad)) for pad in padding], device=self.device)
        cache = RowCache()
        logits = self._forward(requests, input_ids, mask, positions, cache)
        return logits, Group(cache=cache, mask=mask)

    def _emit(self, row: Row, token: int) -> bool:
        """Hand a sampled token to its request; False when the row is finished."""
        request = row.request
        if token in request.stop_ids:
            request.on_finish("stop")
            return False
        request.on_token(token)
        if row.generated >= request.max_new_tokens:
            request.on_finish("length")
            return False
        return True

    def _merge(self, key: int, new: Group) -> None:
        """Add prefilled rows to the group of their prefix length, left-padding the shorter side."""
        group = self.groups.get(key)
        if group is None:
            self.groups[key] = new
            return
        length = max(group.mask.shape[1], new.mask.shape[1])
        group.cache = RowCache(
            [
                (
                    torch.cat((left_pad(old_key, length, 2), left_pad(new_key, length, 2))),
                    torch.cat((left_pad(old_value, length, 2), left_pad(new_value, length, 2))),
                )
                for (old_key, old_value), (new_key, new_value) in zip(group.cache.layers, new.cache.layers, strict=True)
            ]
        )
        group.mask = torch.cat((left_pad(group.mask, length, 1), left_pad(new.mask, length, 1)))
        group.rows.extend(new.rows)

    def _decode(self) -> None:
        """One decoding step for every group; finished and cancelled rows leave their group."""
        for key, group in list(self.groups.items()):
            live = []
            for index, row in enumerate(group.rows):
                if row.request.cancelled.is_set():
                    row.request.on_finish("cancelled")
                else:
                    live.append(index)
            self._keep(group, live)
            if not group.rows:
                del self.groups[key]
                continue
            input_ids = torch.tensor([[row.next_token] for row in group.rows], device=self.device)
            positions = torch.tensor([[row.position] for row in group.rows], device=self.device)
            group.mask = torch.cat((group.mask, torch.ones_like(group.mask[:, :1])), dim=1)
            layers_before = list(group.cache.layers)
            try:
                logits = self._forward(group.rows, input_ids, group.mask, positions, group.cache)
            except Exception as error:  # reported: to the rows that fail alone, the others go on
                logits = self._decode_rows_alone(group, layers_before, input_ids, positions, error)
            greedy_tokens = logits.argmax(dim=-1).tolist() if group.rows else []
            live = []
            for index, row in enumerate(group.rows):
                request = row.request
                token = greedy_tokens[index]
                if request.temperature > GREEDY_TEMPERATURE:
                    try:
                        token = sample_token(logits[index], request.temperature, request.top_p, row.generator)
                    except (RuntimeError, ValueError) as error:
                        self._fail(request, error, "sampling")
                        continue
                row.next_token, row.position, row.generated = token, row.position + 1, row.generated + 1
                if self._emit(row, token):
                    live.append(index)
            self._keep(group, live)
            if not group.rows:
                del self.groups[key]
        self.steps += 1

    def _decode_rows_alone(self, group: Group, layers: list, input_ids, positions, error: Exception) -> torch.Tensor:
        """After a failed batched decoding step, run each row alone from the cache `layers` as they were before it.
        Rows that fail alone end with their error and leave the group; returns the logits of the rows kept."""
        if len(group.rows) == 1:
            self._fail(group.rows[0].request, error, "a decoding step")
            group.rows = []
            return torch.empty(0)
        LOG.warning(
            "a decoding step of %d rows failed (%s: %s); retrying each alone",
            len(group.rows),
            type(error).__name__,
            error,
        )
        kept, logits, caches = [], [], []
        for index, row in enumerate(group.rows):
            cache = RowCache([(key[index : index + 1], value[index : index + 1]) for key, value in layers])
            alone = slice(index, index + 1)
            try:
                logits.append(self._forward([row], input_ids[alone], group.mask[alone], positions[alone], cache))
            except Exception as row_error:  # reported to this row's request
                self._fail(row.request, row_error, "a decoding step")
                continue
            kept.append(index)
            caches.append(cache)
        group.rows = [group.rows[index] for index in kept]
        if not kept:
            return torch.empty(0)
        group.mask = group.mask[kept]
        group.cache = RowCache(
            [
                tuple(torch.cat([cache.layers[layer][part] for cache in caches]) for part in (0, 1))
                for layer in range(len(caches[0].layers))
            ]
        )
        return torch.cat(logits)

    def _keep(self, group: Group, indices: list[int]) -> None:
        """Keep only the rows at `indices`, and drop leading cache columns that are padding in every kept row."""
        if len(indices) == len(group.rows):
            return
        group.rows = [group.rows[index] for index in indices]
        if not indices:
            return
        select = torch.tensor(indices, device=self.device)
        mask = group.mask.index_select(0, select)
        start = int(mask.any(dim=0).nonzero()[0])
        group.mask = mask[:, start:]
        group.cache = RowCache(
            [
                (key.index_select(0, select)[:, :, start:], value.index_select(0, select)[:, :, start:])
                for key, value in group.cache.layers
            ]
        )
