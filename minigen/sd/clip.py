"""The CLIP text encoders SDXL conditions on: OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection).

Both are the same pre-norm causal transformer; they differ only in size, activation (quick_gelu vs gelu) and the
projection head of the second. Module names follow transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`
(`text_model.encoder.layers.0.self_attn.q_proj`, ...) so a diffusers `text_encoder/` folder and the CLIP-L part of a
single-file checkpoint load without renaming (the bigG part is renamed by `convert.py`).

SDXL uses, per encoder:
- `hidden_states[-2]`: the input of the last layer, *not* passed through the final layer norm (both encoders);
- `text_embeds`: the final-normed hidden state at the end-of-text token, projected (bigG only; the "pooled" prompt).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class CLIPTextConfig:
    """Field names are the keys of transformers' config.json, so `from_dict(json.load(...))` reads a diffusers folder.

    Defaults are transformers' (openai/clip-vit-base-patch32); `sdxl_clip_l()` and `sdxl_clip_bigg()` give SDXL's two.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    @classmethod
    def from_dict(cls, d: Mapping) -> "CLIPTextConfig":
        """Build from a config.json dict, ignoring keys this model does not use (architectures, torch_dtype, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # SDXL's configs keep the pre-2023 token ids (bos 0, eos 2, pad 1): with eos_token_id == 2 the pooled token is
    # found by argmax over the ids, as in the original CLIP (see `CLIPTextTransformer.pool`).
    @classmethod
    def sdxl_clip_l(cls) -> "CLIPTextConfig":
        """SDXL's `text_encoder`: OpenAI CLIP ViT-L/14 text tower (123.06M parameters)."""
        return cls(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)

    @classmethod
    def sdxl_clip_bigg(cls) -> "CLIPTextConfig":
        """SDXL's `text_encoder_2`: OpenCLIP ViT-bigG/14 text tower with projection (694.66M parameters)."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; CLIP-L was trained with it, so it must be kept."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # (B, T, D), after the final layer norm
    pooled_output: torch.Tensor  # (B, D), last_hidden_state at the end-of-text token
    hidden_states: tuple[torch.Tensor, ...]  # num_hidden_layers + 1 of (B, T, D): embeddings, then each layer's output
    text_embeds: torch.Tensor | None = None  # (B, projection_dim), projection models only


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        max_len = self.position_embedding.num_embeddings
        if seq_len > max_len:
            raise ValueError(f"input_ids has {seq_len} tokens; this text encoder takes at most {max_len}")
        positions = torch.arange(seq_len, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, D)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # Causal: each token sees only itself and earlier tokens, so padding after the end-of-text token never
        # changes the states SDXL reads (at or before it) -- no padding mask is needed.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns the embeddings and every layer's output: num_hidden_layers + 1 tensors of (B, T, D)."""
        states = [x]
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Keep only the layer inputs; recompute the insides during backward (LoRA training on text encoders).
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            states.append(x)
        return states


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The state at the end-of-text token, found as transformers finds it for this config's eos_token_id."""
        if self.config.eos_token_id == 2:
            # Old configs (SDXL's) carry a wrong eos id 2; as the original CLIP does, take the highest id in each row:
            # <|endoftext|> 49407 is the last vocabulary entry, and argmax returns its first occurrence.
            eos_index = input_ids.argmax(dim=-1)
        else:
            eos_index = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # first eos
        return last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), eos_index]  # (B, D)

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        states = self.encoder(self.embeddings(input_ids))  # (B, T, D) each
        last = self.final_layer_norm(states[-1])
        return CLIPTextOutput(last_hidden_state=last, pooled_output=self.pool(last, input_ids),
                              hidden_states=tuple(states))


def normalize_clip_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put a text-encoder state dict into this module's key layout.

    transformers 5 saves `CLIPTextModel` without the `text_model.` prefix; real SDXL files and
    `CLIPTextModelWithProjection` have it. Older files also carry the `embeddings.position_ids` buffer (always
    0..76), which this model computes instead of storing, so it is dropped.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


class CLIPTextModel(nn.Module):
    """CLIP text encoder with transformers' module names; SDXL's `text_encoder` (CLIP ViT-L/14)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        """input_ids (B, T) int64, T <= max_position_embeddings."""
        return self.text_model(input_ids)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.text_model.encoder.gradient_checkpointing = enabled

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Accepts keys with or without the `text_model.` prefix (see `normalize_clip_keys`)."""
        return super().load_state_dict(normalize_clip_keys(state_dict), strict=strict, assign=assign)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP text encoder plus the bias-free projection of the pooled output; SDXL's `text_encoder_2` (bigG)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        out = self.text_model(input_ids)
        out.text_embeds = self.text_projection(out.pooled_output)  # (B, projection_dim)
        return out
