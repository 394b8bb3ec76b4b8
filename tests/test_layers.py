"""The attention shortcuts of the shared layers give what full attention gives."""
import pytest
import torch
from kinema.models.layers import CrossAttention, SharedContext, attention
from kinema.models.svd import VideoTransformerBlock

torch.manual_seed(0)


def _full(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Attention over every query and key, with no shortcut."""
    return attn.to_out(attention(attn.to_q(x), attn.to_k(context), attn.to_v(context), attn.heads))


@pytest.mark.parametrize("tokens", [1, 3])
def test_cross_attention_matches_full_attention(tokens):
    attn = CrossAttention(16, 24, heads=2).eval()
    x, context = torch.randn(4, 10, 16), torch.randn(4, tokens, 24)
    with torch.no_grad():
        assert torch.allclose(attn(x, context), _full(attn, x, context), atol=1e-6)


def test_one_token_context_skips_the_query_projection_and_the_attention():
    attn = CrossAttention(16, 24, heads=2).eval()
    calls = []
    attn.to_q.register_forward_hook(lambda *_: calls.append("to_q"))
    with torch.no_grad():
        out = attn(torch.randn(2, 10, 16), torch.randn(2, 1, 24))
    assert out.shape == (2, 10, 16) and calls == []


def test_shared_context_matches_the_per_frame_context():
    attn = CrossAttention(16, 24, heads=2).eval()
    for tokens in (1, 5):
        prompts = torch.randn(2, tokens, 24)
        context = prompts.repeat_interleave(3, dim=0)  # 2 prompts, 3 frames each
        shared = SharedContext.of(context)
        assert isinstance(shared, SharedContext) and shared.values.shape[0] == 2
        assert SharedContext.of(shared) is shared  # already shared: kept as it is (no comparison)
        x = torch.randn(6, 10, 16)
        with torch.no_grad():
            assert torch.allclose(attn(x, shared), _full(attn, x, context), atol=1e-6)


def test_image_attention_with_extra_tokens_is_not_shortcut():
    attn = CrossAttention(16, 24, heads=2).eval()
    x, context = torch.randn(2, 10, 16), torch.randn(2, 1, 24)
    k, v = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        q = attn.to_q(x)
        expected = attn.to_out(attention(q, attn.to_k(context), attn.to_v(context), 2)
                               + 0.5 * attention(q, k, v, 2))
        assert torch.allclose(attn(x, context, extra=((k, v, 0.5),)), expected, atol=1e-6)


def test_svd_temporal_cross_attention_to_one_token_matches_full_attention():
    block = VideoTransformerBlock(16, heads=2, context_dim=24, ff_in=True).eval()
    videos, pixels, frames = 2, 5, 3
    x = torch.randn(videos * pixels, frames, 16)  # rows: the pixels of each video
    context = torch.randn(videos, 1, 24)
    row_context = context.repeat_interleave(pixels, dim=0)
    with torch.no_grad():
        out = block._attend_context(x, context, 0, pixels)
        assert torch.allclose(out, _full(block.attn2, x, row_context), atol=1e-6)
        # rows from the middle (attention chunks): the video of each row is kept
        part = block._attend_context(x[3:8], context, 3, pixels)
        assert torch.allclose(part, out[3:8], atol=1e-6)
