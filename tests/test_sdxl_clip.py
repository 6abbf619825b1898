"""minigen's CLIP text encoders against transformers' CLIPTextModel / CLIPTextModelWithProjection, same random weights."""

import pytest
import torch
import transformers

from close import assert_close_to_scale
from minigen.sd.clip import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, normalize_clip_keys)

BOS, EOS = 49406, 49407


def tiny_config(hidden_act: str, eos_token_id: int) -> CLIPTextConfig:
    # Full vocabulary (the eos-by-argmax rule needs 49407 to be the highest id); head dim 8 != width 32; odd MLP width.
    return CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                          hidden_act=hidden_act, projection_dim=24, bos_token_id=0 if eos_token_id == 2 else BOS,
                          eos_token_id=eos_token_id)


def prompt_ids(pad_id: int, lengths=(5, 20, 77)) -> torch.Tensor:
    """Rows like the tokenizer makes: bos, words, eos, padding (pad 49407 for CLIP-L, 0 for bigG); one fills all 77."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        words = torch.randint(1, 49400, (n - 2,), generator=g).tolist()
        rows.append([BOS, *words, EOS] + [pad_id] * (77 - n))
    return torch.tensor(rows)


def hf_model(cls, config: CLIPTextConfig):
    torch.manual_seed(0)
    return cls(transformers.CLIPTextConfig(**config.to_dict())).eval()


TOL = 1e-5  # fp32, same weights and same math up to summation order: within 1e-5 of the output's scale


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert_close_to_scale(ours, ref, TOL)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, EOS])
@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_text_model_matches_transformers(hidden_act, eos_token_id, pad_id):
    config = tiny_config(hidden_act, eos_token_id)
    ref = hf_model(transformers.CLIPTextModel, config)
    ours = CLIPTextModel(config).eval()
    ours.load_state_dict(ref.state_dict())  # transformers 5 keys: no `text_model.` prefix
    ids = prompt_ids(pad_id)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert len(o.hidden_states) == len(r.hidden_states) == config.num_hidden_layers + 1
    for mine, theirs in zip(o.hidden_states, r.hidden_states):
        assert_close(mine, theirs)
    assert_close(o.last_hidden_state, r.last_hidden_state)
    assert_close(o.pooled_output, r.pooler_output)
    assert o.text_embeds is None


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_projection_model_matches_transformers(hidden_act):
    config = tiny_config(hidden_act, eos_token_id=2)
    ref = hf_model(transformers.CLIPTextModelWithProjection, config)
    ours = CLIPTextModelWithProjection(config).eval()
    ours.load_state_dict(ref.state_dict())  # keys with the `text_model.` prefix, plus text_projection.weight
    ids = prompt_ids(pad_id=0)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert_close(o.hidden_states[-2], r.hidden_states[-2])  # what SDXL feeds the UNet
    assert_close(o.last_hidden_state, r.last_hidden_state)
    assert_close(o.text_embeds, r.text_embeds)


def test_padding_after_eos_does_not_change_what_sdxl_reads():
    """Causal attention: the states up to the first eos and the pooled output ignore what padding follows."""
    model = CLIPTextModelWithProjection(tiny_config("gelu", eos_token_id=2)).eval()
    a, b = prompt_ids(pad_id=EOS, lengths=(9,)), prompt_ids(pad_id=0, lengths=(9,))
    with torch.no_grad():
        oa, ob = model(a), model(b)
    torch.testing.assert_close(oa.hidden_states[-2][:, :9], ob.hidden_states[-2][:, :9])
    torch.testing.assert_close(oa.text_embeds, ob.text_embeds)


def test_state_dict_keys_with_and_without_prefix_and_position_ids():
    config = tiny_config("quick_gelu", eos_token_id=2)
    src = CLIPTextModel(config)
    keys = src.state_dict()
    assert all(k.startswith("text_model.") for k in keys)
    assert "text_model.encoder.layers.2.self_attn.out_proj.weight" in keys
    # A real SDXL file's CLIP-L part: prefixed, and with the old position_ids buffer.
    with_buffer = {**keys, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    without_prefix = {k.removeprefix("text_model."): v for k, v in keys.items()}
    for sd in (keys, with_buffer, without_prefix):
        dst = CLIPTextModel(config)
        dst.load_state_dict(sd)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, keys[k]), k
    with pytest.raises(RuntimeError, match="Missing key"):
        CLIPTextModel(config).load_state_dict({k: v for k, v in keys.items() if "layers.2" not in k})


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, hidden_act="relu"))
    with pytest.raises(ValueError, match="not a multiple"):
        CLIPTextModel(CLIPTextConfig(hidden_size=30, num_attention_heads=4, num_hidden_layers=1))
    model = CLIPTextModel(tiny_config("gelu", eos_token_id=2))
    with pytest.raises(ValueError, match="at most 77"):
        model(torch.zeros(1, 78, dtype=torch.long))


def test_from_dict_ignores_unknown_keys():
    d = {"architectures": ["CLIPTextModelWithProjection"], "torch_dtype": "float16", "hidden_act": "gelu",
         "hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280, "eos_token_id": 2}
    config = CLIPTextConfig.from_dict(d)
    assert (config.hidden_act, config.hidden_size, config.num_hidden_layers, config.eos_token_id) == ("gelu", 1280, 32, 2)


@pytest.mark.parametrize("preset,cls,hf_cls,n_params", [
    (CLIPTextConfig.sdxl_clip_l, CLIPTextModel, transformers.CLIPTextModel, 123_060_480),
    (CLIPTextConfig.sdxl_clip_bigg, CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection,
     694_659_840),
])
def test_full_size_sdxl_encoders_have_transformers_keys_and_shapes(preset, cls, hf_cls, n_params):
    config = preset()
    with torch.device("meta"):
        ours = cls(config)
        ref = hf_cls(transformers.CLIPTextConfig(**config.to_dict()))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in normalize_clip_keys(ref.state_dict()).items()}
    assert ours_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == n_params  # transformers' CLIP ViT-L and OpenCLIP bigG text towers: 123.06M and 694.66M


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(tiny_config("gelu", eos_token_id=2))
    ids = prompt_ids(pad_id=0)

    def run(enabled: bool):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        out = model(ids)
        (out.hidden_states[-2].square().mean() + out.text_embeds.square().mean()).backward()
        return out.text_embeds.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
