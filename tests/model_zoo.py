"""Tiny models built from configs with random weights (no downloads), shared by the tests."""

from __future__ import annotations

import torch
import torch.nn as nn

from sparsify.examples import ManualAttentionBlock, VideoTransformer

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


def llama(seq: int = 96, batch: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=512,
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
