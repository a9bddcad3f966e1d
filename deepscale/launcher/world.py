"""The job's layout: which hosts run how many ranks, and the rank arithmetic.

The runner encodes it once (url-safe base64 JSON, safe to put on any command line) and
every per-node launcher decodes the same value, so all nodes agree on global ranks.
"""
import base64
import json
from dataclasses import dataclass
from typing import Dict, List


@dataclass
class WorldInfo:
    """Ordered hosts and the slot ids (device indices) each one runs.

    Args:
        hosts: host names in node-rank order (node 0 holds global rank 0).
        slots: ``host -> list of slot ids``; one rank per slot.
    """
    hosts: List[str]
    slots: Dict[str, List[int]]

    @classmethod
    def from_resources(cls, active: Dict[str, List[int]]) -> "WorldInfo":
        """Build from an ordered ``host -> slot ids`` mapping."""
        return cls(hosts=list(active), slots={h: list(s) for h, s in active.items()})

    @property
    def num_nodes(self) -> int:
        """Number of hosts."""
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        """Number of ranks on all hosts."""
        return sum(len(self.slots[h]) for h in self.hosts)

    def local_size(self, node_rank: int) -> int:
        """Number of ranks on node ``node_rank``."""
        return len(self.slots[self.host(node_rank)])

    def host(self, node_rank: int) -> str:
        """The host name of node ``node_rank``."""
        if not 0 <= node_rank < self.num_nodes:
            raise ValueError(f"node_rank {node_rank} is out of range for {self.num_nodes} node(s)")
        return self.hosts[node_rank]

    def first_rank(self, node_rank: int) -> int:
        """Global rank of local rank 0 on node ``node_rank``."""
        return sum(len(self.slots[h]) for h in self.hosts[:node_rank])

    def global_ranks(self, node_rank: int) -> List[int]:
        """Global ranks run by node ``node_rank``, in local-rank order."""
        start = self.first_rank(node_rank)
        return list(range(start, start + self.local_size(node_rank)))

    def node_of_rank(self, rank: int) -> int:
        """The node rank that runs global ``rank``."""
        for node_rank in range(self.num_nodes):
            if rank < self.first_rank(node_rank) + self.local_size(node_rank):
                return node_rank
        raise ValueError(f"rank {rank} is out of range for world size {self.world_size}")

    def encode(self) -> str:
        """Url-safe base64 JSON of this layout."""
        payload = json.dumps({"hosts": self.hosts, "slots": self.slots}, separators=(",", ":"))
        return base64.urlsafe_b64encode(payload.encode("utf-8")).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> "WorldInfo":
        """Inverse of :meth:`encode`; raises ValueError on anything else."""
        try:
            payload = json.loads(base64.urlsafe_b64decode(text.encode("ascii")).decode("utf-8"))
            hosts = [str(h) for h in payload["hosts"]]
            slots = {str(h): [int(s) for s in v] for h, v in payload["slots"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"--world_info is not a valid encoded world description: {err}") from err
        if set(hosts) != set(slots) or len(set(hosts)) != len(hosts):
            raise ValueError("--world_info: hosts and slots do not match")
        return cls(hosts=hosts, slots=slots)
