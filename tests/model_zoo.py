"""Tiny models built from configs with random weights (no downloads), shared by the tests."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sparsify.toy_models import ManualAttentionBlock, VideoTransformer

VOCAB = 128


def _ids(batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[-1, seq - seq // 4:] = 0  # right padding on the last row
    return {"input_ids": ids, "attention_mask": mask}


def gpt2(seq: int = 96, batch: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=512,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def llama(seq: int = 96, batch: int = 2, seed: int = 0, *, layers: int = 2, vocab: int = VOCAB):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=64, intermediate_size=128, vocab_size=vocab, max_position_embeddings=512,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def llama_eager(seq: int = 96, batch: int = 2, seed: int = 0):
    """Llama with the hand-written ("eager") attention: repeat_kv + matmul-softmax-matmul."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=512,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def bert(seq: int = 96, batch: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                     vocab_size=VOCAB, max_position_embeddings=512, attn_implementation="sdpa")
    return transformers.BertModel(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def vit(image: int = 64, batch: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.ViTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                    image_size=image, patch_size=8, attn_implementation="sdpa")
    pixels = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))
    return transformers.ViTModel(config).eval(), {"pixel_values": pixels}


def dit(sample: int = 16, batch: int = 2, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                            sample_size=sample, patch_size=2, num_embeds_ada_norm=10).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(batch, 4, sample, sample, generator=generator),
        "timestep": torch.tensor([3, 7][:batch]),
        "class_labels": torch.tensor([1, 2][:batch]),
    }
    return model, inputs


def transformer_encoder(seq: int = 80, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), (torch.randn(batch, seq, 64),)


class MultiheadSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` used directly, weights returned or not, batch_first or not."""

    def __init__(self, batch_first: bool = True, need_weights: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.need_weights = need_weights
        self.attention = nn.MultiheadAttention(64, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attention(x, x, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights)[0]


def multihead(seq: int = 80, batch: int = 2, seed: int = 0, batch_first: bool = True, need_weights: bool = True):
    torch.manual_seed(seed)
    x = torch.randn(batch, seq, 64) if batch_first else torch.randn(seq, batch, 64)
    return MultiheadSelfAttention(batch_first, need_weights).eval(), (x,)


def manual(seq: int = 80, batch: int = 2, seed: int = 0, causal: bool = True):
    torch.manual_seed(seed)
    return ManualAttentionBlock(64, 4, causal=causal).eval(), (torch.randn(batch, seq, 64),)


def video(seq_frames: int = 4, batch: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return VideoTransformer(64, 4, 2).eval(), (torch.randn(batch, seq_frames * 8 * 8, 64),)


# -- forms of issue 10: each family below was missed by capture before ----------------------------

def gemma2(seq: int = 48, batch: int = 2, seed: int = 0):
    """Gemma 2: always eager; scores soft-capped as 50 · tanh(s / 50); sliding-window layers."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                       head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256,
                                       sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=None,
                                       pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return transformers.Gemma2ForCausalLM(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def gpt_oss(seq: int = 48, batch: int = 2, seed: int = 0):
    """gpt-oss: learned per-head sinks join the softmax (cat → max shift → softmax → [..., :-1])."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GptOssConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                       head_dim=16, intermediate_size=64, vocab_size=VOCAB, num_local_experts=2,
                                       num_experts_per_tok=1, sliding_window=16, max_position_embeddings=256,
                                       pad_token_id=0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # zero-initialised sinks would hide the form's effect
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model, _ids(batch, seq, torch.Generator().manual_seed(seed))


def bloom(seq: int = 40, batch: int = 2, seed: int = 0):
    """BLOOM: alibi in baddbmm on [batch*heads, q, k], a view to 4-D for the mask, a view back before bmm."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BloomConfig(n_layer=2, n_head=4, hidden_size=64, vocab_size=VOCAB, pad_token_id=0,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.BloomForCausalLM(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def deberta_v2(seq: int = 40, batch: int = 2, seed: int = 0):
    """DeBERTa-v2: kᵀ divided by a lifted constant, relative-position bias, 3-D ↔ 4-D views."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DebertaV2Config(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                          vocab_size=VOCAB, max_position_embeddings=256, relative_attention=True,
                                          pos_att_type=["p2c", "c2p"], position_buckets=16, pad_token_id=0)
    return transformers.DebertaV2Model(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def gpt_neo(seq: int = 40, batch: int = 2, seed: int = 0):
    """GPT-Neo: where(causal bias, scores, lifted constant); global and local (windowed) layers; no scaling."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPTNeoConfig(num_layers=2, attention_types=[[["global", "local"], 1]], hidden_size=64,
                                       num_heads=4, vocab_size=VOCAB, max_position_embeddings=256, window_size=16,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPTNeoForCausalLM(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def mpnet(seq: int = 40, batch: int = 2, seed: int = 0):
    """MPNet: in-place ``scores += position_bias`` (``add_`` in the graph)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.MPNetConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                      vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0)
    return transformers.MPNetModel(config).eval(), _ids(batch, seq, torch.Generator().manual_seed(seed))


def llava(batch: int = 2, seed: int = 0):
    """LLaVA (CLIP vision tower + Llama): ``use_cache`` only reaches the text model through ``**kwargs``."""
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=16, patch_size=4)
    text = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                    intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0,
                                    bos_token_id=0, eos_token_id=0)
    image_token = VOCAB - 1
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                                      projector_hidden_act="gelu", vision_feature_layer=-1)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, image_token, (batch, 32), generator=generator)
    ids[:, 2:18] = image_token  # 16 patches per image
    inputs = {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 16, 16, generator=generator),
              "attention_mask": torch.ones(batch, 32, dtype=torch.long)}
    return transformers.LlavaForConditionalGeneration(config).eval(), inputs


def swin(image: int = 56, batch: int = 2, seed: int = 0, attn_implementation: str = "sdpa"):
    """HF Swin with 2 layers (one stage: a regular and a shifted-window block)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.SwinConfig(image_size=image, patch_size=4, num_channels=3, embed_dim=32, depths=[2],
                                     num_heads=[2], window_size=7, attn_implementation=attn_implementation)
    pixels = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))
    return transformers.SwinModel(config).eval(), {"pixel_values": pixels}


def latte(seed: int = 0):
    """Latte: spatial self attention, cross attention to 64 text tokens over 64 image tokens, temporal attention."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                              cross_attention_dim=16, sample_size=16, patch_size=2,
                                              norm_type="ada_norm_single", caption_channels=8, video_length=2).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = {"hidden_states": torch.randn(1, 4, 2, 16, 16, generator=generator), "timestep": torch.tensor([3]),
              "encoder_hidden_states": torch.randn(1, 64, 8, generator=generator)}
    return model, inputs


def mochi(seed: int = 0):
    """Mochi: joint attention over image tokens and the valid text tokens (a data-dependent length)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                              pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                              max_sequence_length=16).eval()
    generator = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(2, 16, dtype=torch.long)
    text_mask[1, 10:] = 0
    inputs = {"hidden_states": torch.randn(2, 4, 2, 8, 8, generator=generator),
              "encoder_hidden_states": torch.randn(2, 16, 16, generator=generator), "timestep": torch.tensor([3, 7]),
              "encoder_attention_mask": text_mask}
    return model, inputs


def lumina2(seed: int = 0):
    """Lumina2: ``attention_mask.sum(dim=1).tolist()`` sizes its rotary embedding (data-dependent Python)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
                                                num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1,
                                                multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
                                                cap_feat_dim=8).eval()
    generator = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(2, 12, dtype=torch.bool)
    text_mask[1, 8:] = False
    inputs = {"hidden_states": torch.randn(2, 4, 16, 16, generator=generator), "timestep": torch.tensor([0.3, 0.7]),
              "encoder_hidden_states": torch.randn(2, 12, 8, generator=generator), "encoder_attention_mask": text_mask}
    return model, inputs


def hidream(seed: int = 0):
    """HiDream: its mixture-of-experts routes tokens with ``.cpu().numpy()`` (data-dependent Python)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1,
                                                     attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4],
                                                     text_emb_dim=8, num_routed_experts=2, num_activated_experts=1,
                                                     axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
                                                     llama_layers=[0, 1]).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = {"hidden_states": torch.randn(2, 4, 16, 16, generator=generator), "timesteps": torch.tensor([3, 7]),
              "encoder_hidden_states_t5": torch.randn(2, 8, 8, generator=generator),
              "encoder_hidden_states_llama3": torch.randn(2, 2, 8, 4, generator=generator),
              "pooled_embeds": torch.randn(2, 8, generator=generator)}
    return model, inputs


def transformer_decoder(seq: int = 24, memory: int = 40, batch: int = 2, seed: int = 0):
    """``nn.TransformerDecoder`` given ``tgt_mask`` but no ``tgt_is_causal`` (it tests the mask's values)."""
    torch.manual_seed(seed)
    layer = nn.TransformerDecoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    inputs = {"tgt": torch.randn(batch, seq, 64, generator=generator),
              "memory": torch.randn(batch, memory, 64, generator=generator),
              "tgt_mask": nn.Transformer.generate_square_subsequent_mask(seq)}
    return nn.TransformerDecoder(layer, 2).eval(), inputs


class _HeadsProjection(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, dim = x.shape
        return self.qkv(x).reshape(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, seq, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(batch, seq, -1))


class TrilMaskAttention(_HeadsProjection):
    """A causal mask built from the scores' shape: ``torch.ones_like(scores).tril()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones_like(scores).tril()
        scores = scores.masked_fill(causal == 0, float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


def tril_mask(seq: int = 40, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return TrilMaskAttention(64, 4).eval(), (torch.randn(batch, seq, 64),)


class KeywordInputs(nn.Module):
    """A model called with keyword arguments that arrive through ``**inputs``."""

    def __init__(self):
        super().__init__()
        self.block = ManualAttentionBlock(64, 4, causal=True)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.block(inputs["hidden_states"]) * inputs["gate"]


def keyword_inputs(seq: int = 40, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return KeywordInputs().eval(), {"hidden_states": torch.randn(batch, seq, 64), "gate": torch.rand(batch, seq, 1)}


class ShiftedWindowAttention(nn.Module):
    """Window attention as timm and torchvision write Swin's (hand-written; neither library is a dependency).

    ``q * scale @ kᵀ + relative bias``; in shifted layers the scores are viewed as
    ``[batch, windows, heads, N, N]``, the region mask is added, and they are viewed back to
    ``[batch * windows, heads, N, N]`` before the softmax.
    """

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_bias = nn.Parameter(torch.randn(heads, window * window, window * window) * 0.02)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch_windows, tokens, channels = windows.shape
        qkv = self.qkv(windows).reshape(batch_windows, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.relative_bias.unsqueeze(0)
        if mask is not None:
            count = mask.shape[0]
            attn = attn.view(-1, count, self.heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, tokens, tokens)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch_windows, tokens, channels))


class ShiftedWindowBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, resolution: int):
        super().__init__()
        self.window, self.shift, self.resolution = window, shift, resolution
        self.norm = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, heads, window)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("region_mask", self._region_mask() if shift else None, persistent=False)

    def _region_mask(self) -> torch.Tensor:
        size, window, shift = self.resolution, self.window, self.shift
        regions = torch.zeros(size, size)
        label = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                regions[rows, cols] = label
                label += 1
        windows = self._partition(regions[None, :, :, None]).squeeze(-1)  # [windows, N]
        different = windows.unsqueeze(1) != windows.unsqueeze(2)
        return torch.zeros(different.shape).masked_fill(different, -100.0)

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        w = self.window
        x = x.view(batch, height // w, w, width // w, w, channels).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, w * w, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        size, w = self.resolution, self.window
        grid = self.norm(x).view(batch, size, size, channels)
        if self.shift:
            grid = torch.roll(grid, shifts=(-self.shift, -self.shift), dims=(1, 2))
        attended = self.attn(self._partition(grid), self.region_mask)
        attended = attended.view(batch, size // w, size // w, w, w, channels).permute(0, 1, 3, 2, 4, 5)
        attended = attended.reshape(batch, size, size, channels)
        if self.shift:
            attended = torch.roll(attended, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + attended.reshape(batch, tokens, channels)
        return x + self.mlp(x)


class ShiftedWindowTransformer(nn.Module):
    """Four window-attention layers on a 16×16 token grid, every second one shifted (as in Swin)."""

    def __init__(self, dim: int = 32, heads: int = 2, window: int = 4, resolution: int = 16, layers: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(ShiftedWindowBlock(dim, heads, window, window // 2 if i % 2 else 0, resolution)
                                    for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def shifted_window(batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return ShiftedWindowTransformer().eval(), (torch.randn(batch, 16 * 16, 32),)
