"""The U-Net configs: sizes, cross-attention to the text states, channels_last, the diffusers save/load round trip."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from training.models.unet import build_unet, count_parameters, unet_config, unet_config_path

torch.set_num_threads(1)


def test_tiny_unet_shapes_text_conditioning_and_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("tiny", cross_attention_dim=32, sample_size=8).eval()
    assert 0.8e6 < count_parameters(unet) < 1.3e6
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 500, 999])
    text = torch.randn(3, 16, 32)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=text).sample
        other = unet(x, t, encoder_hidden_states=torch.randn(3, 16, 32)).sample
        later = unet(x, t + 1 - t, encoder_hidden_states=text).sample
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()
    assert (out - other).abs().max() > 1e-3  # the output reads the text states (cross-attention)
    assert (out - later).abs().max() > 1e-3  # and the timestep
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert cross and all(m.to_k.in_features == 32 for m in cross)
    assert len(unet.down_blocks) == len(unet.up_blocks) == 2  # down path, up path with skip connections
    unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    back = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"), low_cpu_mem_usage=False).eval()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), unet.state_dict().values(), strict=True))
    with torch.no_grad():  # loaded contiguous, not channels_last: other conv kernels, float rounding only
        assert torch.allclose(back(x, t, encoder_hidden_states=text).sample, out, atol=1e-5)
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["cross_attention_dim"] == 32


def test_gpu_configs_have_the_documented_architectures():
    with torch.device("meta"):  # no memory: shapes only
        sd = build_unet("sd15")
        small = build_unet("small", cross_attention_dim=512, sample_size=32)
    assert count_parameters(sd) == 859_520_964  # Stable Diffusion 1.x's U-Net
    assert list(sd.config.block_out_channels) == [320, 640, 1280, 1280] and sd.config.cross_attention_dim == 768
    assert 20e6 < count_parameters(small) < 150e6 and small.config.sample_size == 32


def test_config_names_and_errors(tmp_path):
    assert unet_config_path("tiny").name == "unet-tiny.json"
    cfg = unet_config("tiny", cross_attention_dim=48, sample_size=16)
    assert cfg["cross_attention_dim"] == 48 and cfg["sample_size"] == 16 and "_comment" not in cfg
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**cfg, "block_out_channels": [16, 32]}))
    assert list(build_unet(str(path)).config.block_out_channels) == [16, 32]
    with pytest.raises(ValueError, match="unknown U-Net config"):
        build_unet("huge")
