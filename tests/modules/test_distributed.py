"""The fused model under PyTorch distributed: FSDP2, the distributed state-dict API (DSD)
and distributed checkpointing (DCP). The reference fails here (torchtune issue 2277):
parameter names inside its wrappers differ from the state-dict keys."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from fusesurgery.config import DecoderConfig, FusionConfig, VisionEncoderConfig
from fusesurgery.modules import FusionEmbedding, FusionLayer, build_decoder, build_deep_fusion_model

DECODER = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_dim=64, max_seq_len=32)
VISION = VisionEncoderConfig(image_size=8, patch_size=4, embed_dim=16, num_layers=1,
                             num_heads=2, intermediate_dim=32)
FUSION = FusionConfig.every(2, DECODER.num_layers, encoder_dim=DECODER.embed_dim,
                            fusion_vocab_size=2)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(seed: int):
    torch.manual_seed(seed)
    return build_deep_fusion_model(DECODER, VISION, FUSION)


def _run(rank: int, world_size: int, workdir: str) -> None:
    from torch.distributed.checkpoint import load, save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                            world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))

        def sharded(seed):
            model = build(seed)
            for layer in model.decoder.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model

        reference = build(0)
        model = sharded(0)
        keys = set(reference.state_dict())
        assert set(get_model_state_dict(model)) == keys
        full = get_model_state_dict(model, options=FULL)  # gathered on rank 0 only
        if rank == 0:
            assert set(full) == keys
            for key, value in reference.state_dict().items():
                assert torch.equal(full[key], value), key

        # An unwrapped decoder checkpoint plus fusion params loads through DSD.
        torch.manual_seed(7)
        decoder_ckpt = build_decoder(DECODER).state_dict()
        fusion_only = {k: v for k, v in build(8).state_dict().items()
                       if ".fusion_" in k or k.startswith("encoder.")}
        checkpoint = {f"decoder.{k}": v for k, v in decoder_ckpt.items()} | fusion_only
        assert set(checkpoint) == keys
        expected = {k: v.clone() for k, v in checkpoint.items()}  # DSD shards it in place
        set_model_state_dict(model, checkpoint, options=StateDictOptions(full_state_dict=True))
        loaded = get_model_state_dict(model, options=FULL)
        if rank == 0:
            for key, value in expected.items():
                assert torch.equal(loaded[key], value), key

        # DCP round trip into a differently initialised sharded model is bitwise.
        save(get_model_state_dict(model), checkpoint_id=f"{workdir}/dcp")
        other = sharded(123)
        state = get_model_state_dict(other)
        load(state, checkpoint_id=f"{workdir}/dcp")
        set_model_state_dict(other, state)
        reloaded = get_model_state_dict(other, options=FULL)
        if rank == 0:
            for key, value in loaded.items():
                assert torch.equal(reloaded[key], value), key
        dist.barrier()
    except BaseException:
        # spawn's error forwarding keeps only the message; keep the whole story
        with open(f"{workdir}/error-{rank}.txt", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_dsd_and_dcp_round_trip(tmp_path, monkeypatch):
    # the workers' threads, for this test only: a later test's subprocess must not inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        mp.spawn(_run, args=(2, str(tmp_path)), nprocs=2, join=True)
    except Exception:
        errors = "\n".join(p.read_text() for p in tmp_path.glob("error-*.txt"))
        pytest.fail(f"distributed run failed:\n{errors}")


def test_dsd_keys_need_the_fqn_modifiers(monkeypatch):
    """Without the modifiers (the reference), DSD cannot even list the model's keys."""
    model = build(0)
    assert set(get_model_state_dict(model)) == set(model.state_dict())
    set_model_state_dict(model, model.state_dict())
    monkeypatch.delattr(FusionLayer, "_fqn_modifiers")
    monkeypatch.delattr(FusionEmbedding, "_fqn_modifiers")
    with pytest.raises(AttributeError):
        get_model_state_dict(build(0))
