"""Write a reference fixture from the official backbone (torchscale) at a config the golden files do not use.

Run with the torchscale environment (``../shared/tools/make-torchscale-venv.sh``):

    /tmp/torchscale-venv/bin/python benchmarks/torchscale_reference.py tests/fixtures/torchscale_check.safetensors

The file holds the official module's random weights (``state_dict.*``, torchscale ``BEiT3`` names, i.e. the
official checkpoint keys without ``beit3.``), inputs (``input.*``) and outputs (``output.*``), with the config
as metadata; ``tests/test_reference_check.py`` compares multiway against it.
"""

import json
import sys

import torch
from safetensors.torch import save_file
from torchscale.architecture.config import EncoderConfig
from torchscale.model.BEiT3 import BEiT3

CONFIG = dict(depth=3, embed_dim=96, num_heads=6, ffn_dim=200, img_size=48, patch_size=16, vocab_size=500, max_text_positions=40)
SEED, BATCH, TEXT_LEN = 123, 3, 12


def main(out: str) -> None:
    torch.manual_seed(SEED)
    c = CONFIG
    args = EncoderConfig(
        vocab_size=c["vocab_size"],
        multiway=True,
        layernorm_embedding=False,
        normalize_output=True,
        no_output_layer=True,
        encoder_embed_dim=c["embed_dim"],
        encoder_attention_heads=c["num_heads"],
        encoder_ffn_embed_dim=c["ffn_dim"],
        encoder_layers=c["depth"],
        img_size=c["img_size"],
        patch_size=c["patch_size"],
        in_chans=3,
        max_source_positions=c["max_text_positions"],
        drop_path_rate=0.0,
    )
    model = BEiT3(args).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so routing mistakes show
        for name, p in model.named_parameters():
            if "layer_norm" in name or "ffn_layernorm" in name or "inner_attn_ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    image = torch.randn(BATCH, 3, c["img_size"], c["img_size"])
    ids = torch.randint(4, c["vocab_size"], (BATCH, TEXT_LEN))
    ids[:, 0] = 0
    pad = torch.zeros(BATCH, TEXT_LEN, dtype=torch.long)
    pad[1, 7:] = 1  # three padding patterns: none, 5 pads, 1 pad
    pad[2, -1:] = 1
    ids[pad.bool()] = 1
    masked = torch.zeros(BATCH, (c["img_size"] // c["patch_size"]) ** 2, dtype=torch.long)
    masked[:, [1, 4]] = 1
    n_img = masked.shape[1] + 1
    total = n_img + TEXT_LEN
    allowed = torch.zeros(total, total, dtype=torch.long)
    allowed[:n_img, :n_img] = 1
    allowed[n_img:, :n_img] = 1
    allowed[n_img:, n_img:] = torch.ones(TEXT_LEN, TEXT_LEN).tril()
    with torch.no_grad():
        outputs = {
            "vision_only": model(textual_tokens=None, visual_tokens=image)["encoder_out"],
            "vision_masked": model(textual_tokens=None, visual_tokens=image, vision_masked_position=masked)["encoder_out"],
            "text_only": model(textual_tokens=ids, visual_tokens=None, text_padding_position=pad)["encoder_out"],
            "fused": model(textual_tokens=ids, visual_tokens=image, text_padding_position=pad)["encoder_out"],
            "fused_seq2seq": model(textual_tokens=ids, visual_tokens=image, text_padding_position=pad, attn_mask=1 - allowed)[
                "encoder_out"
            ],
        }
    tensors = {f"state_dict.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({"input.image": image, "input.text_ids": ids, "input.padding_mask": pad, "input.image_masked": masked})
    tensors.update({f"output.{k}": v.contiguous() for k, v in outputs.items()})
    save_file(tensors, out, metadata={"config": json.dumps(CONFIG), "seed": str(SEED), "source": "torchscale BEiT3"})
    print(f"wrote {out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/torchscale_check.safetensors")
