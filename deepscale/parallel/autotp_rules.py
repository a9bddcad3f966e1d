"""AutoTP's knowledge of model layouts: which child modules are which projections (data only).

Each attention layout names the children that project the input to queries/keys/values and
the child that projects the heads back; each MLP layout names the input projections (sharded
by output rows) and the output projection (sharded by input columns). A module matches a layout
when it has all the named children and each is an ``nn.Linear`` or a GPT-2 style ``Conv1D``.

Attention kinds:

* ``separate``: ``q``, ``k`` and ``v`` are three layers (Llama, Mistral, Qwen2/3, OPT, Phi);
  grouped-query attention allowed.
* ``stacked``: one layer whose outputs are ``[all queries; all keys; all values]`` (GPT-2's
  ``c_attn``, deepscale's example GPT); the module splits them equally, so only plain multi-head
  attention.
* ``interleaved``: one layer whose outputs are ``[q, k, v]`` of head 0, then of head 1, ...
  (GPT-NeoX ``query_key_value``).
"""
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class AttentionLayout:
    kind: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]  # candidates for the output projection, first present wins


@dataclass(frozen=True)
class MLPLayout:
    inputs: Tuple[str, ...]
    output: str
    stacked: int = 1  # >1: one input layer holding this many equal blocks (e.g. fused gate/up)


ATTENTION_LAYOUTS = (
    AttentionLayout("separate", ("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj", "dense")),
    AttentionLayout("stacked", ("c_attn",), ("c_proj",)),
    AttentionLayout("stacked", ("qkv",), ("proj", "out_proj")),
    AttentionLayout("interleaved", ("query_key_value",), ("dense",)),
)

MLP_LAYOUTS = (
    MLPLayout(("gate_proj", "up_proj"), "down_proj"),
    MLPLayout(("gate_up_proj",), "down_proj", stacked=2),
    MLPLayout(("w1", "w3"), "w2"),
    MLPLayout(("fc1",), "fc2"),
    MLPLayout(("c_fc",), "c_proj"),
    MLPLayout(("dense_h_to_4h",), "dense_4h_to_h"),
    MLPLayout(("fc",), "proj"),
)

# Attribute names attention modules use for their head counts (set to the local counts after sharding).
QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")
GROUP_ATTRS = ("num_key_value_groups",)
# Widths a forward splits fused outputs by (GPT-2's ``split_size``): set to the local query width.
SPLIT_WIDTH_ATTRS = ("split_size",)

CONFIG_HEAD_ATTRS = ("num_attention_heads", "n_head", "num_heads")
CONFIG_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
