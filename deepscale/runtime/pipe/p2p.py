"""Point-to-point transfers between pipeline stages: any nesting of tensors and plain values.

Note: the wire protocol. Every message on a link (source stage, destination virtual stage,
activation or gradient) starts with a 2-element int64 header ``[meta_changed, meta_bytes]``.
The *meta* describes the structure: the tuples, lists and dicts, each tensor's shape, dtype and
``requires_grad``, and every non-tensor value (masks given as Python bools, a layer count...). It
is pickled and sent only when it differs from the last one sent on that link, so shapes are
negotiated once and again only when they change (a shorter last batch, a new sequence length);
otherwise the message is the header and the raw tensors. Receivers rebuild the structure with
fresh tensors; floating tensors that required grad on the sender require grad on the receiver,
so tensors that do not (masks, position ids) cross without user annotations.

Sends are posted asynchronously and complete later (:meth:`PipeChannel.wait_sends`), so a
sender never blocks; receives block. Each message gets its own tag (kind, micro-batch and
destination virtual stage), which is what gloo matches on; NCCL matches in issue order, which
the schedule simulator checks (``strict_pair_order``).
"""
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

from deepscale import comm as dist

_KIND_CODE = {"act": 0, "grad": 1}


@dataclass(frozen=True)
class TensorMeta:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def flatten(obj) -> Tuple[Any, List[torch.Tensor]]:
    """``(meta, tensors)``: the structure of ``obj`` with tensors replaced by :class:`TensorMeta`."""
    tensors: List[torch.Tensor] = []

    def walk(x):
        if torch.is_tensor(x):
            tensors.append(x)
            return TensorMeta(tuple(x.shape), x.dtype, bool(x.requires_grad and x.is_floating_point()))
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return ("tuple", [walk(v) for v in x])
        if isinstance(x, list):
            return ("list", [walk(v) for v in x])
        if isinstance(x, dict):
            return ("dict", [(k, walk(v)) for k, v in x.items()])
        return ("value", x)

    return walk(obj), tensors


def unflatten(meta, tensors: List[torch.Tensor]):
    """Rebuild the object of :func:`flatten` from its meta and (new) tensors, in order."""
    it = iter(tensors)

    def walk(m):
        if isinstance(m, TensorMeta):
            return next(it)
        kind, body = m
        if kind == "tuple":
            return tuple(walk(v) for v in body)
        if kind == "list":
            return [walk(v) for v in body]
        if kind == "dict":
            return {k: walk(v) for k, v in body}
        return body

    return walk(meta)


def tensor_metas(meta) -> List[TensorMeta]:
    """The :class:`TensorMeta` leaves of a meta, in order."""
    out: List[TensorMeta] = []

    def walk(m):
        if isinstance(m, TensorMeta):
            out.append(m)
            return
        kind, body = m
        if kind in ("tuple", "list"):
            for v in body:
                walk(v)
        elif kind == "dict":
            for _, v in body:
                walk(v)

    walk(meta)
    return out


class PipeChannel:
    """Sends and receives pipeline messages of one rank.

    Args:
        stage: this rank's pipeline stage.
        rank_of_stage: pipeline stage -> global rank of the peer (same data/tensor coordinates).
        device: where received tensors are allocated.
        num_virtual_stages: model chunks per stage (tags name the destination virtual stage).
    """

    def __init__(self, stage: int, rank_of_stage: Callable[[int], int], device, num_virtual_stages: int):
        self.stage = stage
        self.rank_of_stage = rank_of_stage
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_virtual_stages = num_virtual_stages
        self._sent_meta: Dict[Tuple, bytes] = {}
        self._recv_meta: Dict[Tuple, Any] = {}
        self._inflight: List[Tuple[Any, Any]] = []  # (work, tensor kept alive until sent)
        self._local: Dict[Tuple, Any] = {}
        self.meta_exchanges = 0  # how many times a structure was (re)negotiated, for tests and reports

    def _tag(self, kind: str, micro_batch: int, dest_vs: int, part: int) -> int:
        # part: 0 header, 1 meta, 2+ tensors. Unique per message and piece within a batch.
        return (((micro_batch * self.num_virtual_stages + dest_vs) * 2 + _KIND_CODE[kind]) * 1024) + part

    # --- send -------------------------------------------------------------------------------
    def send(self, obj, peer_stage: int, kind: str, micro_batch: int, dest_vs: int) -> None:
        """Post the sends of ``obj`` to ``peer_stage`` (never blocks)."""
        link = (peer_stage, kind, dest_vs)
        if peer_stage == self.stage:
            self._local[(kind, micro_batch, dest_vs)] = obj
            return
        meta, tensors = flatten(obj)
        packed = pickle.dumps(meta)
        changed = self._sent_meta.get(link) != packed
        dst = self.rank_of_stage(peer_stage)
        header = torch.tensor([int(changed), len(packed) if changed else 0], dtype=torch.int64, device=self.device)
        self._post(header, dst, self._tag(kind, micro_batch, dest_vs, 0))
        if changed:
            self._sent_meta[link] = packed
            payload = torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(self.device)
            self._post(payload, dst, self._tag(kind, micro_batch, dest_vs, 1))
        for index, tensor in enumerate(tensors):
            self._post(tensor.detach().contiguous(), dst, self._tag(kind, micro_batch, dest_vs, 2 + index))

    def _post(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self._inflight.append((dist.isend(tensor, dst, tag=tag), tensor))

    def wait_sends(self) -> None:
        """Complete every posted send (their buffers may then be reused)."""
        for work, _ in self._inflight:
            if work is not None:
                work.wait()
        self._inflight = []

    # --- receive ------------------------------------------------------------------------------
    def recv(self, peer_stage: int, kind: str, micro_batch: int, my_vs: int):
        """Block until the message for ``(kind, micro_batch, my_vs)`` from ``peer_stage`` arrives."""
        if peer_stage == self.stage:
            obj = self._local.pop((kind, micro_batch, my_vs))
            meta, tensors = flatten(obj)
            fresh = [t.detach().requires_grad_(m.requires_grad) if kind == "act" else t.detach()
                     for t, m in zip(tensors, tensor_metas(meta))]
            return unflatten(meta, fresh)
        link = (peer_stage, kind, my_vs)
        src = self.rank_of_stage(peer_stage)
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        self._wait_recv(header, src, self._tag(kind, micro_batch, my_vs, 0))
        changed, size = int(header[0]), int(header[1])
        if changed:
            payload = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._wait_recv(payload, src, self._tag(kind, micro_batch, my_vs, 1))
            self._recv_meta[link] = pickle.loads(payload.cpu().numpy().tobytes())
            self.meta_exchanges += 1
        meta = self._recv_meta.get(link)
        if meta is None:
            raise RuntimeError(f"pipeline stage {self.stage}: a {kind} message from stage {peer_stage} came without "
                               "its structure; the stages run different schedules or step counts")
        tensors = []
        for index, tm in enumerate(tensor_metas(meta)):
            t = torch.empty(tm.shape, dtype=tm.dtype, device=self.device)
            self._wait_recv(t, src, self._tag(kind, micro_batch, my_vs, 2 + index))
            if kind == "act" and tm.requires_grad:
                t.requires_grad_(True)
            tensors.append(t)
        return unflatten(meta, tensors)

    @staticmethod
    def _wait_recv(tensor: torch.Tensor, src: int, tag: int) -> None:
        work = dist.irecv(tensor, src, tag=tag)
        if work is not None:
            work.wait()
