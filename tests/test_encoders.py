"""The SD1.5 CLIP text encoder: shipped tokenizer, prompt weighting, chunking, loading, encoding."""
import ast
import importlib.util
import logging
import os
import random
import re
import sys
import types
import unicodedata

import pytest
import torch

from kinema.models import encoders, prompt
from kinema.models.errors import KinemaError

S, E = encoders.START_TOKEN, encoders.END_TOKEN
TOKENIZER_DIR = encoders.TOKENIZER_DIR


def _load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


derive = _load_by_path("_kinema_derive_clip_bpe", os.path.join(TOKENIZER_DIR, "derive.py"))


# ---------------------------------------------------------------- tokenizer data

def test_shipped_files_are_the_derivation_from_clip_bpe():
    bpe = derive.open_clip_bpe_path()
    if bpe is None:
        pytest.skip("open_clip's bpe_simple_vocab_16e6.txt.gz is not installed")
    vocab, merges = derive.derive(bpe)
    with open(os.path.join(TOKENIZER_DIR, "vocab.json"), encoding="utf-8") as f:
        assert f.read() == derive.vocab_text(vocab)
    with open(os.path.join(TOKENIZER_DIR, "merges.txt"), encoding="utf-8") as f:
        assert f.read() == derive.merges_text(merges)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == S and vocab["<|endoftext|>"] == E
    assert len(merges) == 48894


def test_tokenizer_special_tokens_and_standard_loading():
    from transformers import CLIPTokenizer

    tok = encoders.clip_tokenizer()
    assert encoders.clip_tokenizer() is tok  # loaded once
    assert tok("a photo of a cat")["input_ids"] == [S, 320, 1125, 539, 320, 2368, E]
    # the same files load through transformers' own folder loader, offline
    standard = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    assert standard("a photo of a cat")["input_ids"] == [S, 320, 1125, 539, 320, 2368, E]


def _open_clip_simple_tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file (``import open_clip`` needs torchvision).

    open_clip cleans text with ftfy; where ftfy is not installed a stand-in doing only its
    NFC step is used, which is all ftfy does to the prompts below.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
    stub = None
    if importlib.util.find_spec("ftfy") is None:
        stub = types.ModuleType("ftfy")
        stub.fix_text = lambda text: unicodedata.normalize("NFC", text)
        sys.modules["ftfy"] = stub
    try:
        module = _load_by_path("_kinema_open_clip_tokenizer", path)
    finally:
        if stub is not None:
            del sys.modules["ftfy"]
    return module.SimpleTokenizer()


LONG_TEXT = ("a cinematic photograph of an old lighthouse on a rocky coast at dusk, waves crashing, "
             "dramatic clouds, volumetric light, highly detailed, 35mm film grain, muted colours, "
             "seagulls flying overhead, a small boat in the distance, reflections on the wet rocks, "
             "moody atmosphere, award winning, trending on artstation, octane render, 8k uhd") * 2

TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "A Photo, of a CAT!!! masterpiece, best-quality; 8k uhd...",
    "(masterpiece:1.2), ((best quality)), [low quality], {braces} <tag>",
    "café naïve résumé Ångström Ünïcödé",
    "東京の夜景 城市 夜晚 한국어",
    "Привет мир ΑΒΓ αβγ",
    "emoji 🐱🔥🎉 test",
    "don't you'll we're it's I'd they've",
    "numbers 12345 3.14159 1,000 2024-01-01",
    "  multiple   spaces\nnew\tline  ",
    "@#$%^&*_+=~`|\\/ ?!.,:;'\"",
    "",
    LONG_TEXT,
]


def test_token_ids_equal_open_clip():
    """Under transformers 4 the tokenizer is the slow one (as ComfyUI's there), which spaces CJK ideographs apart
    when ftfy is missing: that prompt is compared under transformers 5 only (see the encoders module doc)."""
    import transformers

    simple = _open_clip_simple_tokenizer()
    slow = int(transformers.__version__.split(".")[0]) < 5
    for text in TOKENIZER_PROMPTS:
        if slow and any("\u4e00" <= ch <= "\u9fff" for ch in text):
            continue
        assert encoders.tokenize(text) == simple.encode(text), text


def test_html_entities_are_not_unescaped_like_comfyui():
    # open_clip / OpenAI CLIP run html.unescape; transformers' CLIPTokenizer (ComfyUI) does not.
    simple = _open_clip_simple_tokenizer()
    assert encoders.tokenize("fish &amp; chips") != simple.encode("fish &amp; chips")
    assert encoders.tokenize("fish &amp; chips")[:1] == simple.encode("fish")


# ---------------------------------------------------------------- weight parsing

@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat) dog", [("a ", 1.0), ("cat", 1.1), (" dog", 1.0)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("(((cat)))", [("cat", 1.1 * 1.1 * 1.1)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("(cat:0.5) dog", [("cat", 0.5), (" dog", 1.0)]),
    ("(a, b:0.8), c", [("a, b", 0.8), (", c", 1.0)]),
    ("((cat:1.5))", [("cat", 1.5)]),  # an explicit weight replaces the outer 1.1
    ("((cat):1.5)", [("cat", 1.5 * 1.1)]),  # the inner group multiplies the explicit weight
    ("(a (b) c:2)", [("a ", 2.0), ("b", 2.2), (" c", 2.0)]),
    ("(a:b)", [("a:b", 1.1)]),  # not a number: a plain group that keeps its colon
    ("(12:30 pm)", [("12:30 pm", 1.1)]),
    ("(:1.5)", [(":1.5", 1.1)]),  # a colon at the start is text
    ("(a:1.5:2)", [("a:1.5", 2.0)]),  # the last colon counts
    ("(a: 1.5 )", [("a", 1.5)]),  # float() allows the spaces
    ("(a:-1)", [("a", -1.0)]),
    ("\\(not weighted\\)", [("(not weighted)", 1.0)]),
    ("(a \\(b\\):1.2)", [("a (b)", 1.2)]),
    ("(unclosed", [("(unclosed", 1.0)]),
    ("a) b (c)", [("a) b (c)", 1.0)]),  # a stray ')' keeps what follows literal (ComfyUI)
    ("()", []),
    ("", []),
])
def test_parse_weights(text, expected):
    got = prompt.parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("text,shown", [
    ("a fox (running:nan)", "nan"), ("(a:inf)", "inf"), ("(a:-inf)", "-inf"), ("x, (a:1e40)", "1e\\+40"),
    ("(a:-250)", "-250"),
])
def test_non_finite_or_absurd_prompt_weights_are_refused(text, shown):
    """(a:nan) / (a:inf) / (a:1e40) would make the conditioning non-finite: refused, naming the group and prompt."""
    with pytest.raises(KinemaError, match=rf"prompt weight {shown} in '\(.*\)' \(prompt '.*'\).*from -100 to 100"):
        prompt.parse_weights(text)
    assert prompt.parse_weights("(a:100) (b:-100)") == [("a", 100.0), (" ", 1.0), ("b", -100.0)]


def test_split_groups():
    assert prompt.split_groups("a (b (c)) d") == ["a ", "(b (c))", " d"]
    assert prompt.split_groups("(a)(b)") == ["(a)", "(b)"]


def test_embedding_references_missing_are_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert prompt.split_words("a cat embedding:foo, dog") == ["a cat", "embedding:foo, dog"]
        assert prompt.take_embedding("embedding:foo, dog") == ([], ", dog")
        assert prompt.take_embedding("embedding:foo bar baz") == ([], "bar baz")
        assert prompt.take_embedding("embedding:foo") == ([], "")
        assert prompt.take_embedding("embedding:") == ([], "")
    assert "embedding:foo" in caplog.text
    tokens = [t for t, _ in encoders.TextEncoder.tokenize(_Bare(), "a cat embedding:foo dog")[0]]
    assert tokens[:5] == [S] + encoders.tokenize("a cat dog") + [E]


def test_embedding_references_found_take_token_places_as_comfyui():
    """ComfyUI's lookup: the first word is the name; a name with trailing commas is tried without them, the commas
    staying in the text; the vectors are one group, weighted like the text around them."""
    known = {"foo": [900001, 900002]}
    assert prompt.take_embedding("embedding:foo, dog", known.get) == ([900001, 900002], ", dog")
    assert prompt.take_embedding("embedding:foo bar", known.get) == ([900001, 900002], "bar")
    chunks = prompt.tokenize_weighted("a (embedding:foo cat:1.5)", encoders.tokenize, S, E, E, 77, known.get)
    assert chunks[0][:6] == [(S, 1.0), (320, 1.0), (900001, 1.5), (900002, 1.5), (2368, 1.5), (E, 1.0)]


# ---------------------------------------------------------------- chunking

class _Bare:
    chunk_length = 77


def _chunks(text):
    return encoders.TextEncoder.tokenize(_Bare(), text)


def test_short_prompt_is_one_padded_chunk():
    chunks = _chunks("a photo of a cat")
    assert len(chunks) == 1 and len(chunks[0]) == 77
    assert [t for t, _ in chunks[0]] == [S, 320, 1125, 539, 320, 2368] + [E] * 71
    assert all(w == 1.0 for _, w in chunks[0])
    assert [t for t, _ in _chunks("")[0]] == [S] + [E] * 76


def test_weights_follow_tokens():
    chunks = _chunks("a (red:1.5) cat, ((blue sky))")
    ids = [t for t, _ in chunks[0]]
    weights = [w for _, w in chunks[0]]
    red, blue_sky = encoders.tokenize("red"), encoders.tokenize("blue sky")
    i = ids.index(red[0])
    assert weights[i] == 1.5 and weights[i - 1] == 1.0 and weights[i + 1] == 1.0
    j = ids.index(blue_sky[0])
    assert weights[j:j + len(blue_sky)] == pytest.approx([1.21] * len(blue_sky))
    assert weights[0] == 1.0 and weights[j + len(blue_sky)] == 1.0  # start, end tokens
    assert prompt.has_weights(chunks) and not prompt.has_weights(_chunks("a cat"))


def test_long_segment_splits_at_75_tokens():
    groups = [[(i, 1.0) for i in range(100)]]
    chunks = prompt.chunk_tokens(groups, S, E, E)
    assert [len(c) for c in chunks] == [77, 77]
    assert [t for t, _ in chunks[0]] == [S] + list(range(75)) + [E]
    assert [t for t, _ in chunks[1]] == [S] + list(range(75, 100)) + [E] * 51


def test_short_segment_moves_whole_to_the_next_chunk():
    groups = [[(i, 1.0) for i in range(70)], [(1000 + i, 1.2) for i in range(7)]]
    chunks = prompt.chunk_tokens(groups, S, E, E)
    assert [t for t, _ in chunks[0]] == [S] + list(range(70)) + [E] * 6
    assert [t for t, _ in chunks[1]][:9] == [S] + [1000 + i for i in range(7)] + [E]
    assert [w for _, w in chunks[1]][1:8] == [1.2] * 7
    # a segment of 8 tokens or more fills the chunk instead
    groups = [[(i, 1.0) for i in range(70)], [(1000 + i, 1.2) for i in range(8)]]
    chunks = prompt.chunk_tokens(groups, S, E, E)
    assert [t for t, _ in chunks[0]] == [S] + list(range(70)) + [1000 + i for i in range(5)] + [E]
    assert [t for t, _ in chunks[1]][:5] == [S, 1005, 1006, 1007, E]


def _comfyui_dir():
    for d in (os.environ.get("COMFYUI_DIR"), "/tmp/ComfyUI"):
        if d and os.path.isfile(os.path.join(d, "comfy", "sd1_clip.py")):
            return d
    return None


def _comfyui_sd_tokenizer(comfy_dir):
    """ComfyUI's own SDTokenizer (read from the checkout, not imported: comfy needs its runtime).

    Its prompt functions and tokenizer class are taken out of comfy/sd1_clip.py and run on
    this pack's tokenizer files, with an embeddings folder that has no embeddings.
    """
    from transformers import CLIPTokenizer

    with open(os.path.join(comfy_dir, "comfy", "sd1_clip.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    wanted = {"parse_parentheses", "token_weights", "escape_important", "unescape_important", "SDTokenizer"}
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    namespace = {"os": os, "re": re, "logging": logging, "CLIPTokenizer": CLIPTokenizer,
                 "load_embed": lambda *args, **kwargs: None}
    exec(compile(ast.Module(body=body, type_ignores=[]), "comfy/sd1_clip.py", "exec"), namespace)
    return namespace["SDTokenizer"](tokenizer_path=TOKENIZER_DIR, embedding_directory="/nonexistent")


def _random_prompt(rng):
    words = ["cat", "a", "photo", "of", "red", "sky", "masterpiece", "best quality", "highly detailed",
             "1.5", "0.8", ",", ", ", " ", "\n", ":", "(", ")", "((", "))", "\\(", "\\)", ":1.3)", ":0.5)",
             "embedding:foo", " embedding:bar,", "blue-green", "東京", "🐱", "a b c d e f g h i j", "x" * 30,
             "supercalifragilisticexpialidocious", "!!!", "1,000"]
    n = rng.choice([3, 10, 40, 120])
    return "".join(rng.choice(words) + rng.choice(["", " ", " ", ", "]) for _ in range(n))


def test_chunks_equal_comfyui_tokenize_with_weights():
    comfy_dir = _comfyui_dir()
    if comfy_dir is None:
        pytest.skip("no ComfyUI checkout (COMFYUI_DIR or /tmp/ComfyUI)")
    reference = _comfyui_sd_tokenizer(comfy_dir)
    logging.disable(logging.WARNING)
    try:
        rng = random.Random(0)
        fixed = ["a (red:1.5) cat", LONG_TEXT, "(" + LONG_TEXT + ":0.7)", "((a)) \\(b\\) (c:1.2) embedding:x y"]
        for text in fixed + [_random_prompt(rng) for _ in range(300)]:
            assert _chunks(text) == reference.tokenize_with_weights(text), text
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------- the model

HIDDEN, LAYERS = 128, 2  # hidden // 64 = 2 heads


@pytest.fixture(scope="module")
def reference_model():
    """A tiny random transformers CLIPTextModel (49408 tokens, 77 positions, 2 heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                            num_hidden_layers=LAYERS, num_attention_heads=HIDDEN // 64,
                            max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=S, eos_token_id=E, pad_token_id=E)
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # larger than the default init, so the layers change the embeddings a lot
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _sd15_layout(model, prefix="cond_stage_model.transformer.text_model."):
    sd = {prefix + k.removeprefix("text_model."): v.clone() for k, v in model.state_dict().items()}  # transformers 4 or 5
    sd[prefix + "embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None]  # as some files carry it
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts of the checkpoint
    return sd


@pytest.fixture(scope="module")
def encoder(reference_model):
    return encoders.TextEncoder.from_state_dict(_sd15_layout(reference_model))


def _ids(text):
    ids = [S] + encoders.tokenize(text) + [E]
    return torch.tensor([ids + [E] * (77 - len(ids))])


def test_config_inferred_from_shapes(encoder):
    cfg = encoder.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49408, HIDDEN, 4 * HIDDEN)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (LAYERS, 2, 77)
    assert cfg.hidden_act == "quick_gelu"
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
    assert not any(p.is_meta for p in encoder.model.parameters())
    assert not any(b.is_meta for b in encoder.model.buffers())


def test_unweighted_prompt_equals_transformers(encoder, reference_model):
    text = "a photo of a cat, highly detailed"
    cond, pooled = encoder.encode(text)
    with torch.no_grad():
        ref = reference_model(input_ids=_ids(text))
    assert cond.shape == (1, 77, HIDDEN) and pooled.shape == (1, HIDDEN)
    assert cond.dtype == torch.float32
    assert torch.equal(cond, ref.last_hidden_state)
    assert torch.equal(pooled, ref.pooler_output)


def test_an_embedding_of_a_words_token_vectors_encodes_as_the_word(encoder):
    """An embedding's vectors take the places of tokens: vectors copied from the token table for "red fox" give
    exactly the conditioning and pooled output of the words, weighted or not, in any chunk, with clip skip."""
    table = encoders._transformer(encoder.model).embeddings.token_embedding.weight
    vectors = table[encoders.tokenize("red fox")].detach().clone()
    lookup = {"fox": vectors, "snow": table[encoders.tokenize("deep snow")].detach().clone()}.get
    long = "a cat, " * 30
    for written, plain in [("a photo of embedding:fox in snow", "a photo of red fox in snow"),
                           ("embedding:fox in embedding:snow", "red fox in deep snow"),  # two embeddings, in turn
                           ("a photo of (embedding:fox:1.3), snow", "a photo of (red fox:1.3), snow"),
                           (long + "embedding:fox", long + "red fox")]:
        for clip_skip in (1, 2):
            got = encoder.encode(written, clip_skip=clip_skip, embeddings=lookup)
            want = encoder.encode(plain, clip_skip=clip_skip)
            assert got[0].shape == want[0].shape
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (written, clip_skip)
    # the embedding's own vectors (not a word's) change the conditioning; the hooks are gone afterwards
    other = encoder.encode("a photo of embedding:fox", embeddings={"fox": torch.randn(3, HIDDEN)}.get)
    assert not torch.equal(other[0], encoder.encode("a photo of red fox")[0])
    table_module = encoders._transformer(encoder.model).embeddings.token_embedding
    assert not table_module._forward_hooks and not table_module._forward_pre_hooks


def test_embedding_files_of_every_published_layout_load(tmp_path):
    from kinema.models.embeddings import load_embedding
    from safetensors.torch import save_file

    vectors = torch.randn(2, HIDDEN)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": "fox", "step": 3000, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"},
               tmp_path / "a1111.pt")
    save_file({"emb_params": vectors}, str(tmp_path / "a1111.safetensors"))
    save_file({"clip_l": vectors, "clip_g": torch.randn(2, 1280)}, str(tmp_path / "sdxl.safetensors"))
    torch.save({"<fox>": vectors[0]}, tmp_path / "learned_embeds.bin")
    for name in ("a1111.pt", "a1111.safetensors", "sdxl.safetensors"):
        assert torch.equal(load_embedding(str(tmp_path / name), HIDDEN), vectors), name
    assert torch.equal(load_embedding(str(tmp_path / "learned_embeds.bin"), HIDDEN), vectors[:1])
    save_file({"emb_params": torch.randn(2, 1024)}, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(KinemaError, match="'sd2.safetensors' holds vectors 1024 wide.*takes 128.*SD1.5 embedding"):
        load_embedding(str(tmp_path / "sd2.safetensors"), HIDDEN)
    save_file({"a": vectors, "b": vectors.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(KinemaError, match="'two.safetensors' holds 2 tensors .* not a textual-inversion embedding"):
        load_embedding(str(tmp_path / "two.safetensors"), HIDDEN)


def test_a_half_precision_embedding_loads_as_float32(tmp_path):
    from kinema.models.embeddings import load_embedding
    from safetensors.torch import save_file

    vectors = torch.randn(3, HIDDEN).half()
    save_file({"emb_params": vectors}, str(tmp_path / "fp16.safetensors"))
    got = load_embedding(str(tmp_path / "fp16.safetensors"), HIDDEN)
    assert got.dtype == torch.float32 and torch.equal(got, vectors.float())


@pytest.mark.parametrize("tensors,match", [
    ({}, "^bad.safetensors holds no tensors"),  # refused by the file reader already
    ({"emb_params": torch.randn(1, 2, HIDDEN)},
     r"the embedding 'bad.safetensors' holds a tensor of shape \[1, 2, 128\].*not textual-inversion"),
    ({"emb_params": torch.tensor([[float("nan")] * HIDDEN])}, "the embedding 'bad.safetensors' holds NaN or infinite"),
    ({"emb_params": torch.full((2, HIDDEN), float("inf"))}, "the embedding 'bad.safetensors' holds NaN or infinite"),
], ids=["no tensors", "3-D", "nan", "inf"])
def test_embedding_files_without_usable_vectors_are_refused(tmp_path, tensors, match):
    from kinema.models.embeddings import load_embedding
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KinemaError, match=match):
        load_embedding(str(tmp_path / "bad.safetensors"), HIDDEN)


def test_text_encode_node_passes_clip_skip_on(encoder, host_dirs):
    """ComfyUI's CLIPSetLastLayer -2 is Text Encode (Kinema)'s clip_skip 2: the node's setting reaches the model."""
    from kinema.nodes.conditioning import KinemaTextEncode

    text = "a red fox running through snow"
    conds = []
    for clip_skip in (1, 2):
        ((cond, extra),) = KinemaTextEncode().encode(encoder, text, clip_skip=clip_skip)[0]
        want_cond, want_pooled = encoder.encode(text, clip_skip=clip_skip)
        assert torch.equal(cond, want_cond) and torch.equal(extra["pooled_output"], want_pooled)
        conds.append(cond)
    assert not torch.allclose(conds[0], conds[1])


def test_clip_skip_2_is_the_penultimate_layer_through_final_norm(encoder, reference_model):
    text = "a photo of a cat"
    cond, pooled = encoder.encode(text, clip_skip=2)
    with torch.no_grad():
        ref = reference_model(input_ids=_ids(text), output_hidden_states=True)
        expected = encoders._transformer(reference_model).final_layer_norm(ref.hidden_states[LAYERS - 1])
    assert torch.equal(cond, expected)
    assert torch.equal(pooled, ref.pooler_output)  # pooled stays the last layer's
    assert not torch.equal(cond, ref.last_hidden_state)
    with pytest.raises(KinemaError, match="clip_skip"):
        encoder.encode(text, clip_skip=LAYERS + 1)


def test_weighted_prompt_follows_comfyui_formula(encoder, reference_model):
    cond, pooled = encoder.encode("a (red:1.5) cat, (blue:0.5)")
    ids = _ids("a red cat, blue")
    weights = torch.ones(77)
    red, blue = encoders.tokenize("red")[0], encoders.tokenize("blue")[0]
    weights[ids[0] == red] = 1.5
    weights[ids[0] == blue] = 0.5
    with torch.no_grad():
        z = reference_model(input_ids=ids).last_hidden_state[0]
        z_empty = reference_model(input_ids=_ids("")).last_hidden_state[0]
        pooled_ref = reference_model(input_ids=ids).pooler_output
    expected = z.clone()
    for j in range(77):
        if weights[j] != 1.0:
            expected[j] = (z[j] - z_empty[j]) * weights[j] + z_empty[j]
    torch.testing.assert_close(cond[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, pooled_ref, rtol=1e-5, atol=1e-6)
    unweighted, _ = encoder.encode("a red cat, blue")
    changed = (cond[0] - unweighted[0]).abs().amax(dim=-1) > 1e-4
    assert changed.tolist() == (weights != 1.0).tolist()
    assert torch.equal(cond[0][weights == 1.0], unweighted[0][weights == 1.0])  # as ComfyUI: weight 1 is left as is


def test_long_prompt_concatenates_chunks(encoder, reference_model):
    cond, pooled = encoder.encode(LONG_TEXT)
    chunks = _chunks(LONG_TEXT)
    assert len(chunks) == 2 and cond.shape == (1, 154, HIDDEN)
    with torch.no_grad():
        ref = reference_model(input_ids=torch.tensor([[t for t, _ in c] for c in chunks]))
    torch.testing.assert_close(cond[0, :77], ref.last_hidden_state[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond[0, 77:], ref.last_hidden_state[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, ref.pooler_output[:1], rtol=1e-5, atol=1e-6)


def test_old_layout_without_text_model_and_dtype(reference_model, encoder):
    sd = _sd15_layout(reference_model, prefix="cond_stage_model.transformer.")
    old = encoders.TextEncoder.from_state_dict(sd)
    assert torch.equal(old.encode("a cat")[0], encoder.encode("a cat")[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_half_weights_compute_in_float32(reference_model, dtype, clip_skip):
    """fp16/bf16 weights are computed in fp32, as ComfyUI's CLIP does: the same conditioning as fp32 weights
    rounded to that precision, and the stored weights stay as they were."""
    half = encoders.TextEncoder.from_state_dict(_sd15_layout(reference_model), dtype=dtype)
    rounded = encoders.TextEncoder.from_state_dict(
        {k: v.to(dtype).float() for k, v in _sd15_layout(reference_model).items()})
    prompt = "a (red:1.2) cat"
    cond, pooled = half.encode(prompt, clip_skip=clip_skip)
    assert cond.dtype == torch.float32 and pooled.dtype == torch.float32
    ref_cond, ref_pooled = rounded.encode(prompt, clip_skip=clip_skip)
    torch.testing.assert_close(cond, ref_cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-6)
    assert half.dtype == dtype and all(p.dtype == dtype for p in half.model.parameters())
    with torch.no_grad():  # the half-precision arithmetic this replaces is further away
        computed_half = half.model(input_ids=torch.tensor([[t for t, _ in c] for c in half.tokenize("a cat")]))
    assert computed_half.last_hidden_state.dtype == dtype
    assert (computed_half.last_hidden_state[:1].float() - rounded.encode("a cat")[0]).abs().max() > 1e-4


def test_loading_gives_the_model_weights_of_its_own(reference_model):
    """The state dict's tensors may be the file's mapped pages: the text encoder holds copies of its own."""
    sd = _sd15_layout(reference_model)
    enc = encoders.TextEncoder.from_state_dict(sd)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    weight = encoders._transformer(enc.model).encoder.layers[0].self_attn.q_proj.weight
    assert weight.data_ptr() != sd[key].data_ptr() and torch.equal(weight, sd[key])


def test_incomplete_state_dict_raises(reference_model):
    sd = _sd15_layout(reference_model)
    del sd["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(KinemaError, match=r"missing 1 weights.*layers\.1\.mlp\.fc2\.bias"):
        encoders.TextEncoder.from_state_dict(sd)
    sd = _sd15_layout(reference_model)
    del sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    with pytest.raises(KinemaError, match="token_embedding"):
        encoders.TextEncoder.from_state_dict(sd)
    with pytest.raises(KinemaError, match="no CLIP text encoder"):
        encoders.TextEncoder.from_state_dict({"model.diffusion_model.x": torch.zeros(1)})
    sd = _sd15_layout(reference_model)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    sd[key] = sd[key][:1000]  # a text encoder of another tokenizer
    with pytest.raises(KinemaError, match="the CLIP text encoder has 1000 tokens, the SD1.5 tokenizer needs 49408"):
        encoders.TextEncoder.from_state_dict(sd)


def _tiny_text_model(layers, vocab=49408, seed=0):
    """A transformers CLIPTextModel 64 wide (1 head) with ``layers`` layers and ``vocab`` tokens, weights as
    ``reference_model``'s."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=S, eos_token_id=E, pad_token_id=E)
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def four_layer_model():
    return _tiny_text_model(4)


@pytest.mark.parametrize("clip_skip", [2, 3, 4])
def test_clip_skip_k_is_the_kth_hidden_state_from_the_end_through_final_norm(four_layer_model, clip_skip):
    """ComfyUI's CLIPSetLastLayer -k: the hidden state k from the end (``hidden_states[-k]``, counting the
    embeddings as the first) through ``final_layer_norm``, on a model deep enough that -k differs from the k-th
    from the start and from the penultimate one."""
    encoder = encoders.TextEncoder.from_state_dict(_sd15_layout(four_layer_model))
    text = "a photo of a cat"
    cond, _ = encoder.encode(text, clip_skip=clip_skip)
    with torch.no_grad():
        hidden = four_layer_model(input_ids=_ids(text), output_hidden_states=True).hidden_states
        expected = encoders._transformer(four_layer_model).final_layer_norm(hidden[-clip_skip])
    assert len(hidden) == 5
    assert torch.equal(cond, expected)


def test_a_larger_token_table_loads_and_encodes_as_transformers():
    """A text encoder with more rows than the SD1.5 tokenizer's 49408 (extra tokens appended) is accepted: only
    fewer rows are refused. Its prompts encode as transformers encodes them."""
    model = _tiny_text_model(1, vocab=49410)
    encoder = encoders.TextEncoder.from_state_dict(_sd15_layout(model))
    assert encoder.model.config.vocab_size == 49410
    cond, pooled = encoder.encode("a photo of a cat")
    with torch.no_grad():
        ref = model(input_ids=_ids("a photo of a cat"))
    assert torch.equal(cond, ref.last_hidden_state) and torch.equal(pooled, ref.pooler_output)


def test_token_and_position_counts_are_read_from_the_weights():
    """The config comes from the tensors' shapes, including the vocabulary and the number of positions (248 for a
    long-context CLIP), not SD1.5's usual 49408 and 77."""
    def t(*shape):
        return torch.empty(*shape, device="meta")

    sd = {"embeddings.token_embedding.weight": t(49410, 64), "embeddings.position_embedding.weight": t(248, 64),
          "encoder.layers.0.mlp.fc1.weight": t(256, 64), "encoder.layers.2.mlp.fc1.weight": t(256, 64)}
    cfg = encoders.infer_text_config(sd)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, cfg.num_hidden_layers) == \
        (49410, 248, 64, 3)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_a_half_file_with_float32_parts_computes_in_float32(reference_model, clip_skip):
    """A file with fp16 weights and some fp32 ones (layer norms kept in fp32, as some checkpoints store them) loads
    as stored and still computes everything in fp32: a module with any half-precision weight is cast for the call."""
    sd = {k: v if "norm" in k else v.half() for k, v in _sd15_layout(reference_model).items()}
    mixed = encoders.TextEncoder.from_state_dict(sd)
    dtypes = {p.dtype for p in mixed.model.parameters()}
    assert dtypes == {torch.float16, torch.float32}
    rounded = encoders.TextEncoder.from_state_dict({k: v.float() for k, v in sd.items()})
    for got, want in zip(mixed.encode("a (red:1.2) cat", clip_skip=clip_skip),
                         rounded.encode("a (red:1.2) cat", clip_skip=clip_skip)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_damaged_tokenizer_folder_is_named(tmp_path, monkeypatch):
    """Tokenizer files that load but do not give CLIP's start and end tokens their ids (49406, 49407) are
    refused, naming the folder, instead of encoding every prompt wrong."""
    (tmp_path / "vocab.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    monkeypatch.setattr(encoders, "TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(KinemaError, match=f"CLIP tokenizer files in '{re.escape(str(tmp_path))}' .*reinstall"):
        encoders.clip_tokenizer.__wrapped__()  # the loader itself: the cached tokenizer is not touched


def test_a_name_with_leading_commas_finds_the_embedding_without_them():
    """ComfyUI strips commas on both sides of a name it does not find (``name.strip(',')``), not only trailing ones."""
    known = {"foo": [900001, 900002]}
    assert prompt.take_embedding("embedding:,foo dog", known.get)[0] == [900001, 900002]


def test_chunks_are_padded_with_the_pad_token_not_the_end_token():
    """``pad`` fills the rest of every chunk, also of one closed early for a short segment; the end token once."""
    groups = [[(i, 1.0) for i in range(70)], [(1000 + i, 1.0) for i in range(7)]]
    chunks = prompt.chunk_tokens(groups, S, E, 0)
    assert [t for t, _ in chunks[0]] == [S] + list(range(70)) + [E] + [0] * 5
    assert [t for t, _ in chunks[1]] == [S] + [1000 + i for i in range(7)] + [E] + [0] * 68


def test_a_chunk_closed_by_a_split_segment_ends_with_the_end_token_not_the_pad():
    """A long segment split at the boundary closes the full chunk with the end token (ComfyUI appends
    ``end_token`` there), also where ``pad`` is another token (SD2-style pad 0)."""
    chunks = prompt.chunk_tokens([[(i + 1, 1.0) for i in range(80)]], S, E, 0)
    assert [t for t, _ in chunks[0]] == [S] + list(range(1, 76)) + [E]
    assert [t for t, _ in chunks[1]] == [S] + list(range(76, 81)) + [E] + [0] * 70


def test_a_segment_filling_the_chunk_exactly_stays_one_chunk():
    chunks = prompt.chunk_tokens([[(i, 1.0) for i in range(75)]], S, E, E)
    assert len(chunks) == 1 and [t for t, _ in chunks[0]] == [S] + list(range(75)) + [E]


def test_an_embedding_after_a_newline_is_a_word_of_its_own():
    assert prompt.split_words("a cat\nembedding:foo dog") == ["a cat", "embedding:foo dog"]


def test_weights_below_one_alone_make_a_weighted_prompt(encoder):
    """A prompt whose only weights are below 1 is weighted too: its tokens move towards the empty prompt."""
    assert prompt.has_weights(_chunks("a (cat:0.5)"))
    weighted, _ = encoder.encode("a (cat:0.5)")
    plain, _ = encoder.encode("a cat")
    assert not torch.allclose(weighted, plain)


@pytest.mark.parametrize("tensor,shown", [
    (torch.zeros(0, HIDDEN), r"shape \[0, 128\]"),
    (torch.ones(2, HIDDEN, dtype=torch.int64), r"shape \[2, 128\] \(torch.int64\)"),
], ids=["empty", "integer"])
def test_embedding_files_with_empty_or_integer_vectors_are_refused(tmp_path, tensor, shown):
    from kinema.models.embeddings import load_embedding
    from safetensors.torch import save_file

    save_file({"emb_params": tensor}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KinemaError, match=f"the embedding 'bad.safetensors' holds a tensor of {shown}.*: not"):
        load_embedding(str(tmp_path / "bad.safetensors"), HIDDEN)


def test_a_token_table_one_row_short_is_refused(reference_model):
    """49407 rows lack the end token's own row (49407): refused like any smaller table, not only far smaller ones."""
    sd = _sd15_layout(reference_model)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    sd[key] = sd[key][:E]
    with pytest.raises(KinemaError, match="has 49407 tokens, the SD1.5 tokenizer needs 49408"):
        encoders.TextEncoder.from_state_dict(sd)


def test_a_long_context_encoder_chunks_prompts_at_its_own_position_count():
    """A text encoder with 248 positions (long-context CLIP) takes chunks of 248 tokens, start + prompt + end +
    padding, and encodes them as transformers does on those ids (not in 77-token chunks)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=248, hidden_act="quick_gelu",
                            bos_token_id=S, eos_token_id=E, pad_token_id=E)
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    encoder = encoders.TextEncoder.from_state_dict(_sd15_layout(model))
    text = ", ".join(["a photo of a red cat"] * 20)  # about 140 tokens: one chunk of 248, two of 77
    tokens = encoders.tokenize(text)
    assert 75 < len(tokens) < 246
    cond, pooled = encoder.encode(text)
    ids = torch.tensor([[S] + tokens + [E] * (248 - 1 - len(tokens))])
    with torch.no_grad():
        ref = model(input_ids=ids)
    assert cond.shape == (1, 248, 64)
    torch.testing.assert_close(cond, ref.last_hidden_state)
    torch.testing.assert_close(pooled, ref.pooler_output)
