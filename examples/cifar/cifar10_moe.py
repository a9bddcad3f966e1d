"""CIFAR-10 classifier with a mixture-of-experts layer, trained by the deepscale engine.

The command line follows DeepSpeed's CIFAR tutorial (``--moe``, ``--ep-world-size``,
``--num-experts``, ``--top-k``, ``--mlp-type residual``, ``--moe-param-group``, ...), so its run
scripts work with the launcher name changed:

    deepscale --num_procs 4 examples/cifar/cifar10_moe.py --moe --ep-world-size 2 --num-experts 4 \
        --top-k 2 --mlp-type residual --moe-param-group --steps 40

CIFAR-10 is read with torchvision when it is installed and ``--data-dir`` holds (or may download)
the dataset; otherwise, or with ``--synthetic``, a CIFAR-shaped synthetic set is used (32x32 RGB
images whose class is a fixed random colour pattern plus noise), so the example runs offline.
"""
import argparse
import os
import sys
from pathlib import Path

try:
    import deepscale
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import deepscale
import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="CIFAR-10 with a mixture-of-experts layer")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch per rank")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--stage", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage")
    parser.add_argument("--moe", action="store_true", help="use a mixture-of-experts layer")
    parser.add_argument("--ep-world-size", type=int, default=1, help="expert-parallel degree")
    parser.add_argument("--num-experts", type=int, nargs="+", default=[1], help="experts of each MoE layer")
    parser.add_argument("--mlp-type", choices=["standard", "residual"], default="standard",
                        help="residual: PR-MoE (a dense MLP mixed with the experts)")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--min-capacity", type=int, default=0)
    parser.add_argument("--noisy-gate-policy", default=None, choices=[None, "Jitter", "RSample"])
    parser.add_argument("--moe-param-group", action="store_true",
                        help="expert parameters in optimizer param groups of their own")
    parser.add_argument("--dropless", action="store_true", help="no capacity: every token reaches its experts")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--synthetic", action="store_true", help="use synthetic CIFAR-shaped data")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--num-samples", type=int, default=2048, help="synthetic set size")
    parser = deepscale.add_config_arguments(parser)
    return parser.parse_args(argv)


class SyntheticCIFAR(torch.utils.data.Dataset):
    """CIFAR-shaped images whose label is a fixed random pattern plus noise (learnable offline)."""

    def __init__(self, num_samples: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(10, 3, 32, 32, generator=gen)
        self.labels = torch.randint(0, 10, (num_samples,), generator=gen)
        self.noise = torch.randn(num_samples, 3, 32, 32, generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        label = int(self.labels[index])
        return 0.5 * self.patterns[label] + self.noise[index], label


def dataset(args):
    if not args.synthetic:
        try:
            import torchvision
            import torchvision.transforms as T
            transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
            return torchvision.datasets.CIFAR10(root=args.data_dir, train=True, download=True, transform=transform)
        except Exception as exc:  # no torchvision, or no network to download
            print(f"CIFAR-10 unavailable ({type(exc).__name__}: {exc}); using synthetic data")
    return SyntheticCIFAR(args.num_samples)


class Net(nn.Module):
    """LeNet-style CNN; with ``--moe`` the classifier's hidden layer is a stack of MoE layers."""

    def __init__(self, args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.moe = args.moe
        if args.moe:
            self.moe_layers = nn.ModuleList([
                deepscale.moe.layer.MoE(hidden_size=84, expert=nn.Linear(84, 84), num_experts=n,
                                        ep_size=args.ep_world_size, use_residual=args.mlp_type == "residual",
                                        k=args.top_k, min_capacity=args.min_capacity,
                                        noisy_gate_policy=args.noisy_gate_policy, drop_tokens=not args.dropless)
                for n in args.num_experts])
            self.fc4 = nn.Linear(84, 10)
        else:
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        aux = x.new_zeros(())
        if not self.moe:
            return self.fc3(x), aux
        for layer in self.moe_layers:
            x, l_aux, _ = layer(x)
            aux = aux + l_aux
        return self.fc4(x), aux


def ds_config(args):
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "steps_per_print": 10 ** 9,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.8, 0.999], "eps": 1e-8}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                      "warmup_num_steps": 20}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
    }
    if args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif args.dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 15}
    return config


def main(argv=None):
    args = parse_args(argv)
    deepscale.init_distributed()
    torch.manual_seed(1234)
    net = Net(args)
    parameters = [p for p in net.parameters() if p.requires_grad]
    if args.moe_param_group:
        from deepscale.moe.utils import split_params_into_different_moe_groups_for_optimizer
        parameters = split_params_into_different_moe_groups_for_optimizer({"params": parameters, "name": "parameters"})
    config = None if getattr(args, "deepspeed_config", None) else ds_config(args)
    engine, _, loader, _ = deepscale.initialize(args=args, model=net, model_parameters=parameters,
                                                training_data=dataset(args), config=config)
    rank = deepscale.comm.get_rank()
    criterion = nn.CrossEntropyLoss()
    step, first, last = 0, None, None
    for epoch in range(args.epochs):
        for images, labels in loader:
            images = images.to(engine.device)
            labels = labels.to(engine.device)
            outputs, aux = engine(images)
            loss = criterion(outputs.float(), labels) + args.aux_loss_coef * aux.float()
            engine.backward(loss)
            engine.step()
            step += 1
            value = loss.item()
            first = value if first is None else first
            last = value
            if rank == 0 and step % args.log_interval == 0:
                print(f"epoch {epoch} step {step} loss {value:.4f}", flush=True)
            if args.steps and step >= args.steps:
                break
        if args.steps and step >= args.steps:
            break
    if rank == 0:
        print(f"done: {step} steps, loss {first:.4f} -> {last:.4f}", flush=True)
    # an orderly teardown while the interpreter is alive (gloo's threads otherwise stop at exit)
    engine.destroy()
    deepscale.comm.destroy_process_group()


if __name__ == "__main__":
    main()
