"""STEP's memory model (paper Eq. 1-5). Pure: no torch.

Bytes per parameter follow the paper's mixed-precision accounting: a trainable parameter costs
16 B (fp32 weight 4 + fp32 gradient 4 + Adam moments 8), a frozen one 2 B (bf16 weight, no
gradient, no optimizer state). The trainer stores tensors exactly this way, so the layer bytes it
measures equal ``stage_bytes`` here.

Eq. 2 generalised (``Precision``): with ``train.optimizer_states`` 8bit/4bit (torchao's block-wise
quantized AdamW), bf16 (torch-optimi's AdamW with Kahan summation) or ``train.master_weights`` bf16,
a trainable tensor costs ``tensor_state_bytes`` (weight + gradient + moments, with the quantization
scales and lookup tables counted), so a new layer costs ``trainable_layer_bytes`` and an old one
``2·P + adapter_layer_bytes``; Eq. 3 is solved with those two numbers.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

TRAINABLE_BYTES = 16
FROZEN_BYTES = 2
GB = 1e9

OPTIMIZER_STATES = ("fp32", "bf16", "8bit", "4bit")
MASTER_WEIGHTS = ("fp32", "bf16")
# torchao.optim's low-bit AdamW (0.18): a moment is quantized only when the tensor has at least
# QUANT_MIN_NUMEL elements and a whole number of blocks; then it holds codes (1 B per element for
# 8-bit, 1/2 B for 4-bit), one fp32 scale per block and its own fp32 lookup table (qmap). Smaller
# tensors keep plain moments in the parameter's dtype. Checked against the live state tensors in
# tests/test_precision.py.
QUANT_MIN_NUMEL = 4096
QUANT = {  # states: (block size, code bits, qmap entries)
    "8bit": (256, 8, 256),
    "4bit": (128, 4, 16),
}


@dataclass(frozen=True)
class Precision:
    """How trainable tensors are stored: optimizer moments and master weights (and gradients)."""
    optimizer_states: str = "fp32"
    """fp32 (torch AdamW), bf16 (torch-optimi AdamW, Kahan summation), 8bit or 4bit (torchao)."""
    master_weights: str = "fp32"
    """fp32, or bf16: weights and gradients in bf16 (Kahan summation with bf16 states, bf16
    stochastic rounding with 8bit/4bit states)."""

    def problems(self) -> list[str]:
        """Unknown or unsupported combinations, each naming the config key."""
        out = []
        if self.optimizer_states not in OPTIMIZER_STATES:
            out.append(f"train.optimizer_states: must be one of {', '.join(OPTIMIZER_STATES)}, got {self.optimizer_states!r}")
        if self.master_weights not in MASTER_WEIGHTS:
            out.append(f"train.master_weights: must be one of {', '.join(MASTER_WEIGHTS)}, got {self.master_weights!r}")
        if out:
            return out
        if self.optimizer_states == "bf16" and self.master_weights == "fp32":
            out.append("train.optimizer_states: bf16 moments need train.master_weights: bf16 (no kept library "
                       "keeps bf16 moments for fp32 weights); use 8bit or 4bit states with fp32 weights")
        if self.optimizer_states == "fp32" and self.master_weights == "bf16":
            out.append("train.master_weights: bf16 weights need train.optimizer_states bf16, 8bit or 4bit "
                       "(fp32 moments of bf16 weights are not supported)")
        return out

    @property
    def label(self) -> str:
        return f"states {self.optimizer_states}, weights {self.master_weights}"


FP32 = Precision()
PRECISIONS = [p for p in (Precision(s, m) for m in MASTER_WEIGHTS for s in OPTIMIZER_STATES) if not p.problems()]
"""Every supported combination, fp32 first."""


def tensor_state_bytes(numel: int, prec: Precision = FP32, n_tensors: int = 1) -> int:
    """Bytes of ``n_tensors`` trainable tensors holding ``numel`` elements together (one tensor but
    for the paper's idealised 8/3·d MLP): weight + gradient + AdamW moments (+ Kahan compensation,
    quantization scales and one lookup table per tensor and moment)."""
    w = 4 if prec.master_weights == "fp32" else 2
    s = prec.optimizer_states
    if s == "fp32":
        moments = 8 * numel
    elif s == "bf16":
        moments = 2 * 2 * numel + 2 * numel  # two bf16 moments + bf16 Kahan compensation
    else:
        block, bits, qmap = QUANT[s]
        if numel >= QUANT_MIN_NUMEL * n_tensors and numel % block == 0:
            moments = 2 * (numel * bits // 8 + 4 * (numel // block) + 4 * qmap * n_tensors)
        else:
            moments = 2 * w * numel  # plain moments in the parameter's dtype
    return 2 * w * numel + moments


def layer_tensors(shape: "LayerShape") -> list[tuple[int, int]]:
    """(elements, tensors) of one block: the four attention weights, the MLP weights, the two norm
    vectors, then any biases. With ffn_hidden None (the paper's 8/3·d, not always whole) the three MLP weights
    are one entry of 8·d² elements in 3 tensors."""
    d, kv, q = shape.d_model, shape.kv_dim or shape.d_model, shape.q_dim or shape.d_model
    attn = [(d * q, 1), (d * kv, 1), (d * kv, 1), (q * d, 1)]
    f = shape.ffn_hidden
    mlp = [(8 * d * d, 3)] if f is None else [(d * f, 1)] * 3
    biases = [(q, 1), (kv, 1), (kv, 1), (d, 1)] if shape.attention_bias else []
    if shape.mlp_bias:
        biases += [(f, 1), (f, 1), (d, 1)]
    return attn + mlp + [(d, 1), (d, 1)] + biases


def lora_tensors(shape: "LayerShape", rank: int) -> list[tuple[int, int]]:
    """(elements, tensors) of one block's adapters: lora_A (r×in) and lora_B (out×r) per linear
    (with ffn_hidden None the MLP's six adapters as one entry of 11·r·d elements)."""
    if not rank:
        return []
    d, kv, f, q = shape.d_model, shape.kv_dim or shape.d_model, shape.ffn_hidden, shape.q_dim or shape.d_model
    attn = [(rank * n, 1) for n in (d, q, d, kv, d, kv, q, d)]  # A (r×in), B (out×r) of q, k, v, o
    mlp = [(11 * rank * d, 6)] if f is None else [(rank * n, 1) for n in (d, f, d, f, f, d)]
    return attn + mlp


def trainable_layer_bytes(shape: "LayerShape", prec: Precision = FP32) -> int:
    """Bytes of one trainable block (Eq. 1's 16·P at fp32)."""
    if prec == FP32:
        return TRAINABLE_BYTES * params_per_layer(shape)
    return sum(tensor_state_bytes(n, prec, t) for n, t in layer_tensors(shape))


def adapter_layer_bytes(shape: "LayerShape", rank: int, prec: Precision = FP32) -> int:
    """Bytes of one block's trainable adapters (Eq. 2's 16·E at fp32)."""
    if not rank:
        return 0
    if prec == FP32:
        return TRAINABLE_BYTES * lora_params_per_layer(shape, rank)
    return sum(tensor_state_bytes(n, prec, t) for n, t in lora_tensors(shape, rank))


def layer_costs(shape: "LayerShape", rank: int, prec: Precision = FP32) -> tuple[int, int]:
    """Eq. 2's two slopes in bytes: g per new (trainable) layer, k per old layer (frozen bf16 + adapters)."""
    return (trainable_layer_bytes(shape, prec),
            FROZEN_BYTES * params_per_layer(shape) + adapter_layer_bytes(shape, rank, prec))


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder block. ffn_hidden None means the paper's 8/3·d exactly.

    The defaults describe the paper's block (Eq. 4/5): q and o are d×d, no biases. An imported
    model may differ: q_dim = n_heads·head_dim (head_dim need not be d/n_heads), kv_dim =
    n_kv_heads·head_dim, and HF's attention_bias / mlp_bias add bias vectors, which are parameters
    like any other (16 B trainable, 2 B frozen in bf16)."""
    d_model: int
    ffn_hidden: int | None = None
    kv_dim: int | None = None  # n_kv_heads·head_dim for GQA; None means d_model
    q_dim: int | None = None  # n_heads·head_dim; None means d_model
    attention_bias: bool = False
    """Biases on q, k, v and o (q_dim + 2·kv_dim + d_model parameters)."""
    mlp_bias: bool = False
    """Biases on gate, up and down (2·ffn_hidden + d_model parameters)."""

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linears: q, k, v, o, gate, up, down."""
        d, kv, q = self.d_model, self.kv_dim or self.d_model, self.q_dim or self.d_model
        f = self.ffn_hidden
        return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]

    def bias_params(self) -> int:
        """Bias parameters of one block (0 for the paper's block)."""
        d, kv, q = self.d_model, self.kv_dim or self.d_model, self.q_dim or self.d_model
        n = q + 2 * kv + d if self.attention_bias else 0
        if self.mlp_bias:
            if self.ffn_hidden is None:
                raise ValueError("mlp_bias needs the real FFN width (ffn_hidden)")
            n += 2 * self.ffn_hidden + d
        return n


def params_per_layer(shape: LayerShape) -> int:
    """Eq. 4 generalised: parameters of one block (attention + SwiGLU + two RMSNorm vectors + biases)."""
    d, kv, q = shape.d_model, shape.kv_dim or shape.d_model, shape.q_dim or shape.d_model
    attn = 2 * d * q + 2 * d * kv
    mlp = 8 * d * d if shape.ffn_hidden is None else 3 * d * shape.ffn_hidden
    return attn + mlp + 2 * d + shape.bias_params()  # paper default: 12d² + 2d


def lora_params_per_layer(shape: LayerShape, rank: int) -> int:
    """Eq. 5 generalised: adapter parameters r·(in+out) summed over the seven linears (paper: 19·r·d)."""
    if shape.ffn_hidden is None:
        d, kv, q = shape.d_model, shape.kv_dim or shape.d_model, shape.q_dim or shape.d_model
        # q and o: r·(d + q) each; k and v: r·(d + kv) each; gate, up, down with f = 8/3·d: 11·r·d
        return rank * (4 * d + 2 * q + 2 * kv) + 11 * rank * d
    return sum(rank * (i + o) for i, o in shape.linears())


def vanilla_bytes(n_layers: int, P: int) -> int:
    """Eq. 1: model-state bytes of the transformer layers of a vanilla model."""
    return TRAINABLE_BYTES * n_layers * P


def stage_bytes(layers_per_stage: list[int], P: int, E: int) -> list[int]:
    """Eq. 2 for every stage: 16·n_i·P + 2·N_(i-1)·P + 16·N_(i-1)·E bytes."""
    return stage_bytes_from_costs(layers_per_stage, TRAINABLE_BYTES * P, FROZEN_BYTES * P + TRAINABLE_BYTES * E)


def stage_bytes_from_costs(layers_per_stage: list[int], g: int, k: int) -> list[int]:
    """Eq. 2 with general slopes (``layer_costs``): g·n_i + k·N_(i-1) bytes for every stage."""
    out, before = [], 0
    for n in layers_per_stage:
        out.append(g * n + k * before)
        before += n
    return out


def relora_bytes(n_layers: int, P: int, E: int, norm_params: int) -> int:
    """ReLoRA's LoRA phase: linears frozen in bf16 (2 B), norms and adapters trainable (16 B)."""
    return FROZEN_BYTES * n_layers * (P - norm_params) + TRAINABLE_BYTES * n_layers * (norm_params + E)


def relora_layer_bytes(shape: "LayerShape", rank: int, prec: Precision = FP32) -> int:
    """ReLoRA's LoRA phase, one block: linears frozen in bf16, the two norms and the adapters
    trainable at ``prec``."""
    d = shape.d_model
    return (FROZEN_BYTES * (params_per_layer(shape) - 2 * d) + 2 * tensor_state_bytes(d, prec)
            + adapter_layer_bytes(shape, rank, prec))


def galore_layer_bytes(shape: LayerShape, rank: int) -> int:
    """GaLore (proj_type std) for one block: each m×n linear keeps fp32 weight and gradient (8·m·n),
    Adam moments of the projected gradient (8·r·max(m, n)) and the projection (4·r·min(m, n));
    the two norms and any biases are plain AdamW (16 B each)."""
    total = TRAINABLE_BYTES * (2 * shape.d_model + shape.bias_params())  # norms and biases: plain AdamW
    for n_in, n_out in _real_linears(shape):
        r = min(rank, n_in, n_out)
        total += 8 * n_in * n_out + 8 * r * max(n_in, n_out) + 4 * r * min(n_in, n_out)
    return total


def apollo_layer_bytes(shape: LayerShape, rank: int) -> int:
    """APOLLO (apollo-torch, random projection, proj_type std) for one block: the same terms as
    GaLore. Each m×n linear keeps fp32 weight and gradient (8·m·n), AdamW moments of the projected
    gradient (8·r·max(m, n)) and the random projection it stores (4·r·min(m, n), regenerated from a
    seed every update_proj_gap steps); the two norms are plain AdamW (16 B each). Unlike GaLore the
    rank is not clamped to the matrix: apollo-torch projects to ``rank`` whatever the shape."""
    total = TRAINABLE_BYTES * 2 * shape.d_model
    for n_in, n_out in _real_linears(shape):
        total += 8 * n_in * n_out + 8 * rank * max(n_in, n_out) + 4 * rank * min(n_in, n_out)
    return total


def _real_linears(shape: LayerShape) -> list[tuple[int, int]]:
    if shape.ffn_hidden is None:
        raise ValueError("GaLore bytes need the real FFN width (ffn_hidden)")
    return shape.linears()


def cumulative(layers_per_stage: list[int]) -> list[int]:
    return list(itertools.accumulate(layers_per_stage))


# ---------------------------------------------------------------------------- extended model
def head_state_bytes(vocab_size: int, d_model: int, tied: bool = False, prec: Precision = FP32) -> int:
    """Embedding + LM head + final norm, trainable in every stage (16 B per parameter at fp32)."""
    tensors = [vocab_size * d_model] * (1 if tied else 2) + [d_model]
    return sum(tensor_state_bytes(n, prec) for n in tensors)


LOSS_CHUNK_BYTES = 128 * 2**20
LOSS_MAX_CHUNK_ROWS = 1024


def loss_chunk_rows(n_rows: int, vocab_size: int, chunk_bytes: int = LOSS_CHUNK_BYTES,
                    max_rows: int = LOSS_MAX_CHUNK_ROWS) -> int:
    """Rows per chunk of the fused loss of loss.py (defined here so that the memory model stays
    torch-free): the largest power of two whose chunk of fp32 logits (4·rows·V bytes; under
    torch.compile the bf16 logits and their bf16 gradient, the same bytes)
    fits in ``chunk_bytes``, at most ``max_rows`` and ``n_rows``, at least 1. Defaults: 512 rows at
    V = 50257, 1024 at V = 8192. On a 2-thread AMX CPU (benchmarks/throughput.py --loss-chunks)
    taller chunks were faster up to these sizes and power-of-two heights beat the ones between. The
    same rule holds on every device: at V = 128256 it gives 256 rows (three fp32 chunks, 384 MiB, in
    eager mode)."""
    rows = min(int(max_rows), int(chunk_bytes) // (4 * vocab_size))
    return max(1, min(n_rows, 1 << (rows.bit_length() - 1) if rows > 0 else 1))


def activation_bytes(n_layers: int, d_model: int, n_heads: int, seq_len: int, micro_batch: int,
                     vocab_size: int, checkpointing: bool = False, *, ffn_hidden: int | None = None,
                     q_dim: int | None = None, kv_dim: int | None = None, act_bytes: int = 4) -> int:
    """Bytes alive at the end of the forward pass beyond the parameters and optimizer moments, for
    steplm's own implementation (model.py with the fused, chunked head + loss of loss.py).

    Per layer and token the autograd graph keeps (``act_bytes`` each; 4 for fp32): the block input,
    both RMSNorm outputs before and after the weight, the attention-norm output and the MLP-norm input
    (6·d), rotated q and k, v, the SDPA output and o_proj's input (3·q + 2·kv), and gate, silu(gate),
    up and their product (4·f); plus fp32 norm statistics (2) and SDPA's log-sum-exp (n_heads). With
    activation checkpointing only the block inputs are kept, plus one block recomputed. The head and
    loss add the hidden-state gradient (d per token), the head's fp32 weight gradient (4·V·d, formed
    in the forward pass) and three chunks of fp32 logits in eager mode, of ``loss_chunk_rows`` rows
    each (under torch.compile less: the bf16 logits and their bf16 gradient). Full logits (tokens·V)
    never exist.
    """
    n, d = seq_len * micro_batch, d_model
    f = ffn_hidden if ffn_hidden is not None else -(-8 * d // 3)
    q, kv = q_dim or d, kv_dim or d
    per_layer = n * (6 * d + 3 * q + 2 * kv + 4 * f) * act_bytes + n * (2 + n_heads) * 4
    layers = (n * d * act_bytes * n_layers + per_layer) if checkpointing else per_layer * n_layers
    rows = loss_chunk_rows(n, vocab_size)
    head = n * d * act_bytes + 4 * vocab_size * d + 3 * rows * vocab_size * 4
    return layers + head


def rope_table_bytes(max_seq_len: int, head_dim: int) -> int:
    """Bytes of the model's RoPE tables: cos and sin of shape (max_seq_len, head_dim), fp32."""
    return 2 * max_seq_len * head_dim * 4


def step_peak_bytes(state_bytes: int, grad_bytes: int, head_grad_bytes: int, activations: int) -> int:
    """Peak of one training step: the larger of the model states with every gradient (at the
    optimizer step) and, at the start of the backward pass, the states without the gradients that
    backward has not formed yet (all but the head's) plus ``activation_bytes``."""
    return max(state_bytes, state_bytes - grad_bytes + head_grad_bytes + activations)
