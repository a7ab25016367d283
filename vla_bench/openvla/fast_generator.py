"""Fast greedy decoding for serving: the decoder's fused elementwise kernels and FastGenerator, one CUDA graph per
(adapter variant, batch bucket, prompt bucket). It computes what model.OpenVLA.generate computes, laid out for
speed."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from .model import OpenVLA

#: Batch sizes a call is padded up to (beyond the last: the next multiple of 64). A closed loop's batch shrinks as
#: episodes finish (16, 15, ..., 1 at the end of a run); one graph per exact size would capture a new graph (about
#: two calls' time, and its own output buffers) for every size on the way down. The buckets are powers of two up to
#: 16 and then steps of at most 1.5x: padding wastes at most half a call below 16 rows, where a call is short and
#: happens only in a run's tail, and at most a third above, where the batch is usually full; up to 64 rows that is
#: 9 graphs per prompt bucket, which `warm_up` captures in seconds before the first episode.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def batch_bucket(batch: int) -> int:
    """The number of rows a call of `batch` rows runs with (its bucket)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return next((b for b in BATCH_BUCKETS if batch <= b), -(-batch // 64) * 64)


def batch_buckets_upto(batch: int) -> list[int]:
    """Every bucket a call of at most `batch` rows can run with, smallest first."""
    top = batch_bucket(batch)
    return [b for b in BATCH_BUCKETS if b < top] + list(range(BATCH_BUCKETS[-1] + 64, top, 64)) + [top]


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin_lo: torch.Tensor, sin_hi: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (B, len, heads, head_dim): HF's rotate_half(x) * sin is
    [-x2 * sin1, x1 * sin2], here with sin_lo = -sin1 and sin_hi = sin2, without materialising rotate_half."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos[..., :half] + x2 * sin_lo, x2 * cos[..., half:] + x1 * sin_hi], dim=-1).to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Llama's MLP activation, silu(gate) * up."""
    return nn.functional.silu(gate) * up


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(hidden + delta, RMSNorm(hidden + delta)): a residual add and the next norm, which read the same sum."""
    hidden = hidden + delta
    return hidden, nn.functional.rms_norm(hidden, (hidden.shape[-1],), weight, eps)


class _Elementwise:
    """The decoder layer's elementwise chains. On CUDA each chain is one torch.compile'd (Triton) kernel instead of
    2-3 ATen kernels that each round-trip the (B, len, 4096 or 11008) activations through memory: at B=64 those
    chains were ~85 ms of a 546 ms call (measured). The functions take tensors only, so one compiled kernel serves
    all 32 layers (a module argument would make dynamo recompile per layer). On the CPU they run as plain ATen."""

    def __init__(self, compiled: bool):
        if compiled:
            # each chain sees the shapes of every (batch bucket, prompt bucket, prefill or decode) warm_up builds;
            # past dynamo's default of 8 compiled versions per function it would quietly run the plain ops
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        wrap = _compiled_or_plain if compiled else (lambda f: f)
        self.rope, self.silu_mul, self.add_rms_norm = wrap(rope_rotate), wrap(silu_mul), wrap(add_rms_norm)


def _compiled_or_plain(fn):
    """torch.compile(fn), falling back to fn for good (with a warning) if compiling fails, e.g. on a host without
    a working Triton: the fused kernels are a speed-up, never a requirement. The first call, where compiling
    happens, is FastGenerator's warm-up outside graph capture."""
    compiled = torch.compile(fn, fullgraph=True)
    state = {"fn": compiled}

    def call(*args):
        try:
            return state["fn"](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run the plain ops
            if state["fn"] is fn:
                raise
            import warnings

            warnings.warn(f"vla-bench: torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); "
                          "running the plain kernels")
            state["fn"] = fn
            return fn(*args)

    return call


class FastGenerator:
    """Greedy decoding for serving. The whole call - both vision towers, the projector, the prompt splice, the LLM
    prefill and every decode step - is one CUDA graph per (adapter variant, batch bucket, prompt bucket), replayed
    with a single launch. At B=1 the eager call is bound by the CPU launching ~11k kernels (towers, prefill, 6 decode
    steps); the graph leaves only GPU time. It computes what OpenVLA.generate computes, laid out for speed:

    * Rows are right-padded, [BOS][patches][text][pads], instead of the plain path's left padding. Every real token
      then sits at its own position index, and causal attention never lets a real token see a pad (pads only come
      after it), so the prefill needs no mask at all and SDPA runs its flash kernel (a custom mask would force a
      slower kernel). Each row's first generated token is read at its own last real column.
    * The Llama decoder layers are run by _layer below from the layers' own modules and weights (so LoRA adapters
      still apply), not through LlamaModel.forward: HF's mask preprocessing reads tensor values on the host (a sync,
      which a graph cannot hold), and its elementwise code is most of the non-GEMM time measured at B=64 (fp32
      RMSNorm chains, rotate_half's concatenations, index_copy cache writes). Here RMSNorm is one fused kernel,
      rotary is three kernels writing keys straight into the KV cache, and cache writes are plain slice copies at
      columns known when the graph is built. Rounding differs from HF's by at most an ulp per element (fused
      products round once); the GPU benchmark checks the tokens against the eager reference.
    * The last layer of the prefill runs attention output and MLP for each row's last real token only: the other
      tokens' last-layer outputs feed nothing (their keys and values, which decoding reads, are still written).
    * Decode steps write column S + step of the KV cache (S = padded prompt length) for every row, with a per-row
      position and a (B, 1, 1, cache) additive mask hiding the pads between a row's prompt and column S.

    * A call of B rows runs batch_bucket(B) rows: the extra rows repeat the first real row (so they compute finite,
      ordinary numbers) and their outputs are dropped. Rows never interact, so a row's result does not depend on
      how the call was padded. `warm_up` builds every bucket's graph before a run, so that no call captures.

    On the CPU (the tests) the same body runs without the graph. Padded prompt lengths are rounded up to
    TEXT_BUCKET so that prompts of similar length share a graph; KV caches are shared by all graphs of one cache
    length (a smaller batch uses the first rows of a larger batch's cache), and all graphs share one memory pool
    (see _capture). `captures` counts graphs captured (on the CPU: states built), so a test can see that a warmed-up
    run builds nothing more.
    """

    TEXT_BUCKET = 4  # prompt tokens; at most 3 pad columns of prefill work per row
    CACHE_BUCKET = 64  # KV cache lengths are rounded up to this, so neighbouring text buckets share a cache

    def __init__(self, model: OpenVLA, use_cuda_graph: bool | None = None, fuse: bool | None = None,
                 prefill_attention: str | None = None):
        """fuse: compile the elementwise chains (default: on CUDA). prefill_attention: None lets SDPA choose its
        kernel for the causal prefill; "flash" restricts it to FlashAttention-2 (cuDNN's pick on sm90 was an sm80
        kernel, measured slower at B=64); any other value is refused."""
        self.model = model
        cuda = model.device.type == "cuda"
        self.use_cuda_graph = cuda if use_cuda_graph is None else use_cuda_graph
        self.fused = cuda if fuse is None else bool(fuse)
        self.ops = _Elementwise(self.fused)
        if prefill_attention not in (None, "flash"):
            raise ValueError(f"prefill_attention must be None or 'flash', got {prefill_attention!r}")
        self.prefill_attention = prefill_attention
        self._silu = model.language_model.config.hidden_act == "silu"  # Llama's; else the module's own activation
        # a graph replays the kernels of the LoRA adapter that was active when it was captured, so each adapter
        # (variant) has its own graphs; caches hold no adapter state (each call rewrites what it reads) and are shared
        self._states: dict[tuple, dict] = {}
        self._caches: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pool = None
        self.captures = 0  # graphs captured on CUDA; states built on the CPU path (where nothing is captured)

    # ---- state ----------------------------------------------------------------------------------------------
    def _cache(self, batch: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values as (B, max_len, kv_heads, head_dim): a prompt's tokens are one contiguous
        slice per row, and the (B, heads, len, head_dim) view attention wants is a transpose, not a copy. A cache of
        more rows serves a smaller batch as a view of its first rows (contiguous, since rows are the outer dim): a
        call rewrites every row and column it reads, whichever graph wrote them last, so graphs can share rows as
        they share caches across prompt buckets; warm_up builds the largest batch first for this."""
        larger = [b for (b, n) in self._caches if n == max_len and b > batch]
        if (batch, max_len) not in self._caches and larger:
            return [(k[:batch], v[:batch]) for k, v in self._caches[(min(larger), max_len)]]
        if (batch, max_len) not in self._caches:
            cfg = self.model.language_model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            shape = (batch, max_len, cfg.num_key_value_heads, head_dim)
            dev, dt = self.model.device, self.model.dtype
            # zeros, not empty: masked columns still enter attention's matmul, and 0 * NaN would be NaN
            self._caches[(batch, max_len)] = [(torch.zeros(shape, dtype=dt, device=dev),
                                               torch.zeros(shape, dtype=dt, device=dev))
                                              for _ in range(cfg.num_hidden_layers)]
        return self._caches[(batch, max_len)]

    def _state(self, variant, image_shape: tuple, batch: int, text_len: int, new_tokens: int) -> dict:
        key = (variant, image_shape, batch, text_len, new_tokens)
        if key not in self._states:
            dev, dt = self.model.device, self.model.dtype
            seq = self.model.num_patches + text_len
            # the last generated token is never fed back, so the cache needs seq + new_tokens - 1 columns
            max_len = -(-(seq + new_tokens - 1) // self.CACHE_BUCKET) * self.CACHE_BUCKET
            self._states[key] = {
                "pixels": torch.zeros(batch, *image_shape, dtype=dt, device=dev),
                "ids": torch.zeros(batch, text_len, dtype=torch.long, device=dev),
                "lengths": torch.ones(batch, dtype=torch.long, device=dev),
                "cache": self._cache(batch, max_len), "max_len": max_len, "new_tokens": new_tokens,
                "graph": None, "out": None,
            }
            if not self.use_cuda_graph:  # nothing to capture: the new state is what a capture would be
                self.captures += 1
        return self._states[key]

    # ---- the captured body ----------------------------------------------------------------------------------
    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor):
        """cos, -sin of the first half and sin of the second half, each (B or 1, len, 1, head_dim or half): HF's
        rotate_half(x) * sin is [-x2 * sin1, x1 * sin2], applied below without materialising rotate_half."""
        cos, sin = self.model.language_model.model.rotary_emb(hidden, positions)
        half = cos.shape[-1] // 2
        return cos.unsqueeze(2), (-sin[..., :half]).unsqueeze(2), sin[..., half:].unsqueeze(2)

    def _layer(self, layer, hidden: torch.Tensor, rope, kv, start: int, mask: torch.Tensor | None,
               keep: tuple | None = None, normed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One Llama decoder layer on hidden (B, len, D) whose tokens occupy cache columns start..start+len-1.
        mask None: a prefill from column 0, causal over its own tokens. Otherwise attention reads the whole cache
        under `mask`. keep = (index (B, 1, 1), rope, mask): after writing every token's keys and values, carry on
        with one token per row only, attending under that mask. `normed` is this layer's input norm of `hidden`
        when the previous layer computed it with its residual add. Returns (the residual before this layer's last
        add, the MLP output still to add): the caller fuses that add with the next layer's norm."""
        attn, mlp = layer.self_attn, layer.mlp
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        b, n, dim = hidden.shape
        head_dim = attn.head_dim
        keys, values = kv
        x = normed if normed is not None else nn.functional.rms_norm(hidden, (dim,), norm1.weight,
                                                                     norm1.variance_epsilon)
        new_keys, new_values = keys[:, start:start + n], values[:, start:start + n]
        new_keys.copy_(self.ops.rope(attn.k_proj(x).view(b, n, -1, head_dim), *rope))
        new_values.copy_(attn.v_proj(x).view(b, n, -1, head_dim))
        if keep is not None:
            index, rope, mask = keep
            x = torch.gather(x, 1, index.expand(b, 1, dim))
            hidden = torch.gather(hidden, 1, index.expand(b, 1, dim))
            n = 1
        q = self.ops.rope(attn.q_proj(x).view(b, n, -1, head_dim), *rope).transpose(1, 2)
        gqa = {"enable_gqa": True} if attn.num_key_value_groups > 1 else {}
        if mask is None:  # no mask: SDPA may take its flash kernel
            with self._prefill_kernels():
                out = nn.functional.scaled_dot_product_attention(
                    q, new_keys.transpose(1, 2), new_values.transpose(1, 2), is_causal=True, scale=attn.scaling,
                    **gqa)
        else:
            out = nn.functional.scaled_dot_product_attention(
                q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=attn.scaling, **gqa)
        hidden, x = self.ops.add_rms_norm(hidden, attn.o_proj(out.transpose(1, 2).reshape(b, n, -1)), norm2.weight,
                                          norm2.variance_epsilon)
        if self._silu:
            act = self.ops.silu_mul(mlp.gate_proj(x), mlp.up_proj(x))
        else:  # not Llama's SiLU: keep the module's own activation
            act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return hidden, mlp.down_proj(act)

    def _prefill_kernels(self):
        if self.prefill_attention is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

    def _layers(self, layers, hidden, rope, cache, start, mask, keep=None) -> torch.Tensor:
        """All decoder layers; each residual add is fused with the next layer's input norm."""
        normed = None
        for i, layer in enumerate(layers):
            if i:
                nxt = layer.input_layernorm
                hidden, normed = self.ops.add_rms_norm(hidden, delta, nxt.weight, nxt.variance_epsilon)
            hidden, delta = self._layer(layer, hidden, rope, cache[i], start, mask,
                                        keep if i == len(layers) - 1 else None, normed)
        return hidden + delta

    def _mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, max_len) bool -> (B, 1, 1, max_len) additive mask."""
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        lm = self.model.language_model
        return lm.lm_head(lm.model.norm(hidden))[:, -1]

    def _run(self, s: dict, mark=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything between the static input buffers and the (B, n) ids and (B, n, V) logits, with no host sync,
        so that it can be captured. `mark(name)` is called after each stage (the benchmark's profiler hook)."""
        mark = mark or (lambda name: None)
        model, lm = self.model, self.model.language_model
        cache, max_len = s["cache"], s["max_len"]
        layers = lm.model.layers[: lm.config.num_hidden_layers]
        embed = lm.get_input_embeddings()
        patches = model.vision_backbone(s["pixels"])
        mark("vision")
        patches = model.projector(patches)
        mark("projector")
        text = embed(s["ids"])  # (B, T, D), right-padded
        hidden = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)  # [BOS][patches][text][pads]
        b, seq, dim = hidden.shape
        total = s["lengths"] + model.num_patches  # real tokens per row
        cols = torch.arange(max_len, device=hidden.device).unsqueeze(0)
        prompt_keys = cols < total.unsqueeze(1)  # (B, max_len): the row's own prompt; its pads come after
        last = (total - 1).view(b, 1, 1)
        keep = (last, self._rope(hidden, last.view(b, 1)), self._mask(prompt_keys, hidden.dtype))
        rope = self._rope(hidden, torch.arange(seq, device=hidden.device).unsqueeze(0))  # real tokens at 0..total-1
        hidden = self._layers(layers, hidden, rope, cache, 0, None, keep)
        logits = [self._logits(hidden)]
        tokens = [logits[-1].argmax(-1)]
        mark("prefill")
        for step in range(s["new_tokens"] - 1):
            col = seq + step
            mask = self._mask(prompt_keys | ((cols >= seq) & (cols <= col)), hidden.dtype)
            hidden = embed(tokens[-1]).unsqueeze(1)
            rope = self._rope(hidden, (total + step).unsqueeze(1))
            hidden = self._layers(layers, hidden, rope, cache, col, mask)
            logits.append(self._logits(hidden))
            tokens.append(logits[-1].argmax(-1))
            mark(f"decode{step + 1}")
        return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)

    def _capture(self, s: dict) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: picks kernels, loads cuBLAS
            self._run(s)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # Sharing one pool across graphs is safe here because nothing a graph allocates is read after another
        # graph has replayed: each replay's outputs are copied out before generate returns, and everything that
        # lives across calls (inputs, caches) was allocated outside the pool.
        with torch.cuda.graph(graph, pool=self._pool):
            s["out"] = self._run(s)
        s["graph"] = graph
        self.captures += 1

    # ---- warm-up --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warm(self, batch: int, prompt_length: int, image_shape: Sequence[int], max_new_tokens: int = 7,
             variant=None) -> None:
        """Build (on CUDA: capture) the graph that a call of `batch` rows whose longest prompt has
        `prompt_length` tokens will replay, unless it exists. The capture runs on whatever the input buffers hold
        (zeros at first): every value is valid input, and the kernels do not depend on it."""
        s = self._state(variant, tuple(image_shape), batch_bucket(batch), self.text_bucket(prompt_length),
                        max_new_tokens)
        if self.use_cuda_graph and s["graph"] is None:
            self._capture(s)

    def warm_up(self, max_batch: int, prompt_lengths: Sequence[int], image_shape: Sequence[int],
                max_new_tokens: int = 7, variant=None) -> int:
        """Build every graph that a call of at most `max_batch` rows can replay, for prompts of these lengths
        (padding duplicates real rows, so a call's longest prompt is one of them). Largest batch first, so that the
        smaller batches share its KV cache. Returns the number of graphs built now."""
        before = self.captures
        for length in sorted({self.text_bucket(n) for n in prompt_lengths}):
            for rows in reversed(batch_buckets_upto(max_batch)):
                self.warm(rows, length, image_shape, max_new_tokens, variant)
        return self.captures - before

    @classmethod
    def text_bucket(cls, prompt_length: int) -> int:
        """The padded text length of a call whose longest prompt has this many tokens."""
        return -(-prompt_length // cls.TEXT_BUCKET) * cls.TEXT_BUCKET

    # ---- entry point ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, prompts: Sequence[Sequence[int]], max_new_tokens: int = 7,
                 variant=None, return_logits: bool = False):
        """Like OpenVLA.generate; `variant` names the adapter state the caller has made active (None: base)."""
        model = self.model
        if len(prompts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(prompts)} prompts")
        if any(len(p) < 1 for p in prompts):
            raise ValueError("every prompt needs at least its BOS token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        b = len(prompts)
        rows = batch_bucket(b)
        text_len = self.text_bucket(max(len(p) for p in prompts))
        s = self._state(variant, tuple(pixel_values.shape[1:]), rows, text_len, max_new_tokens)
        prompts = list(prompts) + [prompts[0]] * (rows - b)  # padding rows repeat the first real row
        ids = torch.zeros(rows, text_len, dtype=torch.long)  # built on the host, one copy to the device
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        s["pixels"][:b].copy_(pixel_values)
        if rows > b:
            s["pixels"][b:].copy_(pixel_values[:1].expand(rows - b, *pixel_values.shape[1:]))
        s["ids"].copy_(ids)
        s["lengths"].copy_(torch.tensor([len(p) for p in prompts], dtype=torch.long))
        if not self.use_cuda_graph:
            out_ids, out_logits = self._run(s)
        else:
            if s["graph"] is None:
                self._capture(s)
            s["graph"].replay()
            out_ids, out_logits = s["out"]
        # the graph's output buffers are overwritten by the next replay; the padding rows' outputs are dropped
        return (out_ids[:b].clone(), out_logits[:b].clone()) if return_logits else out_ids[:b].clone()
