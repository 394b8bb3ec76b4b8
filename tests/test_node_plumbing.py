"""Each node hands every widget value to the engine: a node called with values other than its defaults gives the
engine those values (a value dropped, swapped or replaced by its default would pass the tests that use defaults)."""
import itertools
import types

import pytest
import torch
from fixtures import motion_model, motion_modules
from kinema.models import pipelines
from kinema.models.context import ContextOptions
from kinema.nodes import host


def test_context_options_node_passes_every_setting():
    from kinema.nodes.context import KinemaContextOptions

    (opts,) = KinemaContextOptions().build(16, 4, "uniform_looped", 2, "gauss", False)
    assert opts == ContextOptions(context_length=16, overlap=4, stride=2, schedule="uniform_looped", fuse="gauss",
                                  freenoise=False)


def test_video_sampler_node_passes_every_setting(monkeypatch, host_dirs):
    from kinema.nodes.sampler import KinemaVideoSampler

    seen = []

    def spy(model, positive, negative, latent, opts, **kwargs):
        seen.append(opts)
        return torch.zeros_like(latent)

    monkeypatch.setattr(pipelines, "sample_video", spy)
    context = ContextOptions(context_length=8, overlap=2)
    text = [[torch.zeros(1, 77, 64), {}]]
    latent = {"samples": torch.zeros(12, 4, 8, 8), "batch_index": list(range(3, 15))}
    KinemaVideoSampler().sample(motion_model("v2"), text, text, latent, 2**40 + 1234, 7, 4.5, "euler_ancestral",
                                "karras", 0.6, attention_chunk=64, context_options=context, batch_cond=False)
    (opts,) = seen
    assert (opts.seed, opts.steps, opts.cfg, opts.sampler, opts.scheduler, opts.denoise) == \
        (2**40 + 1234, 7, 4.5, "euler_ancestral", "karras", 0.6)  # a seed of 64 bits, whole
    assert (opts.attn_chunk, opts.batch_cond, opts.context) == (64, False, context)
    assert tuple(opts.batch_index) == tuple(range(3, 15))  # the frames of core Latent From Batch keep their noise


def test_apply_motion_module_node_passes_scale_and_schedule():
    from kinema.nodes.animatediff import KinemaApplyMotionModule

    base = motion_model(None)
    (model,) = KinemaApplyMotionModule().apply(base, motion_modules("v2"), 0.5, "scaled_linear", "")
    assert model.scale == 0.5 and model.beta_schedule == "scaled_linear"
    (model,) = KinemaApplyMotionModule().apply(base, motion_modules("v2"), 0.5, "linear", "1.0, 0.5")
    assert model.scale == (1.0, 0.5) and model.beta_schedule == "linear"  # per frame wins over the one scale


def test_compile_nodes_pass_backend_and_mode():
    from kinema.nodes.compiling import KinemaCompileModel, KinemaCompileVAE

    (model,) = KinemaCompileModel().apply(motion_model("v2"), "eager", "default")
    assert (model.compile.backend, model.compile.mode) == ("eager", "default")
    (model,) = KinemaCompileModel().apply(motion_model("v2"), "inductor", "max-autotune-no-cudagraphs")
    assert (model.compile.backend, model.compile.mode) == ("inductor", "max-autotune-no-cudagraphs")
    from fixtures import vae

    (compiled,) = KinemaCompileVAE().apply(vae(), "inductor", "max-autotune-no-cudagraphs")
    found = [v for v in vars(compiled).values() if getattr(v, "mode", None) == "max-autotune-no-cudagraphs"]
    assert found and found[0].backend == "inductor"


@pytest.mark.parametrize("state, resident, batch_cond, most", [("LOW_VRAM", 1, True, 2), ("NO_VRAM", 1, False, 1)])
def test_memory_policy_auto_keeps_to_comfyuis_vram_mode(monkeypatch, state, resident, batch_cond, most):
    """offload auto under --lowvram: block offload with the node's resident blocks where fewer than the mode's;
    under --novram cond and uncond one after the other whatever the node says (its default is batched)."""
    from kinema.nodes.memory import KinemaMemoryPolicy

    monkeypatch.setattr(host, "_comfy_mm", types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cuda"), vram_state=types.SimpleNamespace(name=state),
        interrupt_current_processing=lambda value=True: None))
    monkeypatch.setattr(host, "_comfy_args", types.SimpleNamespace())
    (model,) = KinemaMemoryPolicy().apply(motion_model("v2"), "auto", 1, 0, True)
    assert model.offload.mode == "block" and model.offload.resident == resident
    assert model.offload.batch_cond is batch_cond
    (model,) = KinemaMemoryPolicy().apply(motion_model("v2"), "auto", 3, 0, True)
    assert model.offload.resident == most  # never more blocks than the mode keeps


def test_memory_policy_moves_the_video_model_to_where_it_rests(monkeypatch):
    """Applied, the policy puts the UNet and motion module where they wait between runs (storage under model
    offload), not at the first sampling run: the VAE and encoders that run before it find the VRAM free."""
    from kinema.models import placement
    from kinema.nodes.memory import KinemaMemoryPolicy

    moved = []
    monkeypatch.setattr(placement, "_move", lambda m, device, on_move: moved.append((m, device)))
    monkeypatch.setattr(host, "compute_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(host, "offload_device", lambda: torch.device("cpu:1"))
    (model,) = KinemaMemoryPolicy().apply(motion_model("v2"), "model", 2, 0, True)
    assert [(m, str(d)) for m, d in moved] == [(model.unet, "cpu:1"), (model.motion, "cpu:1")]


def test_depth_nodes_pass_precision_batch_size_and_t_s(host_dirs, monkeypatch):
    from kinema.models import demo
    from kinema.models.depth import DepthEstimator, structure_fidelity
    from kinema.nodes.depth import (
        KinemaDepthEstimate,
        KinemaDepthModelLoader,
        KinemaStructureFidelity,
    )

    (model,) = KinemaDepthModelLoader().load(demo.DEMO_DEPTH, "bf16")
    assert model.dtype == torch.bfloat16
    seen = []

    def spy(self, images, batch_size=4, on_batch=None):
        seen.append(batch_size)
        return images

    monkeypatch.setattr(DepthEstimator, "estimate_image", spy)
    KinemaDepthEstimate().estimate(torch.rand(5, 16, 16, 3), model, 3)
    assert seen == [3]
    depth = torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    outs = [KinemaStructureFidelity().apply(depth, t_s)[0] for t_s in range(8)]
    for t_s, out in enumerate(outs):
        assert torch.equal(out, structure_fidelity(depth, t_s))
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(outs))  # every step takes more away


def test_temporal_guidance_node_passes_its_scale_and_refuses_a_negative_one():
    from kinema.models.errors import KinemaError
    from kinema.nodes.guidance import KinemaTemporalGuidance

    (model,) = KinemaTemporalGuidance().apply(motion_model("v2"), 1.75)
    assert model.temporal_scale == 1.75
    with pytest.raises(KinemaError, match="temporal_scale.*(smaller than the minimum 0|must be 0 or more)"):
        KinemaTemporalGuidance().apply(motion_model("v2"), -0.5)


def test_depth_and_clip_vision_loaders_load_in_their_parts_precision(host_dirs, monkeypatch):
    """With precision auto, the depth model takes the diffusion weights' dtype and the CLIP vision model the
    encoders' (ComfyUI's --bf16-unet and --fp16-text-enc can make them differ)."""
    from kinema.models import demo
    from kinema.nodes.content import KinemaCLIPVisionLoader
    from kinema.nodes.depth import KinemaDepthModelLoader

    parts = host.LoadDtypes(weights=torch.bfloat16, vae=torch.float32, encoders=torch.float16)
    monkeypatch.setattr(host, "load_dtypes", lambda precision, device=None: parts)
    assert KinemaDepthModelLoader().load(demo.DEMO_DEPTH, "auto")[0].dtype == torch.bfloat16
    assert KinemaCLIPVisionLoader().load(demo.DEMO_CLIP_VISION, "auto")[0].dtype == torch.float16


def test_apply_motion_module_node_refuses_a_motion_module_for_another_unet():
    """Refused where it is attached, not as a shape error in the middle of sampling."""
    from dataclasses import replace

    from kinema.models.errors import KinemaError
    from kinema.models.motion import MotionModuleSet
    from kinema.nodes.animatediff import KinemaApplyMotionModule

    cfg = motion_modules("v2").cfg
    with torch.device("meta"):
        wide = MotionModuleSet(replace(cfg, down_channels=tuple(2 * c for c in cfg.down_channels)))
    with pytest.raises(KinemaError, match="motion module was made for a UNet with channels"):
        KinemaApplyMotionModule().apply(motion_model(None), wide, 1.0, "linear", "")


def test_controlnet_and_ip_adapter_loaders_load_in_the_weights_precision_and_place_what_they_load(host_dirs,
                                                                                                  monkeypatch):
    from kinema.models import demo
    from kinema.nodes.content import KinemaIPAdapterLoader
    from kinema.nodes.structure import KinemaControlNetLoader

    parts = host.LoadDtypes(weights=torch.bfloat16, vae=torch.float32, encoders=torch.float16)
    monkeypatch.setattr(host, "load_dtypes", lambda precision, device=None: parts)
    placed = []
    monkeypatch.setattr(host, "placed", lambda obj: placed.append(obj) or obj)
    (controlnet,) = KinemaControlNetLoader().load(demo.DEMO_CONTROLNET, "auto")
    (ip_adapter,) = KinemaIPAdapterLoader().load(demo.DEMO_IP_ADAPTER, "auto")
    assert controlnet.dtype == torch.bfloat16 and ip_adapter.dtype == torch.bfloat16
    assert len(placed) == 2 and placed[0] is controlnet and placed[1] is ip_adapter  # placed after the host's defaults


def test_checkpoint_loader_loads_each_part_in_its_precision(host_dirs, monkeypatch):
    """UNet, VAE and text encoder each take their own dtype (ComfyUI's --bf16-unet, --fp32-vae, --fp16-text-enc)."""
    from kinema.models import demo
    from kinema.nodes.loaders import KinemaCheckpointLoader

    parts = host.LoadDtypes(weights=torch.bfloat16, vae=torch.float32, encoders=torch.float16)
    monkeypatch.setattr(host, "load_dtypes", lambda precision, device=None: parts)
    model, clip, vae = KinemaCheckpointLoader().load(demo.DEMO_CHECKPOINT, "auto")
    assert (model.unet.dtype, vae.dtype, clip.dtype) == (torch.bfloat16, torch.float32, torch.float16)


def test_the_video_model_loaders_put_the_model_where_the_hosts_policy_keeps_it(host_dirs, monkeypatch):
    """Load Checkpoint and Load SVD Checkpoint (Kinema) move the UNet where the host's memory policy keeps it
    between runs (with ComfyUI's --gpu-only, the GPU), with that policy on the model."""
    from kinema.models import demo, placement
    from kinema.models.offload import OffloadOptions
    from kinema.nodes.loaders import KinemaCheckpointLoader
    from kinema.nodes.svd import KinemaSVDLoader

    policy = OffloadOptions(mode="none", device="cpu")
    others = host.memory_defaults()[1]
    monkeypatch.setattr(host, "memory_defaults", lambda: (policy, others))
    rested = []
    monkeypatch.setattr(placement, "rest", lambda model, opts: rested.append((model, opts)))
    (model, _, _) = KinemaCheckpointLoader().load(demo.DEMO_CHECKPOINT, "fp32")
    (svd, _, _) = KinemaSVDLoader().load(demo.DEMO_SVD["svd"], "fp32")
    assert rested == [(model, policy), (svd, policy)] and model.offload == svd.offload == policy
