"""Text encoders: the SD1.5 CLIP text model (transformers ``CLIPTextModel``) and its tokenizer.

The tokenizer is OpenAI CLIP's BPE, shipped with the pack as ``data/clip_tokenizer``
(``vocab.json`` + ``merges.txt``; see the README there) and loaded once.

``TextEncoder.encode(prompt)`` reads the prompt the way ComfyUI's CLIPTextEncode does
for SD1.5: weights from ``models/prompt.py``, 77-token chunks concatenated along the
tokens, weighted tokens pulled away from the empty prompt's encoding, pooled output
from the first chunk.

Where this differs from ComfyUI on purpose:

- ``embedding:`` with no name is ignored (ComfyUI raises an IndexError there); an
  embedding of the wrong width is an error naming the file (ComfyUI ignores it);
- ``clip_skip`` beyond the number of layers raises ``KinemaError`` (ComfyUI silently
  uses the last layer).

Text normalisation is transformers' ``CLIPTokenizer`` loaded as ComfyUI loads its own
(``from_pretrained`` on the tokenizer folder), so the tokens are ComfyUI's under either
transformers: 5's fast tokenizer (NFC, whitespace, lower case), or 4's slow one, which
with ftfy installed also fixes text (curly quotes, ligatures) and without it spaces CJK
ideographs apart. The model code runs under transformers 4 and 5 (4 nests the text
transformer under ``text_model``: ``_transformer``).

Weights stored in fp16 or bf16 are computed in fp32, as ComfyUI computes its CLIP (its
``manual_cast`` operations): the half-precision weights are cast for the call only
(``_in_float32``), so the prompt's conditioning is the same at any storage precision up
to the rounding of the weights themselves. The transient fp32 copy is the encoder's size
(about 0.5 GB for SD1.5's CLIP-L), far below a sampling step's peak.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable

import torch
from einops import rearrange

from .errors import KinemaError
from .patching import copy_whole, materialize
from .placement import on_device
from .prompt import has_weights, tokenize_weighted

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "clip_tokenizer")
START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>, also the padding of SD1.5 prompts
VOCAB_SIZE = 49408


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """The CLIP BPE tokenizer (transformers ``CLIPTokenizer``) loaded from the shipped files, once, the way ComfyUI
    loads its own (``from_pretrained`` on a folder: transformers 4's slow tokenizer, transformers 5's fast one)."""
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    except (OSError, ValueError) as e:
        raise KinemaError(f"the CLIP tokenizer files in '{TOKENIZER_DIR}' cannot be read ({e}): reinstall the "
                          "pack") from e
    if tokenizer.bos_token_id != START_TOKEN or tokenizer.eos_token_id != END_TOKEN:
        raise KinemaError(f"the CLIP tokenizer files in '{TOKENIZER_DIR}' are damaged: reinstall the pack")
    return tokenizer


def tokenize(text: str) -> list[int]:
    """CLIP token ids of ``text``, without start and end tokens."""
    return clip_tokenizer()(text, add_special_tokens=False)["input_ids"]


def infer_text_config(sd: dict):
    """A ``CLIPTextConfig`` from the shapes of a CLIP text model state dict (transformers names, no prefix)."""
    from transformers import CLIPTextConfig

    needed = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
              "encoder.layers.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KinemaError(f"the CLIP text encoder weights lack '{missing[0]}': not a CLIP text model")
    vocab_size, hidden = sd["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=START_TOKEN,
        eos_token_id=END_TOKEN,
        pad_token_id=END_TOKEN,
    )


@contextlib.contextmanager
def _vectors_past_vocabulary(token_embedding: torch.nn.Embedding, vectors: torch.Tensor | None):
    """While it lasts, ``token_embedding`` looks ids from ``VOCAB_SIZE`` on up in ``vectors`` (a textual-inversion
    embedding's, ``VOCAB_SIZE + i`` -> ``vectors[i]``) instead of its table. The end token is still found by its
    id, so the pooled output stays at the first chunk's end token."""
    if vectors is None:
        yield
        return
    seen = {}

    def clamp(module, args):
        seen["ids"] = args[0]
        return (args[0].clamp(max=VOCAB_SIZE - 1),)

    def replace(module, args, out):
        ids = seen.pop("ids")
        extra = ids >= VOCAB_SIZE
        out = out.clone()
        out[extra] = vectors.to(device=out.device, dtype=out.dtype)[ids[extra] - VOCAB_SIZE]
        return out

    handles = [token_embedding.register_forward_pre_hook(clamp), token_embedding.register_forward_hook(replace)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _transformer(model):
    """The CLIP text transformer of a ``CLIPTextModel`` (its embeddings, final layer norm): the model itself under
    transformers 5, its ``text_model`` under transformers 4."""
    return getattr(model, "text_model", model)


def _in_float32(module: torch.nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` with its floating-point parameters in fp32: as they are when they already are,
    else cast copies for this call (the module itself is not changed). A deferred LoRA merge is made first (its
    hook would run inside the call, on the cast copies)."""
    materialize(module)
    params = dict(module.named_parameters())
    if all(p.dtype == torch.float32 for p in params.values()):
        return module(*args, **kwargs)
    cast = {name: p.float() if p.is_floating_point() else p for name, p in params.items()}
    return torch.func.functional_call(module, cast, args, kwargs, strict=False)


class TextEncoder:
    """The SD1.5 CLIP text encoder: prompt -> (cond [1, 77*k, d], pooled [1, d])."""

    def __init__(self, model):
        """``model``: a transformers ``CLIPTextModel`` (any device and dtype)."""
        self.model = copy_whole(model.eval().requires_grad_(False))  # a LoRA'd copy gets layers of its own
        self.chunk_length = model.config.max_position_embeddings
        self.num_layers = model.config.num_hidden_layers

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "cond_stage_model.transformer.",
                        dtype: torch.dtype | None = None, device="cpu") -> "TextEncoder":
        """Build from a state dict in the SD1.5 single-file layout (``{prefix}text_model.*``).

        Keys without ``text_model.`` after the prefix (old checkpoints) are accepted too;
        ``position_ids`` and other extra keys are ignored. The model is built on the meta
        device and the tensors are assigned (cast to ``dtype``, moved to ``device``).
        """
        from transformers import CLIPTextModel

        weights = {}
        for key, tensor in sd.items():
            if not key.startswith(prefix) or key.endswith("position_ids"):
                continue
            name = key[len(prefix):]
            name = name[len("text_model."):] if name.startswith("text_model.") else name
            weights[name] = tensor
        if not weights:
            raise KinemaError(f"no CLIP text encoder weights ('{prefix}text_model.*') in the state dict")
        config = infer_text_config(weights)
        if config.vocab_size < VOCAB_SIZE:
            raise KinemaError(f"the CLIP text encoder has {config.vocab_size} tokens, the SD1.5 tokenizer needs "
                              f"{VOCAB_SIZE}: not an SD1.5 text encoder")
        with torch.device("meta"):
            model = CLIPTextModel(config)
        # the model's own names: "text_model.*" under transformers 4, the bare names under transformers 5
        expected = {k: k.removeprefix("text_model.") for k in model.state_dict() if not k.endswith("position_ids")}
        missing = [bare for bare in expected.values() if bare not in weights]
        if missing:
            raise KinemaError(
                f"the CLIP text encoder is missing {len(missing)} weights (first: '{prefix}text_model.{missing[0]}'): "
                "the checkpoint is incomplete or not SD1.5")
        loaded = {}
        reference = model.state_dict()
        for k, bare in expected.items():
            t = weights[bare]
            if reference[k].is_floating_point() and not t.is_floating_point():
                raise KinemaError(f"the CLIP text encoder weight '{prefix}text_model.{bare}' holds "
                                  f"{str(t.dtype).removeprefix('torch.')} values where the model has floating-point "
                                  "ones: the checkpoint is damaged; download it again")
            moved = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
            loaded[k] = moved.clone() if moved is t else moved  # not the file's mapped pages (``own_copies``)
        try:
            model.load_state_dict(loaded, strict=True, assign=True)
        except RuntimeError as e:
            raise KinemaError(f"the CLIP text encoder weights have inconsistent shapes: {e}") from e
        positions = config.max_position_embeddings
        _transformer(model).embeddings.position_ids = torch.arange(positions, device=device).expand(1, -1)
        return cls(model)

    @property
    def device(self) -> torch.device:
        return _transformer(self.model).embeddings.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return _transformer(self.model).embeddings.token_embedding.weight.dtype

    @property
    def width(self) -> int:
        """The width of a token embedding (768 for SD1.5): what a textual-inversion embedding must match."""
        return self.model.config.hidden_size

    def tokenize(self, prompt: str, embedding: Callable[[str], list[int] | None] | None = None
                 ) -> list[list[tuple[int, float]]]:
        """The prompt as chunks of ``chunk_length`` (token id, weight) pairs (``embedding``: see
        ``prompt.tokenize_weighted``)."""
        return tokenize_weighted(prompt, tokenize, START_TOKEN, END_TOKEN, END_TOKEN, self.chunk_length, embedding)

    @torch.no_grad()
    def encode(self, prompt: str, clip_skip: int = 1, embeddings: Callable[[str], torch.Tensor | None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt -> (cond [1, 77*k, d], pooled [1, d]), float32 on the CPU.

        ``clip_skip=1``: the last layer through ``final_layer_norm``; ``clip_skip=2``: the
        penultimate layer's hidden state through ``final_layer_norm`` (ComfyUI's
        CLIPSetLastLayer -2). ``pooled`` is always the last layer at the first chunk's end
        token. ``embeddings(name)``: the vectors [n, width] of the textual-inversion embedding
        ``embedding:name`` (None: not found), each taking one token's place, as in ComfyUI.
        """
        if not 1 <= clip_skip <= self.num_layers:
            raise KinemaError(f"clip_skip must be between 1 and {self.num_layers}, got {clip_skip}")
        vectors: list[torch.Tensor] = []

        def embedding(name: str) -> list[int] | None:
            found = embeddings(name) if embeddings is not None else None
            if found is None:
                return None
            first = VOCAB_SIZE + sum(v.shape[0] for v in vectors)  # ids past the vocabulary stand for the vectors
            vectors.append(found.reshape(-1, self.width))
            return list(range(first, first + vectors[-1].shape[0]))

        chunks = self.tokenize(prompt, embedding)
        weighted = has_weights(chunks)
        ids = [[t for t, _ in chunk] for chunk in chunks]
        if weighted:  # the empty prompt, the reference weights pull away from
            ids.append([START_TOKEN, END_TOKEN] + [END_TOKEN] * (self.chunk_length - 2))
        with on_device(self), _vectors_past_vocabulary(_transformer(self.model).embeddings.token_embedding,
                                                       torch.cat(vectors) if vectors else None):
            out = _in_float32(self.model, input_ids=torch.tensor(ids, device=self.device),
                              output_hidden_states=clip_skip > 1)
            if clip_skip == 1:
                z = out.last_hidden_state
            else:
                z = _in_float32(_transformer(self.model).final_layer_norm, out.hidden_states[-clip_skip])
            z = z.float().cpu()
            pooled = out.pooler_output[:1].float().cpu()
        if weighted:
            z, empty = z[:-1], z[-1:]
            w = torch.tensor([[w for _, w in chunk] for chunk in chunks], dtype=torch.float32)
            w = rearrange(w, "k n -> k n 1")
            z = torch.where(w != 1.0, (z - empty) * w + empty, z)
        return rearrange(z, "k n d -> 1 (k n) d"), pooled
