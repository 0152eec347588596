"""The seven projections of a decoder block, their shared inputs and their grouping.

Names are the module paths inside one decoder layer (Llama layout, which Mistral, Qwen2
and Qwen3 share).
"""

from __future__ import annotations

PROJECTIONS: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

# One Gram per unique input: q/k/v read the same normed hidden states, gate/up too.
INPUTS: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}

INPUT_OF: dict[str, str] = {proj: key for key, projs in INPUTS.items() for proj in projs}

# METHOD.md (Basis Sharing's configs): groups share q, k, v, up and gate; o and down stay
# per layer.
SHARED_IN_GROUP: frozenset[str] = frozenset({
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
})


def module_path(base_prefix: str, layer: int, projection: str) -> str:
    """Full module path of a projection inside the ForCausalLM model."""
    return f"{base_prefix}.layers.{layer}.{projection}"


def projection_path(short: str) -> str:
    """``q_proj`` -> ``self_attn.q_proj`` (the path inside a decoder block)."""
    for projection in PROJECTIONS:
        if projection.rpartition(".")[2] == short:
            return projection
    raise ValueError(f"unknown projection {short!r}")
