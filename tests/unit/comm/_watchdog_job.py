"""One rank of the watchdog tests: rank 1 skips the step-2 all-reduce (for a while, or for good).

Usage: python _watchdog_job.py log|abort   (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
Prints ``REPORTS <json>`` (the watchdog's reports) on ranks that finish.
"""
import json
import sys
import time

import torch

import deepscale.comm as dist


def main() -> None:
    mode = sys.argv[1]
    dist.init_distributed(dist_backend="gloo", verbose=False)
    watchdog = dist.configure_watchdog(timeout_s=1.5, action=mode, poll_s=0.1)
    x = torch.ones(4)
    dist.set_training_step(1)
    with dist.collective_label("gradient all-reduce"):
        dist.all_reduce(x)
    dist.set_training_step(2)
    if dist.get_rank() == 1:
        time.sleep(5.0 if mode == "log" else 120.0)  # rank 1 skips the step-2 all-reduce
        if mode == "abort":
            return
    else:
        print(f"WAITING {time.time()}", flush=True)
    with dist.collective_label("gradient all-reduce"):
        dist.all_reduce(x)
    print("REPORTS " + json.dumps(watchdog.reports), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
