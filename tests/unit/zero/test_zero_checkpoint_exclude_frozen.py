"""save_checkpoint(exclude_frozen_parameters=True) at ZeRO stages 0-3: frozen weights are left out
of the saved module state, and loading keeps the loading model's own frozen weights. Also
load_state_dict_from_zero_checkpoint keeping the model's dtype, and zero_to_fp32's CLI errors."""
import os

import pytest
import torch

from dist_harness import run_distributed

WORLD = 2
FROZEN = ("layers.0.weight", "layers.0.bias")  # TinyNet(frozen=True) freezes the first layer


def _full_params(engine):
    import deepscale.zero
    with deepscale.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def _save_and_reload(ckpt_root):
    import torch.distributed as dist
    from _zero_test_helpers import build_engine, train
    from deepscale.utils.zero_to_fp32 import MODEL_STATES_FILE, load_state_dict_from_zero_checkpoint
    from engine_test_models import make_model
    out = {}
    for stage in (0, 1, 2, 3):
        ckpt_dir = os.path.join(ckpt_root, f"stage{stage}")
        engine = build_engine(stage, WORLD, model_kwargs={"frozen": True}, seed=1)
        train(engine, WORLD, range(2))
        engine.save_checkpoint(ckpt_dir, tag="t", exclude_frozen_parameters=True)
        saved_params = _full_params(engine)
        engine.destroy()
        dist.barrier()
        saved = torch.load(os.path.join(ckpt_dir, "t", MODEL_STATES_FILE), weights_only=False)

        fresh = build_engine(stage, WORLD, model_kwargs={"frozen": True}, seed=7)  # other frozen values
        own_frozen = {n: v for n, v in _full_params(fresh).items() if n in FROZEN}
        path, _ = fresh.load_checkpoint(ckpt_dir, tag="t")
        loaded = _full_params(fresh)
        train(fresh, WORLD, range(2, 3))  # it still trains after loading
        fresh.destroy()
        offline = load_state_dict_from_zero_checkpoint(make_model(seed=7, frozen=True), ckpt_dir, tag="t")
        offline_bf16 = load_state_dict_from_zero_checkpoint(make_model(seed=7, frozen=True).to(torch.bfloat16),
                                                            ckpt_dir, tag="t")
        out[stage] = dict(module_keys=sorted(saved["module"]), excluded=saved["excluded_frozen_param_names"],
                          saved_params=saved_params, own_frozen=own_frozen, loaded=loaded, path=path,
                          offline={n: p.detach().clone() for n, p in offline.named_parameters()},
                          offline_bf16={n: p.detach().clone() for n, p in offline_bf16.named_parameters()})
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_save_and_reload, WORLD, args=(str(tmp_path_factory.mktemp("ckpt")),), timeout=240)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_frozen_parameters_are_left_out_and_kept_on_load(results, stage):
    for rank_result in results:
        r = rank_result[stage]
        assert not set(FROZEN) & set(r["module_keys"]) and "layers.1.weight" in r["module_keys"]
        assert sorted(r["excluded"]) == sorted(FROZEN)
        assert r["path"] is not None
        for name, value in r["loaded"].items():
            if name in FROZEN:
                assert torch.equal(value, r["own_frozen"][name]), name  # the loading model's own weights
                assert not torch.equal(value, r["saved_params"][name]), name  # (which really differ)
            else:
                assert torch.equal(value, r["saved_params"][name]), name
        for name, value in r["offline"].items():
            want = r["own_frozen"][name] if name in FROZEN else r["saved_params"][name]
            torch.testing.assert_close(value.float(), want, rtol=0, atol=0, msg=name)


def test_load_state_dict_from_zero_checkpoint_keeps_the_model_dtype(results):
    r = results[0][2]
    for name, value in r["offline_bf16"].items():
        assert value.dtype == torch.bfloat16, name
        want = r["own_frozen"][name] if name in FROZEN else r["saved_params"][name]
        assert torch.equal(value, want.to(torch.bfloat16)), name


def test_zero_to_fp32_errors_name_the_cli_flags(tmp_path, capsys):
    from deepscale.utils.zero_to_fp32 import main
    assert main([str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert "--tag TAG on the command line" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "out.pt"), "--tag", "nope"]) == 2
    assert "--tag TAG" in capsys.readouterr().err
