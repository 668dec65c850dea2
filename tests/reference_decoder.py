"""An independent reference for loop (ALRR) and suppress: a plain-PyTorch decoder, no vLLM, no
transformers.

It reads `config.json` and `model.safetensors` of a Llama, Qwen2, Qwen3 or gpt-oss checkpoint
(e.g. the tiny fp32 models of `telltale_norm.models.make_tiny_model`) and decodes greedily one
token at a time with an explicit per-layer KV cache. gpt-oss adds, as its model card and the
YaRN paper describe them: attention sinks (one learned logit per head that takes part in the
softmax and is dropped), a sliding window of `sliding_window` keys (the query's own included)
on the even layers, yarn RoPE (NTK-by-parts frequencies, cos/sin scaled by 0.1 ln(factor) + 1),
biased projections, and top-k routed experts (softmax over the k best router logits) with the
clamped SwiGLU `(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)`, `g = min(gate, 7)`, gate and
up interleaved in `gate_up_proj`.

On the patched layers it applies ALRR exactly as SPEC.md ("loop") states it, written from
the text, not from the plugin's code:

1. run the layer once, normally; this pass writes the layer's K/V of the token into the cache;
   measure `n = ||x||`;
2. `active = tau < n < BLOWUP * tau`;
3. while active and fewer than MAX_EXTRA re-runs: run the layer again on its own output
   WITHOUT writing the cache (its attention reads the cache, which holds the first pass's K/V,
   the token's own included: the re-run's freshly computed K/V are never used), measure
   `n_new`, stay active only if `n_new > tau`, `(n_new - n_prev) / (n_prev + 1e-6) >=
   GROWTH_EPS` and `n_new < BLOWUP * tau`; an active token takes
   `x <- (1 - ALPHA) x + ALPHA x_new` and `n_prev <- n_new`.

suppress (SPEC.md "suppress", mode high_norm): after a patched layer (and after its ALRR, if
any), a decode token with `n > tau` gets `x <- x * MUL_SCALE` (action mul) or, if that makes it
smaller, `x <- x * (tau / CLAMP_DIV) / n` (action clamp).

Prompt (prefill) tokens are never treated: the first generated token comes from the prefill.
Everything is computed in float32 on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

SUPPORTED = ("llama", "qwen2", "qwen3", "gpt_oss")


@dataclass(frozen=True)
class LoopSettings:
    """ALRR settings of one request (SPEC.md names in lower case)."""

    tau: dict[int, float]  # patched layer -> tau
    max_extra: int = 1
    growth_eps: float = 0.2
    blowup: float = 1.5
    alpha: float = 1.0

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.tau))


@dataclass(frozen=True)
class SuppressSettings:
    """suppress settings of one request (mode high_norm)."""

    tau: dict[int, float]  # patched layer -> tau
    action: str = "mul"  # or "clamp"
    mul_scale: float = 0.1
    clamp_div: float = 4.0


@dataclass
class Generation:
    """Greedy tokens and, per decode step and layer (all layers), what ALRR and suppress did."""

    tokens: list[int]
    norm: np.ndarray  # [steps, layers] first-pass norm after the layer
    runs: np.ndarray  # [steps, layers] extra passes the token ran in
    taken: np.ndarray  # [steps, layers] extra passes whose output the token kept
    entered: np.ndarray  # [steps, layers] bool: in the window after the first pass
    stopped_tau: np.ndarray
    stopped_growth: np.ndarray
    stopped_blowup: np.ndarray
    suppressed: np.ndarray  # [steps, layers] bool: suppress scaled the token's state
    # Per step and layer, the smallest relative distance of any compared quantity to the
    # boundary of its rule (decisions closer than float32 noise to a boundary are fragile).
    margin: np.ndarray = field(default=None)  # type: ignore[assignment]


def rope_frequencies(rope: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim / 2] and the cos/sin scale of default or yarn RoPE."""
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind != "yarn":
        raise ValueError(f"only default and yarn RoPE are supported, got {rope}")
    # YaRN: dimensions that rotate more than beta_fast times over the original context keep
    # their frequency, those under beta_slow times are divided by `factor`, a linear ramp
    # between (over the dimension index at which r rotations fit, possibly rounded outwards).
    factor, original = float(rope["factor"]), float(rope["original_max_position_embeddings"])

    def dim_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(rope.get("beta_fast") or 32), dim_of(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3))
    interpolated = ramp.clamp(0, 1)  # 0: keep the frequency, 1: divide it by factor
    inv_freq = inv_freq / factor * interpolated + inv_freq * (1 - interpolated)
    return inv_freq, (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0


class ReferenceDecoder:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.arch = cfg["model_type"]
        if self.arch not in SUPPORTED:
            raise ValueError(f"reference decoder supports {SUPPORTED}, not {self.arch}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError("only SiLU MLPs are supported")
        self.hidden = cfg["hidden_size"]
        self.num_layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.heads)
        self.head_dim = cfg.get("head_dim") or self.hidden // self.heads
        self.eps = float(cfg["rms_norm_eps"])
        self.max_len = int(cfg.get("max_position_embeddings", 2048))
        gpt_oss = self.arch == "gpt_oss"
        # gpt-oss: a window on even layers; experts' top-k and SwiGLU clamp
        self.window = [cfg["sliding_window"] if gpt_oss and i % 2 == 0 else None
                       for i in range(self.num_layers)]
        self.top_k = cfg.get("num_experts_per_tok")
        self.swiglu = (cfg.get("swiglu_alpha", 1.702), cfg.get("swiglu_limit", 7.0))

        w = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        self.embed = w["model.embed_tokens.weight"]
        self.final_norm = w["model.norm.weight"]
        self.lm_head = self.embed if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                name: w.get(p + key) for name, key in (
                    ("in_norm", "input_layernorm.weight"),
                    ("post_norm", "post_attention_layernorm.weight"),
                    ("q", "self_attn.q_proj.weight"), ("q_b", "self_attn.q_proj.bias"),
                    ("k", "self_attn.k_proj.weight"), ("k_b", "self_attn.k_proj.bias"),
                    ("v", "self_attn.v_proj.weight"), ("v_b", "self_attn.v_proj.bias"),
                    ("o", "self_attn.o_proj.weight"), ("o_b", "self_attn.o_proj.bias"),
                    ("q_norm", "self_attn.q_norm.weight"), ("k_norm", "self_attn.k_norm.weight"),
                    ("sinks", "self_attn.sinks"),
                    ("gate", "mlp.gate_proj.weight"), ("up", "mlp.up_proj.weight"),
                    ("down", "mlp.down_proj.weight"),
                    ("router", "mlp.router.weight"), ("router_b", "mlp.router.bias"),
                    ("gate_up", "mlp.experts.gate_up_proj"),
                    ("gate_up_b", "mlp.experts.gate_up_proj_bias"),
                    ("down_e", "mlp.experts.down_proj"), ("down_e_b", "mlp.experts.down_proj_bias"))
            })
        rope = {"rope_theta": cfg.get("rope_theta", 10000.0),
                **(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})}
        inv_freq, scale = rope_frequencies(rope, self.head_dim)
        angles = torch.arange(self.max_len, dtype=torch.float64)[:, None] * inv_freq[None]
        self.cos = (angles.cos() * scale).float()  # [positions, head_dim / 2]
        self.sin = (angles.sin() * scale).float()
        self.reset()

    # ------------------------------------------------------------ building blocks
    def reset(self) -> None:
        """Empty KV cache: one key and one value tensor per layer."""
        shape = (self.max_len, self.kv_heads, self.head_dim)
        self.k_cache = [torch.zeros(shape) for _ in range(self.num_layers)]
        self.v_cache = [torch.zeros(shape) for _ in range(self.num_layers)]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + self.eps))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Neox style (rotate_half), as HF Llama/Qwen2/Qwen3/gpt-oss: x [T, heads, head_dim]
        cos = self.cos[positions][:, None, :].repeat(1, 1, 2)
        sin = self.sin[positions][:, None, :].repeat(1, 1, 2)
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        y = x @ weight.T
        return y if bias is None else y + bias

    def layer(self, index: int, x: torch.Tensor, positions: torch.Tensor,
              write_cache: bool) -> torch.Tensor:
        """One decoder layer on the residual stream `x` [T, hidden] at `positions` [T].

        With `write_cache` the tokens' K/V are stored first; either way the attention reads
        K/V of positions 0..positions[-1] from the cache (causal)."""
        w = self.layers[index]
        x = x + self._attention(index, self._rms(x, w["in_norm"]), positions, write_cache)
        h = self._rms(x, w["post_norm"])
        if w["router"] is not None:
            return x + self._experts(w, h)
        return x + (torch.nn.functional.silu(h @ w["gate"].T) * (h @ w["up"].T)) @ w["down"].T

    def _attention(self, index: int, h: torch.Tensor, positions: torch.Tensor,
                   write_cache: bool) -> torch.Tensor:
        w = self.layers[index]
        t = h.shape[0]
        q = self._linear(h, w["q"], w["q_b"]).view(t, self.heads, self.head_dim)
        k = self._linear(h, w["k"], w["k_b"]).view(t, self.kv_heads, self.head_dim)
        v = self._linear(h, w["v"], w["v_b"]).view(t, self.kv_heads, self.head_dim)
        if w["q_norm"] is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
            q = self._rms(q, w["q_norm"])
            k = self._rms(k, w["k_norm"])
        q, k = self._rope(q, positions), self._rope(k, positions)
        if write_cache:
            self.k_cache[index][positions] = k
            self.v_cache[index][positions] = v
        end = int(positions[-1]) + 1
        keys = self.k_cache[index][:end].repeat_interleave(self.heads // self.kv_heads, dim=1)
        values = self.v_cache[index][:end].repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = torch.einsum("thd,shd->hts", q, keys) / math.sqrt(self.head_dim)
        distance = positions[:, None] - torch.arange(end)[None, :]  # [T, end]: query - key
        hidden = distance < 0  # the future
        if self.window[index] is not None:
            hidden |= distance >= self.window[index]
        scores = scores.masked_fill(hidden[None], float("-inf"))
        if w["sinks"] is not None:  # one extra logit per head, dropped after the softmax
            sink = w["sinks"][:, None, None].expand(-1, t, 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        attn = torch.einsum("hts,shd->thd", probs, values)
        return self._linear(attn.reshape(t, -1), w["o"], w["o_b"])

    def _experts(self, w: dict, h: torch.Tensor) -> torch.Tensor:
        """gpt-oss MoE: each token's top-k experts, weighted by a softmax over their logits."""
        alpha, limit = self.swiglu
        best, chosen = self._linear(h, w["router"], w["router_b"]).topk(self.top_k, dim=-1)
        weights = best.softmax(-1)
        out = torch.zeros_like(h)
        for token in range(h.shape[0]):
            for weight, e in zip(weights[token], chosen[token].tolist()):
                gate_up = h[token] @ w["gate_up"][e] + w["gate_up_b"][e]
                gate = gate_up[0::2].clamp(max=limit)
                up = gate_up[1::2].clamp(-limit, limit)
                act = (up + 1) * gate * torch.sigmoid(alpha * gate)
                out[token] += weight * (act @ w["down_e"][e] + w["down_e_b"][e])
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms(x, self.final_norm) @ self.lm_head.T

    @torch.no_grad()
    def forward_logits(self, ids: list[int]) -> torch.Tensor:
        """Plain causal forward of a whole sequence (one prefill): logits [T, vocab]."""
        self.reset()
        positions = torch.arange(len(ids))
        x = self.embed[torch.tensor(ids)]
        for i in range(self.num_layers):
            x = self.layer(i, x, positions, write_cache=True)
        return self._logits(x)

    # ------------------------------------------------------------ decoding with ALRR
    @torch.no_grad()
    def generate(self, prompt: list[int], max_tokens: int,
                 loop: LoopSettings | None = None,
                 step_logits: list[torch.Tensor] | None = None,
                 suppress: SuppressSettings | None = None) -> Generation:
        """Greedy decoding; the prompt is one prefill, then one token per step with ALRR on
        `loop.layers` and suppress on `suppress.tau`'s layers. `step_logits`, when given,
        collects each step's logits."""
        self.reset()
        if len(prompt) + max_tokens > self.max_len:
            raise ValueError("sequence longer than the model's positions")
        x = self.embed[torch.tensor(prompt)]
        positions = torch.arange(len(prompt))
        for i in range(self.num_layers):
            x = self.layer(i, x, positions, write_cache=True)
        logits = self._logits(x[-1])
        if step_logits is not None:
            step_logits.append(logits)
        tokens = [int(logits.argmax())]
        steps, layers = max_tokens - 1, self.num_layers
        rec = {name: np.zeros((steps, layers), dtype=dtype) for name, dtype in (
            ("norm", np.float32), ("runs", np.int64), ("taken", np.int64),
            ("entered", bool), ("stopped_tau", bool), ("stopped_growth", bool),
            ("stopped_blowup", bool), ("suppressed", bool), ("margin", np.float64))}
        rec["margin"][:] = np.inf
        for step in range(steps):
            pos = torch.tensor([len(prompt) + step])
            x = self.embed[torch.tensor([tokens[-1]])]
            for i in range(layers):
                x = self.layer(i, x, pos, write_cache=True)
                n = float(torch.linalg.vector_norm(x))
                rec["norm"][step, i] = n
                if loop is not None and i in loop.tau:
                    x = self._alrr(i, x, pos, n, loop, rec, step)
                if suppress is not None and i in suppress.tau:
                    x = self._suppress(i, x, n, suppress, rec, step)
            logits = self._logits(x[0])
            if step_logits is not None:
                step_logits.append(logits)
            tokens.append(int(logits.argmax()))
        return Generation(tokens=tokens, **rec)

    @staticmethod
    def _suppress(i: int, x: torch.Tensor, n: float, settings: SuppressSettings,
                  rec: dict[str, np.ndarray], step: int) -> torch.Tensor:
        tau = settings.tau[i]
        if tau:
            rec["margin"][step, i] = min(rec["margin"][step, i], abs(n - tau) / tau)
        if not n > tau:
            return x
        rec["suppressed"][step, i] = True
        if settings.action == "mul":
            return x * settings.mul_scale
        return x * min(1.0, tau / settings.clamp_div / n)  # clamp: never enlarge

    def _alrr(self, i: int, x: torch.Tensor, pos: torch.Tensor, n: float,
              loop: LoopSettings, rec: dict[str, np.ndarray], step: int) -> torch.Tensor:
        tau, blowup = loop.tau[i], loop.blowup * loop.tau[i]

        def near(value: float, bound: float) -> None:  # record the closest call
            if bound and math.isfinite(bound):
                rel = abs(value - bound) / abs(bound)
                rec["margin"][step, i] = min(rec["margin"][step, i], rel)

        near(n, tau)
        near(n, blowup)
        active = tau < n < blowup
        rec["entered"][step, i] = active
        n_prev = n
        for _ in range(loop.max_extra):
            if not active:
                break
            x_new = self.layer(i, x, pos, write_cache=False)
            rec["runs"][step, i] += 1
            n_new = float(torch.linalg.vector_norm(x_new))
            growth = (n_new - n_prev) / (n_prev + 1e-6)
            near(n_new, tau)
            near(n_new, blowup)
            # growth is already relative: its distance to GROWTH_EPS is absolute
            rec["margin"][step, i] = min(rec["margin"][step, i], abs(growth - loop.growth_eps))
            above, grew, bounded = n_new > tau, growth >= loop.growth_eps, n_new < blowup
            if not bounded:
                rec["stopped_blowup"][step, i] = True
            elif not above:
                rec["stopped_tau"][step, i] = True
            elif not grew:
                rec["stopped_growth"][step, i] = True
            active = above and grew and bounded
            if active:
                rec["taken"][step, i] += 1
                x = (1 - loop.alpha) * x + loop.alpha * x_new
                n_prev = n_new
        return x
