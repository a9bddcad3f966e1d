"""AutoTP: shard an unmodified model's attention, MLP, embedding and output head over tensor parallelism.

``apply_autotp(model, tp_group)`` recognises the projections by name (``autotp_rules``), plans
which heads each rank keeps (``heads.plan_heads``), and replaces the layers in place:

* query/key/value and MLP input projections -> :class:`ColumnParallelLinear` (this rank's heads /
  intermediate features);
* attention output and MLP output projections -> :class:`RowParallelLinear` (all-reduce);
* the token embedding -> :class:`VocabParallelEmbedding`; the output head -> a vocabulary-parallel
  :class:`ColumnParallelLinear` that gathers the logits (so the model's own loss works), sharing the
  embedding's weight when they are tied;
* key/value heads shared by several ranks (grouped-query attention with fewer key/value heads
  than ranks) -> :class:`ReplicatedHeadsLinear`.

The attention module's head-count attributes are set to the local counts. Parameters inside a
sharded block that stay whole (per-head norms such as Qwen3's ``q_norm``) only see this rank's
heads, so their gradients are summed over the group. Layers that match no rule stay replicated,
which is exact (they see replicated activations); an attention module that matches no layout,
or head counts that cannot be split, raise ``ValueError`` naming the module.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepscale.parallel.autotp_rules import (ATTENTION_LAYOUTS, CONFIG_HEAD_ATTRS, CONFIG_KV_ATTRS, GROUP_ATTRS,
                                             KV_HEAD_ATTRS, MLP_LAYOUTS, QUERY_HEAD_ATTRS, SPLIT_WIDTH_ATTRS)
from deepscale.parallel.heads import HeadShard, head_rows, plan_heads
from deepscale.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       tie_column_to_embedding)
from deepscale.parallel.mappings import (allreduce_grad_over, copy_to_region, even_sizes, group_rank,
                                         group_size)


class ReplicatedHeadsLinear(nn.Module):
    """A whole projection kept on every rank, of which this rank uses the output ``rows``.

    Used for key/value heads shared by several tensor-parallel ranks. Each rank's weight
    gradient covers only its rows, so it is summed over the group (rows no rank uses stay 0).
    The parameters keep the original shapes and names.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: List[int], tp_group):
        super().__init__()
        self.tp_group = tp_group
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        for param in (self.weight, self.bias):
            if param is not None:
                allreduce_grad_over(param, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_region(x, self.tp_group)
        bias = None if self.bias is None else self.bias.index_select(0, self.rows)
        return F.linear(x, self.weight.index_select(0, self.rows), bias)


@dataclass
class AutoTPReport:
    """What :func:`apply_autotp` did: module paths per kind of replacement."""

    tp_size: int
    column: List[str] = field(default_factory=list)
    row: List[str] = field(default_factory=list)
    replicated_heads: List[str] = field(default_factory=list)
    vocab: List[str] = field(default_factory=list)
    grad_summed: List[str] = field(default_factory=list)


def _is_dense(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _dense_weight(module) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """``(weight (out, in), bias, layout)``; GPT-2's Conv1D stores the transpose."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, "linear"
    return module.weight.t(), module.bias, "conv1d"


def _first_int(obj, names) -> Optional[int]:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _head_counts(module, config, path) -> Tuple[int, int]:
    heads = _first_int(module, QUERY_HEAD_ATTRS) or _first_int(config, CONFIG_HEAD_ATTRS)
    if heads is None:
        raise ValueError(f"AutoTP: cannot find the head count of attention module '{path}' "
                         f"({type(module).__name__}): it has none of the attributes {QUERY_HEAD_ATTRS} and the "
                         f"model config has none of {CONFIG_HEAD_ATTRS}")
    kv = _first_int(module, KV_HEAD_ATTRS) or _first_int(config, CONFIG_KV_ATTRS) or heads
    return heads, kv


def _match_attention(module):
    for layout in ATTENTION_LAYOUTS:
        if all(_is_dense(getattr(module, n, None)) for n in layout.inputs):
            out = next((n for n in layout.outputs if _is_dense(getattr(module, n, None))), None)
            if out is not None:
                return layout, out
    return None, None


def _match_mlp(module):
    for layout in MLP_LAYOUTS:
        if all(_is_dense(getattr(module, n, None)) for n in layout.inputs + (layout.output,)):
            return layout
    return None


class _Sharder:
    """Replaces the layers of one model; holds the group and the report."""

    def __init__(self, model, tp_group):
        self.model, self.group = model, tp_group
        self.tp, self.rank = group_size(tp_group), group_rank(tp_group)
        self.config = getattr(model, "config", None)
        self.report = AutoTPReport(self.tp)
        self.replaced = set()  # ids of the new layers' parameters

    def _set(self, parent, path, name, new):
        for p in new.parameters():
            self.replaced.add(id(p))
        setattr(parent, name, new)

    def column(self, parent, path, name, rows, sizes, gather=False):
        old = getattr(parent, name)
        weight, bias, layout = _dense_weight(old)
        new = ColumnParallelLinear.from_dense(weight, bias, torch.tensor(rows), sizes, self.group,
                                              gather_output=gather)
        new.dense_layout = layout
        self._set(parent, path, name, new)
        self.report.column.append(f"{path}.{name}" if path else name)

    def row(self, parent, path, name, cols, sizes):
        old = getattr(parent, name)
        weight, bias, layout = _dense_weight(old)
        new = RowParallelLinear.from_dense(weight, bias, torch.tensor(cols), sizes, self.group)
        new.dense_layout = layout
        self._set(parent, path, name, new)
        self.report.row.append(f"{path}.{name}")

    def replicated(self, parent, path, name, rows):
        old = getattr(parent, name)
        weight, bias, layout = _dense_weight(old)
        if layout != "linear":
            raise ValueError(f"AutoTP: '{path}.{name}' is a Conv1D; shared key/value heads need nn.Linear")
        self._set(parent, path, name, ReplicatedHeadsLinear(weight, bias, rows, self.group))
        self.report.replicated_heads.append(f"{path}.{name}")

    def attention(self, module, path, layout, out_name):
        heads, kv = _head_counts(module, self.config, path)
        where = f"AutoTP: attention module '{path}' ({type(module).__name__})"
        plans = plan_heads(heads, kv, self.tp, where)
        mine: HeadShard = plans[self.rank]
        first = getattr(module, layout.inputs[0])
        q_width = _dense_weight(first)[0].shape[0]
        if layout.kind != "separate":
            if kv != heads:
                raise ValueError(f"{where}: a fused '{layout.inputs[0]}' projection with grouped-query attention "
                                 f"({heads} query, {kv} key/value heads) cannot be sharded: its forward splits the "
                                 f"fused output in equal parts")
            q_width //= 3
        head_dim = q_width // heads
        q_sizes = [len(p.q_heads) * head_dim for p in plans]
        q_rows = head_rows(mine.q_heads, head_dim)
        if layout.kind == "separate":
            self.column(module, path, layout.inputs[0], q_rows, q_sizes)
            kv_rows = head_rows(mine.kv_heads, head_dim)
            for name in layout.inputs[1:]:
                if mine.kv_replicated:
                    self.replicated(module, path, name, kv_rows)
                else:
                    self.column(module, path, name, kv_rows, [len(p.kv_heads) * head_dim for p in plans])
        elif layout.kind == "stacked":
            rows = q_rows + [q_width + r for r in q_rows] + [2 * q_width + r for r in q_rows]
            self.column(module, path, layout.inputs[0], rows, [3 * s for s in q_sizes])
        else:  # interleaved: head h owns rows [3 h d, 3 (h + 1) d)
            rows = head_rows(mine.q_heads, 3 * head_dim)
            self.column(module, path, layout.inputs[0], rows, [3 * s for s in q_sizes])
        self.row(module, path, out_name, q_rows, q_sizes)
        self._set_local_counts(module, mine, head_dim)

    def _set_local_counts(self, module, mine: HeadShard, head_dim: int) -> None:
        for names, value in ((QUERY_HEAD_ATTRS, len(mine.q_heads)), (KV_HEAD_ATTRS, len(mine.kv_heads)),
                             (GROUP_ATTRS, mine.groups), (SPLIT_WIDTH_ATTRS, len(mine.q_heads) * head_dim)):
            for name in names:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, value)

    def mlp(self, module, path, layout):
        width = _dense_weight(getattr(module, layout.inputs[0]))[0].shape[0] // layout.stacked
        try:
            sizes = even_sizes(width, self.tp)
        except ValueError as err:
            raise ValueError(f"AutoTP: MLP module '{path}' ({type(module).__name__}): {err}") from None
        start = sum(sizes[:self.rank])
        rows = list(range(start, start + sizes[self.rank]))
        for name in layout.inputs:
            stacked_rows = [b * width + r for b in range(layout.stacked) for r in rows]
            self.column(module, path, name, stacked_rows, [layout.stacked * s for s in sizes])
        self.row(module, path, layout.output, rows, sizes)

    def sum_leftover_grads(self, module, path):
        """Parameters of a sharded attention module that stay whole (per-head norms) see this rank's heads only."""
        for name, param in module.named_parameters():
            if id(param) not in self.replaced and param.requires_grad:
                allreduce_grad_over(param, self.group)
                self.report.grad_summed.append(f"{path}.{name}")


def _parent_and_name(model, target) -> Tuple[nn.Module, str, str]:
    for path, module in model.named_modules():
        for name, child in module.named_children():
            if child is target:
                return module, path, name
    raise ValueError("AutoTP: module not found in the model")


def _embeddings(model):
    """``(input embedding, output head)`` of a causal LM, either may be None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and isinstance(getattr(model, "lm_head", None), nn.Linear):
        head = model.lm_head
    if emb is None and head is not None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is head.weight), None)
    if not isinstance(emb, nn.Embedding) or type(emb) is not nn.Embedding and type(emb).forward is not \
            nn.Embedding.forward:
        emb = None  # scaled or offset embeddings keep their own forward: leave them replicated
    if not isinstance(head, nn.Linear):
        head = None
    return emb, head


def _shard_vocab(sharder: _Sharder, emb, head) -> None:
    tied = emb is not None and head is not None and head.weight is emb.weight
    new_emb = None
    if emb is not None:
        parent, path, name = _parent_and_name(sharder.model, emb)
        new_emb = VocabParallelEmbedding.from_dense(emb, sharder.group)
        sharder._set(parent, path, name, new_emb)
        sharder.report.vocab.append(f"{path}.{name}" if path else name)
    if head is None:
        return
    parent, path, name = _parent_and_name(sharder.model, head)
    if tied:
        new_head = tie_column_to_embedding(new_emb, head.bias, gather_output=True)
        new_head.dense_layout = "linear"
        sharder._set(parent, path, name, new_head)
        sharder.report.vocab.append(f"{path}.{name}" if path else name)
    else:
        sizes = even_sizes(head.out_features, sharder.tp)
        start = sum(sizes[:sharder.rank])
        sharder.column(parent, path, name, list(range(start, start + sizes[sharder.rank])), sizes, gather=True)


def apply_autotp(model: nn.Module, tp_group=None, shard_vocab: bool = True) -> AutoTPReport:
    """Shard ``model`` in place over ``tp_group`` (None: the default group) and return a report.

    Every rank must call it with the same model (same weights: seed or broadcast first). The
    model's forward is unchanged: with the output head gathering the logits it returns what the
    unsharded model returns.

    Args:
        model: a causal LM (Hugging Face ``PreTrainedModel`` or any module with recognised
            attention/MLP children).
        tp_group: the tensor-parallel process group. Default None (the default group).
        shard_vocab: also shard the token embedding and output head over the vocabulary. Default True.

    Raises:
        ValueError: an attention module matches no known layout, its heads cannot be split, or
            nothing in the model can be sharded.
    """
    sharder = _Sharder(model, tp_group)
    if sharder.tp == 1:
        return sharder.report
    emb, head = _embeddings(model) if shard_vocab else (None, None)
    blocks = []
    for path, module in list(model.named_modules()):
        layout, out_name = _match_attention(module)
        if layout is not None:
            blocks.append(("attention", path, module, (layout, out_name)))
            continue
        mlp = _match_mlp(module)
        if mlp is not None:
            blocks.append(("mlp", path, module, mlp))
        elif "attention" in type(module).__name__.lower() and any(_is_dense(c) for c in module.children()):
            names = [n for n, c in module.named_children() if _is_dense(c)]
            raise ValueError(f"AutoTP: cannot shard attention module '{path}' ({type(module).__name__}): its "
                             f"projections {names} match no known layout (separate q_proj/k_proj/v_proj, fused "
                             f"c_attn/qkv or query_key_value); shard it by hand with ColumnParallelLinear and "
                             f"RowParallelLinear, or set tensor_parallel.autotp_size to 1")
    if not blocks:
        raise ValueError(f"AutoTP: found no attention or MLP projections to shard in {type(model).__name__}; "
                         "AutoTP recognises the layer names listed in deepscale/parallel/autotp_rules.py")
    for kind, path, module, layout in blocks:
        if kind == "attention":
            sharder.attention(module, path, *layout)
            sharder.sum_leftover_grads(module, path)
        else:
            # No leftover rule here: an "MLP" match may be a whole decoder layer (OPT keeps fc1/fc2
            # next to its norms), whose other parameters see replicated activations.
            sharder.mlp(module, path, layout)
    _shard_vocab(sharder, emb, head)
    model._deepscale_autotp = sharder.report
    return sharder.report
