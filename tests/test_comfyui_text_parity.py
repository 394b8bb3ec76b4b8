"""Text Encode against ComfyUI's own CLIPTextEncode path on the same weights: ComfyUI's SD1 CLIP model, tokenizer
and textual-inversion loader (``comfy.sd.CLIP`` with ``SD1ClipModel``, its ``sd1_tokenizer`` files, an
``embeddings`` folder), run in ComfyUI's own venv; Kinema's ``TextEncoder`` here.

Skipped unless a ComfyUI checkout is at ``$COMFYUI_DIR`` (default ``/tmp/ComfyUI``) with its venv python at
``$COMFYUI_PYTHON`` (default ``/tmp/comfyvenv/bin/python``), as the server tests.
"""
import os
import subprocess

import pytest
import torch
from conftest import NET_TOL, assert_net_close
from fixtures import sd15_state_dict
from kinema.models import encoders
from kinema.models.embeddings import load_embedding
from safetensors.torch import save_file

COMFY_DIR = os.environ.get("COMFYUI_DIR", "/tmp/ComfyUI")
COMFY_PYTHON = os.environ.get("COMFYUI_PYTHON", "/tmp/comfyvenv/bin/python")

if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
    pytest.skip(f"no ComfyUI checkout at {COMFY_DIR} (set COMFYUI_DIR)", allow_module_level=True)
if not os.access(COMFY_PYTHON, os.X_OK):
    pytest.skip(f"no ComfyUI venv python at {COMFY_PYTHON} (set COMFYUI_PYTHON)", allow_module_level=True)

PROMPTS = [
    "a photo of a cat",
    "",
    "a (red:1.3) fox, ((snow)), [forest], \\(literal\\), (dog:0.5)",
    "a (photo of a cat:-0.5) and (nothing:0)",
    "café naïve, 東京, emoji 🐱, <|endoftext|>",
    ", ".join(f"word{i} (thing{i}:1.1)" for i in range(40)),  # three chunks, groups moved whole
    "a photo of embedding:fox in the snow",
    "(embedding:fox:1.4), a dog, embedding:fox,",
    "a cat embedding:missing dog",
]

# Run by ComfyUI's python in its checkout: ComfyUI's CLIP on the checkpoint's text encoder, every prompt at the
# last and the penultimate layer (CLIPSetLastLayer -1, -2), the conditioning and pooled output saved.
COMFY_SIDE = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())  # the ComfyUI checkout
import torch
from comfy.cli_args import args
args.cpu = True
import comfy.sd, comfy.sd1_clip, comfy.utils

weights, emb_dir, prompts, out = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
sd = comfy.utils.load_torch_file(weights)
p = "cond_stage_model.transformer.text_model."
hidden = sd[p + "embeddings.token_embedding.weight"].shape[1]
layers = 1 + max(int(k[len(p + "encoder.layers."):].split(".")[0]) for k in sd if k.startswith(p + "encoder.layers."))
config = {"hidden_size": hidden, "intermediate_size": sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
          "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64)}

class Target:
    clip = comfy.sd1_clip.SD1ClipModel
    tokenizer = comfy.sd1_clip.SD1Tokenizer
    params = {}

results = {}
for dtype in (torch.float32, torch.float16):  # ComfyUI computes either in fp32 (its manual_cast operations)
    clip = comfy.sd.CLIP(Target, embedding_directory=[emb_dir],
                         model_options={"clip_l_model_config": config, "dtype": dtype})
    missing, unexpected = clip.load_sd({k.replace("cond_stage_model.", "clip_l."): v for k, v in sd.items()},
                                       full_model=True)
    assert not unexpected and all("text_projection" in k or "logit_scale" in k for k in missing), (missing, unexpected)
    for i, text in enumerate(prompts):
        for layer in (-1, -2):
            c = clip.clone()
            c.clip_layer(layer)
            (cond, extra), = c.encode_from_tokens_scheduled(c.tokenize(text))
            results[f"{str(dtype)}:{i}:{layer}"] = cond.float()
            results[f"{str(dtype)}:{i}:{layer}:pooled"] = extra["pooled_output"].float()
torch.save(results, out)
"""


@pytest.fixture(scope="module")
def comfy_results(tmp_path_factory):
    import json

    tmp = tmp_path_factory.mktemp("comfy_text")
    sd = {k: v.contiguous() for k, v in sd15_state_dict().items() if k.startswith("cond_stage_model.")}
    save_file(sd, str(tmp / "clip.safetensors"))
    (tmp / "embeddings").mkdir()
    width = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[1]
    save_file({"emb_params": torch.randn(3, width, generator=torch.Generator().manual_seed(5))},
              str(tmp / "embeddings" / "fox.safetensors"))
    (tmp / "prompts.json").write_text(json.dumps(PROMPTS))
    (tmp / "comfy_side.py").write_text(COMFY_SIDE)
    done = subprocess.run([COMFY_PYTHON, str(tmp / "comfy_side.py"), str(tmp / "clip.safetensors"),
                           str(tmp / "embeddings"), str(tmp / "prompts.json"), str(tmp / "out.pt")],
                          cwd=COMFY_DIR, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return sd, tmp, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_text_encode_is_comfyuis_clip_text_encode(comfy_results, index, dtype):
    """At either weight precision: ComfyUI casts fp16 weights to fp32 for each operation, Kinema for the call."""
    sd, tmp, results = comfy_results
    encoder = encoders.TextEncoder.from_state_dict(sd, dtype=dtype)

    def lookup(name):
        path = tmp / "embeddings" / f"{name}.safetensors"
        return load_embedding(str(path), encoder.width) if path.is_file() else None

    for clip_skip in (1, 2):
        cond, pooled = encoder.encode(PROMPTS[index], clip_skip=clip_skip, embeddings=lookup)
        key = f"{dtype}:{index}:{-clip_skip}"
        assert_net_close(cond, results[key], f"prompt {index} clip_skip {clip_skip}", NET_TOL)
        assert_net_close(pooled, results[key + ":pooled"], f"pooled {index} clip_skip {clip_skip}", NET_TOL)
